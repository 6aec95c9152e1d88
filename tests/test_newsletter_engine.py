"""The newsletters' engine in-process: enrolment, the planner's pacing and budget, pause,
resume, cancel, retry, the domain guard, the circuit breaker, progress and its ETA.

Messages are delivered with ``outbox.deliver`` against the sandbox (no broker); the quota
clock is the test's (``quota.set_clock``). Real workers are in test_newsletter_worker.py.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from datetime import datetime, time, timedelta

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from django_gmail_smtp import outbox, quota
from django_gmail_smtp.models import GmailAccount, OutboundEmail
from django_gmail_smtp.newsletters import campaigns, planner, signals
from django_gmail_smtp.newsletters.models import (
    Campaign,
    CampaignRecipient,
    MailingList,
    Subscriber,
    Suppression,
)
from django_gmail_smtp.testing.replies import Replies

from .factories import queued_row, with_keys

pytestmark = pytest.mark.django_db

NEWS = "news@example.com"
Recipient = CampaignRecipient.Status
HOUR = timedelta(hours=1)


# --- fixtures and helpers ------------------------------------------------------------------------


class Clock:
    """The quota clock, moved by the test."""

    def __init__(self) -> None:
        self.now = timezone.now().replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


@pytest.fixture
def clock():
    c = Clock()
    quota.set_clock(c)
    yield c
    quota.set_clock(None)


@pytest.fixture
def news(settings, sandbox, outbox_settings, no_dispatch, make_account):
    """The account campaigns send from (500 a day: 450 of bulk mail), on the sandbox."""
    with_keys(settings, SITE_URL="https://news.example.com", NEWSLETTER_TICK=3600)
    return make_account(sandbox, NEWS)


def make_list(n: int, slug: str = "weekly", **subscriber) -> MailingList:
    mailing_list = MailingList.objects.create(name=slug.title(), slug=slug, from_email=NEWS)
    Subscriber.objects.bulk_create(
        Subscriber(
            mailing_list=mailing_list,
            email=f"reader{i}@example.net",
            name=f"Reader {i}",
            status=Subscriber.Status.ACTIVE,
            **subscriber,
        )
        for i in range(n)
    )
    return mailing_list


def make_campaign(mailing_list: MailingList | None = None, **fields) -> Campaign:
    fields.setdefault("subject", "News for {{ subscriber.name }}")
    fields.setdefault("text_template", "Hello {{ subscriber.name }}")
    fields.setdefault("from_email", NEWS)
    return Campaign.objects.create(name="Issue 1", mailing_list=mailing_list, **fields)


def started(n: int, **fields) -> Campaign:
    campaign = make_campaign(make_list(n), **fields)
    campaign.start()
    return campaign


def statuses(campaign: Campaign) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in campaign.recipients.values_list("status", flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


def deliver_all(pool) -> list[str]:
    """Send every due outbox row in-process, as a worker would."""
    outcomes = []
    due = OutboundEmail.objects.filter(status=OutboundEmail.Status.QUEUED, next_attempt_at=None)
    for pk in due.order_by("pk").values_list("pk", flat=True):
        outcomes.append(outbox.deliver(pk, pool=pool))
    return outcomes


@pytest.fixture
def received():
    """``received(signal)``: the keyword arguments of each time it is sent (signals are sent
    on commit: run the code under ``django_capture_on_commit_callbacks(execute=True)``)."""
    with ExitStack() as stack:

        def connect(kind):
            calls = []

            def receiver(sender, signal, **kwargs):
                calls.append(kwargs)

            kind.connect(receiver, weak=False)
            stack.callback(kind.disconnect, receiver)
            return calls

        yield connect


# --- enrolment -----------------------------------------------------------------------------------


def test_start_enrols_each_address_once_with_suppressed_ones_marked(news, clock):
    mailing_list = make_list(4)
    other = MailingList.objects.create(name="Other", slug="other")
    Subscriber.objects.bulk_create(
        [
            # The same address in another case: one recipient (bulk_create skips save()).
            Subscriber(mailing_list=mailing_list, email="READER0@Example.net", status="active"),
            Subscriber(mailing_list=mailing_list, email="gone@example.net", status="unsubscribed"),
            Subscriber(mailing_list=mailing_list, email="global@example.net", status="active"),
            Subscriber(mailing_list=mailing_list, email="listed@example.net", status="active"),
            Subscriber(mailing_list=mailing_list, email="elsewhere@example.net", status="active"),
        ]
    )
    Suppression.objects.create(email="global@example.net", reason="manual")
    Suppression.objects.create(
        email="listed@example.net", reason="hard_bounce", mailing_list=mailing_list
    )
    Suppression.objects.create(email="elsewhere@example.net", reason="manual", mailing_list=other)
    campaign = make_campaign(mailing_list)

    assert campaign.start() == 7
    assert statuses(campaign) == {Recipient.PENDING: 5, Recipient.SUPPRESSED: 2}
    suppressed = set(
        campaign.recipients.filter(status="suppressed").values_list("email", flat=True)
    )
    assert suppressed == {"global@example.net", "listed@example.net"}
    assert campaign.recipients.filter(email="reader0@example.net").count() == 1
    assert not campaign.recipients.filter(email="gone@example.net").exists()
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.RUNNING and campaign.started_at == clock.now

    with pytest.raises(ValueError, match="not a draft"):
        campaign.start()
    assert campaign.recipients.count() == 7


def test_a_queryset_audience_takes_names_from_the_model(news, clock):
    User.objects.create_user("ann", "Ann@Example.net", first_name="Ann", last_name="Lee")
    User.objects.create_user("bob", "bob@example.net")
    User.objects.create_user("nomail", "")
    Suppression.objects.create(email="bob@example.net", reason="unsubscribed")
    campaign = make_campaign()
    assert campaign.start(User.objects.all()) == 2
    rows = dict(campaign.recipients.values_list("email", "name"))
    assert rows == {"ann@example.net": "Ann Lee", "bob@example.net": ""}
    assert campaign.recipients.get(email="bob@example.net").status == Recipient.SUPPRESSED


@pytest.mark.parametrize(
    "fields, audience, message",
    [
        ({}, None, "no audience"),
        ({"text_template": "{% if %}"}, "list", "text template has an error"),
        ({"audience": "nobody"}, None, "not in"),
    ],
)
def test_start_refuses_plainly_and_changes_nothing(news, fields, audience, message):
    campaign = make_campaign(make_list(2) if audience else None, **fields)
    with pytest.raises(ValueError, match=message):
        campaign.start()
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.DRAFT and not campaign.recipients.exists()


# --- the planner ---------------------------------------------------------------------------------


def test_slices_are_even_and_never_over_the_bulk_share(news, clock, pool):
    campaign = started(1000)
    slices = []
    for _hour in range(30):
        slices.append(planner.tick().get("queued", 0))
        deliver_all(pool)
        status = news.quota_status()
        assert status.messages_used <= status.bulk_messages_limit == 450
        clock.advance(HOUR)
    # 450 a day is 18.75 an hour: 18 or 19 every hour, the fraction carried over.
    assert set(slices[:24]) <= {18, 19}, slices
    assert sum(slices[:24]) == 450
    # The first hour's mail leaves the window a minute after the 24th tick: that tick waits,
    # and the pace goes on from the next (without catching up in a burst).
    assert slices[24] == 0 and set(slices[25:]) <= {18, 19, 20}, slices
    assert statuses(campaign)[Recipient.SENT] == sum(slices)
    # The transactional share is still there.
    quota.reserve(news, 1, priority=quota.TRANSACTIONAL)


def test_no_burst_after_the_planner_was_down(news, clock, pool):
    started(200)
    assert planner.tick()["queued"] == 18
    deliver_all(pool)
    clock.advance(10 * HOUR)
    # Two ticks' worth at most (37.5), not 10 hours' worth.
    assert planner.tick()["queued"] == 37


def test_queued_mail_counts_against_the_account_and_in_flight_is_bounded(news, clock):
    news.daily_limit = 100_000
    news.save()
    started(3000, domain_aligned=True)  # else the domain guard paces it at 5,000 a day
    first = planner.tick()["queued"]
    assert first == planner.MAX_IN_FLIGHT  # 3,750 an hour would be allowed; 500 may wait
    clock.advance(HOUR)
    assert planner.tick().get("queued", 0) == 0  # nothing was sent: nothing more is queued


def test_the_first_tick_sends_at_least_one(news, clock, pool):
    news.daily_limit = 10  # 9 a day: 0.375 an hour
    news.save()
    campaign = started(5)
    assert planner.tick()["queued"] == 1
    deliver_all(pool)
    clock.advance(HOUR)
    assert planner.tick().get("queued", 0) == 0
    assert statuses(campaign)[Recipient.SENT] == 1


@pytest.mark.django_db(transaction=True)
def test_two_ticks_at_once_never_queue_a_recipient_twice(news, clock, caplog):
    news.daily_limit = 100_000
    news.save()
    campaign = started(300, domain_aligned=True)
    barrier = threading.Barrier(4)
    errors = []

    def run():
        try:
            barrier.wait()
            planner.tick()
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    # Each tick ran to the end (the second waited for the first's lock), none failed.
    assert "planner failed" not in caplog.text
    rows = list(OutboundEmail.objects.values_list("recipients", flat=True))
    addresses = [r[0] for r in rows]
    assert len(addresses) == len(set(addresses)) == statuses(campaign)[Recipient.QUEUED]
    # One tick's worth: the others found the time already planned.
    assert len(addresses) == 300


def test_several_campaigns_on_one_account_share_its_pace(news, clock):
    a, b = started(100), make_campaign(make_list(100, slug="monthly"))
    b.start()
    counts = planner.tick()
    assert counts["queued"] == 18  # 450 a day between the two: about 9 an hour each
    assert {statuses(a)[Recipient.QUEUED], statuses(b)[Recipient.QUEUED]} == {9}


def test_max_per_day_caps_the_pace(news, clock):
    campaign = started(100, max_per_day=48)
    assert planner.tick()["queued"] == 2
    assert statuses(campaign)[Recipient.QUEUED] == 2


def test_a_send_window_sends_only_inside_and_paces_over_its_length(news, clock, settings):
    settings.TIME_ZONE = "Europe/Paris"
    campaign = started(200, window_start=time(8), window_end=time(20))
    local = timezone.localtime(clock.now)
    clock.now = local.replace(hour=21, minute=0, second=0)
    assert planner.tick() == {"campaigns": 1}
    assert planner.budget(campaign, clock.now).waiting_reason == "outside the send window"
    clock.now = local.replace(hour=9, minute=0, second=0) + timedelta(days=1)
    # 450 over 12 hours: 37.5 an hour.
    assert planner.tick()["queued"] == 37


def test_a_window_that_wraps_midnight(news, clock, settings):
    campaign = make_campaign(window_start=time(22), window_end=time(6))
    at = timezone.localtime(clock.now).replace(hour=23)
    assert planner.in_window(campaign, at)
    assert planner.in_window(campaign, at.replace(hour=3))
    assert not planner.in_window(campaign, at.replace(hour=12))
    assert planner.window_length(campaign) == 8 * 3600


def test_suppression_is_checked_again_when_queued(news, clock):
    started(3)
    Suppression.objects.create(email="reader1@example.net", reason="unsubscribed")
    Subscriber.objects.filter(email="reader2@example.net").update(status="unsubscribed")
    news.daily_limit = 100_000
    news.save()
    counts = planner.tick()
    assert counts["queued"] == 1 and counts["suppressed"] == 2
    assert OutboundEmail.objects.get().recipients == ["reader0@example.net"]


def test_a_message_goes_out_as_bulk_mail_from_the_chosen_account(news, clock, sandbox, pool):
    campaign = started(1)
    planner.tick()
    row = OutboundEmail.objects.get()
    assert row.priority == "bulk" and row.account == news
    recipient = campaign.recipients.get()
    assert recipient.outbound == row and recipient.account_email == NEWS
    assert recipient.queued_at == clock.now
    deliver_all(pool)
    (delivered,) = sandbox.deliveries
    assert delivered.subject == "News for Reader 0"
    assert delivered.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_accounts_that_may_send_as_the_from_share_the_campaign(news, clock, make_account, sandbox):
    other = make_account(sandbox, "second@example.com", aliases=[NEWS])
    make_account(sandbox, "unrelated@example.com")
    news.daily_limit = other.daily_limit = 267  # 240 of bulk mail a day: 10 an hour each
    news.save()
    other.save()
    started(100)
    assert planner.tick()["queued"] == 20
    by_account = OutboundEmail.objects.values_list("account_email", flat=True)
    assert sorted(set(by_account)) == [NEWS, "second@example.com"]
    assert list(by_account).count(NEWS) == 10


def test_no_account_can_send_as_the_from_with_strict_from(news, clock, settings):
    with_keys(settings, STRICT_FROM=True)
    campaign = started(3, from_email="someone@elsewhere.example")
    assert planner.tick() == {"campaigns": 1}
    progress = campaign.progress()
    assert "no account can send as someone@elsewhere.example" in progress.waiting_reason
    assert progress.eta is None and "waiting" in progress.describe()


# --- Workspace limits ----------------------------------------------------------------------------


def test_workspace_limits_cap_bulk_mail_by_external_recipients(news, clock):
    news.limits_preset = "workspace"
    news.save()
    budget = planner.account_budget(news)
    # 2,000 messages (1,800 of bulk), but 2,000 external recipients (1,800 of bulk) too.
    assert budget.capacity == 1800
    news.limits_preset = "workspace_trial"
    news.daily_limit = 1000  # more messages than the trial's 500 external recipients
    news.save()
    assert planner.account_budget(news).capacity == 450
    quota.reserve(news, 100)  # one transactional message to 100 people
    assert planner.account_budget(news).left == 350
    news.limits_preset = "gmail"
    news.save()
    assert planner.account_budget(news).left == 899  # Gmail counts messages only


# --- pause, resume, cancel, retry ----------------------------------------------------------------


def test_pause_takes_unsent_mail_back_and_resume_sends_it(
    news, clock, pool, sandbox, received, django_capture_on_commit_callbacks
):
    campaign = started(40)
    paused = received(signals.campaign_paused)
    assert planner.tick()["queued"] == 18
    first = OutboundEmail.objects.order_by("pk").first()
    outbox.deliver(first.pk, pool=pool)
    with django_capture_on_commit_callbacks(execute=True):
        campaign.pause("checking a typo")
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.PAUSED
    assert campaign.paused_reason == "checking a typo"
    assert paused == [{"campaign": campaign, "reason": "checking a typo", "automatic": False}]
    assert statuses(campaign) == {Recipient.SENT: 1, Recipient.PENDING: 39}
    assert OutboundEmail.objects.filter(status="cancelled").count() == 17
    clock.advance(HOUR)
    assert planner.tick().get("queued", 0) == 0
    assert deliver_all(pool) == []

    campaign.resume()
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.RUNNING and campaign.paused_reason == ""
    assert planner.tick()["queued"] == 18
    deliver_all(pool)
    addresses = [d.rcpt_tos[0] for d in sandbox.deliveries]
    assert len(addresses) == len(set(addresses)) == 19


def test_a_message_being_sent_when_paused_is_recorded(news, clock, pool):
    news.daily_limit = 10  # the first tick queues one
    news.save()
    campaign = started(2)
    planner.tick()
    row = OutboundEmail.objects.get()
    OutboundEmail.objects.filter(pk=row.pk).update(status="sending")  # a worker has it
    campaign.pause()
    assert statuses(campaign) == {Recipient.QUEUED: 1, Recipient.PENDING: 1}
    OutboundEmail.objects.filter(pk=row.pk).update(status="sent", sent_at=timezone.now())
    planner.tick()  # reconciles paused campaigns too
    assert statuses(campaign) == {Recipient.SENT: 1, Recipient.PENDING: 1}


def test_cancel_stops_for_good(news, clock, pool):
    campaign = started(30)
    planner.tick()
    campaign.cancel()
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.CANCELLED
    assert statuses(campaign) == {Recipient.CANCELLED: 30}
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {"cancelled"}
    with pytest.raises(ValueError, match="only a paused campaign"):
        campaign.resume()


def test_retry_failed_sends_again_except_to_suppressed_addresses(news, clock, pool, sandbox):
    campaign = started(3)
    sandbox.bad_recipients = {"reader1@example.net"}
    news.daily_limit = 100_000
    news.save()
    planner.tick()
    deliver_all(pool)
    campaign.recipients.filter(email="reader2@example.net").update(status="failed")
    planner.tick()
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.FINISHED
    assert campaign.recipients.get(email="reader1@example.net").status == Recipient.FAILED
    refused = Suppression.objects.get(email="reader1@example.net")
    assert refused.reason == "refused" and refused.mailing_list == campaign.mailing_list
    assert "553 5.1.3" in refused.detail

    assert campaign.retry_failed() == 1
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.RUNNING and campaign.finished_at is None
    assert campaign.recipients.get(email="reader2@example.net").status == Recipient.PENDING
    planner.tick()
    deliver_all(pool)
    planner.tick()
    sent_to = [d.rcpt_tos[0] for d in sandbox.deliveries]
    # reader2 was marked failed by hand after its first message: it gets a second one.
    assert sorted(sent_to) == ["reader0@example.net", "reader2@example.net", "reader2@example.net"]
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.FINISHED


def test_never_finished_while_a_recipient_waits(
    news, clock, pool, received, django_capture_on_commit_callbacks
):
    news.daily_limit = 2  # one bulk message a day
    news.save()
    campaign = started(2)
    finished = received(signals.campaign_finished)
    for _step in range(3):
        planner.tick()
        deliver_all(pool)
        campaign.refresh_from_db()
        assert campaign.status == Campaign.Status.RUNNING
        clock.advance(HOUR)
    clock.advance(timedelta(hours=22))
    planner.tick()
    with django_capture_on_commit_callbacks(execute=True):
        deliver_all(pool)
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.FINISHED  # set by the receiver
    assert campaign.finished_at is not None
    assert statuses(campaign) == {Recipient.SENT: 2}
    assert finished == [{"campaign": finished[0]["campaign"], "reason": "2 sent, 0 failed"}]


def test_the_finish_check_sees_recipients_in_the_outbox(news, clock):
    campaign = started(1)
    planner.tick()
    assert not campaigns.finish_if_done(campaign)
    CampaignRecipient.objects.update(status="sent")
    assert campaigns.finish_if_done(campaign)


# --- the domain guard ---------------------------------------------------------------------------


def test_the_domain_guard_stops_an_unaligned_campaign_at_the_limit(
    news, clock, monkeypatch, settings
):
    monkeypatch.setattr(planner, "DOMAIN_LIMIT", 5)
    monkeypatch.setattr(planner, "DOMAIN_WARN", 4)
    news.daily_limit = 100_000
    news.save()
    for _ in range(4):  # other bulk mail from the domain, through another account
        queued_row(news, priority="bulk")
    OutboundEmail.objects.update(from_email="other@example.com", account_email="o@example.org")
    campaign = started(100, max_per_day=240)
    assert planner.tick()["queued"] == 1
    assert planner.domain_usage("example.com") == (5, 4, 5)
    clock.advance(10 * HOUR)
    assert planner.tick().get("queued", 0) == 0
    progress = campaign.progress()
    assert "domain guard" in progress.waiting_reason and progress.domain_usage == (5, 4, 5)
    assert progress.describe().startswith("about ")  # it goes on once old mail ages out

    Campaign.objects.filter(pk=campaign.pk).update(domain_aligned=True)  # the admin's checkbox
    clock.advance(HOUR)
    assert planner.tick()["queued"] > 0
    Campaign.objects.filter(pk=campaign.pk).update(domain_aligned=False)
    clock.advance(HOUR)
    assert planner.tick().get("queued", 0) == 0
    with_keys(settings, NEWSLETTER_ALIGNED_DOMAINS=["Example.com"])  # the setting
    clock.advance(HOUR)
    assert planner.tick()["queued"] > 0


# --- the circuit breaker -------------------------------------------------------------------------


def test_421_4_7_28_pauses_the_campaign_with_gmails_reply(
    news, clock, pool, sandbox, received, django_capture_on_commit_callbacks
):
    campaign = started(5)
    paused = received(signals.campaign_paused)
    sandbox.fault("after_data", reply=Replies.UNUSUAL_RATE)
    planner.tick()
    first = OutboundEmail.objects.order_by("pk").first()
    assert outbox.deliver(first.pk, pool=pool) == "retry"  # a temporary reply: no signal
    with django_capture_on_commit_callbacks(execute=True):
        planner.tick()  # the reconcile sees it
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.PAUSED
    assert campaign.paused_reason.startswith("Gmail answered 421 4.7.28 Gmail has detected")
    assert paused[0]["automatic"] and "4.7.28" in paused[0]["reason"]
    assert statuses(campaign) == {Recipient.PENDING: 5}
    assert not OutboundEmail.objects.filter(status__in=["queued", "deferred"]).exists()
    assert not Suppression.objects.exists()


def test_550_5_7_1_pauses_at_once(news, clock, pool, sandbox):
    campaign = started(5)
    sandbox.fault("after_data", reply=Replies.BLOCKED)
    planner.tick()
    first = OutboundEmail.objects.order_by("pk").first()
    assert outbox.deliver(first.pk, pool=pool) == "failed"
    campaign.refresh_from_db()  # the email_failed receiver paused it
    assert campaign.status == Campaign.Status.PAUSED and "550 5.7.1" in campaign.paused_reason
    assert statuses(campaign) == {Recipient.FAILED: 1, Recipient.PENDING: 4}
    assert not Suppression.objects.exists()  # the sender was blocked, not the address


def test_a_high_refusal_rate_pauses_the_campaign(news, clock, pool, sandbox, settings):
    with_keys(settings, NEWSLETTER_BREAKER_MINIMUM=4, NEWSLETTER_BREAKER_RATE=0.3)
    campaign = started(10)
    sandbox.bad_recipients = {f"reader{i}@example.net" for i in (5, 6, 7)}
    planner.tick()
    deliver_all(pool)  # 1 of 6, 2 of 7, then 3 of 8 refused: over 30%
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.PAUSED
    assert "3 of its 8 messages were refused" in campaign.paused_reason
    assert Suppression.objects.filter(reason="refused").count() == 3
    assert statuses(campaign) == {Recipient.SENT: 5, Recipient.FAILED: 3, Recipient.PENDING: 2}


def test_a_receiver_that_fails_never_breaks_the_outbox(news, clock, pool, monkeypatch, caplog):
    started(1)
    planner.tick()

    def broken(row):
        raise RuntimeError("boom")

    monkeypatch.setattr(campaigns, "record_outbound", broken)
    assert deliver_all(pool) == ["sent"]
    assert OutboundEmail.objects.get().status == "sent"
    assert "Could not record the outcome" in caplog.text
    monkeypatch.undo()
    with_keys_tick = planner.tick  # the reconcile catches up
    with_keys_tick()
    assert CampaignRecipient.objects.get().status == Recipient.SENT


# --- progress and ETA ----------------------------------------------------------------------------


def test_eta_before_start_and_while_sending(news, clock, pool):
    campaign = make_campaign(make_list(1400))
    estimate = campaigns.estimate(campaign)
    assert (estimate.total, estimate.rate_per_day) == (1400, 450)
    # 1,400 at 450 a day: 3.11 days.
    assert estimate.eta == clock.now + timedelta(days=1400 / 450)
    assert estimate.describe() == "about 3 days 2 hours at 450/day across 1 account"
    assert campaign.progress().eta == estimate.eta  # a draft's progress is the estimate

    campaign.start()
    planner.tick()
    deliver_all(pool)
    progress = campaign.progress()
    assert (progress.sent, progress.pending, progress.total) == (18, 1382, 1400)
    assert progress.accounts[0].email == NEWS and progress.accounts[0].sent == 18
    assert progress.accounts[0].capacity_per_day == 450
    assert progress.eta == clock.now + timedelta(days=1382 / 450)
    assert progress.percent == round(100 * 18 / 1400, 1) and not progress.finished


def test_eta_counts_send_window_time_only(news, clock, settings):
    campaign = make_campaign(make_list(450), window_start=time(8), window_end=time(20))
    clock.now = clock.now.replace(hour=20, minute=0, second=0)  # TIME_ZONE is UTC
    estimate = campaigns.estimate(campaign)
    # The day's 450 in the 12 hours from 08:00 tomorrow.
    assert estimate.eta == (clock.now + timedelta(hours=24)).replace(hour=20)
    assert estimate.describe() == (
        "about 1 day at 450/day across 1 account (waiting now: outside the send window)"
    )


def test_eta_waits_for_a_full_ledger(news, clock):
    news.daily_limit = 10  # 9 of bulk mail
    news.save()
    for _ in range(9):
        quota.reserve(news, 1, priority=quota.BULK)
    frees = clock.now.replace(second=0) + timedelta(days=1, minutes=1)  # its minute's bucket
    clock.advance(HOUR)
    campaign = make_campaign(make_list(9))
    estimate = campaigns.estimate(campaign)
    # Nothing can go before the first sends leave the window, then 9 take a day.
    assert estimate.eta == frees + timedelta(days=1)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (30, "less than a minute"),
        (600, "10 minutes"),
        (3600 * 5 + 600, "5 hours 10 minutes"),
        (86400 * 3 + 3600 * 4 + 5, "3 days 4 hours"),
        (86400, "1 day"),
    ],
)
def test_durations(seconds, text):
    assert campaigns.duration(seconds) == text


def test_progress_counts_every_status(news, clock):
    campaign = started(4)
    CampaignRecipient.objects.filter(email="reader0@example.net").update(status="bounced")
    campaign.pause("later")
    progress = campaign.progress()
    assert (progress.total, progress.pending, progress.bounced) == (4, 3, 1)
    assert progress.waiting_reason == "Paused: later" and progress.eta is None
    # A reason that says it paused is not said twice ("Paused: Paused by ...").
    Campaign.objects.filter(pk=campaign.pk).update(paused_reason="Paused by alice on today.")
    campaign.refresh_from_db()
    assert campaign.progress().waiting_reason == "Paused by alice on today."


def test_bounces_count_per_account(news, clock):
    campaign = started(3)
    CampaignRecipient.objects.filter(campaign=campaign).update(status="sent", account_email=NEWS)
    CampaignRecipient.objects.filter(email="reader0@example.net").update(status="bounced")
    progress = campaign.progress()
    [account] = progress.accounts
    assert (account.email, account.sent, account.bounced) == (NEWS, 2, 1)
    assert progress.bounced == 1


def fill_window_evenly(account: GmailAccount, clock: Clock, *, count: int, every: timedelta):
    """Bulk sends of ``account`` spread over the window, as a campaign on its pace leaves it:
    one every ``every``, the last one now."""
    for n in range(count):
        if n:
            clock.advance(every)
        quota.reserve(account, 1, priority=quota.BULK)


def test_no_waiting_reason_on_pace(news, clock):
    """A campaign sending exactly at its accounts' pace fills their window: it has no room
    now, but a slot frees before the pace wants the next message. It is not held back."""
    news.daily_limit = 10  # 9 of bulk mail: one every 2 hours 40 minutes
    news.save()
    fill_window_evenly(news, clock, count=9, every=timedelta(minutes=160))
    clock.advance(timedelta(minutes=10))  # the first of them leaves the window within 2.5 h
    campaign = started(20)
    plan = planner.budget(campaign, clock.now)
    assert plan.left == 0 and "quota is used up" in plan.waiting_reason  # the planner's view
    progress = campaign.progress()
    assert progress.waiting_reason == ""
    assert "waiting" not in progress.describe() and progress.eta is not None


def test_waiting_reason_when_held_back_by_a_full_window(news, clock):
    """Sent in a burst (by hand, or another tool): the window frees only in about a day, far
    behind the campaign's pace. That is waiting, and it says why."""
    news.daily_limit = 10
    news.save()
    for _ in range(9):
        quota.reserve(news, 1, priority=quota.BULK)
    clock.advance(HOUR)
    progress = started(20).progress()
    assert "quota is used up" in progress.waiting_reason
    assert "(waiting now: its accounts' quota is used up" in progress.describe()
    assert "waiting" not in progress.describe(with_reason=False)


def test_beat_schedule_plans_on_the_transactional_queue(settings):
    from django_gmail_smtp.newsletters.tasks import beat_schedule

    with_keys(settings, NEWSLETTER_TICK=30)
    (entry,) = beat_schedule().values()
    assert entry["task"] == "django_gmail_smtp.newsletters.tasks.plan_campaigns"
    assert entry["schedule"] == 30.0
    assert entry["options"]["queue"] == "gmail_smtp.transactional"
    assert 0 < entry["options"]["expires"] <= 30


def test_default_account_sends_when_none_may_send_as_the_from(news, clock, sandbox, make_account):
    accounts, reason = planner.sender_accounts(make_campaign(from_email="x@elsewhere.example"))
    assert [a.email for a in accounts] == [NEWS] and reason == ""
    GmailAccount.objects.filter(pk=news.pk).update(health="credentials_rejected")
    accounts, reason = planner.sender_accounts(make_campaign(from_email=NEWS))
    assert accounts == [] and "to be fixed" in reason


def test_a_template_broken_after_start_pauses_the_campaign(news, clock):
    campaign = started(3)
    Campaign.objects.filter(pk=campaign.pk).update(text_template="{% if %}")
    assert planner.tick() == {"campaigns": 1}
    campaign.refresh_from_db()
    assert campaign.status == Campaign.Status.PAUSED
    assert campaign.paused_reason.startswith("The text template has an error")
    assert statuses(campaign) == {Recipient.PENDING: 3} and not OutboundEmail.objects.exists()


def test_the_celery_task_runs_a_tick(news, clock):
    from django_gmail_smtp.newsletters.tasks import plan_campaigns

    started(2)
    assert plan_campaigns() == {"queued": 2, "campaigns": 1}
