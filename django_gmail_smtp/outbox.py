"""The transactional outbox: the rows, how they are stored, claimed, recorded and swept.

The delivery pipeline (:mod:`~django_gmail_smtp.pipeline`) decides what happens to a message;
this module keeps the rows:

- :func:`store` writes a routed message's exact bytes as an
  :class:`~django_gmail_smtp.models.OutboundEmail` (with the alias of the mailer that queued
  it) inside the caller's transaction, and hands only the row id to Celery once that
  transaction commits. :func:`queue_messages` routes and stores (the entry point for code that
  queues mail itself, such as a campaign).
- :func:`claim` takes a due row atomically; :class:`OutboxRecord` writes its outcome (sent,
  retry, deferred, failed); :func:`deliver` (the task's body) runs the pipeline on one row.
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
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.db import InterfaceError, OperationalError, connections, transaction
from django.db import router as db_router
from django.db.models import Q
from django.utils import timezone

from . import signals
from .conf import SettingsLike, as_settings, get_setting
from .enums import AttemptOutcome, Outcome, Priority, Reason, Status
from .models import GmailAccount, OutboundAttempt, OutboundEmail, normalize_address
from .routing import Envelope, Router
from .transport import SendResult

if TYPE_CHECKING:
    from .pipeline import TransportFactory
    from .transport import Transport

logger = logging.getLogger(__name__)

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
    router: Router | None = None,
    priority: str | None = None,
    using: str | None = None,
    options: SettingsLike = None,
    mailer: str | None = None,
) -> list[OutboundEmail]:
    """Route each message and store it in the outbox; its id is enqueued when the transaction
    commits. Bad input (header injection, too many recipients, a message larger than
    ``MAX_MESSAGE_SIZE``, ...) raises before anything is stored, as the sync backend refuses it
    before connecting.

    ``mailer``: the ``MAILERS`` alias whose options the worker sends with (its settings are
    used here too); else ``options`` (a :class:`~django_gmail_smtp.conf.MailerSettings`), else
    GMAIL_SMTP. ``priority``: the default for messages without ``gmail_priority``.
    """
    from .conf import for_mailer
    from .pipeline import Pipeline

    settings = for_mailer(mailer) if mailer is not None else as_settings(options)
    pipeline = Pipeline(settings)
    router = router or pipeline.router(include_paused=True)
    default = priority or settings.priority
    return [pipeline.queue(router, message, default, using=using) for message in messages]


def store(
    envelope: Envelope,
    message: EmailMessage,
    *,
    priority: str,
    mailer: str = "",
    using: str | None = None,
) -> OutboundEmail:
    """Write one routed message to the outbox and enqueue its id when the transaction commits."""
    row = OutboundEmail.objects.using(using).create(
        status=Status.QUEUED,
        priority=priority,
        mailer=mailer,
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
    # A documented extra attribute on the caller's message (Django's class does not declare it).
    message.gmail_outbound_id = row.pk  # type: ignore[attr-defined]
    signals.email_queued.send(OutboundEmail, outbound=row, message=message)
    transaction.on_commit(partial(dispatch, row.pk, row.priority), using=using)
    return row


def refuse_oversized(
    envelope: Envelope, options: SettingsLike = None, *, action: str = "queued"
) -> None:
    """Raise :class:`~django_gmail_smtp.exceptions.MessageTooLarge` for a message over
    ``MAX_MESSAGE_SIZE`` (see :func:`django_gmail_smtp.pipeline.refuse_oversized`)."""
    from .pipeline import refuse_oversized

    refuse_oversized(envelope, as_settings(options), action=action)


def queue_name(priority: str) -> str:
    queues = get_setting("QUEUES")
    return str(queues.get(priority) or queues[Priority.TRANSACTIONAL])


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
                # Celery takes None (its default: no delay); celery-types declares a float.
                countdown=countdown,  # type: ignore[arg-type]
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


def deliver(
    outbound_id: int,
    *,
    pool: Transport | None = None,
    transports: TransportFactory | None = None,
    worker: str = WORKER_ID,
) -> Outcome:
    """Send one outbox row with the settings of the mailer that queued it; return what
    happened: sent, retry, deferred, failed or skipped (see
    :func:`django_gmail_smtp.pipeline.deliver_outbound`).

    ``pool``: the transport to send with, whatever the row's mailer; ``transports``: finds
    the transport for a mailer's settings (the worker's pools); neither: a new one."""
    from .pipeline import deliver_outbound

    return deliver_outbound(outbound_id, worker=worker, transport=pool, transports=transports)


class OutboxRecord:
    """What happened to one claimed row, written to it: each outcome (the row's new state,
    its attempt-log entry and any follow-up row) in one transaction. The pipeline decides the
    outcome; this only stores it, and sends the outbox's own signals."""

    def __init__(self, row: OutboundEmail, worker: str) -> None:
        self.row = row
        self.worker = worker
        self.db = db_router.db_for_write(OutboundEmail)

    def __repr__(self) -> str:
        return f"<OutboxRecord {self.row.pk} {self.worker}>"

    def deferrals(self) -> int:
        """How many times this row was deferred (the configuration backoff grows with it)."""
        return self.row.log.filter(outcome=AttemptOutcome.DEFERRED).count()

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
            changed = mine.update(**fields)
            if not changed and sent_by is not None:
                # The send outlasted the lease and the sweeper re-queued the row: record it as
                # sent anyway, unless another worker has claimed it meanwhile.
                logger.warning(
                    "Outbound email %s was sent after its lease ran out (SENDING_LEASE is too "
                    "short for this send)",
                    self.row.pk,
                )
                waiting = rows.filter(pk=self.row.pk, status__in=[Status.QUEUED, Status.DEFERRED])
                changed = waiting.update(**fields)
            OutboundAttempt.objects.using(self.db).create(**attempt)
            # A follow-up only from the delivery that owns the row: another worker that has
            # claimed it meanwhile (or an operator who cancelled it) decides its recipients.
            created = rows.create(**follow_up) if follow_up is not None and changed else None
            if sent_by is not None:
                sent_by.mark_sent(fields["sent_at"])
        return created

    # --- outcomes ------------------------------------------------------------------------------

    def sent(
        self,
        account: GmailAccount,
        result: SendResult,
        *,
        follow_up: dict[str, Any] | None = None,
    ) -> OutboundEmail | None:
        """Gmail accepted the message: the row is sent (with ``follow_up``, the fields of the
        row that retries recipients Gmail refused temporarily); return that row, if any."""
        fields = {
            "status": Status.SENT,
            "sent_at": timezone.now(),
            "gmail_reply": result.reply[:2000],
            "refused_recipients": {r: list(v) for r, v in result.refused.items()},
            "reason": Reason.NONE,
            "last_error": "",
            "next_attempt_at": None,
        }
        return self._record(
            AttemptOutcome.SENT,
            fields,
            code=250,
            reply=result.reply,
            phase="data",
            sent_by=account,
            follow_up=follow_up,
        )

    def follow_up(
        self,
        account: GmailAccount,
        refused: dict[str, tuple[int, str]],
        *,
        attempts: int,
        at: datetime,
    ) -> dict[str, Any]:
        """The fields of a row that sends the same message to ``refused`` alone at ``at``, so
        quota, retries and MAX_ATTEMPTS apply to it as to any row."""
        row = self.row
        listed = ", ".join(f"{r} ({code} {text})".strip() for r, (code, text) in refused.items())
        return {
            "status": Status.QUEUED,
            "reason": Reason.RETRY,
            "priority": row.priority,
            "mailer": row.mailer,
            "account": account if account.pk and not account.from_settings else None,
            "account_email": row.account_email,
            "from_email": row.from_email,
            "recipients": list(refused),
            "subject": row.subject,
            "message_id": row.message_id,
            "mime": bytes(row.mime),
            "size": row.size,
            "from_rewritten": row.from_rewritten,
            "attempts": attempts,
            "next_attempt_at": at,
            "last_error": f"Gmail refused these recipients of #{row.pk} temporarily while "
            f"accepting the others; this retries them alone: {listed}"[:2000],
            "last_code": next(iter(refused.values()))[0],
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

    def defer(
        self, reason: str, text: str, until: datetime | None, error: Exception | None = None
    ) -> Outcome:
        """Wait, without counting an attempt: until ``until`` (None: until the account is
        fixed, which makes it due)."""
        self._outcome(
            AttemptOutcome.DEFERRED,
            error,
            text,
            status=Status.DEFERRED,
            reason=reason,
            next_attempt_at=until,
        )
        signals.email_deferred.send(
            OutboundEmail, outbound=self.row, reason=reason, until=until, error=error
        )
        return Outcome.DEFERRED

    def retry(self, text: str, error: Exception, *, attempts: int, at: datetime) -> Outcome:
        """A temporary failure: queued again for ``at``, as attempt number ``attempts``."""
        self._outcome(
            AttemptOutcome.RETRY,
            error,
            text,
            status=Status.QUEUED,
            reason=Reason.RETRY,
            attempts=attempts,
            next_attempt_at=at,
        )
        return Outcome.RETRY

    def fail(self, reason: str, text: str, error: Exception | None, **extra: Any) -> Outcome:
        """The message will not be sent (it can be retried by hand)."""
        refused = getattr(error, "recipients", None) or {}
        self._outcome(
            AttemptOutcome.FAILED,
            error,
            text,
            status=Status.FAILED,
            reason=reason,
            next_attempt_at=None,
            refused_recipients={r: list(v) for r, v in refused.items()},
            **extra,
        )
        signals.email_failed.send(OutboundEmail, outbound=self.row, error=error)
        return Outcome.FAILED


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
        assert next_attempt_at is not None  # the __lte filter never matches NULL
        dispatch(outbound_id, priority, countdown=(next_attempt_at - now).total_seconds())
    return None


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
