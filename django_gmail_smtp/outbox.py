"""The transactional outbox: queue messages, deliver one, sweep what is due.

The Celery backend and tasks are thin wrappers around these functions:

- :func:`queue_messages` routes each message, stores its exact bytes as an
  :class:`~django_gmail_smtp.models.OutboundEmail` inside the caller's transaction, and hands
  only the row id to Celery once that transaction commits.
- :func:`deliver` claims a row atomically, reserves quota, sends it over a pooled connection,
  and records the outcome by the class of Gmail's answer (sent, retry, deferred, failed).
- :func:`sweep` re-enqueues what is due: deferred rows whose time has come, queued rows whose
  task never reached the broker, and rows left ``sending`` past their lease.

Each outcome (the row's new state, its attempt-log entry and, for recipients Gmail refused
temporarily, the follow-up row that retries them) is written in one transaction: no reader sees
``sent`` without its attempt. A database connection lost while recording is retried on a fresh
connection for up to ``RECORD_RETRY_SECONDS`` (30 s).

Delivery is at-least-once. A message is sent twice only if, after Gmail's 250 reply and before
the row is marked sent, the worker dies or the database stays unreachable for longer than
``RECORD_RETRY_SECONDS``: the row is then re-queued when its lease (``SENDING_LEASE``) runs
out, and sent again. A connection that drops (or a reply that times out) after the whole message
was uploaded is also retried, since Gmail may have kept it; such a message stays counted
against the quota.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.db import InterfaceError, OperationalError, connections, transaction
from django.db import router as db_router
from django.db.models import Q
from django.utils import timezone

from . import quota, signals
from .conf import DEFAULTS, get_setting
from .credentials import settings_account
from .exceptions import GmailSMTPError, MessageTooLarge, QuotaExceeded
from .models import GmailAccount, OutboundAttempt, OutboundEmail, normalize_address
from .routing import Envelope, Router
from .transport import ConnectionPool, SendResult

logger = logging.getLogger(__name__)

Status = OutboundEmail.Status
Reason = OutboundEmail.Reason
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
#: seconds a lost database connection is retried while recording an outcome (after Gmail's
#: 250, the only window in which a worker that gives up causes a second copy)
RECORD_RETRY_SECONDS = 30.0
#: the states a message ends in; their bodies are dropped after BODY_RETENTION_DAYS
FINAL_STATES = (Status.SENT, Status.FAILED, Status.CANCELLED)


# --- queueing ----------------------------------------------------------------------------------


def queue_messages(
    messages: Sequence[EmailMessage],
    *,
    router: Router,
    priority: str,
    using: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[OutboundEmail]:
    """Store each message in the outbox and enqueue its id when the transaction commits.

    A message larger than ``MAX_MESSAGE_SIZE`` raises :class:`MessageTooLarge` and is not
    stored, as the sync backend refuses it before connecting.
    """
    rows = []
    for message in messages:
        envelope = router.route(message)
        assert envelope is not None
        refuse_oversized(envelope, options)
        row = OutboundEmail.objects.using(using).create(
            status=Status.QUEUED,
            priority=quota.message_priority(message, priority),
            account=envelope.account if envelope.account.pk else None,
            account_email=envelope.account.email,
            from_email=envelope.mail_from,
            recipients=envelope.recipients,
            subject=str(message.subject or "")[:998],
            message_id=envelope.message_id[:998],
            mime=envelope.data,
            size=len(envelope.data),
            from_rewritten=envelope.from_rewritten,
        )
        message.gmail_outbound_id = row.pk
        rows.append(row)
        signals.email_queued.send(OutboundEmail, outbound=row, message=message)
        transaction.on_commit(partial(dispatch, row.pk, row.priority), using=using)
    return rows


def refuse_oversized(
    envelope: Envelope, options: Mapping[str, Any] | None = None, *, action: str = "queued"
) -> None:
    """Raise :class:`MessageTooLarge` for a message over ``MAX_MESSAGE_SIZE`` (by default
    Gmail's advertised SIZE, 35,882,577 bytes): Gmail would refuse it anyway."""
    limit = int(get_setting("MAX_MESSAGE_SIZE", options))
    size = len(envelope.data)
    if size > limit:
        raise MessageTooLarge(
            f"The message is {size:,} bytes; Gmail accepts at most {limit:,} "
            f'(GMAIL_SMTP["MAX_MESSAGE_SIZE"]), so it was not {action}',
            account=envelope.account.email,
            phase="size",
        )


def queue_name(priority: str) -> str:
    queues = get_setting("QUEUES")
    return str(queues.get(priority) or queues[OutboundEmail.Priority.TRANSACTIONAL])


def dispatch(outbound_id: int, priority: str, countdown: float | None = None) -> bool:
    """Hand a row id to Celery. A broker that is down is logged, not raised: the row stays
    queued and the sweeper enqueues it later."""
    from .tasks import send_outbound_email

    try:
        with send_outbound_email.app.producer_or_acquire() as producer:
            # Fail fast (kombu would otherwise retry the connection for seconds while the
            # caller's web request waits): the sweeper enqueues the row later.
            producer.connection.ensure_connection(max_retries=0)
            send_outbound_email.apply_async(
                (outbound_id,),
                queue=queue_name(priority),
                countdown=countdown,
                retry=False,
                producer=producer,
            )
    except ImproperlyConfigured as exc:  # e.g. QUEUES: not a broker outage, say what to fix
        logger.error(
            "Could not hand outbound email %s to Celery: %s It stays queued; the sweeper "
            "enqueues it once the setting is fixed.",
            outbound_id,
            exc,
        )
        return False
    except Exception as exc:  # kombu raises various errors for a broker that is down
        logger.warning(
            "Could not hand outbound email %s to Celery (%s: %s); it stays queued and the "
            "sweeper will send it",
            outbound_id,
            type(exc).__name__,
            exc,
        )
        return False
    OutboundEmail.objects.filter(pk=outbound_id).update(enqueued_at=timezone.now())
    return True


# --- delivery ----------------------------------------------------------------------------------


def _backoff(attempts: int) -> float:
    base = float(get_setting("RETRY_BASE_DELAY"))
    cap = float(get_setting("RETRY_MAX_DELAY"))
    delay = min(cap, base * 2 ** max(0, attempts - 1))
    return random.uniform(delay / 2, delay)  # "equal jitter": spread retries, keep a floor


def _account_for(row: OutboundEmail) -> GmailAccount | None:
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


class _Delivery:
    """One claimed row on its way through quota, transport and the record."""

    def __init__(self, row: OutboundEmail, worker: str) -> None:
        self.row = row
        self.worker = worker
        self.db = db_router.db_for_write(OutboundEmail)

    # --- the record: one transaction per outcome ---------------------------------------------

    def _record(
        self,
        outcome: str,
        fields: dict[str, Any],
        *,
        code: int | None = None,
        reply: str = "",
        phase: str = "",
        sent_by: GmailAccount | None = None,
        follow_up: dict[str, Any] | None = None,
    ) -> OutboundEmail | None:
        """Write the row's new state, its attempt and any follow-up row in one transaction,
        so no reader sees one without the other; return the follow-up row, if any.

        ``sent_by``: the outcome is Gmail's 250 from this account. A lost database connection
        is retried on a fresh one (see :func:`_write_with_retries`).
        """
        at = timezone.now()
        fields = {"lease_expires_at": None, **fields, "updated_at": at}
        for name, value in fields.items():
            setattr(self.row, name, value)
        attempt = {
            "outbound_id": self.row.pk,
            "at": at,
            "account_email": self.row.account_email,
            "outcome": outcome,
            "code": code,
            "reply": reply[:2000],
            "phase": phase,
            "worker": self.worker,
        }

        def write(again: bool) -> OutboundEmail | None:
            return self._write(fields, attempt, again=again, sent_by=sent_by, follow_up=follow_up)

        return _write_with_retries(write, db=self.db, row_id=self.row.pk, accepted=bool(sent_by))

    def _write(
        self,
        fields: dict[str, Any],
        attempt: dict[str, Any],
        *,
        again: bool,
        sent_by: GmailAccount | None,
        follow_up: dict[str, Any] | None,
    ) -> OutboundEmail | None:
        rows = OutboundEmail.objects.using(self.db)
        with transaction.atomic(using=self.db):
            key = {k: attempt[k] for k in ("outbound_id", "at", "worker", "outcome")}
            if again and OutboundAttempt.objects.using(self.db).filter(**key).exists():
                # The earlier try committed; only its acknowledgement was lost with the
                # connection. Writing again would log the attempt (and queue a follow-up) twice.
                return rows.filter(retry_of=self.row.pk).order_by("-pk").first()
            # Only if the row is still ours (not re-queued by the sweeper).
            mine = rows.filter(pk=self.row.pk, status=Status.SENDING, claimed_by=self.worker)
            if not mine.update(**fields) and sent_by is not None:
                # The send outlasted the lease and the sweeper re-queued the row: record it as
                # sent anyway, unless another worker has claimed it meanwhile.
                logger.warning(
                    "Outbound email %s was sent after its lease ran out (SENDING_LEASE is too "
                    "short for this send)",
                    self.row.pk,
                )
                rows.filter(pk=self.row.pk, status__in=[Status.QUEUED, Status.DEFERRED]).update(
                    **fields
                )
            OutboundAttempt.objects.using(self.db).create(**attempt)
            created = rows.create(**follow_up) if follow_up is not None else None
            if sent_by is not None:
                sent_by.mark_sent(fields["sent_at"])
        return created

    # --- outcomes ------------------------------------------------------------------------------

    def sent(self, account: GmailAccount, result: SendResult) -> str:
        fields = {
            "status": Status.SENT,
            "sent_at": timezone.now(),
            "gmail_reply": result.reply[:2000],
            "refused_recipients": {r: list(v) for r, v in result.refused.items()},
            "reason": Reason.NONE,
            "last_error": "",
            "next_attempt_at": None,
        }
        follow_up = self._follow_up(account, result.refused)
        created = self._record(
            OutboundAttempt.Outcome.SENT,
            fields,
            code=250,
            reply=result.reply,
            phase="data",
            sent_by=account,
            follow_up=follow_up,
        )
        if created is not None and created.next_attempt_at is not None:
            countdown = (created.next_attempt_at - timezone.now()).total_seconds()
            dispatch(created.pk, created.priority, countdown=max(0.0, countdown))
        signals.email_sent.send(
            OutboundEmail,
            message=None,
            account=account,
            result=result,
            outbound=self.row,
            follow_up=created,
        )
        return "sent"

    def _follow_up(
        self, account: GmailAccount, refused: dict[str, tuple[int, str]]
    ) -> dict[str, Any] | None:
        """The row that retries the recipients Gmail refused temporarily (450 4.2.1: that
        recipient receives too fast) while it accepted the others; None if there are none.

        It is the same message to those recipients alone, queued with the normal backoff, so
        quota, retries and MAX_ATTEMPTS apply to it as to any row. Recipients refused for good
        (5xx) stay recorded as refused on the sent row.
        """
        later = {r: v for r, v in refused.items() if 400 <= v[0] < 500}
        if not later:
            return None
        row = self.row
        listed = ", ".join(f"{r} ({code} {text})".strip() for r, (code, text) in later.items())
        attempts = row.attempts + 1
        if attempts >= int(get_setting("MAX_ATTEMPTS")):
            logger.warning(
                "Outbound email %s: Gmail refused %s temporarily; not retried, the message has "
                "had %d attempts (MAX_ATTEMPTS)",
                row.pk,
                listed,
                attempts,
            )
            return None
        return {
            "status": Status.QUEUED,
            "reason": Reason.RETRY,
            "priority": row.priority,
            "account": account if account.pk and not account.from_settings else None,
            "account_email": row.account_email,
            "from_email": row.from_email,
            "recipients": list(later),
            "subject": row.subject,
            "message_id": row.message_id,
            "mime": bytes(row.mime),
            "size": row.size,
            "from_rewritten": row.from_rewritten,
            "attempts": attempts,
            "next_attempt_at": timezone.now() + timedelta(seconds=_backoff(attempts)),
            "last_error": f"Gmail refused these recipients of #{row.pk} temporarily while "
            f"accepting the others; this retries them alone: {listed}"[:2000],
            "last_code": next(iter(later.values()))[0],
            "retry_of": row,
        }

    def _outcome(self, outcome: str, error: Exception | None, text: str, **fields: Any) -> None:
        """Store the outcome on the row (with the reason in words) and in the attempt log."""
        code = getattr(error, "smtp_code", None)
        self._record(
            outcome,
            {"last_error": text, "last_code": code, **fields},
            code=code,
            reply=text,
            phase=getattr(error, "phase", None) or "",
        )

    def config_retry_at(self) -> datetime:
        """When to try again after a configuration error: on the retry backoff, growing with
        each deferral, since a fix (a setting, a deleted account added again) may change
        nothing the app is told about. Not counted as a delivery attempt."""
        deferrals = self.row.log.filter(outcome=OutboundAttempt.Outcome.DEFERRED).count()
        try:
            delay = _backoff(deferrals + 1)
        except ImproperlyConfigured:  # the bad setting may be RETRY_*_DELAY itself
            delay = float(DEFAULTS["RETRY_BASE_DELAY"]) * 2 ** min(deferrals, 7)
        return timezone.now() + timedelta(seconds=delay)

    def defer(
        self, reason: str, text: str, until: datetime | None, error: Exception | None = None
    ) -> str:
        self._outcome(
            OutboundAttempt.Outcome.DEFERRED,
            error,
            text,
            status=Status.DEFERRED,
            reason=reason,
            next_attempt_at=until,
        )
        signals.email_deferred.send(
            OutboundEmail, outbound=self.row, reason=reason, until=until, error=error
        )
        return "deferred"

    def retry_or_fail(self, text: str, error: Exception) -> str:
        attempts = self.row.attempts + 1
        if attempts >= int(get_setting("MAX_ATTEMPTS")):
            return self.fail(
                Reason.ATTEMPTS,
                f"Gave up after {attempts} attempts; the last one: {text}",
                error,
                attempts=attempts,
            )
        delay = _backoff(attempts)
        self._outcome(
            OutboundAttempt.Outcome.RETRY,
            error,
            text,
            status=Status.QUEUED,
            reason=Reason.RETRY,
            attempts=attempts,
            next_attempt_at=timezone.now() + timedelta(seconds=delay),
        )
        dispatch(self.row.pk, self.row.priority, countdown=delay)
        return "retry"

    def fail(self, reason: str, text: str, error: Exception | None, **extra: Any) -> str:
        refused = getattr(error, "recipients", None) or {}
        self._outcome(
            OutboundAttempt.Outcome.FAILED,
            error,
            text,
            status=Status.FAILED,
            reason=reason,
            next_attempt_at=None,
            refused_recipients={r: list(v) for r, v in refused.items()},
            **extra,
        )
        signals.email_failed.send(OutboundEmail, outbound=self.row, error=error)
        return "failed"


def _write_with_retries(
    write: Callable[[bool], OutboundEmail | None], *, db: str, row_id: int, accepted: bool
) -> OutboundEmail | None:
    """Run ``write`` (one transaction); on a lost database connection, retry it on a fresh one
    for up to RECORD_RETRY_SECONDS, so a database blip after Gmail's 250 does not leave the row
    ``sending`` (to be sent again when its lease runs out)."""
    deadline = time.monotonic() + RECORD_RETRY_SECONDS
    delay, tries = 0.0, 0
    while True:
        try:
            return write(tries > 0)
        except (OperationalError, InterfaceError) as exc:
            connection = connections[db]
            # Inside the caller's transaction a new connection would lose its work: no retry.
            if connection.in_atomic_block or time.monotonic() + delay > deadline:
                if accepted:
                    logger.error(
                        "Gmail ACCEPTED outbound email %s, but it could not be recorded as sent "
                        "(%s: %s). The row stays 'sending' and will be sent AGAIN when its "
                        "SENDING_LEASE runs out, unless its status is set to 'sent' first.",
                        row_id,
                        type(exc).__name__,
                        exc,
                    )
                raise
            tries += 1
            logger.warning(
                "Could not record the outcome of outbound email %s (%s: %s); retrying on a new "
                "database connection (try %d)",
                row_id,
                type(exc).__name__,
                exc,
                tries,
            )
            with suppress(Exception):  # the connection is broken: closing may fail too
                connection.close()
            time.sleep(delay)
            delay = min(max(2 * delay, 0.5), 8.0)


#: a task may run this much before its row's next attempt (timer granularity, clock skew)
EARLY = timedelta(seconds=1)
#: a task that arrives earlier than EARLY, but due within this, is handed back with a countdown
REQUEUE_WITHIN = timedelta(seconds=120)


def claim(outbound_id: int, worker: str) -> OutboundEmail | None:
    """Atomically take a due row for sending; None if another delivery has it or it is done."""
    now = timezone.now()
    lease = timedelta(seconds=float(get_setting("SENDING_LEASE")))
    waiting = OutboundEmail.objects.filter(
        pk=outbound_id, status__in=[Status.QUEUED, Status.DEFERRED]
    )
    claimed = waiting.filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now + EARLY)
    ).update(status=Status.SENDING, lease_expires_at=now + lease, claimed_by=worker)
    if claimed:
        return OutboundEmail.objects.select_related("account").get(pk=outbound_id)
    # A retry's task that ran early (a worker whose clock is behind, an early timer): hand it
    # back for the time that is left, rather than leave the retry to the sweeper.
    due = waiting.filter(next_attempt_at__lte=now + REQUEUE_WITHIN).values_list(
        "next_attempt_at", "priority"
    )
    for next_attempt_at, priority in due:
        dispatch(outbound_id, priority, countdown=(next_attempt_at - now).total_seconds())
    return None


def deliver(outbound_id: int, *, pool: ConnectionPool, worker: str = WORKER_ID) -> str:
    """Send one outbox row; return what happened: sent, retry, deferred, failed or skipped."""
    row = claim(outbound_id, worker)
    if row is None:
        return "skipped"
    delivery = _Delivery(row, worker)
    account = _account_for(row)
    if account is None:
        return delivery.defer(
            Reason.CONFIG,
            f"No active account {row.account_email} to send from: it was deleted, or the "
            "EMAIL_HOST_USER it came from changed. Add the account again, or cancel the message.",
            delivery.config_retry_at(),
        )
    if not account.is_active:
        return delivery.defer(
            Reason.AUTH, f"The account {account.email} is paused; resume it to send.", None
        )
    if not account.is_healthy:
        # No login attempt: repeated failed logins make Gmail lock the account (454).
        return delivery.defer(
            Reason.AUTH,
            f"Waiting for {account.email} to be fixed: {account.health_detail or account.health}",
            None,
        )
    try:
        reservation = quota.reserve(account, len(row.recipients), priority=row.priority)
    except QuotaExceeded as exc:
        if exc.next_slot_at is None:  # the message alone is over a daily limit
            return delivery.fail(Reason.PERMANENT, str(exc), exc)
        return delivery.defer(Reason.QUOTA, str(exc), exc.next_slot_at, exc)
    except BaseException as exc:  # a bad setting, a database error: recorded, not lost
        return _failed_send(delivery, account, exc)

    envelope = Envelope(
        account=account,
        mail_from=row.from_email,
        recipients=list(row.recipients),
        data=bytes(row.mime),
        message_id=row.message_id,
    )
    try:
        result = pool.send(envelope)
    except BaseException as exc:
        # When in doubt, count it: no reply to the final "." means Gmail may have kept it.
        if not getattr(exc, "maybe_delivered", False):
            reservation.release()
        return _failed_send(delivery, account, exc)
    return delivery.sent(account, result)


def _failed_send(delivery: _Delivery, account: GmailAccount, exc: BaseException) -> str:
    if isinstance(exc, QuotaExceeded):
        until = quota.mark_exhausted(account, exc.reply)
        return delivery.defer(Reason.QUOTA, str(exc), until, exc)
    if isinstance(exc, GmailSMTPError):
        if exc.category == "auth":
            return delivery.defer(Reason.AUTH, str(exc), None, exc)
        if exc.category == "temporary":
            text = str(exc)
            if getattr(exc, "maybe_delivered", False):
                text += (
                    " This happened after the whole message was sent, so Gmail may have kept "
                    "it: it stays counted against the quota, and is sent again."
                )
            return _retry_or_defer(delivery, text, exc)
        return delivery.fail(Reason.PERMANENT, str(exc), exc)
    if isinstance(exc, ImproperlyConfigured):
        return delivery.defer(Reason.CONFIG, str(exc), delivery.config_retry_at(), exc)
    if isinstance(exc, Exception):
        logger.exception("Unexpected error sending outbound email %s", delivery.row.pk)
        return _retry_or_defer(delivery, f"Unexpected error: {type(exc).__name__}: {exc}", exc)
    # KeyboardInterrupt / SystemExit: leave the row to the sweeper's lease.
    raise exc


def _retry_or_defer(delivery: _Delivery, text: str, exc: Exception) -> str:
    """Retry on the backoff; a bad MAX_ATTEMPTS / RETRY_* setting defers the row for its
    configuration instead of leaving it ``sending`` until the lease runs out."""
    try:
        return delivery.retry_or_fail(text, exc)
    except ImproperlyConfigured as config_error:
        return delivery.defer(
            Reason.CONFIG, str(config_error), delivery.config_retry_at(), config_error
        )


# --- sweeping and maintenance --------------------------------------------------------------------


def sweep(*, limit: int = 1000) -> dict[str, int]:
    """Re-enqueue what is due; return counts (``due``, ``stale_queued``, ``expired_leases``)."""
    now = timezone.now()
    grace = timedelta(seconds=float(get_setting("SWEEP_GRACE")))
    expired = OutboundEmail.objects.filter(status=Status.SENDING, lease_expires_at__lt=now)
    expired_ids = list(expired.values_list("pk", flat=True)[:limit])
    if expired_ids:
        # The worker died mid-send (the only duplicate window): send again.
        OutboundEmail.objects.filter(
            pk__in=expired_ids, status=Status.SENDING, lease_expires_at__lt=now
        ).update(
            status=Status.QUEUED,
            lease_expires_at=None,
            next_attempt_at=None,
            enqueued_at=None,
            claimed_by="",
        )
        logger.warning(
            "Re-queued %d outbound email(s) left sending by a dead worker", len(expired_ids)
        )
    due_deferred = OutboundEmail.objects.filter(
        status=Status.DEFERRED, next_attempt_at__isnull=False, next_attempt_at__lte=now
    )
    # Queued rows whose task never reached the broker, whose retry task is overdue, or whose
    # task was lost (broker restart, a worker killed holding it): enqueue again.
    lost_after = max(grace * 10, timedelta(minutes=5))
    stale_queued = OutboundEmail.objects.filter(status=Status.QUEUED).filter(
        Q(enqueued_at__isnull=True, created_at__lt=now - grace)
        | Q(next_attempt_at__lt=now - grace, enqueued_at__lt=now - grace)
        | Q(next_attempt_at__isnull=True, enqueued_at__lt=now - lost_after)
        | Q(pk__in=expired_ids)
    )
    counts = {"expired_leases": len(expired_ids), "due": 0, "stale_queued": 0}
    retention = get_setting("BODY_RETENTION_DAYS")
    if retention is not None:
        purge(delete_sent_after=None, drop_bodies_after=timedelta(days=float(retention)))
    for name, queryset in (("due", due_deferred), ("stale_queued", stale_queued)):
        for pk, priority in queryset.order_by("-priority", "pk").values_list("pk", "priority")[
            :limit
        ]:
            if dispatch(pk, priority):
                counts[name] += 1
    return counts


def select(
    *,
    ids: Iterable[int] = (),
    status: Sequence[str] = (),
    account: str | None = None,
    before: datetime | None = None,
):
    """The outbox rows matching a management command's or admin action's filter."""
    queryset = OutboundEmail.objects.all()
    ids = list(ids)
    if ids:
        queryset = queryset.filter(pk__in=ids)
    if status:
        queryset = queryset.filter(status__in=list(status))
    if account:
        queryset = queryset.filter(account_email=normalize_address(account))
    if before:
        queryset = queryset.filter(created_at__lt=before)
    return queryset


def retry(queryset) -> int:
    """Make failed, deferred or cancelled rows due now and enqueue them; return how many.

    A row whose body was dropped (``BODY_RETENTION_DAYS``, ``purge``) cannot be sent again and
    is left as it is (see :func:`body_dropped`)."""
    retryable = [Status.FAILED, Status.DEFERRED, Status.CANCELLED, Status.QUEUED]
    rows = list(
        queryset.filter(status__in=retryable, mime__isnull=False)
        .exclude(body_dropped_at__isnull=False)
        .values_list("pk", "priority")
    )
    # Filter on status again: a row a worker claimed meanwhile is left to it.
    OutboundEmail.objects.filter(pk__in=[pk for pk, _ in rows], status__in=retryable).update(
        status=Status.QUEUED,
        next_attempt_at=None,
        attempts=0,
        reason=Reason.NONE,
        updated_at=timezone.now(),
    )
    for pk, priority in rows:
        transaction.on_commit(partial(dispatch, pk, priority))
    skipped = body_dropped(queryset)
    if skipped:
        logger.warning(
            "%d outbound email(s) not retried: their stored message was dropped after "
            "BODY_RETENTION_DAYS, so there is nothing left to send",
            skipped,
        )
    return len(rows)


def body_dropped(queryset) -> int:
    """How many of these rows lost their stored message to retention (they cannot be retried)."""
    return queryset.filter(body_dropped_at__isnull=False).count()


def cancel(queryset) -> int:
    """Cancel rows not sent yet (queued, deferred, failed); a row being sent is left alone."""
    return queryset.filter(status__in=[Status.QUEUED, Status.DEFERRED, Status.FAILED]).update(
        status=Status.CANCELLED, next_attempt_at=None, updated_at=timezone.now()
    )


def _finished_before(moment: datetime) -> Q:
    """Rows in a final state since before ``moment``: sent mail by its sending time, failed and
    cancelled mail by its last update (when it failed or was cancelled)."""
    return Q(status=Status.SENT, sent_at__lt=moment) | Q(
        status__in=[Status.FAILED, Status.CANCELLED], updated_at__lt=moment
    )


def purge(*, delete_sent_after: timedelta | None, drop_bodies_after: timedelta | None) -> dict:
    """Drop the stored bodies of finished mail (sent, failed, cancelled) after
    ``drop_bodies_after``, and delete finished rows after ``delete_sent_after``.

    Queued, deferred and sending mail keeps its body whatever its age: it is still to be sent
    (cancel it to have its body dropped). A failed or cancelled row whose body was dropped can
    no longer be retried."""
    now = timezone.now()
    result = {"deleted": 0, "bodies_dropped": 0}
    if drop_bodies_after is not None:
        result["bodies_dropped"] = (
            OutboundEmail.objects.filter(_finished_before(now - drop_bodies_after))
            .filter(body_dropped_at__isnull=True)
            .update(mime=b"", body_dropped_at=now)
        )
    if delete_sent_after is not None:
        old = OutboundEmail.objects.filter(_finished_before(now - delete_sent_after))
        result["deleted"] = old.delete()[0]
    return result
