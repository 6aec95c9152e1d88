"""Lists, subscribers, campaigns, their recipients, and the suppression list.

A campaign is addressed to a mailing list or to any queryset of a model with an email field
(:meth:`Campaign.start` takes it). Starting it enrols every address once as a
:class:`CampaignRecipient` (unique per campaign: a campaign can never send twice to one
address); the planner (:mod:`~django_gmail_smtp.newsletters.planner`) then moves the next due
recipients into the outbox at the pace the sender accounts' quotas allow, as bulk mail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..models import OutboundEmail, normalize_address

if TYPE_CHECKING:
    from .campaigns import Progress


class MailingList(models.Model):
    """A list people subscribe to (double opt-in by default)."""

    name = models.CharField(_("name"), max_length=200)
    slug = models.SlugField(
        _("slug"),
        unique=True,
        help_text=_("Used in the subscribe URL and the List-Id header; never change it once used."),
    )
    description = models.TextField(_("description"), blank=True)
    from_email = models.CharField(
        _("From"),
        max_length=320,
        blank=True,
        help_text=_(
            "The default From of its campaigns and confirmation mail, such as "
            "news@example.com, with an optional display name; empty: DEFAULT_FROM_EMAIL."
        ),
    )
    double_opt_in = models.BooleanField(
        _("double opt-in"),
        default=True,
        help_text=_("People who subscribe through the form get mail only after they confirm."),
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        verbose_name = _("mailing list")
        verbose_name_plural = _("mailing lists")
        ordering = ("name",)
        permissions = [("import_subscribers", "Can import subscribers from CSV")]

    def __str__(self) -> str:
        return self.name


class Subscriber(models.Model):
    """One address on one list, its merge fields, its status, and how it consented."""

    class Status(models.TextChoices):
        PENDING = "pending", _("awaiting confirmation")
        ACTIVE = "active", _("subscribed")
        UNSUBSCRIBED = "unsubscribed", _("unsubscribed")
        BOUNCED = "bounced", _("bounced")

    class Consent(models.TextChoices):
        FORM = "form", _("subscribe form")
        IMPORT = "import", _("CSV import")
        ADMIN = "admin", _("added in the admin")
        API = "api", _("added by code")

    mailing_list = models.ForeignKey(
        MailingList,
        verbose_name=_("list"),
        on_delete=models.CASCADE,
        related_name="subscribers",
    )
    email = models.EmailField(_("address"), max_length=320)
    name = models.CharField(_("name"), max_length=200, blank=True)
    fields = models.JSONField(
        _("merge fields"),
        default=dict,
        blank=True,
        help_text=_(
            'Extra values for the templates, e.g. {"city": "Lyon"}: {{ subscriber.fields.city }}.'
        ),
    )
    status = models.CharField(
        _("status"), max_length=12, choices=Status.choices, default=Status.PENDING
    )
    consent_at = models.DateTimeField(_("consent given"), null=True, blank=True)
    consent_method = models.CharField(
        _("consent method"), max_length=10, choices=Consent.choices, default=Consent.ADMIN
    )
    consent_source = models.CharField(
        _("consent source"),
        max_length=500,
        blank=True,
        help_text=_("Where consent came from: the form's page and IP address, the CSV file, ..."),
    )
    confirmed_at = models.DateTimeField(_("confirmed"), null=True, blank=True)
    unsubscribed_at = models.DateTimeField(_("unsubscribed"), null=True, blank=True)
    created_at = models.DateTimeField(_("added"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("subscriber")
        verbose_name_plural = _("subscribers")
        ordering = ("mailing_list", "email")
        constraints = [
            models.UniqueConstraint(
                fields=["mailing_list", "email"], name="gmail_smtp_nl_one_subscription"
            )
        ]
        indexes = [
            models.Index(fields=["mailing_list", "status"], name="gmail_smtp_nl_sub_status"),
        ]

    def __str__(self) -> str:
        return self.email

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.email = normalize_address(self.email)
        super().save(*args, **kwargs)


class Suppression(models.Model):
    """An address that gets no more campaign mail: from one list, or (no list) from any.

    Checked when a campaign enrols its recipients and again when the planner moves each one
    into the outbox, so an unsubscribe stops mail within one planner tick.
    """

    class Reason(models.TextChoices):
        UNSUBSCRIBED = "unsubscribed", _("unsubscribed")
        HARD_BOUNCE = "hard_bounce", _("bounced (permanent)")
        SOFT_BOUNCE = "soft_bounce", _("bounced (repeatedly, temporary)")
        REFUSED = "refused", _("refused by Gmail")
        COMPLAINT = "complaint", _("spam complaint")
        MANUAL = "manual", _("added by hand")

    email = models.EmailField(_("address"), max_length=320)
    mailing_list = models.ForeignKey(
        MailingList,
        verbose_name=_("list"),
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="suppressions",
        help_text=_("Empty: no campaign mail at all to this address."),
    )
    reason = models.CharField(_("reason"), max_length=12, choices=Reason.choices)
    detail = models.TextField(_("detail"), blank=True)
    campaign = models.ForeignKey(
        "Campaign",
        verbose_name=_("campaign"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text=_("The campaign whose mail led to it (its unsubscribe link, its bounce)."),
    )
    created_at = models.DateTimeField(_("added"), default=timezone.now)

    class Meta:
        verbose_name = _("suppressed address")
        verbose_name_plural = _("suppression list")
        ordering = ("-created_at",)
        constraints = [
            models.UniqueConstraint(
                fields=["email"],
                condition=Q(mailing_list__isnull=True),
                name="gmail_smtp_nl_suppressed_everywhere",
            ),
            models.UniqueConstraint(
                fields=["email", "mailing_list"],
                condition=Q(mailing_list__isnull=False),
                name="gmail_smtp_nl_suppressed_on_list",
            ),
        ]

    def __str__(self) -> str:
        return self.email

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.email = normalize_address(self.email)
        super().save(*args, **kwargs)


class Campaign(models.Model):
    """One newsletter: its content, its audience, and where its sending stands."""

    class Status(models.TextChoices):
        DRAFT = "draft", _("draft")
        RUNNING = "running", _("sending")
        PAUSED = "paused", _("paused")
        CANCELLED = "cancelled", _("cancelled")
        FINISHED = "finished", _("finished")

    name = models.CharField(_("name"), max_length=200)
    mailing_list = models.ForeignKey(
        MailingList,
        verbose_name=_("list"),
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="campaigns",
    )
    audience = models.CharField(
        _("audience"),
        max_length=100,
        blank=True,
        help_text=_(
            'Instead of a list: the name of an audience in GMAIL_SMTP["NEWSLETTER_AUDIENCES"] '
            "(a queryset of a model with an email field, such as active users)."
        ),
    )
    from_email = models.CharField(
        _("From"),
        max_length=320,
        blank=True,
        help_text=_(
            "An address such as news@example.com, with an optional display name; empty: the "
            "list's, else DEFAULT_FROM_EMAIL."
        ),
    )
    reply_to = models.CharField(_("Reply-To"), max_length=320, blank=True)
    subject = models.CharField(
        _("subject"), max_length=998, help_text=_("A Django template, like the bodies.")
    )
    text_template = models.TextField(
        _("text"),
        help_text=_(
            "A Django template: {{ subscriber.name }}, {{ subscriber.email }}, "
            "{{ subscriber.fields.city }}, {{ campaign.name }}, {{ unsubscribe_url }}, "
            "{{ archive_url }}. An unsubscribe link is added if it has none."
        ),
    )
    html_template = models.TextField(
        _("HTML"), blank=True, help_text=_("Optional; the same context as the text.")
    )
    mailer = models.CharField(
        _("mailer"),
        max_length=100,
        blank=True,
        help_text=_("The MAILERS alias to queue through (Django 6.1); empty: EMAIL_BACKEND's."),
    )
    seed_emails = models.TextField(
        _("test recipients"),
        blank=True,
        help_text=_("Addresses that get test sends, one per line."),
    )
    max_per_day = models.PositiveIntegerField(
        _("at most per day"),
        null=True,
        blank=True,
        help_text=_("Empty: as fast as the accounts' quotas allow, spread over the day."),
    )
    window_start = models.TimeField(
        _("send from"),
        null=True,
        blank=True,
        help_text=_("Optional daily send window, in TIME_ZONE (e.g. 08:00 to 20:00)."),
    )
    window_end = models.TimeField(_("send until"), null=True, blank=True)
    domain_aligned = models.BooleanField(
        _("SPF, DKIM and DMARC are aligned"),
        default=False,
        help_text=_(
            "Confirm that the From domain passes SPF, DKIM and DMARC, so this campaign may send "
            "more than 5,000 messages a day from it (Gmail's bulk-sender threshold)."
        ),
    )
    archive = models.BooleanField(
        _("public web archive"), default=True, help_text=_("A web page shows the campaign.")
    )

    status = models.CharField(
        _("status"), max_length=10, choices=Status.choices, default=Status.DRAFT
    )
    paused_reason = models.TextField(_("why paused"), blank=True)
    planned_at = models.DateTimeField(_("last planned"), null=True, blank=True, editable=False)
    plan_credit = models.FloatField(default=0.0, editable=False)
    started_at = models.DateTimeField(_("started"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("campaign")
        verbose_name_plural = _("campaigns")
        ordering = ("-created_at",)
        permissions = [
            ("send_campaign", "Can start, pause, resume and cancel campaigns"),
            ("test_send_campaign", "Can send a campaign's test mail"),
        ]

    def __str__(self) -> str:
        return self.name

    # The lifecycle lives in campaigns.py; these are its public names.
    def start(self, audience: models.QuerySet | None = None, **kwargs: Any) -> int:
        """Enrol the audience (the list, the named audience, or ``audience``) and start
        sending; return how many recipients were enrolled."""
        from . import campaigns

        return campaigns.start(self, audience, **kwargs)

    def pause(self, reason: str = "") -> None:
        from . import campaigns

        campaigns.pause(self, reason)

    def resume(self) -> None:
        from . import campaigns

        campaigns.resume(self)

    def cancel(self) -> None:
        from . import campaigns

        campaigns.cancel(self)

    def retry_failed(self) -> int:
        from . import campaigns

        return campaigns.retry_failed(self)

    # Templates call methods without arguments; these must never run from one.
    start.alters_data = pause.alters_data = resume.alters_data = True  # type: ignore[attr-defined]
    cancel.alters_data = retry_failed.alters_data = True  # type: ignore[attr-defined]

    def progress(self) -> Progress:
        from . import campaigns

        return campaigns.progress(self)


class CampaignRecipient(models.Model):
    """One address of a started campaign: at most one per campaign, whatever happens."""

    class Status(models.TextChoices):
        PENDING = "pending", _("waiting")
        QUEUED = "queued", _("in the outbox")
        SENT = "sent", _("sent")
        FAILED = "failed", _("failed")
        SUPPRESSED = "suppressed", _("suppressed")
        CANCELLED = "cancelled", _("cancelled")
        BOUNCED = "bounced", _("bounced")

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="recipients")
    subscriber = models.ForeignKey(
        Subscriber, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    email = models.EmailField(_("address"), max_length=320)
    name = models.CharField(_("name"), max_length=200, blank=True)
    fields = models.JSONField(_("merge fields"), default=dict, blank=True)
    status = models.CharField(
        _("status"), max_length=10, choices=Status.choices, default=Status.PENDING
    )
    outbound = models.ForeignKey(
        OutboundEmail,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        verbose_name=_("outbox row"),
    )
    account_email = models.EmailField(_("sent from"), blank=True)
    error = models.TextField(_("error"), blank=True)
    queued_at = models.DateTimeField(_("queued"), null=True, blank=True)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)

    class Meta:
        verbose_name = _("campaign recipient")
        verbose_name_plural = _("campaign recipients")
        ordering = ("campaign", "pk")
        constraints = [
            models.UniqueConstraint(fields=["campaign", "email"], name="gmail_smtp_nl_once"),
            models.UniqueConstraint(
                fields=["campaign", "subscriber"],
                condition=Q(subscriber__isnull=False),
                name="gmail_smtp_nl_once_per_subscriber",
            ),
        ]
        indexes = [
            models.Index(fields=["campaign", "status", "id"], name="gmail_smtp_nl_due"),
        ]

    def __str__(self) -> str:
        return self.email
