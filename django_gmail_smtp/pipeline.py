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

import inspect
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage
from django.db import Error as DbError
from django.utils import timezone

from . import outbox, quota, signals, slots
from .conf import DEFAULTS, MailerSettings, for_mailer, get_setting
from .credentials import settings_account
from .enums import ErrorCategory, Outcome, Priority, Reason
from .exceptions import (
    ConnectionFailed,
    GmailSMTPError,
    InvalidMessage,
    MessageTooLarge,
    QuotaExceeded,
)
from .models import GmailAccount, OutboundEmail, normalize_address
from .routing import DraftEnvelope, Envelope, Router, account_key, explicit_account
from .transport import OnWait, SendResult, Transport, closing_iterator, make_transport

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
    size = envelope.size  # a message stored unbuilt: at most this (drafts stay well under)
    if size > limit:
        raise MessageTooLarge(
            f"The message is {size:,} bytes; Gmail accepts at most {limit:,} "
            f'(GMAIL_SMTP["MAX_MESSAGE_SIZE"]), so it was not {action}',
            account=envelope.account.email,
            phase="size",
        )


def row_envelope(
    row: OutboundEmail, account: GmailAccount, max_size: int | None = None
) -> Envelope:
    """The envelope a queued row is sent with: its stored bytes, or its draft (built when the
    bytes are first read; see :class:`~django_gmail_smtp.routing.DraftEnvelope`). An empty
    message is never sent: a row with neither fails with the reason."""
    if not row.mime:  # a draft; with none either, building it says there is nothing to send
        return DraftEnvelope(
            draft=row.draft or {},
            max_size=max_size,
            estimate=row.size,
            account=account,
            mail_from=row.from_email,
            recipients=list(row.recipients),
            message_id=row.message_id,
        )
    return Envelope(
        account=account,
        mail_from=row.from_email,
        recipients=list(row.recipients),
        data=bytes(row.mime),
        message_id=row.message_id,
    )


def build_next(unbuilt: deque[DraftEnvelope]) -> None:
    """Build the first envelope of ``unbuilt`` not built yet (one per call: a stream calls it
    while it waits for Gmail). One that does not build is left to fail where it is read."""
    while unbuilt:
        envelope = unbuilt.popleft()
        if not envelope.built:
            envelope.build()
            return


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

    def attempt_many(
        self,
        account: GmailAccount,
        items: Sequence[tuple[Envelope, str]],
        *,
        stop_at_refusal: bool = False,
        on_wait: OnWait | None = None,
        proceed: Callable[[], bool] | None = None,
    ) -> Generator[tuple[int, SendResult | Exception], None, None]:
        """Reserve quota for several messages of ``account`` (envelope, priority) in one
        ledger transaction and stream them over one connection; yield each one's index and
        outcome (Gmail's acceptance, or the error of that message) in order.

        A message the ledger refuses is yielded with its :class:`QuotaExceeded` (or
        :class:`~django_gmail_smtp.exceptions.TooManyRecipients`) and not sent. The stream
        stops early when the connection is lost or cannot be opened: the error is yielded for
        the message it concerns, and the messages after it are not yielded (they were not
        sent; their quota is given back). As in :meth:`attempt`, a reservation is kept only
        when Gmail accepted the message or may have kept it. ``stop_at_refusal``: only the
        messages before the first one the ledger refuses are sent, then that refusal is
        yielded (as sending one by one would stop there).

        ``on_wait``: called while the stream waits for Gmail (after each write, before reading
        the replies to it), so the caller can record the outcomes yielded so far off the
        critical path; each outcome is followed by a call before the stream reads the reply to
        the next message's body (with a transport whose ``stream`` has no ``on_wait``, or
        that sends one message at a time: after each outcome, before the stream goes on).
        What it raises ends the stream and is raised here. ``proceed``: asked before each
        further message is handed to the stream; once it says no, the message in flight is
        finished and the rest are not sent (their quota is given back)."""
        callback_errors: list[BaseException] = []
        waiting: OnWait | None = None
        if on_wait is not None:
            caller_on_wait = on_wait

            def call_on_wait() -> None:
                try:
                    caller_on_wait()
                except BaseException as exc:  # the caller's error, not the connection's
                    callback_errors.append(exc)
                    raise

            waiting = call_on_wait

        reservations = quota.reserve_many(
            account, [(len(e.recipients), p) for e, p in items], options=self.settings
        )
        index_of: dict[int, int] = {}
        to_send: list[Envelope] = []
        unused: dict[int, quota.Reservation] = {}
        refused = [i for i, r in enumerate(reservations) if not isinstance(r, quota.Reservation)]
        cut = refused[0] if stop_at_refusal and refused else None
        for index, ((envelope, _priority), reservation) in enumerate(
            zip(items, reservations, strict=True)
        ):
            if isinstance(reservation, quota.Reservation):
                if cut is not None and index > cut:
                    reservation.release()  # not sent: the stream stops at the refusal
                    continue
                index_of[id(envelope)] = index
                to_send.append(envelope)
                unused[index] = reservation
        try:
            if cut is None:
                for index in refused:
                    yield index, _refusal(reservations[index])  # refused by the ledger
            source: Iterable[Envelope] = to_send if proceed is None else _while(proceed, to_send)
            stream = self._stream(account, source, on_wait=waiting) if to_send else ()
            for envelope, outcome in stream:
                index = index_of[id(envelope)]
                reservation = unused.pop(index)
                if isinstance(outcome, SendResult):
                    yield index, outcome
                else:
                    yield index, self._failed(envelope, reservation, outcome)
            if cut is not None and not unused:
                yield cut, _refusal(reservations[cut])
        except Exception as exc:  # the connection could not be opened (or a bug)
            if any(exc is e for e in callback_errors):
                # The stream stopped while it waited for Gmail: the message after the last
                # outcome may have had its whole body written. When in doubt, count it.
                if unused:
                    unused.pop(min(unused))
                raise
            if unused:
                first = min(unused)
                yield first, self._failed(items[first][0], unused.pop(first), exc)
        finally:
            for reservation in unused.values():  # never sent
                reservation.release()

    def _stream(
        self,
        account: GmailAccount,
        envelopes: Iterable[Envelope],
        *,
        on_wait: OnWait | None = None,
    ) -> Iterator[tuple[Envelope, SendResult | GmailSMTPError]]:
        stream = getattr(self.transport, "stream", None)
        if stream is not None:
            if on_wait is None:
                yield from stream(account, envelopes)
            elif _takes_on_wait(stream):
                yield from stream(account, envelopes, on_wait=on_wait)
            else:
                # It cannot say when it waits: the caller's turn comes after each outcome,
                # before the stream goes on to the next message's body.
                items = stream(account, envelopes)
                try:
                    for item in items:
                        yield item
                        on_wait()
                finally:
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()
            return
        for envelope in envelopes:  # a transport that sends one message at a time
            if on_wait is not None:
                on_wait()  # nothing to overlap: the caller records before the next send
            try:
                yield envelope, self.transport.send(envelope)
            except GmailSMTPError as exc:
                yield envelope, exc
                if isinstance(exc, ConnectionFailed) or exc.smtp_code == 421:
                    return

    def _failed(
        self, envelope: Envelope, reservation: quota.Reservation, error: Exception
    ) -> Exception:
        # When in doubt, count it: no reply to the final "." means Gmail may have kept it.
        if not getattr(error, "maybe_delivered", False):
            reservation.release()
        if isinstance(error, QuotaExceeded) and error.limit == "gmail":
            error.next_slot_at = quota.mark_exhausted(envelope.account, error.reply, self.settings)
        return error

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

    def send_many(
        self,
        router: Router,
        messages: Sequence[EmailMessage],
        default_priority: str,
        *,
        fail_silently: bool = False,
    ) -> int:
        """Route, reserve, send and record several messages now, streaming the consecutive
        ones of one account over one connection (:meth:`attempt_many`); return how many were
        sent. As :meth:`send_now` one by one would: bad input raises (the messages before it
        are sent first), an account without quota fails over to another, and a sending error
        is raised (after the others were sent and recorded) unless ``fail_silently``."""
        done = 0
        run: list[tuple[EmailMessage, Envelope, Priority]] = []
        errors: list[GmailSMTPError] = []
        for message in messages:
            try:
                envelope, priority = self.route(router, message, default_priority, action="sent")
            except InvalidMessage:
                done += self._send_run(router, run, errors, fail_silently)
                self._raise_first(errors, fail_silently)
                raise  # never hidden by fail_silently
            except GmailSMTPError as exc:
                done += self._send_run(router, run, errors, fail_silently)
                errors.append(exc)
                self._raise_first(errors, fail_silently)  # as send_now: nothing after it
                continue
            run.append((message, envelope, priority))
        done += self._send_run(router, run, errors, fail_silently)
        self._raise_first(errors, fail_silently)
        return done

    @staticmethod
    def _raise_first(errors: list[GmailSMTPError], fail_silently: bool) -> None:
        if errors and not fail_silently:
            raise errors[0]
        for error in errors:
            logger.warning("Message not sent (fail_silently=True)", exc_info=error)
        errors.clear()

    def _send_run(
        self,
        router: Router,
        run: list[tuple[EmailMessage, Envelope, Priority]],
        errors: list[GmailSMTPError],
        fail_silently: bool = True,
    ) -> int:
        """Stream each group of consecutive messages of one account; return how many sent."""
        done = 0
        start = 0
        while start < len(run):
            key = account_key(run[start][1].account)
            end = start
            while end < len(run) and account_key(run[end][1].account) == key:
                end += 1
            account = run[start][1].account
            sent = False
            group = run[start:end]
            offset = 0
            while offset < len(group) and not (errors and not fail_silently):
                part = group[offset:]
                offset = len(group)
                stream = self.attempt_many(
                    account,
                    [(envelope, priority) for _m, envelope, priority in part],
                    stop_at_refusal=True,
                )
                for index, outcome in closing_iterator(stream):
                    message, envelope, priority = part[index]
                    if isinstance(outcome, SendResult):
                        self._record_now(message, envelope, outcome)
                        sent = True
                        done += 1
                        continue
                    if isinstance(outcome, QuotaExceeded) and router.route(
                        message, exclude=[account_key(account)]
                    ):
                        try:  # another account that may send as this From, as send_now does
                            self.send_now(router, message, priority)
                            done += 1
                            if outcome.phase == "quota":  # the ledger stopped the stream here
                                offset = len(group) - len(part) + index + 1
                            continue
                        except GmailSMTPError as exc:
                            outcome = exc
                    if not isinstance(outcome, GmailSMTPError):
                        raise outcome
                    errors.append(outcome)
                    if not fail_silently:
                        break  # as one by one: nothing after the failed message is sent
                    if outcome.phase == "quota":
                        offset = len(group) - len(part) + index + 1
            if sent:
                account.mark_sent()
            if errors and not fail_silently:
                break
            start = end
        run.clear()
        return done

    def _record_now(self, message: EmailMessage, envelope: Envelope, result: SendResult) -> None:
        # A documented extra attribute on the caller's message (Django's class does not declare it).
        message.gmail_status = {  # type: ignore[attr-defined]
            "account": envelope.account.email,
            "reply": result.reply,
            "message_id": result.message_id,
            "refused": result.refused,
            "from_rewritten": envelope.from_rewritten,
        }
        self._sent(envelope.account, result, message=message)

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
        envelope = row_envelope(row, account, self.settings.max_message_size)
        try:
            result = self.attempt(envelope, row.priority)
        except BaseException as exc:
            return self.settle(record, exc)
        return self._record_sent(record, account, result)

    def deliver_batch(
        self,
        records: Sequence[outbox.OutboxRecord],
        *,
        keep_alive: Callable[[Sequence[outbox.OutboxRecord]], bool] | None = None,
    ) -> BatchResult:
        """Send claimed rows of one sending address and mailer in one stream and record what
        happened to each: the sent ones together (one transaction), a failure on its own row
        (classified by :meth:`settle`). Rows the stream did not reach go back to the queue.
        ``keep_alive``: called with the rows not settled yet whenever the stream waits for
        Gmail (after the accepted ones are recorded), to renew their leases during a long
        stream; when it answers False (a lease was lost: taken over by another worker), the
        message in flight is finished and the rest are given back, untouched."""
        result = BatchResult()
        if not records:
            return result
        row = records[0].row
        try:
            account = self.account_for(row)
        except BaseException as exc:  # e.g. the database, a bad login option: recorded
            for record in records:
                result.outcomes[record.row.pk] = self.settle(record, exc)
            return result
        waiting = self._waiting(row, account)
        if waiting is not None or account is None:
            for record in records:
                result.outcomes[record.row.pk] = self.deliver(record)
            return result
        limit = self.settings.max_message_size
        envelopes = [row_envelope(r.row, account, limit) for r in records]
        # Rows stored unbuilt are built while the stream waits for Gmail, one per wait, each
        # ahead of its turn (the stream reads a message's bytes when it writes its envelope).
        unbuilt = deque(e for e in envelopes if isinstance(e, DraftEnvelope))
        sent_any = False
        seen: set[int] = set()
        last_error: Exception | None = None
        # Accepted messages wait here until the stream waits for Gmail (``on_wait``): they are
        # recorded (one transaction) while Gmail works on the next message, off the critical
        # path, and always before the stream reads a later reply. A worker killed while it
        # waits has recorded every message Gmail accepted, so only the one in flight may be
        # sent again (killed during that recording itself: also the one being recorded).
        accepted: list[tuple[outbox.OutboxRecord, SendResult]] = []

        held = [True]

        def record_accepted() -> None:
            if accepted:
                batch = accepted[:]
                del accepted[:]
                self._record_sent_batch(account, batch, result)
            build_next(unbuilt)
            if keep_alive is not None and held[0]:
                pending = [r for r in records if r.row.pk not in result.outcomes]
                held[0] = keep_alive(pending)

        try:
            items = [(e, r.row.priority) for e, r in zip(envelopes, records, strict=True)]
            for index, outcome in self.attempt_many(
                account, items, on_wait=record_accepted, proceed=lambda: held[0]
            ):
                seen.add(index)
                record = records[index]
                if isinstance(outcome, SendResult):
                    accepted.append((record, outcome))
                    sent_any = True
                else:
                    last_error = outcome
                    result.outcomes[record.row.pk] = self.settle(record, outcome)
        finally:
            try:
                record_accepted()  # an error above never loses a 250 already received
            finally:
                if sent_any:
                    account.mark_sent()
        untouched = [r for i, r in enumerate(records) if i not in seen]
        if untouched:
            result.untouched = len(untouched)
            phase = getattr(last_error, "phase", "")
            if not held[0]:
                # A lease was lost (this worker stalled past it): what is still ours goes back,
                # what another worker took is its own; this stream stops.
                logger.warning(
                    "A stream of %s lost its lease; %d message(s) given back",
                    account.email,
                    outbox.release_claims(untouched),
                )
                result.stop = True
            elif last_error is not None and phase in _MESSAGE_PHASES:
                # Dropped mid-stream: the rest go back to due, for a fresh connection.
                outbox.release_claims(untouched)
            else:  # the connection could not be opened: the same fate for every row
                result.stop = True
                self._share_failure(untouched, last_error, result)
        return result

    def _share_failure(
        self,
        records: list[outbox.OutboxRecord],
        error: Exception | None,
        result: BatchResult,
    ) -> None:
        """Rows a stream never reached because the connection could not be opened: those
        waiting for the account or a setting wait too; a temporary failure puts them back at
        the first one's retry time (not counted as their attempt)."""
        category = classify(error) if error is not None else ErrorCategory.TEMPORARY
        if error is not None and category in (
            ErrorCategory.AUTH,
            ErrorCategory.CONFIG,
            ErrorCategory.QUOTA,
        ):
            for record in records:
                result.outcomes[record.row.pk] = self.settle(record, error)
            return
        delay = retry_delay(1, self.settings)
        outbox.release_claims(records, at=timezone.now() + timedelta(seconds=delay))
        for record in records:
            outbox.dispatch(record.row.pk, record.row.priority, countdown=delay)

    def _record_sent_batch(
        self,
        account: GmailAccount,
        sent: list[tuple[outbox.OutboxRecord, SendResult]],
        result: BatchResult,
    ) -> None:
        # Rows with recipients refused for now need a follow-up row: recorded one by one.
        simple = [(r, s) for r, s in sent if not any(400 <= v[0] < 500 for v in s.refused.values())]
        outbox.record_sent(simple, account, mark_account=False)
        for record, send_result in simple:
            result.outcomes[record.row.pk] = Outcome.SENT
            self._sent(account, send_result, outbound=record.row)
        for record, send_result in sent:
            if record.row.pk not in result.outcomes:
                result.outcomes[record.row.pk] = self._record_sent(record, account, send_result)

    def _waiting(self, row: OutboundEmail, account: GmailAccount | None) -> str | None:
        """Why a row cannot be sent from ``account`` now (None: it can)."""
        if account is None:
            return "no account"
        if not account.is_active:
            return "paused"
        if not account.is_healthy:
            return "unhealthy"
        return None

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


@dataclass
class BatchResult:
    """What :meth:`Pipeline.deliver_batch` did: each row's outcome by id, how many rows the
    stream did not reach, and whether the stream should stop (the connection could not be
    opened) rather than take more rows."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)
    untouched: int = 0
    stop: bool = False


def config_retry_at(record: outbox.OutboxRecord, settings: MailerSettings | None) -> datetime:
    """When to try again after a configuration error: on the retry backoff, growing with each
    deferral, since a fix (a setting, a deleted account added again) may change nothing the app
    is told about. Not counted as a delivery attempt."""
    deferrals = record.deferrals()
    return timezone.now() + timedelta(seconds=retry_delay(deferrals + 1, settings))


def claim_token(worker: str) -> str:
    """A new claim's token. Each claim has its own: worker processes forked from one parent
    share its pid, so the worker's name alone cannot tell "still my claim" from a sibling's."""
    return f"{worker}:{uuid.uuid4().hex[:12]}"


#: called with the slot of a drained stream instead of giving it back: the worker keeps the
#: connection (and the slot) warm for the account's next mail (see ``tasks``)
KeepWarm = Callable[["slots.Slot"], None]


def deliver_outbound(
    outbound_id: int,
    *,
    worker: str,
    transport: Transport | None = None,
    transports: TransportFactory | None = None,
    keep_warm: KeepWarm | None = None,
    stream: bool = False,
    priorities: tuple[str, ...] | None = None,
) -> Outcome:
    """Claim one outbox row and send it with the settings of the mailer that queued it; with
    ``stream`` (what the task does), holding one of the account's connection slots, together
    with the other due mail of its account (see :func:`stream_account`).

    ``transport``: send with this one whatever the mailer (tests, a caller's own pool);
    else ``transports(settings)`` finds the transport for the row's mailer (a worker keeps one
    per settings), else a new one is built. Returns what happened to this row: SKIPPED when
    another delivery has it, or when another worker holds the account's connection (that
    worker's stream takes the row). ``priorities``: the stream sends mail of these only (a
    worker that serves the transactional queue alone never sends bulk mail); None: all,
    transactional first.
    """
    claim = claim_token(worker)
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
    if not stream:
        from .backends import CeleryGmailBackend

        return Pipeline(settings, transport=transport, sender=CeleryGmailBackend).deliver(record)
    address = row.account_email
    slot = slots.acquire(address, options=settings)
    first: list[outbox.OutboxRecord] = [record]
    if slot is None:
        # Another worker holds the account's connection: its stream takes the row. Asking
        # again after handing the row back closes the gap where that worker had just looked
        # for due rows and was about to let go.
        outbox.release_claims([record])
        slot = slots.acquire(address, options=settings)
        if slot is None:
            return Outcome.SKIPPED
        again = outbox.claim(outbound_id, claim)
        first = [outbox.OutboxRecord(again, claim)] if again is not None else []
    outcomes: dict[int, Outcome] = {}
    fixed = transport if transports is None else None
    factory = transports or (lambda _settings: transport)
    while True:
        try:
            slot.priorities = priorities
            outcomes.update(
                stream_account(
                    slot,
                    address,
                    row.mailer,
                    first,
                    worker=worker,
                    transport=fixed,
                    transports=factory,
                )
            )
        finally:
            if keep_warm is not None:
                keep_warm(slot)
            else:
                slots.release(slot)
        if keep_warm is not None or not outbox.has_due(address, slot.priorities):
            break
        # Mail came while the slot was being given back (its task found it held): send it.
        slot = slots.acquire(address, options=settings)
        if slot is None:
            break
        first = []
    return outcomes.get(outbound_id, Outcome.SKIPPED)


def stream_account(
    slot: slots.Slot,
    address: str,
    mailer: str,
    first: list[outbox.OutboxRecord],
    *,
    worker: str,
    transport: Transport | None = None,
    transports: TransportFactory | None = None,
) -> dict[int, Outcome]:
    """Holding ``slot``, send the due mail of ``address`` until none is left: claim up to
    ``STREAM_BATCH`` rows of one mailer at a time (``first`` already claimed), stream them
    (:meth:`Pipeline.deliver_batch`), and go on with the next rows, then with the due rows of
    the address's other mailers. Stops early when the connection cannot be opened or the
    slot was lost. Returns each row's outcome by id."""
    from .backends import CeleryGmailBackend

    size = int(get_setting("STREAM_BATCH"))
    keeper = LeaseKeeper(slot)
    outcomes: dict[int, Outcome] = {}
    done: set[str] = set()
    previous: Transport | None = None
    while True:
        if first:
            current = mailer
        else:
            waiting = [m for m in outbox.due_mailers(address, slot.priorities) if m not in done]
            if not waiting:
                return outcomes
            current = waiting[0]
        done.add(current)
        try:
            settings = for_mailer(current)
            pipeline_transport = transport or (transports or make_transport)(settings)
        except Exception as exc:  # a broken mailer: its rows wait on the backoff
            _defer_broken_mailer(address, current, first, exc, worker=worker)
            first = []
            continue
        if previous is not None and previous is not pipeline_transport:
            _close_address(previous, address)  # one connection per slot
        previous = pipeline_transport
        pipeline = Pipeline(settings, transport=pipeline_transport, sender=CeleryGmailBackend)
        records, first = first, []
        while True:
            token = claim_token(worker)
            more = outbox.claim_batch(
                address,
                current,
                token,
                limit=size - len(records),
                exclude=[r.row.pk for r in records],
                priorities=slot.priorities,
            )
            records += [outbox.OutboxRecord(row, token) for row in more]
            if not records:
                break
            result = pipeline.deliver_batch(records, keep_alive=keeper)
            outcomes.update(result.outcomes)
            records = []
            if result.stop or keeper.lost:
                return outcomes
            if not slots.renew(slot):
                logger.warning("Lost the connection slot of %s; stopping its stream", address)
                return outcomes


class LeaseKeeper:
    """Renews a stream's leases while it sends: its claimed rows' (``SENDING_LEASE``) and its
    connection slot's (``CONNECTION_LEASE``), every third of the shorter one, so that a batch
    slower than a lease (slow replies, a long batch) is not re-queued or taken over under it.

    Called with the rows not settled yet; answers False once a lease was lost (a row or the
    slot was taken over, after this worker stalled past its lease): the stream then stops. A
    renewal that fails (the database unreachable) is logged and the stream goes on: it cannot
    tell, and the sweeper only re-queues what has been unrenewed for a whole lease."""

    def __init__(self, slot: slots.Slot | None) -> None:
        lease = float(get_setting("SENDING_LEASE"))
        if slot is not None:
            lease = min(lease, float(get_setting("CONNECTION_LEASE")))
        self.slot = slot
        self.every = lease / 3
        self.due = time.monotonic() + self.every
        self.lost = False

    def __call__(self, records: Sequence[outbox.OutboxRecord]) -> bool:
        now = time.monotonic()
        if self.lost or now < self.due:
            return not self.lost
        self.due = now + self.every
        try:
            if outbox.renew_claims(records) < len(records):
                self.lost = True
        except DbError:
            logger.warning("Could not renew the leases of a stream's mail", exc_info=True)
        if self.slot is not None:
            try:
                if not slots.renew(self.slot):
                    self.lost = True
            except DbError:
                logger.warning("Could not renew a stream's connection slot", exc_info=True)
        return not self.lost


def _defer_broken_mailer(
    address: str,
    mailer: str,
    first: list[outbox.OutboxRecord],
    error: Exception,
    *,
    worker: str,
) -> None:
    """The due rows of a mailer whose settings or transport cannot be built wait, on the
    backoff, for the setting to be fixed (not a delivery attempt), as a single row's task
    would have them wait."""
    records = list(first)
    while True:
        token = claim_token(worker)
        records += [
            outbox.OutboxRecord(row, token)
            for row in outbox.claim_batch(address, mailer, token, limit=100)
        ]
        if not records:
            return
        for record in records:
            record.defer(Reason.CONFIG, str(error), config_retry_at(record, None), error)
        records = []


def _close_address(transport: Transport, address: str) -> None:
    close = getattr(transport, "close_address", None)
    if close is not None:
        close(address)


__all__ = [
    "Pipeline",
    "classify",
    "deliver_outbound",
    "refuse_oversized",
    "retry_delay",
]


#: SMTP phases of one message: a stream that failed in one of them had its connection open
_MESSAGE_PHASES = frozenset({"mail", "rcpt", "data", "after_data", "size"})


def _while(proceed: Callable[[], bool], envelopes: Iterable[Envelope]) -> Iterator[Envelope]:
    """``envelopes``, as long as ``proceed()`` says so (asked before each one)."""
    for envelope in envelopes:
        if not proceed():
            return
        yield envelope


_TAKES_ON_WAIT: dict[Any, bool] = {}


def _takes_on_wait(stream: Callable[..., Any]) -> bool:
    """Whether a transport's ``stream`` accepts the ``on_wait`` keyword (cached per method:
    custom transports written before it existed do not)."""
    key = getattr(stream, "__func__", stream)
    known = _TAKES_ON_WAIT.get(key)
    if known is None:
        try:
            parameters = list(inspect.signature(stream).parameters.values())
        except (TypeError, ValueError):  # no signature to read: assume the old one
            parameters = []
        known = _TAKES_ON_WAIT[key] = any(
            p.name == "on_wait" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
        )
    return known


def _refusal(reservation: quota.Reservation | Exception) -> Exception:
    """A ledger refusal from :func:`quota.reserve_many` (never a reservation here)."""
    assert isinstance(reservation, Exception)
    return reservation
