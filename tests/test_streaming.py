"""The worker's streamed send: one claim takes the due mail of one account and mailer, and
each message's body goes out in the same write as the next message's envelope (RFC 2920).

A failure in the middle of a stream concerns its own message alone: a 4xx or 5xx at MAIL, at
RCPT or after DATA lands on the right row, a dropped connection leaves the message whose body
was written as "maybe delivered" and the ones after it untouched, and nothing is sent twice.
"""

from __future__ import annotations

import smtplib
import threading
import time
from itertools import pairwise

import pytest
from django.core.mail import EmailMessage
from django.db import connection

from django_gmail_smtp import outbox, slots
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.conf import for_mailer
from django_gmail_smtp.enums import Outcome, Priority, Reason, Status
from django_gmail_smtp.models import OutboundEmail
from django_gmail_smtp.pipeline import Pipeline
from django_gmail_smtp.routing import Envelope
from django_gmail_smtp.testing.replies import Replies
from django_gmail_smtp.transport import ConnectionPool, SendResult

from .conftest import SENDER
from .factories import arm_after, with_keys
from .processes import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

OTHER = "other@example.com"


def queue(n: int, *, to: tuple[str, ...] = ("t@x.example",)) -> list[OutboundEmail]:
    messages = [EmailMessage(f"m{i}", "body", SENDER, list(to)) for i in range(n)]
    CeleryGmailBackend().send_messages(messages)
    return list(OutboundEmail.objects.order_by("pk"))


def rows() -> dict[str, OutboundEmail]:
    return {row.subject: row for row in OutboundEmail.objects.order_by("pk")}


def delivered_subjects(sandbox) -> list[str]:
    return [d.subject for d in sandbox.deliveries]


@pytest.fixture
def writes(monkeypatch):
    """Every write the client made to the server after the greeting."""
    seen: list[bytes] = []
    send = smtplib.SMTP.send

    def spy(self, data):
        seen.append(data if isinstance(data, bytes) else data.encode())
        return send(self, data)

    monkeypatch.setattr(smtplib.SMTP, "send", spy)
    return seen


def test_a_stream_writes_each_body_with_the_next_envelope(
    account, sandbox, pool, dispatched, writes
):
    first, *others = queue(5)
    before = sandbox.stats.logins
    assert outbox.deliver(first.pk, pool=pool, stream=True) == Outcome.SENT
    assert delivered_subjects(sandbox) == ["m0", "m1", "m2", "m3", "m4"]
    assert {row.status for row in rows().values()} == {Status.SENT}
    assert all(row.log.count() == 1 for row in rows().values())
    assert sandbox.stats.logins - before <= 1
    start = next(i for i, w in enumerate(writes) if w.startswith(b"MAIL FROM"))
    stream = writes[start:]  # (the login's writes come first)
    mail = [w for w in stream if b"MAIL FROM" in w]
    # the first envelope alone, then each body with the next envelope, then the last body
    assert len(mail) == 5 and len(stream) == 6
    assert all(w.startswith(b"Content-Type") or b"\r\n.\r\nMAIL FROM" in w for w in mail[1:])
    # their tasks find the rows sent
    assert [outbox.deliver(row.pk, pool=pool, stream=True) for row in others] == [
        Outcome.SKIPPED
    ] * 4


def test_accepted_messages_are_recorded_while_the_stream_waits_for_a_later_reply(
    account, sandbox, pool, dispatched
):
    first = queue(4)[0]
    hanging, release = threading.Event(), threading.Event()

    def on_delivery(delivered):
        if delivered.subject == "m2":
            # Gmail keeps the message but holds its reply until the test has looked.
            hanging.set()
            release.wait(30)

    sandbox._state.on_delivery = on_delivery
    outcomes: list[Outcome] = []

    def worker() -> None:
        try:
            outcomes.append(outbox.deliver(first.pk, pool=pool, stream=True))
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        wait_for(hanging.is_set, 30, "the reply to m2 to hang")

        def state() -> dict[str, tuple[str, int]]:
            return {subject: (row.status, row.attempts) for subject, row in rows().items()}

        def recorded_while_waiting() -> bool:
            now = state()
            # m2 unanswered, the client still waiting (a timeout would count an attempt)
            waiting = now["m2"] == now["m3"] == (Status.SENDING, 0)
            return waiting and now["m0"] == now["m1"] == (Status.SENT, 0)

        # m0 and m1 were accepted before the stream blocked on m2's reply: a worker killed
        # now must find them recorded, not send them again. (Bounded below the client's
        # 10 s read timeout, which would end the wait.)
        wait_for(
            recorded_while_waiting,
            5,
            lambda: f"m0 and m1 recorded as sent while m2's reply hangs ({state()})",
        )
    finally:
        release.set()
        thread.join(60)
    assert outcomes == [Outcome.SENT]
    assert {row.status for row in rows().values()} == {Status.SENT}
    assert delivered_subjects(sandbox) == ["m0", "m1", "m2", "m3"]


class StreamWithoutOnWait(ConnectionPool):
    """A custom transport written before ``on_wait`` existed."""

    def stream(self, account, envelopes):
        yield from super().stream(account, envelopes)


class SendOnly:
    """A custom transport that sends one message at a time (no ``stream``)."""

    def __init__(self, settings):
        self.pool = ConnectionPool(settings)

    def open(self, account):
        self.pool.open(account)

    def send(self, envelope):
        return self.pool.send(envelope)

    def close(self):
        self.pool.close()


@pytest.mark.parametrize("transport_class", [StreamWithoutOnWait, SendOnly])
def test_a_transport_without_on_wait_lets_the_caller_record_after_each_message(
    account, sandbox, transport_class
):
    settings = for_mailer(None)
    transport = transport_class(settings)
    items = [
        (
            Envelope(
                account=account,
                mail_from=SENDER,
                recipients=["t@x.example"],
                data=f"Subject: m{i}\r\n\r\nbody\r\n".encode(),
            ),
            Priority.BULK,
        )
        for i in range(3)
    ]
    events: list[str] = []
    try:
        stream = Pipeline(settings, transport=transport).attempt_many(
            account, items, on_wait=lambda: events.append("wait")
        )
        for index, outcome in stream:
            assert isinstance(outcome, SendResult), outcome
            events.append(f"sent {index}")
    finally:
        transport.close()
    assert delivered_subjects(sandbox) == ["m0", "m1", "m2"]
    # the caller's turn comes between each accepted message and the next one
    sent = [i for i, event in enumerate(events) if event != "wait"]
    assert len(sent) == 3
    assert all("wait" in events[a:b] for a, b in pairwise(sent))


@pytest.mark.parametrize(
    ("phase", "reply", "status"),
    [
        ("mail", "451 4.3.0 Mail server temporarily rejected message.", Status.QUEUED),
        ("mail", "550 5.7.1 Blocked by policy.", Status.FAILED),
        ("rcpt", Replies.RECEIVING_TOO_FAST, Status.QUEUED),
        (
            "rcpt",
            "550 5.1.1 The email account that you tried to reach does not exist.",
            Status.FAILED,
        ),
        ("data", "451 4.3.0 Try again.", Status.QUEUED),
        ("after_data", "451 4.3.0 Try again.", Status.QUEUED),
        ("after_data", Replies.BLOCKED, Status.FAILED),
    ],
)
def test_a_refusal_in_the_middle_of_a_stream_lands_on_its_own_row(
    account, sandbox, pool, dispatched, phase, reply, status
):
    first = queue(5)[0]
    dispatched.clear()  # (the queueing's own hand-over)
    arm_after(sandbox, "m1", phase=phase, reply=reply, times=1)
    outbox.deliver(first.pk, pool=pool, stream=True)
    by_subject = rows()
    assert by_subject["m2"].status == status, by_subject["m2"].last_error
    assert by_subject["m2"].last_code == int(reply[:3])
    if status == Status.QUEUED:
        assert by_subject["m2"].attempts == 1 and by_subject["m2"].reason == Reason.RETRY
        assert [pk for pk, _countdown in dispatched] == [by_subject["m2"].pk]
    for subject in ("m0", "m1", "m3", "m4"):
        assert by_subject[subject].status == Status.SENT, by_subject[subject].last_error
    # each accepted message exactly once, the refused one not at all
    assert delivered_subjects(sandbox) == ["m0", "m1", "m3", "m4"]


def test_a_recipient_refused_mid_stream_is_recorded_on_its_message(
    account, sandbox, pool, dispatched
):
    messages = [EmailMessage(f"m{i}", "b", SENDER, ["a@x.example"]) for i in range(3)]
    messages[1].to = ["a@x.example", "bad@x.example"]
    CeleryGmailBackend().send_messages(messages)
    sandbox.bad_recipients = {"bad@x.example"}
    outbox.deliver(OutboundEmail.objects.order_by("pk")[0].pk, pool=pool, stream=True)
    by_subject = rows()
    assert {r.status for r in by_subject.values()} == {Status.SENT}
    assert list(by_subject["m1"].refused_recipients) == ["bad@x.example"]
    assert by_subject["m0"].refused_recipients == by_subject["m2"].refused_recipients == {}


def test_a_drop_mid_stream_keeps_the_unanswered_message_and_sends_the_rest_once(
    account, sandbox, pool, dispatched
):
    first = queue(5)[0]
    arm_after(sandbox, "m1", phase="after_data", drop=True, times=1)
    outbox.deliver(first.pk, pool=pool, stream=True)
    by_subject = rows()
    # its body was written, its reply never came: Gmail may have it, so it is retried
    assert by_subject["m2"].status == Status.QUEUED
    assert by_subject["m2"].attempts == 1
    assert "Gmail may have kept it" in by_subject["m2"].last_error
    # the one whose envelope only was written, and the rest: untouched, then sent once
    for subject in ("m0", "m1", "m3", "m4"):
        assert by_subject[subject].status == Status.SENT
        assert by_subject[subject].attempts == 0
        assert by_subject[subject].log.count() == 1
    assert delivered_subjects(sandbox) == ["m0", "m1", "m3", "m4"]
    # the unanswered one stays counted against the quota
    assert account.quota_status().messages_used == 5


def test_the_batch_claim_takes_only_due_rows_of_its_account_and_mailer(
    account, sandbox, make_account, pool, dispatched
):
    make_account(sandbox, OTHER)
    mine = queue(3)
    CeleryGmailBackend().send_messages([EmailMessage("theirs", "b", OTHER, ["t@x.example"])])
    theirs = OutboundEmail.objects.get(subject="theirs")
    other_mailer = mine[1]
    OutboundEmail.objects.filter(pk=other_mailer.pk).update(mailer="contact")
    taken = outbox.claim_batch(SENDER, "", "w:1", limit=10)
    assert [row.pk for row in taken] == [mine[0].pk, mine[2].pk]
    assert {row.claimed_by for row in taken} == {"w:1"}
    assert all(row.lease_expires_at is not None for row in taken)
    assert OutboundEmail.objects.get(pk=theirs.pk).status == Status.QUEUED
    assert OutboundEmail.objects.get(pk=other_mailer.pk).status == Status.QUEUED
    # nothing left to take: the claimed rows are not due any more
    assert outbox.claim_batch(SENDER, "", "w:2", limit=10) == []


def test_quota_running_out_mid_batch_defers_the_rest_until_the_next_slot(
    sandbox, make_account, pool, dispatched
):
    make_account(sandbox, daily_limit=3)
    first = queue(5)[0]
    outbox.deliver(first.pk, pool=pool, stream=True)
    by_subject = rows()
    assert [by_subject[f"m{i}"].status for i in range(5)] == [Status.SENT] * 3 + [
        Status.DEFERRED
    ] * 2
    late = by_subject["m4"]
    assert late.reason == Reason.QUOTA and late.next_attempt_at is not None
    assert delivered_subjects(sandbox) == ["m0", "m1", "m2"]


def test_gmail_daily_limit_mid_stream_defers_that_message_and_the_rest(
    account, sandbox, pool, dispatched
):
    sandbox.set_quota(SENDER, messages=2)
    first = queue(4)[0]
    outbox.deliver(first.pk, pool=pool, stream=True)
    by_subject = rows()
    assert [by_subject[f"m{i}"].status for i in range(4)] == [Status.SENT] * 2 + [
        Status.DEFERRED
    ] * 2
    assert by_subject["m2"].reason == Reason.QUOTA
    assert account.quota_status().exhausted_until is not None
    assert delivered_subjects(sandbox) == ["m0", "m1"]


def test_a_row_whose_account_connection_another_worker_holds_is_left_to_it(
    account, sandbox, pool, dispatched
):
    row = queue(1)[0]
    holder = slots.acquire(SENDER, holder="another-worker")
    assert holder is not None
    assert outbox.deliver(row.pk, pool=pool, stream=True) == Outcome.SKIPPED
    row.refresh_from_db()
    assert row.status == Status.QUEUED and row.claimed_by == ""
    assert sandbox.deliveries == []
    slots.release(holder)
    assert outbox.deliver(row.pk, pool=pool, stream=True) == Outcome.SENT
    # a stream that is done gives the slot back (outside a worker nothing keeps it warm)
    assert slots.held(SENDER) == 0


def test_a_stream_slower_than_the_lease_keeps_its_rows_and_its_slot(
    account, sandbox, pool, dispatched, settings, caplog
):
    # 8 messages at 0.3 s each take longer than a 1 s lease: the stream renews its rows'
    # leases (and its connection slot's) while it sends, so a sweeper never re-queues a row
    # the stream has not reached yet (another worker would send it too).
    with_keys(settings, SENDING_LEASE=1)
    first = queue(8)[0]
    sandbox.fault("data", delay=0.3, times=None)
    swept: list[tuple[float, dict[str, int], int]] = []  # (when, counts, rows still sending)
    done = threading.Event()
    started = time.monotonic()

    def sweeper() -> None:
        try:
            while not done.wait(0.1):
                counts = outbox.sweep()
                sending = OutboundEmail.objects.filter(status=Status.SENDING).count()
                swept.append((time.monotonic() - started, counts, sending))
        finally:
            connection.close()

    thread = threading.Thread(target=sweeper)
    thread.start()
    try:
        outcome = outbox.deliver(first.pk, pool=pool, stream=True)
    finally:
        done.set()
        thread.join(30)
    assert outcome == Outcome.SENT
    # The sweeper ran while rows were still being sent well past their first lease (1 s) ...
    assert any(at > 1.5 and sending for at, _counts, sending in swept), swept
    # ... and re-queued none of them; the stream never lost its slot or a lease.
    assert sum(counts["expired_leases"] for _at, counts, _sending in swept) == 0
    assert "Lost the connection slot" not in caplog.text and "lost its lease" not in caplog.text
    assert dispatched == [(row.pk, None) for row in OutboundEmail.objects.order_by("pk")]
    assert delivered_subjects(sandbox) == [f"m{i}" for i in range(8)]
    assert {(row.status, row.log.count()) for row in rows().values()} == {(Status.SENT, 1)}


def test_a_stream_that_lost_a_lease_finishes_the_message_in_flight_and_gives_back_the_rest(
    account, sandbox, pool, dispatched, settings, caplog
):
    # The database says another worker took m6 over (as after this worker stalled past its
    # lease): at its next renewal the stream notices, finishes the message in flight, gives
    # back what is still its own and never sends m6, whose envelope it already had.
    with_keys(settings, SENDING_LEASE=1)
    first = queue(8)[0]
    sandbox.fault("data", delay=0.3, times=None)
    m1_in, taken = threading.Event(), threading.Event()

    def on_delivery(delivered):
        if delivered.subject == "m1":
            m1_in.set()

    def take_over() -> None:
        try:
            if m1_in.wait(30):
                OutboundEmail.objects.filter(subject="m6").update(claimed_by="another-worker")
                taken.set()
        finally:
            connection.close()

    sandbox._state.on_delivery = on_delivery
    thread = threading.Thread(target=take_over)
    thread.start()
    try:
        outcome = outbox.deliver(first.pk, pool=pool, stream=True)
    finally:
        m1_in.set()
        thread.join(30)
    assert taken.is_set() and outcome == Outcome.SENT
    assert "lost its lease" in caplog.text
    # The rows it gave back were due again and went out once, in a fresh stream (with fresh
    # leases); m6 stays with the worker that took it.
    assert sorted(delivered_subjects(sandbox)) == [f"m{i}" for i in range(8) if i != 6]
    by_subject = rows()
    assert (by_subject["m6"].status, by_subject["m6"].claimed_by) == (
        Status.SENDING,
        "another-worker",
    )
    assert {by_subject[f"m{i}"].status for i in range(8) if i != 6} == {Status.SENT}
    assert all(row.log.count() == 1 for subject, row in by_subject.items() if subject != "m6")
