"""OAuth2 (XOAUTH2) accounts: tokens refreshed through the sandbox's token endpoint, kept
encrypted, retried once when Gmail rejects them, and clear errors when Google refuses.
Connect with Google (admin and `gmail_smtp authorize`) stores a grant only from the account's
own Google user, and a forged answer cannot cancel a pending connection."""

from __future__ import annotations

import base64
import io
import json
import re
import smtplib
import threading
import time
from datetime import timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from django.core.mail import send_mail
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from django_gmail_smtp.exceptions import (
    AuthenticationError,
    ConsentRequired,
    GmailSMTPError,
    OAuthClientError,
)
from django_gmail_smtp.models import GmailAccount

from .conftest import APP_PASSWORD
from .factories import CLIENT_ID, CLIENT_SECRET, OAUTH_USER, make_oauth_account, raw_columns
from .processes import wait_for

pytestmark = pytest.mark.django_db

USER = OAUTH_USER
TO = "to@example.net"
SERVICE_ACCOUNT = "mailer@project.iam.gserviceaccount.com"


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


# --- Connect with Google: who consented ----------------------------------------------------------

OTHER = "someone-else@example.com"
CALLBACK = "admin:django_gmail_smtp_oauth_callback"


def start_connect(client, account: GmailAccount) -> str:
    """Press Connect with Google; return the consent URL the admin redirects to."""
    url = reverse("admin:django_gmail_smtp_gmailaccount_connect", args=[account.pk])
    response = client.post(url)
    assert response.status_code == 302, response.content[:500]
    return response["Location"]


def consent(url: str, authuser: str | None = None) -> str:
    """The browser at the sandbox's consent page (as ``authuser``); returns the redirect."""
    if authuser:
        url += "&" + urlencode({"authuser": authuser})
    response = requests.get(url, allow_redirects=False, timeout=5)
    assert response.status_code == 302, response.text
    return response.headers["Location"]


def callback_page(client, url: str) -> str:
    return client.get(url, follow=True).content.decode()


@pytest.mark.parametrize("chosen_by", ["consent_page", "sandbox"])
def test_connect_as_another_google_user_is_refused_and_keeps_the_token(
    sandbox, admin_client, chosen_by
):
    """Consenting as another Google user stores nothing: the working token still sends."""
    account = make_oauth_account(sandbox)
    old_token = account.refresh_token
    sandbox.add_user(OTHER)
    url = start_connect(admin_client, account)
    assert parse_qs(urlsplit(url).query)["scope"] == ["https://mail.google.com/ openid email"]
    if chosen_by == "sandbox":
        sandbox.consent_user = OTHER
        page = callback_page(admin_client, consent(url))
    else:
        page = callback_page(admin_client, consent(url, authuser=OTHER))

    assert f"The Google user {OTHER} consented, but this connection was for {USER}" in page
    assert "stored credentials of oauth@example.com were kept" in page
    assert "Connected oauth@example.com" not in page
    account.refresh_from_db()
    assert account.refresh_token == old_token
    assert account.health == GmailAccount.Health.UNKNOWN
    assert _send() == 1  # not 535: the old grant is still in place
    assert sandbox.deliveries[0].user == USER


def test_connect_as_the_account_itself_is_accepted(sandbox, admin_client):
    account = make_oauth_account(sandbox)
    old_token = account.refresh_token
    page = callback_page(admin_client, consent(start_connect(admin_client, account), USER.upper()))
    assert f"Connected {USER} with Google" in page
    account.refresh_from_db()
    assert account.refresh_token != old_token
    assert _send() == 1


def test_connect_as_a_configured_send_as_alias_is_accepted(sandbox, admin_client):
    """A Google user counts when the admin listed it among the account's send-as aliases."""
    sandbox.add_user(OTHER)
    account = make_oauth_account(sandbox, send_as_aliases=f"alias@example.com\n{OTHER.upper()}")
    old_token = account.refresh_token
    page = callback_page(admin_client, consent(start_connect(admin_client, account), OTHER))
    assert f"Connected {USER} with Google" in page
    account.refresh_from_db()
    assert account.refresh_token != old_token


def test_connect_without_identity_is_refused(sandbox, admin_client, monkeypatch):
    """A token answer that does not say who consented (no id_token) is refused, token kept."""
    from django_gmail_smtp import credentials

    monkeypatch.setattr(credentials, "CONSENT_SCOPE", "https://mail.google.com/")
    account = make_oauth_account(sandbox)
    old_token = account.refresh_token
    page = callback_page(admin_client, consent(start_connect(admin_client, account)))
    assert "does not say which Google user consented (no id_token" in page
    assert "openid and email" in page and "were kept" in page
    account.refresh_from_db()
    assert account.refresh_token == old_token


def _jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}."


GOOD_CLAIMS = {
    "iss": "https://accounts.google.com",
    "aud": CLIENT_ID,
    "email": USER,
    "email_verified": True,
}


@pytest.mark.parametrize(
    ("id_token", "expected"),
    [
        (_jwt(GOOD_CLAIMS), None),
        (_jwt({**GOOD_CLAIMS, "iss": "accounts.google.com", "aud": [CLIENT_ID]}), None),
        (_jwt({**GOOD_CLAIMS, "aud": "another-client"}), "not issued by Google for this"),
        (_jwt({**GOOD_CLAIMS, "iss": "https://evil.example"}), "not issued by Google for this"),
        (_jwt({**GOOD_CLAIMS, "email_verified": False}), "verified email address"),
        (_jwt({k: v for k, v in GOOD_CLAIMS.items() if k != "email"}), "verified email address"),
        ("not-a-jwt", "not issued by Google for this"),
        ("", "no id_token"),
    ],
)
def test_id_token_checks(id_token, expected):
    """The id_token must come from Google, for our client, with a verified address."""
    from django_gmail_smtp.credentials import _consented_address

    account = GmailAccount(email=USER)
    if expected is None:
        assert _consented_address(account, {"id_token": id_token}, CLIENT_ID) == USER
        return
    with pytest.raises(OAuthClientError, match=re.escape(expected)) as info:
        _consented_address(account, {"id_token": id_token}, CLIENT_ID)
    assert "were kept" in str(info.value)


# --- Connect with Google: the pending state ------------------------------------------------------


def test_forged_callback_does_not_cancel_a_pending_connection(sandbox, admin_client):
    """A GET to the callback with a wrong state is refused and the real answer still works."""
    account = make_oauth_account(sandbox)
    url = start_connect(admin_client, account)
    for forged in ("state=forged&error=access_denied", "state=forged&code=4/0x", "code=4/0x"):
        page = callback_page(admin_client, reverse(CALLBACK) + "?" + forged)
        assert "does not match a connection started from this browser session" in page
    page = callback_page(admin_client, consent(url))
    assert f"Connected {USER} with Google" in page


def test_two_pending_connections_both_finish(sandbox, admin_client):
    """Two tabs: each answer finds its own pending connection."""
    first = make_oauth_account(sandbox)
    sandbox.add_user(OTHER)
    second = GmailAccount.objects.create(
        email=OTHER, auth_method="oauth2", client_id=CLIENT_ID, client_secret=CLIENT_SECRET
    )
    urls = [start_connect(admin_client, first), start_connect(admin_client, second)]
    assert f"Connected {OTHER} with Google" in callback_page(admin_client, consent(urls[1]))
    assert f"Connected {USER} with Google" in callback_page(admin_client, consent(urls[0]))


def test_pending_connection_expires(sandbox, admin_client):
    """After 10 minutes the pending state is discarded and Google's late answer refused."""
    from django_gmail_smtp.services import SESSION_KEY

    account = make_oauth_account(sandbox)
    old_token = account.refresh_token
    url = start_connect(admin_client, account)
    session = admin_client.session
    (pending,) = session[SESSION_KEY]
    assert time.time() + 590 < pending["expires"] <= time.time() + 600
    pending["expires"] = time.time() - 1
    session[SESSION_KEY] = [pending]
    session.save()

    page = callback_page(admin_client, consent(url))
    assert "wrong, reused or expired state" in page
    assert admin_client.session[SESSION_KEY] == []
    account.refresh_from_db()
    assert account.refresh_token == old_token


# --- `gmail_smtp authorize` ----------------------------------------------------------------------


def run_authorize(email: str, *args: str) -> tuple[threading.Thread, io.StringIO, list]:
    """Start `gmail_smtp authorize EMAIL ...` in a thread; return it, its output and errors."""
    out, errors = io.StringIO(), []

    def run():
        try:
            call_command(
                "gmail_smtp",
                "authorize",
                email,
                "--no-browser",
                "--timeout",
                "20",
                *args,
                stdout=out,
            )
        except Exception as exc:  # checked by the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: "/authorize?" in out.getvalue(), 10, "the consent URL to be printed")
    return thread, out, errors


def consent_url(out: io.StringIO) -> str:
    return re.search(r"(http://\S+/authorize\?\S+)", out.getvalue()).group(1)


@pytest.mark.django_db(transaction=True)
def test_authorize_command_loopback_flow(sandbox, settings):
    """`gmail_smtp authorize EMAIL` runs the consent flow with a loopback redirect."""
    sandbox.add_user("new@example.com", app_password=APP_PASSWORD)
    sandbox.add_oauth_client("desktop-client", "desktop-secret")
    thread, out, errors = run_authorize(
        "new@example.com", "--client-id", "desktop-client", "--client-secret", "desktop-secret"
    )
    # The "browser": the sandbox consents and redirects to the command's loopback server.
    page = requests.get(consent_url(out), timeout=5)
    assert "You can close this tab" in page.text
    thread.join(20)
    assert not errors, errors
    account = GmailAccount.objects.get(email="new@example.com")
    assert account.auth_method == "oauth2" and account.refresh_token
    assert "Connected new@example.com with Google" in out.getvalue()
    # The account now sends through XOAUTH2.
    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
    assert send_mail("s", "b", "new@example.com", ["t@example.net"]) == 1
    assert sandbox.deliveries[0].user == "new@example.com"


@pytest.mark.django_db(transaction=True)
def test_authorize_command_refuses_another_google_user(sandbox):
    """The command keeps the stored token (and client) when another Google user consents."""
    account = make_oauth_account(sandbox)
    old_token = account.refresh_token
    sandbox.add_user(OTHER)
    sandbox.add_oauth_client("desktop-client", "desktop-secret")
    thread, out, errors = run_authorize(
        USER, "--client-id", "desktop-client", "--client-secret", "desktop-secret"
    )
    page = requests.get(consent_url(out) + "&" + urlencode({"authuser": OTHER}), timeout=5)
    assert page.status_code == 200
    thread.join(20)
    assert not thread.is_alive()
    (error,) = errors
    assert isinstance(error, CommandError)
    assert f"The Google user {OTHER} consented, but this connection was for {USER}" in str(error)
    assert "were kept" in str(error)
    account.refresh_from_db()
    assert account.refresh_token == old_token and account.client_id == CLIENT_ID
    assert account.client_secret == CLIENT_SECRET
    assert _send() == 1


@pytest.mark.django_db(transaction=True)
def test_authorize_command_creates_no_account_for_another_google_user(sandbox):
    sandbox.add_user("new@example.com")
    sandbox.add_user(OTHER)
    sandbox.consent_user = OTHER
    sandbox.add_oauth_client("desktop-client", "desktop-secret")
    thread, out, errors = run_authorize(
        "new@example.com", "--client-id", "desktop-client", "--client-secret", "desktop-secret"
    )
    requests.get(consent_url(out), timeout=5)
    thread.join(20)
    assert errors and "consented, but this connection was for new@example.com" in str(errors[0])
    assert not GmailAccount.objects.filter(email="new@example.com").exists()


def test_failed_authorize_leaves_no_account(sandbox):
    """A refused code exchange (wrong client secret) creates no account."""
    sandbox.add_user("new@example.com", app_password=APP_PASSWORD)
    sandbox.add_oauth_client("cid", "right-secret")
    thread, out, errors = run_authorize(
        "new@example.com", "--client-id", "cid", "--client-secret", "wrong-secret"
    )
    requests.get(consent_url(out), timeout=5)
    thread.join(20)
    assert errors and "Not connected" in str(errors[0])
    assert not GmailAccount.objects.filter(email="new@example.com").exists()


@pytest.mark.django_db(transaction=True)
def test_authorize_command_ignores_a_forged_loopback_answer(sandbox):
    """A request to the loopback port with another state cannot end or cancel the sign-in."""
    sandbox.add_user("new@example.com")
    sandbox.add_oauth_client("desktop-client", "desktop-secret")
    thread, out, errors = run_authorize(
        "new@example.com", "--client-id", "desktop-client", "--client-secret", "desktop-secret"
    )
    url = consent_url(out)
    loopback = parse_qs(urlsplit(url).query)["redirect_uri"][0]
    for forged in ("state=forged&error=access_denied", "code=4/0x", "state=&code=4/0x"):
        assert requests.get(f"{loopback}?{forged}", timeout=5).status_code == 400
    assert thread.is_alive()
    page = requests.get(url, timeout=5)
    assert "You can close this tab" in page.text
    thread.join(20)
    assert not errors, errors
    account = GmailAccount.objects.get(email="new@example.com")
    assert account.auth_method == "oauth2" and account.refresh_token
