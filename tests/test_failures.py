"""Every way a send can fail, through send_mail / EmailMessage.send() and the sync backend.

Each test makes the sandbox misbehave the way Gmail does, then checks the exception class, the
stdlib class it also is (so code written for Django's SMTP backend keeps working), what it
tells the user to do, and what the sandbox did or did not receive.
"""

from __future__ import annotations

import smtplib
import time

import pytest
from django.core.mail import BadHeaderError, EmailMessage, get_connection, send_mail

from django_gmail_smtp.exceptions import (
    AppPasswordRequired,
    AuthenticationError,
    BadCredentials,
    ConnectionFailed,
    GmailSMTPError,
    InvalidMessage,
    MessageTooLarge,
    QuotaExceeded,
    RecipientsRefused,
    SenderNotAllowed,
    TemporaryError,
    TooManyLoginAttempts,
    TooManyRecipients,
    WebLoginRequired,
)
from django_gmail_smtp.models import GmailAccount
from django_gmail_smtp.testing import GmailSandbox, Replies

from .conftest import APP_PASSWORD, SENDER
from .factories import auth_attempts, wire

pytestmark = pytest.mark.django_db

TO = "to@example.net"
WRONG_PASSWORD = "wrongpasswordxyz"
APP_PASSWORDS_URL = "https://myaccount.google.com/apppasswords"


def _send(subject: str = "Hello", to: list[str] | None = None, **kwargs) -> int:
    return send_mail(subject, "Body", SENDER, to or [TO], **kwargs)


def _health(account: GmailAccount) -> str:
    account.refresh_from_db()
    return account.health


@pytest.fixture
def small_sandbox(make_sandbox):
    """A sandbox that advertises (and enforces) a 2,000-byte SIZE limit."""
    return make_sandbox(size_limit=2000)


@pytest.fixture
def idle_closing_sandbox(make_sandbox):
    """A sandbox that closes connections idle for half a second, as Gmail does after a while."""
    return make_sandbox(timeout=0.5)


# --- authentication --------------------------------------------------------------------------


def test_wrong_app_password_is_bad_credentials(sandbox, make_account):
    """535 5.7.8 raises BadCredentials, says how to get an App Password, marks the account."""
    account = make_account(sandbox, app_password=WRONG_PASSWORD)
    with pytest.raises(BadCredentials) as info:
        _send()
    error = info.value
    assert isinstance(error, smtplib.SMTPAuthenticationError)
    assert isinstance(error, AuthenticationError)
    assert error.smtp_code == 535
    assert error.enhanced_code == "5.7.8"
    assert "App Password" in str(error)
    assert APP_PASSWORDS_URL in str(error)
    assert _health(account) == GmailAccount.Health.CREDENTIALS_REJECTED
    assert sandbox.stats.auth_failures >= 1
    assert sandbox.stats.logins == 0
    assert sandbox.deliveries == []


def test_account_password_with_2sv_is_app_password_required(sandbox, make_account):
    """534 5.7.9 (normal password on a 2-Step Verification account) raises AppPasswordRequired."""
    account = make_account(sandbox, app_password="MyGoogleLoginPw1")
    sandbox.add_user(
        SENDER,
        app_password=APP_PASSWORD,
        account_password="MyGoogleLoginPw1",
        require_app_password=True,
    )
    with pytest.raises(AppPasswordRequired) as info:
        _send()
    error = info.value
    assert isinstance(error, smtplib.SMTPAuthenticationError)
    assert error.smtp_code == 534
    assert error.enhanced_code == "5.7.9"
    assert APP_PASSWORDS_URL in str(error)
    assert _health(account) == GmailAccount.Health.CREDENTIALS_REJECTED
    assert sandbox.deliveries == []


def test_web_login_required(sandbox, make_account):
    """534 5.7.14 raises WebLoginRequired, telling the user to sign in with a browser."""
    account = make_account(sandbox)
    sandbox.add_user(SENDER, app_password=APP_PASSWORD, web_login_required=True)
    with pytest.raises(WebLoginRequired) as info:
        _send()
    error = info.value
    assert isinstance(error, smtplib.SMTPAuthenticationError)
    assert error.smtp_code == 534
    assert error.enhanced_code == "5.7.14"
    assert "browser" in str(error)
    assert _health(account) == GmailAccount.Health.CREDENTIALS_REJECTED
    assert sandbox.deliveries == []


def test_too_many_login_attempts(account, sandbox):
    """454 4.7.0 'Too many login attempts' raises TooManyLoginAttempts, a temporary error."""
    sandbox.fault("auth", reply=Replies.TOO_MANY_LOGINS)
    with pytest.raises(TooManyLoginAttempts) as info:
        _send()
    error = info.value
    assert isinstance(error, TemporaryError)
    assert isinstance(error, smtplib.SMTPException)
    assert error.smtp_code == 454
    assert error.category == "temporary"
    assert "reuse" in str(error).lower()
    assert sandbox.deliveries == []


def test_fail_silently_hides_an_auth_failure(sandbox, make_account):
    """With fail_silently=True an auth failure returns 0 instead of raising (health still kept)."""
    account = make_account(sandbox, app_password=WRONG_PASSWORD)
    assert _send(fail_silently=True) == 0
    assert sandbox.deliveries == []
    assert sandbox.stats.auth_failures >= 1
    assert _health(account) == GmailAccount.Health.CREDENTIALS_REJECTED


# --- quota -----------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["mail", "data"])
def test_daily_limit_is_quota_exceeded(account, sandbox, phase):
    """550 5.4.5, at MAIL FROM or after DATA, raises QuotaExceeded; nothing is delivered."""
    sandbox.set_quota(SENDER, messages=0)
    sandbox.quota_phase = phase
    with pytest.raises(QuotaExceeded) as info:
        _send()
    error = info.value
    assert isinstance(error, GmailSMTPError)
    assert isinstance(error, smtplib.SMTPException)
    assert error.smtp_code == 550
    assert error.enhanced_code == "5.4.5"
    assert error.limit == "gmail"
    assert error.category == "quota"
    assert "24 hours" in str(error)
    assert sandbox.deliveries == []
    assert sandbox.stats.rejected >= 1
    # The account is now known to be blocked, so the next send does not even try.
    assert account.quota_status().exhausted_until is not None


# --- temporary and connection failures ------------------------------------------------------


def test_421_at_mail_is_temporary(account, sandbox):
    """421 4.7.0 at MAIL FROM raises TemporaryError (retry later); nothing is delivered."""
    sandbox.fault("mail", reply="421 4.7.0 Try again later, closing connection.")
    with pytest.raises(TemporaryError) as info:
        _send()
    error = info.value
    assert isinstance(error, smtplib.SMTPException)
    assert error.smtp_code == 421
    assert error.category == "temporary"
    assert "again later" in str(error)
    assert sandbox.deliveries == []


@pytest.mark.parametrize("phase", ["connect", "ehlo", "mail", "rcpt", "data", "after_data"])
def test_dropped_connection_is_connection_failed(account, sandbox, phase):
    """A connection dropped at any phase raises ConnectionFailed (an SMTPServerDisconnected)."""
    sandbox.fault(phase, drop=True)
    with pytest.raises(ConnectionFailed) as info:
        _send()
    error = info.value
    assert isinstance(error, smtplib.SMTPServerDisconnected)
    assert isinstance(error, TemporaryError)
    assert error.category == "temporary"
    assert "HOST/PORT" in str(error)
    assert sandbox.deliveries == []
    assert sandbox.stats.connections == 1  # a fresh connection's failure is not retried


def test_drop_after_data_is_not_retried_on_a_kept_open_connection(account, sandbox):
    """A drop after the body was sent is not resent on a reused connection (it may have arrived)."""
    with get_connection() as connection:
        assert connection.send_messages([EmailMessage("one", "b", SENDER, [TO])]) == 1
        sandbox.fault("after_data", drop=True)
        with pytest.raises(ConnectionFailed):
            connection.send_messages([EmailMessage("two", "b", SENDER, [TO])])
    assert [d.subject for d in sandbox.deliveries] == ["one"]
    assert sandbox.stats.connections == 1


def test_maybe_delivered_is_false_on_errors_gmail_answered(account, sandbox):
    """The transport documents ``maybe_delivered = False`` on every error except a missing reply
    to DATA's final "."; only that path set it, so reading it elsewhere raised AttributeError."""
    sandbox.bad_recipients.add("nobody@example.net")
    with pytest.raises(RecipientsRefused) as refused:
        EmailMessage("s", "b", SENDER, ["nobody@example.net"]).send()
    assert refused.value.maybe_delivered is False
    sandbox.fault("data", drop=True)  # before the body: Gmail cannot have the message
    with pytest.raises(TemporaryError) as dropped:
        send_mail("s", "b", SENDER, ["to@example.net"])
    assert dropped.value.maybe_delivered is False


def test_kept_open_connection_closed_by_server_reconnects(idle_closing_sandbox, make_account):
    """A kept-open connection the server closed while idle is reopened by the next send."""
    sandbox = idle_closing_sandbox
    make_account(sandbox)
    with get_connection() as connection:
        assert connection.send_messages([EmailMessage("first", "b", SENDER, [TO])]) == 1
        time.sleep(1.2)  # the sandbox closes the idle session after 0.5 s
        assert connection.send_messages([EmailMessage("second", "b", SENDER, [TO])]) == 1
    assert [d.subject for d in sandbox.deliveries] == ["first", "second"]
    assert sandbox.stats.connections == 2
    assert sandbox.stats.logins == 2


def test_kept_open_connection_dropped_at_mail_reconnects(account, sandbox):
    """A kept-open connection dropped when the next MAIL FROM arrives is reopened once."""
    with get_connection() as connection:
        assert connection.send_messages([EmailMessage("first", "b", SENDER, [TO])]) == 1
        fault = sandbox.fault("mail", drop=True)
        assert connection.send_messages([EmailMessage("second", "b", SENDER, [TO])]) == 1
    assert fault.fired == 1
    assert [d.subject for d in sandbox.deliveries] == ["first", "second"]
    assert sandbox.stats.connections == 2


# --- the message -----------------------------------------------------------------------------


def test_552_is_message_too_large(account, sandbox):
    """552 5.3.4 after DATA raises MessageTooLarge, suggesting links instead of attachments."""
    sandbox.fault("after_data", reply=Replies.TOO_BIG)
    with pytest.raises(MessageTooLarge) as info:
        _send()
    error = info.value
    assert isinstance(error, smtplib.SMTPException)
    assert error.smtp_code == 552
    assert error.enhanced_code == "5.3.4"
    assert error.category == "permanent"
    assert "links" in str(error)
    assert sandbox.deliveries == []


def test_oversize_message_refused_before_upload(small_sandbox, make_account):
    """A message over the advertised SIZE raises MessageTooLarge without MAIL or DATA."""
    make_account(small_sandbox)
    with pytest.raises(MessageTooLarge) as info:
        send_mail("Big", "x" * 5000, SENDER, [TO])
    error = info.value
    assert isinstance(error, smtplib.SMTPException)
    assert "2,000" in str(error) or "2000" in str(error)
    stats = small_sandbox.stats
    assert stats.logins == 1  # it connected and learnt the limit from EHLO...
    assert stats.rejected == 0  # ...but sent no MAIL FROM SIZE=... and no body to be refused
    assert small_sandbox.deliveries == []


def test_every_recipient_refused(account, sandbox):
    """553 5.1.3 for every RCPT raises RecipientsRefused listing each refused address."""
    bad = ["nobody@example.net", "ghost@example.net"]
    sandbox.bad_recipients.update(bad)
    with pytest.raises(RecipientsRefused) as info:
        EmailMessage("s", "b", SENDER, bad).send()
    error = info.value
    assert isinstance(error, smtplib.SMTPRecipientsRefused)
    assert set(error.recipients) == set(bad)
    for code, text in error.recipients.values():
        assert code == 553 and "5.1.3" in text
    for address in bad:
        assert address in str(error)
    assert sandbox.deliveries == []


def test_101_recipients_refused_before_connecting(account, sandbox):
    """101 recipients across To, Cc and Bcc raise TooManyRecipients; no connection is made."""
    message = EmailMessage(
        "s",
        "b",
        SENDER,
        to=[f"to{i}@example.net" for i in range(40)],
        cc=[f"cc{i}@example.net" for i in range(40)],
        bcc=[f"bcc{i}@example.net" for i in range(21)],
    )
    with pytest.raises(TooManyRecipients) as info:
        message.send()
    error = info.value
    assert isinstance(error, smtplib.SMTPException)
    assert "101" in str(error) and "100" in str(error)
    assert "Bcc" in str(error)
    assert sandbox.stats.connections == 0
    assert sandbox.deliveries == []


INJECTIONS = {
    "subject": {"subject": "Hello\nBcc: evil@example.org", "to": [TO]},
    "to": {"subject": "Hello", "to": ["victim@example.net\r\nBcc: evil@example.org"]},
}


@pytest.mark.parametrize("where", sorted(INJECTIONS))
def test_header_injection_is_refused_even_when_failing_silently(account, sandbox, where):
    """A line break in a header raises InvalidMessage even with fail_silently; nothing is sent."""
    fields = INJECTIONS[where]
    with pytest.raises(InvalidMessage) as info:
        send_mail(fields["subject"], "Body", SENDER, fields["to"], fail_silently=True)
    error = info.value
    assert isinstance(error, ValueError)
    assert "nothing was sent" in str(error).lower()
    assert sandbox.stats.connections == 0
    assert sandbox.deliveries == []


@pytest.mark.parametrize("where", sorted(INJECTIONS))
def test_header_injection_is_a_bad_header_error(account, sandbox, where):
    """Header injection is catchable as Django's BadHeaderError, as Django's docs show."""
    fields = INJECTIONS[where]
    with pytest.raises(BadHeaderError):
        send_mail(fields["subject"], "Body", SENDER, fields["to"])
    assert sandbox.deliveries == []


def test_no_recipients_is_invalid_message(account, sandbox):
    """A message with no To, Cc or Bcc raises InvalidMessage, even with fail_silently."""
    message = EmailMessage("s", "b", SENDER, [])
    with pytest.raises(InvalidMessage, match="no recipients"):
        get_connection(fail_silently=True).send_messages([message])
    assert sandbox.stats.connections == 0


def test_strict_from_refuses_unknown_sender(account, sandbox, settings):
    """STRICT_FROM refuses an unknown From with SenderNotAllowed naming the address."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "STRICT_FROM": True}
    with pytest.raises(SenderNotAllowed) as info:
        send_mail("s", "b", "Shop <noreply@shop.example>", [TO])
    error = info.value
    assert isinstance(error, smtplib.SMTPSenderRefused)
    assert "noreply@shop.example" in str(error)
    assert "alias" in str(error)
    assert sandbox.stats.connections == 0
    assert sandbox.deliveries == []


def test_sender_not_allowed_carries_sender_like_smtplib(account, sandbox, settings):
    """SenderNotAllowed has .sender, as every smtplib.SMTPSenderRefused does."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "STRICT_FROM": True}
    with pytest.raises(SenderNotAllowed) as info:
        send_mail("s", "b", "noreply@shop.example", [TO])
    assert info.value.sender == "noreply@shop.example"


# --- batches ---------------------------------------------------------------------------------


def test_batch_with_one_refused_message_fail_silently(account, sandbox):
    """Of three messages the second is refused (5xx): fail_silently returns 2, the others go."""
    sandbox.bad_recipients.add("refused@example.net")
    messages = [
        EmailMessage("m1", "b", SENDER, ["one@example.net"]),
        EmailMessage("m2", "b", SENDER, ["refused@example.net"]),
        EmailMessage("m3", "b", SENDER, ["three@example.net"]),
    ]
    assert get_connection(fail_silently=True).send_messages(messages) == 2
    assert [d.subject for d in sandbox.deliveries] == ["m1", "m3"]
    assert [d.rcpt_tos for d in sandbox.deliveries] == [["one@example.net"], ["three@example.net"]]


def test_batch_with_one_refused_message_raises_without_fail_silently(account, sandbox):
    """Without fail_silently the 5xx on message 2 raises; message 1 was already delivered."""
    sandbox.bad_recipients.add("refused@example.net")
    messages = [
        EmailMessage("m1", "b", SENDER, ["one@example.net"]),
        EmailMessage("m2", "b", SENDER, ["refused@example.net"]),
        EmailMessage("m3", "b", SENDER, ["three@example.net"]),
    ]
    with pytest.raises(RecipientsRefused):
        get_connection().send_messages(messages)
    assert [d.subject for d in sandbox.deliveries] == ["m1"]


@pytest.fixture(params=[True, False], ids=["pipelined", "stepwise"])
def any_sandbox(request, make_sandbox):
    """A sandbox that offers PIPELINING, and one that does not (each path of the transport)."""
    return make_sandbox(pipelining=request.param)


@pytest.mark.parametrize(
    ("phase", "reply", "error"),
    [
        ("mail", "550 5.4.5 Daily user sending limit exceeded.", "QuotaExceeded"),
        ("mail", "421 4.7.0 Try again later, closing connection.", "TemporaryError"),
        ("rcpt", "421 4.7.0 Try again later, closing connection.", "TemporaryError"),
        (
            "data",
            "552 5.3.4 Your message exceeded Google's message size limits.",
            "MessageTooLarge",
        ),
        ("after_data", "550 5.4.5 Daily user sending limit exceeded.", "QuotaExceeded"),
    ],
)
def test_each_reply_is_classified_on_both_transport_paths(
    any_sandbox, make_account, phase, reply, error
):
    """Pipelined or not, Gmail's refusal at each phase becomes the same exception."""
    from django_gmail_smtp import exceptions

    make_account(any_sandbox)
    any_sandbox.fault(phase, reply=reply)
    with pytest.raises(getattr(exceptions, error)):
        send_mail("s", "b", SENDER, ["a@example.net", "b@example.net"])
    assert any_sandbox.deliveries == []
    if error == "QuotaExceeded":
        return  # the account is now blocked until its window frees (tested in test_quota)
    # The connection is in a clean state (or replaced): the next message goes out.
    assert send_mail("s", "b", SENDER, ["a@example.net", "b@example.net"]) == 1
    assert any_sandbox.deliveries[0].rcpt_tos == ["a@example.net", "b@example.net"]


def test_partial_refusal_and_dot_stuffing_on_both_paths(any_sandbox, make_account):
    make_account(any_sandbox)
    any_sandbox.bad_recipients.add("bad@example.net")
    body = "line one\n.leading dot\n..two dots\n.\nend"
    message = EmailMessage("s", body, SENDER, ["ok@example.net", "bad@example.net"])
    assert message.send() == 1
    assert list(message.gmail_status["refused"]) == ["bad@example.net"]
    content = any_sandbox.deliveries[0].message.get_content()
    assert content.replace("\r\n", "\n").rstrip("\n") == body


def test_signals_from_the_sync_backend(sandbox, make_account):
    """email_sent fires for each sync send; account_unhealthy once when credentials fail."""
    from django_gmail_smtp import signals

    account = make_account(sandbox)
    sent, alerts = [], []

    def on_sent(**kw):
        sent.append((kw["account"].email, kw["result"].reply[:8], kw["outbound"]))

    def on_unhealthy(**kw):
        alerts.append((kw["account"].email, type(kw["error"]).__name__))

    signals.email_sent.connect(on_sent, weak=False)
    signals.account_unhealthy.connect(on_unhealthy, weak=False)
    try:
        send_mail("s", "b", SENDER, ["t@example.net"])
        GmailAccount.objects.filter(pk=account.pk).update(app_password="wrongwrongwrongw")
        for _ in range(2):
            with pytest.raises(BadCredentials):
                send_mail("s", "b", SENDER, ["t@example.net"])
    finally:
        signals.email_sent.disconnect(on_sent)
        signals.account_unhealthy.disconnect(on_unhealthy)
    assert sent == [(SENDER, "2.0.0 OK", None)]
    assert alerts == [(SENDER, "BadCredentials")]  # once, not per failed send


# --- settings and connection errors that name their cause ---------------------------------------

SYNC = "django_gmail_smtp.backends.GmailSMTPBackend"


@pytest.fixture(params=["sync", "celery"])
def via(request):
    """Which backend sends: the sync one now, or the Celery one (delivered in-process)."""
    return request.param


def _attempt(via: str, *, fail_silently: bool = False):
    """Send one message; return the sync backend's exception, or (outcome, row) for Celery."""
    from django_gmail_smtp import outbox
    from django_gmail_smtp.backends import CeleryGmailBackend
    from django_gmail_smtp.models import OutboundEmail
    from django_gmail_smtp.transport import ConnectionPool

    message = EmailMessage("s", "b", SENDER, [TO])
    if via == "sync":
        with pytest.raises(Exception) as info:
            get_connection(SYNC, fail_silently=fail_silently).send_messages([message])
        return info.value
    assert CeleryGmailBackend(fail_silently=fail_silently).send_messages([message]) == 1
    pool = ConnectionPool()
    try:
        outcome = outbox.deliver(message.gmail_outbound_id, pool=pool)
    finally:
        pool.close()
    return outcome, OutboundEmail.objects.get(pk=message.gmail_outbound_id)


def test_email_timeout_is_used_when_gmail_smtp_has_no_timeout(account, sandbox, settings, via):
    """Django's EMAIL_TIMEOUT applies (projects without MAILERS) when TIMEOUT is unset: a
    server that answers after 3 s fails after 0.5 s, reported as a timeout."""
    settings.GMAIL_SMTP = {k: v for k, v in settings.GMAIL_SMTP.items() if k != "TIMEOUT"}
    settings.EMAIL_TIMEOUT = 0.5
    sandbox.fault("connect", delay=3)
    started = time.monotonic()
    result = _attempt(via)
    assert time.monotonic() - started < 2.5
    expected = f"{sandbox.host}:{sandbox.port} did not answer within 0.5 s while connecting"
    if via == "sync":
        assert isinstance(result, ConnectionFailed)
        assert expected in str(result)
    else:
        outcome, row = result
        assert outcome == "retry" and expected in row.last_error
    assert sandbox.deliveries == []


def test_timeout_precedence(settings):
    """Backend option, then GMAIL_SMTP["TIMEOUT"], then EMAIL_TIMEOUT, then 30."""
    from django_gmail_smtp.conf import get_setting

    settings.EMAIL_TIMEOUT = 7
    assert get_setting("TIMEOUT", {"timeout": 3}) == 3
    assert get_setting("TIMEOUT") == settings.GMAIL_SMTP["TIMEOUT"]
    settings.GMAIL_SMTP = {k: v for k, v in settings.GMAIL_SMTP.items() if k != "TIMEOUT"}
    assert get_setting("TIMEOUT") == 7
    settings.EMAIL_TIMEOUT = None
    assert get_setting("TIMEOUT") == 30


def test_ssl_against_a_starttls_port_names_the_mismatch(account, sandbox, settings, via):
    """SECURITY 'ssl' against a server that greets in plain text: a configuration error naming
    SECURITY and PORT (not a CA-file hint), raised even with fail_silently, never an attempt."""
    from django_gmail_smtp.exceptions import GmailConfigurationError, SecurityMismatch

    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "SECURITY": "ssl"}
    result = _attempt(via, fail_silently=True)
    expected = (
        f"SECURITY is 'ssl' but {sandbox.host}:{sandbox.port} answered without TLS: "
        "port 587 uses 'starttls', 465 uses 'ssl'"
    )
    if via == "sync":
        assert isinstance(result, SecurityMismatch)
        assert isinstance(result, GmailConfigurationError)
        text = str(result)
    else:
        outcome, row = result
        assert outcome == "deferred" and row.reason == "config" and row.attempts == 0
        text = row.last_error
    assert expected in text
    assert "CA_FILE" not in text and "certificate" not in text
    assert text.lower().count("no credentials were sent") == 1
    assert auth_attempts(sandbox) == 0 and sandbox.deliveries == []


def test_connect_timeout_is_not_reported_as_a_closed_connection(
    ssl_sandbox, make_account, settings, via
):
    """STARTTLS against an implicit-TLS port: the server waits, silent, for a TLS handshake.
    That is a timeout while connecting (with a hint about SECURITY), not "closed the connection"."""
    make_account(ssl_sandbox)
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "SECURITY": "starttls", "TIMEOUT": 0.5}
    result = _attempt(via)
    expected = f"{ssl_sandbox.host}:{ssl_sandbox.port} did not answer within 0.5 s while connecting"
    if via == "sync":
        assert isinstance(result, ConnectionFailed)
        text = str(result)
    else:
        outcome, row = result
        assert outcome == "retry"
        text = row.last_error
    assert expected in text
    assert "closed the connection" not in text
    assert "set SECURITY to 'ssl'" in text
    assert ssl_sandbox.deliveries == []


@pytest.mark.parametrize("tls", ["sandbox", "ssl_sandbox"])
def test_untrusted_certificate_says_no_credentials_were_sent_once(
    request, make_account, settings, tls, via
):
    sb = request.getfixturevalue(tls)
    make_account(sb)
    settings.GMAIL_SMTP = {k: v for k, v in settings.GMAIL_SMTP.items() if k != "CA_FILE"}
    result = _attempt(via)
    if via == "sync":
        text = str(result)
    else:
        outcome, row = result
        assert outcome == "deferred"  # a configuration problem, never retried as temporary
        text = row.last_error
    assert text.lower().count("no credentials were sent") == 1
    assert "CA_FILE" in text
    assert auth_attempts(sb) == 0 and sb.deliveries == []


def test_server_without_starttls_says_no_credentials_were_sent_once(make_account, settings):
    with GmailSandbox(security="starttls", offer_starttls=False) as sb:
        wire(sb, settings)
        make_account(sb)
        error = _attempt("sync")
        assert "STARTTLS" in str(error)
        assert str(error).lower().count("no credentials were sent") == 1
        assert sb.stats.plaintext_auth_attempts == 0
