"""The account services (django_gmail_smtp.services) on the Gmail sandbox, over real sockets."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.fernet import Fernet
from django.utils import timezone

from django_gmail_smtp import services
from django_gmail_smtp.exceptions import AuthenticationError
from django_gmail_smtp.models import GmailAccount, OutboundEmail

from .conftest import SENDER
from .factories import CLIENT_ID, CLIENT_SECRET, OAUTH_USER, make_oauth_account, raw_columns

pytestmark = pytest.mark.django_db

WRONG_PASSWORD = "wrongwrongwrongw"
REDIRECT = "http://testserver/admin/django_gmail_smtp/gmailaccount/oauth/callback/"


def waiting_row(account: GmailAccount) -> OutboundEmail:
    """A message deferred until its account is fixed (no next attempt of its own)."""
    return OutboundEmail.objects.create(
        status=OutboundEmail.Status.DEFERRED,
        reason=OutboundEmail.Reason.AUTH,
        account=account,
        account_email=account.email,
        from_email=account.email,
        recipients=["to@example.net"],
        mime=b"Subject: s\r\n\r\nb\r\n",
    )


def google_answer(consent_url: str) -> dict[str, str]:
    """The browser at the sandbox's consent page; the query Google sends back."""
    response = requests.get(consent_url, allow_redirects=False, timeout=5)
    assert response.status_code == 302, response.text
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    return {k: query[k][0] for k in ("state", "code", "error") if k in query}


# --- verify ------------------------------------------------------------------------------------


def test_verify_logs_in_and_records_health(account, sandbox):
    result = services.verify(account)
    assert result.ok and result.health == GmailAccount.Health.OK
    assert result.text.startswith(f"Verified {SENDER}: connected over verified TLS")
    assert sandbox.stats.logins == 1 and sandbox.deliveries == []
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.OK


def test_verify_refused_password_says_what_to_do(sandbox, make_account):
    account = make_account(sandbox, app_password=WRONG_PASSWORD)
    result = services.verify(account)
    assert not result.ok and result.health == GmailAccount.Health.CREDENTIALS_REJECTED
    assert "apppasswords" in result.text and WRONG_PASSWORD not in result.text
    # Gmail's reply is quoted and closed; the advice comes after it, introduced.
    assert 'Gmail replied: "535' in result.detail
    assert 'gsmtp". What to do: ' in result.detail


def test_explain_separates_gmails_reply_from_the_advice():
    error = AuthenticationError(
        "Gmail refused the App Password",
        code=535,
        reply="5.7.8 Username and Password not accepted. x1 - gsmtp",
        hint="Create a new App Password.",
    )
    assert services.explain(error) == (
        "Gmail refused the App Password. Gmail replied: "
        '"535 5.7.8 Username and Password not accepted. x1 - gsmtp". '
        "What to do: Create a new App Password."
    )


# --- send a test message -----------------------------------------------------------------------


def test_send_test_delivers_and_returns_gmails_reply(account, sandbox):
    result = services.send_test(account, "someone@example.net", subject="Hello")
    assert result.ok and result.sender == SENDER and result.to == "someone@example.net"
    (delivered,) = sandbox.deliveries
    assert delivered.rcpt_tos == ["someone@example.net"] and delivered.subject == "Hello"
    assert "2.0.0 OK" in result.reply and delivered.message_id in result.reply
    assert result.refused == {}


def test_send_test_without_an_address_sends_nothing(account, sandbox):
    result = services.send_test(account, "")
    assert not result.ok and "add an email address" in result.text
    assert sandbox.stats.connections == 0


def test_send_test_failure_is_a_result_not_an_exception(sandbox, make_account):
    account = make_account(sandbox, app_password=WRONG_PASSWORD)
    result = services.send_test(account, "someone@example.net")
    assert not result.ok and result.text.startswith("Test message not sent:")
    assert sandbox.deliveries == []


# --- refresh the OAuth token -------------------------------------------------------------------


def test_refresh_token_gets_a_new_access_token(sandbox):
    account = make_oauth_account(sandbox)
    result = services.refresh_token(account)
    assert result.ok and result.text.startswith(f"Refreshed {OAUTH_USER}: new access token")
    account.refresh_from_db()
    assert account.access_token in sandbox._oauth._access
    assert account.token_expiry > timezone.now()


def test_refresh_token_of_a_revoked_grant_needs_consent(sandbox):
    account = make_oauth_account(sandbox)
    sandbox.revoke(account.refresh_token)
    result = services.refresh_token(account)
    assert not result.ok and result.health == GmailAccount.Health.NEEDS_CONSENT
    assert "connected with Google again" in result.text


def test_refresh_token_of_an_app_password_account(account):
    result = services.refresh_token(account)
    assert not result.ok and not result.changed
    assert "uses an App Password" in result.text


# --- pause and resume --------------------------------------------------------------------------


def test_pause_and_resume_release_waiting_mail(account):
    row = waiting_row(account)
    paused = services.pause(account)
    assert paused.ok and paused.changed
    assert GmailAccount.objects.get(pk=account.pk).is_active is False
    assert services.pause(account).changed is False  # already paused

    resumed = services.resume(account)
    assert resumed.changed and "1 message(s) waiting for it will be sent now" in resumed.text
    assert GmailAccount.objects.get(pk=account.pk).is_active is True
    row.refresh_from_db()
    assert row.next_attempt_at is not None and row.next_attempt_at <= timezone.now()
    assert services.resume(account).changed is False


def test_save_account_with_new_credentials_resets_health_and_releases(account):
    row = waiting_row(account)
    account.mark_health(GmailAccount.Health.CREDENTIALS_REJECTED, "535")
    account.app_password = "qrstuvwxyzabcdef"
    released = services.save_account(account, credentials_changed=True, resumed=False)
    assert released == 1
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.UNKNOWN and account.health_detail == ""
    row.refresh_from_db()
    assert row.next_attempt_at is not None


# --- Connect with Google -----------------------------------------------------------------------


def test_connect_start_and_finish_through_pending_state(sandbox):
    account = make_oauth_account(sandbox, refresh_token="")
    session: dict = {}
    pending = services.PendingConnects(session)
    flow = services.start_connect(account, REDIRECT, pending=pending)
    assert len(session[services.SESSION_KEY]) == 1
    params = parse_qs(urlsplit(flow.url).query)
    assert params["login_hint"] == [OAUTH_USER] and params["redirect_uri"] == [REDIRECT]

    answer = google_answer(flow.url)
    result = services.finish_pending_connect(pending, **answer)
    assert result.ok and result.account == account
    assert result.text.startswith(f"Connected {OAUTH_USER} with Google")
    account.refresh_from_db()
    assert account.refresh_token and account.auth_method == GmailAccount.AuthMethod.OAUTH2
    assert session[services.SESSION_KEY] == []  # a state is used once
    again = services.finish_pending_connect(pending, **answer)
    assert not again.ok and again.account is None and "wrong, reused or expired" in again.text


def test_a_forged_answer_leaves_the_pending_connection(sandbox):
    account = make_oauth_account(sandbox, refresh_token="")
    pending = services.PendingConnects({})
    flow = services.start_connect(account, REDIRECT, pending=pending)
    forged = services.finish_pending_connect(pending, state="forged", error="access_denied")
    assert not forged.ok and "does not match" in forged.text
    assert services.finish_pending_connect(pending, **google_answer(flow.url)).ok


def test_pending_connection_expires(sandbox):
    account = make_oauth_account(sandbox, refresh_token="")
    session: dict = {}
    pending = services.PendingConnects(session)
    flow = services.start_connect(account, REDIRECT, pending=pending)
    (entry,) = session[services.SESSION_KEY]
    assert time.time() + 590 < entry["expires"] <= time.time() + 600
    entry["expires"] = time.time() - 1
    result = services.finish_pending_connect(pending, **google_answer(flow.url))
    assert not result.ok and session[services.SESSION_KEY] == []
    account.refresh_from_db()
    assert account.refresh_token == ""


def test_at_most_five_pending_connections(sandbox):
    account = make_oauth_account(sandbox, refresh_token="")
    session: dict = {}
    pending = services.PendingConnects(session)
    flows = [services.start_connect(account, REDIRECT, pending=pending) for _ in range(6)]
    assert len(session[services.SESSION_KEY]) == services.MAX_PENDING_CONNECTS
    assert pending.take(flows[0].state) is None and pending.take(flows[-1].state) is not None


def test_finish_connect_reports_a_refusal_and_changes_nothing(sandbox):
    account = make_oauth_account(sandbox, refresh_token="")
    flow = services.start_connect(account, REDIRECT)
    result = services.finish_connect(account, flow, state=flow.state, error="access_denied")
    assert not result.ok
    assert result.text == (
        f"Google did not connect {OAUTH_USER}: the Google user declined to grant access. "
        "Nothing was changed."
    )
    wrong_state = services.finish_connect(account, flow, state="other", code="4/0x")
    assert not wrong_state.ok and "does not match this request" in wrong_state.text


def test_account_to_connect_is_not_saved_until_connected(sandbox):
    account, created = services.account_to_connect(
        "New@Example.com", client_id=CLIENT_ID, client_secret=CLIENT_SECRET
    )
    assert created and account.pk is None and account.email == "new@example.com"
    assert not GmailAccount.objects.filter(email="new@example.com").exists()


# --- encryption keys ---------------------------------------------------------------------------


def stored(account: GmailAccount) -> str:
    return raw_columns(account, "app_password")["app_password"]


def test_rotate_keys_reencrypts_with_the_first_key(sandbox, make_account, settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "ENCRYPTION_KEYS": [old]}
    account = make_account(sandbox)
    before = stored(account)
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "ENCRYPTION_KEYS": [new, old]}
    result = services.rotate_keys()
    assert result.ok and result.rotated == 1
    assert stored(account) != before
    assert services.rotate_keys().rotated == 0  # already under the new key
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "ENCRYPTION_KEYS": [new]}
    assert services.verify(GmailAccount.objects.get(pk=account.pk)).ok


def test_rotate_keys_names_what_it_cannot_read(sandbox, make_account, settings):
    settings.GMAIL_SMTP = {
        **settings.GMAIL_SMTP,
        "ENCRYPTION_KEYS": [Fernet.generate_key().decode()],
    }
    make_account(sandbox)
    settings.GMAIL_SMTP = {
        **settings.GMAIL_SMTP,
        "ENCRYPTION_KEYS": [Fernet.generate_key().decode()],
    }
    result = services.rotate_keys()
    assert not result.ok and result.rotated == 0
    (problem,) = result.unreadable
    assert problem.startswith(f"{SENDER}: the App Password cannot be decrypted")


# --- which accounts may send -------------------------------------------------------------------


def test_eligible_accounts_default_first_paused_only_when_asked(sandbox, make_account):
    first = make_account(sandbox, "a@example.com", is_default=False)
    default = make_account(sandbox, "b@example.com", is_default=True)
    paused = make_account(sandbox, "c@example.com", is_default=False, is_active=False)
    assert list(services.eligible_accounts()) == [default, first]
    assert list(services.eligible_accounts(include_paused=True)) == [default, first, paused]


def test_sender_accounts_fall_back_to_email_host_user(settings):
    if hasattr(settings, "MAILERS"):
        del settings.MAILERS  # the EMAIL_* fallback exists only without MAILERS
    settings.EMAIL_HOST_USER = "Fallback@example.com"
    settings.EMAIL_HOST_PASSWORD = "abcd efgh ijkl mnop"
    (account,) = services.sender_accounts()
    assert account.from_settings and account.email == "fallback@example.com"
    found = services.find_sender("Fallback@Example.com")
    assert found is not None and found.from_settings and found.email == account.email


def test_routing_and_default_account_agree_with_eligible_accounts(sandbox, make_account):
    from django_gmail_smtp.credentials import default_account
    from django_gmail_smtp.routing import Router

    make_account(sandbox, "a@example.com", is_default=False)
    default = make_account(sandbox, "b@example.com", is_default=True)
    make_account(sandbox, "c@example.com", is_default=False, is_active=False)
    assert Router().accounts() == list(services.eligible_accounts())
    assert Router(include_paused=True).accounts() == list(
        services.eligible_accounts(include_paused=True)
    )
    assert default_account() == default
