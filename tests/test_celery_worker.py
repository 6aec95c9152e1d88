"""The Celery backend with real worker processes, a real broker and the sandbox.

The broker is Redis when REDIS_URL is set (CI), else the embedded atomicfs:// broker; the worker
shares the test database (SQLite file or PostgreSQL).
"""

from __future__ import annotations

import pytest
from django.core.mail import EmailMessage, send_mail
from django.db import transaction

from django_gmail_smtp import outbox, publisher
from django_gmail_smtp.models import OutboundEmail

from .conftest import SENDER
from .factories import all_sent, broker_down, wait_until
from .processes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

Status = OutboundEmail.Status


def tasks_finished(worker, n):
    """True once the worker has run ``n`` tasks to the end (polled, never slept for)."""
    return lambda: worker.log().count("] succeeded in ") >= n


def test_worker_sends_queued_mail_once(account, sandbox, start_worker):
    start_worker()
    with transaction.atomic():
        assert send_mail("Hello", "from the outbox", SENDER, ["to@example.net"]) == 1
    wait_until(all_sent(1), what="the message to be sent")
    (delivered,) = sandbox.deliveries
    assert delivered.message["Subject"] == "Hello"
    row = OutboundEmail.objects.get()
    assert row.gmail_reply.startswith("2.0.0 OK") and row.sent_at is not None


def test_rolled_back_transaction_sends_nothing(account, sandbox, start_worker):
    start_worker()
    with pytest.raises(RuntimeError), transaction.atomic():
        send_mail("never", "b", SENDER, ["to@example.net"])
        raise RuntimeError("the view failed")
    assert not OutboundEmail.objects.exists()
    # One worker process takes the queue in order: once a message sent after the rollback is
    # delivered, a task the rolled-back one had wrongly dispatched would have run too.
    send_mail("after", "b", SENDER, ["to@example.net"])
    wait_until(all_sent(1), what="the message sent after the rollback")
    assert [d.message["Subject"] for d in sandbox.deliveries] == ["after"]


def test_burst_costs_one_login(account, sandbox, start_worker):
    start_worker()
    messages = [EmailMessage(f"m{i}", "b", SENDER, ["to@example.net"]) for i in range(30)]
    from django.core.mail import get_connection

    get_connection().send_messages(messages)
    wait_until(all_sent(30), what="30 messages")
    assert len(sandbox.deliveries) == 30
    assert sandbox.stats.logins == 1 and sandbox.stats.connections == 1


def test_same_task_delivered_twice_sends_once(account, sandbox, start_worker, queues):
    from django_gmail_smtp.tasks import send_outbound_email

    worker = start_worker()
    send_mail("twice", "b", SENDER, ["to@example.net"])  # its own task, on commit
    row = OutboundEmail.objects.get()
    send_outbound_email.apply_async((row.pk,), queue=queues["transactional"])
    send_outbound_email.apply_async((row.pk,), queue=queues["transactional"])
    wait_until(all_sent(1))
    wait_for(tasks_finished(worker, 3), 30, lambda: f"the three tasks to run:\n{worker.log()}")
    assert len(sandbox.deliveries) == 1


@pytest.mark.parametrize(
    "phase", ["connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "after_data"]
)
def test_dropped_connection_is_retried_and_sent_once(phase, account, sandbox, start_worker):
    sandbox.fault(phase, drop=True, times=1)
    start_worker()
    send_mail(f"drop at {phase}", "b", SENDER, ["to@example.net"])
    wait_until(all_sent(1), what=f"the message after a drop at {phase}")
    assert len(sandbox.deliveries) == 1
    row = OutboundEmail.objects.get()
    assert row.attempts == 1
    assert [a.outcome for a in row.log.all()] == ["retry", "sent"]


def test_421_three_times_then_success(account, sandbox, start_worker):
    sandbox.fault("mail", reply="421 4.7.0 Temporary System Problem. Try again later.", times=3)
    start_worker()
    send_mail("421s", "b", SENDER, ["to@example.net"])
    wait_until(all_sent(1))
    row = OutboundEmail.objects.get()
    assert row.attempts == 3 and len(sandbox.deliveries) == 1
    assert [a.code for a in row.log.all()] == [421, 421, 421, 250]


def test_gmail_daily_limit_defers(account, sandbox, start_worker):
    sandbox.set_quota(SENDER, messages=0)
    start_worker()
    send_mail("limit", "b", SENDER, ["to@example.net"])
    wait_until(lambda: OutboundEmail.objects.filter(status=Status.DEFERRED).exists())
    row = OutboundEmail.objects.get()
    assert row.reason == "quota" and row.last_code == 550 and row.attempts == 0
    assert sandbox.deliveries == []


def test_expired_access_token_is_refreshed(sandbox, start_worker, db):
    from datetime import timedelta

    from django.utils import timezone

    from django_gmail_smtp.models import GmailAccount

    sandbox.add_user("oauth@example.com", app_password="abcdefghijklmnop")
    sandbox.add_oauth_client("client-1", "secret-1")
    GmailAccount.objects.create(
        email="oauth@example.com",
        auth_method="oauth2",
        client_id="client-1",
        client_secret="secret-1",
        refresh_token=sandbox.issue_refresh_token("oauth@example.com", "client-1"),
        access_token="expired-token",
        token_expiry=timezone.now() - timedelta(minutes=5),
        is_default=True,
    )
    start_worker()
    send_mail("oauth", "b", "oauth@example.com", ["to@example.net"])
    wait_until(all_sent(1))
    assert sandbox.deliveries[0].user == "oauth@example.com"
    account = GmailAccount.objects.get()
    assert account.access_token != "expired-token" and account.token_expiry > timezone.now()


def test_broker_down_then_sweeper_sends(account, sandbox, start_worker):
    with broker_down():
        assert send_mail("broker down", "b", SENDER, ["to@example.net"]) == 1
        assert publisher.wait_published(timeout=30)  # the thread's hand-off failed
    row = OutboundEmail.objects.get()
    assert row.status == Status.QUEUED and row.enqueued_at is None
    start_worker(beat=True)  # the beat schedule runs the sweeper
    wait_until(all_sent(1), timeout=60, what="the sweeper to send the stranded row")
    assert len(sandbox.deliveries) == 1


def test_worker_killed_mid_send_is_requeued(account, sandbox, start_worker):
    sandbox.fault("data", delay=30, times=1)  # hold the DATA reply so the worker is mid-send
    worker = start_worker()
    send_mail("killed", "b", SENDER, ["to@example.net"])
    wait_until(lambda: OutboundEmail.objects.filter(status=Status.SENDING).exists())
    worker.kill()
    row = OutboundEmail.objects.get()
    assert row.status == Status.SENDING
    start_worker(name="w2", beat=True)
    wait_until(all_sent(1), timeout=60, what="the row to be re-queued and sent")
    assert len(sandbox.deliveries) == 1


def test_busy_bulk_queue_does_not_delay_transactional(account, sandbox, start_worker):
    from django.core.mail import get_connection

    start_worker(queues_served=["transactional"], name="transactional")
    bulk = [EmailMessage(f"news {i}", "b", SENDER, ["to@example.net"]) for i in range(20)]
    for message in bulk:
        message.gmail_priority = "bulk"
    get_connection().send_messages(bulk)  # no worker serves the bulk queue yet
    send_mail("password reset", "b", SENDER, ["alice@example.net"])
    wait_until(all_sent(1), what="the transactional message")
    assert [d.message["Subject"] for d in sandbox.deliveries] == ["password reset"]
    assert OutboundEmail.objects.filter(priority="bulk", status=Status.QUEUED).count() == 20
    start_worker(queues_served=["bulk"], name="bulk")
    wait_until(all_sent(21), what="the bulk messages")


def test_sweeper_counts_after_worker_run(account, sandbox, start_worker):
    """A sweep with nothing due does nothing."""
    start_worker()
    send_mail("s", "b", SENDER, ["to@example.net"])
    wait_until(all_sent(1))
    assert outbox.sweep() == {"expired_leases": 0, "due": 0, "stale_queued": 0}
