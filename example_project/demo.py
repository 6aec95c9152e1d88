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

Then a newsletter (django_gmail_smtp.newsletters): 12 readers imported from CSV, sent from an
account allowed 10 messages a day, so each issue spreads over two days. The demo plays the
Celery beat (it runs the planner's ticks itself) and moves a demo clock 6 hours at each tick,
which the worker follows (example_project/demo_clock.py): days pass in seconds. A reader then
unsubscribes with one click (the List-Unsubscribe header of a message she got), and the next
issue skips her.

The demo keeps its own SQLite database (example_project/var/demo.sqlite3) and broker folder
(example_project/var/broker/), whatever DATABASE_URL and CELERY_BROKER_URL say, unless
--database-url / --broker-url / --broker-folder are given.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
from urllib.parse import urlsplit

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

# The newsletter part
NEWS = "news@example.com"
NEWS_APP_PASSWORD = "qrst uvwx yzab cdef"
NEWS_DAILY_LIMIT = 10  # a real Gmail account: about 500 a day; the demo wants days to pass
LIST_SLUG = "example-weekly"
TICK_HOURS = 6  # demo time between the planner's ticks (the demo's NEWSLETTER_TICK)
# The file the site's owner imports (consent was collected at sign-up): two lines are skipped.
READERS_CSV = """email,name,city
ada@example.net,Ada Lovelace,London
alan@example.net,Alan Turing,Manchester
grace@example.net,Grace Hopper,New York
edsger@example.net,Edsger Dijkstra,Austin
barbara@example.net,Barbara Liskov,Boston
donald@example.net,Donald Knuth,Stanford
margaret@example.net,Margaret Hamilton,Cambridge
ken@example.net,Ken Thompson,Murray Hill
frances@example.net,Frances Allen,Yorktown
john@example.net,John Backus,Philadelphia
radia@example.net,Radia Perlman,Seattle
tim@example.net,Tim Berners-Lee,Geneva
Grace@Example.net,Grace B. Hopper,Arlington
not-an-address,Nobody,Nowhere
"""
LEAVER = "grace@example.net"  # she unsubscribes with one click after the first issue
TEXT_TEMPLATE = """Hello {{ subscriber.name }},

This is {{ campaign.name }} of the example site's newsletter, sent to you in
{{ subscriber.fields.city }} through Gmail, within the account's daily limit.

Read it on the web: {{ archive_url }}
Unsubscribe with one click: {{ unsubscribe_url }}
"""
HTML_TEMPLATE = """<p>Hello {{ subscriber.name }},</p>
<p>This is <b>{{ campaign.name }}</b> of the example site's newsletter, sent to you in
{{ subscriber.fields.city }} through Gmail, within the account's daily limit.</p>
<p><a href="{{ archive_url }}">Read it on the web</a> &middot;
<a href="{{ unsubscribe_url }}">Unsubscribe</a></p>
"""


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


def configure(
    sandbox_settings: dict[str, Any], args: argparse.Namespace, clock_file: Path | None
) -> None:
    """Point the example site's settings (read from the environment) at the sandbox.

    The Celery worker is started with this same environment, so it reads the same settings.
    ``clock_file``: the demo clock's file, which the worker then follows (None: real time).
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
            # Links in newsletters point at the demo's site, served over http:// (runserver),
            # so the warning that one-click unsubscribe links should be https is silenced.
            "GMAIL_SMTP_SITE_URL": (
                f"http://127.0.0.1:{args.port}" if args.serve else "http://localhost:8000"
            ),
            "SILENCED_SYSTEM_CHECKS": "gmail_smtp_newsletters.W001",
        }
    )
    if clock_file is not None:
        # The planner ticks as often as the demo moves its clock; the worker's beat (which
        # would tick on real time) then never comes round during the demo.
        os.environ["GMAIL_SMTP_NEWSLETTER_TICK"] = str(TICK_HOURS * 3600)
        os.environ["DEMO_CLOCK_FILE"] = str(clock_file)
    else:
        for name in ("GMAIL_SMTP_NEWSLETTER_TICK", "DEMO_CLOCK_FILE"):
            os.environ.pop(name, None)
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
    prepare_newsletter()


def prepare_newsletter() -> None:
    """The newsletter's sender account (10 messages a day) and its list, imported from CSV;
    what an earlier run left (its campaigns, the account's ledger and outbox rows, days ahead
    on that run's demo clock) is deleted first."""
    from django_gmail_smtp.models import GmailAccount, OutboundEmail, SenderQuota
    from django_gmail_smtp.newsletters.imports import import_csv
    from django_gmail_smtp.newsletters.models import Campaign, MailingList

    old_lists = MailingList.objects.filter(slug=LIST_SLUG)
    Campaign.objects.filter(mailing_list__in=old_lists).delete()
    old_lists.delete()
    OutboundEmail.objects.filter(account_email=NEWS).delete()
    SenderQuota.objects.filter(address=NEWS).delete()

    say(
        f"Saving the newsletter's Gmail account {NEWS}, allowed {NEWS_DAILY_LIMIT} messages a day "
        "(a real account: 500)..."
    )
    account = GmailAccount.objects.filter(email=NEWS).first() or GmailAccount(email=NEWS)
    account.auth_method = GmailAccount.AuthMethod.APP_PASSWORD
    account.app_password = NEWS_APP_PASSWORD
    account.daily_limit = NEWS_DAILY_LIMIT
    account.is_default = False
    account.is_active = True
    account.full_clean()
    account.save()

    mailing_list = MailingList.objects.create(
        name="Example weekly",
        slug=LIST_SLUG,
        from_email=f"Example weekly <{NEWS}>",
        description="The example site's newsletter.",
    )
    say(f"Importing readers.csv into the list {mailing_list.name!r} (newsletters.imports)...")
    report = import_csv(
        mailing_list,
        io.StringIO(READERS_CSV),
        activate=True,
        source="readers.csv, consent collected at sign-up (the demo)",
    )
    say(f"  {report.summary()}")
    for line in report.lines:
        detail = f" ({line.detail})" if line.detail else ""
        say(f"  skipped line {line.line}, {line.email}: {line.reason.label}{detail}")


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

    def __init__(self, broker_folder: Path, *, follow_demo_clock: bool = False) -> None:
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
        if follow_demo_clock:
            self.command += ["--include", "demo_clock"]  # example_project/demo_clock.py
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
def celery_worker(
    broker_folder: Path, broker_url: str, *, follow_demo_clock: bool = False
) -> Iterator[CeleryWorker]:
    """Start a worker, wait until it is ready, and stop it on the way out (also on errors and
    Ctrl-C)."""
    worker = CeleryWorker(broker_folder, follow_demo_clock=follow_demo_clock)
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
            f"celery -A example_project worker -Q {QUEUES} --concurrency 1 --beat"
            f"{' --include demo_clock' if follow_demo_clock else ''} "
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


def run_demo(sandbox: Any, worker: CeleryWorker, clock: DemoClock) -> None:
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
    run_newsletter(sandbox, worker, clock)


# --- the newsletter ------------------------------------------------------------------------------


class DemoClock:
    """Real time plus an offset kept in a file (see demo_clock.py): the planner, the quota, the
    sandbox's daily limit and the worker all read it, and the demo moves it forward."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Start on the next full hour, so the times printed read well.
        self.offset = 3600 - time.time() % 3600
        self._write()

    def _write(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(repr(self.offset))
        temporary.replace(self.path)  # a reader never sees a half-written file

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        self._write()

    def epoch(self) -> float:
        """For the sandbox: seconds since the epoch, on the demo's time."""
        return time.time() + self.offset

    def install(self, sandbox: Any) -> None:
        """This process's quota clock and the sandbox's follow the file, as the worker does."""
        from demo_clock import quota_clock

        from django_gmail_smtp import quota

        quota.set_clock(quota_clock(self.path))
        sandbox.clock = self.epoch


def new_campaign(number: int) -> Any:
    from django_gmail_smtp.newsletters.models import Campaign, MailingList

    mailing_list = MailingList.objects.get(slug=LIST_SLUG)
    return Campaign.objects.create(
        name=f"Issue {number}",
        mailing_list=mailing_list,
        subject=f"Example weekly, issue {number}, for {{{{ subscriber.name }}}}",
        text_template=TEXT_TEMPLATE,
        html_template=HTML_TEMPLATE,
    )


def progress_bar(done: int, total: int, width: int = 12) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def wait_for_worker(campaign: Any, worker: CeleryWorker, timeout: float = 30) -> None:
    """Wait until the worker has sent what the planner queued (its signal receivers then mark
    each recipient sent)."""
    from django_gmail_smtp.models import OutboundEmail
    from django_gmail_smtp.newsletters.models import CampaignRecipient

    deadline = time.monotonic() + timeout
    queued = campaign.recipients.filter(status=CampaignRecipient.Status.QUEUED)
    while queued.exists():
        held = OutboundEmail.objects.filter(
            pk__in=queued.values("outbound_id"), status=OutboundEmail.Status.DEFERRED
        ).first()
        if held is not None:  # the planner queued more than the quota let the worker send
            raise worker.failure(f"Outbox row #{held.pk} was deferred: {held.last_error}")
        if not worker.running:
            raise worker.failure(f"The Celery worker exited while {campaign} had mail queued")
        if time.monotonic() > deadline:
            raise worker.failure(
                f"The Celery worker did not send {campaign}'s queued mail within {timeout:.0f} s"
            )
        time.sleep(0.05)


def send_campaign(
    campaign: Any,
    worker: CeleryWorker,
    clock: DemoClock,
    *,
    stop: Callable[[Any], bool] | None = None,
) -> None:
    """Tick the planner (as the beat would, every TICK_HOURS of demo time), let the worker send
    what it queued, and print the progress, until the campaign finishes (or ``stop``)."""
    from django_gmail_smtp import quota
    from django_gmail_smtp.newsletters import planner
    from django_gmail_smtp.newsletters.models import CampaignRecipient

    for _tick in range(60):  # bounded: 12 readers at 9 a day take 8 ticks
        planner.tick()
        wait_for_worker(campaign, worker)
        campaign.refresh_from_db()
        if not campaign.recipients.filter(status=CampaignRecipient.Status.PENDING).exists():
            # The worker's receiver marks it finished a moment after its last recipient.
            deadline = time.monotonic() + 5
            while campaign.status == campaign.Status.RUNNING and time.monotonic() < deadline:
                time.sleep(0.05)
                campaign.refresh_from_db()
        progress = campaign.progress()
        # "about 14 hours at 9/day across 1 account (waiting now: ...)": the reason goes below.
        forecast, _, waiting = progress.describe().partition(" (waiting now: ")
        say(
            f"  {quota.now():%a %H:%M}  {progress_bar(progress.done, progress.total)} "
            f"{progress.sent:>2} sent, {progress.pending:>2} waiting"
            + (f", {progress.suppressed} suppressed" if progress.suppressed else "")
            + f"   {forecast}"
        )
        if waiting:
            say(f"{'':>13}waiting now: {waiting.rstrip(')')}")
        if progress.finished or (stop is not None and stop(progress)):
            return
        clock.advance(TICK_HOURS * 3600)
    raise RuntimeError(f"{campaign} did not finish in 60 planner ticks.")


def show_list_headers(delivery: Any) -> str:
    """Print the newsletter headers of a delivered message; return its one-click URL."""
    message = delivery.message
    say(f"  To             {delivery.rcpt_tos[0]}")
    say(f"  Subject        {message['Subject']}")
    for header in ("List-Unsubscribe", "List-Unsubscribe-Post", "List-Id", "Message-ID"):
        value = " ".join(str(message.get(header, "")).split())
        if header == "List-Unsubscribe":
            for n, item in enumerate(value.split(", ")):
                say(f"  {(header + ':') if n == 0 else '':<22} {item}")
        else:
            say(f"  {header + ':':<22} {value}")
    found = re.search(r"<(https?://[^>]+)>", str(message.get("List-Unsubscribe", "")))
    if not found:
        raise RuntimeError("The newsletter has no https link in its List-Unsubscribe header.")
    return found.group(1)


def one_click_unsubscribe(url: str, campaign: Any) -> None:
    """A link scanner's GET (changes nothing), then the mailbox provider's one-click POST
    (RFC 8058: no cookies, no CSRF token), with CSRF checks on as on a real site."""
    from django.test import Client

    from django_gmail_smtp.newsletters.models import CampaignRecipient, Subscriber, Suppression

    path = urlsplit(url).path
    client = Client(enforce_csrf_checks=True, HTTP_HOST="localhost:8000")
    subscription = Subscriber.objects.get(mailing_list__slug=LIST_SLUG, email=LEAVER)

    response = client.get(path)
    subscription.refresh_from_db()
    say(
        f"  GET  (what a link scanner does)    -> {response.status_code}, a page with an "
        f"Unsubscribe button; {LEAVER} is still {subscription.get_status_display()}"
    )
    if subscription.status != Subscriber.Status.ACTIVE:
        raise RuntimeError("The GET of the unsubscribe link changed the subscription.")

    client.cookies.clear()  # the provider's POST carries no cookies
    response = client.post(path, {"List-Unsubscribe": "One-Click"})
    subscription.refresh_from_db()
    waiting = campaign.recipients.get(email=LEAVER)
    suppression = Suppression.objects.get(mailing_list__slug=LIST_SLUG, email=LEAVER)
    say(
        f"  POST List-Unsubscribe=One-Click   -> {response.status_code}"
        f"{' (no redirect)' if response.status_code == 200 else ''}, no cookie, no CSRF token; "
        f"{LEAVER} is now {subscription.get_status_display()}"
    )
    say(f"  Suppression list: {suppression.email} ({suppression.detail})")
    say(
        f"  {campaign}, still sending: her message, not sent yet, is now "
        f"{waiting.get_status_display()}: it will not go out"
    )
    if response.status_code != 200 or waiting.status != CampaignRecipient.Status.SUPPRESSED:
        raise RuntimeError("The one-click unsubscribe did not stop her mail.")


def run_newsletter(sandbox: Any, worker: CeleryWorker, clock: DemoClock) -> None:
    from django_gmail_smtp.models import GmailAccount

    account = GmailAccount.objects.get(email=NEWS)
    bulk = account.quota_status().bulk_messages_limit
    title = "Newsletter (django_gmail_smtp.newsletters, via Celery)"
    say("")
    say(f"=== {title} " + "=" * max(3, 66 - len(title)))
    clock.install(sandbox)
    first = new_campaign(1)
    forecast = first.progress()
    say(
        f"  {first}: {forecast.total} readers on the list, from {NEWS}, allowed "
        f"{NEWS_DAILY_LIMIT} messages a day"
    )
    say(
        f"  of which {bulk} for newsletters: RESERVED_SHARE keeps 10% for transactional mail "
        "(password resets...)"
    )
    say(f"  Forecast before starting: {forecast.describe()}")
    say(
        f"  Started: {first.start()} recipients enrolled. The planner runs every {TICK_HOURS} "
        "hours of demo time;"
    )
    say("  the demo clock jumps ahead at each tick, and the Celery worker sends what it queued:")
    send_campaign(first, worker, clock)

    sent_to_her = first.recipients.select_related("outbound").get(email=LEAVER).outbound
    leaver = next(
        d for d in sandbox.deliveries if d.message["Message-ID"] == sent_to_her.message_id
    )
    say("")
    say(f"  The message {LEAVER} received, as the sandbox got it:")
    url = show_list_headers(leaver)

    clock.advance(TICK_HOURS * 3600)
    second = new_campaign(2)
    say("")
    say(f"  {second}: started, {second.start()} recipients enrolled")
    send_campaign(second, worker, clock, stop=lambda p: p.sent >= 2)
    say("")
    say(f"  {LEAVER} unsubscribes from Gmail's Unsubscribe button (the link above):")
    one_click_unsubscribe(url, second)
    say("")
    clock.advance(TICK_HOURS * 3600)
    send_campaign(second, worker, clock)

    readers = {d.rcpt_tos[0] for d in sandbox.deliveries if d.mail_from == NEWS}
    got = {r: sum(1 for d in sandbox.deliveries if d.rcpt_tos == [r]) for r in readers}
    others = sorted({n for r, n in got.items() if r != LEAVER})
    times = sorted(d.received_at for d in sandbox.deliveries if d.mail_from == NEWS)
    busiest = max(sum(1 for t in times if start <= t < start + 86400) for start in times)
    say("")
    say(
        f"  Sent: {len(times)} messages. Every other reader got {' or '.join(map(str, others))}, "
        f"{LEAVER} {got.get(LEAVER, 0)} (before she unsubscribed)."
    )
    say(
        f"  The busiest 24 hours: {busiest} messages from {NEWS} (limit {NEWS_DAILY_LIMIT}; "
        "the sandbox refuses more, like Gmail)."
    )
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
        f"  http://{host}/admin/gmail_smtp_newsletters/campaign/add/ to write a newsletter to the "
        f"list {LIST_SLUG!r} (12 readers; {NEWS} may send {NEWS_DAILY_LIMIT} a day, so watch "
        "its ETA), and"
    )
    say(f"  http://{host}/newsletters/subscribe/{LIST_SLUG}/ to subscribe (double opt-in)")
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
            # Like Gmail, the sandbox refuses the newsletter's account more than its daily limit.
            sandbox.add_user(NEWS, app_password=NEWS_APP_PASSWORD, daily_limit=NEWS_DAILY_LIMIT)
            settings = sandbox.settings()
            say(
                f"  listening on {settings['HOST']}:{settings['PORT']} "
                f"({settings['SECURITY']}); user {SENDER}, App Password {APP_PASSWORD!r}"
            )
            clock = None
            if not args.serve:
                clock = DemoClock(args.broker_folder.resolve().parent / "demo-clock")
            configure(settings, args, clock.path if clock else None)

            import django

            say("Setting up Django (example_project.settings)...")
            django.setup()
            prepare_database(serve=args.serve)
            with celery_worker(
                args.broker_folder, args.broker_url, follow_demo_clock=clock is not None
            ) as worker:
                if clock is None:
                    serve(sandbox, args.port, worker)
                else:
                    run_demo(sandbox, worker, clock)
            if not args.serve:
                say(
                    f"Done: the password reset went out at once through GmailSMTPBackend; the "
                    f"contact form only queued its message, and a real Celery worker sent it "
                    f"through CeleryGmailBackend's outbox. Both logged in as {SENDER} with its "
                    "App Password over STARTTLS to a local Gmail sandbox. The newsletter went "
                    f"out through the same outbox as bulk mail, {NEWS_DAILY_LIMIT - 1} a day at "
                    "most, paced by the planner, and a one-click unsubscribe stopped the next "
                    "issue to that reader. Explore further with `./dev demo --serve` (the site "
                    "on http://127.0.0.1:8000, the newsletters in its admin, every message "
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
