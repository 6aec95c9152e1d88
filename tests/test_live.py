"""Live tests against real Gmail. They run only when credentials are given in the environment:

    GMAIL_LIVE_USER=you@gmail.com GMAIL_LIVE_APP_PASSWORD="abcd efgh ijkl mnop" \\
    GMAIL_LIVE_TO=you+live@gmail.com ./dev test -m live

OAuth too, with GMAIL_LIVE_CLIENT_ID, GMAIL_LIVE_CLIENT_SECRET and GMAIL_LIVE_REFRESH_TOKEN.
"""

from __future__ import annotations

import os

import pytest
from django.core.mail import EmailMessage

from django_gmail_smtp.backends import GmailSMTPBackend
from django_gmail_smtp.models import GmailAccount

pytestmark = [pytest.mark.live, pytest.mark.django_db]

USER = os.environ.get("GMAIL_LIVE_USER", "")
TO = os.environ.get("GMAIL_LIVE_TO", "") or USER
needs_app_password = pytest.mark.skipif(
    not (USER and os.environ.get("GMAIL_LIVE_APP_PASSWORD")),
    reason="live Gmail test: set GMAIL_LIVE_USER and GMAIL_LIVE_APP_PASSWORD to run it",
)
needs_oauth = pytest.mark.skipif(
    not (USER and os.environ.get("GMAIL_LIVE_REFRESH_TOKEN")),
    reason="live Gmail test: set GMAIL_LIVE_USER, GMAIL_LIVE_CLIENT_ID, "
    "GMAIL_LIVE_CLIENT_SECRET and GMAIL_LIVE_REFRESH_TOKEN to run it",
)


@pytest.fixture
def real_gmail(settings):
    keys = settings.GMAIL_SMTP["ENCRYPTION_KEYS"]
    settings.GMAIL_SMTP = {"ENCRYPTION_KEYS": keys, "TIMEOUT": 30}  # smtp.gmail.com, 587


@needs_app_password
@pytest.mark.parametrize("port", [587, 465])
def test_send_with_app_password(real_gmail, port):
    GmailAccount.objects.create(
        email=USER, app_password=os.environ["GMAIL_LIVE_APP_PASSWORD"], is_default=True
    )
    message = EmailMessage(f"django-gmail-smtp live test ({port})", "live", USER, [TO])
    assert GmailSMTPBackend(port=port).send_messages([message]) == 1
    assert message.gmail_status["reply"].startswith("2.0.0 OK")


@needs_oauth
def test_send_with_oauth2(real_gmail):
    GmailAccount.objects.create(
        email=USER,
        auth_method="oauth2",
        client_id=os.environ.get("GMAIL_LIVE_CLIENT_ID", ""),
        client_secret=os.environ.get("GMAIL_LIVE_CLIENT_SECRET", ""),
        refresh_token=os.environ["GMAIL_LIVE_REFRESH_TOKEN"],
        is_default=True,
    )
    message = EmailMessage("django-gmail-smtp live test (XOAUTH2)", "live", USER, [TO])
    assert GmailSMTPBackend().send_messages([message]) == 1
