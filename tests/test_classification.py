"""Every Gmail reply in DESIGN.md's "Facts about Gmail", classified in one table.

For each reply: the exact text Gmail sends (from the sandbox's ``Replies``), the phase it comes
at, the exception ``exceptions.classify_reply`` makes of it, its stdlib base (so code written
for Django's SMTP backend still catches it), its category, and what the outbox does with it.
The table is checked three ways: ``classify_reply`` directly; the sync backend over real
sockets to the sandbox; and the outbox (a queued row delivered in-process).
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.mail import EmailMessage

from django_gmail_smtp import exceptions, outbox
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.enums import Health, Outcome
from django_gmail_smtp.exceptions import GmailSMTPError, classify_reply
from django_gmail_smtp.models import OutboundEmail
from django_gmail_smtp.testing import GmailSandbox, Replies, ensure_certificates
from django_gmail_smtp.transport import ConnectionPool

from .conftest import SENDER

pytestmark = pytest.mark.django_db

RECIPIENT = "to@example.net"

#: what the outbox does with a failed attempt
RETRY, DEFER, FAIL, UNHEALTHY = "retry", "defer", "fail", "account unhealthy"
OUTCOMES = {
    RETRY: Outcome.RETRY,
    DEFER: Outcome.DEFERRED,
    FAIL: Outcome.FAILED,
    UNHEALTHY: Outcome.DEFERRED,  # the account's mail waits until it is fixed
}


@dataclass(frozen=True)
class Row:
    """One of Gmail's replies and what the app must make of it."""

    name: str
    reply: str | None
    """Gmail's whole reply line (None: no reply, the error is local, e.g. TLS)."""
    phase: str
    """Where it comes: a ``sandbox.fault`` phase, also ``classify_reply``'s ``phase``."""
    error: type[GmailSMTPError]
    base: type[Exception]
    category: str
    action: str
    sync_error: type[GmailSMTPError] | None = None
    """What the sync backend raises, when the transport wraps the classified error."""
    setup: Callable[[GmailSandbox, Any, Any], None] | None = None

    @property
    def code(self) -> int:
        assert self.reply is not None
        return int(self.reply[:3])

    @property
    def text(self) -> str:
        """The reply as smtplib hands it on: without the code."""
        assert self.reply is not None
        return self.reply[4:] + " 5b1a8c2d3e4f5-6a7b8c9d0e1f2a3b4c5dsm12345678 - gsmtp"

    @property
    def health(self) -> str | None:
        return Health.CREDENTIALS_REJECTED if self.action == UNHEALTHY else None


def _untrusted_ca(sandbox: GmailSandbox, settings: Any, tmp_path: Any) -> None:
    # Another CA than the one that signed the server's certificate: it cannot verify.
    other = ensure_certificates(tmp_path / "other-ca")
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "CA_FILE": str(other.ca_file)}


AUTH_ERROR = smtplib.SMTPAuthenticationError
E = exceptions
ROWS = [
    Row("535 5.7.8 bad credentials", Replies.BAD_CREDENTIALS, "auth",
        E.BadCredentials, AUTH_ERROR, "auth", UNHEALTHY),
    Row("534 5.7.9 App Password required", Replies.APP_PASSWORD_REQUIRED, "auth",
        E.AppPasswordRequired, AUTH_ERROR, "auth", UNHEALTHY),
    Row("534 5.7.14 web login required", Replies.WEB_LOGIN_REQUIRED, "auth",
        E.WebLoginRequired, AUTH_ERROR, "auth", UNHEALTHY),
    Row("530 5.7.0 STARTTLS first", Replies.STARTTLS_FIRST, "auth",
        E.InsecureConnectionError, smtplib.SMTPNotSupportedError, "config", DEFER),
    Row("530 5.7.0 AUTH required", Replies.AUTH_REQUIRED, "mail",
        E.InsecureConnectionError, smtplib.SMTPNotSupportedError, "config", DEFER),
    Row("550 5.4.5 daily limit at MAIL", Replies.DAILY_LIMIT, "mail",
        E.QuotaExceeded, smtplib.SMTPException, "quota", DEFER),
    Row("550 5.4.5 daily limit after DATA", Replies.DAILY_LIMIT, "after_data",
        E.QuotaExceeded, smtplib.SMTPException, "quota", DEFER),
    Row("421 4.3.0 temporary", Replies.TEMPORARY_PROBLEM, "mail",
        E.TemporaryError, smtplib.SMTPException, "temporary", RETRY),
    Row("454 4.7.0 temporary", Replies.AUTH_TEMPORARY, "auth",
        E.TemporaryError, smtplib.SMTPException, "temporary", RETRY),
    Row("454 4.7.0 too many login attempts", Replies.TOO_MANY_LOGINS, "auth",
        E.TooManyLoginAttempts, smtplib.SMTPException, "temporary", RETRY),
    Row("452 4.5.3 too many recipients", Replies.TOO_MANY_RECIPIENTS, "rcpt",
        E.TooManyRecipients, smtplib.SMTPException, "permanent", FAIL),
    Row("552 5.3.4 too big", Replies.TOO_BIG, "after_data",
        E.MessageTooLarge, smtplib.SMTPException, "permanent", FAIL),
    Row("553 5.1.3 bad recipient", Replies.BAD_RECIPIENT.format(address=RECIPIENT), "rcpt",
        E.InvalidAddress, smtplib.SMTPRecipientsRefused, "permanent", FAIL,
        sync_error=E.RecipientsRefused),  # every recipient refused: listed in one error
    Row("555 5.5.2 syntax error", Replies.SYNTAX_ERROR, "mail",
        E.InvalidAddress, smtplib.SMTPRecipientsRefused, "permanent", FAIL),
    Row("421 4.7.28 unusual rate", Replies.UNUSUAL_RATE, "after_data",
        E.TemporaryError, smtplib.SMTPException, "temporary", RETRY),
    Row("450 4.2.1 receiving too fast", Replies.RECEIVING_TOO_FAST, "rcpt",
        E.TemporaryError, smtplib.SMTPException, "temporary", RETRY),
    Row("550 5.7.1 blocked as spam", Replies.BLOCKED, "after_data",
        E.PermanentError, smtplib.SMTPException, "permanent", FAIL),
    Row("certificate does not verify", None, "starttls",
        E.InsecureConnectionError, smtplib.SMTPNotSupportedError, "config", DEFER,
        setup=_untrusted_ca),
]  # fmt: skip


def _params(rows: list[Row]) -> list[Any]:
    return [pytest.param(row, id=row.name) for row in rows]


def _arrange(row: Row, sandbox: GmailSandbox, settings: Any, tmp_path: Any) -> None:
    if row.setup is not None:
        row.setup(sandbox, settings, tmp_path)
    else:
        sandbox.fault(row.phase, reply=row.reply, times=None)


def _message() -> EmailMessage:
    return EmailMessage("Classified", "Body.", SENDER, [RECIPIENT])


def test_every_reply_of_design_md_is_in_the_table() -> None:
    codes = {row.reply[:10].strip() for row in ROWS if row.reply}
    for expected in ("535 5.7.8", "534 5.7.9", "534 5.7.14", "530 5.7.0", "550 5.4.5",
                     "454 4.7.0", "452 4.5.3", "552 5.3.4", "553 5.1.3", "555 5.5.2",
                     "421 4.7.28", "450 4.2.1", "550 5.7.1"):  # fmt: skip
        assert expected in codes
    assert any(row.reply and row.reply.startswith("421 4.") for row in ROWS)
    assert {row.phase for row in ROWS if row.reply and row.code == 550} >= {"mail", "after_data"}
    assert any(row.reply is None for row in ROWS)  # the certificate mismatch


@pytest.mark.parametrize("row", _params([row for row in ROWS if row.reply]))
def test_classify_reply(row: Row) -> None:
    error = classify_reply(row.code, row.text, phase=row.phase, account=SENDER)
    assert type(error) is row.error
    assert isinstance(error, row.base) and isinstance(error, GmailSMTPError)
    assert (error.smtp_code, error.phase, error.account) == (row.code, row.phase, SENDER)
    assert error.enhanced_code == row.reply.split()[1]  # type: ignore[union-attr]
    assert str(error.category) == row.category
    if row.health is not None:
        assert error.health == row.health


@pytest.mark.parametrize("row", _params(ROWS))
def test_sync_backend_raises_the_tables_error(
    row: Row, sandbox: GmailSandbox, account: Any, settings: Any, tmp_path: Any
) -> None:
    _arrange(row, sandbox, settings, tmp_path)
    with pytest.raises(row.sync_error or row.error) as raised:
        _message().send()
    error = raised.value
    assert isinstance(error, row.base)
    assert row.reply is None or error.smtp_code == row.code
    assert not sandbox.deliveries
    if row.health is not None:
        account.refresh_from_db()
        assert account.health == row.health
    assert str(error.category) == row.category


@pytest.mark.parametrize("row", _params(ROWS))
def test_outbox_does_what_the_table_says(
    row: Row,
    sandbox: GmailSandbox,
    account: Any,
    settings: Any,
    tmp_path: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"
    with django_capture_on_commit_callbacks(execute=False):
        assert CeleryGmailBackend().send_messages([_message()]) == 1
    row_ = OutboundEmail.objects.get()
    _arrange(row, sandbox, settings, tmp_path)
    pool = ConnectionPool()
    try:
        outcome = outbox.deliver(row_.pk, pool=pool)
    finally:
        pool.close()
    assert not sandbox.deliveries
    account.refresh_from_db()
    if row.health is not None:
        assert account.health == row.health
    else:  # the account stays usable: only refused credentials make it unhealthy
        assert account.health in (Health.OK, Health.UNKNOWN)
    assert outcome == OUTCOMES[row.action]
