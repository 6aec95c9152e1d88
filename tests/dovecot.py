"""A real IMAP server for the bounce tests: Debian's Dovecot, on a free port, in a temp folder.

Each :class:`Dovecot` gets a throwaway configuration, Maildirs and log under its own folder,
implicit TLS (993-style) with the sandbox's certificate (clients verify it against the sandbox
CA, as ``GMAIL_SMTP["CA_FILE"]`` says), and two ways to log in, like Gmail's IMAP:

- an App Password: a ``passwd-file`` passdb with each user's static password (PLAIN / LOGIN);
- XOAUTH2: Dovecot's own ``oauth2`` passdb, which asks a token-info URL about each bearer
  token. Here that URL is a tiny HTTP server of this module that answers from the Gmail
  sandbox's OAuth authority, so a token the sandbox's token endpoint issued (by refreshing an
  account's refresh token) logs in, and any other token is refused, as Gmail does.

Dovecot is installed by ``.ci/run`` (``apt-get install dovecot-imapd``); without it the tests
that need it are skipped, saying so.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from django_gmail_smtp.testing.certs import CertificateFiles, ensure_certificates

from .processes import wait_for

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"

#: why the Dovecot tests are skipped, or None when Dovecot is there
MISSING = (
    None
    if os.access(DOVECOT, os.X_OK)
    else "Dovecot is not installed (apt-get install dovecot-imapd; .ci/run installs it)"
)

_CONFIG = """\
# A throwaway Dovecot for tests: nothing here outlives the test's temp folder.
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = bounce-tests-{port}
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login xoauth2 oauthbearer
auth_verbose = yes
auth_failure_delay = 0
{users}
mail_location = maildir:~
mail_uid = {mail_uid}
mail_gid = {mail_gid}
first_valid_uid = {mail_uid}
last_valid_uid = {mail_uid}
first_valid_gid = {mail_gid}
valid_chroot_dirs = {chroot_dirs}
protocol imap {{
  mail_max_userip_connections = 50
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
  mechanisms = plain login
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf.ext
}}
userdb {{
  driver = static
  args = home={home}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    user = {user}
  }}
  unix_listener stats-writer {{
    user = {user}
  }}
}}
"""

_OAUTH2 = """\
tokeninfo_url = http://127.0.0.1:{port}/tokeninfo?access_token=
username_attribute = email
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _TokenInfo(ThreadingHTTPServer):
    """Answers ``GET /tokeninfo?access_token=...`` as Google's token-info endpoint does."""

    daemon_threads = True

    def __init__(self, check: Callable[[str], str | None]) -> None:
        super().__init__(("127.0.0.1", 0), _TokenInfoHandler)
        self.check = check
        self.requests = 0


class _TokenInfoHandler(BaseHTTPRequestHandler):
    server: _TokenInfo

    def do_GET(self) -> None:
        self.server.requests += 1
        split = urllib.parse.urlsplit(self.path)
        token = urllib.parse.parse_qs(split.query).get("access_token", [""])[0]
        email = self.server.check(token) if split.path == "/tokeninfo" and token else None
        if email:
            status, body = 200, {"email": email, "scope": "https://mail.google.com/"}
        else:
            status, body = 400, {"error": "invalid_token"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Dovecot:
    """A running Dovecot IMAP server (``start()``/``stop()``, or a context manager).

    ``token_user``: for XOAUTH2, returns the address an access token belongs to, or None.
    """

    def __init__(
        self,
        root: Path,
        *,
        token_user: Callable[[str], str | None] | None = None,
        certs: CertificateFiles | None = None,
    ) -> None:
        self.root = Path(root)
        # The sandbox's own certificates by default, so one CA_FILE serves SMTP and IMAP.
        self.certs: CertificateFiles = certs or ensure_certificates()
        self.host = "127.0.0.1"
        self.port = 0
        self._token_user = token_user or (lambda token: None)
        self._tokeninfo: _TokenInfo | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._passwords: dict[str, str] = {}
        self._passwd_mtime = 0

    @property
    def ca_file(self) -> str:
        return str(self.certs.ca_file)

    def settings(self) -> dict[str, object]:
        """GMAIL_SMTP keys that point the bounce reader at this server."""
        return {"IMAP_HOST": self.host, "IMAP_PORT": self.port, "CA_FILE": self.ca_file}

    # --- users and mail ------------------------------------------------------------------------
    def add_user(self, email: str, password: str) -> None:
        """A mailbox ``email`` that logs in with ``password`` (or XOAUTH2)."""
        self._passwords[email] = password
        lines = [f"{user}:{{PLAIN}}{secret}::::::" for user, secret in self._passwords.items()]
        passwd = self.root / "passwd"
        passwd.write_text("\n".join(lines) + "\n")
        # Dovecot re-reads the file when its mtime (whole seconds) or size changes: a password
        # changed within the same second, to one as long, must still be seen.
        self._passwd_mtime = max(self._passwd_mtime + 1, int(time.time()))
        os.utime(passwd, (self._passwd_mtime, self._passwd_mtime))
        self._own(self.root / "mail")
        self._maildir(email).mkdir(parents=True, exist_ok=True)
        self._own(self._maildir(email))
        for folder in ("cur", "new", "tmp"):
            (self._maildir(email) / folder).mkdir(exist_ok=True)
            self._own(self._maildir(email) / folder)

    @staticmethod
    def _mail_ids() -> tuple[int, int]:
        if os.getuid() != 0:
            return os.getuid(), os.getgid()
        entry = pwd.getpwnam("dovecot")
        return entry.pw_uid, entry.pw_gid

    def _own(self, path: Path) -> None:
        """As root, give ``path`` to the user Dovecot reads mail as."""
        if os.getuid() == 0:
            os.chown(path, *self._mail_ids())

    def _maildir(self, email: str) -> Path:
        return self.root / "mail" / email

    def deliver(self, email: str, message: EmailMessage | bytes) -> Path:
        """Put ``message`` into ``email``'s INBOX, as local delivery does (Maildir ``new/``)."""
        data = message if isinstance(message, bytes) else message.as_bytes()
        folder = self._maildir(email)
        name = f"{time.time_ns()}.P{os.getpid()}Q{len(os.listdir(folder / 'new'))}.tests"
        (folder / "tmp" / name).write_bytes(data)
        self._own(folder / "tmp" / name)
        os.replace(folder / "tmp" / name, folder / "new" / name)
        return folder / "new" / name

    def folder_count(self, email: str, folder: str) -> int:
        """Messages in ``email``'s Maildir++ folder (``INBOX`` or another name)."""
        base = self._maildir(email) if folder == "INBOX" else self._maildir(email) / f".{folder}"
        return sum(len(os.listdir(base / sub)) for sub in ("cur", "new") if (base / sub).is_dir())

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Dovecot:
        self._tokeninfo = _TokenInfo(self._token_user)
        threading.Thread(target=self._tokeninfo.serve_forever, daemon=True).start()
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "passwd").touch()
        (self.root / "oauth2.conf.ext").write_text(
            _OAUTH2.format(port=self._tokeninfo.server_address[1])
        )
        user = getpass.getuser()
        group = grp.getgrgid(os.getgid()).gr_name
        # Run unprivileged, every process as this user. As root (a CI container), the helper
        # processes stay root too (a throwaway server on 127.0.0.1), except the login process,
        # which Dovecot refuses to run as root: it gets the package's own "dovenull".
        login_user = "dovenull" if os.getuid() == 0 else user
        # Nor does it read mail as root: then the mail processes chroot into the Maildirs
        # (so the test's 0700 temp folders above them need not be opened up) and read them as
        # the package's "dovecot" user, who owns them (see _own).
        mail_uid, mail_gid = self._mail_ids()
        if os.getuid() == 0:
            home, chroot_dirs = f"{self.root}/mail/./%u", f"{self.root}/mail"
        else:
            home, chroot_dirs = f"{self.root}/mail/%u", ""
        users = (
            f"default_internal_user = {user}\n"
            f"default_internal_group = {group}\n"
            f"default_login_user = {login_user}"
        )
        last_error = ""
        for _ in range(5):  # the free port may be taken between finding and binding it
            self.port = _free_port()
            config = self.root / "dovecot.conf"
            config.write_text(
                _CONFIG.format(
                    root=self.root,
                    port=self.port,
                    cert=self.certs.cert_file,
                    key=self.certs.key_file,
                    users=users,
                    mail_uid=mail_uid,
                    mail_gid=mail_gid,
                    home=home,
                    chroot_dirs=chroot_dirs,
                    user=user,
                )
            )
            self._process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            if self._wait_listening():
                return self
            last_error = self._stop_process()
        raise RuntimeError(f"Dovecot did not start: {last_error}\n{self.log()}")

    def _wait_listening(self, timeout: float = 15.0) -> bool:
        """Wait until a TLS handshake on the port succeeds (or Dovecot exits)."""
        assert self._process is not None
        context = ssl.create_default_context(cafile=self.ca_file)

        def state() -> str:
            if self._process is None or self._process.poll() is not None or "Fatal:" in self.log():
                return "dead"
            try:
                with (
                    socket.create_connection((self.host, self.port), timeout=2) as raw,
                    context.wrap_socket(raw, server_hostname=self.host) as tls,
                ):
                    return "up" if tls.recv(100).startswith(b"* OK") else ""
            except OSError:
                return ""

        try:
            return wait_for(state, timeout, "Dovecot to answer over TLS") == "up"
        except AssertionError:
            return False

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _stop_process(self) -> str:
        process, self._process = self._process, None
        if process is None:
            return ""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        assert process.stderr is not None
        error = process.stderr.read().decode(errors="replace")
        process.stderr.close()
        return error

    def stop(self) -> None:
        self._stop_process()
        if self._tokeninfo is not None:
            self._tokeninfo.shutdown()
            self._tokeninfo.server_close()
            self._tokeninfo = None

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
