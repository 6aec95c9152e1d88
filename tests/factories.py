"""Helpers shared by the test modules: names, rows, accounts, settings, waiting.

Fixtures live in ``conftest.py``; what is here is plain functions and constants, imported where
they are used (``from .factories import ...``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.contrib.auth.models import Permission, User
from django.core.mail import EmailMessage
from django.db import connection
from django.utils import timezone

from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.crypto import EncryptedTextField
from django_gmail_smtp.models import GmailAccount, OutboundEmail
from django_gmail_smtp.testing import GmailSandbox

from .processes import wait_for

APP_PASSWORD = "abcdefghijklmnop"
SENDER = "sender@example.com"
ALIAS = "alias@example.com"
OAUTH_USER = "oauth@example.com"
CLIENT_ID = "123-sandbox.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-sandbox-client-secret"

#: GMAIL_SMTP for tests with a real worker: retries, sweeps and leases in seconds, not minutes
FAST = {
    "RETRY_BASE_DELAY": 0.2,
    "RETRY_MAX_DELAY": 1,
    "SWEEP_GRACE": 1,
    "SWEEP_INTERVAL": 1,
    "SENDING_LEASE": 3,
}


# --- settings ------------------------------------------------------------------------------------


def with_keys(settings: Any, **values: Any) -> None:
    """Override GMAIL_SMTP keys for this test (pytest-django restores them afterwards)."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, **values}


def wire(sandbox: GmailSandbox, settings: Any) -> GmailSandbox:
    """Point the app's settings at ``sandbox``."""
    # Django's test environment swaps EMAIL_BACKEND for locmem; these tests send for real.
    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
    with_keys(settings, **sandbox.settings())
    return sandbox


# --- accounts and users --------------------------------------------------------------------------


def make_oauth_account(
    sb: GmailSandbox, email: str = OAUTH_USER, *, real_client_secret: str = CLIENT_SECRET, **fields
) -> GmailAccount:
    """A sandbox user who consented to our OAuth client, and the GmailAccount holding the grant.

    ``real_client_secret`` is the secret the sandbox's client has (``client_secret`` the one
    stored on the account); ``refresh_token=""`` makes an account not connected yet.
    """
    sb.add_user(email)
    sb.add_oauth_client(CLIENT_ID, real_client_secret)
    fields.setdefault("client_secret", CLIENT_SECRET)
    if "refresh_token" not in fields:
        fields["refresh_token"] = sb.issue_refresh_token(email, CLIENT_ID)
    fields.setdefault("is_default", not GmailAccount.objects.filter(is_default=True).exists())
    return GmailAccount.objects.create(
        email=email, auth_method=GmailAccount.AuthMethod.OAUTH2, client_id=CLIENT_ID, **fields
    )


def raw_columns(account: GmailAccount, *names: str) -> dict[str, str]:
    """The values stored in the database (ciphertext for secrets), read past the fields'
    decryption; every encrypted field when no names are given."""
    names = names or tuple(
        f.name for f in GmailAccount._meta.fields if isinstance(f, EncryptedTextField)
    )
    quote = connection.ops.quote_name
    columns = ", ".join(quote(name) for name in names)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {columns} FROM {quote(GmailAccount._meta.db_table)} WHERE id = %s",
            [account.pk],
        )
        return dict(zip(names, cursor.fetchone()))


def staff_user(name: str, *codenames: str, superuser: bool = False) -> User:
    """A staff user ``name`` with these permissions (or a superuser), email name@example.net."""
    if superuser:
        return User.objects.create_superuser(name, f"{name}@example.net", "pw")
    user = User.objects.create_user(name, f"{name}@example.net", "pw", is_staff=True)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


def auth_attempts(sb: GmailSandbox) -> int:
    """Every AUTH the sandbox saw: logins, failures and attempts in the clear."""
    stats = sb.stats
    return stats.logins + stats.auth_failures + stats.plaintext_auth_attempts


# --- outbox rows ---------------------------------------------------------------------------------


def queued_row(account: GmailAccount, **fields: Any) -> OutboundEmail:
    """One message queued through the Celery backend (``subject``, ``to``), then the row's
    ``fields`` updated; the task is not handed to a broker (no commit in a test, or the
    ``no_dispatch`` fixture)."""
    message = EmailMessage(
        fields.pop("subject", "s"), "b", SENDER, fields.pop("to", ["t@x.example"])
    )
    CeleryGmailBackend().send_messages([message])
    row = OutboundEmail.objects.get(pk=message.gmail_outbound_id)
    if fields:
        OutboundEmail.objects.filter(pk=row.pk).update(**fields)
        row.refresh_from_db()
    return row


def make_due(row: OutboundEmail) -> None:
    """Make the row's next attempt due now."""
    OutboundEmail.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())


@contextmanager
def broker_down() -> Iterator[None]:
    """The Celery app publishes to a broker nobody listens on, until the block ends."""
    from tests.celery_app import app

    old = app.conf.broker_url
    app.conf.broker_url = "redis://127.0.0.1:9/0"  # nothing listens there
    app._pool = None
    app.amqp._producer_pool = None
    try:
        yield
    finally:
        app.conf.broker_url = old
        app._pool = None
        app.amqp._producer_pool = None


# --- waiting for a worker ------------------------------------------------------------------------


def outbox_state() -> str:
    """The outbox as a failed wait reports it."""
    fields = ("pk", "status", "reason", "mailer", "attempts", "last_error")
    return f"outbox: {list(OutboundEmail.objects.values(*fields))}"


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` until it is true; on timeout, say what was awaited and the outbox."""
    return wait_for(predicate, timeout, lambda: f"{what}; {outbox_state()}")


def all_sent(n: int) -> Callable[[], bool]:
    """True once exactly ``n`` rows are sent."""
    return lambda: OutboundEmail.objects.filter(status=OutboundEmail.Status.SENT).count() == n


def arm_after(sandbox: GmailSandbox, subject: str, **fault: Any) -> None:
    """Script ``fault`` once the message ``subject`` was accepted: it fires on the messages
    streamed after it."""

    def on_delivery(accepted: Any) -> None:
        if accepted.subject == subject:
            sandbox.fault(**fault)

    sandbox._state.on_delivery = on_delivery


# --- a process that queues mail and exits ----------------------------------------------------


#: Run first in each :func:`run_queueing_script`: Django on a new SQLite database, the account,
#: ``queue_one(subject)``, and ``outbox.publish`` replaced by a slow broker that records the
#: ids it is handed in the file ``MARKER``. From the publisher thread that hand-off ends only
#: once the process waits for the thread at exit, so a row is recorded only if its process
#: waits (or hands it over in its own main thread, which never waits here).
_QUEUEING_PREAMBLE = """
import threading, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.core.mail import get_connection, send_mail
from django_gmail_smtp import outbox, publisher
from django_gmail_smtp.models import GmailAccount

waited_for = threading.Event()
_wait = publisher.publisher.wait

def wait(timeout=None):
    waited_for.set()  # the process waits for its publisher thread (at exit)
    return _wait(timeout)

publisher.publisher.wait = wait

def slow_publish(batch, **_):
    if threading.current_thread() is not threading.main_thread():
        waited_for.wait(30)
    with open(MARKER, "a") as f:
        f.write("".join(f"{pk}\\n" for pk, *_ in batch))
    return len(batch)

outbox.publish = slow_publish
GmailAccount.objects.create(email=SENDER, app_password="abcd efgh ijkl mnop")

def queue_one(subject):
    backend = get_connection("django_gmail_smtp.backends.CeleryGmailBackend")
    send_mail(subject, "b", SENDER, ["to@example.net"], connection=backend)
"""


def run_queueing_script(tmp_path: Any, body: str) -> tuple[Any, list[str]]:
    """Run ``body`` (dedented) after :data:`_QUEUEING_PREAMBLE` in a new Python process on a
    new SQLite database in ``tmp_path``; return the finished process and the ids of the rows
    handed over, in order."""
    import os
    import subprocess
    import sys
    import textwrap

    marker = tmp_path / "handed"
    script = (
        f"MARKER = {str(marker)!r}\nSENDER = {SENDER!r}\n"
        + _QUEUEING_PREAMBLE
        + textwrap.dedent(body)
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    env.pop("GMAIL_SMTP_TEST_DB", None)
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    handed = marker.read_text().split() if marker.exists() else []
    return done, handed
