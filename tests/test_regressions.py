"""Bugs found in review, each with the test that would have caught it."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.core.mail import EmailMessage, send_mail
from django.core.management import call_command
from django.db import connection, transaction
from django.urls import reverse
from django.utils import timezone

from django_gmail_smtp import outbox, quota
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.exceptions import InvalidAddress, QuotaExceeded
from django_gmail_smtp.models import GmailAccount, OutboundEmail
from django_gmail_smtp.transport import ConnectionPool, SendResult

from .conftest import APP_PASSWORD, SENDER

pytestmark = pytest.mark.django_db

Status = OutboundEmail.Status


@pytest.fixture
def no_dispatch(monkeypatch):
    monkeypatch.setattr(outbox, "dispatch", lambda pk, priority, countdown=None: True)


@pytest.fixture
def pool():
    p = ConnectionPool()
    yield p
    p.close()


def queued_row(account, **fields):
    message = EmailMessage(
        fields.pop("subject", "s"), "b", SENDER, fields.pop("to", ["t@x.example"])
    )
    CeleryGmailBackend().send_messages([message])
    row = OutboundEmail.objects.get(pk=message.gmail_outbound_id)
    if fields:
        OutboundEmail.objects.filter(pk=row.pk).update(**fields)
        row.refresh_from_db()
    return row


def test_outbox_bodies_hidden_without_their_permission(client, account, no_dispatch):
    """Reset links in stored bodies must not be readable with only the view permission."""
    row = queued_row(account, subject="Reset your password")
    user = User.objects.create_user("viewer", "v@example.net", "pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_outboundemail"))
    client.force_login(user)
    url = reverse("admin:django_gmail_smtp_outboundemail_change", args=[row.pk])
    page = client.get(url).content.decode()
    assert "Hidden: message bodies hold" in page and "srcdoc" not in page
    user.user_permissions.add(Permission.objects.get(codename="view_body_outboundemail"))
    user = User.objects.get(pk=user.pk)  # drop the permission cache
    client.force_login(user)
    assert '<pre class="gms-text">b' in client.get(url).content.decode()


@pytest.mark.skipif(
    connection.vendor == "sqlite",
    reason="SQLite: a second connection cannot commit while the first holds a read "
    "transaction, so QUOTA_DATABASE is for server databases (CI runs this on PostgreSQL)",
)
@pytest.mark.django_db(transaction=True, databases=["default", "ledger"])
def test_quota_database_keeps_reservation_when_caller_rolls_back(account, sandbox, settings):
    """With QUOTA_DATABASE on its own alias, a rolled-back request keeps the count."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "QUOTA_DATABASE": "ledger"}
    with pytest.raises(RuntimeError), transaction.atomic():
        send_mail("s", "b", SENDER, ["t@example.net"])
        raise RuntimeError("the view failed after sending")
    assert len(sandbox.deliveries) == 1
    assert account.quota_status().messages_used == 1
    # Without the separate alias the same rollback loses the count (what W006 warns about).
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "QUOTA_DATABASE": None}
    with pytest.raises(RuntimeError), transaction.atomic():
        send_mail("s", "b", SENDER, ["t@example.net"])
        raise RuntimeError("the view failed after sending")
    assert len(sandbox.deliveries) == 2
    assert account.quota_status().messages_used == 1


def test_atomic_requests_check_warns_about_the_ledger(settings):
    from django.core.checks import run_checks

    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
    settings.DATABASES = {
        **settings.DATABASES,
        "default": {**settings.DATABASES["default"], "ATOMIC_REQUESTS": True},
    }
    ids = {m.id for m in run_checks()}
    expected = "django_gmail_smtp.W006"
    if "sqlite" in settings.DATABASES["default"]["ENGINE"]:
        assert expected not in ids
    else:
        assert expected in ids


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/New_York"])
def test_without_use_tz(settings, sandbox, make_account, zone):
    """USE_TZ=False: over-quota reports cleanly and token expiry compares right."""
    settings.USE_TZ, settings.TIME_ZONE = False, zone
    account = make_account(sandbox, daily_limit=1)
    assert send_mail("1", "b", SENDER, ["t@example.net"]) == 1
    with pytest.raises(QuotaExceeded, match="next slot frees at"):
        send_mail("2", "b", SENDER, ["t@example.net"])
    assert account.quota_status().next_slot_at is not None

    from django_gmail_smtp.credentials import _from_google, _token_valid

    account.access_token = "token"
    account.token_expiry = _from_google(timezone.datetime.utcnow() + timedelta(hours=1))
    assert _token_valid(account)
    account.token_expiry = _from_google(timezone.datetime.utcnow() - timedelta(minutes=1))
    assert not _token_valid(account)


def test_admin_pages_without_use_tz(client, settings, account, sandbox):
    settings.USE_TZ = False
    send_mail("s", "b", SENDER, ["t@example.net"])
    client.force_login(User.objects.create_superuser("a", "a@example.net", "pw"))
    assert client.get(reverse("admin:django_gmail_smtp_gmailaccount_changelist")).status_code == 200
    assert client.get(reverse("admin:django_gmail_smtp_dashboard")).status_code == 200
    call_command("gmail_smtp", "quota", stdout=io.StringIO())


def test_mail_of_a_deleted_then_readded_account_is_sent(sandbox, make_account, pool, no_dispatch):
    account = make_account(sandbox)
    row = queued_row(account)
    account.delete()
    assert outbox.deliver(row.pk, pool=pool) == "deferred"
    make_account(sandbox)  # added again, same address
    # retried on the backoff (issue 8 item 9), not left waiting for a change of health
    assert OutboundEmail.objects.get(pk=row.pk).next_attempt_at is not None
    outbox.retry(OutboundEmail.objects.filter(pk=row.pk))
    assert outbox.deliver(row.pk, pool=pool) == "sent"


def test_resuming_in_the_form_releases_paused_mail(client, account, pool, no_dispatch):
    account.is_active = False
    account.save()
    row = queued_row(account)  # queued for the paused account: it waits, it is not refused
    assert outbox.deliver(row.pk, pool=pool) == "deferred"
    client.force_login(User.objects.create_superuser("a", "a@example.net", "pw"))
    url = reverse("admin:django_gmail_smtp_gmailaccount_change", args=[account.pk])
    data = {"email": SENDER, "auth_method": "app_password", "limits_preset": "gmail"}
    assert client.post(url, {**data, "is_active": "on", "is_default": "on"}).status_code == 302
    assert OutboundEmail.objects.get(pk=row.pk).next_attempt_at is not None


def test_message_that_can_never_fit_fails_instead_of_waiting(account, sandbox, pool, no_dispatch):
    account.limits_preset, account.daily_recipient_limit = "workspace", 2
    account.save()
    row = queued_row(account, to=["a@x.example", "b@x.example", "c@x.example"])
    assert outbox.deliver(row.pk, pool=pool) == "failed"
    row.refresh_from_db()
    assert row.status == Status.FAILED and row.reason == "permanent"


def test_error_between_claim_and_send_is_recorded(account, settings, pool, no_dispatch):
    row = queued_row(account)
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "RESERVED_SHARE": 2}
    assert outbox.deliver(row.pk, pool=pool) == "deferred"
    row.refresh_from_db()
    assert row.status == Status.DEFERRED and row.reason == "config"
    assert "RESERVED_SHARE" in row.last_error


def test_idn_account_logs_in_with_its_idna_name(sandbox, settings):
    sandbox.add_user("info@xn--bcher-kva.example", app_password=APP_PASSWORD)
    GmailAccount.objects.create(
        email="info@bücher.example", app_password=APP_PASSWORD, is_default=True
    )
    assert send_mail("s", "b", "info@bücher.example", ["t@example.net"]) == 1
    assert sandbox.deliveries[0].user == "info@xn--bcher-kva.example"


def test_non_ascii_password_fails_cleanly_without_the_secret(sandbox, make_account):
    make_account(sandbox, app_password="pässwordpässword")
    with pytest.raises(InvalidAddress) as info:
        send_mail("s", "b", SENDER, ["t@example.net"])
    assert "pässword" not in str(info.value) and info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_send_that_outlasted_its_lease_is_recorded_as_sent(account, no_dispatch):
    row = queued_row(account)
    claimed = outbox.claim(row.pk, "w1")
    OutboundEmail.objects.filter(pk=row.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    outbox.sweep()  # the sweeper re-queues the row while the worker is still sending
    assert OutboundEmail.objects.get(pk=row.pk).status == Status.QUEUED
    outbox.OutboxRecord(claimed, "w1").sent(account, SendResult("2.0.0 OK 1 x - gsmtp"))
    assert OutboundEmail.objects.get(pk=row.pk).status == Status.SENT


def test_retry_leaves_a_row_being_sent_alone(account, no_dispatch):
    row = queued_row(account, status=Status.FAILED)
    selection = OutboundEmail.objects.filter(pk=row.pk)
    rows = list(selection)  # the admin selected it while it was failed...
    assert outbox.claim(row.pk, "w1") is None  # (failed rows are not claimable)
    OutboundEmail.objects.filter(pk=row.pk).update(status=Status.SENDING, claimed_by="w1")
    assert outbox.retry(OutboundEmail.objects.filter(pk__in=[r.pk for r in rows])) == 0
    assert OutboundEmail.objects.get(pk=row.pk).status == Status.SENDING


def test_sweeper_sends_transactional_first(account, monkeypatch):
    order = []
    monkeypatch.setattr(outbox, "dispatch", lambda pk, p, countdown=None: order.append(p) or True)
    long_ago = timezone.now() - timedelta(hours=1)
    for priority in ("bulk", "transactional"):
        OutboundEmail.objects.create(
            account=account,
            account_email=SENDER,
            from_email=SENDER,
            recipients=["t@x.example"],
            mime=b"x",
            priority=priority,
            status=Status.DEFERRED,
            next_attempt_at=long_ago,
        )
    outbox.sweep(limit=1)
    assert order == ["transactional"]


def test_failed_authorize_leaves_no_account(sandbox):
    import threading

    import requests

    sandbox.add_user("new@example.com", app_password=APP_PASSWORD)
    sandbox.add_oauth_client("cid", "right-secret")
    out = io.StringIO()
    errors = []

    def run():
        try:
            call_command(
                "gmail_smtp", "authorize", "new@example.com", "--client-id", "cid",
                "--client-secret", "wrong-secret", "--no-browser", "--timeout", "20", stdout=out,
            )  # fmt: skip
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    import re
    import time

    deadline = time.monotonic() + 10
    while "authorize?" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    requests.get(re.search(r"(http://\S+/authorize\?\S+)", out.getvalue()).group(1), timeout=5)
    thread.join(20)
    assert errors and "Not connected" in str(errors[0])
    assert not GmailAccount.objects.filter(email="new@example.com").exists()


def test_zero_daily_limit_means_zero(account):
    account.daily_limit = 0
    assert account.limits().messages == 0
    with pytest.raises(QuotaExceeded):
        quota.reserve(account, 1)
