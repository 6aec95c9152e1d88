"""The one delivery pipeline: route -> reserve -> send -> classify -> record.

Every message goes through :class:`Pipeline`, built for one mailer's
:class:`~django_gmail_smtp.conf.MailerSettings`:

- ``GmailSMTPBackend.send_messages`` -> :meth:`Pipeline.send_now`: route, reserve quota, send
  (failing over to another account that may send as the From when one has no quota left), and
  record the result on the message and in the ``email_sent`` signal.
- ``CeleryGmailBackend.send_messages`` -> :meth:`Pipeline.queue`: route and refuse bad input at
  once, as the sync backend does, then store the message in the outbox (with the mailer's
  alias) for a worker.
- ``tasks.send_outbound_email`` -> ``outbox.deliver`` -> :func:`deliver_outbound` ->
  :meth:`Pipeline.deliver`: resolve the settings of the mailer that queued the row, reserve,
  send, classify the error (if any) and record the outcome on the row (sent, retry, deferred,
  failed).

The parts it calls each have one job: :mod:`~django_gmail_smtp.routing` (which account),
:mod:`~django_gmail_smtp.quota` (the ledger), :mod:`~django_gmail_smtp.transport` (Gmail),
:mod:`~django_gmail_smtp.outbox` (the rows). The retry policy is :func:`retry_delay` and
:attr:`~django_gmail_smtp.conf.MailerSettings.max_attempts`.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.utils import timezone

from . import outbox, quota, signals
from .conf import DEFAULTS, MailerSettings, for_mailer
from .credentials import settings_account
from .enums import ErrorCategory, Outcome, Priority, Reason
from .exceptions import GmailSMTPError, MessageTooLarge, QuotaExceeded
from .models import GmailAccount, OutboundEmail, normalize_address
from .routing import Envelope, Router, account_key, explicit_account
from .transport import SendResult, Transport, make_transport

logger = logging.getLogger(__name__)

#: builds (or finds) the transport for a mailer's settings; a worker keeps one per settings
TransportFactory = Callable[[MailerSettings], Transport]


# --- classify --------------------------------------------------------------------------------


def classify(error: BaseException) -> ErrorCategory | None:
    """How the pipeline treats ``error``; None for what must not be caught (KeyboardInterrupt,
    SystemExit)."""
    if isinstance(error, GmailSMTPError):
        return ErrorCategory(error.category)
    if isinstance(error, ImproperlyConfigured):
        return ErrorCategory.CONFIG
    if isinstance(error, Exception):
        return ErrorCategory.UNEXPECTED
    return None


def retry_delay(attempts: int, settings: MailerSettings | None) -> float:
    """Seconds before retry number ``attempts``: exponential from ``retry_base_delay`` up to
    ``retry_max_delay``, with "equal jitter" (a random half of it), so retries spread out but
    keep a floor. Without settings (they could not be read): the defaults."""
    base = settings.retry_base_delay if settings else float(DEFAULTS["RETRY_BASE_DELAY"])
    cap = settings.retry_max_delay if settings else float(DEFAULTS["RETRY_MAX_DELAY"])
    delay = min(cap, base * 2 ** max(0, attempts - 1))
    return random.uniform(delay / 2, delay)


def refuse_oversized(envelope: Envelope, settings: MailerSettings, *, action: str) -> None:
    """Raise :class:`MessageTooLarge` for a message over ``MAX_MESSAGE_SIZE`` (by default
    Gmail's advertised SIZE, 35,882,577 bytes): Gmail would refuse it anyway."""
    limit = settings.max_message_size
    size = len(envelope.data)
    if size > limit:
        raise MessageTooLarge(
            f"The message is {size:,} bytes; Gmail accepts at most {limit:,} "
            f'(GMAIL_SMTP["MAX_MESSAGE_SIZE"]), so it was not {action}',
            account=envelope.account.email,
            phase="size",
        )


class Pipeline:
    """route -> reserve -> send -> classify -> record, for one mailer's settings.

    ``transport``: what sends (built from the settings' ``transport_class`` on first use when
    not given). ``sender``: the ``email_sent`` signal's sender, the backend class the message
    went through.
    """

    def __init__(
        self,
        settings: MailerSettings,
        *,
        transport: Transport | None = None,
        sender: type | None = None,
    ) -> None:
        self.settings = settings
        self._transport = transport
        self.sender = sender

    def __repr__(self) -> str:
        return f"<Pipeline {self.settings.source} {self._transport!r}>"

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = make_transport(self.settings)
        return self._transport

    # --- route -------------------------------------------------------------------------------

    def router(self, *, include_paused: bool = False) -> Router:
        """A router for one batch (it caches the account list)."""
        return Router(options=self.settings, include_paused=include_paused)

    def route(
        self, router: Router, message: EmailMessage, default_priority: str, *, action: str
    ) -> tuple[Envelope, Priority]:
        """The message's account, envelope and priority; bad input is refused here, before
        anything is stored or sent (``action`` says which, in the error)."""
        priority = quota.message_priority(message, default_priority)
        envelope = router.route(message)
        assert envelope is not None
        refuse_oversized(envelope, self.settings, action=action)
        return envelope, priority

    # --- reserve -> send ---------------------------------------------------------------------

    def attempt(self, envelope: Envelope, priority: str) -> SendResult:
        """Reserve quota and send. Raises what the ledger or the transport raised; Gmail's own
        550 5.4.5 first marks the account exhausted (``error.next_slot_at`` then says until
        when). The reservation is given back unless Gmail may have kept the message."""
        reservation = quota.reserve(
            envelope.account, len(envelope.recipients), priority=priority, options=self.settings
        )
        try:
            return self.transport.send(envelope)
        except BaseException as exc:
            # When in doubt, count it: no reply to the final "." means Gmail may have kept it.
            if not getattr(exc, "maybe_delivered", False):
                reservation.release()
            if isinstance(exc, QuotaExceeded) and exc.limit == "gmail":
                exc.next_slot_at = quota.mark_exhausted(envelope.account, exc.reply, self.settings)
            raise

    # --- the sync backend: everything now ----------------------------------------------------

    def send_now(self, router: Router, message: EmailMessage, default_priority: str) -> SendResult:
        """Route, reserve, send and record one message now, failing over on quota."""
        envelope, priority = self.route(router, message, default_priority, action="sent")
        tried: list[Any] = []
        while True:
            try:
                result = self.attempt(envelope, priority)
                break
            except QuotaExceeded:
                tried.append(account_key(envelope.account))
                alternative = router.route(message, exclude=tried)
                if alternative is None:
                    raise
                logger.info(
                    "%s has no quota left; sending from %s instead",
                    envelope.account.email,
                    alternative.account.email,
                )
                envelope = alternative
        envelope.account.mark_sent()
        # A documented extra attribute on the caller's message (Django's class does not declare it).
        message.gmail_status = {  # type: ignore[attr-defined]
            "account": envelope.account.email,
            "reply": result.reply,
            "message_id": result.message_id,
            "refused": result.refused,
            "from_rewritten": envelope.from_rewritten,
        }
        # Refused recipients are in message.gmail_status["refused"]; nothing retries them.
        self._sent(envelope.account, result, message=message)
        return result

    # --- the Celery backend: route and refuse now, queue for the worker ----------------------

    def queue(
        self,
        router: Router,
        message: EmailMessage,
        default_priority: str,
        *,
        using: str | None = None,
    ) -> OutboundEmail:
        """Route one message and store it in the outbox (its task is sent on commit)."""
        envelope, priority = self.route(router, message, default_priority, action="queued")
        return outbox.store(
            envelope, message, priority=priority, mailer=self.settings.alias, using=using
        )

    # --- the worker: one claimed outbox row --------------------------------------------------

    def deliver(self, record: outbox.OutboxRecord) -> Outcome:
        """Send one claimed row and record what happened."""
        row = record.row
        try:
            account = self.account_for(row)
        except BaseException as exc:  # e.g. the database, a bad login option: recorded
            return self.settle(record, exc)
        if account is None:
            return record.defer(
                Reason.CONFIG,
                f"No active account {row.account_email} to send from: it was deleted, or the "
                "EMAIL_HOST_USER it came from changed. Add the account again, or cancel the "
                "message.",
                config_retry_at(record, self.settings),
            )
        if not account.is_active:
            return record.defer(
                Reason.AUTH, f"The account {account.email} is paused; resume it to send.", None
            )
        if not account.is_healthy:
            # No login attempt: repeated failed logins make Gmail lock the account (454).
            return record.defer(
                Reason.AUTH,
                f"Waiting for {account.email} to be fixed: "
                f"{account.health_detail or account.health}",
                None,
            )
        envelope = Envelope(
            account=account,
            mail_from=row.from_email,
            recipients=list(row.recipients),
            data=bytes(row.mime),
            message_id=row.message_id,
        )
        try:
            result = self.attempt(envelope, row.priority)
        except BaseException as exc:
            return self.settle(record, exc)
        return self._record_sent(record, account, result)

    def account_for(self, row: OutboundEmail) -> GmailAccount | None:
        """The account a queued row is sent from (None: there is none any more)."""
        login = self.settings.login
        if login is not None and normalize_address(login[0]) == row.account_email:
            # The mailer logs in as a given address (its username/password options): the
            # worker reads the password from the mailer, never from the row or the task.
            return explicit_account(*login)
        if row.account is not None:
            return row.account
        # The account was deleted (the link is gone) and perhaps added again: find it by address.
        account = GmailAccount.objects.filter(email=normalize_address(row.account_email)).first()
        if account is not None:
            OutboundEmail.objects.filter(pk=row.pk).update(account=account)
            return account
        fallback = settings_account()
        if fallback is not None and fallback.email == normalize_address(row.account_email):
            return fallback
        return None

    def settle(self, record: outbox.OutboxRecord, error: BaseException) -> Outcome:
        """Classify a failed attempt and record its outcome (retry, deferred or failed)."""
        category = classify(error)
        if category is None:  # KeyboardInterrupt / SystemExit: the sweeper's lease takes it
            raise error
        assert isinstance(error, Exception)
        text = str(error)
        if category is ErrorCategory.QUOTA:
            until = getattr(error, "next_slot_at", None)
            if until is None:  # the message alone is over a daily limit
                return record.fail(Reason.PERMANENT, text, error)
            return record.defer(Reason.QUOTA, text, until, error)
        if category is ErrorCategory.AUTH:
            return record.defer(Reason.AUTH, text, None, error)
        if category is ErrorCategory.CONFIG:
            return record.defer(Reason.CONFIG, text, config_retry_at(record, self.settings), error)
        if category is ErrorCategory.TEMPORARY:
            if getattr(error, "maybe_delivered", False):
                text += (
                    " This happened after the whole message was sent, so Gmail may have kept "
                    "it: it stays counted against the quota, and is sent again."
                )
            return self.retry_or_fail(record, text, error)
        if category is ErrorCategory.UNEXPECTED:
            logger.exception("Unexpected error sending outbound email %s", record.row.pk)
            text = f"Unexpected error: {type(error).__name__}: {error}"
            return self.retry_or_fail(record, text, error)
        return record.fail(Reason.PERMANENT, text, error)

    def retry_or_fail(self, record: outbox.OutboxRecord, text: str, error: Exception) -> Outcome:
        """Retry on the backoff, or fail the row once it has had ``max_attempts``."""
        row = record.row
        attempts = row.attempts + 1
        if attempts >= self.settings.max_attempts:
            return record.fail(
                Reason.ATTEMPTS,
                f"Gave up after {attempts} attempts; the last one: {text}",
                error,
                attempts=attempts,
            )
        delay = retry_delay(attempts, self.settings)
        record.retry(text, error, attempts=attempts, at=timezone.now() + timedelta(seconds=delay))
        outbox.dispatch(row.pk, row.priority, countdown=delay)
        return Outcome.RETRY

    # --- record ------------------------------------------------------------------------------

    def _record_sent(
        self, record: outbox.OutboxRecord, account: GmailAccount, result: SendResult
    ) -> Outcome:
        follow_up = self._follow_up(record, account, result.refused)
        created = record.sent(account, result, follow_up=follow_up)
        if created is not None and created.next_attempt_at is not None:
            countdown = (created.next_attempt_at - timezone.now()).total_seconds()
            outbox.dispatch(created.pk, created.priority, countdown=max(0.0, countdown))
        self._sent(account, result, outbound=record.row, follow_up=created)
        return Outcome.SENT

    def _follow_up(
        self,
        record: outbox.OutboxRecord,
        account: GmailAccount,
        refused: dict[str, tuple[int, str]],
    ) -> dict[str, Any] | None:
        """The row that retries the recipients Gmail refused temporarily (450 4.2.1: that
        recipient receives too fast) while it accepted the others; None if there are none, or
        if the message has used up ``max_attempts``. Recipients refused for good (5xx) stay
        recorded as refused on the sent row."""
        later = {r: v for r, v in refused.items() if 400 <= v[0] < 500}
        if not later:
            return None
        attempts = record.row.attempts + 1
        if attempts >= self.settings.max_attempts:
            listed = ", ".join(f"{r} ({code} {text})".strip() for r, (code, text) in later.items())
            logger.warning(
                "Outbound email %s: Gmail refused %s temporarily; not retried, the message has "
                "had %d attempts (MAX_ATTEMPTS)",
                record.row.pk,
                listed,
                attempts,
            )
            return None
        at = timezone.now() + timedelta(seconds=retry_delay(attempts, self.settings))
        return record.follow_up(account, later, attempts=attempts, at=at)

    def _sent(
        self,
        account: GmailAccount,
        result: SendResult,
        *,
        message: EmailMessage | None = None,
        outbound: OutboundEmail | None = None,
        follow_up: OutboundEmail | None = None,
    ) -> None:
        signals.email_sent.send(
            self.sender or Pipeline,
            message=message,
            account=account,
            result=result,
            outbound=outbound,
            follow_up=follow_up,
        )


def config_retry_at(record: outbox.OutboxRecord, settings: MailerSettings | None) -> datetime:
    """When to try again after a configuration error: on the retry backoff, growing with each
    deferral, since a fix (a setting, a deleted account added again) may change nothing the app
    is told about. Not counted as a delivery attempt."""
    deferrals = record.deferrals()
    return timezone.now() + timedelta(seconds=retry_delay(deferrals + 1, settings))


def deliver_outbound(
    outbound_id: int,
    *,
    worker: str,
    transport: Transport | None = None,
    transports: TransportFactory | None = None,
) -> Outcome:
    """Claim one outbox row and send it with the settings of the mailer that queued it.

    ``transport``: send with this one whatever the mailer (tests, a caller's own pool);
    else ``transports(settings)`` finds the transport for the row's mailer (a worker keeps one
    per settings), else a new one is built. Returns what happened.
    """
    # Each claim has its own token: worker processes forked from one parent share its pid, so
    # the worker's name alone cannot tell "still my claim" from a sibling's newer one.
    claim = f"{worker}:{uuid.uuid4().hex[:12]}"
    row = outbox.claim(outbound_id, claim)
    if row is None:
        return Outcome.SKIPPED
    record = outbox.OutboxRecord(row, claim)
    try:
        settings = for_mailer(row.mailer)
        if transport is None:
            transport = (transports or make_transport)(settings)
    except Exception as exc:  # a bad setting, or a transport_class that cannot be built
        # Not a delivery attempt: the row waits, on the backoff, for the setting to be fixed.
        return record.defer(Reason.CONFIG, str(exc), config_retry_at(record, None), exc)
    from .backends import CeleryGmailBackend

    pipeline = Pipeline(settings, transport=transport, sender=CeleryGmailBackend)
    return pipeline.deliver(record)


__all__ = [
    "Pipeline",
    "classify",
    "deliver_outbound",
    "refuse_oversized",
    "retry_delay",
]
