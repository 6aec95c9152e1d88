"""A campaign's lifecycle: start (enrol), pause, resume, cancel, retry failed, progress.

:class:`~django_gmail_smtp.newsletters.models.Campaign`'s methods of the same names call these.
Starting enrols every address of the audience once (streamed in batches, so 100,000 recipients
take seconds and little memory); the planner (:mod:`.planner`) then queues them as the
accounts' quotas allow, and :func:`record_outbound` (called by the outbox's signals and by the
planner's reconcile) records what became of each message.

A campaign is finished only when no recipient is pending or queued.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Iterator
from contextlib import suppress as suppress_error
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.db import IntegrityError, models, transaction
from django.db.models import Count, Exists, OuterRef, Q
from django.utils import timezone
from django.utils.module_loading import import_string

from .. import outbox, quota
from ..conf import get_setting
from ..enums import Status
from ..models import OutboundEmail, normalize_address
from . import signals
from .models import Campaign, CampaignRecipient, MailingList, Subscriber, Suppression

logger = logging.getLogger(__name__)

Recipient = CampaignRecipient.Status
#: recipients enrolled per INSERT (and per suppression look-up)
BATCH = 1000
#: what is still to be sent: a campaign with any of these is not finished
WAITING = (Recipient.PENDING, Recipient.QUEUED)
#: Gmail's replies that pause a campaign at once: "unusual rate" and "blocked as spam"
BREAKER_REPLIES = re.compile(r"\b421[ -]4\.7\.28\b|\b550[ -]5\.7\.1\b")


# --- audiences -----------------------------------------------------------------------------------


def audience_queryset(campaign: Campaign, audience: models.QuerySet | None = None):
    """Who the campaign goes to: ``audience`` (any queryset of a model with an ``email``
    field), else its list's active subscribers, else its named audience
    (``NEWSLETTER_AUDIENCES``). Raises ValueError saying what to set when it has none."""
    if audience is not None:
        _require_email_field(audience.model)
        return audience
    if campaign.mailing_list_id:
        return Subscriber.objects.filter(
            mailing_list_id=campaign.mailing_list_id, status=Subscriber.Status.ACTIVE
        )
    if campaign.audience:
        audiences = get_setting("NEWSLETTER_AUDIENCES") or {}
        path = audiences.get(campaign.audience)
        if path is None:
            raise ValueError(
                f"The audience {campaign.audience!r} is not in "
                f'GMAIL_SMTP["NEWSLETTER_AUDIENCES"] ({", ".join(sorted(audiences)) or "empty"}). '
                "Add it there, or choose a list."
            )
        try:
            queryset = import_string(path)()
        except ImportError as exc:
            raise ValueError(
                f"The audience {campaign.audience!r} names {path!r}, which cannot be imported: "
                f"{exc}"
            ) from None
        if not isinstance(queryset, models.QuerySet):
            raise ValueError(
                f"The audience {campaign.audience!r} ({path}) must return a queryset, not "
                f"{type(queryset).__name__}."
            )
        _require_email_field(queryset.model)
        return queryset
    raise ValueError(
        "The campaign has no audience: choose a list, or an audience from "
        'GMAIL_SMTP["NEWSLETTER_AUDIENCES"], before starting it.'
    )


def _require_email_field(model: type[models.Model]) -> None:
    try:
        model._meta.get_field("email")
    except Exception:
        raise ValueError(
            f"{model._meta.label} has no 'email' field, so it cannot be a campaign's audience."
        ) from None


def _audience_rows(queryset) -> Generator[tuple[int | None, str, str, dict], None, None]:
    """(subscriber id, email, name, merge fields) for each member, streamed."""
    model = queryset.model
    if model is Subscriber:
        rows = queryset.order_by().values_list("pk", "email", "name", "fields")
        for pk, email, name, fields in rows.iterator(chunk_size=BATCH):
            yield pk, email, name, fields or {}
        return
    names = {f.name for f in model._meta.concrete_fields}
    if hasattr(model, "get_full_name"):
        # A user model: its own idea of a full name (it may read any field, so load them all).
        for obj in queryset.order_by().iterator(chunk_size=BATCH):
            yield None, obj.email, str(obj.get_full_name() or "")[:200], {}
    elif "name" in names:
        for email, name in queryset.order_by().values_list("email", "name").iterator(BATCH):
            yield None, email, str(name or "")[:200], {}
    else:
        for email in queryset.order_by().values_list("email", flat=True).iterator(BATCH):
            yield None, email, "", {}


def _suppression_scope(campaign: Campaign) -> Q:
    scope = Q(mailing_list__isnull=True)
    if campaign.mailing_list_id:
        scope |= Q(mailing_list_id=campaign.mailing_list_id)
    return scope


def estimate_size(campaign: Campaign, audience: models.QuerySet | None = None) -> int:
    """How many the audience has now (before deduplication and suppression)."""
    return audience_queryset(campaign, audience).count()


# --- start -----------------------------------------------------------------------------------


def check_templates(campaign: Campaign, sample: CampaignRecipient | None = None) -> None:
    """Render the campaign for ``sample`` (or a made-up subscriber); raise ValueError with the
    template's problem if it cannot be rendered."""
    from .render import Renderer, TemplateProblem

    sample = sample or CampaignRecipient(
        campaign=campaign, email="subscriber@example.com", name="A. Subscriber", fields={}
    )
    try:
        Renderer(campaign).message(sample)
    except TemplateProblem as exc:
        raise ValueError(f"The campaign cannot be started: {exc}") from None


def start(campaign: Campaign, audience: models.QuerySet | None = None, **kwargs: Any) -> int:
    """Enrol the audience and start sending; return how many recipients were enrolled
    (addresses on the suppression list are enrolled too, as suppressed, and counted).

    Refuses (ValueError with a plain message) a campaign that is not a draft, has no
    audience, has nobody in it, or whose templates do not render. Two starts at once: the
    second waits for the first, then refuses.
    """
    if kwargs:
        raise TypeError(f"start() got unexpected arguments: {', '.join(kwargs)}")
    queryset = audience_queryset(campaign, audience)
    with transaction.atomic():
        # The lock (and the check): only a draft becomes running, once.
        if not Campaign.objects.filter(pk=campaign.pk, status=Campaign.Status.DRAFT).update(
            updated_at=timezone.now()
        ):
            campaign.refresh_from_db(fields=["status"])
            raise ValueError(
                f"The campaign is {campaign.get_status_display()}, not a draft: only a draft can "
                "be started. Duplicate it to send it again."
            )
        rows = _audience_rows(queryset)
        try:
            first = next(rows, None)
            if first is None:
                raise ValueError("The audience has nobody in it, so there is nothing to send.")
            check_templates(
                campaign,
                CampaignRecipient(
                    campaign=campaign,
                    subscriber_id=first[0],
                    email=normalize_address(first[1]),
                    name=first[2],
                    fields=first[3],
                ),
            )
            enrolled = enrol(campaign, _chain(first, rows))
        finally:
            # Close the database cursor now (a server-side one on PostgreSQL), inside the
            # transaction it belongs to.
            rows.close()
        now = quota.now()
        Campaign.objects.filter(pk=campaign.pk).update(
            status=Campaign.Status.RUNNING,
            started_at=now,
            finished_at=None,
            paused_reason="",
            planned_at=None,
            plan_credit=0.0,
        )
        campaign.status, campaign.started_at = Campaign.Status.RUNNING, now
        campaign.planned_at, campaign.plan_credit, campaign.paused_reason = None, 0.0, ""
        transaction.on_commit(
            partial(signals.campaign_started.send, Campaign, campaign=campaign, enrolled=enrolled)
        )
    return enrolled


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def enrol(campaign: Campaign, rows: Iterator[tuple[int | None, str, str, dict]]) -> int:
    """Insert one recipient per address (normalized; duplicates and rows without an address
    skipped), suppressed addresses as suppressed; return how many rows the campaign has."""
    scope = _suppression_scope(campaign)
    batch: dict[str, tuple[int | None, str, dict]] = {}

    def flush() -> None:
        if not batch:
            return
        suppressed = set(
            Suppression.objects.filter(scope, email__in=list(batch)).values_list("email", flat=True)
        )
        CampaignRecipient.objects.bulk_create(
            [
                CampaignRecipient(
                    campaign_id=campaign.pk,
                    subscriber_id=subscriber_id,
                    email=email,
                    name=name,
                    fields=fields,
                    status=Recipient.SUPPRESSED if email in suppressed else Recipient.PENDING,
                )
                for email, (subscriber_id, name, fields) in batch.items()
            ],
            batch_size=BATCH,
            ignore_conflicts=True,
        )
        batch.clear()

    for subscriber_id, raw, name, fields in rows:
        email = normalize_address(raw)
        if "@" not in email:
            continue
        batch.setdefault(email, (subscriber_id, name, fields))
        if len(batch) >= BATCH:
            flush()
    flush()
    return CampaignRecipient.objects.filter(campaign_id=campaign.pk).count()


# --- pause, resume, cancel, retry ----------------------------------------------------------------


def _unsent_rows(campaign: Campaign):
    """The outbox rows of the campaign's queued recipients that no worker has taken yet."""
    queued = CampaignRecipient.objects.filter(
        campaign_id=campaign.pk, status=Recipient.QUEUED, outbound__isnull=False
    ).values("outbound_id")
    return OutboundEmail.objects.filter(pk__in=queued, status__in=[Status.QUEUED, Status.DEFERRED])


def pause(campaign: Campaign, reason: str = "", *, automatic: bool = False) -> bool:
    """Stop sending: mail not taken by a worker yet leaves the outbox (its recipients wait
    again); a message being sent finishes. Returns False if the campaign was not running."""
    reason = (reason or "").strip()
    with transaction.atomic():
        if not Campaign.objects.filter(pk=campaign.pk, status=Campaign.Status.RUNNING).update(
            status=Campaign.Status.PAUSED, paused_reason=reason, updated_at=timezone.now()
        ):
            campaign.refresh_from_db()
            if campaign.status == Campaign.Status.PAUSED:
                return False
            raise ValueError(
                f"The campaign is {campaign.get_status_display()}: only a running campaign "
                "can be paused."
            )
        take_back(campaign, Recipient.PENDING)
        campaign.status, campaign.paused_reason = Campaign.Status.PAUSED, reason
        transaction.on_commit(
            partial(
                signals.campaign_paused.send,
                Campaign,
                campaign=campaign,
                reason=reason,
                automatic=automatic,
            )
        )
    if automatic:
        logger.warning("Campaign %s (%s) paused itself: %s", campaign.pk, campaign, reason)
    return True


def take_back(campaign: Campaign, to: str) -> int:
    """Cancel the campaign's unsent outbox rows; their recipients become ``to``. (The planner
    calls it again for paused and cancelled campaigns: a row that was being sent when the
    campaign paused may come back queued for a retry.)"""
    rows = list(_unsent_rows(campaign).values_list("pk", flat=True))
    if not rows:
        return 0
    outbox.cancel(OutboundEmail.objects.filter(pk__in=rows))
    # Only rows the cancel took: a row a worker claimed meanwhile is sending, and is recorded.
    cancelled = OutboundEmail.objects.filter(pk__in=rows, status=Status.CANCELLED)
    return CampaignRecipient.objects.filter(
        campaign_id=campaign.pk, status=Recipient.QUEUED, outbound__in=cancelled
    ).update(status=to, outbound=None, account_email="", queued_at=None)


def resume(campaign: Campaign) -> None:
    """Send again after a pause (the planner picks it up at its next tick)."""
    if not Campaign.objects.filter(pk=campaign.pk, status=Campaign.Status.PAUSED).update(
        status=Campaign.Status.RUNNING,
        paused_reason="",
        planned_at=None,
        plan_credit=0.0,
        updated_at=timezone.now(),
    ):
        campaign.refresh_from_db()
        raise ValueError(
            f"The campaign is {campaign.get_status_display()}: only a paused campaign can be "
            "resumed."
        )
    campaign.status, campaign.paused_reason = Campaign.Status.RUNNING, ""
    campaign.planned_at, campaign.plan_credit = None, 0.0


def cancel(campaign: Campaign) -> None:
    """Stop for good: waiting recipients and unsent outbox mail are cancelled (a message
    being sent finishes)."""
    with transaction.atomic():
        active = [Campaign.Status.DRAFT, Campaign.Status.RUNNING, Campaign.Status.PAUSED]
        if not Campaign.objects.filter(pk=campaign.pk, status__in=active).update(
            status=Campaign.Status.CANCELLED, updated_at=timezone.now()
        ):
            campaign.refresh_from_db()
            raise ValueError(
                f"The campaign is {campaign.get_status_display()}: it cannot be cancelled."
            )
        take_back(campaign, Recipient.CANCELLED)
        CampaignRecipient.objects.filter(campaign_id=campaign.pk, status=Recipient.PENDING).update(
            status=Recipient.CANCELLED
        )
        campaign.status = Campaign.Status.CANCELLED


def retry_failed(campaign: Campaign) -> int:
    """Send again to the recipients that failed (not those suppressed since); a finished
    campaign runs again. Returns how many."""
    campaign.refresh_from_db(fields=["status"])
    if campaign.status in (Campaign.Status.DRAFT, Campaign.Status.CANCELLED):
        raise ValueError(
            f"The campaign is {campaign.get_status_display()}: only a started campaign can "
            "retry its failed recipients."
        )
    with transaction.atomic():
        suppressed = Suppression.objects.filter(_suppression_scope(campaign)).filter(
            email=OuterRef("email")
        )
        count = (
            CampaignRecipient.objects.filter(campaign_id=campaign.pk, status=Recipient.FAILED)
            .exclude(Exists(suppressed))
            .update(status=Recipient.PENDING, outbound=None, error="", queued_at=None)
        )
        if count:
            Campaign.objects.filter(pk=campaign.pk, status=Campaign.Status.FINISHED).update(
                status=Campaign.Status.RUNNING,
                finished_at=None,
                planned_at=None,
                plan_credit=0.0,
                updated_at=timezone.now(),
            )
        campaign.refresh_from_db()
    return count


def finish_if_done(campaign: Campaign) -> bool:
    """Mark a running campaign finished if no recipient is pending or queued (one UPDATE
    that checks both, so it never finishes with mail unsent); return whether it did."""
    waiting = CampaignRecipient.objects.filter(campaign_id=OuterRef("pk"), status__in=WAITING)
    now = quota.now()
    done = (
        Campaign.objects.filter(pk=campaign.pk, status=Campaign.Status.RUNNING)
        .filter(~Exists(waiting))
        .update(status=Campaign.Status.FINISHED, finished_at=now, updated_at=timezone.now())
    )
    if not done:
        return False
    campaign.status, campaign.finished_at = Campaign.Status.FINISHED, now
    counts = dict(campaign.recipients.values_list("status").annotate(n=Count("pk")).order_by())
    summary = f"{counts.get(Recipient.SENT, 0):,} sent, {counts.get(Recipient.FAILED, 0):,} failed"
    transaction.on_commit(
        partial(signals.campaign_finished.send, Campaign, campaign=campaign, reason=summary)
    )
    return True


# --- what became of a message --------------------------------------------------------------------


def breaker_reply(text: str) -> bool:
    """Whether Gmail's reply pauses the campaign at once (421 4.7.28, 550 5.7.1)."""
    return bool(BREAKER_REPLIES.search(" ".join((text or "").split())))


def suppress(
    email: str,
    reason: str,
    *,
    mailing_list: MailingList | int | None = None,
    campaign: Campaign | None = None,
    detail: str = "",
) -> bool:
    """Put ``email`` on the suppression list (of ``mailing_list``, or of every list); return
    False if it already was."""
    list_id = mailing_list.pk if isinstance(mailing_list, MailingList) else mailing_list
    email = normalize_address(email)
    if Suppression.objects.filter(email=email, mailing_list_id=list_id).exists():
        return False
    try:
        with transaction.atomic():
            Suppression.objects.create(
                email=email,
                mailing_list_id=list_id,
                reason=reason,
                campaign=campaign,
                detail=detail[:2000],
            )
    except IntegrityError:  # added meanwhile
        return False
    return True


def _refusal(recipient: CampaignRecipient, row: OutboundEmail) -> tuple[int, str] | None:
    """Gmail's permanent refusal of this recipient (5xx at RCPT), if any."""
    for address, value in (row.refused_recipients or {}).items():
        if normalize_address(address) == recipient.email and value:
            code, text = int(value[0]), str(value[1] if len(value) > 1 else "")
            if 500 <= code < 600 and not breaker_reply(f"{code} {text}"):
                return code, text
    return None


def record_outbound(row: OutboundEmail) -> Campaign | None:
    """Record on its recipient what became of a campaign message's outbox row (sent, failed,
    cancelled, or answered with a reply that pauses the campaign); return the campaign, or
    None when the row is not a campaign's. Safe to call more than once."""
    recipient = (
        CampaignRecipient.objects.select_related("campaign", "campaign__mailing_list")
        .filter(outbound_id=row.pk)
        .first()
    )
    if recipient is None and row.retry_of_id:
        recipient = (
            CampaignRecipient.objects.select_related("campaign", "campaign__mailing_list")
            .filter(outbound_id=row.retry_of_id)
            .first()
        )
    if recipient is None:
        return None
    campaign = recipient.campaign
    if recipient.status != Recipient.QUEUED:
        return campaign
    mine = CampaignRecipient.objects.filter(pk=recipient.pk, status=Recipient.QUEUED)
    text = row.gmail_reply if row.status == Status.SENT else row.last_error
    if row.status == Status.SENT:
        refused = _refusal(recipient, row)
        if refused is not None:
            _refused(campaign, recipient, f"{refused[0]} {refused[1]}")
        elif recipient.email in {normalize_address(a) for a in row.refused_recipients or {}}:
            # Refused for now (4xx): the outbox's follow-up row retries it alone.
            follow_up = OutboundEmail.objects.filter(retry_of=row).order_by("-pk").first()
            if follow_up is not None:
                mine.update(outbound=follow_up)
            else:
                mine.update(status=Recipient.FAILED, error=str(row.refused_recipients)[:2000])
        else:
            mine.update(status=Recipient.SENT, sent_at=row.sent_at or timezone.now(), error="")
    elif row.status == Status.FAILED:
        refused = _refusal(recipient, row)
        if refused is not None:
            _refused(campaign, recipient, f"{refused[0]} {refused[1]}")
        else:
            mine.update(status=Recipient.FAILED, error=(row.last_error or "failed")[:2000])
    elif row.status == Status.CANCELLED:
        # Cancelled in the outbox by hand (a pause or cancel resets its recipients itself).
        mine.update(status=Recipient.CANCELLED, error="cancelled in the outbox")
    replies = [text] + [f"{v[0]} {v[1]}" for v in (row.refused_recipients or {}).values() if v]
    tripped = next((reply for reply in replies if breaker_reply(reply)), None)
    if tripped is not None:
        trip(campaign, _reply_of(tripped))
    elif row.status == Status.FAILED:
        check_refusal_rate(campaign)
    if row.status in (Status.SENT, Status.FAILED, Status.CANCELLED):
        campaign.refresh_from_db(fields=["status"])
        finish_if_done(campaign)
    return campaign


def _reply_of(text: str) -> str:
    """Gmail's reply inside an outbox error text ("... Gmail replied: 421 4.7.28 ...")."""
    marker = "Gmail replied: "
    return text.split(marker, 1)[1] if marker in text else text


def _refused(campaign: Campaign, recipient: CampaignRecipient, reply: str) -> None:
    suppress(
        recipient.email,
        Suppression.Reason.REFUSED,
        mailing_list=campaign.mailing_list_id,
        campaign=campaign,
        detail=f"Gmail refused it: {reply}",
    )
    CampaignRecipient.objects.filter(pk=recipient.pk, status=Recipient.QUEUED).update(
        status=Recipient.FAILED, error=f"Gmail refused the address: {reply}"[:2000]
    )


def trip(campaign: Campaign, reply: str) -> None:
    """The circuit breaker: pause the campaign with Gmail's reply as the reason."""
    reason = f"Gmail answered {' '.join(reply.split())[:500]}"
    with suppress_error(ValueError):  # not running any more (paused or cancelled meanwhile)
        pause(campaign, reason, automatic=True)


def check_refusal_rate(campaign: Campaign) -> None:
    """Pause the campaign once more than NEWSLETTER_BREAKER_RATE of its messages were refused
    for good (judged after NEWSLETTER_BREAKER_MINIMUM messages)."""
    counts = dict(
        CampaignRecipient.objects.filter(
            campaign_id=campaign.pk, status__in=[Recipient.SENT, Recipient.FAILED]
        )
        .values_list("status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    failed = counts.get(Recipient.FAILED, 0)
    total = failed + counts.get(Recipient.SENT, 0)
    rate = float(get_setting("NEWSLETTER_BREAKER_RATE"))
    if total >= int(get_setting("NEWSLETTER_BREAKER_MINIMUM")) and failed > rate * total:
        with suppress_error(ValueError):
            pause(
                campaign,
                f"{failed:,} of its {total:,} messages were refused, more than the "
                f"{rate:.0%} NEWSLETTER_BREAKER_RATE allows. Check the list and the sender's "
                "reputation before resuming.",
                automatic=True,
            )


def reconcile(campaign: Campaign) -> int:
    """Bring the campaign's queued recipients up to date with their outbox rows (the signal
    receivers do the same as it happens; this catches any they missed). Bounded by what is in
    flight. Returns how many rows were settled."""
    queued = CampaignRecipient.objects.filter(campaign_id=campaign.pk, status=Recipient.QUEUED)
    orphans = queued.filter(outbound__isnull=True).update(
        status=Recipient.FAILED, error="Its outbox row was deleted before it was sent."
    )
    rows = OutboundEmail.objects.filter(pk__in=queued.values("outbound_id")).filter(
        Q(status__in=outbox.FINAL_STATES)
        | Q(last_code__in=[421, 550], status__in=[Status.QUEUED, Status.DEFERRED])
    )
    settled = orphans
    for row in rows:
        record_outbound(row)
        settled += 1
    if settled:
        campaign.refresh_from_db(fields=["status", "paused_reason", "finished_at"])
    return settled


# --- progress ----------------------------------------------------------------------------------


@dataclass
class AccountProgress:
    """One sender account's part of a campaign."""

    email: str
    sent: int = 0
    queued: int = 0
    #: its messages to this campaign's recipients that bounced (read back by the bounce reader)
    bounced: int = 0
    #: the messages a day it sends of this campaign at full pace
    capacity_per_day: int = 0


@dataclass
class Progress:
    """Where a campaign stands, counted in messages (see :func:`progress`)."""

    total: int = 0
    pending: int = 0
    queued: int = 0
    sent: int = 0
    failed: int = 0
    suppressed: int = 0
    cancelled: int = 0
    bounced: int = 0
    #: when the last message should go out (None: nothing left, or it cannot send now)
    eta: datetime | None = None
    #: messages a day it sends at (across its accounts, within its send window)
    rate_per_day: int = 0
    accounts: list[AccountProgress] = field(default_factory=list)
    #: why it is not sending now ("" when it is)
    waiting_reason: str = ""
    finished: bool = False
    #: for the domain guard: bulk messages from its From domain in 24 hours, and the limits
    domain: str = ""
    domain_usage: tuple[int, int, int] | None = None
    at: datetime | None = None

    @property
    def remaining(self) -> int:
        return self.pending + self.queued

    @property
    def done(self) -> int:
        return self.total - self.remaining

    @property
    def percent(self) -> float:
        """Share of recipients handled (sent, failed, suppressed, ...), 0 to 100."""
        return 100.0 if not self.total else round(100.0 * self.done / self.total, 1)

    def describe(self, *, with_reason: bool = True) -> str:
        """One line for people: "about 3 days 4 hours at 450/day across 1 account".

        ``with_reason=False``: without why it waits, for a page that says that on a line of
        its own (then "" when there is no pace to tell, e.g. while it cannot send)."""
        if self.finished:
            return f"finished: {self.sent:,} sent, {self.failed:,} failed"
        if not self.remaining:
            return "nothing left to send"
        n = len(self.accounts)
        pace = f"at {self.rate_per_day:,}/day across {n} account{'s' if n != 1 else ''}"
        if self.eta is None:
            if not with_reason:
                return ""
            return f"waiting: {self.waiting_reason or 'it cannot send now'}"
        start = self.at or timezone.now()
        text = f"about {duration((self.eta - start).total_seconds())} {pace}"
        if self.waiting_reason and with_reason:
            text += f" (waiting now: {self.waiting_reason})"
        return text


def duration(seconds: float) -> str:
    """Like "3 days 4 hours", "5 hours 10 minutes", "12 minutes", "less than a minute"."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60

    def unit(n: int, name: str) -> str:
        return f"{n} {name}{'s' if n != 1 else ''}"

    if days:
        return unit(days, "day") + (f" {unit(hours, 'hour')}" if hours else "")
    if hours:
        return unit(hours, "hour") + (f" {unit(minutes, 'minute')}" if minutes else "")
    if minutes:
        return unit(minutes, "minute")
    return "less than a minute"


def progress(campaign: Campaign) -> Progress:
    """Counts by status (one GROUP BY), the per-account split, the pace and the ETA: from the
    ledger (what each account has left now) and the accounts' pace, counting send-window time
    only. For a draft, from the audience's size (see :func:`estimate`)."""
    if campaign.status == Campaign.Status.DRAFT:
        return estimate(campaign)
    counts = dict(campaign.recipients.values_list("status").annotate(n=Count("pk")).order_by())
    result = Progress(
        total=sum(counts.values()),
        pending=counts.get(Recipient.PENDING, 0),
        queued=counts.get(Recipient.QUEUED, 0),
        sent=counts.get(Recipient.SENT, 0),
        failed=counts.get(Recipient.FAILED, 0),
        suppressed=counts.get(Recipient.SUPPRESSED, 0),
        cancelled=counts.get(Recipient.CANCELLED, 0),
        bounced=counts.get(Recipient.BOUNCED, 0),
        finished=campaign.status == Campaign.Status.FINISHED,
    )
    # A bounced recipient keeps the account that sent it: bounces count per account too.
    by_status = {Recipient.SENT: "sent", Recipient.QUEUED: "queued", Recipient.BOUNCED: "bounced"}
    split = (
        campaign.recipients.filter(status__in=list(by_status))
        .values_list("account_email", "status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    per_account: dict[str, AccountProgress] = {}
    for email, status, n in split:
        item = per_account.setdefault(email, AccountProgress(email))
        setattr(item, by_status[status], n)
    _forecast(campaign, result, per_account)
    return result


def estimate(campaign: Campaign, audience: models.QuerySet | None = None) -> Progress:
    """The forecast for a campaign not started yet: its audience's size (suppressed addresses
    and duplicates are found at start), the pace and the ETA if it started now."""
    try:
        size = estimate_size(campaign, audience)
        reason = ""
    except ValueError as exc:
        size, reason = 0, str(exc)
    result = Progress(total=size, pending=size)
    _forecast(campaign, result, {})
    result.waiting_reason = reason or result.waiting_reason
    return result


def _forecast(
    campaign: Campaign, result: Progress, per_account: dict[str, AccountProgress]
) -> None:
    from . import planner

    now = quota.now()
    result.at = now
    result.domain = planner.from_domain(campaign)
    if result.domain:
        result.domain_usage = planner.domain_usage(result.domain)
    try:
        plan = planner.budget(campaign, now)
    except Exception as exc:  # a broken setting: say it rather than fail the admin page
        logger.exception("Could not forecast campaign %s", campaign.pk)
        result.waiting_reason = str(exc)
        plan = None
    for item in plan.accounts if plan else ():
        entry = per_account.setdefault(item.email, AccountProgress(item.email))
        entry.capacity_per_day = int(item.share)
    result.accounts = list(per_account.values())
    if plan is None:
        return
    result.rate_per_day = int(plan.per_day)
    result.waiting_reason = "" if _on_pace(plan, now) else plan.waiting_reason
    if campaign.status == Campaign.Status.PAUSED:
        result.waiting_reason = paused_text(campaign)
    elif campaign.status == Campaign.Status.CANCELLED:
        result.waiting_reason = "cancelled"
    if campaign.status in (Campaign.Status.PAUSED, Campaign.Status.CANCELLED):
        return
    if not result.remaining or plan.per_second <= 0 or not plan.accounts:
        return
    begin = now
    if plan.left <= 0:
        slots = [a.next_slot_at for a in plan.accounts if a.next_slot_at]
        begin = max(now, min(slots)) if slots else now
    if plan.domain_left == 0:
        begin = max(begin, now + quota.WINDOW / 24)  # the guard frees as old mail ages out
    result.eta = planner.advance(campaign, begin, result.remaining / plan.per_second)


def _on_pace(plan: Any, now: datetime) -> bool:
    """Whether accounts with no room now only keep the campaign on its pace: their window is
    full (of its own mail, sent evenly) and frees a slot before the pace (or the planner's next
    tick) asks for the next message, or their room is only taken by mail in the outbox. Then
    nothing holds it back, and there is no waiting to tell of."""
    if plan.left > 0 or not plan.in_window or plan.domain_left == 0 or plan.per_second <= 0:
        return False
    slots = [a.next_slot_at for a in plan.accounts if a.next_slot_at]
    if not slots:
        return True  # the ledger has room; mail in the outbox takes it until it is sent
    interval = max(1.0 / plan.per_second, float(get_setting("NEWSLETTER_TICK")))
    return min(slots) <= now + timedelta(seconds=interval)


def paused_text(campaign: Campaign) -> str:
    """A paused campaign's state, said once: its reason when that says it was paused ("Paused
    by alice on 2026-01-31 14:02 UTC."), else "Paused: " and the reason (the circuit
    breaker's, or the one given)."""
    reason = (campaign.paused_reason or "").strip()
    if not reason:
        return "Paused."
    if reason.lower().startswith("paused"):
        return reason
    return f"Paused: {reason}"


__all__ = [
    "AccountProgress",
    "Progress",
    "audience_queryset",
    "cancel",
    "duration",
    "enrol",
    "estimate",
    "finish_if_done",
    "pause",
    "paused_text",
    "progress",
    "reconcile",
    "record_outbound",
    "resume",
    "retry_failed",
    "start",
    "suppress",
]
