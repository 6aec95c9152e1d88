"""OAuth2 (XOAUTH2) accounts: tokens refreshed through the sandbox's token endpoint, kept
encrypted, retried once when Gmail rejects them, and clear errors when Google refuses."""

from __future__ import annotations

import json
import smtplib
from datetime import timedelta

import pytest
from django.core.mail import send_mail
from django.db import connection
from django.utils import timezone

from django_gmail_smtp.exceptions import (
    AuthenticationError,
    ConsentRequired,
    GmailSMTPError,
    OAuthClientError,
)
from django_gmail_smtp.models import GmailAccount

pytestmark = pytest.mark.django_db

USER = "oauth@example.com"
TO = "to@example.net"
CLIENT_ID = "123-sandbox.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-sandbox-client-secret"
SERVICE_ACCOUNT = "mailer@project.iam.gserviceaccount.com"


def make_oauth_account(sb, email: str = USER, *, client_secret: str = CLIENT_SECRET, **fields):
    """A sandbox user who consented to our OAuth client, and the GmailAccount holding the grant."""
    sb.add_user(email)
    sb.add_oauth_client(CLIENT_ID, CLIENT_SECRET)
    fields.setdefault("refresh_token", sb.issue_refresh_token(email, CLIENT_ID))
    return GmailAccount.objects.create(
        email=email,
        auth_method=GmailAccount.AuthMethod.OAUTH2,
        client_id=CLIENT_ID,
        client_secret=client_secret,
        is_default=True,
        **fields,
    )


def raw_columns(account: GmailAccount, *names: str) -> dict[str, str]:
    """The values stored in the database, bypassing the field's decryption."""
    quote = connection.ops.quote_name
    columns = ", ".join(quote(name) for name in names)
    table = quote(GmailAccount._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {columns} FROM {table} WHERE id = %s", [account.pk])
        return dict(zip(names, cursor.fetchone()))


def _send(subject: str = "Hello") -> int:
    return send_mail(subject, "Body", USER, [TO])


@pytest.mark.parametrize("tls", ["sandbox", "ssl_sandbox"])
def test_missing_access_token_is_refreshed_then_delivered(request, tls):
    """With no access token, one is fetched from the token endpoint and XOAUTH2 logs in with it."""
    sb = request.getfixturevalue(tls)
    account = make_oauth_account(sb)
    before = timezone.now()
    assert _send() == 1

    (delivered,) = sb.deliveries
    assert delivered.user == USER
    assert delivered.mechanism == "XOAUTH2"
    assert delivered.rcpt_tos == [TO]
    assert sb.stats.token_requests == 1
    assert sb.stats.logins == 1

    account.refresh_from_db()
    assert account.access_token.startswith("ya29.")
    assert account.token_expiry is not None
    assert (
        before + timedelta(minutes=55)
        < account.token_expiry
        < before + timedelta(hours=1, minutes=1)
    )
    assert account.health == GmailAccount.Health.OK


def test_refreshed_token_is_stored_encrypted(sandbox):
    """The new access token (and the refresh token) are stored as gmsenc1: ciphertext."""
    account = make_oauth_account(sandbox)
    assert _send() == 1
    account.refresh_from_db()
    raw = raw_columns(account, "access_token", "refresh_token", "client_secret")
    for name, value in raw.items():
        plain = getattr(account, name)
        assert plain, name
        assert value.startswith("gmsenc1:"), name
        assert plain not in value, name


def test_valid_stored_token_is_used_without_refreshing(sandbox):
    """A stored access token that is still valid logs in with no token request."""
    sandbox.add_user(USER)
    token = sandbox.issue_access_token(USER, expires_in=3600)
    make_oauth_account(
        sandbox, access_token=token, token_expiry=timezone.now() + timedelta(hours=1)
    )
    assert _send() == 1
    assert sandbox.stats.token_requests == 0
    assert sandbox.stats.auth_failures == 0
    assert sandbox.deliveries[0].mechanism == "XOAUTH2"


def test_token_rejected_by_gmail_is_refreshed_once_and_retried(sandbox):
    """A token Gmail rejects (334 challenge, empty answer, 535) is refreshed and retried once."""
    sandbox.add_user(USER)
    stale = sandbox.issue_access_token(USER, expires_in=3600)
    account = make_oauth_account(
        sandbox, access_token=stale, token_expiry=timezone.now() + timedelta(hours=1)
    )
    sandbox.expire_access_tokens()  # revoked early: our database still thinks it is valid

    assert _send() == 1

    stats = sandbox.stats
    assert stats.token_requests == 1
    assert stats.auth_failures == 1
    assert stats.logins == 1
    assert stats.connections == 1  # the retry happens on the same connection
    assert len(sandbox.deliveries) == 1
    account.refresh_from_db()
    assert account.access_token != stale
    assert account.health == GmailAccount.Health.OK


def test_token_rejected_twice_is_not_retried_again(sandbox):
    """If the refreshed token is rejected too, BadCredentials is raised after one retry only."""
    sandbox.add_user(USER)
    stale = sandbox.issue_access_token(USER, expires_in=3600)
    account = make_oauth_account(
        sandbox, access_token=stale, token_expiry=timezone.now() + timedelta(hours=1)
    )
    sandbox.expire_access_tokens()
    sandbox.fault("auth", reply="535 5.7.8 Username and Password not accepted.", times=None)

    with pytest.raises(AuthenticationError) as info:
        _send()
    assert isinstance(info.value, smtplib.SMTPAuthenticationError)
    assert info.value.smtp_code == 535
    assert sandbox.stats.token_requests == 1
    assert sandbox.deliveries == []
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.CREDENTIALS_REJECTED


def test_revoked_refresh_token_needs_consent(sandbox):
    """A revoked refresh token raises ConsentRequired and marks the account needs_consent."""
    account = make_oauth_account(sandbox)
    sandbox.revoke(account.refresh_token)

    with pytest.raises(ConsentRequired) as info:
        _send()
    error = info.value
    assert isinstance(error, AuthenticationError)
    assert isinstance(error, smtplib.SMTPAuthenticationError)
    assert isinstance(error, GmailSMTPError)
    assert "with google again" in str(error).lower()
    assert "invalid_grant" in str(error) or "revoked" in str(error)
    assert sandbox.deliveries == []
    assert sandbox.stats.logins == 0
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.NEEDS_CONSENT


def test_rotated_refresh_token_is_saved(sandbox):
    """When Google returns a new refresh token (and kills the old one), the new one is saved."""
    sandbox.rotate_refresh_tokens = True
    account = make_oauth_account(sandbox)
    old = account.refresh_token
    assert _send("first") == 1

    account.refresh_from_db()
    assert account.refresh_token and account.refresh_token != old
    raw = raw_columns(account, "refresh_token")["refresh_token"]
    assert raw.startswith("gmsenc1:") and account.refresh_token not in raw

    # Only the saved token can refresh now: force another refresh and send again.
    GmailAccount.objects.filter(pk=account.pk).update(access_token="", token_expiry=None)
    assert _send("second") == 1
    assert sandbox.stats.token_requests == 2
    assert [d.subject for d in sandbox.deliveries] == ["first", "second"]


def test_wrong_client_secret_is_oauth_client_error(sandbox):
    """A wrong client secret raises OAuthClientError telling where to copy the right one."""
    account = make_oauth_account(sandbox, client_secret="GOCSPX-wrong-secret")
    with pytest.raises(OAuthClientError) as info:
        _send()
    error = info.value
    assert isinstance(error, AuthenticationError)
    assert isinstance(error, smtplib.SMTPAuthenticationError)
    assert "invalid_client" in str(error)
    assert "Google Cloud console" in str(error)
    assert sandbox.deliveries == []
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.CREDENTIALS_REJECTED


def test_service_account_sends_as_the_user(sandbox):
    """A Workspace service account with domain-wide delegation sends as the account's user."""
    sandbox.add_user("worker@corp.example")
    key = sandbox.add_service_account(SERVICE_ACCOUNT)
    GmailAccount.objects.create(
        email="worker@corp.example",
        auth_method=GmailAccount.AuthMethod.SERVICE_ACCOUNT,
        service_account_key=json.dumps(key),
        is_default=True,
    )
    assert send_mail("From a robot", "Body", "worker@corp.example", [TO]) == 1
    (delivered,) = sandbox.deliveries
    assert delivered.user == "worker@corp.example"
    assert delivered.mechanism == "XOAUTH2"
    assert sandbox.stats.token_requests == 1


def test_service_account_for_unknown_user_is_a_clear_error(sandbox):
    """A service account asked to act for a user Google does not know raises OAuthClientError."""
    key = sandbox.add_service_account(SERVICE_ACCOUNT)
    account = GmailAccount.objects.create(
        email="nobody@corp.example",
        auth_method=GmailAccount.AuthMethod.SERVICE_ACCOUNT,
        service_account_key=json.dumps(key),
        is_default=True,
    )
    with pytest.raises(OAuthClientError) as info:
        send_mail("s", "b", "nobody@corp.example", [TO])
    text = str(info.value)
    assert isinstance(info.value, smtplib.SMTPAuthenticationError)
    assert "nobody@corp.example" in text
    assert "Domain-wide delegation" in text
    assert "user of that domain" in text
    assert sandbox.deliveries == []
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.CREDENTIALS_REJECTED
