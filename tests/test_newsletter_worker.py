"""Campaigns sent by real Celery workers through the sandbox: the quota across accounts, worker
processes and days (with a clock the test moves), a password reset while a campaign runs at
full pace, pause/resume and a worker killed mid-campaign, and the circuit breaker.

The test process plays the beat: it runs the planner's ticks itself (``planner.tick()``).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from datetime import timedelta

import pytest
from django.core.mail import send_mail
from django.utils import timezone

from django_gmail_smtp import quota
from django_gmail_smtp.models import OutboundAttempt, OutboundEmail
from django_gmail_smtp.newsletters import planner
from django_gmail_smtp.newsletters.models import Campaign, CampaignRecipient
from django_gmail_smtp.testing.replies import Replies
from tests.celery_app import CLOCK_FILE_VARIABLE, file_clock

from .factories import outbox_state, wait_until, with_keys
from .test_newsletter_engine import NEWS, make_campaign, make_list

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

Recipient = CampaignRecipient.Status
UNSENT = [OutboundEmail.Status.QUEUED, OutboundEmail.Status.SENDING, OutboundEmail.Status.DEFERRED]


@pytest.fixture
def newsletter_settings(celery_settings, settings):
    with_keys(settings, SITE_URL="https://news.example.com")
    return settings


def campaign_state(campaign: Campaign) -> str:
    counts = Counter(campaign.recipients.values_list("status", flat=True))
    campaign.refresh_from_db()
    return f"campaign {campaign.status} {campaign.paused_reason!r} {dict(counts)}; {outbox_state()}"


def outbox_idle() -> bool:
    return not OutboundEmail.objects.filter(status__in=UNSENT).exists()


def deferred() -> bool:
    return OutboundEmail.objects.filter(status=OutboundEmail.Status.DEFERRED).exists()


def delivered_to(sandbox) -> list[str]:
    return [d.rcpt_tos[0] for d in sandbox.deliveries]


def test_quota_holds_across_two_accounts_three_workers_and_days(
    newsletter_settings, settings, sandbox, make_account, start_worker, tmp_path
):
    clock_file = tmp_path / "clock"
    clock_file.write_text("0")
    quota.set_clock(file_clock(str(clock_file)))
    sandbox.clock = lambda: time.time() + float(clock_file.read_text())
    try:
        # 20 a day each, 18 of bulk mail: 36 a day in all, paced over 6-hour ticks (9 each).
        with_keys(settings, NEWSLETTER_TICK=6 * 3600)
        make_account(sandbox, NEWS, daily_limit=20)
        make_account(sandbox, "second@example.com", aliases=[NEWS], daily_limit=20)
        for email in (NEWS, "second@example.com"):
            sandbox.set_quota(email, messages=20)  # Gmail would refuse the 21st
        campaign = make_campaign(make_list(50))
        campaign.start()
        env = {CLOCK_FILE_VARIABLE: str(clock_file)}
        for _ in range(3):
            start_worker(env=env)
        slices = []
        for _tick in range(12):
            slices.append(planner.tick().get("queued", 0))
            wait_until(lambda: outbox_idle() or deferred(), 60, "the slice to be sent")
            assert not deferred(), outbox_state()  # the ledger refused: over the quota
            campaign.refresh_from_db()
            if campaign.status == Campaign.Status.FINISHED:
                break
            clock_file.write_text(str(float(clock_file.read_text()) + 6 * 3600 + 60))
        campaign.refresh_from_db()
        assert campaign.status == Campaign.Status.FINISHED, campaign_state(campaign)
        assert slices[:4] == [9, 9, 9, 9] and sum(slices) == 50, slices
    finally:
        quota.set_clock(None)
    # Every recipient once; more than a day's limit, but never more than 18 in 24 hours.
    assert sorted(delivered_to(sandbox)) == sorted(
        campaign.recipients.values_list("email", flat=True)
    )
    assert Counter(campaign.recipients.values_list("status", flat=True)) == {Recipient.SENT: 50}
    by_account = defaultdict(list)
    for delivery in sandbox.deliveries:
        by_account[delivery.user.lower()].append(delivery.received_at)
    assert set(by_account) == {NEWS, "second@example.com"}
    for times in by_account.values():
        for at in times:
            assert sum(1 for t in times if at - 86400 < t <= at) <= 18
    assert not OutboundAttempt.objects.exclude(outcome="sent").exists()  # no quota deferral


def test_a_password_reset_is_not_held_up_by_a_running_campaign(
    newsletter_settings, settings, sandbox, make_account, start_worker
):
    make_account(sandbox, NEWS, daily_limit=100_000)
    campaign = make_campaign(make_list(60), domain_aligned=True)
    campaign.start()
    # Each message takes a while: the campaign's 60 keep the bulk worker busy for seconds.
    sandbox.fault("data", reply=None, delay=0.1, times=None)
    start_worker()  # both queues
    start_worker(queues_served=("transactional",))  # what the docs advise for resets
    assert planner.tick()["queued"] == 60
    sandbox.wait_for(3, timeout=30)
    send_mail("Reset your password", "https://example.com/reset/x", NEWS, ["user@example.org"])
    wait_until(outbox_idle, 60, "everything to be sent")
    order = delivered_to(sandbox)
    reset = order.index("user@example.org")
    # The reset went out while most of the campaign was still waiting.
    assert len(order) - 1 - reset >= 30, order
    assert len(set(order)) == 61


def test_pause_resume_and_a_killed_worker_lose_and_duplicate_nothing(
    newsletter_settings, settings, sandbox, make_account, start_worker
):
    make_account(sandbox, NEWS, daily_limit=100_000)
    campaign = make_campaign(make_list(20), domain_aligned=True)
    campaign.start()
    # Queued while no worker runs, then paused: the 20 rows are taken back.
    assert planner.tick()["queued"] == 20
    campaign.pause("proofreading")
    assert Counter(campaign.recipients.values_list("status", flat=True)) == {Recipient.PENDING: 20}
    worker = start_worker()
    campaign.resume()
    sandbox.fault("data", reply=None, delay=0.2, times=None)  # slow sends
    assert planner.tick()["queued"] == 20
    sandbox.wait_for(5, timeout=60)
    # The next message hangs before Gmail's reply; kill the worker while it waits.
    hang = sandbox.fault("after_data", reply=Replies.TEMPORARY_PROBLEM, delay=30, times=1)
    wait_until(lambda: hang.fired, 60, "a message to hang")
    # Kill it once it waits: the messages Gmail accepted before are recorded while the stream
    # waits for that reply. (Killed in the milliseconds between a 250 and its record, the
    # worker would leave that message to be sent again: the at-least-once window the outbox
    # documents, which this test does not aim at.)
    delivered = len(sandbox.deliveries)
    wait_until(
        lambda: OutboundEmail.objects.filter(status="sent").count() == delivered,
        60,
        f"the {delivered} accepted messages to be recorded",
    )
    worker.kill()
    # The task the dead worker had prefetched is lost with it; the sweeper re-enqueues such
    # rows once they have waited 5 minutes: make them that old (a duplicate task is harmless).
    OutboundEmail.objects.filter(status="queued").update(
        enqueued_at=timezone.now() - timedelta(minutes=10)
    )
    # Its sweeper re-queues the rows the dead worker held (a 3 s lease). Its own stream of up
    # to 20 messages at 0.2 s outlasts that lease: it renews its rows' leases as it goes, so
    # its sweeper never re-queues a row its stream has not reached yet.
    start_worker(name="w2", beat=True)

    def finished() -> bool:
        planner.tick()
        campaign.refresh_from_db()
        return campaign.status == Campaign.Status.FINISHED

    wait_until(finished, 90, "the campaign to finish")
    order = delivered_to(sandbox)
    assert sorted(order) == sorted(campaign.recipients.values_list("email", flat=True))
    assert len(order) == len(set(order)) == 20
    assert OutboundEmail.objects.filter(status="cancelled").count() == 20  # the paused slice


def test_the_circuit_breaker_pauses_on_421_4_7_28(
    newsletter_settings, settings, sandbox, make_account, start_worker
):
    make_account(sandbox, NEWS, daily_limit=100_000)
    campaign = make_campaign(make_list(10), domain_aligned=True)
    campaign.start()
    sandbox.fault("after_data", reply=Replies.UNUSUAL_RATE, times=None)
    # Retries wait longer than a planner tick, as with the default RETRY_BASE_DELAY (30 s):
    # with the suite's fast retries a worker could use up MAX_ATTEMPTS before any tick.
    start_worker(RETRY_BASE_DELAY=30, RETRY_MAX_DELAY=60)
    assert planner.tick()["queued"] == 10

    def paused() -> bool:
        planner.tick()
        campaign.refresh_from_db()
        return campaign.status == Campaign.Status.PAUSED

    wait_until(paused, 60, "the campaign to pause itself")
    assert "421 4.7.28" in campaign.paused_reason
    # A message being retried when it paused is taken back at a later tick.
    wait_until(lambda: planner.tick() is not None and outbox_idle(), 60, "the outbox to settle")
    counts = Counter(campaign.recipients.values_list("status", flat=True))
    # Nothing left in the outbox; nothing was accepted; what was not refused waits for resume.
    assert set(counts) <= {Recipient.PENDING, Recipient.FAILED} and counts[Recipient.PENDING]
    assert sandbox.deliveries == []
