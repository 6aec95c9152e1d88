"""The sync backend end to end: real sockets, real TLS, the sandbox as Gmail."""

from __future__ import annotations

import smtplib
import socket
from email.utils import parseaddr

import pytest
from django.contrib.auth.forms import PasswordResetForm
from django.contrib.auth.models import User
from django.core import mail
from django.core.mail import EmailMessage, EmailMultiAlternatives, get_connection, send_mail

from django_gmail_smtp.backends import GmailSMTPBackend
from django_gmail_smtp.models import GmailAccount
from django_gmail_smtp.transport import GmailConnection

from .conftest import ALIAS, APP_PASSWORD, SENDER

pytestmark = pytest.mark.django_db


def test_send_mail_starttls(account, sandbox):
    assert send_mail("Hello", "Body text", SENDER, ["to@example.net"]) == 1
    (delivered,) = sandbox.deliveries
    assert delivered.user == SENDER
    assert delivered.rcpt_tos == ["to@example.net"]
    assert delivered.message["Subject"] == "Hello"
    assert delivered.message.get_content().strip() == "Body text"
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.OK
    assert account.last_sent_at is not None


def test_send_mail_implicit_tls(ssl_sandbox, make_account):
    make_account(ssl_sandbox)
    assert send_mail("Over 465", "Body", SENDER, ["to@example.net"]) == 1
    assert ssl_sandbox.deliveries[0].message["Subject"] == "Over 465"


def test_html_attachments_inline_images_and_non_ascii(account, sandbox):
    message = EmailMultiAlternatives(
        subject="Grüße aus Köln – 東京",
        body="Plain: naïve café ✓",
        from_email=f"Zoë Example <{SENDER}>",
        to=["Ådne <to@example.net>"],
        cc=["cc@example.net"],
        bcc=["hidden@example.net"],
    )
    message.attach_alternative('<p>HTML: café <img src="cid:logo"></p>', "text/html")
    message.attach("report.csv", "a,b\n1,2\n", "text/csv")
    from email.mime.image import MIMEImage

    png = (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
        b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00"
        b"\x00\x00IEND\xaeB`\x82"
    )
    image = MIMEImage(png, "png")
    image.add_header("Content-ID", "<logo>")
    image.add_header("Content-Disposition", "inline", filename="logo.png")
    message.attach(image)
    assert message.send() == 1

    (delivered,) = sandbox.deliveries
    assert sorted(delivered.rcpt_tos) == ["cc@example.net", "hidden@example.net", "to@example.net"]
    parsed = delivered.message
    assert parsed["Subject"] == "Grüße aus Köln – 東京"
    assert "Bcc" not in parsed
    assert parseaddr(str(parsed["From"]))[0] == "Zoë Example"
    html = parsed.get_body(("html",)).get_content()
    text = parsed.get_body(("plain",)).get_content()
    assert "café" in html and "naïve café ✓" in text
    names = {part.get_filename() for part in parsed.walk() if part.get_filename()}
    assert names == {"report.csv", "logo.png"}
    images = [p for p in parsed.walk() if p.get_content_type() == "image/png"]
    assert images[0].get_payload(decode=True) == png


def test_password_reset_form(account, sandbox, settings):
    settings.DEFAULT_FROM_EMAIL = SENDER
    User.objects.create_user("alice", "alice@example.org", "pw")
    form = PasswordResetForm({"email": "alice@example.org"})
    assert form.is_valid()
    form.save(domain_override="testserver")
    (delivered,) = sandbox.deliveries
    assert delivered.rcpt_tos == ["alice@example.org"]
    assert "/reset/" in delivered.message.get_content()


def test_one_connection_and_one_login_per_batch(account, sandbox):
    messages = [EmailMessage(f"m{i}", "b", SENDER, [f"r{i}@example.net"]) for i in range(5)]
    assert get_connection().send_messages(messages) == 5
    assert len(sandbox.deliveries) == 5
    assert sandbox.stats.connections == 1
    assert sandbox.stats.logins == 1


def test_connection_kept_open_as_context_manager(account, sandbox):
    with get_connection() as connection:
        for i in range(3):
            connection.send_messages([EmailMessage(f"m{i}", "b", SENDER, ["r@example.net"])])
    assert len(sandbox.deliveries) == 3
    assert sandbox.stats.logins == 1


def test_app_password_spaces_ignored(sandbox, make_account):
    acct = make_account(sandbox, app_password="abcd efgh ijkl mnop")
    assert acct.app_password == "abcdefghijklmnop"
    assert send_mail("s", "b", SENDER, ["to@example.net"]) == 1


def test_idn_account_logs_in_with_its_idna_name(sandbox, settings):
    sandbox.add_user("info@xn--bcher-kva.example", app_password=APP_PASSWORD)
    GmailAccount.objects.create(
        email="info@bücher.example", app_password=APP_PASSWORD, is_default=True
    )
    assert send_mail("s", "b", "info@bücher.example", ["t@example.net"]) == 1
    assert sandbox.deliveries[0].user == "info@xn--bcher-kva.example"


def test_alias_from_routes_to_owner_and_keeps_from(account, sandbox, make_account):
    make_account(sandbox, "other@example.com", aliases=["team@example.com"], is_default=False)
    send_mail("alias", "b", "Team <team@example.com>", ["to@example.net"])
    delivered = sandbox.deliveries[0]
    assert delivered.user == "other@example.com"
    assert parseaddr(str(delivered.message["From"]))[1] == "team@example.com"
    assert "Reply-To" not in delivered.message
    send_mail("alias2", "b", ALIAS, ["to@example.net"])
    assert sandbox.deliveries[1].user == SENDER


def test_unknown_from_goes_from_default_with_reply_to(account, sandbox):
    message = EmailMessage("s", "b", "Shop <noreply@shop.example>", ["to@example.net"])
    message.send()
    delivered = sandbox.deliveries[0]
    assert delivered.user == SENDER
    assert parseaddr(str(delivered.message["From"])) == ("Shop", SENDER)
    assert parseaddr(str(delivered.message["Reply-To"])) == ("Shop", "noreply@shop.example")
    assert message.gmail_status["from_rewritten"] is True
    # The caller's message object is not changed.
    assert message.from_email == "Shop <noreply@shop.example>"


def test_unknown_from_keeps_existing_reply_to(account, sandbox):
    EmailMessage(
        "s", "b", "x@shop.example", ["to@example.net"], reply_to=["help@shop.example"]
    ).send()
    assert str(sandbox.deliveries[0].message["Reply-To"]) == "help@shop.example"


def test_strict_from_refuses_unknown_from(account, sandbox, settings):
    from django_gmail_smtp.exceptions import SenderNotAllowed

    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "STRICT_FROM": True}
    with pytest.raises(SenderNotAllowed, match="stranger@shop.example") as info:
        send_mail("s", "b", "stranger@shop.example", ["to@example.net"])
    assert isinstance(info.value, smtplib.SMTPSenderRefused)
    assert sandbox.deliveries == []


def test_fallback_to_email_host_user(sandbox, settings, db):
    sandbox.add_user("fallback@example.com", app_password="qrstuvwxyzabcdef")
    settings.EMAIL_HOST_USER = "fallback@example.com"
    settings.EMAIL_HOST_PASSWORD = "qrst uvwx yzab cdef"
    assert send_mail("s", "b", "site@example.com", ["to@example.net"]) == 1
    assert sandbox.deliveries[0].user == "fallback@example.com"
    assert not GmailAccount.objects.exists()


def test_backend_options_as_keyword_arguments(account, sandbox, settings):
    """What a Django 6.1 MAILERS entry passes: alias and OPTIONS as keyword arguments."""
    gmail = dict(settings.GMAIL_SMTP)
    settings.GMAIL_SMTP = {"ENCRYPTION_KEYS": gmail["ENCRYPTION_KEYS"]}
    backend = GmailSMTPBackend(
        alias="gmail",
        host=gmail["HOST"],
        port=gmail["PORT"],
        security="starttls",
        ca_file=gmail["CA_FILE"],
        timeout=5,
    )
    assert backend.alias == "gmail"
    assert backend.send_messages([EmailMessage("kw", "b", SENDER, ["to@example.net"])]) == 1


@pytest.mark.skipif(
    not hasattr(mail, "mailers"), reason="MAILERS exists from Django 6.1 (nox runs it there)"
)
def test_mailers_setting(account, sandbox, settings):
    gmail = dict(settings.GMAIL_SMTP)
    settings.MAILERS = {
        "default": {
            "BACKEND": "django_gmail_smtp.backends.GmailSMTPBackend",
            "OPTIONS": {"host": gmail["HOST"], "port": gmail["PORT"], "ca_file": gmail["CA_FILE"]},
        }
    }
    settings.GMAIL_SMTP = {"ENCRYPTION_KEYS": gmail["ENCRYPTION_KEYS"]}
    mail.mailers.default.send_messages([EmailMessage("m", "b", SENDER, ["to@example.net"])])
    assert len(sandbox.deliveries) == 1


def test_partial_recipient_refusal_is_reported(account, sandbox):
    sandbox.bad_recipients.add("nobody@example.net")
    message = EmailMessage("s", "b", SENDER, ["to@example.net", "nobody@example.net"])
    assert message.send() == 1
    assert sandbox.deliveries[0].rcpt_tos == ["to@example.net"]
    assert set(message.gmail_status["refused"]) == {"nobody@example.net"}
    code, text = message.gmail_status["refused"]["nobody@example.net"]
    assert code == 553 and "5.1.3" in text


@pytest.mark.parametrize("which", ["sandbox", "ssl_sandbox"])
def test_the_socket_to_gmail_has_nagle_off(which, request, make_account):
    # Nagle would hold the EHLO after the TLS handshake, and each pipelined envelope, until
    # the previous write is acknowledged: a round trip for nothing (issue 13).
    account = make_account(request.getfixturevalue(which))
    connection = GmailConnection(account)
    connection.open()
    try:
        sock = connection._smtp.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        connection.close()
