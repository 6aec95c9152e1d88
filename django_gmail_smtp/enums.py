"""Every enumerated value of the app, in one place to import them from.

All are ``str``-valued (Django ``TextChoices``), so a member equals its stored string
(``Status.SENT == "sent"``) and old comparisons and database values keep working. The models
use the ones stored in the database (``OutboundEmail.Status`` is :class:`Status`); the others
are what the delivery pipeline says about a message and an error.
"""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class Status(models.TextChoices):
    """Where an outbox row is (``OutboundEmail.status``)."""

    QUEUED = "queued", _("queued")
    SENDING = "sending", _("sending")
    SENT = "sent", _("sent")
    DEFERRED = "deferred", _("deferred")
    FAILED = "failed", _("failed")
    CANCELLED = "cancelled", _("cancelled")


class Priority(models.TextChoices):
    """Transactional mail may use the whole quota; bulk mail leaves ``RESERVED_SHARE`` of it."""

    TRANSACTIONAL = "transactional", _("transactional")
    BULK = "bulk", _("bulk")


class Reason(models.TextChoices):
    """Why an outbox row waits or failed (``OutboundEmail.reason``)."""

    NONE = "", _("none")
    RETRY = "retry", _("temporary failure, retrying")
    QUOTA = "quota", _("waiting for quota")
    AUTH = "auth", _("waiting for the account to be fixed")
    CONFIG = "config", _("waiting for the configuration to be fixed")
    PERMANENT = "permanent", _("refused by Gmail")
    ATTEMPTS = "attempts", _("too many temporary failures")


class Health(models.TextChoices):
    """Whether an account's credentials work (``GmailAccount.health``)."""

    UNKNOWN = "unknown", _("not checked yet")
    OK = "ok", _("ok")
    NEEDS_CONSENT = "needs_consent", _("needs consent again")
    CREDENTIALS_REJECTED = "credentials_rejected", _("credentials rejected")


class BounceKind(models.TextChoices):
    """How a recipient bounced (``Bounce.kind``), from the report's status code: 5.x.x is
    permanent (no such user, domain not found), 4.x.x temporary (mailbox full)."""

    HARD = "hard", _("hard (permanent)")
    SOFT = "soft", _("soft (temporary)")


class AttemptOutcome(models.TextChoices):
    """What one delivery attempt of an outbox row ended in (``OutboundAttempt.outcome``)."""

    SENT = "sent", _("sent")
    RETRY = "retry", _("will retry")
    DEFERRED = "deferred", _("deferred")
    FAILED = "failed", _("failed")


class Outcome(models.TextChoices):
    """What delivering one outbox row did (returned by ``outbox.deliver`` and the task):
    an attempt's outcome, or ``skipped`` when there was nothing to do (another delivery has
    the row, it is not due, or it is finished)."""

    SENT = "sent", _("sent")
    RETRY = "retry", _("will retry")
    DEFERRED = "deferred", _("deferred")
    FAILED = "failed", _("failed")
    SKIPPED = "skipped", _("skipped")


class ErrorCategory(models.TextChoices):
    """How the pipeline treats an error (``GmailSMTPError.category``)."""

    #: the account's credentials were refused: its mail waits until they are fixed
    AUTH = "auth", _("credentials refused")
    #: try again later (4xx, a dropped connection, a timeout)
    TEMPORARY = "temporary", _("temporary")
    #: the account may not send now (our ledger, or Gmail's 550 5.4.5)
    QUOTA = "quota", _("quota")
    #: this message will never be accepted as it is
    PERMANENT = "permanent", _("permanent")
    #: a setting or an account is wrong: waits on the retry backoff until it is fixed
    CONFIG = "config", _("configuration")
    #: not one of ours (a bug, a database error): retried like a temporary failure
    UNEXPECTED = "unexpected", _("unexpected")


__all__ = [
    "AttemptOutcome",
    "BounceKind",
    "ErrorCategory",
    "Health",
    "Outcome",
    "Priority",
    "Reason",
    "Status",
]
