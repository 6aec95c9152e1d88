"""Sender accounts (with encrypted credentials and health) and the outbox."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from . import enums
from .crypto import EncryptedTextField, UnreadableSecret

APP_PASSWORD_LENGTH = 16


def normalize_app_password(value: str) -> str:
    """Google shows App Passwords as four groups of four; the spaces are not part of it.

    A stored secret that cannot be decrypted is returned as it is, so saving keeps it."""
    if isinstance(value, UnreadableSecret):
        return value
    return "".join((value or "").split())


def normalize_address(value: str) -> str:
    return (value or "").strip().lower()


class LimitsPreset(models.TextChoices):
    GMAIL = "gmail", _("Gmail (consumer): 500 messages a day")
    WORKSPACE = "workspace", _("Google Workspace: 2,000 messages / 10,000 recipients a day")
    WORKSPACE_TRIAL = "workspace_trial", _("Google Workspace trial: 500 messages a day")


@dataclass(frozen=True)
class Limits:
    """An account's sending limits over a rolling 24 hours (``None``: no limit of that kind)."""

    messages: int
    recipients: int | None
    per_message: int
    #: Workspace's unique external recipients a day (2,000; 500 on a trial); None: not limited
    external_recipients: int | None = None


_Limit = TypeVar("_Limit", bound="int | None")

#: Gmail's published limits (they can change; every number is overridable per account)
PRESETS: dict[str, Limits] = {
    LimitsPreset.GMAIL: Limits(messages=500, recipients=None, per_message=100),
    LimitsPreset.WORKSPACE: Limits(
        messages=2000, recipients=10000, per_message=100, external_recipients=2000
    ),
    LimitsPreset.WORKSPACE_TRIAL: Limits(
        messages=500, recipients=None, per_message=100, external_recipients=500
    ),
}


class GmailAccountQuerySet(models.QuerySet):
    def active(self) -> GmailAccountQuerySet:
        return self.filter(is_active=True)

    def eligible(self, *, include_paused: bool = False) -> GmailAccountQuerySet:
        """The accounts that may send, in the order routing prefers them: active ones (paused
        ones after them, with ``include_paused``), the default first, then oldest first.
        Health is not a filter: mail for an account whose credentials are refused waits for it
        rather than going out from another account."""
        accounts = self if include_paused else self.filter(is_active=True)
        return accounts.order_by("-is_active", "-is_default", "pk")


class GmailAccount(models.Model):
    """A Gmail / Google Workspace mailbox the site may send from."""

    class AuthMethod(models.TextChoices):
        APP_PASSWORD = "app_password", _("App Password")
        OAUTH2 = "oauth2", _("OAuth2 (XOAUTH2)")
        SERVICE_ACCOUNT = "service_account", _("Workspace service account")

    Health = enums.Health

    email = models.EmailField(_("address"), unique=True)
    auth_method = models.CharField(
        _("authentication"),
        max_length=20,
        choices=AuthMethod.choices,
        default=AuthMethod.APP_PASSWORD,
    )
    app_password = EncryptedTextField(
        _("App Password"),
        blank=True,
        help_text=_("16 letters from https://myaccount.google.com/apppasswords; spaces ignored."),
    )
    client_id = models.CharField(
        _("OAuth client id"),
        max_length=255,
        blank=True,
        help_text=_('Empty: GMAIL_SMTP["CLIENT_ID"] is used.'),
    )
    client_secret = EncryptedTextField(_("OAuth client secret"), blank=True)
    refresh_token = EncryptedTextField(_("OAuth refresh token"), blank=True)
    access_token = EncryptedTextField(_("OAuth access token"), blank=True)
    token_expiry = models.DateTimeField(_("access token expires"), null=True, blank=True)
    service_account_key = EncryptedTextField(
        _("service account key (JSON)"),
        blank=True,
        help_text=_("The JSON key of a service account with domain-wide delegation."),
    )
    send_as_aliases = models.TextField(
        _("send-as aliases"),
        blank=True,
        help_text=_("Verified 'Send mail as' addresses of this account, one per line."),
    )
    limits_preset = models.CharField(
        _("limits"),
        max_length=20,
        choices=LimitsPreset.choices,
        default=LimitsPreset.GMAIL,
        help_text=_("Gmail's published limits for this kind of account; override any below."),
    )
    daily_limit = models.PositiveIntegerField(
        _("messages per 24 hours"),
        null=True,
        blank=True,
        help_text=_("Empty: the preset's (Gmail 500, Workspace 2,000, Workspace trial 500)."),
    )
    daily_recipient_limit = models.PositiveIntegerField(
        _("recipients per 24 hours"),
        null=True,
        blank=True,
        help_text=_("Empty: the preset's (Workspace 10,000; none published for Gmail)."),
    )
    per_message_recipient_limit = models.PositiveIntegerField(
        _("recipients per message"),
        null=True,
        blank=True,
        help_text=_("Empty: the preset's (100 over SMTP)."),
    )
    is_default = models.BooleanField(
        _("default account"),
        default=False,
        help_text=_("Sends mail whose From address no account can send as."),
    )
    is_active = models.BooleanField(_("active"), default=True)

    health = models.CharField(
        _("health"), max_length=32, choices=Health.choices, default=Health.UNKNOWN
    )
    health_detail = models.TextField(_("last problem"), blank=True)
    health_checked_at = models.DateTimeField(_("health checked"), null=True, blank=True)
    last_sent_at = models.DateTimeField(_("last send"), null=True, blank=True)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    objects = GmailAccountQuerySet.as_manager()

    #: True for the account built from EMAIL_HOST_USER / EMAIL_HOST_PASSWORD (never saved)
    from_settings: bool = False

    class Meta:
        verbose_name = _("Gmail account")
        verbose_name_plural = _("Gmail accounts")
        ordering = ("-is_default", "email")
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"],
                condition=Q(is_default=True),
                name="gmail_smtp_one_default_account",
            )
        ]
        permissions = [
            ("connect_gmailaccount", "Can connect a Gmail account with Google"),
            ("send_test_gmailaccount", "Can send test mail from a Gmail account"),
        ]

    def __str__(self) -> str:
        return self.email

    def __repr__(self) -> str:
        return f"<GmailAccount {self.pk} {self.email!r} auth={self.auth_method}>"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.from_settings:
            raise ValueError("The account built from EMAIL_HOST_USER is not stored.")
        self.email = normalize_address(self.email)
        self.app_password = normalize_app_password(self.app_password)
        super().save(*args, **kwargs)

    # --- addresses -------------------------------------------------------------------------
    def aliases(self) -> list[str]:
        """Send-as aliases, normalized (lower case, no blanks)."""
        raw = self.send_as_aliases.replace(",", "\n").splitlines()
        return [a for a in (normalize_address(x) for x in raw) if a]

    def can_send_as(self, address: str) -> bool:
        address = normalize_address(address)
        return address == normalize_address(self.email) or address in self.aliases()

    # --- validation ------------------------------------------------------------------------
    def clean(self) -> None:
        errors: dict[str, str] = {}
        self.email = normalize_address(self.email)
        self.app_password = normalize_app_password(self.app_password)
        if self.auth_method == self.AuthMethod.APP_PASSWORD:
            if isinstance(self.app_password, UnreadableSecret):
                errors["app_password"] = (
                    "The stored App Password cannot be decrypted with the configured keys "
                    "(ENCRYPTION_KEYS or SECRET_KEY changed). Enter it again."
                )
            elif not self.app_password:
                errors["app_password"] = "An App Password account needs its App Password."
            elif len(self.app_password) != APP_PASSWORD_LENGTH or not self.app_password.isalpha():
                errors["app_password"] = (
                    "An App Password is 16 letters (Google shows it as four groups of four). "
                    "Your account password will not work here."
                )
        elif self.auth_method == self.AuthMethod.SERVICE_ACCOUNT:
            if not self.service_account_key:
                errors["service_account_key"] = "Paste the service account's JSON key."
            else:
                from .credentials import parse_service_account_key

                try:
                    parse_service_account_key(self.service_account_key)
                except ValueError as exc:
                    errors["service_account_key"] = str(exc)
        for alias in self.aliases():
            if "@" not in alias:
                errors["send_as_aliases"] = f"{alias!r} is not an email address."
        if errors:
            raise ValidationError(errors)

    # --- limits and quota ------------------------------------------------------------------
    def limits(self) -> Limits:
        """The effective limits: the preset's, with any number set on the account instead."""
        preset = PRESETS.get(self.limits_preset, PRESETS[LimitsPreset.GMAIL])

        def pick(own: int | None, default: _Limit) -> int | _Limit:
            return default if own is None else own

        return Limits(
            messages=pick(self.daily_limit, preset.messages),
            recipients=pick(self.daily_recipient_limit, preset.recipients),
            per_message=pick(self.per_message_recipient_limit, preset.per_message),
            external_recipients=preset.external_recipients,
        )

    def quota_status(self):  # -> quota.QuotaStatus
        """Used and remaining messages/recipients in the rolling 24 hours, and when slots free."""
        from .quota import quota_status

        return quota_status(self)

    # --- health ----------------------------------------------------------------------------
    def mark_health(self, health: str, detail: str = "", error: Exception | None = None) -> None:
        """Record the outcome of the last login (stored at once, without touching other fields).

        Becoming unhealthy sends ``signals.account_unhealthy`` (once per change), so a site
        can alert someone; becoming healthy releases the mail that waited for the account.
        """
        became_unhealthy = health != self.health and health in (
            self.Health.NEEDS_CONSENT,
            self.Health.CREDENTIALS_REJECTED,
        )
        self.health = health
        self.health_detail = detail
        self.health_checked_at = timezone.now()
        if self.pk and not self.from_settings:
            type(self).objects.filter(pk=self.pk).update(
                health=health, health_detail=detail, health_checked_at=self.health_checked_at
            )
            if health == self.Health.OK:
                self.release_deferred()
        if became_unhealthy:
            from .signals import account_unhealthy

            account_unhealthy.send(type(self), account=self, error=error)

    def release_deferred(self) -> int:
        """Make mail that waited for this account (or the configuration) to be fixed due now
        (the sweeper sends it); return how many rows."""
        from .conf import usable_mailers

        unlinked = Q(account__isnull=True, account_email=normalize_address(self.email))
        owned = (Q(account=self) | unlinked) if self.pk and not self.from_settings else unlinked
        now = timezone.now()
        # A row whose mailer is still broken (its MAILERS entry removed or invalid) stays on
        # its backoff: releasing it on every send would only defer it again, for ever.
        waiting = Q(reason=OutboundEmail.Reason.AUTH) | Q(
            reason=OutboundEmail.Reason.CONFIG, mailer__in=usable_mailers()
        )
        return (
            OutboundEmail.objects.filter(owned, waiting, status=OutboundEmail.Status.DEFERRED)
            .exclude(next_attempt_at__lte=now)  # already due: nothing to write
            .update(next_attempt_at=now)
        )

    @property
    def is_healthy(self) -> bool:
        """False while Gmail or Google refuses the credentials (mail waits, deferred)."""
        return self.health not in (self.Health.NEEDS_CONSENT, self.Health.CREDENTIALS_REJECTED)

    def mark_sent(self, when: datetime | None = None) -> None:
        """Record a successful send. It proves the credentials and the configuration work, so
        outbox mail of this account deferred for either becomes due again (even when the
        account's health did not change, e.g. after a configuration error was fixed)."""
        self.last_sent_at = when or timezone.now()
        if self.pk and not self.from_settings:
            type(self).objects.filter(pk=self.pk).update(last_sent_at=self.last_sent_at)
        self.release_deferred()

    def has_secret(self, field: str) -> bool:
        """Whether a secret is stored in ``field`` (even one no configured key can decrypt)."""
        value = getattr(self, field)
        return bool(value) or isinstance(value, UnreadableSecret)


class SenderQuota(models.Model):
    """The quota ledger's head for one sending address: the lock every reservation takes first.

    Keyed by address rather than by account, so the EMAIL_HOST_USER fallback (which has no
    GmailAccount row) is counted too.
    """

    address = models.EmailField(_("address"), unique=True)
    exhausted_until = models.DateTimeField(_("exhausted until"), null=True, blank=True)
    exhausted_reason = models.TextField(_("why exhausted"), blank=True)
    version = models.BigIntegerField(default=0, editable=False)

    class Meta:
        verbose_name = _("sender quota")
        verbose_name_plural = _("sender quotas")

    def __str__(self) -> str:
        return self.address


class ConnectionSlot(models.Model):
    """One of the connections the site's workers may keep open to an account at once
    (``CONNECTIONS_PER_ACCOUNT``): held, with a lease, by the worker process whose connection
    it is (see :mod:`django_gmail_smtp.slots`). Kept in the quota ledger's database."""

    address = models.EmailField(_("address"))
    number = models.PositiveSmallIntegerField(_("slot"), default=0)
    holder = models.CharField(_("held by"), max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(_("lease expires"), null=True, blank=True)

    class Meta:
        verbose_name = _("connection slot")
        constraints = [
            models.UniqueConstraint(
                fields=["address", "number"], name="gmail_smtp_connection_slot_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.address} #{self.number}: {self.holder or 'free'}"


class QuotaBucket(models.Model):
    """Messages and recipients reserved in one minute; the window sums at most 1,440 of them."""

    quota = models.ForeignKey(SenderQuota, on_delete=models.CASCADE, related_name="buckets")
    minute = models.DateTimeField(_("minute"))
    messages = models.IntegerField(default=0)
    recipients = models.IntegerField(default=0)

    class Meta:
        verbose_name = _("quota bucket")
        constraints = [
            models.UniqueConstraint(fields=["quota", "minute"], name="gmail_smtp_bucket_minute")
        ]

    def __str__(self) -> str:
        return f"{self.quota_id}@{self.minute:%Y-%m-%d %H:%M}"


class QuotaDay(models.Model):
    """Per-day totals of buckets that have left the window (for the 30-day dashboard)."""

    quota = models.ForeignKey(SenderQuota, on_delete=models.CASCADE, related_name="days")
    day = models.DateField(_("day"))
    messages = models.IntegerField(default=0)
    recipients = models.IntegerField(default=0)

    class Meta:
        verbose_name = _("quota day")
        constraints = [
            models.UniqueConstraint(fields=["quota", "day"], name="gmail_smtp_quota_day")
        ]

    def __str__(self) -> str:
        return f"{self.quota_id}@{self.day}"


class OutboundEmail(models.Model):
    """The outbox: one row per message handed to the Celery backend.

    The message is stored as its exact MIME bytes (``mime``) or, for a plain message (text
    and alternatives, no attachments: see :func:`~django_gmail_smtp.routing.draft_of`), as
    its parts (``draft``), checked at queue time and built by the worker, so that queueing it
    costs the caller no build. Either way with the envelope, the account chosen at queue time,
    and everything that happened since.
    """

    Status = enums.Status
    Priority = enums.Priority
    Reason = enums.Reason

    status = models.CharField(
        _("status"), max_length=10, choices=Status.choices, default=Status.QUEUED
    )
    priority = models.CharField(
        _("priority"), max_length=13, choices=Priority.choices, default=Priority.TRANSACTIONAL
    )
    account = models.ForeignKey(
        GmailAccount,
        verbose_name=_("account"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="outbound",
    )
    account_email = models.EmailField(_("sending address"))
    from_email = models.CharField(_("envelope sender"), max_length=320)
    recipients = models.JSONField(_("recipients"), default=list)
    subject = models.CharField(_("subject"), max_length=998, blank=True)
    message_id = models.CharField(_("Message-ID"), max_length=998, blank=True, db_index=True)
    mime = models.BinaryField(_("message"), default=bytes)
    draft = models.JSONField(
        _("unbuilt message"),
        null=True,
        blank=True,
        editable=False,
        help_text=_(
            "A plain message stored as its parts (text, headers with its Date and Message-ID "
            "fixed at queue time), which the worker builds when it sends it; empty when the "
            "exact bytes are stored in 'message'."
        ),
    )
    size = models.PositiveIntegerField(_("size (bytes)"), default=0)
    from_rewritten = models.BooleanField(_("From rewritten"), default=False)
    mailer = models.CharField(
        _("mailer"),
        max_length=100,
        blank=True,
        default="",
        help_text=_(
            "The MAILERS alias of the backend that queued it (empty: EMAIL_BACKEND or a backend "
            "built directly); the worker sends it with that mailer's options."
        ),
    )

    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    next_attempt_at = models.DateTimeField(_("next attempt"), null=True, blank=True)
    enqueued_at = models.DateTimeField(_("handed to Celery"), null=True, blank=True)
    lease_expires_at = models.DateTimeField(_("lease expires"), null=True, blank=True)
    claimed_by = models.CharField(_("worker"), max_length=200, blank=True)
    reason = models.CharField(
        _("reason"), max_length=10, choices=Reason.choices, blank=True, default=""
    )
    last_error = models.TextField(_("last error"), blank=True)
    last_code = models.PositiveSmallIntegerField(_("last reply code"), null=True, blank=True)
    gmail_reply = models.TextField(_("Gmail's reply"), blank=True)
    refused_recipients = models.JSONField(_("refused recipients"), default=dict, blank=True)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)
    bounced_at = models.DateTimeField(
        _("bounced"),
        null=True,
        blank=True,
        help_text=_(
            "When a non-delivery report for it was read back from the account's inbox (see "
            "its bounces). Its status stays 'sent': Gmail accepted it."
        ),
    )
    body_dropped_at = models.DateTimeField(_("body dropped"), null=True, blank=True)
    retry_of = models.ForeignKey(
        "self",
        verbose_name=_("retry of"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="follow_ups",
        help_text=_(
            "The message whose recipients Gmail refused temporarily (4xx) while accepting "
            "others: this row sends the same message to those recipients alone."
        ),
    )
    created_at = models.DateTimeField(_("queued at"), auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("outbound email")
        verbose_name_plural = _("outbox")
        ordering = ("-created_at",)
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="gmail_smtp_outbox_due"),
            models.Index(fields=["account", "status"], name="gmail_smtp_outbox_account"),
        ]
        permissions = [
            ("retry_outboundemail", "Can retry or cancel outbound email"),
            ("view_body_outboundemail", "Can read outbound message bodies"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.subject[:60]!r} -> {len(self.recipients)} recipient(s)"

    def __repr__(self) -> str:
        return f"<OutboundEmail {self.pk} {self.status} {self.account_email}>"


class OutboundAttempt(models.Model):
    """One try at sending an outbound email, and what Gmail answered."""

    Outcome = enums.AttemptOutcome

    outbound = models.ForeignKey(OutboundEmail, on_delete=models.CASCADE, related_name="log")
    at = models.DateTimeField(_("at"), default=timezone.now)
    account_email = models.EmailField(_("account"))
    outcome = models.CharField(_("outcome"), max_length=10, choices=Outcome.choices)
    code = models.PositiveSmallIntegerField(_("reply code"), null=True, blank=True)
    reply = models.TextField(_("reply / reason"), blank=True)
    phase = models.CharField(_("phase"), max_length=20, blank=True)
    worker = models.CharField(_("worker"), max_length=200, blank=True)

    class Meta:
        verbose_name = _("attempt")
        ordering = ("at", "pk")

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.outcome} {self.code or ''}"


class BounceMailbox(models.Model):
    """Where the bounce reader stands in one account's inbox, and whether its IMAP login works.

    Kept apart from the account's own health: an IMAP login refused (IMAP turned off for a
    Workspace user, a token without IMAP access) must not hold back the account's SMTP mail.
    """

    Health = enums.Health

    account = models.OneToOneField(
        GmailAccount,
        verbose_name=_("account"),
        on_delete=models.CASCADE,
        related_name="bounce_mailbox",
    )
    uid_validity = models.BigIntegerField(_("UIDVALIDITY"), null=True, blank=True)
    last_uid = models.BigIntegerField(
        _("last UID read"),
        default=0,
        help_text=_("Messages of the inbox up to this UID have been looked at."),
    )
    health = models.CharField(
        _("IMAP login"), max_length=32, choices=Health.choices, default=Health.UNKNOWN
    )
    health_detail = models.TextField(_("last problem"), blank=True)
    checked_at = models.DateTimeField(_("last tried"), null=True, blank=True)
    last_read_at = models.DateTimeField(_("last read"), null=True, blank=True)

    class Meta:
        verbose_name = _("bounce mailbox")
        verbose_name_plural = _("bounce mailboxes")

    def __str__(self) -> str:
        return f"{self.account_id} inbox"

    def mark_health(self, health: str, detail: str = "") -> None:
        """Record the outcome of the last IMAP login (stored at once, like
        ``GmailAccount.mark_health``; the account's SMTP health is left alone)."""
        self.health = health
        self.health_detail = detail
        self.checked_at = timezone.now()
        if self.pk:
            type(self).objects.filter(pk=self.pk).update(
                health=health, health_detail=detail, checked_at=self.checked_at
            )


class Bounce(models.Model):
    """One recipient of one sent message that a non-delivery report says did not get it.

    Read back from the sending account's inbox by :mod:`django_gmail_smtp.bounces`; one row per
    report and recipient, so reading a report again records nothing new.
    """

    Kind = enums.BounceKind

    account = models.ForeignKey(
        GmailAccount,
        verbose_name=_("account"),
        on_delete=models.CASCADE,
        related_name="bounces",
    )
    outbound = models.ForeignKey(
        OutboundEmail,
        verbose_name=_("outbox row"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="bounces",
    )
    recipient = models.EmailField(_("recipient"), max_length=320, db_index=True)
    kind = models.CharField(_("kind"), max_length=4, choices=Kind.choices)
    code = models.CharField(_("status code"), max_length=16, blank=True)
    diagnostic = models.TextField(_("diagnostic"), blank=True)
    report = models.TextField(_("report"), blank=True)
    report_id = models.CharField(
        _("report ID"),
        max_length=255,
        help_text=_(
            "The report's Message-ID (a hash of it when longer than 255 characters), or its "
            "IMAP UIDVALIDITY and UID when it has none."
        ),
    )
    original_message_id = models.CharField(_("bounced Message-ID"), max_length=998, blank=True)
    reported_at = models.DateTimeField(_("reported"), null=True, blank=True)
    created_at = models.DateTimeField(_("read"), default=timezone.now, db_index=True)

    class Meta:
        verbose_name = _("bounce")
        verbose_name_plural = _("bounces")
        ordering = ("-created_at", "-pk")
        constraints = [
            models.UniqueConstraint(
                fields=["account", "report_id", "recipient"], name="gmail_smtp_bounce_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.recipient} ({self.kind} {self.code})".strip()

    def __repr__(self) -> str:
        return f"<Bounce {self.pk} {self.recipient} {self.kind} {self.code}>"
