"""The transactional outbox: queue messages, deliver one, sweep what is due.

The Celery backend and tasks are thin wrappers around these functions:

- :func:`queue_messages` routes each message, stores its exact bytes as an
  :class:`~django_gmail_smtp.models.OutboundEmail` inside the caller's transaction, and hands
  only the row id to Celery once that transaction commits.
- :func:`deliver` claims a row atomically, reserves quota, sends it over a pooled connection,
  and records the outcome by the class of Gmail's answer (sent, retry, deferred, failed).
- :func:`sweep` re-enqueues what is due: deferred rows whose time has come, queued rows whose
  task never reached the broker, and rows left ``sending`` past their lease.

Delivery is at-least-once. The only case that can send a message twice is a worker that dies
after Gmail's 250 reply and before the row is marked sent; the row is then re-queued when its
lease (``SENDING_LEASE``) runs out and sent again.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import quota, signals
from .conf import get_setting
from .credentials import settings_account
from .exceptions import GmailSMTPError, QuotaExceeded
from .models import GmailAccount, OutboundAttempt, OutboundEmail, normalize_address
from .routing import Envelope, Router
from .transport import ConnectionPool, SendResult

logger = logging.getLogger(__name__)

Status = OutboundEmail.Status
Reason = OutboundEmail.Reason
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


# --- queueing ----------------------------------------------------------------------------------


def queue_messages(
    messages: Sequence[EmailMessage],
    *,
    router: Router,
    priority: str,
    using: str | None = None,
) -> list[OutboundEmail]:
    """Store each message in the outbox and enqueue its id when the transaction commits."""
    rows = []
    for message in messages:
        envelope = router.route(message)
        assert envelope is not None
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

    def _log(self, outcome: str, *, code: int | None = None, reply: str = "", phase: str = ""):
        OutboundAttempt.objects.create(
            outbound=self.row,
            account_email=self.row.account_email,
            outcome=outcome,
            code=code,
            reply=reply[:2000],
            phase=phase,
            worker=self.worker,
        )

    def _finish(self, **fields: Any) -> bool:
        """Record the outcome, only if the row is still ours (not re-queued by the sweeper)."""
        fields.setdefault("lease_expires_at", None)
        fields["updated_at"] = timezone.now()
        for name, value in fields.items():
            setattr(self.row, name, value)
        return bool(
            OutboundEmail.objects.filter(
                pk=self.row.pk, status=Status.SENDING, claimed_by=self.worker
            ).update(**fields)
        )

    def sent(self, account: GmailAccount, result: SendResult) -> str:
        fields = {
            "status": Status.SENT,
            "sent_at": timezone.now(),
            "gmail_reply": result.reply[:2000],
            "refused_recipients": {r: list(v) for r, v in result.refused.items()},
            "reason": Reason.NONE,
            "last_error": "",
            "next_attempt_at": None,
            "lease_expires_at": None,
        }
        if not self._finish(**fields):
            # The send outlasted the lease and the sweeper re-queued the row: record it as
            # sent anyway, unless another worker has claimed it meanwhile.
            logger.warning(
                "Outbound email %s was sent after its lease ran out (SENDING_LEASE is too short "
                "for this send)",
                self.row.pk,
            )
            OutboundEmail.objects.filter(
                pk=self.row.pk, status__in=[Status.QUEUED, Status.DEFERRED]
            ).update(**fields)
        self._log(OutboundAttempt.Outcome.SENT, code=250, reply=result.reply, phase="data")
        account.mark_sent()
        signals.email_sent.send(
            OutboundEmail, message=None, account=account, result=result, outbound=self.row
        )
        return "sent"

    def _record(self, outcome: str, error: Exception | None, text: str, **fields: Any) -> None:
        """Store the outcome on the row (with the reason in words) and in the attempt log."""
        code = getattr(error, "smtp_code", None)
        self._finish(last_error=text, last_code=code, **fields)
        self._log(outcome, code=code, reply=text, phase=getattr(error, "phase", None) or "")

    def defer(
        self, reason: str, text: str, until: datetime | None, error: Exception | None = None
    ) -> str:
        self._record(
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
        self._record(
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
        self._record(
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
            None,
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
            return delivery.retry_or_fail(str(exc), exc)
        return delivery.fail(Reason.PERMANENT, str(exc), exc)
    if isinstance(exc, ImproperlyConfigured):
        return delivery.defer(Reason.CONFIG, str(exc), None, exc)
    if isinstance(exc, Exception):
        logger.exception("Unexpected error sending outbound email %s", delivery.row.pk)
        return delivery.retry_or_fail(f"Unexpected error: {type(exc).__name__}: {exc}", exc)
    # KeyboardInterrupt / SystemExit: leave the row to the sweeper's lease.
    raise exc


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
    """Make failed, deferred or cancelled rows due now and enqueue them; return how many."""
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
    return len(rows)


def cancel(queryset) -> int:
    """Cancel rows not sent yet (queued, deferred, failed); a row being sent is left alone."""
    return queryset.filter(status__in=[Status.QUEUED, Status.DEFERRED, Status.FAILED]).update(
        status=Status.CANCELLED, next_attempt_at=None, updated_at=timezone.now()
    )


def purge(*, delete_sent_after: timedelta | None, drop_bodies_after: timedelta | None) -> dict:
    """Delete old sent/cancelled rows, and drop the bodies of sent mail after retention."""
    now = timezone.now()
    result = {"deleted": 0, "bodies_dropped": 0}
    if drop_bodies_after is not None:
        result["bodies_dropped"] = OutboundEmail.objects.filter(
            status=Status.SENT, sent_at__lt=now - drop_bodies_after, body_dropped_at__isnull=True
        ).update(mime=b"", body_dropped_at=now)
    if delete_sent_after is not None:
        old = OutboundEmail.objects.filter(
            Q(status=Status.SENT, sent_at__lt=now - delete_sent_after)
            | Q(status=Status.CANCELLED, updated_at__lt=now - delete_sent_after)
        )
        result["deleted"] = old.delete()[0]
    return result
