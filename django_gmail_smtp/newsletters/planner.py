"""The planner: at each tick, the next slice of every running campaign goes into the outbox.

A campaign never queues more than its sender accounts may send: each account's bulk share of
its rolling 24-hour quota (``RESERVED_SHARE`` stays for transactional mail), less the Workspace
external-recipient limit, less what is already in the outbox for it, split between the running
campaigns that share it and capped by the campaign's ``max_per_day``. The slice is paced evenly
over the day (or the campaign's daily send window): each tick queues what the pace allows for
the time since the last one, carrying the fraction to the next, never more than
:data:`BURST_TICKS` ticks' worth (no burst after the beat was down), and never more than
:data:`IN_FLIGHT_TICKS` ticks' worth waiting in the outbox.

Messages are queued through :func:`django_gmail_smtp.outbox.queue_messages` as bulk mail, with
the account chosen here: the outbox, the quota ledger and the worker do the rest, as for any
message. Each tick first reconciles the campaign's queued recipients with their outbox rows
(what the signal receivers also do), so a missed signal changes nothing.

Concurrency: a tick takes its campaign's row lock first (an UPDATE: a row lock on PostgreSQL,
the write lock on SQLite) and moves each recipient from pending to queued with a conditional
UPDATE, so two ticks at once never queue one recipient twice.

The tick's cost does not grow with the campaign: every query is bounded by the slice, the
in-flight bound or an index range of one status.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from email.utils import parseaddr
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from .. import outbox, quota
from ..conf import MailerSettings, for_mailer, get_setting, is_our_backend
from ..enums import Priority, Status
from ..exceptions import GmailSMTPError, NoSenderAccount
from ..models import GmailAccount, OutboundEmail, normalize_address
from ..routing import Router
from . import campaigns
from .models import Campaign, CampaignRecipient, Subscriber, Suppression
from .render import Renderer, TemplateProblem

logger = logging.getLogger(__name__)

#: Gmail treats a From domain that sends this many messages a day to its users as a bulk sender
DOMAIN_LIMIT = 5000
#: the admin warns from this many bulk messages a day per From domain
DOMAIN_WARN = 4000
#: a tick never queues more than this many ticks' worth of a campaign's pace
BURST_TICKS = 2.0
#: a campaign never has more than this many ticks' worth of its mail waiting in the outbox ...
IN_FLIGHT_TICKS = 4.0
#: ... nor more than this many messages, whatever its pace (the worker takes them one by one)
MAX_IN_FLIGHT = 500
#: ... but may always have this many (a slow pace still keeps a message or two queued)
MIN_IN_FLIGHT = 5
DAY = 86400.0

Recipient = CampaignRecipient.Status


# --- who sends, and how much ---------------------------------------------------------------------


def from_header(campaign: Campaign) -> str:
    """The campaign's From: its own, else its list's, else DEFAULT_FROM_EMAIL."""
    mailing_list = campaign.mailing_list if campaign.mailing_list_id else None
    list_from = mailing_list.from_email if mailing_list is not None else ""
    return campaign.from_email or list_from or django_settings.DEFAULT_FROM_EMAIL


def from_address(campaign: Campaign) -> str:
    """The address part of the campaign's From, normalized."""
    return normalize_address(parseaddr(from_header(campaign))[1])


def from_domain(campaign: Campaign) -> str:
    return from_address(campaign).rpartition("@")[2]


def campaign_mailer(campaign: Campaign) -> str | None:
    """The ``MAILERS`` alias the campaign queues through: its own, else ``"default"`` when
    that entry is one of our backends (Django 6.1: its ``OPTIONS``, such as ``username`` /
    ``password``, are how ``send_mail`` logs in, so campaign mail must use them too), else
    None (``EMAIL_BACKEND`` and ``GMAIL_SMTP`` alone)."""
    if campaign.mailer:
        return campaign.mailer
    mailers = getattr(django_settings, "MAILERS", None)
    default = mailers.get("default") if isinstance(mailers, Mapping) else None
    if isinstance(default, Mapping) and is_our_backend(default.get("BACKEND")):
        return "default"
    return None


def mailer_settings(campaign: Campaign) -> MailerSettings:
    """The settings of the mailer the campaign queues through."""
    return for_mailer(campaign_mailer(campaign))


def sender_accounts(
    campaign: Campaign, settings: MailerSettings | None = None
) -> tuple[list[GmailAccount], str]:
    """The accounts that send the campaign, and why there are none (else "").

    Every active, healthy account that may send as the campaign's From (its own address or a
    send-as alias); if none may, the one routing would use (the mailer's account, else the
    default, with Gmail's From rewrite), unless ``STRICT_FROM`` refuses that."""
    settings = settings or mailer_settings(campaign)
    address = from_address(campaign)
    try:
        router = Router(options=settings)
        if router.forced:
            accounts = [a for a in router.accounts() if normalize_address(a.email) == router.forced]
        else:
            accounts = [a for a in router.accounts() if a.is_active and a.can_send_as(address)]
            if not accounts and not settings.strict_from:
                accounts = [router.default()]
    except (NoSenderAccount, ImproperlyConfigured) as exc:
        return [], str(exc)
    if not accounts:
        return [], f"no account can send as {address} (STRICT_FROM is on)"
    healthy = [a for a in accounts if a.is_healthy and a.is_active]
    if not healthy:
        emails = ", ".join(a.email for a in accounts)
        return [], f"waiting for {emails} to be fixed (Gmail refuses its credentials)"
    return healthy, ""


def in_flight(account: GmailAccount) -> int:
    """Messages of ``account`` in the outbox not sent yet: they will use its quota soon."""
    rows = OutboundEmail.objects.filter(status__in=[Status.QUEUED, Status.DEFERRED, Status.SENDING])
    if account.pk and not account.from_settings:
        rows = rows.filter(account=account)
    else:
        rows = rows.filter(account_email=normalize_address(account.email))
    return rows.count()


@dataclass
class AccountBudget:
    """What one account can send of bulk mail: per 24 hours, and now."""

    account: GmailAccount
    #: bulk messages per rolling 24 hours (after RESERVED_SHARE and the Workspace limits)
    capacity: int
    #: what it may still queue now: its window's bulk room less its mail in the outbox
    left: int
    #: when its window next frees a slot (None: not full, or unknown)
    next_slot_at: datetime | None
    #: this campaign's share of ``capacity`` (shared with other running campaigns, max_per_day)
    share: float = 0.0

    @property
    def email(self) -> str:
        return self.account.email


def account_budget(account: GmailAccount, settings: MailerSettings | None = None) -> AccountBudget:
    """The account's bulk capacity per 24 hours and what it may take now, from the ledger."""
    status = quota.quota_status(account, settings)
    limits = account.limits()
    share = status.reserved_share
    capacity = status.bulk_messages_limit
    left = capacity - status.messages_used
    # Each campaign message has one recipient; count every recipient in the window as external
    # and unique (conservative: the ledger does not know which were).
    for limit in (limits.recipients, limits.external_recipients):
        if limit is not None:
            cap = math.floor(limit * (1 - share))
            capacity = min(capacity, cap)
            left = min(left, cap - status.recipients_used)
    if status.exhausted_until is not None and status.exhausted_until > status.at:
        left = 0
    left -= in_flight(account)
    return AccountBudget(account, max(0, capacity), max(0, left), status.next_slot_at)


# --- the send window -----------------------------------------------------------------------------


def _seconds(moment: time) -> int:
    return moment.hour * 3600 + moment.minute * 60 + moment.second


def window_length(campaign: Campaign) -> float:
    """Seconds a day the campaign may send (86,400 without a window)."""
    if campaign.window_start is None or campaign.window_end is None:
        return DAY
    length = (_seconds(campaign.window_end) - _seconds(campaign.window_start)) % DAY
    return length or DAY


def _local(moment: datetime) -> datetime:
    if timezone.is_aware(moment):
        return timezone.localtime(moment)
    return moment


def in_window(campaign: Campaign, moment: datetime) -> bool:
    """Whether ``moment`` is inside the campaign's daily send window (in TIME_ZONE)."""
    if window_length(campaign) == DAY:
        return True
    assert campaign.window_start is not None and campaign.window_end is not None
    start, end = _seconds(campaign.window_start), _seconds(campaign.window_end)
    local = _local(moment)
    now = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
    if start < end:
        return start <= now < end
    return now >= start or now < end  # the window wraps midnight


def window_edge(campaign: Campaign, moment: datetime) -> datetime:
    """When the window opens next (outside it) or closes (inside it) after ``moment``."""
    assert campaign.window_start is not None and campaign.window_end is not None
    target = campaign.window_end if in_window(campaign, moment) else campaign.window_start
    local = _local(moment)
    candidate = local.replace(
        hour=target.hour, minute=target.minute, second=target.second, microsecond=0
    )
    if candidate <= local:
        candidate = _local(candidate + timedelta(days=1)).replace(
            hour=target.hour, minute=target.minute, second=target.second
        )
    return candidate


def advance(campaign: Campaign, start: datetime, seconds: float) -> datetime:
    """``start`` plus ``seconds`` of send-window time (only time inside the window counts)."""
    if window_length(campaign) == DAY:
        return start + timedelta(seconds=seconds)
    moment = start
    for _day in range(100_000):  # bounded: at least one window a day
        if not in_window(campaign, moment):
            moment = window_edge(campaign, moment)
            continue
        closes = window_edge(campaign, moment)
        room = (closes - moment).total_seconds()
        if seconds <= room:
            return moment + timedelta(seconds=seconds)
        seconds -= room
        moment = closes
    return moment


def window_time(campaign: Campaign, start: datetime, end: datetime) -> float:
    """Seconds of send-window time between ``start`` and ``end``."""
    if end <= start:
        return 0.0
    if window_length(campaign) == DAY:
        return (end - start).total_seconds()
    total, moment = 0.0, start
    for _day in range(100_000):  # bounded: the loop ends at ``end``
        if moment >= end:
            break
        edge = min(window_edge(campaign, moment), end)
        if in_window(campaign, moment):
            total += (edge - moment).total_seconds()
        moment = edge
    return total


# --- the domain guard -----------------------------------------------------------------------------


def domain_usage(domain: str) -> tuple[int, int, int]:
    """Bulk messages from ``domain`` queued in the last 24 hours across every account, with the
    threshold the admin warns at and the limit an unaligned campaign stops at."""
    domain = normalize_address(domain).lstrip("@")
    since = timezone.now() - quota.WINDOW  # the outbox's own clock (its created_at)
    count = OutboundEmail.objects.filter(
        priority=Priority.BULK, created_at__gte=since, from_email__iendswith=f"@{domain}"
    ).count()
    return count, DOMAIN_WARN, DOMAIN_LIMIT


def domain_guarded(campaign: Campaign) -> bool:
    """Whether the domain guard applies: the From domain is not declared aligned (in
    NEWSLETTER_ALIGNED_DOMAINS or on the campaign)."""
    aligned = {d.lower().lstrip("@") for d in get_setting("NEWSLETTER_ALIGNED_DOMAINS") or ()}
    return not campaign.domain_aligned and from_domain(campaign) not in aligned


# --- the budget of one campaign -------------------------------------------------------------------


@dataclass
class Budget:
    """How fast a campaign may send now, and why it waits (if it does)."""

    accounts: list[AccountBudget] = field(default_factory=list)
    #: seconds a day it sends during (its window's length, or 86,400)
    period: float = DAY
    in_window: bool = True
    #: messages the domain guard still allows today (None: the guard does not apply)
    domain_left: int | None = None
    waiting_reason: str = ""

    @property
    def per_day(self) -> float:
        """Messages a day at full pace (the accounts' shares, and the domain guard's limit)."""
        total = sum(a.share for a in self.accounts)
        if self.domain_left is not None:
            total = min(total, DOMAIN_LIMIT)
        return total

    @property
    def per_second(self) -> float:
        """The pace while the window is open."""
        return self.per_day / self.period

    @property
    def left(self) -> int:
        return sum(a.left for a in self.accounts)


def account_shares(campaign_ids: list[int] | None = None) -> Counter:
    """How many running campaigns send from each account (they share its pace)."""
    shares: Counter = Counter()
    running = Campaign.objects.filter(status=Campaign.Status.RUNNING).select_related("mailing_list")
    if campaign_ids is not None:
        running = running.filter(pk__in=campaign_ids)
    for campaign in running:
        accounts, _reason = sender_accounts(campaign)
        shares.update(_key(a) for a in accounts)
    return shares


def _key(account: GmailAccount) -> Any:
    return account.pk or ("settings", account.email)


def budget(
    campaign: Campaign,
    now: datetime,
    *,
    shares: Counter | None = None,
    settings: MailerSettings | None = None,
) -> Budget:
    """The campaign's accounts, their shares of each account's pace, and what holds it back."""
    settings = settings or mailer_settings(campaign)
    result = Budget(period=window_length(campaign), in_window=in_window(campaign, now))
    accounts, reason = sender_accounts(campaign, settings)
    if not accounts:
        result.waiting_reason = reason
        return result
    if shares is None:
        shares = account_shares()
    for account in accounts:
        item = account_budget(account, settings)
        # A running campaign counts itself in ``shares``; a draft being estimated does not.
        sharing = max(1, shares.get(_key(account), 0) + (campaign.status != "running"))
        item.share = item.capacity / sharing
        if campaign.max_per_day:
            item.share = min(item.share, campaign.max_per_day / len(accounts))
        result.accounts.append(item)
    if domain_guarded(campaign):
        used, _warn, limit = domain_usage(from_domain(campaign))
        result.domain_left = max(0, limit - used)
    if not result.in_window:
        result.waiting_reason = "outside the send window"
    elif result.domain_left == 0:
        result.waiting_reason = (
            f"the domain guard: {from_domain(campaign)} has sent {DOMAIN_LIMIT:,} bulk messages "
            "in 24 hours (Gmail's bulk-sender threshold); confirm SPF, DKIM and DMARC are "
            "aligned to send more"
        )
    elif result.per_day <= 0:
        result.waiting_reason = "its accounts may send no bulk mail (their limits are 0)"
    elif result.left <= 0:
        result.waiting_reason = "its accounts' quota is used up until their window frees"
    return result


# --- the tick -------------------------------------------------------------------------------------


def tick(now: datetime | None = None) -> dict[str, int]:
    """Reconcile and plan every campaign once; return counts (``queued``, ``suppressed``,
    ``failed``, ``campaigns``)."""
    now = now or quota.now()
    totals: Counter = Counter()
    # Paused and cancelled campaigns still learn what became of the mail already queued.
    # (One index probe per stopped campaign, whatever their sizes.)
    in_outbox = CampaignRecipient.objects.filter(campaign=OuterRef("pk"), status=Recipient.QUEUED)
    settling = (
        Campaign.objects.filter(status__in=[Campaign.Status.PAUSED, Campaign.Status.CANCELLED])
        .filter(Exists(in_outbox))
        .values_list("pk", flat=True)
    )
    for pk in list(settling):
        stopped = Campaign.objects.get(pk=pk)
        campaigns.reconcile(stopped)
        paused = stopped.status == Campaign.Status.PAUSED
        campaigns.take_back(stopped, Recipient.PENDING if paused else Recipient.CANCELLED)
    running = list(
        Campaign.objects.filter(status=Campaign.Status.RUNNING).values_list("pk", flat=True)
    )
    shares = account_shares(running)
    for pk in running:
        try:
            totals.update(plan(pk, now, shares=shares))
        except Exception:  # one broken campaign must not stop the others
            logger.exception("The newsletter planner failed on campaign %s", pk)
        totals["campaigns"] += 1
    return dict(totals)


def plan(campaign_id: int, now: datetime, *, shares: Counter | None = None) -> dict[str, int]:
    """Reconcile one running campaign and queue its next slice (one transaction, under the
    campaign's lock); return counts."""
    counts: Counter = Counter()
    with transaction.atomic():
        # The lock: an UPDATE first (PostgreSQL's row lock, SQLite's write lock), so a second
        # tick waits here, then sees what this one queued.
        locked = Campaign.objects.filter(pk=campaign_id, status=Campaign.Status.RUNNING).update(
            updated_at=timezone.now()
        )
        if not locked:
            return {}
        campaign = (
            Campaign.objects.select_for_update(of=("self",))
            .select_related("mailing_list")
            .get(pk=campaign_id)
        )
        campaigns.reconcile(campaign)
        if campaign.status != Campaign.Status.RUNNING or campaigns.finish_if_done(campaign):
            return {}
        try:
            settings = mailer_settings(campaign)
        except ImproperlyConfigured as exc:
            logger.error("Campaign %s cannot be planned: %s", campaign.pk, exc)
            return {}
        plan_budget = budget(campaign, now, shares=shares, settings=settings)
        tick_seconds = float(get_setting("NEWSLETTER_TICK"))
        pace = plan_budget.per_second
        if not plan_budget.in_window or not plan_budget.accounts or pace <= 0:
            # Time outside the window (or while nothing can send) earns nothing.
            _save_plan(campaign, now, 0.0)
            return {}
        if campaign.planned_at is None:
            allowance = max(1.0, pace * tick_seconds)
        else:
            elapsed = window_time(campaign, campaign.planned_at, now)
            allowance = campaign.plan_credit + pace * elapsed
        burst = max(1.0, BURST_TICKS * pace * tick_seconds)
        allowance = min(allowance, burst)
        queued_now = campaign.recipients.filter(status=Recipient.QUEUED).count()
        in_flight_cap = min(
            MAX_IN_FLIGHT, max(MIN_IN_FLIGHT, math.ceil(IN_FLIGHT_TICKS * pace * tick_seconds))
        )
        want = math.floor(allowance)
        room = min(want, plan_budget.left, max(0, in_flight_cap - queued_now))
        if plan_budget.domain_left is not None:
            room = min(room, plan_budget.domain_left)
        if room > 0:
            try:
                # A savepoint: a slice that breaks half-way leaves no recipient claimed
                # ("queued") without its outbox row.
                with transaction.atomic():
                    counts = queue_slice(campaign, plan_budget, room, now, settings)
            except (TemplateProblem, ImproperlyConfigured) as exc:
                # Edited into a broken template, or SITE_URL gone: nothing can be built.
                campaigns.pause(campaign, str(exc), automatic=True)
                return {}
        credit = allowance - counts["queued"]
        if counts["queued"] < want:
            # Held back (quota, in-flight bound, domain guard, nobody left): no credit piles up.
            credit = min(credit, 1.0)
        _save_plan(campaign, now, max(0.0, credit))
        if not counts["queued"]:
            campaigns.finish_if_done(campaign)
    return dict(counts)


def _save_plan(campaign: Campaign, now: datetime, credit: float) -> None:
    campaign.planned_at, campaign.plan_credit = now, credit
    Campaign.objects.filter(pk=campaign.pk).update(planned_at=now, plan_credit=credit)


def _split(accounts: list[AccountBudget], n: int) -> list[AccountBudget]:
    """Assign ``n`` messages to accounts in proportion to their shares, within what each has
    left now; returns one account per message."""
    assigned: Counter = Counter()
    order: list[AccountBudget] = []
    total = sum(a.share for a in accounts) or 1.0
    for i in range(n):
        open_ = [a for a in accounts if assigned[a.email] < a.left]
        if not open_:
            break
        best = max(open_, key=lambda a: a.share / total * (i + 1) - assigned[a.email])
        assigned[best.email] += 1
        order.append(best)
    return order


def queue_slice(
    campaign: Campaign, plan_budget: Budget, n: int, now: datetime, settings: MailerSettings
) -> Counter:
    """Move up to ``n`` pending recipients (lowest ids first) into the outbox; the caller holds
    the campaign's lock and transaction."""
    counts: Counter = Counter()
    senders = _split(plan_budget.accounts, n)
    if not senders:
        return counts
    renderer = Renderer(campaign)
    routers: dict[str, Router] = {}
    mailer = campaign_mailer(campaign)
    # A few rounds: recipients found suppressed (or failing) leave room for the next ones.
    for _round in range(5):
        missing = len(senders) - counts["queued"]
        if missing <= 0:
            break
        # Lowest ids first, read from the (campaign, status, id) index. A range on status, not
        # an equality, and status in the ORDER BY: with "status = pending ORDER BY id"
        # PostgreSQL may walk the primary key from id 1 instead (it assumes pending rows are
        # spread evenly, but those of a campaign under way sit after its sent ones), a walk
        # that grows with the table: 85 ms a tick at 1,000,000 recipients, half sent
        # (benchmarks/newsletters.py). Same rows, same order.
        pending = (Recipient.PENDING, Recipient.PENDING)
        due = list(
            campaign.recipients.filter(status__range=pending).order_by("status", "pk")[:missing]
        )
        if not due:
            break
        due = _drop_suppressed(campaign, due, counts)
        for recipient in due:
            sender = senders[counts["queued"]]
            claimed = CampaignRecipient.objects.filter(
                pk=recipient.pk, status=Recipient.PENDING
            ).update(status=Recipient.QUEUED, account_email=sender.email, queued_at=now)
            if not claimed:
                continue
            try:
                message = renderer.message(recipient)
                router = routers.get(sender.email) or Router(account=sender.email, options=settings)
                routers[sender.email] = router
                with transaction.atomic():
                    (row,) = outbox.queue_messages(
                        [message], router=router, priority=Priority.BULK, mailer=mailer
                    )
            except (GmailSMTPError, ValueError) as exc:  # this recipient's message is bad
                CampaignRecipient.objects.filter(pk=recipient.pk).update(
                    status=Recipient.FAILED, error=str(exc)[:2000], outbound=None
                )
                counts["failed"] += 1
                continue
            CampaignRecipient.objects.filter(pk=recipient.pk).update(outbound=row)
            counts["queued"] += 1
    return counts


def _drop_suppressed(
    campaign: Campaign, due: list[CampaignRecipient], counts: Counter
) -> list[CampaignRecipient]:
    """Mark the recipients suppressed since enrolment (unsubscribed, refused, bounced) and
    return the others: suppression is checked at send time."""
    emails = [r.email for r in due]
    scope = Q(mailing_list__isnull=True)
    if campaign.mailing_list_id:
        scope |= Q(mailing_list_id=campaign.mailing_list_id)
    suppressed = set(
        Suppression.objects.filter(scope, email__in=emails).values_list("email", flat=True)
    )
    subscriber_ids = [r.subscriber_id for r in due if r.subscriber_id]
    if subscriber_ids:
        gone = set(
            Subscriber.objects.filter(pk__in=subscriber_ids)
            .exclude(status=Subscriber.Status.ACTIVE)
            .values_list("pk", flat=True)
        )
    else:
        gone = set()
    dropped = [r.pk for r in due if r.email in suppressed or r.subscriber_id in gone]
    if dropped:
        counts["suppressed"] += CampaignRecipient.objects.filter(
            pk__in=dropped, status=Recipient.PENDING
        ).update(status=Recipient.SUPPRESSED)
    return [r for r in due if r.pk not in set(dropped)]


__all__ = [
    "DOMAIN_LIMIT",
    "DOMAIN_WARN",
    "AccountBudget",
    "Budget",
    "account_budget",
    "budget",
    "domain_usage",
    "from_address",
    "plan",
    "sender_accounts",
    "tick",
]
