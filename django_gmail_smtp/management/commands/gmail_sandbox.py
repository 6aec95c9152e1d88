"""``manage.py gmail_sandbox``: run a local Gmail look-alike to try a site's mail offline."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from django_gmail_smtp.testing import Delivered, GmailSandbox

DEFAULT_USER = ("sandbox@example.com", "sandboxapppasswd")


def _pair(value: str, what: str) -> tuple[str, str]:
    first, sep, second = value.partition(":")
    if not sep or not first or not second:
        raise CommandError(f"expected {what}, got {value!r}")
    return first.strip(), second


def oauth_port_for(smtp_port: int, oauth_port: int | None) -> int:
    """The OAuth endpoint's port: the one asked for, else the SMTP port + 1 (a fixed port, so
    the TOKEN_URI and AUTH_URI printed on start stay valid when the sandbox is restarted), or
    0 (any free port) when SMTP listens on any free port too."""
    for name, port in (("--port", smtp_port), ("--oauth-port", oauth_port)):
        if port is not None and not 0 <= port <= 65535:
            raise CommandError(f"{name} must be a port number from 0 to 65535, not {port}.")
    if oauth_port is not None:
        return oauth_port
    if smtp_port == 0:
        return 0
    if smtp_port == 65535:
        raise CommandError("--port 65535 leaves no port above it for OAuth; give --oauth-port.")
    return smtp_port + 1


#: The signals that stop the sandbox: Ctrl-C, and a service manager's or a script's stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    """Make SIGINT and SIGTERM set ``stop``; return the handlers they had.

    Installed explicitly, whatever was inherited: a process started in the background by a
    non-interactive shell inherits SIGINT *ignored*, so Python raises no KeyboardInterrupt and
    Ctrl-C (or a script's ``kill -INT``) would never stop the sandbox.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}  # call_command() from a thread: signal handlers can only be set in the main one
    return {signum: signal.signal(signum, lambda *_: stop.set()) for signum in STOP_SIGNALS}


class Command(BaseCommand):
    help = (
        "Run a local SMTP server that answers like smtp.gmail.com, and a Google-compatible "
        "OAuth token endpoint, until Ctrl-C. Point GMAIL_SMTP at it (the settings to paste are "
        "printed on start) to send a site's mail without touching Gmail."
    )
    requires_system_checks: list[str] = []  # runs even while the site is being configured

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1)."
        )
        parser.add_argument(
            "--port", type=int, default=2587, help="SMTP port to listen on (default: 2587)."
        )
        parser.add_argument(
            "--ssl",
            action="store_true",
            help="Speak implicit TLS from the first byte (like port 465) instead of STARTTLS "
            "(like port 587).",
        )
        parser.add_argument(
            "--oauth-port",
            "--token-port",
            dest="oauth_port",
            type=int,
            default=None,
            metavar="PORT",
            help="Port of the OAuth endpoints (TOKEN_URI, AUTH_URI) on 127.0.0.1 (default: the "
            "SMTP port + 1, so the printed settings stay valid across restarts; any free port "
            "with --port 0).",
        )
        parser.add_argument(
            "--user",
            action="append",
            default=[],
            metavar="EMAIL:APP_PASSWORD",
            help="An account that may log in, with its App Password; repeat for more. Only "
            "these accounts are accepted (default: one account, "
            f"{DEFAULT_USER[0]}:{DEFAULT_USER[1]}).",
        )
        parser.add_argument(
            "--oauth-client",
            action="append",
            default=[],
            metavar="CLIENT_ID:CLIENT_SECRET",
            help="An OAuth client the token endpoint accepts; repeat for more.",
        )
        parser.add_argument(
            "--cert-dir",
            default=".gmail_sandbox",
            help="Directory for the CA and server certificate, reused across runs so CA_FILE "
            "can point at a stable path (default: .gmail_sandbox in the current directory).",
        )
        parser.add_argument(
            "--spool",
            metavar="DIR",
            help="Also write every accepted message to DIR as a .eml file.",
        )
        parser.add_argument(
            "--daily-limit",
            type=int,
            metavar="N",
            help="Accept at most N messages per account in any 24 hours, then answer "
            "Gmail's 550 5.4.5 daily limit error (default: no limit).",
        )
        parser.add_argument(
            "--ready-file",
            metavar="PATH",
            help="Once listening, write a JSON file with host, port, ca_file and token_uri "
            "(removed on exit), so scripts can wait for the sandbox.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        users = [_pair(value, "EMAIL:APP_PASSWORD") for value in options["user"]]
        clients = [_pair(value, "CLIENT_ID:CLIENT_SECRET") for value in options["oauth_client"]]
        if not users:
            users = [DEFAULT_USER]
        spool = Path(options["spool"]).resolve() if options["spool"] else None
        if spool is not None:
            spool.mkdir(parents=True, exist_ok=True)

        oauth_port = oauth_port_for(options["port"], options["oauth_port"])
        sandbox = GmailSandbox(
            security="ssl" if options["ssl"] else "starttls",
            host=options["host"],
            port=options["port"],
            token_port=oauth_port,
            cert_dir=options["cert_dir"],
            on_delivery=lambda message: self._delivered(message, spool),
        )
        for email, password in users:
            sandbox.add_user(email, app_password=password, daily_limit=options["daily_limit"])
        for client_id, secret in clients:
            sandbox.add_oauth_client(client_id, secret)
        try:
            sandbox.start()
        except OSError as exc:
            raise CommandError(
                f"Cannot listen on {options['host']}:{options['port']} (SMTP) and "
                f"127.0.0.1:{oauth_port} (OAuth): {exc}. Stop whatever uses these ports, or "
                "choose others with --port and --oauth-port."
            ) from exc

        ready_file = Path(options["ready_file"]).resolve() if options["ready_file"] else None
        stop = threading.Event()
        previous = _stop_on_signals(stop)
        try:
            self._announce(sandbox, users, clients, spool, options["daily_limit"])
            if ready_file is not None:
                self._write_ready_file(ready_file, sandbox)
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            sandbox.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if ready_file is not None:
                ready_file.unlink(missing_ok=True)
            self.stdout.write("Gmail sandbox stopped.")

    def _announce(
        self,
        sandbox: GmailSandbox,
        users: list[tuple[str, str]],
        clients: list[tuple[str, str]],
        spool: Path | None,
        daily_limit: int | None,
    ) -> None:
        mode = (
            "implicit TLS, like port 465"
            if sandbox.security == "ssl"
            else "STARTTLS, like port 587"
        )
        lines = [
            f"Gmail sandbox listening for SMTP on {sandbox.host}:{sandbox.port} ({mode}).",
            f"OAuth endpoints: {sandbox.token_uri} and {sandbox.auth_uri}",
            f"Clients must trust this CA certificate: {sandbox.ca_file}",
            "",
            "Accounts that may log in (with these App Passwords):",
            *(f"  {email}  {password}" for email, password in users),
        ]
        if clients:
            lines += ["OAuth clients:", *(f"  {client_id}" for client_id, _ in clients)]
        if daily_limit is not None:
            lines.append(f"Daily limit: {daily_limit} messages per account.")
        if spool is not None:
            lines.append(f"Accepted messages are also written to {spool}")
        lines += [
            "",
            "Paste this into your settings to send through the sandbox:",
            "",
            "GMAIL_SMTP = {",
            *(
                f"    {json.dumps(key)}: {json.dumps(value) if isinstance(value, str) else value},"
                for key, value in sandbox.settings().items()
            ),
            "}",
            "",
            "Quit with CONTROL-C.",
        ]
        self.stdout.write("\n".join(lines))
        self.stdout.flush()

    def _write_ready_file(self, path: Path, sandbox: GmailSandbox) -> None:
        info = {
            "host": sandbox.host,
            "port": sandbox.port,
            "security": sandbox.security,
            "ca_file": sandbox.ca_file,
            "token_uri": sandbox.token_uri,
            "auth_uri": sandbox.auth_uri,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)  # atomic: a waiting script never reads half a file

    def _delivered(self, message: Delivered, spool: Path | None) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(message.received_at))
        line = (
            f"[{stamp}] accepted from {message.mail_from or '<>'} (login {message.user}) "
            f"to {', '.join(message.rcpt_tos)}: {message.subject!r}"
        )
        if spool is not None:
            day = time.strftime("%Y%m%d-%H%M%S", time.localtime(message.received_at))
            target = spool / f"{day}-{message.message_id}.eml"
            target.write_bytes(message.data)
            line += f" -> {target}"
        self.stdout.write(line)
        self.stdout.flush()
