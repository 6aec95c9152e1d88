"""Testing a site's mail against the local Gmail sandbox (shown in docs/sandbox-testing.md).

Run by tests/test_docs.py, so the example in the documentation keeps working.
"""

import pytest
from django.core.mail import send_mail

from django_gmail_smtp.exceptions import BadCredentials, ConsentRequired, QuotaExceeded
from django_gmail_smtp.models import GmailAccount

SENDER = "site@example.com"
APP_PASSWORD = "abcdefghijklmnop"


@pytest.fixture
def gmail(gmail_sandbox, settings):
    """The sandbox, with the site's mail sent through it by the Gmail backend."""
    # Django's test setup swaps every backend for locmem: put ours back for these tests.
    backend = "django_gmail_smtp.backends.GmailSMTPBackend"
    if hasattr(settings, "MAILERS"):  # Django 6.1
        settings.MAILERS = {"default": {"BACKEND": backend}}
    else:  # Django 4.2-6.0
        settings.EMAIL_BACKEND = backend
    # HOST, PORT, SECURITY, CA_FILE, TOKEN_URI and AUTH_URI of the sandbox.
    settings.GMAIL_SMTP = {**getattr(settings, "GMAIL_SMTP", {}), **gmail_sandbox.settings()}
    gmail_sandbox.add_user(SENDER, app_password=APP_PASSWORD, aliases=["news@example.com"])
    return gmail_sandbox


@pytest.fixture
def account(db):
    return GmailAccount.objects.create(
        email=SENDER,
        app_password="abcd efgh ijkl mnop",  # as Google shows it; the spaces are ignored
        send_as_aliases="news@example.com",
        is_default=True,
    )


def test_welcome_mail_is_sent_through_gmail(gmail, account):
    send_mail("Welcome", "Hello!", "news@example.com", ["ada@example.org"])

    [delivered] = gmail.wait_for(1, timeout=10)
    assert delivered.user == SENDER  # the account that logged in
    assert delivered.rcpt_tos == ["ada@example.org"]
    assert delivered.subject == "Welcome"
    assert delivered.gmail_from == "news@example.com"  # a send-as alias: not rewritten


def test_wrong_app_password_is_reported(gmail, account):
    gmail.add_user(SENDER, app_password="anotherpassword1")  # the password was revoked

    with pytest.raises(BadCredentials) as excinfo:
        send_mail("Welcome", "Hello!", SENDER, ["ada@example.org"])

    assert excinfo.value.smtp_code == 535
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.CREDENTIALS_REJECTED


def test_daily_limit(gmail, account):
    gmail.set_quota(SENDER, messages=0)  # Gmail answers 550 5.4.5

    with pytest.raises(QuotaExceeded) as excinfo:
        send_mail("Welcome", "Hello!", SENDER, ["ada@example.org"])

    assert excinfo.value.smtp_code == 550
    assert gmail.deliveries == []
    # The account is now blocked in the quota ledger until its window frees.
    assert account.quota_status().exhausted_until is not None


def test_oauth_account_and_revoked_consent(gmail, db):
    gmail.add_oauth_client("client-id", "client-secret")
    refresh_token = gmail.issue_refresh_token(SENDER, "client-id")
    account = GmailAccount.objects.create(
        email=SENDER,
        auth_method=GmailAccount.AuthMethod.OAUTH2,
        client_id="client-id",
        client_secret="client-secret",
        refresh_token=refresh_token,
        is_default=True,
    )
    send_mail("Welcome", "Hello!", SENDER, ["ada@example.org"])
    assert gmail.wait_for(1)[0].mechanism == "XOAUTH2"

    gmail.revoke(refresh_token)  # the user removed the app's access
    gmail.expire_access_tokens()
    with pytest.raises(ConsentRequired):
        send_mail("Welcome", "Hello!", SENDER, ["ada@example.org"])
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.NEEDS_CONSENT
