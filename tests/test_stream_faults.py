"""Attacks on the worker's streamed send path: faults at every step of a stream, the database
lost while a batch is recorded or the next one claimed, the connection slot taken over, clocks
that disagree, and rows cancelled or paused while a stream holds them.

The promise under test: a message Gmail accepted is never lost nor counted twice. Delivery is
at-least-once with one duplicate window (a worker killed, or the database down for longer than
``RECORD_RETRY_SECONDS``, between Gmail's 250 and the commit of ``sent``) and one "maybe
delivered" case (the connection lost after the whole message was uploaded, before the reply:
retried, and it stays counted against the quota). Anything else that loses a message, sends
one twice, counts quota twice or leaves a row stuck is a bug.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.core.mail import EmailMessage, get_connection
from django.db import Error as DriverError
from django.db import OperationalError, connection
from django.utils import timezone

from django_gmail_smtp import outbox, services, slots, tasks
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.enums import AttemptOutcome, Outcome, Reason, Status
from django_gmail_smtp.models import ConnectionSlot, OutboundEmail, SenderQuota
from django_gmail_smtp.testing.smtp import GmailSMTP
from django_gmail_smtp.transport import ConnectionPool

from .conftest import SENDER
from .db_faults import kill_connection, marks_sent, raw_connection
from .factories import all_sent, arm_after, make_due, wait_until, with_keys
from .processes import ROOT, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

POSTGRESQL = django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
needs_postgresql = pytest.mark.skipif(
    not POSTGRESQL, reason="terminating a worker's database connections needs PostgreSQL"
)


# --- helpers ---------------------------------------------------------------------------------


def queue(n: int, *, prefix: str = "m") -> list[OutboundEmail]:
    """Queue ``n`` messages (subjects m0, m1, ...) through the Celery backend."""
    messages = [EmailMessage(f"{prefix}{i}", "body", SENDER, ["t@x.example"]) for i in range(n)]
    CeleryGmailBackend().send_messages(messages)
    return [OutboundEmail.objects.get(pk=m.gmail_outbound_id) for m in messages]


def rows() -> dict[str, OutboundEmail]:
    return {row.subject: row for row in OutboundEmail.objects.order_by("pk")}


def log(row: OutboundEmail) -> list[str]:
    return [attempt.outcome for attempt in row.log.order_by("pk")]


def delivered(sandbox) -> Counter:
    """How many times the sandbox accepted each subject."""
    return Counter(d.subject for d in sandbox.deliveries)


def in_thread(work):
    """Run ``work`` now in a thread of its own, with its own database connection (the
    sandbox's callbacks run on its event loop, where Django refuses database queries)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]


def expire_leases() -> None:
    """Time passes: every row lease and connection-slot lease has run out."""
    past = timezone.now() - timedelta(seconds=1)
    OutboundEmail.objects.filter(status=Status.SENDING).update(lease_expires_at=past)
    ConnectionSlot.objects.exclude(holder="").update(lease_expires_at=past)
    OutboundEmail.objects.update(enqueued_at=past - timedelta(hours=1))


def sweep_and_deliver(pool, dispatched) -> None:
    """What the beat sweeper and the tasks it hands rows to do, in this process."""
    dispatched.clear()
    outbox.sweep()
    for pk, _countdown in list(dispatched):
        outbox.deliver(pk, pool=pool, stream=True)


def is_claim(sql: str, params) -> bool:
    """The UPDATE that claims rows (status -> sending, with the claim's token)."""
    return (
        sql.lstrip().upper().startswith("UPDATE")
        and OutboundEmail._meta.db_table in sql
        and 'SET "status" = ' in sql
        and bool(params)
        and params[0] == Status.SENDING
    )


@pytest.fixture
def make_pool():
    """Connection pools made during the test (with the settings of that moment), closed after."""
    made: list[ConnectionPool] = []
    yield lambda: made.append(ConnectionPool()) or made[-1]
    for pool in made:
        pool.close()


class Hold:
    """Gmail keeps a message (the sandbox stores it) but holds its 250 until released."""

    def __init__(self) -> None:
        self.nth = 1  # which 250 to a message body is held (1: the first)
        self.seen = 0
        self.engaged = threading.Event()
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def hold(monkeypatch):
    """Hold the sandbox's ``hold.nth`` reply to a message body until ``hold.release()``; the
    other sessions go on meanwhile (the wait is off the server's event loop)."""
    held = Hold()
    push = GmailSMTP.push

    async def holding_push(self, status):
        text = status.decode() if isinstance(status, bytes) else str(status)
        if text.startswith("250 2.0.0 OK  ") and not held.engaged.is_set():
            held.seen += 1
            if held.seen == held.nth:
                held.engaged.set()
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, held.released.wait, 120)
        await push(self, status)

    monkeypatch.setattr(GmailSMTP, "push", holding_push)
    yield held
    held.release()


# --- a fault at every step ---------------------------------------------------------------------

FAULTS = {
    "421": {"reply": "421 4.7.0 Try again later, closing connection."},
    "drop": {"drop": True},
    # no reply within TIMEOUT (2 s); the client gives up and drops the connection
    "timeout": {"delay": 5.0},
}
#: which message the fault hits, and after which accepted one it is armed
POSITIONS = {
    "first": ("m0", None),
    "middle": ("m2", "m1"),
    "last": ("m4", "m3"),
    # STREAM_BATCH 2: the first message of the second batch, on the first batch's connection
    "next-batch": ("m2", "m1"),
}


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("kind", list(FAULTS))
@pytest.mark.parametrize("phase", ["mail", "rcpt", "data", "after_data"])
def test_a_fault_at_any_step_of_a_stream_loses_nothing_and_sends_nothing_twice(
    account, sandbox, make_pool, dispatched, settings, phase, kind, position
):
    with_keys(settings, STREAM_BATCH=2 if position == "next-batch" else 20)
    if kind == "timeout":
        with_keys(settings, TIMEOUT=2)
    pool = make_pool()  # (after the settings: a pool keeps those it was made with)
    first = queue(5)[0]
    dispatched.clear()  # (the queueing's own hand-over)
    target, after = POSITIONS[position]
    fault = {"phase": phase, "times": 1, **FAULTS[kind]}
    if after is None:
        sandbox.fault(**fault)
    else:
        arm_after(sandbox, after, **fault)
    # A reused connection whose first message fails before its body went out is replaced
    # once, transparently: nothing of it had reached Gmail.
    transparent = position == "next-batch" and phase in ("mail", "rcpt")
    # No reply after the whole message went out: Gmail may have kept it.
    maybe = phase == "after_data" and kind != "421"

    outcome = outbox.deliver(first.pk, pool=pool, stream=True)

    assert outcome == (Outcome.RETRY if target == "m0" else Outcome.SENT)
    by = rows()
    for subject, row in by.items():
        if subject != target or transparent:
            assert (row.status, row.attempts, log(row)) == (Status.SENT, 0, ["sent"]), subject
    hit = by[target]
    if transparent:
        assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
        assert account.quota_status().messages_used == 5
    else:
        assert (hit.status, hit.reason, hit.attempts) == (Status.QUEUED, Reason.RETRY, 1)
        assert log(hit) == [AttemptOutcome.RETRY]
        assert ("Gmail may have kept it" in hit.last_error) is maybe, hit.last_error
        assert [pk for pk, _countdown in dispatched] == [hit.pk]  # its retry's task
        assert delivered(sandbox) == Counter({s: 1 for s in by if s != target})
        assert account.quota_status().messages_used == 4 + maybe
        # its retry goes out once
        make_due(hit)
        assert outbox.deliver(hit.pk, pool=pool, stream=True) == Outcome.SENT
        hit.refresh_from_db()
        assert log(hit) == [AttemptOutcome.RETRY, AttemptOutcome.SENT]
        assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
        # the one Gmail may have kept stays counted
        assert account.quota_status().messages_used == 5 + maybe
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    assert slots.held(SENDER) == 0


def test_a_reply_lost_after_gmail_kept_a_streamed_message_is_sent_again_and_counted_again(
    account, sandbox, make_pool, dispatched, settings, hold
):
    """The documented "maybe delivered" case, with Gmail keeping the message: m2's 250 never
    comes (the client gives up after TIMEOUT). m2 is retried and Gmail gets it twice; the
    ledger counts both, as Gmail does. The messages around it go out once."""
    with_keys(settings, TIMEOUT=2)
    pool = make_pool()
    hold.nth = 3
    first = queue(5)[0]
    dispatched.clear()
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    by = rows()
    assert (by["m2"].status, by["m2"].attempts) == (Status.QUEUED, 1)
    assert "Gmail may have kept it" in by["m2"].last_error
    assert [pk for pk, _countdown in dispatched] == [by["m2"].pk]
    for subject in ("m0", "m1", "m3", "m4"):
        assert (by[subject].status, by[subject].attempts) == (Status.SENT, 0)
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
    assert account.quota_status().messages_used == 5
    make_due(by["m2"])
    assert outbox.deliver(by["m2"].pk, pool=pool, stream=True) == Outcome.SENT
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1, "m2": 2, "m3": 1, "m4": 1})
    assert account.quota_status().messages_used == len(sandbox.deliveries) == 6


@pytest.mark.parametrize(
    "fault",
    [
        {"reply": "421 4.7.0 Try again later, closing connection."},
        {"drop": True},
        {"delay": 5.0},  # no greeting within TIMEOUT
    ],
    ids=["421", "drop", "timeout"],
)
def test_a_stream_that_cannot_connect_counts_one_attempt_and_strands_no_row(
    account, sandbox, make_pool, dispatched, settings, fault
):
    """The connection cannot be opened: the first row has its attempt, the others wait for
    the same retry time without one, and every row is sent once when due."""
    with_keys(settings, TIMEOUT=2)
    pool = make_pool()
    first = queue(4)[0]
    dispatched.clear()
    sandbox.fault("connect", times=1, **fault)
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.RETRY
    by = rows()
    assert [by[f"m{i}"].attempts for i in range(4)] == [1, 0, 0, 0]
    assert {row.status for row in by.values()} == {Status.QUEUED}
    assert all(row.next_attempt_at is not None for row in by.values())
    assert sorted(pk for pk, _countdown in dispatched) == sorted(r.pk for r in by.values())
    assert sandbox.deliveries == [] and account.quota_status().messages_used == 0
    OutboundEmail.objects.update(next_attempt_at=timezone.now())
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(4)})
    assert account.quota_status().messages_used == 4


def test_a_refusal_then_a_drop_in_one_stream_land_on_their_own_rows(
    account, sandbox, pool, dispatched
):
    """m1 is refused for good at MAIL (the stream goes on after an RSET pipelined with m2's
    envelope); the connection then drops after m3's body. m1 fails, m3 is retried (maybe
    delivered), m4 is released untouched and sent on a new connection, the rest once."""
    first = queue(5)[0]
    dispatched.clear()

    def on_delivery(accepted):
        if accepted.subject == "m0":
            sandbox.fault("mail", reply="550 5.7.1 Blocked by policy.", times=1)
        if accepted.subject == "m2":
            sandbox.fault("after_data", drop=True, times=1)

    sandbox._state.on_delivery = on_delivery
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    by = rows()
    assert (by["m1"].status, by["m1"].attempts, log(by["m1"])) == (Status.FAILED, 0, ["failed"])
    assert (by["m3"].status, by["m3"].attempts) == (Status.QUEUED, 1)
    assert "Gmail may have kept it" in by["m3"].last_error
    for subject in ("m0", "m2", "m4"):
        assert (by[subject].status, by[subject].attempts, log(by[subject])) == (
            Status.SENT,
            0,
            ["sent"],
        )
    assert [pk for pk, _countdown in dispatched] == [by["m3"].pk]
    assert delivered(sandbox) == Counter({"m0": 1, "m2": 1, "m4": 1})
    assert account.quota_status().messages_used == 4  # m1 given back, m3 kept
    make_due(by["m3"])
    assert outbox.deliver(by["m3"].pk, pool=pool, stream=True) == Outcome.SENT
    assert delivered(sandbox) == Counter({"m0": 1, "m2": 1, "m3": 1, "m4": 1})
    assert account.quota_status().messages_used == 5


# --- STREAM_BATCH edges ------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 50])
def test_each_stream_batch_size_sends_every_due_row_once_over_one_login(
    account, sandbox, pool, dispatched, settings, batch
):
    with_keys(settings, STREAM_BATCH=batch)
    first = queue(5)[0]
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    assert [d.subject for d in sandbox.deliveries] == [f"m{i}" for i in range(5)]
    assert {(r.status, r.attempts, tuple(log(r))) for r in rows().values()} == {
        (Status.SENT, 0, ("sent",))
    }
    assert sandbox.stats.logins == 1
    assert account.quota_status().messages_used == 5
    assert slots.held(SENDER) == 0


# --- the database lost while a stream records or claims ---------------------------------------


@pytest.mark.parametrize("which", [1, 3, 5], ids=["first-record", "third-record", "last-record"])
def test_a_database_connection_lost_while_recording_a_streamed_batch_is_recorded_again(
    account, sandbox, pool, dispatched, which
):
    """The connection dies on the UPDATE that marks an accepted message sent (m0's while the
    stream waits for m1's reply, m2's, or m4's after the stream ended): the record is retried
    on a new connection; nothing is re-queued, logged twice or sent twice."""
    first = queue(5)[0]
    seen: list[str] = []

    def drop(execute, sql, params, many, context):
        if marks_sent(sql, params):
            seen.append(sql)
            if len(seen) == which:
                kill_connection(context["connection"])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(drop):
        assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    assert len(seen) == 6  # five rows, one of them twice
    assert {(r.status, r.attempts, tuple(log(r))) for r in rows().values()} == {
        (Status.SENT, 0, ("sent",))
    }
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
    assert account.quota_status().messages_used == 5
    # nothing left for the sweeper to send again
    expire_leases()
    sweep_and_deliver(pool, dispatched)
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})


def locks_the_ledger(sql: str, params) -> bool:
    """The UPDATE that opens a quota reservation (it takes the address's ledger lock)."""
    return sql.lstrip().upper().startswith("UPDATE") and SenderQuota._meta.db_table in sql


@pytest.mark.parametrize("when", ["before-claim", "after-claim-commit", "reserving-quota"])
def test_a_database_connection_lost_while_taking_the_next_batch_loses_and_repeats_nothing(
    account, sandbox, pool, dispatched, settings, when
):
    """The connection dies while the stream takes its second batch: on the claim's UPDATE
    (it never ran), right after that UPDATE committed (the rows are claimed, the worker never
    hears of it), or on the quota reservation for the claimed rows. The stream ends with the
    error; once the leases ran out the sweeper's tasks send the rest, each once."""
    with_keys(settings, STREAM_BATCH=2)
    first = queue(5)[0]
    claims: list[str] = []
    reservations: list[str] = []

    def drop(execute, sql, params, many, context):
        if is_claim(sql, params):
            claims.append(sql)
            # 1: the task's own row, 2: the rest of batch one, 3: batch two
            if len(claims) == 3 and when == "before-claim":
                kill_connection(context["connection"])
            if len(claims) == 3 and when == "after-claim-commit":
                result = execute(sql, params, many, context)
                kill_connection(context["connection"])
                return result
        if locks_the_ledger(sql, params) and len(claims) == 3:
            reservations.append(sql)
            if len(reservations) == 1 and when == "reserving-quota":  # batch two's
                kill_connection(context["connection"])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(drop), pytest.raises(DriverError):
        outbox.deliver(first.pk, pool=pool, stream=True)
    connection.close()  # (this thread's connection may be the one that was lost)
    assert len(claims) == 3  # the stream ended at the fault
    assert len(reservations) == (when == "reserving-quota")
    by = rows()
    assert [by[f"m{i}"].status for i in range(2)] == [Status.SENT] * 2
    claimed = {Status.QUEUED} if when == "before-claim" else {Status.SENDING}
    assert {by["m2"].status, by["m3"].status} == claimed
    assert by["m4"].status == Status.QUEUED
    assert all(by[f"m{i}"].attempts == 0 for i in range(5))
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1})
    assert account.quota_status().messages_used == 2  # nothing reserved for batch two

    expire_leases()
    sweep_and_deliver(pool, dispatched)
    assert {(r.status, r.attempts, tuple(log(r))) for r in rows().values()} == {
        (Status.SENT, 0, ("sent",))
    }
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
    assert account.quota_status().messages_used == 5


def test_a_database_down_for_good_while_recording_keeps_the_message_in_flight_counted(
    account, sandbox, pool, dispatched, monkeypatch, caplog
):
    """m0 is accepted; the database goes down for good while the stream waits for the reply
    to m1, whose body is already written (and accepted by Gmail). Both duplicates that follow
    are the documented window; but Gmail counts m1, so the ledger must too (when in doubt,
    count it), or the app walks into Gmail's own 550 5.4.5."""
    monkeypatch.setattr(outbox, "RECORD_RETRY_SECONDS", 0.3)
    first = queue(3)[0]

    def down(execute, sql, params, many, context):
        if marks_sent(sql, params):
            sandbox.wait_for(2)  # m1's body reached Gmail (and Gmail took it)
            raise OperationalError("the database is unreachable (simulated)")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(down), pytest.raises(OperationalError):
        outbox.deliver(first.pk, pool=pool, stream=True)
    assert f"Gmail ACCEPTED outbound email {first.pk}" in caplog.text
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1})
    assert account.quota_status().messages_used == 2


# --- the connection slot taken over -------------------------------------------------------------


def take_over(holder: str = "other-worker") -> slots.Slot:
    """The account's slot lease ran out (its holder stalled), and another worker took it."""
    ConnectionSlot.objects.filter(address=SENDER).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    taken = slots.acquire(SENDER, holder=holder)
    assert taken is not None
    return taken


def test_a_stream_whose_slot_is_taken_over_finishes_its_batch_and_leaves_the_rest(
    account, sandbox, pool, dispatched, settings
):
    with_keys(settings, STREAM_BATCH=2)
    first = queue(5)[0]

    def steal(accepted):
        if accepted.subject == "m0":
            in_thread(take_over)

    sandbox._state.on_delivery = steal
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    by = rows()
    # its claimed batch went out once; then it stopped and left the rest to the new holder
    assert [by[f"m{i}"].status for i in range(5)] == [Status.SENT] * 2 + [Status.QUEUED] * 3
    assert all(by[f"m{i}"].claimed_by == "" for i in range(2, 5))
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1})
    assert account.quota_status().messages_used == 2
    # the slot stays the new holder's (giving it back must not free another's slot)
    assert list(ConnectionSlot.objects.values_list("holder", flat=True)) == ["other-worker"]
    # that holder dies in turn: the sweeper starts a stream that sends the rest once
    sandbox._state.on_delivery = None
    expire_leases()
    sweep_and_deliver(pool, dispatched)
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
    assert account.quota_status().messages_used == 5


@pytest.fixture
def worker_process(settings):
    """This process as a Celery worker process: its transports, its keeper thread keeping an
    account's connection warm (idle for 5 s). Both are stopped after the test."""
    with_keys(settings, CONNECTION_IDLE=5)
    yield
    wait_for(lambda: tasks._keeper is None, 30, "the keeper thread to stop")
    tasks._close_pool()


def test_a_warm_connection_whose_slot_was_taken_over_sends_nothing_more(
    account, sandbox, dispatched, worker_process
):
    first = queue(1)[0]
    assert (
        outbox.deliver(
            first.pk, transports=tasks.transport_for, keep_warm=tasks.keep_warm, stream=True
        )
        == Outcome.SENT
    )
    with tasks._lock:  # the process is busy with another account's task: its keeper waits
        assert SENDER in tasks._warm  # (checked under the lock: still warm, not let go yet)
        take_over()  # meanwhile the warm slot's lease runs out and another worker takes it
        (late,) = queue(1, prefix="late")
    wait_for(lambda: tasks._keeper is None, 30, "the keeper thread to let the account go")
    late.refresh_from_db()
    # the mail is the slot holder's to send: this process no longer holds the account's
    # connection (CONNECTIONS_PER_ACCOUNT), so it must not open or use one
    assert (late.status, late.claimed_by) == (Status.QUEUED, "")
    assert delivered(sandbox) == Counter({"m0": 1})
    assert list(ConnectionSlot.objects.values_list("holder", flat=True)) == ["other-worker"]


# --- rows cancelled or paused while a stream holds them ------------------------------------------


def test_cancelling_mail_while_a_stream_holds_a_batch_sends_the_claimed_rows_once_and_no_other(
    account, sandbox, pool, dispatched, settings
):
    """The admin's cancel while m0 is being sent: the rows of the claimed batch are being
    sent (cancel leaves them), the others are cancelled and never sent."""
    with_keys(settings, STREAM_BATCH=2)
    first = queue(5)[0]
    cancelled: list[int] = []

    def cancel(accepted):
        if accepted.subject == "m0":
            in_thread(lambda: cancelled.append(outbox.cancel(OutboundEmail.objects.all())))

    sandbox._state.on_delivery = cancel
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    assert cancelled == [3]
    by = rows()
    assert [by[f"m{i}"].status for i in range(5)] == [Status.SENT] * 2 + [Status.CANCELLED] * 3
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1})
    assert account.quota_status().messages_used == 2
    expire_leases()
    sweep_and_deliver(pool, dispatched)
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1})
    assert slots.held(SENDER) == 0


def test_pausing_an_account_while_a_stream_holds_a_batch_defers_the_rest_until_resumed(
    account, sandbox, pool, dispatched, settings
):
    with_keys(settings, STREAM_BATCH=2)
    first = queue(5)[0]

    def pause(accepted):
        if accepted.subject == "m0":
            in_thread(lambda: services.pause(account))

    sandbox._state.on_delivery = pause
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    by = rows()
    # the claimed batch is being sent; the rest waits for the account, without an attempt
    assert [by[f"m{i}"].status for i in range(5)] == [Status.SENT] * 2 + [Status.DEFERRED] * 3
    assert {(by[f"m{i}"].reason, by[f"m{i}"].attempts) for i in range(2, 5)} == {(Reason.AUTH, 0)}
    assert all(by[f"m{i}"].next_attempt_at is None for i in range(2, 5))
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1})
    # nothing is sent while it is paused, whatever the sweeper does
    sandbox._state.on_delivery = None
    expire_leases()
    sweep_and_deliver(pool, dispatched)
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1})
    assert account.quota_status().messages_used == 2
    services.resume(account)
    sweep_and_deliver(pool, dispatched)
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
    assert account.quota_status().messages_used == 5


# --- real workers: killed or cut off from the database mid-stream, two streams at once -------


def capture_dispatch(monkeypatch) -> list[tuple[int, float | None]]:
    """From now on, row ids this process hands to Celery are kept here instead."""
    calls: list[tuple[int, float | None]] = []
    monkeypatch.setattr(
        outbox,
        "dispatch",
        lambda pk, priority, countdown=None: calls.append((pk, countdown)) or True,
    )
    return calls


def kill_mid_stream(start_worker, hold) -> None:
    """A worker streams m0-m4; it is killed while Gmail holds its reply to m2 (Gmail has
    m2; m3's envelope went out with m2's body, unanswered). m0 and m1, accepted before the
    stream waited, must be recorded by then."""
    hold.nth = 3
    worker = start_worker()
    get_connection().send_messages(
        [EmailMessage(f"m{i}", "b", SENDER, ["to@example.net"]) for i in range(5)]
    )
    wait_for(hold.engaged.is_set, 30, "the worker to wait for Gmail's reply to m2")
    # recorded while the stream waited: a kill now must not send them again
    wait_until(
        lambda: (
            OutboundEmail.objects.filter(subject__in=["m0", "m1"], status=Status.SENT).count() == 2
        ),
        what="m0 and m1 recorded as sent while the stream waits",
    )
    worker.kill()
    hold.release()


@pytest.mark.integration
def test_a_worker_killed_mid_stream_sends_again_only_the_message_in_flight(
    account, sandbox, start_worker, hold
):
    kill_mid_stream(start_worker, hold)
    # the sweeper re-queues the killed stream's rows once their lease ran out, and a stream
    # sends them once the slot's lease ran out
    start_worker(name="w2", beat=True)
    wait_until(all_sent(5), timeout=60, what="the killed worker's mail to be sent")
    sent = delivered(sandbox)
    # m2 was in flight (Gmail has it, its 250 never read): the documented duplicate window
    assert sent == Counter({"m0": 1, "m1": 1, "m2": 2, "m3": 1, "m4": 1})
    by = rows()
    assert [log(by[f"m{i}"]) for i in range(5)] == [["sent"]] * 5
    assert all(row.attempts == 0 for row in by.values())
    assert outbox.sweep()["expired_leases"] == 0


@pytest.mark.integration
def test_a_worker_killed_mid_stream_never_leaves_the_quota_under_gmails_count(
    account, sandbox, start_worker, hold, pool, monkeypatch
):
    kill_mid_stream(start_worker, hold)
    # the sweeper and a stream of this process send the rest
    dispatched = capture_dispatch(monkeypatch)
    expire_leases()
    sweep_and_deliver(pool, dispatched)
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    assert delivered(sandbox) == Counter({"m0": 1, "m1": 1, "m2": 2, "m3": 1, "m4": 1})
    # Gmail counts six messages (m2 twice). The killed stream had reserved m3 and m4 too; it
    # cannot be known after the kill which of its unrecorded messages Gmail got, so their
    # reservations stay, on the safe side (documented: at most the rest of one batch, for the
    # 24-hour window), and the ledger never counts less than Gmail does.
    used = account.quota_status().messages_used
    assert used == len(sandbox.deliveries) + 2


def tagged_database(tag: str) -> dict[str, str]:
    """The worker's environment: the test database, its connections named ``tag``."""
    db = {**connection.settings_dict}
    db["OPTIONS"] = {**db.get("OPTIONS", {}), "application_name": tag}
    return {"GMAIL_SMTP_TEST_DB": json.dumps(db, default=str)}


def terminate(tag: str) -> int:
    """Terminate every database connection named ``tag``; return how many."""
    killer = raw_connection()
    try:
        cursor = killer.cursor()
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [tag],
        )
        return len(cursor.fetchall())
    finally:
        killer.close()


@pytest.mark.integration
@needs_postgresql
def test_a_worker_whose_database_connections_are_terminated_mid_stream_sends_each_once(
    account, sandbox, start_worker, hold
):
    """While the stream waits for Gmail's reply to m1 (m0 recorded), PostgreSQL terminates
    the worker's connections: m1 is recorded on a new connection and the stream goes on."""
    tag = f"gmail-smtp-test-{uuid.uuid4().hex[:8]}"
    hold.nth = 2
    start_worker(beat=True, env=tagged_database(tag))
    get_connection().send_messages(
        [EmailMessage(f"m{i}", "b", SENDER, ["to@example.net"]) for i in range(5)]
    )
    wait_for(hold.engaged.is_set, 30, "the worker to wait for Gmail's reply to m1")
    wait_until(
        lambda: OutboundEmail.objects.filter(subject="m0", status=Status.SENT).exists(),
        what="m0 recorded while the stream waits",
    )
    assert terminate(tag), "the worker had no database connection to terminate"
    hold.release()
    wait_until(all_sent(5), timeout=60, what="every message sent")
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
    assert {(r.attempts, tuple(log(r))) for r in rows().values()} == {(0, ("sent",))}
    assert account.quota_status().messages_used == 5


@pytest.mark.integration
@needs_postgresql
def test_a_worker_whose_database_connection_is_terminated_while_claiming_sends_each_once(
    account, sandbox, start_worker, settings
):
    """STREAM_BATCH 2: the claim of the second batch waits on a row lock, and PostgreSQL
    terminates the worker's connection meanwhile. The task fails; the sweeper starts a new
    stream once the slot's lease ran out, and every message goes out once."""
    with_keys(settings, STREAM_BATCH=2)
    tag = f"gmail-smtp-test-{uuid.uuid4().hex[:8]}"
    get_connection().send_messages(
        [EmailMessage(f"m{i}", "b", SENDER, ["to@example.net"]) for i in range(5)]
    )
    locker = raw_connection()
    try:
        locker.autocommit = False
        locker.cursor().execute(
            f"SELECT id FROM {OutboundEmail._meta.db_table} WHERE id = %s FOR UPDATE",
            [rows()["m3"].pk],
        )
        start_worker(beat=True, env=tagged_database(tag))

        def claim_waits_on_the_lock() -> bool:
            # (from another connection: inside a transaction pg_stat_activity is a snapshot)
            watcher = raw_connection()
            try:
                cursor = watcher.cursor()
                cursor.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                    " AND wait_event_type = 'Lock'",
                    [tag],
                )
                return cursor.fetchone() is not None
            finally:
                watcher.close()

        wait_for(claim_waits_on_the_lock, 30, "the claim of the second batch to wait")
        assert delivered(sandbox) == Counter({"m0": 1, "m1": 1})
        assert terminate(tag)
    finally:
        locker.rollback()
        locker.close()
    wait_until(all_sent(5), timeout=60, what="every message sent")
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
    assert {(r.attempts, tuple(log(r))) for r in rows().values()} == {(0, ("sent",))}
    assert account.quota_status().messages_used == 5


@pytest.mark.integration
def test_two_streams_of_one_account_under_faults_send_each_message_once(
    account, sandbox, start_worker
):
    """Two worker processes may each hold one of the account's two connections (a task for
    the transactional mail, one for the bulk mail); Gmail answers 421 at MAIL, drops at RCPT
    and drops after a body now and then. Every message ends sent, once, and the ledger counts
    exactly what Gmail may have kept."""
    faults = [
        sandbox.fault("mail", reply="421 4.7.0 Try again later, closing connection.", times=3),
        sandbox.fault("rcpt", drop=True, times=2),
    ]
    after_body = sandbox.fault("after_data", drop=True, times=3)
    # (a retry due within a second is taken at once: enough attempts for every fault to hit
    # the same message)
    start_worker(concurrency=2, CONNECTIONS_PER_ACCOUNT=2, STREAM_BATCH=5, MAX_ATTEMPTS=20)
    messages = [EmailMessage(f"m{i}", "b", SENDER, ["to@example.net"]) for i in range(40)]
    for message in messages[::2]:
        message.gmail_priority = "bulk"
    get_connection().send_messages(messages)
    wait_until(all_sent(40), timeout=60, what="40 messages sent")
    assert [f.fired for f in faults] == [3, 2] and after_body.fired == 3
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(40)})
    assert all(log(row)[-1] == "sent" and log(row).count("sent") == 1 for row in rows().values())
    # the three dropped after their body stay counted (Gmail may have kept them)
    assert account.quota_status().messages_used == 40 + after_body.fired
    assert outbox.sweep()["expired_leases"] == 0


# --- clocks that disagree ------------------------------------------------------------------------

#: A Celery app whose worker processes' clock (``django.utils.timezone.now``) is off by
#: GMAIL_SMTP_TEST_SKEW seconds. (``GMAIL_SMTP_TEST_CLOCK_FILE`` only moves the quota clock,
#: which reads the database's time anyway; what matters here is everything else the worker
#: times with its own clock, which must not decide a lease.)
SKEWED_APP = """
import os
from datetime import timedelta

from celery.signals import worker_process_init

from tests.celery_app import app  # noqa: F401


@worker_process_init.connect
def _skew(**kwargs):
    from django.utils import timezone

    real, offset = timezone.now, timedelta(seconds=float(os.environ["GMAIL_SMTP_TEST_SKEW"]))
    timezone.now = lambda: real() + offset
"""
#: how far off the worker's clock is; far more than the leases, within what NTP-less hosts see
SKEW = 600
#: leases (and the client's timeout) far longer than the test's holds, so that with agreeing
#: clocks nothing runs out while Gmail's reply is held
LONG = {"SENDING_LEASE": 120, "CONNECTION_LEASE": 120, "TIMEOUT": 60}


def start_skewed_worker(start_worker, tmp_path, skew: float, **kwargs):
    (tmp_path / "skewed_celery_app.py").write_text(SKEWED_APP)
    env = {
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "GMAIL_SMTP_TEST_SKEW": str(skew),
    }
    return start_worker(app="skewed_celery_app", env=env, **kwargs)


def succeeded(worker, task: str) -> int:
    """How many ``task`` runs the worker's log reports as succeeded."""
    return len(re.findall(rf"Task django_gmail_smtp\.tasks\.{task}\[\S+\] succeeded", worker.log()))


@pytest.mark.integration
def test_a_worker_whose_clock_is_behind_never_has_its_rows_sent_twice(
    account, sandbox, start_worker, tmp_path, hold, pool, settings, monkeypatch
):
    """The streaming worker's clock is 10 minutes behind the database's; the sweeper and a
    second worker (this process) have the right time. While Gmail holds the reply to the
    stream's first message, they look at its rows and its connection slot."""
    with_keys(settings, **LONG)
    worker = start_skewed_worker(start_worker, tmp_path, -SKEW)
    get_connection().send_messages(
        [EmailMessage(f"m{i}", "b", SENDER, ["to@example.net"]) for i in range(5)]
    )
    wait_for(hold.engaged.is_set, 30, "the worker to stream (Gmail holds its first reply)")
    assert OutboundEmail.objects.filter(status=Status.SENDING).count() == 5
    dispatched = capture_dispatch(monkeypatch)
    sweep_and_deliver(pool, dispatched)  # the sweeper, then the tasks it hands rows to
    hold.release()
    wait_for(lambda: succeeded(worker, "send_outbound_emails"), 60, "the worker's stream to end")
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})


@pytest.mark.integration
def test_a_sweeper_whose_clock_is_ahead_never_has_a_streams_rows_sent_twice(
    account, sandbox, start_worker, tmp_path, hold, make_pool, dispatched, settings
):
    """This process streams the account's mail with the right time; a worker whose clock is
    10 minutes ahead runs the beat's sweeper (and takes the tasks it hands out) while Gmail
    holds the reply to the stream's first message."""
    with_keys(settings, **LONG)
    pool = make_pool()
    first = queue(5)[0]  # (handed to no broker: this process's stream takes them)
    outcomes: list[Outcome] = []

    def stream() -> None:
        try:
            outcomes.append(outbox.deliver(first.pk, pool=pool, stream=True))
        finally:
            connection.close()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        wait_for(hold.engaged.is_set, 30, "the stream to wait for Gmail's first reply")
        worker = start_skewed_worker(start_worker, tmp_path, SKEW, beat=True)
        # three sweeps: one that may hand rows out, the tasks it handed out, two more
        wait_for(lambda: succeeded(worker, "sweep_outbox") >= 3, 60, "three sweeps")
    finally:
        hold.release()
        thread.join(60)
    assert outcomes == [Outcome.SENT]
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {Status.SENT}
    assert delivered(sandbox) == Counter({f"m{i}": 1 for i in range(5)})
