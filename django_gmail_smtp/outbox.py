"""The transactional outbox: the rows, how they are stored, claimed, recorded and swept.

The delivery pipeline (:mod:`~django_gmail_smtp.pipeline`) decides what happens to a message;
this module keeps the rows:

- :func:`store` writes a routed message's exact bytes as an
  :class:`~django_gmail_smtp.models.OutboundEmail` (with the alias of the mailer that queued
  it) inside the caller's transaction, and hands only the row id to Celery once that
  transaction commits. :func:`queue_messages` routes and stores (the entry point for code that
  queues mail itself, such as a campaign).
- :func:`claim` takes a due row atomically; :func:`claim_batch` takes the next due rows of one
  sending address and mailer (a worker's stream); :class:`OutboxRecord` writes one row's
  outcome (sent, retry, deferred, failed), :func:`record_sent` several sent rows in one
  transaction, :func:`release_claims` gives back rows a stream did not reach, :func:`renew_claims`
  extends the leases of the rows a long stream still holds; :func:`deliver`
  (the task's body) runs the pipeline on a row (and, streaming, on its account's due mail).
- :func:`sweep` re-enqueues what is due: deferred rows whose time has come, queued rows whose
  task never reached the broker, rows left ``sending`` past their lease, and (one task per
  address) mail that waited for a connection slot whose holder died.

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
from contextlib import nullcontext, suppress
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.db import InterfaceError, OperationalError, connections, transaction
from django.db import router as db_router
from django.db.models import JSONField, Q
from django.db.models.signals import post_save, pre_save
from django.utils import timezone

from . import publisher, signals
from .clock import db_now
from .conf import SettingsLike, as_settings, get_setting
from .enums import AttemptOutcome, Outcome, Priority, Reason, Status
from .models import GmailAccount, OutboundAttempt, OutboundEmail, normalize_address
from .routing import Envelope, Router
from .transport import SendResult

if TYPE_CHECKING:
    from .pipeline import KeepWarm, TransportFactory
    from .transport import Transport

logger = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
#: seconds a lost database connection is retried while recording an outcome (after Gmail's
#: 250, the only window in which a worker that gives up causes a second copy)
RECORD_RETRY_SECONDS = 30.0
#: the states a message ends in; their bodies are dropped after BODY_RETENTION_DAYS
FINAL_STATES = (Status.SENT, Status.FAILED, Status.CANCELLED)


# --- queueing ----------------------------------------------------------------------------------


#: messages written per INSERT, and published per on-commit callback, when queueing many
QUEUE_CHUNK = 500
#: row ids per task when several are handed over at once: few enough that a worker's processes
#: share a chunk (and a lost task costs little), many enough that publishing stays cheap
TASK_IDS = 100


def queue_messages(
    messages: Iterable[EmailMessage],
    *,
    router: Router | None = None,
    priority: str | None = None,
    using: str | None = None,
    options: SettingsLike = None,
    mailer: str | None = None,
    keep_rows: bool = True,
) -> list[OutboundEmail]:
    """Route each message and store it in the outbox; the ids are enqueued when the transaction
    commits. Bad input (header injection, too many recipients, a message larger than
    ``MAX_MESSAGE_SIZE``, ...) raises before that message is stored (the ones before it are
    stored, as with one call per message), as the sync backend refuses it before connecting.

    Rows are written :data:`QUEUE_CHUNK` at a time (one INSERT and one publish each), inside
    the caller's transaction if there is one, else each chunk in its own. ``messages`` may be
    any iterable: a generator keeps memory flat however many there are. ``keep_rows=False``
    returns an empty list instead of every row (each message still gets its
    ``gmail_outbound_id``), for memory that does not grow with the count.

    ``mailer``: the ``MAILERS`` alias whose options the worker sends with (its settings are
    used here too); else ``options`` (a :class:`~django_gmail_smtp.conf.MailerSettings`), else
    GMAIL_SMTP. ``priority``: the default for messages without ``gmail_priority``.
    """
    from .conf import for_mailer
    from .pipeline import Pipeline

    settings = for_mailer(mailer) if mailer is not None else as_settings(options)
    pipeline = Pipeline(settings)
    router = router or Router(options=settings, include_paused=True, cached=True, unbuilt=True)
    default = priority or settings.priority
    with OutboxWriter(mailer=settings.alias, using=using, keep_rows=keep_rows) as writer:
        for message in messages:
            envelope, message_priority = pipeline.route(router, message, default, action="queued")
            writer.add(envelope, message, message_priority)
    return writer.rows


def _new_row(
    envelope: Envelope, message: EmailMessage, *, priority: str, mailer: str, now: datetime
) -> OutboundEmail:
    return OutboundEmail(
        status=Status.QUEUED,
        priority=priority,
        mailer=mailer,
        account=envelope.account if envelope.account.pk else None,
        account_email=envelope.account.email,
        from_email=envelope.mail_from,
        recipients=envelope.recipients,
        subject=str(message.subject or "")[:998],
        message_id=envelope.message_id[:998],
        # A plain message is stored as its parts, built by the worker (``draft``); any other
        # as its bytes. ``size`` is then at most what it builds to.
        mime=b"" if envelope.draft is not None else envelope.data,
        draft=envelope.draft,
        size=envelope.size,
        from_rewritten=envelope.from_rewritten,
        # Set now, in the same INSERT, rather than by an UPDATE after publishing: a statement
        # (and on SQLite a commit) less for the caller. Should the hand-off fail, publish()
        # clears it so the sweeper enqueues the row after SWEEP_GRACE; should it never run
        # (the process dies between the commit and the publish), the sweeper still enqueues
        # the row, after its "lost task" delay (10 x SWEEP_GRACE, at least 5 minutes).
        enqueued_at=now,
    )


def store(
    envelope: Envelope,
    message: EmailMessage,
    *,
    priority: str,
    mailer: str = "",
    using: str | None = None,
) -> OutboundEmail:
    """Write one routed message to the outbox and enqueue its id when the transaction commits."""
    row = _new_row(envelope, message, priority=priority, mailer=mailer, now=timezone.now())
    insert_one(row, using or db_router.db_for_write(OutboundEmail, instance=row))
    # A documented extra attribute on the caller's message (Django's class does not declare it).
    message.gmail_outbound_id = row.pk  # type: ignore[attr-defined]
    signals.email_queued.send(OutboundEmail, outbound=row, message=message)
    batch = [(row.pk, row.priority, row.account_email)]
    transaction.on_commit(partial(publisher.hand_over, batch, using=using), using=using)
    return row


class OutboxWriter:
    """Stores routed messages in the outbox in chunks: one INSERT (``bulk_create``) and one
    on-commit publish per :data:`QUEUE_CHUNK` messages, inside the caller's transaction when
    there is one (else each chunk commits on its own).

    Use it as a context manager: leaving the block writes what is pending, also when the block
    raises (the messages added before a refused one are stored, as with one call each).
    ``keep_rows``: collect the written rows in :attr:`rows` (else only count them).
    """

    def __init__(
        self,
        *,
        mailer: str = "",
        using: str | None = None,
        chunk_size: int | None = None,
        keep_rows: bool = False,
    ) -> None:
        self.mailer = mailer
        self.db = using or db_router.db_for_write(OutboundEmail)
        self.chunk_size = max(1, chunk_size or QUEUE_CHUNK)
        self.keep_rows = keep_rows
        self.rows: list[OutboundEmail] = []
        self.count = 0
        self._pending: list[tuple[OutboundEmail, EmailMessage]] = []
        self._failed = False

    def __repr__(self) -> str:
        return f"<OutboxWriter {self.count} written, {len(self._pending)} pending>"

    def __enter__(self) -> OutboxWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._failed:  # a failed INSERT is not tried again on the way out
            self.flush()

    def add(self, envelope: Envelope, message: EmailMessage, priority: str) -> None:
        """Add one routed message; a full chunk is written at once."""
        row = _new_row(envelope, message, priority=priority, mailer=self.mailer, now=_now())
        self._pending.append((row, message))
        if len(self._pending) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending messages (one INSERT) and publish their ids on commit."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        rows = [row for row, _ in pending]
        alone = len(rows) == 1 and transaction.get_autocommit(using=self.db)
        try:
            # One row outside a transaction: a plain INSERT (it commits alone), not
            # BEGIN / INSERT / COMMIT.
            with nullcontext() if alone else transaction.atomic(using=self.db, savepoint=False):
                if alone:
                    insert_one(rows[0], self.db)
                else:
                    OutboundEmail.objects.using(self.db).bulk_create(rows)
                for row, message in pending:
                    message.gmail_outbound_id = row.pk  # type: ignore[attr-defined]
                    signals.email_queued.send(OutboundEmail, outbound=row, message=message)
                batch = [(row.pk, row.priority, row.account_email) for row in rows]
                on_commit = partial(publisher.hand_over, batch, using=self.db)
                transaction.on_commit(on_commit, using=self.db)
        except BaseException:
            self._failed = True
            raise
        self.count += len(rows)
        if self.keep_rows:
            self.rows.extend(rows)


def _now() -> datetime:
    return timezone.now()


#: (database alias, vendor) -> the one-row INSERT of OutboundEmail, the fields it takes as
#: parameters, whether it returns the id, and the (attribute, value) it writes as constants;
#: None where the ORM's statement cannot be reused as it is (see :func:`insert_one`)
_Statement = tuple[str, list[Any], bool, tuple[tuple[str, Any], ...]]
_insert_statements: dict[tuple[str, str], _Statement | None] = {}
#: the fields :func:`_new_row` sets (with the automatic times): the others have their default
_NEW_ROW_FIELDS = frozenset(
    {
        "status",
        "priority",
        "mailer",
        "account",
        "account_email",
        "from_email",
        "recipients",
        "subject",
        "message_id",
        "mime",
        "draft",
        "size",
        "from_rewritten",
        "enqueued_at",
        "created_at",
        "updated_at",
    }
)
#: defaults written into the statement as they are, the same in every SQL database
_SQL_LITERALS = {(type(None), None): "NULL", (int, 0): "0", (str, ""): "''"}


def insert_one(row: OutboundEmail, using: str) -> None:
    """``row.save(force_insert=True)`` for a new outbox row, without the ORM's work per save.

    The statement is the ORM's own, compiled once per database (the ORM compiles it anew on
    every save), the defaults a new row keeps are written into it, and the other values are
    prepared by the fields as ``save()`` prepares them. Inside a transaction an error marks it for
    rollback, as ``save()`` does. Where ``pre_save`` or ``post_save`` has receivers for
    OutboundEmail, or the statement has placeholders that depend on the values, this is
    ``save()`` itself."""
    connection = connections[using]
    key = (using, connection.vendor)
    if key not in _insert_statements:
        _insert_statements[key] = _compile_insert(row, using)
    statement = _insert_statements[key]
    if (
        statement is None
        or pre_save.has_listeners(OutboundEmail)
        or post_save.has_listeners(OutboundEmail)
        or any(getattr(row, name) != value for name, value in statement[3])
    ):
        row.save(using=using, force_insert=True)
        return
    sql, fields, returning, _ = statement
    params = [f.get_db_prep_save(f.pre_save(row, True), connection=connection) for f in fields]
    meta = OutboundEmail._meta
    with transaction.mark_for_rollback_on_error(using=using), connection.cursor() as cursor:
        cursor.execute(sql, params)
        if returning:
            pk = cursor.fetchone()[0]
        else:
            pk = connection.ops.last_insert_id(cursor, meta.db_table, str(meta.pk.column))
    row.pk = pk
    row._state.adding = False
    row._state.db = using


def _compile_insert(row: OutboundEmail, using: str) -> _Statement | None:
    from django.db.models.sql import InsertQuery

    connection = connections[using]
    meta = OutboundEmail._meta
    fields = [f for f in meta.local_concrete_fields if f is not meta.pk]
    query = InsertQuery(OutboundEmail)
    query.insert_values(fields, [row])
    compiler = query.get_compiler(using=using)
    # SQLite gives the new id as the cursor's lastrowid: a RETURNING clause costs more there.
    returning = connection.vendor != "sqlite" and connection.features.can_return_columns_from_insert
    compiler.returning_fields = [meta.pk] if returning else None
    statements = compiler.as_sql()
    if len(statements) != 1:
        return None
    sql, params = statements[0]
    plain = "VALUES (" + ", ".join(["%s"] * len(fields)) + ")"
    if sql.count(plain) != 1 or len(params) != len(fields):
        return None  # placeholders of their own (MySQL's binary), or extra parameters
    # The fields a new row leaves at a default of NULL, 0 or '' are written as such in the
    # statement: fewer parameters to adapt on every INSERT.
    placeholders, passed, constant = [], [], []
    for f in fields:
        default, literal = None, None
        if f.name not in _NEW_ROW_FIELDS:
            default = f.get_default()
            if default is None or type(default) in (int, str):
                literal = _SQL_LITERALS.get((type(default), default))
            elif isinstance(f, JSONField) and default == {}:
                literal = "'{}'"  # an empty JSON object, as JSONField writes it
        if literal is None:
            placeholders.append("%s")
            passed.append(f)
        else:
            placeholders.append(literal)
            constant.append((f.attname, default))
    values = "VALUES (" + ", ".join(placeholders) + ")"
    return sql.replace(plain, values), passed, returning, tuple(constant)


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


def publish(batch: Sequence[tuple[int, str, str]], *, using: str | None = None) -> int:
    """Hand freshly queued rows (``(id, priority, sending address)``) to Celery, with one
    producer and broker connection for all of them (Celery's pool keeps it between calls);
    return how many were handed over. One row is one ``send_outbound_email`` task; several rows
    of one priority and sending address are ``send_outbound_emails`` tasks of up to
    :data:`TASK_IDS` ids (a publish per hundred messages of a bulk ``send_messages``, not per
    message, while rows of different accounts stay separate tasks that workers can send side
    by side). Rows whose hand-off
    failed get ``enqueued_at`` cleared, so the sweeper enqueues them after ``SWEEP_GRACE``; a
    broker that is down is logged, not raised."""
    from .tasks import send_outbound_email, send_outbound_emails

    groups: dict[tuple[str, str], list[int]] = {}
    for outbound_id, priority, address in batch:
        groups.setdefault((priority, address), []).append(outbound_id)
    handed: set[int] = set()
    try:
        with send_outbound_email.app.producer_or_acquire() as producer:
            # Fail fast (kombu would otherwise retry the connection for seconds while the
            # caller's web request waits): the sweeper enqueues the rows later.
            producer.connection.ensure_connection(max_retries=0)
            for (priority, _), group in groups.items():
                queue = queue_name(priority)
                for start in range(0, len(group), TASK_IDS):
                    ids = group[start : start + TASK_IDS]
                    if len(ids) == 1:
                        send_outbound_email.apply_async(
                            (ids[0],), queue=queue, retry=False, producer=producer
                        )
                    else:
                        send_outbound_emails.apply_async(
                            (ids,), queue=queue, retry=False, producer=producer
                        )
                    handed.update(ids)
    except Exception as exc:  # kombu raises various errors for a broker that is down
        rest = [pk for pk, *_ in batch if pk not in handed]
        if len(rest) == 1:
            which, stays, them = f"outbound email {rest[0]}", "it stays", "it"
        else:
            which = f"{len(rest)} outbound emails ({rest[0]} to {rest[-1]})"
            stays, them = "they stay", "them"
        if isinstance(exc, ImproperlyConfigured):  # e.g. QUEUES: say what to fix
            logger.error(
                "Could not hand %s to Celery: %s %s queued; the sweeper enqueues %s once the "
                "setting is fixed.",
                which,
                exc,
                stays.capitalize(),
                them,
            )
        else:
            logger.warning(
                "Could not hand %s to Celery (%s: %s); %s queued and the sweeper will send %s",
                which,
                type(exc).__name__,
                exc,
                stays,
                them,
            )
        with suppress(Exception):  # the database may be the trouble; the rows are queued
            # On the database the rows were written to (``using``: the caller's, from the
            # publisher thread, where a router that reads the caller's context cannot tell).
            rows = OutboundEmail.objects.db_manager(using).filter(pk__in=rest)
            rows.filter(status=Status.QUEUED).update(enqueued_at=None)
    return len(handed)


# --- delivery ----------------------------------------------------------------------------------


def deliver(
    outbound_id: int,
    *,
    pool: Transport | None = None,
    transports: TransportFactory | None = None,
    worker: str = WORKER_ID,
    keep_warm: KeepWarm | None = None,
    stream: bool = False,
    priorities: tuple[str, ...] | None = None,
) -> Outcome:
    """Send one outbox row with the settings of the mailer that queued it; return what
    happened: sent, retry, deferred, failed or skipped (see
    :func:`django_gmail_smtp.pipeline.deliver_outbound`).

    ``pool``: the transport to send with, whatever the row's mailer; ``transports``: finds
    the transport for a mailer's settings (the worker's pools); neither: a new one.
    ``stream``: hold one of the account's connection slots and stream this row with the
    account's other due mail (what the task does); else this row alone. ``keep_warm``: given
    the slot once the account's mail is drained, instead of giving it back (the worker keeps
    the connection open for the next mail). ``priorities``: the stream's mail (None: all)."""
    from .pipeline import deliver_outbound

    return deliver_outbound(
        outbound_id,
        worker=worker,
        transport=pool,
        transports=transports,
        keep_warm=keep_warm,
        stream=stream,
        priorities=priorities,
    )


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
            "draft": row.draft,
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


def lease_now() -> datetime:
    """The time leases are measured by: the outbox database's, the same for every process (a
    worker whose clock disagrees must not see another's lease as run out, nor make its own
    look so)."""
    return db_now(db_router.db_for_write(OutboundEmail))


def claim(outbound_id: int, worker: str) -> OutboundEmail | None:
    """Atomically take a due row for sending; None if another delivery has it or it is done."""
    now = timezone.now()
    lease = timedelta(seconds=float(get_setting("SENDING_LEASE")))
    waiting = OutboundEmail.objects.filter(
        pk=outbound_id, status__in=[Status.QUEUED, Status.DEFERRED]
    )
    claimed = waiting.filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now + EARLY)
    ).update(status=Status.SENDING, lease_expires_at=lease_now() + lease, claimed_by=worker)
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


def _due(now: datetime) -> Q:
    """Rows a stream may take now: queued ones that are due, and deferred ones whose time has
    come (a deferred row without a time waits for its account to be fixed)."""
    return Q(status=Status.QUEUED) & (
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now + EARLY)
    ) | Q(status=Status.DEFERRED, next_attempt_at__lte=now + EARLY)


def claim_batch(
    account_email: str,
    mailer: str,
    worker: str,
    *,
    limit: int,
    exclude: Iterable[int] = (),
    priorities: Sequence[str] | None = None,
) -> list[OutboundEmail]:
    """Atomically take up to ``limit`` due rows of one sending address and mailer (never
    another's), transactional mail first, then oldest first; each row gets its own lease, and
    ``worker`` (the claim's token) as its owner. ``priorities``: only rows of these (a worker
    that serves the transactional queue alone never sends bulk mail)."""
    if limit <= 0:
        return []
    now = timezone.now()
    lease = timedelta(seconds=float(get_setting("SENDING_LEASE")))
    mine = OutboundEmail.objects.filter(account_email=account_email, mailer=mailer)
    if priorities is not None:
        mine = mine.filter(priority__in=list(priorities))
    candidates = list(
        mine.filter(_due(now))
        .exclude(pk__in=list(exclude))
        .order_by("-priority", "pk")
        .values_list("pk", flat=True)[:limit]
    )
    if not candidates:
        return []
    # Filter on the state again: a row another worker took meanwhile stays its own.
    mine.filter(_due(now), pk__in=candidates).update(
        status=Status.SENDING, lease_expires_at=lease_now() + lease, claimed_by=worker
    )
    rows = OutboundEmail.objects.select_related("account").filter(
        pk__in=candidates, status=Status.SENDING, claimed_by=worker
    )
    order = {pk: index for index, pk in enumerate(candidates)}
    return sorted(rows, key=lambda row: order[row.pk])


def has_due(account_email: str, priorities: Sequence[str] | None = None) -> bool:
    """Whether a stream of this sending address (of these priorities) would find rows now."""
    rows = OutboundEmail.objects.filter(account_email=account_email).filter(_due(timezone.now()))
    if priorities is not None:
        rows = rows.filter(priority__in=list(priorities))
    return rows.exists()


def due_mailers(account_email: str, priorities: Sequence[str] | None = None) -> list[str]:
    """The mailers that have rows of this sending address (of these priorities) due now."""
    rows = OutboundEmail.objects.filter(account_email=account_email).filter(_due(timezone.now()))
    if priorities is not None:
        rows = rows.filter(priority__in=list(priorities))
    return sorted(set(rows.values_list("mailer", flat=True)))


def kick(account_email: str) -> bool:
    """Hand the first due row of this sending address to Celery (its worker streams the
    rest); False when none is due."""
    first = (
        OutboundEmail.objects.filter(account_email=account_email)
        .filter(_due(timezone.now()))
        .order_by("-priority", "pk")
        .values_list("pk", "priority")
        .first()
    )
    return first is not None and dispatch(*first)


def release_claims(records: Sequence[OutboxRecord], *, at: datetime | None = None) -> int:
    """Give claimed rows that were not sent back (not an attempt): due again, or at ``at``."""
    total = 0
    for worker in {record.worker for record in records}:
        ids = [record.row.pk for record in records if record.worker == worker]
        total += OutboundEmail.objects.filter(
            pk__in=ids, status=Status.SENDING, claimed_by=worker
        ).update(
            status=Status.QUEUED,
            lease_expires_at=None,
            claimed_by="",
            next_attempt_at=at,
            updated_at=timezone.now(),
        )
    return total


def renew_claims(records: Sequence[OutboxRecord]) -> int:
    """Extend the leases of claimed rows still being sent (a long stream keeps the sweeper
    from re-queueing the rows it has not reached yet); return how many were extended."""
    lease = timedelta(seconds=float(get_setting("SENDING_LEASE")))
    expires = lease_now() + lease
    total = 0
    for worker in {record.worker for record in records}:
        ids = [record.row.pk for record in records if record.worker == worker]
        total += OutboundEmail.objects.filter(
            pk__in=ids, status=Status.SENDING, claimed_by=worker
        ).update(lease_expires_at=expires)
    return total


def record_sent(
    items: Sequence[tuple[OutboxRecord, SendResult]],
    account: GmailAccount,
    *,
    mark_account: bool = True,
) -> None:
    """Record Gmail's acceptance of several claimed rows in one transaction: each row sent,
    with its attempt (see :meth:`OutboxRecord.sent`, which does the same for one row).
    ``mark_account=False``: the caller records the account's last send itself (once per
    stream rather than once per message)."""
    if not items:
        return
    db = items[0][0].db
    at = timezone.now()
    updates = []
    for record, result in items:
        fields = {
            "lease_expires_at": None,
            "status": Status.SENT,
            "sent_at": at,
            "gmail_reply": result.reply[:2000],
            "refused_recipients": {r: list(v) for r, v in result.refused.items()},
            "reason": Reason.NONE,
            "last_error": "",
            "next_attempt_at": None,
            "updated_at": at,
        }
        for name, value in fields.items():
            setattr(record.row, name, value)
        attempt = {
            "outbound_id": record.row.pk,
            "at": at,
            "account_email": record.row.account_email,
            "outcome": AttemptOutcome.SENT,
            "code": 250,
            "reply": result.reply[:2000],
            "phase": "data",
            "worker": record.worker,
        }
        updates.append((record, fields, attempt))

    def write(again: bool) -> None:
        rows = OutboundEmail.objects.using(db)
        attempts = OutboundAttempt.objects.using(db)
        with transaction.atomic(using=db):
            todo = updates
            if again:
                # The earlier try may have committed; only its acknowledgement was lost.
                done = set(
                    attempts.filter(
                        outbound_id__in=[r.row.pk for r, _f, _a in updates],
                        at=at,
                        outcome=AttemptOutcome.SENT,
                    ).values_list("outbound_id", flat=True)
                )
                todo = [u for u in updates if u[0].row.pk not in done]
            for record, fields, _attempt in todo:
                changed = rows.filter(
                    pk=record.row.pk, status=Status.SENDING, claimed_by=record.worker
                ).update(**fields)
                if not changed:
                    logger.warning(
                        "Outbound email %s was sent after its lease ran out (SENDING_LEASE is "
                        "too short for this send)",
                        record.row.pk,
                    )
                    rows.filter(
                        pk=record.row.pk, status__in=[Status.QUEUED, Status.DEFERRED]
                    ).update(**fields)
            attempts.bulk_create([OutboundAttempt(**a) for _r, _f, a in todo])
            if todo and mark_account:
                account.mark_sent(at)

    _write_with_retries(write, db=db, row_id=items[0][0].row.pk, accepted=True)


# --- sweeping and maintenance --------------------------------------------------------------------


def sweep(*, limit: int = 1000) -> dict[str, int]:
    """Re-enqueue what is due; return counts (``due``, ``stale_queued``, ``expired_leases``)."""
    now = timezone.now()
    grace = timedelta(seconds=float(get_setting("SWEEP_GRACE")))
    lease_clock = lease_now()
    expired = OutboundEmail.objects.filter(status=Status.SENDING, lease_expires_at__lt=lease_clock)
    expired_ids = list(expired.values_list("pk", flat=True)[:limit])
    if expired_ids:
        # The worker died mid-send (the only duplicate window): send again.
        OutboundEmail.objects.filter(
            pk__in=expired_ids, status=Status.SENDING, lease_expires_at__lt=lease_clock
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
    handed: list[int] = []
    for name, queryset in (("due", due_deferred), ("stale_queued", stale_queued)):
        for pk, priority in queryset.order_by("-priority", "pk").values_list("pk", "priority")[
            :limit
        ]:
            if dispatch(pk, priority):
                counts[name] += 1
                handed.append(pk)
    addresses = set(
        OutboundEmail.objects.filter(pk__in=handed).values_list("account_email", flat=True)
    )
    counts["stale_queued"] += _restart_streams(now - grace, skip=addresses)
    return counts


def _restart_streams(before: datetime, *, skip: set[str]) -> int:
    """Start a stream for each address whose due mail waits with nobody holding its
    connection slot (its holder was killed, and the tasks of that mail skipped it while it
    held the slot): one task per address, its worker takes the rest."""
    from . import slots

    slots.expire()
    waiting = (
        OutboundEmail.objects.filter(_due(timezone.now()))
        .filter(Q(enqueued_at__lt=before) | Q(enqueued_at__isnull=True, created_at__lt=before))
        .values_list("account_email", flat=True)
        .distinct()
    )
    started = 0
    for address in list(waiting):
        if address not in skip and not slots.held(address) and kick(address):
            started += 1
    return started


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
            .update(mime=b"", draft=None, body_dropped_at=now)
        )
    if delete_sent_after is not None:
        old = OutboundEmail.objects.filter(_finished_before(now - delete_sent_after))
        result["deleted"] = old.delete()[0]
    return result
