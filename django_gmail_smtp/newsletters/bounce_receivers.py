"""What the newsletters do when the bounce reader records a bounce (``signals.email_bounced``).

- A hard bounce (5.x.x) suppresses the address: on the campaign's list, or on every list when
  the message was not a list campaign's (an audience campaign, or the site's own mail), with
  the report as the suppression's detail. Its subscriptions there become "bounced".
- A soft bounce (4.x.x) is counted; after ``BOUNCE_SOFT_LIMIT`` of them within
  :data:`SOFT_BOUNCE_WINDOW` (30 days, from any mail of the site) the address is suppressed
  the same way: a mailbox full once a year never suppresses it.
- The campaign's recipient becomes "bounced", with the reason.
- The circuit breaker counts bounces too: a campaign whose bounced share of the messages it
  sent is over ``NEWSLETTER_BREAKER_RATE`` (judged after ``NEWSLETTER_BREAKER_MINIMUM``)
  pauses itself, saying why.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Count
from django.db.models.functions import Coalesce
from django.dispatch import receiver
from django.utils import timezone

from .. import signals
from ..conf import get_setting
from ..enums import BounceKind
from ..models import Bounce, OutboundEmail, normalize_address
from .models import Campaign, CampaignRecipient, Subscriber, Suppression

logger = logging.getLogger(__name__)

#: Soft bounces older than this no longer count toward ``BOUNCE_SOFT_LIMIT``.
SOFT_BOUNCE_WINDOW = timedelta(days=30)

Recipient = CampaignRecipient.Status


@receiver(signals.email_bounced, dispatch_uid="gmail_smtp_newsletters_bounced")
def on_bounced(
    sender: Any, bounce: Bounce, outbound: OutboundEmail | None = None, **kwargs: Any
) -> None:
    """Suppress, mark and count the bounce (see the module's docstring)."""
    with transaction.atomic():
        campaign = record_bounce(bounce, outbound)
    if campaign is not None:
        check_bounce_rate(campaign)


def record_bounce(bounce: Bounce, outbound: OutboundEmail | None) -> Campaign | None:
    """Apply one bounce to the campaign recipient it is about and to the suppression list;
    return the campaign (None when the message was not a campaign's)."""
    from .campaigns import suppress

    email = normalize_address(bounce.recipient)
    recipient = _campaign_recipient(outbound, email)
    campaign = recipient.campaign if recipient is not None else None
    list_id = campaign.mailing_list_id if campaign is not None else None
    reason = _reason(bounce)
    if recipient is not None:
        CampaignRecipient.objects.filter(pk=recipient.pk).exclude(
            status__in=[Recipient.CANCELLED, Recipient.SUPPRESSED]
        ).update(status=Recipient.BOUNCED, error=reason[:2000])

    if bounce.kind == BounceKind.HARD:
        why = Suppression.Reason.HARD_BOUNCE
    else:
        # By the report's own date when it has one: a first read of an inbox (or one after a
        # UIDVALIDITY change) stores old reports today.
        soft = (
            Bounce.objects.filter(recipient=email, kind=BounceKind.SOFT)
            .annotate(at=Coalesce("reported_at", "created_at"))
            .filter(at__gte=timezone.now() - SOFT_BOUNCE_WINDOW)
            .count()
        )
        if soft < int(get_setting("BOUNCE_SOFT_LIMIT")):
            return campaign
        why = Suppression.Reason.SOFT_BOUNCE
        reason = f"{soft} soft bounces; the last: {reason}"
    detail = f"{reason}\n\n{bounce.report}".strip()
    if suppress(email, why, mailing_list=list_id, campaign=campaign, detail=detail):
        logger.info(
            "%s suppressed (%s) on %s", email, why, f"list {list_id}" if list_id else "every list"
        )
    subscriptions = Subscriber.objects.filter(email=email)
    if list_id is not None:
        subscriptions = subscriptions.filter(mailing_list_id=list_id)
    subscriptions.exclude(status=Subscriber.Status.UNSUBSCRIBED).update(
        status=Subscriber.Status.BOUNCED
    )
    return campaign


def _campaign_recipient(outbound: OutboundEmail | None, email: str) -> CampaignRecipient | None:
    if outbound is None:
        return None
    rows = [outbound.pk] + ([outbound.retry_of_id] if outbound.retry_of_id else [])
    recipients = CampaignRecipient.objects.select_related("campaign").filter(outbound_id__in=rows)
    return recipients.filter(email=email).first() or recipients.first()


def _reason(bounce: Bounce) -> str:
    kind = "hard" if bounce.kind == BounceKind.HARD else "soft"
    code = f" {bounce.code}" if bounce.code else ""
    diagnostic = f": {bounce.diagnostic}" if bounce.diagnostic else ""
    return f"Bounced ({kind}{code}){diagnostic}"


def check_bounce_rate(campaign: Campaign) -> bool:
    """Pause the campaign once more than NEWSLETTER_BREAKER_RATE of the messages it sent
    bounced (judged after NEWSLETTER_BREAKER_MINIMUM sent); True if it paused it."""
    from .campaigns import pause

    counts = dict(
        CampaignRecipient.objects.filter(
            campaign_id=campaign.pk, status__in=[Recipient.SENT, Recipient.BOUNCED]
        )
        .values_list("status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    bounced = counts.get(Recipient.BOUNCED, 0)
    sent = bounced + counts.get(Recipient.SENT, 0)
    rate = float(get_setting("NEWSLETTER_BREAKER_RATE"))
    if sent < int(get_setting("NEWSLETTER_BREAKER_MINIMUM")) or bounced <= rate * sent:
        return False
    campaign.refresh_from_db(fields=["status"])
    if campaign.status != Campaign.Status.RUNNING:
        return False
    try:
        return pause(
            campaign,
            f"{bounced:,} of the {sent:,} messages it sent bounced, more than the {rate:.0%} "
            "NEWSLETTER_BREAKER_RATE allows. Clean the list (bounced addresses are suppressed "
            "already) and check the sender's reputation before resuming.",
            automatic=True,
        )
    except ValueError:  # not running any more (paused or cancelled meanwhile)
        return False
