"""The per-account connection limit under prefork concurrency: whatever the number of worker
processes, the site keeps at most CONNECTIONS_PER_ACCOUNT connections to one account, so a
burst costs one login; a worker killed while holding the account's connection loses it when
its lease runs out, and the mail that waited is sent."""

from __future__ import annotations

import threading

import pytest
from django.core.mail import EmailMessage, get_connection

from django_gmail_smtp import outbox
from django_gmail_smtp.enums import Status
from django_gmail_smtp.models import ConnectionSlot, OutboundEmail

from .conftest import SENDER
from .factories import all_sent, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def track_sessions(sandbox) -> dict[str, int]:
    """Record, at each accepted message, how many sessions are logged in at once."""
    seen = {"max_logged_in": 0}
    lock = threading.Lock()
    live = sandbox._smtp._live  # the listener's open sessions

    def on_delivery(delivered):
        with lock:
            logged_in = sum(1 for session in list(live) if session._login)
            seen["max_logged_in"] = max(seen["max_logged_in"], logged_in)

    sandbox._state.on_delivery = on_delivery
    return seen


def test_a_burst_through_four_processes_uses_one_connection_and_one_login(
    account, sandbox, start_worker
):
    sessions = track_sessions(sandbox)
    messages = [EmailMessage(f"m{i}", "b", SENDER, ["to@example.net"]) for i in range(300)]
    for message in messages[:150]:
        message.gmail_priority = "bulk"
    get_connection().send_messages(messages)
    start_worker(concurrency=4)
    wait_until(all_sent(300), timeout=120, what="300 messages sent")
    assert len(sandbox.deliveries) == 300  # each once
    assert sandbox.stats.logins == 1  # at most 2 per 1,000 messages
    assert sessions["max_logged_in"] == 1  # CONNECTIONS_PER_ACCOUNT


def test_a_killed_holders_slot_is_recovered(account, sandbox, start_worker):
    # Hold the reply to the first message's DATA, so the worker is killed mid-stream.
    sandbox.fault("data", delay=30, times=1)
    worker = start_worker(concurrency=2, CONNECTION_LEASE=2)
    get_connection().send_messages(
        [EmailMessage(f"m{i}", "b", SENDER, ["to@example.net"]) for i in range(5)]
    )
    wait_until(
        lambda: (
            ConnectionSlot.objects.exclude(holder="").exists()
            and OutboundEmail.objects.filter(status=Status.SENDING).exists()
        ),
        what="a worker holding the account's connection",
    )
    worker.kill()
    # The beat schedule's sweeper re-queues the rows once their lease ran out, frees the
    # slot once its lease ran out, and starts a stream for the mail that waited.
    start_worker(name="w2", beat=True, concurrency=2, CONNECTION_LEASE=2)
    wait_until(all_sent(5), timeout=90, what="the killed worker's mail to be sent")
    assert sorted(d.subject for d in sandbox.deliveries) == [f"m{i}" for i in range(5)]
    assert outbox.sweep()["expired_leases"] == 0
