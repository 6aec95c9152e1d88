"""Delivery correctness under faults (issue 8, items 6-9, 11, 12).

Nothing sent twice on a database blip, the outcome recorded in one transaction, the quota kept
when Gmail may have kept a message, temporarily refused recipients retried, mail deferred for a
configuration error not stranded, bodies of every finished message dropped after retention,
and oversized messages refused at queue time.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core.mail import EmailMessage, send_mail
from django.core.management import call_command
from django.db import OperationalError, connection
from django.urls import reverse
from django.utils import timezone

from django_gmail_smtp import conf, outbox, signals
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.exceptions import (
    ConnectionFailed,
    MessageTooLarge,
    QuotaExceeded,
    TemporaryError,
)
from django_gmail_smtp.models import GmailAccount, OutboundAttempt, OutboundEmail
from django_gmail_smtp.testing.server import GMAIL_SIZE_LIMIT, GmailSMTP
from django_gmail_smtp.transport import ConnectionPool, SendResult

from .conftest import SENDER
from .db_faults import kill_connection, marks_sent, raw_connection
from .factories import make_due, queued_row, wait_until, with_keys

pytestmark = pytest.mark.django_db

Status = OutboundEmail.Status
SLOW = "450 4.2.1 The user you are trying to contact is receiving mail too quickly."


# --- fixtures and helpers ------------------------------------------------------------------------


def queue(*messages: EmailMessage) -> list[OutboundEmail]:
    assert CeleryGmailBackend().send_messages(list(messages)) == len(messages)
    return [OutboundEmail.objects.get(pk=m.gmail_outbound_id) for m in messages]


def message(subject: str = "s", to: list[str] | None = None) -> EmailMessage:
    return EmailMessage(subject, "body", SENDER, to or ["to@example.net"])


def read_status(raw, pk: int) -> str:
    """The row's status as another connection sees it (committed data only)."""
    mark = "%s" if connection.vendor == "postgresql" else "?"
    cursor = raw.cursor()
    try:
        cursor.execute(f"SELECT status FROM {OutboundEmail._meta.db_table} WHERE id = {mark}", [pk])
        (status,) = cursor.fetchone()
    finally:
        cursor.close()
    if connection.vendor == "sqlite":
        raw.rollback()  # end the read transaction sqlite3 may have opened
    return status


# --- item 6: the outcome is recorded atomically, and survives a lost connection ------------------


@pytest.mark.django_db(transaction=True)
def test_sent_is_recorded_on_a_fresh_connection_when_the_database_connection_drops(
    outbox_settings, account, sandbox, pool, dispatched
):
    """The connection dies on the UPDATE that marks the row sent, after Gmail's 250: the
    record is retried on a new connection, so the row is sent once and never re-queued."""
    (row,) = queue(message("blip"))
    fired = []

    def drop_on_sent(execute, sql, params, many, context):
        if not fired and marks_sent(sql, params):
            fired.append(sql)
            kill_connection(context["connection"])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(drop_on_sent):
        assert outbox.deliver(row.pk, pool=pool) == "sent"
    assert len(fired) == 1
    row.refresh_from_db()
    assert row.status == Status.SENT and row.lease_expires_at is None
    assert [a.outcome for a in row.log.all()] == [OutboundAttempt.Outcome.SENT]
    assert account.quota_status().messages_used == 1
    # Nothing is left for the sweeper to send again.
    OutboundEmail.objects.filter(pk=row.pk).update(lease_expires_at=timezone.now())
    outbox.sweep()
    assert outbox.deliver(row.pk, pool=pool) == "skipped"
    assert len(sandbox.deliveries) == 1


@pytest.mark.django_db(transaction=True)
def test_a_reader_never_sees_sent_without_its_attempt(
    outbox_settings, account, sandbox, pool, dispatched
):
    """While the attempt is written, another connection still sees the row as sending."""
    (row,) = queue(message())
    seen = []
    reader = raw_connection()

    def look_when_logging(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("INSERT") and OutboundAttempt._meta.db_table in sql:
            seen.append(read_status(reader, row.pk))
        return execute(sql, params, many, context)

    try:
        with connection.execute_wrapper(look_when_logging):
            assert outbox.deliver(row.pk, pool=pool) == "sent"
    finally:
        reader.close()
    assert seen == [Status.SENDING]  # not yet "sent": the row and its attempt commit together


@pytest.mark.django_db(transaction=True)
def test_a_record_whose_commit_went_through_is_not_written_twice(
    outbox_settings, account, sandbox, pool, dispatched, monkeypatch
):
    """The connection is lost after COMMIT, before its acknowledgement: the retry finds the
    attempt already written and neither logs it again nor queues a second follow-up."""
    sandbox.fault("rcpt", reply=SLOW, times=1)
    (row,) = queue(message(to=["slow@example.net", "ok@example.net"]))
    original = outbox.OutboxRecord._write
    lost = []

    def write_then_lose_the_ack(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not lost:
            lost.append(True)
            raise OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(outbox.OutboxRecord, "_write", write_then_lose_the_ack)
    assert outbox.deliver(row.pk, pool=pool) == "sent"
    row.refresh_from_db()
    assert [a.outcome for a in row.log.all()] == [OutboundAttempt.Outcome.SENT]
    (follow_up,) = row.follow_ups.all()
    assert dispatched[-1][0] == follow_up.pk


@pytest.mark.django_db(transaction=True)
def test_a_database_that_stays_down_is_reported_as_accepted_by_gmail(
    outbox_settings, account, sandbox, pool, dispatched, monkeypatch, caplog
):
    """Recording is retried for a bounded time, then the error says Gmail accepted the message."""
    monkeypatch.setattr(outbox, "RECORD_RETRY_SECONDS", 0.3)
    (row,) = queue(message())
    tries = []

    def always_down(execute, sql, params, many, context):
        if marks_sent(sql, params):
            tries.append(sql)
            raise OperationalError("the database is unreachable (simulated)")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(always_down), pytest.raises(OperationalError):
        outbox.deliver(row.pk, pool=pool)
    assert len(tries) >= 2
    assert f"Gmail ACCEPTED outbound email {row.pk}" in caplog.text
    assert OutboundEmail.objects.get(pk=row.pk).status == Status.SENDING


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    not django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
    reason="terminating a worker's database connections needs PostgreSQL",
)
def test_worker_whose_database_connection_is_terminated_after_250_sends_once(
    account,
    sandbox,
    start_worker,
):
    """A real worker: its PostgreSQL connections are terminated while Gmail's 250 is on its way.
    The worker records ``sent`` on a new connection; the sweeper (lease 3 s) finds nothing to
    send again."""
    tag = f"gmail-smtp-test-{uuid.uuid4().hex[:8]}"
    db = {**connection.settings_dict}
    db["OPTIONS"] = {**db.get("OPTIONS", {}), "application_name": tag}
    start_worker(beat=True, env={"GMAIL_SMTP_TEST_DB": json.dumps(db, default=str)})
    held = sandbox.fault("after_data", reply=None, delay=2)  # the body is in; the 250 waits
    send_mail("terminated", "b", SENDER, ["to@example.net"])
    wait_until(lambda: held.fired == 1, what="the worker to upload the message")
    killer = raw_connection()
    try:
        cursor = killer.cursor()
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [tag],
        )
        assert cursor.fetchall(), "the worker had no database connection to terminate"
    finally:
        killer.close()
    wait_until(lambda: OutboundEmail.objects.filter(status=Status.SENT).exists(), what="sent")
    row = OutboundEmail.objects.get()
    assert [a.outcome for a in row.log.all()] == [OutboundAttempt.Outcome.SENT]
    assert row.attempts == 0 and len(sandbox.deliveries) == 1
    assert account.quota_status().messages_used == 1


def test_send_that_outlasted_its_lease_is_recorded_as_sent(account, no_dispatch):
    row = queued_row(account)
    claimed = outbox.claim(row.pk, "w1")
    OutboundEmail.objects.filter(pk=row.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    outbox.sweep()  # the sweeper re-queues the row while the worker is still sending
    assert OutboundEmail.objects.get(pk=row.pk).status == Status.QUEUED
    outbox.OutboxRecord(claimed, "w1").sent(account, SendResult("2.0.0 OK 1 x - gsmtp"))
    assert OutboundEmail.objects.get(pk=row.pk).status == Status.SENT


# --- item 7: when in doubt, the quota stays counted ----------------------------------------------


@pytest.fixture
def keeping_sandbox(settings, monkeypatch, make_sandbox):
    """A sandbox that, as planned per message, keeps it but never answers its final "."
    ("timeout": the reply comes after the client gave up; "drop": the connection drops)."""
    plan: list[str] = []
    drop_reply = []

    def on_delivery(delivered):
        kind = plan.pop(0) if plan else ""
        if kind == "timeout":
            # The simulated server, not the test, waits: it answers after the client gave up.
            time.sleep(settings.GMAIL_SMTP["TIMEOUT"] + 0.5)
        elif kind == "drop":
            drop_reply.append(True)

    push = GmailSMTP.push

    async def push_or_drop(self, status):
        if drop_reply and str(status).startswith("250 2.0.0 OK  "):  # the reply to the "."
            drop_reply.pop()
            self.abort_connection()
            return
        await push(self, status)

    monkeypatch.setattr(GmailSMTP, "push", push_or_drop)
    sb = make_sandbox(on_delivery=on_delivery)
    with_keys(settings, TIMEOUT=2)
    sb.plan = plan
    return sb


def test_outbox_keeps_the_quota_of_messages_gmail_kept_without_a_reply(
    keeping_sandbox, make_account, pool, dispatched, settings
):
    """Limit 10: three messages are kept by Gmail but get no reply (a timeout, two drops).
    The ledger counts them, so the next send waits for quota instead of a 550 5.4.5."""
    sandbox = keeping_sandbox
    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"
    account = make_account(sandbox, daily_limit=10)
    sandbox.set_quota(SENDER, messages=10)
    sandbox.plan[:] = ["timeout", "drop", "drop"]
    rows = queue(*[message(f"m{i}") for i in range(10)])
    results = [outbox.deliver(row.pk, pool=pool) for row in rows]
    assert results == ["retry"] * 3 + ["sent"] * 7
    assert sandbox.quota_usage(SENDER)[0] == 10
    assert account.quota_status().messages_used == 10
    first = OutboundEmail.objects.get(pk=rows[0].pk)
    assert "Gmail may have kept it" in first.last_error
    make_due(first)
    assert outbox.deliver(first.pk, pool=pool) == "deferred"
    first.refresh_from_db()
    assert first.reason == OutboundEmail.Reason.QUOTA and first.last_code is None
    assert sandbox.stats.rejected == 0  # Gmail never had to answer 550 5.4.5
    assert account.quota_status().messages_used == 10


def test_sync_backend_keeps_the_quota_of_a_message_gmail_kept_without_a_reply(
    keeping_sandbox, make_account
):
    sandbox = keeping_sandbox
    account = make_account(sandbox, daily_limit=3)
    sandbox.set_quota(SENDER, messages=3)
    sandbox.plan[:] = ["drop"]
    with pytest.raises(ConnectionFailed) as info:
        send_mail("kept", "b", SENDER, ["to@example.net"])
    assert info.value.maybe_delivered is True
    assert account.quota_status().messages_used == 1
    assert send_mail("2", "b", SENDER, ["to@example.net"]) == 1
    assert send_mail("3", "b", SENDER, ["to@example.net"]) == 1
    with pytest.raises(QuotaExceeded):
        send_mail("4", "b", SENDER, ["to@example.net"])
    assert sandbox.quota_usage(SENDER)[0] == account.quota_status().messages_used == 3
    assert sandbox.stats.rejected == 0  # refused by our ledger, not by Gmail's 550


@pytest.fixture(params=[True, False], ids=["pipelining", "stepwise"])
def any_sandbox(request, make_sandbox):
    return make_sandbox(pipelining=request.param)


@pytest.mark.parametrize(
    ("phase", "fault", "counted"),
    [
        ("data", {"drop": True}, False),  # before the body: Gmail cannot have it
        ("after_data", {"reply": "451 4.3.0 Mail server temporarily rejected message."}, False),
        ("after_data", {"reply": "421 4.7.0 Try again later, closing connection."}, False),
        ("after_data", {"drop": True}, True),  # after the final ".", no reply: may be kept
    ],
    ids=["drop-before-body", "451-after-dot", "421-after-dot", "drop-after-dot"],
)
def test_quota_released_only_when_gmail_surely_did_not_keep_the_message(
    any_sandbox, make_account, phase, fault, counted
):
    account = make_account(any_sandbox)
    any_sandbox.fault(phase, **fault)
    with pytest.raises(TemporaryError) as info:
        send_mail("s", "b", SENDER, ["to@example.net"])
    assert getattr(info.value, "maybe_delivered", False) is counted
    assert account.quota_status().messages_used == (1 if counted else 0)


# --- item 8: recipients refused with a 4xx are retried alone -------------------------------------


def test_temporarily_refused_recipients_are_retried_in_a_follow_up(
    outbox_settings, account, sandbox, pool, dispatched
):
    sandbox.fault("rcpt", reply=SLOW, times=1)  # the first recipient: 450 4.2.1
    sandbox.bad_recipients.add("bad@example.net")  # 553 5.1.3: refused for good
    (row,) = queue(message("hi", to=["slow@example.net", "ok@example.net", "bad@example.net"]))
    followed = []
    receiver = lambda **kw: followed.append(kw["follow_up"])  # noqa: E731
    signals.email_sent.connect(receiver, weak=False)
    try:
        assert outbox.deliver(row.pk, pool=pool) == "sent"
    finally:
        signals.email_sent.disconnect(receiver)
    row.refresh_from_db()
    assert sorted(row.refused_recipients) == ["bad@example.net", "slow@example.net"]
    (follow_up,) = row.follow_ups.all()
    assert followed == [follow_up]
    assert follow_up.retry_of == row and follow_up.recipients == ["slow@example.net"]
    assert (follow_up.status, follow_up.reason) == (Status.QUEUED, OutboundEmail.Reason.RETRY)
    assert bytes(follow_up.mime) == bytes(row.mime) and follow_up.account == account
    assert follow_up.priority == row.priority and follow_up.attempts == 1
    assert follow_up.next_attempt_at > timezone.now() and follow_up.last_code == 450
    ((pk, countdown),) = dispatched
    assert pk == follow_up.pk and 4 < countdown <= 10

    make_due(follow_up)
    assert outbox.deliver(follow_up.pk, pool=pool) == "sent"
    first, second = sandbox.deliveries
    assert first.rcpt_tos == ["ok@example.net"] and second.rcpt_tos == ["slow@example.net"]
    assert first.data == second.data


def test_no_follow_up_once_the_message_used_up_its_attempts(
    outbox_settings, account, sandbox, pool, dispatched
):
    sandbox.fault("rcpt", reply=SLOW, times=1)
    (row,) = queue(message(to=["slow@example.net", "ok@example.net"]))
    OutboundEmail.objects.filter(pk=row.pk).update(attempts=3)  # MAX_ATTEMPTS is 4
    assert outbox.deliver(row.pk, pool=pool) == "sent"
    assert not OutboundEmail.objects.filter(retry_of=row.pk).exists()
    assert list(OutboundEmail.objects.get(pk=row.pk).refused_recipients) == ["slow@example.net"]


def test_admin_links_a_follow_up_to_its_original(
    outbox_settings, account, sandbox, pool, dispatched, client
):
    sandbox.fault("rcpt", reply=SLOW, times=1)
    (row,) = queue(message(to=["slow@example.net", "ok@example.net"]))
    outbox.deliver(row.pk, pool=pool)
    follow_up = OutboundEmail.objects.get(retry_of=row)
    client.force_login(User.objects.create_superuser("admin", "a@example.net", "pw"))
    page = client.get(reverse("admin:django_gmail_smtp_outboundemail_change", args=[follow_up.pk]))
    original = reverse("admin:django_gmail_smtp_outboundemail_change", args=[row.pk])
    assert page.status_code == 200 and original in page.content.decode()


# --- item 9: mail deferred for a configuration error is not stranded -----------------------------


def test_configuration_deferral_is_retried_and_released_by_the_next_send(
    outbox_settings, account, sandbox, pool, dispatched, settings, tmp_path
):
    first, stranded, later = queue(message("1"), message("2"), message("3"))
    assert outbox.deliver(first.pk, pool=pool) == "sent"
    account.refresh_from_db()
    assert account.health == GmailAccount.Health.OK
    good = settings.GMAIL_SMTP
    settings.GMAIL_SMTP = {**good, "CA_FILE": str(tmp_path / "missing-ca.pem")}
    broken = ConnectionPool()
    before = timezone.now()
    assert outbox.deliver(stranded.pk, pool=broken) == "deferred"
    stranded.refresh_from_db()
    assert stranded.reason == OutboundEmail.Reason.CONFIG and stranded.attempts == 0
    # Retried on the backoff (base 10 s, with jitter), not left waiting for a health change.
    assert before + timedelta(seconds=4) < stranded.next_attempt_at < before + timedelta(seconds=11)
    assert account.quota_status().messages_used == 1  # the failed try was not counted

    settings.GMAIL_SMTP = good  # fixed; the account's health never changed
    assert outbox.deliver(later.pk, pool=pool) == "sent"
    stranded.refresh_from_db()
    assert stranded.next_attempt_at <= timezone.now()  # released by that send
    dispatched.clear()
    outbox.sweep()
    assert stranded.pk in [pk for pk, _ in dispatched]
    assert outbox.deliver(stranded.pk, pool=pool) == "sent"


# --- item 11: retention applies to every final state ---------------------------------------------


def _row(account, status, age_days, **fields):
    row = OutboundEmail.objects.create(
        account=account,
        account_email=SENDER,
        from_email=SENDER,
        recipients=["t@x.example"],
        mime=b"Subject: reset\r\n\r\nhttps://example.com/reset/secret-token/",
        status=status,
        **fields,
    )
    moment = timezone.now() - timedelta(days=age_days)
    OutboundEmail.objects.filter(pk=row.pk).update(
        updated_at=moment, sent_at=moment if status == Status.SENT else None
    )
    return row


def test_retention_drops_bodies_of_failed_and_cancelled_mail_too(
    account, settings, dispatched, caplog
):
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "BODY_RETENTION_DAYS": 7}
    old = {s: _row(account, s, 8) for s in (Status.SENT, Status.FAILED, Status.CANCELLED)}
    waiting = _row(account, Status.DEFERRED, 8, reason=OutboundEmail.Reason.AUTH)
    recent_failure = _row(account, Status.FAILED, 1)
    outbox.sweep()
    for row in old.values():
        row.refresh_from_db()
        assert bytes(row.mime) == b"" and row.body_dropped_at is not None, row.status
    for row in (waiting, recent_failure):  # still to be sent, or within retention
        row.refresh_from_db()
        assert b"secret-token" in bytes(row.mime) and row.body_dropped_at is None

    # A failed row whose body is gone cannot be retried, and says so.
    with caplog.at_level(logging.WARNING, logger="django_gmail_smtp.outbox"):
        assert outbox.retry(OutboundEmail.objects.filter(pk=old[Status.FAILED].pk)) == 0
    assert "stored message was dropped" in caplog.text
    assert OutboundEmail.objects.get(pk=old[Status.FAILED].pk).status == Status.FAILED


def test_purge_command_covers_failed_and_cancelled_mail(account):
    failed = _row(account, Status.FAILED, 10)
    cancelled = _row(account, Status.CANCELLED, 10)
    ancient_failure = _row(account, Status.FAILED, 100)
    deferred = _row(account, Status.DEFERRED, 100)
    out = io.StringIO()
    call_command(
        "gmail_smtp", "purge", "--drop-bodies-after", "7", "--delete-sent-after", "90", stdout=out
    )
    assert not OutboundEmail.objects.filter(pk=ancient_failure.pk).exists()
    for row in (failed, cancelled):
        row.refresh_from_db()
        assert bytes(row.mime) == b""
    deferred.refresh_from_db()
    assert bytes(deferred.mime) != b""
    assert "Deleted 1 old row(s); dropped 3" in out.getvalue()  # bodies dropped, then rows


# --- item 12: too large for Gmail is refused at queue time ---------------------------------------


def test_max_message_size_defaults_to_gmails_advertised_size():
    assert conf.DEFAULTS["MAX_MESSAGE_SIZE"] == GMAIL_SIZE_LIMIT == 35882577


def test_celery_backend_refuses_a_message_over_the_size_limit(
    outbox_settings, account, settings, dispatched
):
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "MAX_MESSAGE_SIZE": 2000}
    big = EmailMessage("big", "x" * 5000, SENDER, ["to@example.net"])
    with pytest.raises(MessageTooLarge) as info:
        CeleryGmailBackend().send_messages([big])
    assert "2,000" in str(info.value) and "not queued" in str(info.value)
    assert not OutboundEmail.objects.exists() and dispatched == []
    assert CeleryGmailBackend(fail_silently=True).send_messages([big]) == 0
    assert CeleryGmailBackend().send_messages([message()]) == 1  # small mail is queued


def test_sync_backend_honours_the_size_limit_before_connecting(account, sandbox, settings):
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "MAX_MESSAGE_SIZE": 2000}
    with pytest.raises(MessageTooLarge, match="not sent"):
        send_mail("big", "x" * 5000, SENDER, ["to@example.net"])
    assert sandbox.stats.connections == 0 and account.quota_status().messages_used == 0


# --- a delivery that outlived its lease, and mail of a broken mailer (review findings) --------

CELERY_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"


class _OutlivedLease:
    """A transport whose send outlasts SENDING_LEASE: meanwhile the sweeper re-queues the row
    and another delivery of the same worker process (same WORKER_ID: prefork children share
    the parent's pid) claims it. Then the send fails, or returns ``result``."""

    def __init__(self, result: SendResult | None = None) -> None:
        self.result = result

    def open(self, account) -> None: ...

    def close(self) -> None: ...

    def send(self, envelope) -> SendResult:
        OutboundEmail.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        outbox.sweep()
        assert outbox.claim(OutboundEmail.objects.get().pk, outbox.WORKER_ID) is not None
        if self.result is None:
            raise ConnectionFailed("dropped", account=envelope.account.email, phase="mail")
        return self.result


def test_a_late_outcome_never_overwrites_a_newer_claim_of_the_same_worker(
    outbox_settings, account, sandbox, dispatched
):
    """Each claim has its own token: the stale delivery's retry must not take the row back
    from the delivery that claimed it after the lease ran out (it used to: both had the
    worker's pid as their name, so the row went back to queued while still being sent)."""
    CeleryGmailBackend().send_messages([EmailMessage("s", "b", SENDER, ["to@example.net"])])
    row = OutboundEmail.objects.get()
    assert outbox.deliver(row.pk, pool=_OutlivedLease()) == "retry"
    row.refresh_from_db()
    assert row.status == Status.SENDING and row.claimed_by == outbox.WORKER_ID


def test_a_send_recorded_after_its_lease_makes_no_follow_up_for_a_claimed_row(
    outbox_settings, account, sandbox, dispatched
):
    """A 450-refused recipient gets a follow-up only from the delivery that owns the row;
    the one whose lease ran out (another has claimed the row) must not queue a second one."""
    message = EmailMessage("s", "b", SENDER, ["a@example.net", "b@example.net"])
    CeleryGmailBackend().send_messages([message])
    refused = {"b@example.net": (450, "4.2.1 The user you are trying to contact is receiving")}
    late = _OutlivedLease(SendResult(reply="250 2.0.0 OK", message_id="<x>", refused=refused))
    assert outbox.deliver(message.gmail_outbound_id, pool=late) == "sent"
    assert not OutboundEmail.objects.filter(retry_of=message.gmail_outbound_id).exists()


def test_mail_of_a_removed_mailer_stays_on_its_backoff_when_the_account_sends(
    settings, account, sandbox, pool, dispatched
):
    """A row whose MAILERS entry is gone is deferred for its configuration on a backoff;
    the account's other mail going out must not make it due again each time (it used to,
    so it was re-sent to the worker and deferred again on every sweep, for ever)."""
    settings.MAILERS = {"old": {"BACKEND": CELERY_BACKEND}}
    CeleryGmailBackend(alias="old").send_messages([EmailMessage("old", "b", SENDER, ["t@e.net"])])
    settings.MAILERS = {}
    stranded = OutboundEmail.objects.get()
    assert outbox.deliver(stranded.pk, pool=pool) == "deferred"
    other = EmailMessage("other", "b", SENDER, ["to@example.net"])
    CeleryGmailBackend().send_messages([other])
    assert outbox.deliver(other.gmail_outbound_id, pool=pool) == "sent"
    stranded.refresh_from_db()
    assert stranded.reason == OutboundEmail.Reason.CONFIG
    assert stranded.next_attempt_at > timezone.now()


def test_mailers_options_that_are_not_a_dict_defer_the_row_for_its_configuration(
    settings, account, sandbox, dispatched
):
    """OPTIONS given as a list used to raise ValueError out of the task and leave the row
    'sending' with no error until its lease ran out."""
    from django_gmail_smtp import tasks

    settings.MAILERS = {"x": {"BACKEND": CELERY_BACKEND}}
    CeleryGmailBackend(alias="x").send_messages([EmailMessage("s", "b", SENDER, ["t@e.net"])])
    settings.MAILERS = {"x": {"BACKEND": CELERY_BACKEND, "OPTIONS": ["oops"]}}
    row = OutboundEmail.objects.get()
    assert outbox.deliver(row.pk, transports=tasks.transport_for) == "deferred"
    row.refresh_from_db()
    assert row.status == Status.DEFERRED and row.reason == OutboundEmail.Reason.CONFIG
    assert 'MAILERS["x"]["OPTIONS"] is a list' in row.last_error
