"""Subscribing, confirming (double opt-in) and unsubscribing: the services the public views
(and a site's own code) call.

Privacy: :func:`subscribe` behaves the same, as seen from outside, whether the address was
unknown, waiting for confirmation, subscribed or unsubscribed, so the form cannot be used to
find out who is on a list. An address that unsubscribed is only subscribed again once it
confirms from its own mailbox.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, models, transaction
from django.db.models import F, Q
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .. import outbox
from ..conf import get_setting
from ..enums import Status as OutboxStatus
from ..models import OutboundEmail, normalize_address
from . import render, signals, tokens
from .models import Campaign, CampaignRecipient, MailingList, Subscriber, Suppression

logger = logging.getLogger(__name__)

#: a pending address gets at most one confirmation mail in this time, however often the form
#: is sent (nobody can flood a mailbox through it)
CONFIRM_RESEND_AFTER = timedelta(minutes=15)
TEMPLATES = "django_gmail_smtp/newsletters/"


class TooManyConfirmations(Exception):
    """The site sent ``NEWSLETTER_CONFIRMATIONS_PER_HOUR`` confirmation mails in the last hour:
    a script filling in the subscribe form would otherwise use up the account's daily quota
    (confirmations are transactional mail, like password resets)."""


class UnsubscribeMethod(models.TextChoices):
    """How an address unsubscribed (recorded in its suppression's detail)."""

    ONE_CLICK = "one-click", _("one-click unsubscribe (List-Unsubscribe-Post)")
    PAGE = "page", _("the unsubscribe page")
    MAILTO = "mailto", _("an unsubscribe email (List-Unsubscribe mailto)")


def _label(how: str) -> str:
    try:
        return str(UnsubscribeMethod(how).label)
    except ValueError:  # a site's own method name
        return str(how)


# --- subscribe and confirm ----------------------------------------------------------------------


def subscribe(
    mailing_list: MailingList,
    email: str,
    name: str = "",
    fields: dict | None = None,
    *,
    source: str = "",
) -> Subscriber:
    """Subscribe ``email`` to ``mailing_list`` through a form (consent: now, FORM, ``source``
    such as the page's URL and the visitor's IP address).

    A double opt-in list, or an address that unsubscribed before, gets a confirmation mail
    (through the site's own email backend, as transactional mail) and stays PENDING until it
    confirms; a single opt-in list makes a new address ACTIVE at once. An address already
    active gets no mail and nothing changes. Raises :class:`ValueError` for an address that
    is not valid.
    """
    email = normalize_address(email)
    try:
        validate_email(email)
    except ValidationError as exc:
        raise ValueError(f"{email!r} is not a valid email address.") from exc
    now = timezone.now()
    send_confirmation = False
    with transaction.atomic():
        subscriber = (
            Subscriber.objects.select_for_update()
            .filter(mailing_list=mailing_list, email=email)
            .first()
        )
        if subscriber is not None and subscriber.status == Subscriber.Status.ACTIVE:
            # Nothing to do, and nothing that shows it from outside (no second mail).
            return subscriber
        was_unsubscribed = Suppression.objects.filter(
            email=email, mailing_list=mailing_list, reason=Suppression.Reason.UNSUBSCRIBED
        ).exists()
        if subscriber is None:
            subscriber = Subscriber(mailing_list=mailing_list, email=email)
        elif subscriber.status == Subscriber.Status.PENDING:
            # Asked again before confirming: the mail may have been lost, send it again,
            # but not more often than CONFIRM_RESEND_AFTER.
            if subscriber.updated_at and now - subscriber.updated_at < CONFIRM_RESEND_AFTER:
                return subscriber
        else:
            was_unsubscribed = True  # unsubscribed or bounced: only its owner may undo it
        if name and (subscriber.pk is None or not subscriber.name):
            subscriber.name = name[:200]
        if fields and subscriber.pk is None:
            subscriber.fields = dict(fields)
        subscriber.consent_at = now
        subscriber.consent_method = Subscriber.Consent.FORM
        subscriber.consent_source = (source or "")[:500]
        if mailing_list.double_opt_in or was_unsubscribed:
            subscriber.status = Subscriber.Status.PENDING
            send_confirmation = True
        else:
            subscriber.status = Subscriber.Status.ACTIVE
            subscriber.confirmed_at = now
        subscriber.unsubscribed_at = None
        subscriber.save()
    if send_confirmation:
        limit = get_setting("NEWSLETTER_CONFIRMATIONS_PER_HOUR")
        # Form sign-ups of the last hour that were mailed (still waiting, or confirmed since).
        mailed = Q(status=Subscriber.Status.PENDING) | Q(
            status=Subscriber.Status.ACTIVE, confirmed_at__gt=F("consent_at")
        )
        sent = (
            Subscriber.objects.filter(mailed)
            .filter(consent_method=Subscriber.Consent.FORM, consent_at__gt=now - timedelta(hours=1))
            .count()
        )  # this one included
        if limit is not None and sent > limit:
            # Kept waiting without mail; the form sent again later mails it at once.
            Subscriber.objects.filter(pk=subscriber.pk).update(
                updated_at=now - CONFIRM_RESEND_AFTER
            )
            logger.warning(
                "Subscribe form: %d confirmation mails in the last hour, more than "
                'GMAIL_SMTP["NEWSLETTER_CONFIRMATIONS_PER_HOUR"] = %d; no mail sent to this '
                "sign-up for list %s (raise the setting if these sign-ups are real)",
                sent - 1,
                limit,
                mailing_list.slug,
            )
            raise TooManyConfirmations(
                "The subscribe form sent its hourly number of confirmation mails."
            )
        try:
            send_confirmation_mail(subscriber)
        except Exception:
            # Not sent: let the next try send it at once (see CONFIRM_RESEND_AFTER).
            Subscriber.objects.filter(pk=subscriber.pk).update(
                updated_at=now - CONFIRM_RESEND_AFTER
            )
            raise
    return subscriber


def send_confirmation_mail(subscriber: Subscriber) -> None:
    """Mail ``subscriber`` its confirmation link, as transactional mail through the site's
    email backend (``send_mail``). Its errors are raised (the visitor is told to try again)."""
    mailing_list = subscriber.mailing_list
    context = {
        "subscriber": subscriber,
        "mailing_list": mailing_list,
        "confirm_url": render.confirm_url(subscriber),
        "days": tokens.CONFIRM_MAX_AGE.days,
    }
    subject = render_to_string(TEMPLATES + "confirm_subject.txt", context)
    body = render_to_string(TEMPLATES + "confirm_email.txt", context)
    send_mail(
        " ".join(subject.split()),
        body,
        mailing_list.from_email or settings.DEFAULT_FROM_EMAIL,
        [subscriber.email],
    )


def confirm(token: str) -> Subscriber | None:
    """Confirm the subscription a confirmation token names: PENDING becomes ACTIVE (and an
    earlier unsubscribe from this list is lifted). ``None`` when the token is not valid or
    expired, or the subscription is gone or no longer waiting (unsubscribed, bounced)."""
    found = tokens.read_confirm_token(token)
    if found is None:
        return None
    subscriber_id, email = found
    with transaction.atomic():
        subscriber = Subscriber.objects.select_for_update().filter(pk=subscriber_id).first()
        if subscriber is None or subscriber.email != normalize_address(email):
            return None
        if subscriber.status == Subscriber.Status.ACTIVE:
            return subscriber
        if subscriber.status != Subscriber.Status.PENDING:
            return None
        subscriber.status = Subscriber.Status.ACTIVE
        subscriber.confirmed_at = timezone.now()
        subscriber.save(update_fields=["status", "confirmed_at", "updated_at"])
        # Confirmed from its own mailbox: its earlier unsubscribe from this list no longer
        # stands. A bounce or a global suppression does.
        Suppression.objects.filter(
            email=subscriber.email,
            mailing_list=subscriber.mailing_list,
            reason=Suppression.Reason.UNSUBSCRIBED,
        ).delete()
    return subscriber


# --- unsubscribe --------------------------------------------------------------------------------


def unsubscribe(token: str, *, how: str = UnsubscribeMethod.PAGE) -> bool:
    """Unsubscribe the address an unsubscribe token names from the campaign's list (from all
    campaign mail when the campaign was sent to a queryset, or was deleted since); ``how``:
    an :class:`UnsubscribeMethod`. Returns False, changing nothing, for a token that is not
    valid; True otherwise, also when it was already unsubscribed (idempotent).

    Effects: a :class:`Suppression` (reason unsubscribed), the subscriptions concerned set
    UNSUBSCRIBED, and the address's mail not sent yet in running or paused campaigns
    cancelled (a message being sent at that moment is left), so no further mail goes out.
    """
    found = tokens.read_unsubscribe_token(token)
    if found is None:
        return False
    campaign_id, email = found
    email = normalize_address(email)
    campaign = Campaign.objects.select_related("mailing_list").filter(pk=campaign_id).first()
    mailing_list = campaign.mailing_list if campaign is not None else None
    now = timezone.now()
    with transaction.atomic():
        created = _suppress(email, mailing_list, campaign, how, now)
        subscriptions = Subscriber.objects.filter(email=email).exclude(
            status=Subscriber.Status.UNSUBSCRIBED
        )
        if mailing_list is not None:
            subscriptions = subscriptions.filter(mailing_list=mailing_list)
        changed = subscriptions.update(
            status=Subscriber.Status.UNSUBSCRIBED, unsubscribed_at=now, updated_at=now
        )
        stopped = stop_pending_mail(email, mailing_list, reason=_label(how))
    if created or changed:
        logger.info(
            "%s unsubscribed from %s through %s",
            email,
            mailing_list or "every campaign",
            _label(how),
        )
        signals.subscriber_unsubscribed.send(
            Suppression, email=email, mailing_list=mailing_list, campaign=campaign, how=how
        )
    elif stopped:
        logger.info("%s: %d campaign messages not sent yet were stopped", email, stopped)
    return True


def _suppress(
    email: str,
    mailing_list: MailingList | None,
    campaign: Campaign | None,
    how: str,
    now,
) -> bool:
    """Add the unsubscribe suppression unless one (for any reason) is there; True if added."""
    existing = Suppression.objects.filter(email=email)
    existing = (
        existing.filter(mailing_list=mailing_list)
        if mailing_list is not None
        else existing.filter(mailing_list__isnull=True)
    )
    if existing.exists():
        return False
    detail = f"Through {_label(how)}"
    if campaign is not None:
        detail += f" in campaign {campaign.name!r}"
    else:
        detail += " of a campaign deleted since (so from every campaign)"
    try:
        # A savepoint: the same link clicked twice at once must not break the transaction.
        with transaction.atomic():
            Suppression.objects.create(
                email=email,
                mailing_list=mailing_list,
                reason=Suppression.Reason.UNSUBSCRIBED,
                detail=detail,
                campaign=campaign,
                created_at=now,
            )
    except IntegrityError:
        return False
    return True


def stop_pending_mail(email: str, mailing_list: MailingList | None, *, reason: str = "") -> int:
    """Stop the campaign mail to ``email`` not sent yet: in running or paused campaigns of
    ``mailing_list`` (of every campaign when None), waiting recipients become SUPPRESSED and
    queued ones whose outbox row could be cancelled too (a row being sent is left). Returns
    how many recipients were stopped."""
    recipients = CampaignRecipient.objects.filter(
        email=normalize_address(email),
        campaign__status__in=[Campaign.Status.RUNNING, Campaign.Status.PAUSED],
    )
    if mailing_list is not None:
        recipients = recipients.filter(campaign__mailing_list=mailing_list)
    error = f"Unsubscribed ({reason}) before it was sent." if reason else "Unsubscribed."
    stopped = recipients.filter(status=CampaignRecipient.Status.PENDING).update(
        status=CampaignRecipient.Status.SUPPRESSED, error=error
    )
    queued = recipients.filter(status=CampaignRecipient.Status.QUEUED, outbound__isnull=False)
    outbound_ids = list(queued.values_list("outbound_id", flat=True))
    if outbound_ids:
        outbox.cancel(OutboundEmail.objects.filter(pk__in=outbound_ids))
        cancelled = OutboundEmail.objects.filter(
            pk__in=outbound_ids, status=OutboxStatus.CANCELLED
        ).values_list("pk", flat=True)
        stopped += queued.filter(Q(outbound_id__in=list(cancelled))).update(
            status=CampaignRecipient.Status.SUPPRESSED, error=error
        )
    return stopped
