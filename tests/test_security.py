"""Secrets never appear in the clear, stored secrets survive key rotation, and no credential is
sent over a connection that is not verified TLS."""

from __future__ import annotations

import io
import json
import logging
import smtplib
import socket
import sys
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage, get_connection, send_mail
from django.core.management import call_command
from django.utils import timezone
from django.views.debug import ExceptionReporter

from django_gmail_smtp.credentials import credentials_for
from django_gmail_smtp.crypto import UnreadableSecret
from django_gmail_smtp.exceptions import (
    EncryptionKeyError,
    InsecureConnectionError,
    InvalidAddress,
)
from django_gmail_smtp.models import GmailAccount
from django_gmail_smtp.testing import GmailSandbox, Replies

from .conftest import APP_PASSWORD, SENDER
from .factories import (
    CLIENT_SECRET,
    OAUTH_USER,
    auth_attempts,
    make_oauth_account,
    raw_columns,
    wire,
    with_keys,
)

pytestmark = pytest.mark.django_db

TO = "to@example.net"
WRONG_PASSWORD = "wrongpasswordxyz"
KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()
KEY_C = Fernet.generate_key().decode()
ENCRYPTED_FIELDS = ("app_password", "client_secret", "refresh_token", "access_token")


def secrets_of(*accounts: GmailAccount) -> list[str]:
    """Every secret the accounts hold, plus the App Passwords used in these tests."""
    found = {APP_PASSWORD, "abcd efgh ijkl mnop", WRONG_PASSWORD, CLIENT_SECRET}
    for account in accounts:
        account.refresh_from_db()
        found |= {str(getattr(account, name)) for name in ENCRYPTED_FIELDS}
    return sorted(s for s in found if s)


def assert_no_secret(text: str, secrets: list[str], where: str = "") -> None:
    for secret in secrets:
        assert secret not in text, f"a secret appears in {where or 'the text'}"


def use_keys(settings, *keys: str) -> None:
    with_keys(settings, ENCRYPTION_KEYS=list(keys))


# --- repr() and str() ------------------------------------------------------------------------


def test_account_credentials_and_backend_reprs_hide_secrets(sandbox, make_account):
    """repr()/str() of accounts, SMTPCredentials and the backend show no secret."""
    app_account = make_account(sandbox)
    sandbox.add_user(OAUTH_USER)
    oauth_account = make_oauth_account(
        sandbox,
        access_token=sandbox.issue_access_token(OAUTH_USER),
        token_expiry=timezone.now() + timedelta(hours=1),
    )
    secrets = secrets_of(app_account, oauth_account)
    assert {APP_PASSWORD, CLIENT_SECRET, oauth_account.refresh_token} <= set(secrets)

    shown = []
    for account in (app_account, oauth_account):
        credentials = credentials_for(account)
        assert credentials.secret in secrets  # the right thing is being hidden
        shown += [repr(account), str(account), repr(credentials), str(credentials)]
    with get_connection() as backend:
        backend.send_messages([EmailMessage("a", "b", SENDER, [TO])])
        backend.send_messages([EmailMessage("o", "b", OAUTH_USER, [TO])])
        assert len(sandbox.deliveries) == 2
        shown += [repr(backend), str(backend), repr(vars(backend))]
    for text in shown:
        assert_no_secret(text, secrets, text)


def _wrong_app_password(sb, make_account, settings):
    make_account(sb, app_password=WRONG_PASSWORD)
    send_mail("s", "b", SENDER, [TO])


def _app_password_required(sb, make_account, settings):
    make_account(sb)
    sb.add_user(SENDER, account_password=APP_PASSWORD, require_app_password=True)
    send_mail("s", "b", SENDER, [TO])


def _web_login_required(sb, make_account, settings):
    make_account(sb)
    sb.add_user(SENDER, app_password=APP_PASSWORD, web_login_required=True)
    send_mail("s", "b", SENDER, [TO])


def _too_many_logins(sb, make_account, settings):
    make_account(sb)
    sb.fault("auth", reply=Replies.TOO_MANY_LOGINS)
    send_mail("s", "b", SENDER, [TO])


def _quota(sb, make_account, settings):
    make_account(sb)
    sb.set_quota(SENDER, messages=0)
    send_mail("s", "b", SENDER, [TO])


def _dropped(sb, make_account, settings):
    make_account(sb)
    sb.fault("data", drop=True)
    send_mail("s", "b", SENDER, [TO])


def _refused_recipient(sb, make_account, settings):
    make_account(sb)
    sb.bad_recipients.add(TO)
    send_mail("s", "b", SENDER, [TO])


def _revoked_refresh_token(sb, make_account, settings):
    account = make_oauth_account(sb)
    sb.revoke(account.refresh_token)
    send_mail("s", "b", OAUTH_USER, [TO])


def _wrong_client_secret(sb, make_account, settings):
    make_oauth_account(sb, real_client_secret="GOCSPX-the-real-one", client_secret=CLIENT_SECRET)
    send_mail("s", "b", OAUTH_USER, [TO])


def _rejected_token_and_revoked_grant(sb, make_account, settings):
    sb.add_user(OAUTH_USER)
    account = make_oauth_account(
        sb,
        access_token=sb.issue_access_token(OAUTH_USER),
        token_expiry=timezone.now() + timedelta(hours=1),
    )
    sb.revoke(account.refresh_token)
    sb.expire_access_tokens()
    send_mail("s", "b", OAUTH_USER, [TO])


def _unreadable_secret(sb, make_account, settings):
    make_account(sb)
    use_keys(settings, KEY_C)
    send_mail("s", "b", SENDER, [TO])


FAILURES: dict[str, Callable] = {
    f.__name__.strip("_"): f
    for f in (
        _wrong_app_password,
        _app_password_required,
        _web_login_required,
        _too_many_logins,
        _quota,
        _dropped,
        _refused_recipient,
        _revoked_refresh_token,
        _wrong_client_secret,
        _rejected_token_and_revoked_grant,
        _unreadable_secret,
    )
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_exceptions_show_no_secret(sandbox, make_account, settings, failure):
    """repr(), str(), args and the Django error report of each failure hold no secret."""
    keys = settings.GMAIL_SMTP["ENCRYPTION_KEYS"]
    with pytest.raises((smtplib.SMTPException, ImproperlyConfigured)) as info:
        FAILURES[failure](sandbox, make_account, settings)
    use_keys(settings, *keys)
    secrets = secrets_of(*GmailAccount.objects.all())
    error = info.value
    assert_no_secret(repr(error), secrets, "repr()")
    assert_no_secret(str(error), secrets, "str()")
    assert_no_secret(repr(error.args), secrets, "args")
    assert_no_secret(repr(vars(error)), secrets, "attributes")
    # What a site's error e-mail / technical 500 page would show, with each frame's local
    # variables (DEBUG is False here, so Django's sensitive-variable filtering is active).
    tb = info.tb
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next  # start at send_mail(): this file's own frames hold the secrets list
    reporter = ExceptionReporter(None, type(error), error, tb)
    report = reporter.get_traceback_text() + reporter.get_traceback_html()
    assert type(error).__name__ in report
    assert "Local vars" in report
    assert_no_secret(report, secrets, "the error report")


def test_non_ascii_password_fails_cleanly_without_the_secret(sandbox, make_account):
    make_account(sandbox, app_password="pässwordpässword")
    with pytest.raises(InvalidAddress) as info:
        send_mail("s", "b", SENDER, ["t@example.net"])
    assert "pässword" not in str(info.value) and info.value.__cause__ is None
    assert info.value.__suppress_context__


# --- dumpdata / loaddata ---------------------------------------------------------------------


def test_dumpdata_holds_only_ciphertext_and_loaddata_restores(sandbox, make_account, tmp_path):
    """dumpdata writes gmsenc1: ciphertext only; loaddata of it gives back a working account."""
    app_account = make_account(sandbox)
    sandbox.add_user(OAUTH_USER)
    oauth_account = make_oauth_account(
        sandbox,
        access_token=sandbox.issue_access_token(OAUTH_USER),
        token_expiry=timezone.now() + timedelta(hours=1),
    )
    secrets = secrets_of(app_account, oauth_account)
    refresh_token = oauth_account.refresh_token

    out = io.StringIO()
    call_command("dumpdata", "django_gmail_smtp", stdout=out)
    dump = out.getvalue()
    assert_no_secret(dump, secrets, "the dump")
    rows = {r["fields"]["email"]: r["fields"] for r in json.loads(dump) if "email" in r["fields"]}
    assert rows[SENDER]["app_password"].startswith("gmsenc1:")
    for name in ("client_secret", "refresh_token", "access_token"):
        assert rows[OAUTH_USER][name].startswith("gmsenc1:"), name

    fixture = tmp_path / "accounts.json"
    fixture.write_text(dump)
    GmailAccount.objects.all().delete()
    call_command("loaddata", str(fixture), stdout=io.StringIO())

    restored = GmailAccount.objects.get(email=SENDER)
    assert restored.app_password == APP_PASSWORD
    assert GmailAccount.objects.get(email=OAUTH_USER).refresh_token == refresh_token
    assert raw_columns(restored)["app_password"].startswith("gmsenc1:")
    assert send_mail("after loaddata", "b", SENDER, [TO]) == 1
    assert sandbox.deliveries[-1].user == SENDER


# --- logs ------------------------------------------------------------------------------------


def test_debug_logs_hold_no_secret(sandbox, make_account, caplog):
    """DEBUG logs of a send, an OAuth refresh and an auth failure hold no secret."""
    caplog.set_level(logging.DEBUG)
    make_account(sandbox)
    oauth_account = make_oauth_account(sandbox)
    assert send_mail("app password", "b", SENDER, [TO]) == 1
    assert send_mail("oauth", "b", OAUTH_USER, [TO]) == 1  # refreshes the token first
    sandbox.add_user(SENDER, app_password="zyxwvutsrqponmlk")
    assert send_mail("bad", "b", SENDER, [TO], fail_silently=True) == 0

    secrets = secrets_of(*GmailAccount.objects.all())
    oauth_account.refresh_from_db()
    assert oauth_account.access_token in secrets
    assert caplog.records
    assert any(r.name.startswith("django_gmail_smtp") for r in caplog.records)
    for record in caplog.records:
        assert_no_secret(record.getMessage(), secrets, f"a log record of {record.name}")
    assert_no_secret(caplog.text, secrets, "the formatted log")


# --- encryption keys -------------------------------------------------------------------------


def test_key_rotation(sandbox, make_account, settings):
    """Secrets written with key A read with [B, A], rotate-keys moves them to B, [B] reads them."""
    use_keys(settings, KEY_A)
    account = make_account(sandbox)
    oauth_account = make_oauth_account(sandbox)
    before = {a.pk: raw_columns(a) for a in (account, oauth_account)}

    use_keys(settings, KEY_B, KEY_A)
    assert GmailAccount.objects.get(pk=account.pk).app_password == APP_PASSWORD
    assert GmailAccount.objects.get(pk=oauth_account.pk).client_secret == CLIENT_SECRET

    out = io.StringIO()
    call_command("gmail_smtp", "rotate-keys", stdout=out)
    assert "2 account(s)" in out.getvalue()
    for acct in (account, oauth_account):
        after = raw_columns(acct)
        for name, value in after.items():
            if value:
                assert value.startswith("gmsenc1:") and value != before[acct.pk][name], name

    use_keys(settings, KEY_B)
    assert GmailAccount.objects.get(pk=account.pk).app_password == APP_PASSWORD
    rotated = GmailAccount.objects.get(pk=oauth_account.pk)
    assert rotated.client_secret == CLIENT_SECRET
    assert rotated.refresh_token == oauth_account.refresh_token
    assert send_mail("after rotation", "b", SENDER, [TO]) == 1

    use_keys(settings, KEY_A)  # the old key alone no longer reads them
    assert isinstance(GmailAccount.objects.get(pk=account.pk).app_password, UnreadableSecret)


def test_wrong_key_reads_empty_and_sending_says_so(sandbox, make_account, settings):
    """With only a wrong key the secret reads as empty and sending raises EncryptionKeyError."""
    use_keys(settings, KEY_A)
    make_account(sandbox)
    use_keys(settings, KEY_C)

    account = GmailAccount.objects.get(email=SENDER)
    assert isinstance(account.app_password, UnreadableSecret)
    assert account.app_password == ""
    assert "gmsenc1" not in repr(account.app_password)
    with pytest.raises(EncryptionKeyError) as info:
        send_mail("s", "b", SENDER, [TO], fail_silently=True)  # never hidden
    assert isinstance(info.value, ImproperlyConfigured)
    text = str(info.value)
    assert "decrypt" in text and "ENCRYPTION_KEYS" in text and "key" in text
    assert auth_attempts(sandbox) == 0
    assert sandbox.deliveries == []


def test_saving_with_a_wrong_key_keeps_the_ciphertext(sandbox, make_account, settings):
    """Saving an account whose secrets cannot be decrypted leaves the stored ciphertext intact."""
    use_keys(settings, KEY_A)
    make_account(sandbox)
    make_oauth_account(sandbox)
    stored = {a.pk: raw_columns(a) for a in GmailAccount.objects.all()}

    use_keys(settings, KEY_C)
    for account in GmailAccount.objects.all():
        account.save()
    assert {a.pk: raw_columns(a) for a in GmailAccount.objects.all()} == stored

    use_keys(settings, KEY_A)
    assert GmailAccount.objects.get(email=SENDER).app_password == APP_PASSWORD
    assert send_mail("s", "b", SENDER, [TO]) == 1


# --- TLS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["sandbox", "ssl_sandbox"])
def test_untrusted_certificate_is_refused_before_auth(request, make_account, settings, tls):
    """A certificate no trusted CA signed raises InsecureConnectionError; no AUTH is sent."""
    sb = request.getfixturevalue(tls)
    make_account(sb)
    settings.GMAIL_SMTP = {k: v for k, v in settings.GMAIL_SMTP.items() if k != "CA_FILE"}
    with pytest.raises(InsecureConnectionError) as info:
        send_mail("s", "b", SENDER, [TO])
    error = info.value
    assert isinstance(error, smtplib.SMTPException)
    assert "no credentials were sent" in str(error)
    assert "CA_FILE" in str(error)
    assert auth_attempts(sb) == 0
    assert sb.deliveries == []


def test_server_without_starttls_gets_no_credentials(make_account, settings):
    """A 587-style server that does not offer STARTTLS gets no credentials at all."""
    with GmailSandbox(security="starttls", offer_starttls=False) as sb:
        wire(sb, settings)
        make_account(sb)
        with pytest.raises(InsecureConnectionError) as info:
            send_mail("s", "b", SENDER, [TO])
        assert "STARTTLS" in str(info.value)
        assert "no credentials were sent" in str(info.value)
        assert sb.stats.plaintext_auth_attempts == 0
        assert auth_attempts(sb) == 0
        assert sb.deliveries == []


def test_host_name_mismatch_is_refused(make_account, settings):
    """A server reached by a name its certificate does not hold raises InsecureConnectionError."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs the whole 127.0.0.0/8 on the loopback interface")
    with GmailSandbox(host="127.0.0.2") as sb:  # the certificate names 127.0.0.1 and localhost
        wire(sb, settings)
        make_account(sb)
        with pytest.raises(InsecureConnectionError) as info:
            send_mail("s", "b", SENDER, [TO])
        assert "127.0.0.2" in str(info.value)
        assert "no credentials were sent" in str(info.value)
        assert auth_attempts(sb) == 0
        assert sb.deliveries == []


def test_ehlo_sends_the_configured_hostname(make_account, sandbox, settings):
    """The client introduces itself with GMAIL_SMTP["EHLO_HOSTNAME"].

    The sandbox does not record the EHLO argument, so a bare socket that answers like a
    server without STARTTLS listens for it (the client then gives up, sending nothing more).
    """
    make_account(sandbox)
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rwb") as stream:
            stream.write(b"220 smtp.example ESMTP\r\n")
            stream.flush()
            received.append(stream.readline())
            stream.write(b"250-smtp.example\r\n250 8BITMIME\r\n")
            stream.flush()
            received.extend(iter(stream.readline, b""))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings.GMAIL_SMTP = {
        **settings.GMAIL_SMTP,
        "PORT": listener.getsockname()[1],
        "EHLO_HOSTNAME": "mailer.tests.example",
    }
    try:
        with pytest.raises(InsecureConnectionError):
            send_mail("s", "b", SENDER, [TO])
        thread.join(5)
    finally:
        listener.close()
    command, argument = received[0].split()
    assert command.upper() == b"EHLO"
    assert argument == b"mailer.tests.example"
    assert not any(line.upper().startswith(b"AUTH") for line in received)
