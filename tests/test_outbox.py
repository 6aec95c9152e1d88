"""The outbox logic, driven in-process (the real-worker tests are in test_celery_worker.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from django_gmail_smtp import outbox, signals
from django_gmail_smtp.exceptions import InvalidMessage, TooManyRecipients
from django_gmail_smtp.models import GmailAccount, OutboundEmail

from .conftest import SENDER
from .factories import broker_down, make_due, queued_row, with_keys

pytestmark = pytest.mark.django_db

Status = OutboundEmail.Status


def queue(backend, *messages, capture):
    with capture(execute=False) as callbacks:
        assert backend.send_messages(list(messages)) == len(messages)
    return callbacks


def test_queue_stores_exact_message_and_hands_id_on_commit(
    celery_backend, account, django_capture_on_commit_callbacks
):
    message = EmailMultiAlternatives(
        "Grüße", "text", SENDER, ["to@example.net"], bcc=["b@x.example"]
    )
    message.attach_alternative("<b>html</b>", "text/html")
    message.attach("a.txt", "attached", "text/plain")
    callbacks = queue(celery_backend, message, capture=django_capture_on_commit_callbacks)
    assert len(callbacks) == 1
    row = OutboundEmail.objects.get()
    assert row.status == Status.QUEUED and row.priority == "transactional"
    assert row.account == account and row.from_email == SENDER
    assert row.recipients == ["to@example.net", "b@x.example"]
    mime = bytes(row.mime)
    assert b"\r\nSubject: " in mime and b'filename="a.txt"' in mime and b"text/html" in mime
    assert b"b@x.example" not in mime.split(b"\r\n\r\n")[0]  # Bcc is not a header
    assert row.size == len(bytes(row.mime)) and message.gmail_outbound_id == row.pk


def test_rolled_back_transaction_sends_nothing(celery_backend, account, sandbox, pool):
    with pytest.raises(RuntimeError), transaction.atomic():
        celery_backend.send_messages([EmailMessage("s", "b", SENDER, ["t@example.net"])])
        raise RuntimeError("the view failed")
    assert not OutboundEmail.objects.exists()


def test_bad_input_refused_at_queue_time(celery_backend, account):
    with pytest.raises(InvalidMessage):
        celery_backend.send_messages(
            [EmailMessage("a\nBcc: x@evil.example", "b", SENDER, ["t@x.example"])]
        )
    recipients = [f"r{i}@x.example" for i in range(101)]
    with pytest.raises(TooManyRecipients):
        celery_backend.send_messages([EmailMessage("s", "b", SENDER, recipients)])
    assert not OutboundEmail.objects.exists()


def test_deliver_sends_once(
    celery_backend, account, sandbox, pool, django_capture_on_commit_callbacks
):
    sent = []
    signals.email_sent.connect(lambda **kw: sent.append(kw["outbound"].pk), weak=False)
    try:
        queue(
            celery_backend,
            EmailMessage("s", "b", SENDER, ["t@example.net"]),
            capture=django_capture_on_commit_callbacks,
        )
        row = OutboundEmail.objects.get()
        assert outbox.deliver(row.pk, pool=pool) == "sent"
        assert outbox.deliver(row.pk, pool=pool) == "skipped"  # the same task delivered twice
    finally:
        signals.email_sent.receivers.clear()
    row.refresh_from_db()
    assert row.status == Status.SENT and row.sent_at and row.gmail_reply.startswith("2.0.0 OK")
    assert len(sandbox.deliveries) == 1 and sent == [row.pk]
    (attempt,) = row.log.all()
    assert (attempt.outcome, attempt.code, attempt.account_email) == ("sent", 250, SENDER)


def test_temporary_failures_retry_with_backoff_then_succeed(
    celery_backend, account, sandbox, pool, django_capture_on_commit_callbacks
):
    queue(
        celery_backend,
        EmailMessage("s", "b", SENDER, ["t@example.net"]),
        capture=django_capture_on_commit_callbacks,
    )
    row = OutboundEmail.objects.get()
    sandbox.fault("mail", reply="421 4.7.0 Temporary System Problem. Try again later.", times=3)
    delays = []
    for _ in range(3):
        before = timezone.now()
        assert outbox.deliver(row.pk, pool=pool) == "retry"
        row.refresh_from_db()
        assert row.status == Status.QUEUED and row.reason == "retry"
        delays.append((row.next_attempt_at - before).total_seconds())
        assert outbox.deliver(row.pk, pool=pool) == "skipped"  # not due yet
        make_due(row)
    assert outbox.deliver(row.pk, pool=pool) == "sent"
    row.refresh_from_db()
    assert row.attempts == 3 and row.status == Status.SENT
    # Exponential backoff with jitter: base 10 s, doubling, each delay in [d/2, d].
    assert 5 <= delays[0] <= 10.1 and 10 <= delays[1] <= 20.1 and 20 <= delays[2] <= 40.1
    assert [a.outcome for a in row.log.all()] == ["retry", "retry", "retry", "sent"]
    assert all(a.code == 421 for a in row.log.all()[:3])


def test_too_many_temporary_failures_fail_with_reason(
    celery_backend, account, sandbox, pool, django_capture_on_commit_callbacks
):
    queue(
        celery_backend,
        EmailMessage("s", "b", SENDER, ["t@example.net"]),
        capture=django_capture_on_commit_callbacks,
    )
    row = OutboundEmail.objects.get()
    sandbox.fault("data", drop=True, times=None)
    results = []
    for _ in range(4):
        results.append(outbox.deliver(row.pk, pool=pool))
        make_due(row)
    assert results == ["retry", "retry", "retry", "failed"]
    row.refresh_from_db()
    assert row.status == Status.FAILED and row.reason == "attempts"
    assert (
        "Gave up after 4 attempts" in row.last_error and "closed the connection" in row.last_error
    )
    assert sandbox.deliveries == []


def test_quota_defers_without_counting_an_attempt(
    celery_backend, account, sandbox, pool, django_capture_on_commit_callbacks
):
    account.daily_limit = 1
    account.save()
    queue(
        celery_backend,
        EmailMessage("1", "b", SENDER, ["t@example.net"]),
        EmailMessage("2", "b", SENDER, ["t@example.net"]),
        capture=django_capture_on_commit_callbacks,
    )
    first, second = OutboundEmail.objects.order_by("pk")
    assert outbox.deliver(first.pk, pool=pool) == "sent"
    assert outbox.deliver(second.pk, pool=pool) == "deferred"
    second.refresh_from_db()
    assert second.status == Status.DEFERRED and second.reason == "quota" and second.attempts == 0
    assert second.next_attempt_at > timezone.now() + timedelta(hours=23)


def test_message_that_can_never_fit_fails_instead_of_waiting(account, sandbox, pool, no_dispatch):
    account.limits_preset, account.daily_recipient_limit = "workspace", 2
    account.save()
    row = queued_row(account, to=["a@x.example", "b@x.example", "c@x.example"])
    assert outbox.deliver(row.pk, pool=pool) == "failed"
    row.refresh_from_db()
    assert row.status == Status.FAILED and row.reason == "permanent"


def test_gmail_550_defers_and_blocks_account(
    celery_backend, account, sandbox, pool, django_capture_on_commit_callbacks
):
    sandbox.set_quota(SENDER, messages=0)
    queue(
        celery_backend,
        EmailMessage("1", "b", SENDER, ["t@example.net"]),
        capture=django_capture_on_commit_callbacks,
    )
    row = OutboundEmail.objects.get()
    assert outbox.deliver(row.pk, pool=pool) == "deferred"
    row.refresh_from_db()
    assert row.reason == "quota" and row.last_code == 550 and row.attempts == 0
    assert account.quota_status().exhausted_until == row.next_attempt_at


def test_auth_failure_defers_marks_account_and_signals(
    celery_backend, sandbox, make_account, pool, django_capture_on_commit_callbacks
):
    account = make_account(sandbox, app_password="wrongwrongwrongw")
    alerts = []
    signals.account_unhealthy.connect(lambda **kw: alerts.append(kw["account"].email), weak=False)
    try:
        queue(
            celery_backend,
            EmailMessage("1", "b", SENDER, ["t@example.net"]),
            EmailMessage("2", "b", SENDER, ["t@example.net"]),
            capture=django_capture_on_commit_callbacks,
        )
        first, second = OutboundEmail.objects.order_by("pk")
        assert outbox.deliver(first.pk, pool=pool) == "deferred"
        failures = sandbox.stats.auth_failures
        assert outbox.deliver(second.pk, pool=pool) == "deferred"
        assert sandbox.stats.auth_failures == failures  # no login retried on a known-bad account
    finally:
        signals.account_unhealthy.receivers.clear()
    assert alerts == [SENDER]
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.CREDENTIALS_REJECTED
    first.refresh_from_db()
    assert (
        first.status == Status.DEFERRED and first.reason == "auth" and first.next_attempt_at is None
    )
    assert "App Password" in first.last_error

    # Fix the account: its waiting mail becomes due and the sweeper sends it.
    account.app_password = "abcdefghijklmnop"
    account.save()
    call_command("gmail_smtp", "check", stdout=__import__("io").StringIO())
    assert OutboundEmail.objects.filter(next_attempt_at__isnull=False).count() == 2
    for row in OutboundEmail.objects.all():
        assert outbox.deliver(row.pk, pool=pool) == "sent"
    assert len(sandbox.deliveries) == 2


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


def test_permanent_refusal_fails_with_reason_and_partial_refusals_recorded(
    celery_backend, account, sandbox, pool, django_capture_on_commit_callbacks
):
    sandbox.bad_recipients.add("bad@example.net")
    queue(
        celery_backend,
        EmailMessage("all bad", "b", SENDER, ["bad@example.net"]),
        EmailMessage("one bad", "b", SENDER, ["bad@example.net", "ok@example.net"]),
        capture=django_capture_on_commit_callbacks,
    )
    all_bad, one_bad = OutboundEmail.objects.order_by("pk")
    assert outbox.deliver(all_bad.pk, pool=pool) == "failed"
    assert outbox.deliver(one_bad.pk, pool=pool) == "sent"
    all_bad.refresh_from_db()
    one_bad.refresh_from_db()
    assert all_bad.reason == "permanent" and "refused every recipient" in all_bad.last_error
    assert list(all_bad.refused_recipients) == ["bad@example.net"]
    assert list(one_bad.refused_recipients) == ["bad@example.net"]
    assert one_bad.refused_recipients["bad@example.net"][0] == 553


def test_pool_reuses_one_login_for_a_burst(
    celery_backend, account, sandbox, pool, django_capture_on_commit_callbacks
):
    queue(
        celery_backend,
        *[EmailMessage(f"{i}", "b", SENDER, ["t@example.net"]) for i in range(20)],
        capture=django_capture_on_commit_callbacks,
    )
    for row in OutboundEmail.objects.order_by("pk"):
        assert outbox.deliver(row.pk, pool=pool) == "sent"
    assert sandbox.stats.logins == 1 and sandbox.stats.connections == 1 and pool.logins == 1


def test_pool_reconnects_after_421(
    celery_backend, account, sandbox, pool, django_capture_on_commit_callbacks
):
    queue(
        celery_backend,
        *[EmailMessage(f"{i}", "b", SENDER, ["t@example.net"]) for i in range(3)],
        capture=django_capture_on_commit_callbacks,
    )
    rows = list(OutboundEmail.objects.order_by("pk"))
    assert outbox.deliver(rows[0].pk, pool=pool) == "sent"
    sandbox.fault("mail", reply="421 4.7.0 Try again later, closing connection.")
    # The reused connection got 421 before DATA: the pool reconnects once and sends.
    assert outbox.deliver(rows[1].pk, pool=pool) == "sent"
    assert outbox.deliver(rows[2].pk, pool=pool) == "sent"
    assert sandbox.stats.connections == 2 and len(sandbox.deliveries) == 3


def test_sweeper_requeues_due_stale_and_expired(
    celery_backend, account, sandbox, pool, monkeypatch
):
    dispatched = []
    monkeypatch.setattr(
        outbox, "dispatch", lambda pk, priority, countdown=None: dispatched.append(pk) or True
    )
    long_ago = timezone.now() - timedelta(hours=1)
    common = {
        "account": account,
        "account_email": SENDER,
        "from_email": SENDER,
        "recipients": ["t@x.example"],
        "mime": b"x",
    }
    never_enqueued = OutboundEmail.objects.create(**common)
    OutboundEmail.objects.filter(pk=never_enqueued.pk).update(created_at=long_ago)
    fresh = OutboundEmail.objects.create(**common)  # within the grace period: left alone
    due = OutboundEmail.objects.create(**common, status=Status.DEFERRED, next_attempt_at=long_ago)
    later = OutboundEmail.objects.create(
        **common, status=Status.DEFERRED, next_attempt_at=timezone.now() + timedelta(hours=1)
    )
    waiting_for_fix = OutboundEmail.objects.create(**common, status=Status.DEFERRED, reason="auth")
    dead_worker = OutboundEmail.objects.create(
        **common, status=Status.SENDING, lease_expires_at=long_ago
    )
    busy_worker = OutboundEmail.objects.create(
        **common, status=Status.SENDING, lease_expires_at=timezone.now() + timedelta(minutes=5)
    )
    counts = outbox.sweep()
    assert counts == {"expired_leases": 1, "due": 1, "stale_queued": 2}
    assert sorted(dispatched) == sorted([never_enqueued.pk, due.pk, dead_worker.pk])
    dead_worker.refresh_from_db()
    assert dead_worker.status == Status.QUEUED
    for row in (fresh, later, waiting_for_fix, busy_worker):
        assert row.pk not in dispatched


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


def test_broker_down_keeps_row_queued(
    celery_backend, account, settings, django_capture_on_commit_callbacks, caplog
):
    # In the test's transaction: the publisher thread could not see the row, so hand it over
    # here (test_caller_speed checks the thread's way, on committed rows).
    with_keys(settings, PUBLISH_IN_BACKGROUND=False)
    with broker_down(), django_capture_on_commit_callbacks(execute=True):
        assert (
            celery_backend.send_messages([EmailMessage("s", "b", SENDER, ["t@example.net"])]) == 1
        )
    row = OutboundEmail.objects.get()
    assert row.status == Status.QUEUED and row.enqueued_at is None
    assert "stays queued and the sweeper will send it" in caplog.text


def test_outbox_commands_retry_cancel_purge(account, celery_backend, no_dispatch):
    common = {
        "account": account,
        "account_email": SENDER,
        "from_email": SENDER,
        "recipients": ["t@x.example"],
        "mime": b"body",
    }
    failed = OutboundEmail.objects.create(**common, status=Status.FAILED, attempts=8)
    queued = OutboundEmail.objects.create(**common)
    old_sent = OutboundEmail.objects.create(
        **common, status=Status.SENT, sent_at=timezone.now() - timedelta(days=40)
    )
    recent_sent = OutboundEmail.objects.create(
        **common, status=Status.SENT, sent_at=timezone.now() - timedelta(days=10)
    )
    out = __import__("io").StringIO()
    call_command("gmail_smtp", "retry", "--status", "failed", stdout=out)
    failed.refresh_from_db()
    assert failed.status == Status.QUEUED and failed.attempts == 0
    call_command("gmail_smtp", "cancel", str(queued.pk), stdout=out)
    queued.refresh_from_db()
    assert queued.status == Status.CANCELLED
    call_command(
        "gmail_smtp", "purge", "--delete-sent-after", "30", "--drop-bodies-after", "7", stdout=out
    )
    assert not OutboundEmail.objects.filter(pk=old_sent.pk).exists()
    recent_sent.refresh_from_db()
    assert bytes(recent_sent.mime) == b"" and recent_sent.body_dropped_at is not None
    assert "Retried 1" in out.getvalue() and "Cancelled 1" in out.getvalue()


def test_retry_leaves_a_row_being_sent_alone(account, no_dispatch):
    row = queued_row(account, status=Status.FAILED)
    selection = OutboundEmail.objects.filter(pk=row.pk)
    rows = list(selection)  # the admin selected it while it was failed...
    assert outbox.claim(row.pk, "w1") is None  # (failed rows are not claimable)
    OutboundEmail.objects.filter(pk=row.pk).update(status=Status.SENDING, claimed_by="w1")
    assert outbox.retry(OutboundEmail.objects.filter(pk__in=[r.pk for r in rows])) == 0
    assert OutboundEmail.objects.get(pk=row.pk).status == Status.SENDING


def test_task_arriving_early_is_handed_back_for_the_time_left(account, dispatched):
    """A retry's task that runs before its time (timer or clock skew) is re-dispatched."""
    from datetime import timedelta

    row = OutboundEmail.objects.create(
        account=account,
        account_email=SENDER,
        from_email=SENDER,
        recipients=["t@x.example"],
        mime=b"x",
        next_attempt_at=timezone.now() + timedelta(seconds=30),
    )
    assert outbox.claim(row.pk, "w1") is None
    ((pk, countdown),) = dispatched
    assert pk == row.pk and 28 < countdown <= 30
    OutboundEmail.objects.filter(pk=row.pk).update(
        next_attempt_at=timezone.now() + timedelta(milliseconds=300)
    )
    assert outbox.claim(row.pk, "w1") is not None  # within a second of its time: taken
