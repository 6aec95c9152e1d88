"""Quota: rolling 24-hour limits per account, enforced before anything reaches Gmail."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from django.core.mail import EmailMessage, send_mail
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone as django_timezone

from django_gmail_smtp import quota
from django_gmail_smtp.clock import DatabaseNow, db_now
from django_gmail_smtp.exceptions import QuotaExceeded, TooManyRecipients
from django_gmail_smtp.models import GmailAccount, QuotaBucket, SenderQuota

from .conftest import SENDER

pytestmark = pytest.mark.django_db

START = datetime(2026, 11, 21, 12, 0, 30, tzinfo=timezone.utc)


class Clock:
    """A controllable clock for the quota window (and the sandbox's own quota)."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock(sandbox):
    c = Clock()
    quota.set_clock(c)
    sandbox.clock = lambda: c.now.timestamp()
    yield c
    quota.set_clock(None)


def send(to="to@example.net", *, sender=SENDER, priority=None, n=1):
    message = EmailMessage(
        "s", "b", sender, [to] if n == 1 else [f"r{i}@x.example" for i in range(n)]
    )
    if priority:
        message.gmail_priority = priority
    return message.send()


def test_presets_and_overrides():
    account = GmailAccount(email="a@example.com")
    assert account.limits() == quota.Limits(messages=500, recipients=None, per_message=100)
    account.limits_preset = "workspace"
    assert account.limits() == quota.Limits(
        messages=2000, recipients=10000, per_message=100, external_recipients=2000
    )
    account.limits_preset = "workspace_trial"
    assert account.limits().messages == 500
    account.daily_limit, account.daily_recipient_limit = 1500, 3000
    assert account.limits() == quota.Limits(
        messages=1500, recipients=3000, per_message=100, external_recipients=500
    )


def test_zero_daily_limit_means_zero(account):
    account.daily_limit = 0
    assert account.limits().messages == 0
    with pytest.raises(QuotaExceeded):
        quota.reserve(account, 1)


def test_message_limit_refuses_with_next_slot(account, sandbox, clock):
    account.daily_limit = 3
    account.save()
    for _ in range(3):
        assert send() == 1
        clock.advance(minutes=10)
    with pytest.raises(QuotaExceeded) as info:
        send()
    error = info.value
    assert error.limit == "messages"
    assert error.account == SENDER
    # The first send (12:00) leaves the window 24 hours after its minute ends.
    assert error.next_slot_at == datetime(2026, 11, 22, 12, 1, tzinfo=timezone.utc)
    assert "sender@example.com has used 3 of the 3 messages" in str(error)
    assert "2026-11-22 12:01" in str(error)
    assert len(sandbox.deliveries) == 3


def test_fail_silently_hides_quota_exceeded(account, sandbox, clock):
    account.daily_limit = 1
    account.save()
    assert send_mail("a", "b", SENDER, ["t@example.net"], fail_silently=True) == 1
    assert send_mail("a", "b", SENDER, ["t@example.net"], fail_silently=True) == 0
    assert len(sandbox.deliveries) == 1


def test_recipient_limit(account, sandbox, clock):
    account.limits_preset = "workspace"
    account.daily_recipient_limit = 5
    account.save()
    assert send(n=2) == 1
    assert send(n=2) == 1
    with pytest.raises(QuotaExceeded) as info:
        send(n=2)
    assert info.value.limit == "recipients"
    assert send(n=1) == 1  # one more recipient still fits
    status = account.quota_status()
    assert (status.messages_used, status.recipients_used) == (3, 5)


def test_per_message_limit(account, sandbox, clock):
    account.per_message_recipient_limit = 3
    account.save()
    with pytest.raises(TooManyRecipients, match="at most 3 per message"):
        send(n=4)
    assert sandbox.deliveries == []
    assert account.quota_status().messages_used == 0


def test_transactional_share_is_kept_from_bulk(account, sandbox, clock, settings):
    account.daily_limit = 10
    account.save()
    for _ in range(9):
        assert send(priority="bulk") == 1
    with pytest.raises(QuotaExceeded, match="bulk mail may not use the share"):
        send(priority="bulk")
    assert send() == 1  # a password reset still goes out
    with pytest.raises(QuotaExceeded):
        send()
    status = account.quota_status()
    assert status.bulk_messages_limit == 9
    assert status.messages_used == 10


def test_bulk_priority_per_connection(account, sandbox, clock):
    from django_gmail_smtp.backends import GmailSMTPBackend

    account.daily_limit = 2
    account.save()
    settings_share = quota.reserved_share()
    assert settings_share == 0.1
    backend = GmailSMTPBackend(priority="bulk")
    assert backend.send_messages([EmailMessage("s", "b", SENDER, ["t@example.net"])]) == 1
    with pytest.raises(QuotaExceeded):  # floor(2 * 0.9) == 1 for bulk
        backend.send_messages([EmailMessage("s", "b", SENDER, ["t@example.net"])])


def test_window_rolls_over(account, sandbox, clock):
    account.daily_limit = 2
    account.save()
    send()
    clock.advance(hours=1)
    send()
    with pytest.raises(QuotaExceeded):
        send()
    clock.advance(hours=23, minutes=1)  # the first send has left the window
    assert send() == 1
    with pytest.raises(QuotaExceeded) as info:
        send()
    assert info.value.next_slot_at == START.replace(second=0) + timedelta(hours=25, minutes=1)


def test_gmail_550_marks_account_exhausted_and_is_not_counted(account, sandbox, clock):
    sandbox.set_quota(SENDER, messages=1)
    assert send() == 1
    with pytest.raises(QuotaExceeded) as info:
        send()
    assert info.value.smtp_code == 550
    assert info.value.next_slot_at == START + timedelta(hours=24)  # when sending resumes
    status = account.quota_status()
    assert status.messages_used == 1  # the refused message was released
    # The ledger had room Gmail disagreed with: blocked for 24 hours from the rejection.
    assert status.exhausted_until == START + timedelta(hours=24)
    connections = sandbox.stats.connections
    with pytest.raises(QuotaExceeded, match="blocked by Gmail's sending limit"):
        send()
    assert sandbox.stats.connections == connections  # nothing else was tried
    clock.advance(hours=24, seconds=1)
    sandbox.set_quota(SENDER, messages=None)
    assert send() == 1


def test_gmail_550_after_data(account, sandbox, clock):
    sandbox.set_quota(SENDER, messages=0)
    sandbox.quota_phase = "data"
    with pytest.raises(QuotaExceeded):
        send()
    assert account.quota_status().exhausted_until is not None
    assert account.quota_status().messages_used == 0


def test_exhausted_until_oldest_send_leaves_when_ledger_agrees(account, sandbox, clock):
    account.daily_limit = 2
    account.save()
    send()
    clock.advance(hours=2)
    send()
    until = quota.mark_exhausted(account, "550 5.4.5 Daily user sending limit exceeded.")
    assert until == START.replace(second=0) + timedelta(hours=24, minutes=1)


def test_failover_to_another_account_for_the_same_from(sandbox, make_account, clock):
    first = make_account(sandbox, "a@example.com", aliases=["team@example.com"], daily_limit=1)
    make_account(sandbox, "b@example.com", aliases=["team@example.com"], is_default=False)
    assert send(sender="team@example.com") == 1
    assert send(sender="team@example.com") == 1
    assert [d.user for d in sandbox.deliveries] == ["a@example.com", "b@example.com"]
    assert first.quota_status().messages_used == 1


def test_no_failover_for_another_from(sandbox, make_account, clock):
    make_account(sandbox, "a@example.com", daily_limit=1)
    make_account(sandbox, "b@example.com", is_default=False)
    send(sender="a@example.com")
    with pytest.raises(QuotaExceeded):
        send(sender="a@example.com")


def test_reservation_released_when_send_fails(account, sandbox, clock):
    from django_gmail_smtp.exceptions import TemporaryError

    sandbox.fault("mail", reply="421 4.7.0 Temporary System Problem. Try again later.")
    with pytest.raises(TemporaryError):
        send()
    assert account.quota_status().messages_used == 0
    assert send() == 1
    assert account.quota_status().messages_used == 1


def test_status_and_next_slot(account, sandbox, clock):
    status = account.quota_status()
    assert (status.messages_used, status.messages_limit) == (0, 500)
    assert status.next_slot_at is None and status.exhausted_until is None
    send(n=3)
    clock.advance(minutes=5)
    status = account.quota_status()
    assert status.messages_remaining == 499
    assert status.recipients_used == 3 and status.recipients_remaining is None
    assert status.next_slot_at == START.replace(second=0) + timedelta(hours=24, minutes=1)


def test_old_buckets_are_pruned_into_daily_totals(account, sandbox, clock):
    from django_gmail_smtp.models import QuotaDay

    for _ in range(3):
        send(n=2)
        clock.advance(hours=13)
    assert QuotaBucket.objects.count() == 2  # the first bucket left the window and was pruned
    assert SenderQuota.objects.get().address == SENDER
    (day,) = QuotaDay.objects.all()
    assert (day.day, day.messages, day.recipients) == (START.date(), 1, 2)


def test_db_now_reads_the_database_clock(account):
    """db_now(): the database's time, aware UTC with USE_TZ; the same as a query expression."""
    moment = db_now()
    assert moment.utcoffset() == timedelta(0)
    assert abs(moment - django_timezone.now()) < timedelta(seconds=5)  # the server is local
    assert abs(quota.now() - moment) < timedelta(seconds=5)  # no test clock: the database's
    SenderQuota.objects.create(address=SENDER)
    (annotated,) = SenderQuota.objects.annotate(t=DatabaseNow()).values_list("t", flat=True)
    assert timedelta(0) <= annotated - moment < timedelta(seconds=5)


def test_db_now_without_use_tz_is_naive_local_time(account, settings):
    """With USE_TZ = False, the database's time is naive, in TIME_ZONE, like stored values."""
    settings.USE_TZ = False
    settings.TIME_ZONE = "Asia/Kathmandu"  # +05:45: no coincidence with UTC or whole hours
    moment = db_now()
    local = datetime.now(timezone.utc).astimezone(ZoneInfo("Asia/Kathmandu"))
    assert moment.tzinfo is None
    assert abs(moment - local.replace(tzinfo=None)) < timedelta(seconds=5)
    quota.reserve(account, 2)
    bucket = QuotaBucket.objects.get()
    assert abs(bucket.minute - moment) < timedelta(minutes=2)
    status = quota.quota_status(account)
    assert (status.messages_used, status.recipients_used) == (1, 2)


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
    account.token_expiry = _from_google(django_timezone.datetime.utcnow() + timedelta(hours=1))
    assert _token_valid(account)
    account.token_expiry = _from_google(django_timezone.datetime.utcnow() - timedelta(minutes=1))
    assert not _token_valid(account)


def test_window_uses_the_database_clock_not_the_process_clock(account, monkeypatch):
    """A process whose clock runs 2 h ahead still counts sends from 23 h 30 min ago."""
    account.daily_limit = 3
    account.save()
    head = SenderQuota.objects.create(address=SENDER)
    minute = db_now().replace(second=0, microsecond=0)
    earlier = QuotaBucket.objects.create(
        quota=head, minute=minute - timedelta(hours=23, minutes=30), messages=3, recipients=3
    )
    real_now = django_timezone.now
    monkeypatch.setattr(django_timezone, "now", lambda: real_now() + timedelta(hours=2))
    with pytest.raises(QuotaExceeded):
        quota.reserve(account, 1)
    assert QuotaBucket.objects.filter(pk=earlier.pk).exists()


def test_pruning_never_passes_the_database_clock(account):
    """A clock ahead of the database's (here a test clock) prunes nothing still in the window,
    nor a bucket in the future (left by a clock that ran ahead, then went back)."""
    head = SenderQuota.objects.create(address=SENDER)
    real = db_now()
    minute = real.replace(second=0, microsecond=0)
    kept = minute - timedelta(hours=23, minutes=30)
    future = minute + timedelta(hours=3)
    for at in (kept, future, minute - timedelta(hours=26)):
        QuotaBucket.objects.create(quota=head, minute=at, messages=1, recipients=1)
    quota.set_clock(lambda: real + timedelta(hours=2))
    try:
        reservation = quota.reserve(account, 1)  # a new minute: prunes what left the window
    finally:
        quota.set_clock(None)
    minutes = set(QuotaBucket.objects.values_list("minute", flat=True))
    assert minutes == {kept, future, reservation.minute}
    assert quota.quota_status(account).messages_used == 3  # by the database's clock


def test_reserve_costs_constant_queries(account, clock):
    """Check-and-reserve issues the same few queries whatever the size of the history."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    quota_row = SenderQuota.objects.create(address=SENDER)
    base = START.replace(second=0)
    counts = []
    for history in (10, 1400):  # the window holds at most 1,440 minute buckets
        QuotaBucket.objects.all().delete()
        QuotaBucket.objects.bulk_create(
            QuotaBucket(quota=quota_row, minute=base - timedelta(minutes=i), messages=0)
            for i in range(1, history)
        )
        with CaptureQueriesContext(connection) as first:
            quota.reserve(account, 1)  # a new minute: creates its bucket, prunes old ones
        with CaptureQueriesContext(connection) as second:
            quota.reserve(account, 1)  # the same minute: updates its bucket
        counts.append((len(first), len(second)))
    assert counts[0] == counts[1]
    assert counts[0][0] <= 8 and counts[0][1] <= 6  # including SAVEPOINT / RELEASE


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


def test_quota_command_table(account, sandbox, clock, make_account, capsys):
    make_account(sandbox, "b@example.com", is_default=False, limits_preset="workspace")
    send(n=2)
    send(n=1, priority="bulk")
    out = __import__("io").StringIO()
    call_command("gmail_smtp", "quota", stdout=out)
    text = out.getvalue()
    lines = {line.split()[0]: line for line in text.splitlines() if "@" in line.split()[0]}
    assert "2/500" in lines[SENDER] and "3 (no limit)" in lines[SENDER]
    assert "0/2000" in lines["b@example.com"] and "0/10000" in lines["b@example.com"]
    assert "ACCOUNT" in text and "NOW" in text
    # Not at its limit: the room left, never a "next slot" that reads as blocked.
    assert "room for 498 messages now" in lines[SENDER]
    assert "room for 2000 messages now" in lines["b@example.com"]
