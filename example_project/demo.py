#!/usr/bin/env python
"""Send real mail from the example site through a local Gmail sandbox, and show it.

    python example_project/demo.py            # two messages, printed, then exit
    python example_project/demo.py --serve    # the site on http://127.0.0.1:8000 until Ctrl-C

The sandbox is a Gmail-compatible SMTP server on 127.0.0.1 (STARTTLS, App Password login).
The site sends through it exactly as it would through smtp.gmail.com: same backend, same
settings, only GMAIL_SMTP's HOST/PORT/CA_FILE point elsewhere.

The password reset goes out at once through GmailSMTPBackend (MAILERS["default"] on Django 6.1,
EMAIL_BACKEND before). The contact form goes through CeleryGmailBackend (MAILERS["contact"],
CONTACT_EMAIL_BACKEND before): the request only writes an outbox row, and a real Celery worker
(started here, on the embedded atomicfs:// broker, a folder of files: no server needed) sends it.

The demo keeps its own SQLite database (example_project/var/demo.sqlite3) and broker folder
(example_project/var/broker/), whatever DATABASE_URL and CELERY_BROKER_URL say, unless
--database-url / --broker-url / --broker-folder are given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DATABASE_URL = f"sqlite:///{HERE / 'var' / 'demo.sqlite3'}"
DEFAULT_BROKER_URL = "atomicfs://"  # django_gmail_smtp.testing.broker
EMBEDDED_BROKERS = ("atomicfs://", "filesystem://")  # brokers that are a folder
DEFAULT_BROKER_FOLDER = HERE / "var" / "broker"

SYNC_BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
CELERY_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"
QUEUES = "gmail_smtp.transactional,gmail_smtp.bulk"

SENDER = "demo@example.com"
APP_PASSWORD = "abcd efgh ijkl mnop"  # as Google shows it; the spaces are not part of it
SITE_USER = "alice@example.com"
STAFF = "staff@example.com"
ADMIN = ("admin", "admin")  # --serve only, in the demo database only

RESET_LINK = re.compile(r"https?://\S+/reset/\S+")


def say(text: str) -> None:
    print(text, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="run the site (runserver) with the sandbox in the background until Ctrl-C",
    )
    parser.add_argument("--port", type=int, default=8000, help="runserver's port (--serve)")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="database for the demo (default: %(default)s)",
    )
    parser.add_argument(
        "--broker-url",
        default=DEFAULT_BROKER_URL,
        help="Celery broker for the demo's worker (default: %(default)s, a folder of files)",
    )
    parser.add_argument(
        "--broker-folder",
        type=Path,
        default=DEFAULT_BROKER_FOLDER,
        help="the embedded broker's folder; the worker's log goes next to it\n"
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback if something fails"
    )
    return parser.parse_args(argv)


def configure(sandbox_settings: dict[str, Any], args: argparse.Namespace) -> None:
    """Point the example site's settings (read from the environment) at the sandbox.

    The Celery worker is started with this same environment, so it reads the same settings.
    """
    import django

    database_url = args.database_url
    if database_url.startswith("sqlite:///"):
        Path(database_url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if django.VERSION >= (6, 1):  # MAILERS["default"] and MAILERS["contact"]
        backends = {"MAILER_BACKEND": SYNC_BACKEND, "CONTACT_MAILER_BACKEND": CELERY_BACKEND}
    else:  # Django < 6.1: EMAIL_BACKEND and CONTACT_EMAIL_BACKEND
        backends = {"EMAIL_BACKEND": SYNC_BACKEND, "CONTACT_EMAIL_BACKEND": CELERY_BACKEND}
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "example_project.settings",
            "DATABASE_URL": database_url,
            "DEBUG": "True",
            "ALLOWED_HOSTS": "localhost,127.0.0.1",
            **backends,
            "CELERY_BROKER_URL": args.broker_url,
            "CELERY_BROKER_FOLDER": str(args.broker_folder.resolve()),
            "DEFAULT_FROM_EMAIL": f"Example site <{SENDER}>",
            "STAFF_EMAIL": STAFF,
        }
    )
    # The demo sends as its GmailAccount, not as a login from the environment.
    for name in ("EMAIL_URL", "GMAIL_USER", "GMAIL_APP_PASSWORD"):
        os.environ.pop(name, None)
    for key, value in sandbox_settings.items():
        if value is not None:
            os.environ[f"GMAIL_SMTP_{key}"] = str(value)


def prepare_database(*, serve: bool) -> None:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from django_gmail_smtp.models import GmailAccount

    say("Migrating SQLite..." if _is_sqlite() else "Migrating the database...")
    call_command("migrate", verbosity=0, interactive=False)

    say(f"Saving the Gmail account {SENDER} (App Password, encrypted in the database)...")
    GmailAccount.objects.exclude(email=SENDER).filter(is_default=True).update(is_default=False)
    account = GmailAccount.objects.filter(email=SENDER).first() or GmailAccount(email=SENDER)
    account.auth_method = GmailAccount.AuthMethod.APP_PASSWORD
    account.app_password = APP_PASSWORD
    account.is_default = True
    account.is_active = True
    account.full_clean()
    account.save()

    User = get_user_model()
    alice = User.objects.filter(username="alice").first() or User(username="alice")
    alice.email = SITE_USER
    alice.is_active = True
    alice.set_password("correct horse battery staple")
    alice.save()
    if serve and not User.objects.filter(username=ADMIN[0]).exists():
        User.objects.create_superuser(ADMIN[0], "admin@example.com", ADMIN[1])


def _is_sqlite() -> bool:
    from django.db import connection

    return connection.vendor == "sqlite"


def shown(path: Path) -> str:
    """A path as the user would type it from here."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class CeleryWorker:
    """A real ``celery worker`` with an embedded beat, on the demo's settings (its environment)."""

    def __init__(self, broker_folder: Path) -> None:
        var = broker_folder.resolve().parent
        self.log_path = var / "celery-worker.log"
        self.schedule_path = var / "celerybeat-schedule"
        self.command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "example_project",
            "worker",
            "-Q",
            QUEUES,
            "--concurrency",
            "1",
            "--beat",
            "--schedule",
            str(self.schedule_path),
            "--loglevel",
            "INFO",
            # One worker alone: nothing to synchronise with, and it is ready sooner.
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)  # configure() put the demo's settings there
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the worker
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self, last: int | None = None) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-last:] if last else lines)

    def failure(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{what}. The last lines of its log ({self.log_path}):\n{self.log(last=30)}"
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if not self.running:
                raise self.failure("The Celery worker exited before it was ready")
            if time.monotonic() > deadline:
                raise self.failure(f"The Celery worker was not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self, grace: float = 10) -> str:
        """SIGTERM (a warm shutdown), then SIGKILL the whole process group after ``grace``."""
        process = self.process
        if process is None:
            return "it was not started"
        if process.poll() is not None:
            how = f"it had already exited (code {process.returncode})"
        else:
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
                how = f"stopped after {time.monotonic() - started:.1f} s (warm shutdown)"
            except subprocess.TimeoutExpired:
                how = f"not stopped {grace:.0f} s after SIGTERM: killed (SIGKILL)"
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # anything left in its group
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        return how


@contextlib.contextmanager
def celery_worker(broker_folder: Path, broker_url: str) -> Iterator[CeleryWorker]:
    """Start a worker, wait until it is ready, and stop it on the way out (also on errors and
    Ctrl-C)."""
    worker = CeleryWorker(broker_folder)
    if broker_url.startswith(EMBEDDED_BROKERS):
        say("Starting a Celery worker (embedded file broker, no server needed)...")
    else:
        say(f"Starting a Celery worker (broker {broker_url.split('://', 1)[0]}://...)...")
    started = time.monotonic()
    worker.start()
    try:
        worker.wait_ready()
        assert worker.process is not None
        say(
            f"  ready after {time.monotonic() - started:.1f} s: "
            f"celery -A example_project worker -Q {QUEUES} --concurrency 1 --beat "
            f"(pid {worker.process.pid}; log {shown(worker.log_path)})"
        )
        if broker_url.startswith(EMBEDDED_BROKERS):
            folder = Path(os.environ["CELERY_BROKER_FOLDER"]) / "messages"
            say(f"  tasks travel as files in {shown(folder)}/")
        yield worker
    finally:
        say("Stopping the Celery worker (SIGTERM)...")
        say(f"  {worker.stop()}")


def send_password_reset() -> None:
    from django.contrib.auth.forms import PasswordResetForm

    say(f"Sending a password reset to {SITE_USER} (PasswordResetForm, GmailSMTPBackend)...")
    form = PasswordResetForm(data={"email": SITE_USER})
    if not form.is_valid():
        raise RuntimeError(f"PasswordResetForm refused the address: {form.errors.as_text()}")
    started = time.perf_counter()
    form.save(domain_override="localhost:8000", use_https=False)
    took = (time.perf_counter() - started) * 1000
    say(f"  form.save() took {took:.0f} ms: it sent the message itself, over SMTP, right away")


def send_contact_message() -> int:
    """Post the contact form; return the id of the outbox row its view wrote."""
    from django.test import Client

    from django_gmail_smtp.signals import email_queued

    say("Posting the contact form (its view sends text + HTML to the staff, CeleryGmailBackend)...")
    client = Client(HTTP_HOST="localhost:8000")
    client.get("/")  # the visitor opens the form first
    queued: list[int] = []

    def on_queued(sender: Any, outbound: Any, **kwargs: Any) -> None:
        queued.append(outbound.pk)

    email_queued.connect(on_queued, weak=False, dispatch_uid="demo-contact")
    try:
        started = time.perf_counter()
        response = client.post(
            "/",
            {
                "name": "Bob Visitor",
                "email": "bob@example.org",
                "message": "Hello! Does this site really send its mail through Gmail?",
            },
        )
        took = (time.perf_counter() - started) * 1000
    finally:
        email_queued.disconnect(dispatch_uid="demo-contact")
    if response.status_code != 302:
        raise RuntimeError(
            f"The contact form answered {response.status_code} instead of redirecting: "
            f"{response.content.decode(errors='replace')[:500]}"
        )
    if len(queued) != 1:
        raise RuntimeError(f"The contact view queued {len(queued)} messages instead of 1.")
    say(
        f"  the view answered {response.status_code} in {took:.0f} ms: it only wrote outbox "
        f"row #{queued[0]} and handed its id to Celery"
    )
    return queued[0]


def wait_until_sent(outbound_id: int, worker: CeleryWorker, timeout: float = 30) -> Any:
    from django_gmail_smtp.models import OutboundEmail

    Status = OutboundEmail.Status
    say(f"Waiting for the Celery worker to send outbox row #{outbound_id}...")
    deadline = time.monotonic() + timeout
    while True:
        row = OutboundEmail.objects.get(pk=outbound_id)
        if row.status == Status.SENT:
            break
        if row.status in (Status.FAILED, Status.CANCELLED, Status.DEFERRED):
            raise worker.failure(
                f"Outbox row #{outbound_id} is {row.status} ({row.reason}): {row.last_error}"
            )
        if not worker.running:
            raise worker.failure(
                f"The Celery worker exited; outbox row #{outbound_id} is {row.status}"
            )
        if time.monotonic() > deadline:
            raise worker.failure(
                f"Outbox row #{outbound_id} is still {row.status} after {timeout:.0f} s"
            )
        time.sleep(0.1)
    waited = (row.sent_at - row.created_at).total_seconds()
    say(f"  {row.status}, {waited:.2f} s after it was queued")
    return row


def show_outbox_row(row: Any) -> None:
    attempts = list(row.log.all())
    code = next((a.code for a in attempts if a.outcome == row.status and a.code), "")
    title = f"Outbox row #{row.pk} (OutboundEmail, sent by the Celery worker)"
    say("")
    say(f"=== {title} " + "=" * max(3, 66 - len(title)))
    say(f"  Status         {row.status}")
    # The attempt log counts every try (the row's `attempts` is the retry counter).
    retries = "it went out on the first try" if len(attempts) == 1 else "retried, see the log"
    say(f"  Attempts       {len(attempts)} ({retries})")
    for attempt in attempts:
        say(
            f"  Attempt log    {attempt.at:%H:%M:%S} {attempt.outcome} {attempt.code or ''} "
            f"(worker {attempt.worker})"
        )
    say(f"  Gmail's reply  {code} {row.gmail_reply}".rstrip())
    say(f"  Account        {row.account_email}")
    say(f"  Priority       {row.priority}")
    queued, sent = (f"{t:%H:%M:%S.%f}"[:-3] for t in (row.created_at, row.sent_at))
    say(f"  Queued, sent   {queued}, {sent} UTC")


def text_body(message: Any) -> str:
    """The text/plain part of a delivered ``email.message.EmailMessage``."""
    part = None
    if hasattr(message, "get_body"):
        part = message.get_body(preferencelist=("plain",))
    if part is None:
        part = next((p for p in message.walk() if p.get_content_type() == "text/plain"), None)
    if part is None:
        return ""
    if hasattr(part, "get_content"):
        return part.get_content()
    return part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8")


def show(delivery: Any, title: str) -> str:
    """Print one delivered message; return its text body."""
    message = delivery.message
    body = text_body(message).strip()
    say("")
    say(f"=== {title} " + "=" * max(3, 66 - len(title)))
    how = " over ".join(
        x for x in (getattr(delivery, "mechanism", ""), getattr(delivery, "tls_version", "")) if x
    )
    say(f"  SMTP login     {delivery.user}" + (f" ({how})" if how else ""))
    say(f"  MAIL FROM      {delivery.mail_from}")
    say(f"  RCPT TO        {', '.join(delivery.rcpt_tos)}")
    for header in ("From", "To", "Reply-To", "Subject"):
        value = message.get(header)
        if value is not None:
            say(f"  {header + ':':<14} {value}")
    parts = [p.get_content_type() for p in message.walk() if not p.is_multipart()]
    say(f"  Parts          {', '.join(parts)}")
    say("  " + "-" * 68)
    for line in body.splitlines():
        say(f"  | {line}".rstrip())
    return body


def wait_for_delivery(sandbox: Any, what: str, match: Callable[[Any], bool]) -> Any:
    """The first message the sandbox accepted that ``match``es (not just the next one: the
    worker's beat may also send mail an earlier, interrupted run left in the outbox)."""
    deadline = time.monotonic() + 15
    while True:
        found = next((d for d in sandbox.deliveries if match(d)), None)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"The sandbox did not receive the {what} within 15 s.")
        time.sleep(0.05)


def run_demo(sandbox: Any, worker: CeleryWorker) -> None:
    send_password_reset()
    reset = wait_for_delivery(sandbox, "password reset email", lambda d: d.rcpt_tos == [SITE_USER])
    outbound_id = send_contact_message()
    row = wait_until_sent(outbound_id, worker)
    contact = wait_for_delivery(
        sandbox, "contact form email", lambda d: d.message.get("Message-ID") == row.message_id
    )

    body = show(reset, "Password reset (PasswordResetForm.save, GmailSMTPBackend)")
    match = RESET_LINK.search(body)
    if not match:
        raise RuntimeError("The password reset email has no reset link in its text body.")
    say("")
    say(f"  Reset link: {match.group(0)}")
    show_outbox_row(row)
    show(contact, "Contact form (EmailMultiAlternatives, text + HTML, via Celery)")
    say("")


def serve(sandbox: Any, port: int, worker: CeleryWorker) -> None:
    from django.core.management import call_command
    from django.db import connection

    from django_gmail_smtp.models import OutboundEmail

    stop = threading.Event()

    def how_sent(delivery: Any) -> str:
        message_id = str(delivery.message.get("Message-ID", "") or "")
        row = OutboundEmail.objects.filter(message_id=message_id).order_by("-pk").first()
        if message_id and row is not None:
            return f"  (sent by the Celery worker: outbox row #{row.pk})"
        return "  (sent at once by GmailSMTPBackend)"

    def watch() -> None:
        seen = len(sandbox.deliveries)
        try:
            while not stop.is_set():
                while len(sandbox.deliveries) > seen:
                    delivery = sandbox.deliveries[seen]
                    seen += 1
                    body = show(delivery, f"Delivered #{seen}")
                    match = RESET_LINK.search(body)
                    if match:
                        say(f"\n  Reset link: {match.group(0)}")
                    say(how_sent(delivery))
                    say("")
                stop.wait(0.2)
        finally:
            connection.close()

    host = f"127.0.0.1:{port}"
    say("")
    say(f"The example site runs on http://{host}/ (the contact form). Also try:")
    say(f"  http://{host}/accounts/password_reset/ with {SITE_USER}")
    say(
        f"  http://{host}/admin/ as user {ADMIN[0]}, password {ADMIN[1]} "
        "(the Gmail account, the outbox)"
    )
    say(
        "The contact form sends through CeleryGmailBackend: its request only writes an outbox "
        f"row, and the Celery worker started above sends it (log: {shown(worker.log_path)}). "
        "Password resets go out at once through GmailSMTPBackend."
    )
    say("Every message the site sends is printed here. Stop with Ctrl-C.")
    say("")
    watcher = threading.Thread(target=watch, name="demo-deliveries", daemon=True)
    watcher.start()
    try:
        call_command("runserver", host, use_reloader=False)
    finally:
        stop.set()
        watcher.join(timeout=2)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a SIGTERM stops the demo like Ctrl-C: the worker is stopped too


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(HERE))
    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        say("Starting the Gmail sandbox...")
        from django_gmail_smtp.testing import GmailSandbox

        with GmailSandbox(security="starttls") as sandbox:
            sandbox.add_user(SENDER, app_password=APP_PASSWORD)
            settings = sandbox.settings()
            say(
                f"  listening on {settings['HOST']}:{settings['PORT']} "
                f"({settings['SECURITY']}); user {SENDER}, App Password {APP_PASSWORD!r}"
            )
            configure(settings, args)

            import django

            say("Setting up Django (example_project.settings)...")
            django.setup()
            prepare_database(serve=args.serve)
            with celery_worker(args.broker_folder, args.broker_url) as worker:
                if args.serve:
                    serve(sandbox, args.port, worker)
                else:
                    run_demo(sandbox, worker)
            if not args.serve:
                say(
                    f"Done: the password reset went out at once through GmailSMTPBackend; the "
                    f"contact form only queued its message, and a real Celery worker sent it "
                    f"through CeleryGmailBackend's outbox. Both logged in as {SENDER} with its "
                    "App Password over STARTTLS to a local Gmail sandbox. Explore further with "
                    "`./dev demo --serve` (the site on http://127.0.0.1:8000, every message "
                    "printed here) and `./dev test`."
                )
    except KeyboardInterrupt:
        say("\nStopped.")
        return 0
    except Exception as exc:
        if args.traceback or os.environ.get("CI"):
            traceback.print_exc()
        print(f"\nThe demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if not args.traceback:
            print("Run it again with --traceback for the details.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
