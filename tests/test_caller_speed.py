"""What makes queueing cheap for the caller, as behaviour (never timings): one INSERT per
message and no account query in the steady state, chunked writes and one hand-off per chunk,
a routing cache that still sees every change, and hand-offs that fail leave rows for the
sweeper."""

from __future__ import annotations

import logging
import re

import pytest
from django.core.mail import EmailMessage, send_mail
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from django_gmail_smtp import outbox, publisher, routing, services, tasks
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.exceptions import HeaderInjection
from django_gmail_smtp.models import GmailAccount, OutboundEmail

from .conftest import SENDER
from .factories import broker_down, with_keys

Status = OutboundEmail.Status
OTHER = "other@example.com"


def message(i: int = 0, sender: str = SENDER, **kw) -> EmailMessage:
    return EmailMessage(f"Subject {i}", "body", sender, [f"to{i}@example.net"], **kw)


@pytest.fixture
def handed(monkeypatch, settings):
    """The batches freshly queued rows are handed to Celery in (instead of a broker), in the
    committing thread."""
    with_keys(settings, PUBLISH_IN_BACKGROUND=False)
    batches: list[list[tuple]] = []
    monkeypatch.setattr(
        outbox, "publish", lambda batch, **_: batches.append(list(batch)) or len(batch)
    )
    return batches


@pytest.fixture(autouse=True)
def _fresh_cache():
    routing.forget_accounts()
    yield
    routing.forget_accounts()


# --- statements ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_steady_state_send_mail_is_one_insert(outbox_settings, account, handed):
    send_mail("warm", "b", SENDER, ["to@example.net"])  # fills the process's account list
    with CaptureQueriesContext(connection) as queries:
        assert send_mail("s", "b", SENDER, ["to@example.net"]) == 1
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    assert statements == ["INSERT"], queries.captured_queries
    row = OutboundEmail.objects.latest("pk")
    # Handed over once, on commit; enqueued_at written by that INSERT, not by an UPDATE.
    assert handed[-1] == [(row.pk, row.priority, SENDER)]
    assert row.status == Status.QUEUED and row.enqueued_at is not None
    assert row.account == account


@pytest.mark.django_db(transaction=True)
def test_send_messages_writes_chunks_and_hands_each_over_once(
    outbox_settings, account, handed, monkeypatch
):
    monkeypatch.setattr(outbox, "QUEUE_CHUNK", 3)
    messages = [message(i) for i in range(7)]
    send_mail("warm", "b", SENDER, ["to@example.net"])
    handed.clear()
    with CaptureQueriesContext(connection) as queries:
        # A generator: the backend never needs the whole list.
        assert CeleryGmailBackend().send_messages(m for m in messages) == 7
    inserts = [q for q in queries.captured_queries if q["sql"].startswith("INSERT")]
    assert len(inserts) == 3  # 3 + 3 + 1
    assert [len(batch) for batch in handed] == [3, 3, 1]
    ids = [m.gmail_outbound_id for m in messages]
    assert [pk for batch in handed for pk, *_ in batch] == ids
    rows = OutboundEmail.objects.filter(pk__in=ids).order_by("pk")
    assert [r.subject for r in rows] == [f"Subject {i}" for i in range(7)]
    assert all(r.status == Status.QUEUED and r.account == account for r in rows)


@pytest.mark.django_db(transaction=True)
def test_queue_messages_keeps_rows_or_not(outbox_settings, account, handed, monkeypatch):
    monkeypatch.setattr(outbox, "QUEUE_CHUNK", 2)
    rows = outbox.queue_messages([message(i) for i in range(3)])
    assert [r.subject for r in rows] == ["Subject 0", "Subject 1", "Subject 2"]
    assert all(r.pk for r in rows)
    kept = outbox.queue_messages((message(i) for i in range(3)), keep_rows=False)
    assert kept == [] and OutboundEmail.objects.count() == 6
    assert sum(len(batch) for batch in handed) == 6


@pytest.mark.django_db(transaction=True)
def test_a_refused_message_mid_batch_keeps_the_ones_before(outbox_settings, account, handed):
    good = [message(0), message(1)]
    bad = message(2, headers={"X-Bad": "a\r\nBcc: evil@example.net"})
    with pytest.raises(HeaderInjection):
        CeleryGmailBackend().send_messages([*good, bad, message(3)])
    assert sorted(OutboundEmail.objects.values_list("subject", flat=True)) == [
        "Subject 0",
        "Subject 1",
    ]
    assert [pk for batch in handed for pk, *_ in batch] == [m.gmail_outbound_id for m in good]


@pytest.mark.django_db(transaction=True)
def test_one_hand_off_per_call_inside_a_transaction_and_none_on_rollback(
    outbox_settings, account, handed
):
    with transaction.atomic():
        CeleryGmailBackend().send_messages([message(0), message(1)])
        assert handed == []  # not before the commit
    assert len(handed) == 1 and len(handed[0]) == 2
    handed.clear()
    with pytest.raises(RuntimeError), transaction.atomic():
        CeleryGmailBackend().send_messages([message(2)])
        raise RuntimeError("rolled back")
    assert handed == [] and OutboundEmail.objects.count() == 2


# --- the hand-off to Celery ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_publish_makes_one_task_per_row_or_per_group(outbox_settings, account, monkeypatch):
    sent: list[tuple[str, tuple, str]] = []

    def recorder(task):
        return lambda args, queue, **kw: sent.append((task.name.rsplit(".", 1)[1], args, queue))

    monkeypatch.setattr(
        tasks.send_outbound_email, "apply_async", recorder(tasks.send_outbound_email)
    )
    monkeypatch.setattr(
        tasks.send_outbound_emails, "apply_async", recorder(tasks.send_outbound_emails)
    )
    monkeypatch.setattr(outbox, "TASK_IDS", 2)
    queues = outbox_settings.GMAIL_SMTP.get("QUEUES") or {}
    transactional = queues.get("transactional", "gmail_smtp.transactional")
    bulk = queues.get("bulk", "gmail_smtp.bulk")
    batch = [
        (1, "transactional", SENDER),
        (2, "bulk", SENDER),
        (3, "bulk", SENDER),
        (4, "bulk", SENDER),
        (5, "bulk", OTHER),
    ]
    assert outbox.publish(batch) == 5
    assert sent == [
        ("send_outbound_email", (1,), transactional),
        ("send_outbound_emails", ([2, 3],), bulk),
        ("send_outbound_email", (4,), bulk),
        ("send_outbound_email", (5,), bulk),
    ]


@pytest.mark.django_db(transaction=True)
def test_broker_down_clears_enqueued_at_for_the_sweeper(outbox_settings, account, caplog):
    caplog.set_level(logging.WARNING, logger="django_gmail_smtp.outbox")
    with broker_down():
        assert CeleryGmailBackend().send_messages([message(0), message(1), message(2)]) == 3
        # The publisher thread hands them over (and fails to) after send_messages returned.
        assert publisher.wait_published(timeout=30)
    rows = OutboundEmail.objects.all()
    assert len(rows) == 3
    assert all(r.status == Status.QUEUED and r.enqueued_at is None for r in rows)
    assert "3 outbound emails" in caplog.text and "the sweeper will send them" in caplog.text
    counts = outbox.sweep()  # with the grace period passed, the sweeper hands them over
    assert counts["stale_queued"] == 0  # not yet: they are younger than SWEEP_GRACE


@pytest.mark.django_db(transaction=True)
def test_send_outbound_emails_delivers_each_row(outbox_settings, account, sandbox, handed):
    messages = [message(i) for i in range(3)]
    CeleryGmailBackend().send_messages(messages)
    try:
        counts = tasks.send_outbound_emails([m.gmail_outbound_id for m in messages])
    finally:
        tasks._close_pool()
    # Each row once: sent by its own turn, or skipped when an earlier send already took it.
    assert sum(counts.values()) == 3 and counts["sent"] >= 1
    assert len(sandbox.deliveries) == 3
    assert set(OutboundEmail.objects.values_list("status", flat=True)) == {Status.SENT}


# --- the process's account list -----------------------------------------------------------------


def routed(subject: str) -> OutboundEmail:
    send_mail(subject, "b", OTHER, ["to@example.net"])  # EMAIL_BACKEND: the Celery backend
    return OutboundEmail.objects.get(subject=subject)


@pytest.mark.django_db(transaction=True)
def test_accounts_saved_or_deleted_here_are_routed_at_once(
    outbox_settings, account, sandbox, make_account, handed
):
    assert routed("before").from_rewritten  # no account for OTHER: the default sends it
    other = make_account(sandbox, OTHER)
    row = routed("added")
    assert not row.from_rewritten and row.account == other
    other.delete()
    row = routed("deleted")  # not routed to the deleted account (its row would not commit)
    assert row.from_rewritten and row.account == account


@pytest.mark.django_db(transaction=True)
def test_changes_made_elsewhere_are_seen_within_the_ttl(
    outbox_settings, account, handed, monkeypatch
):
    assert routed("before").from_rewritten
    # update() sends no signal, like a change made by another process.
    GmailAccount.objects.filter(pk=account.pk).update(send_as_aliases=OTHER)
    assert routed("cached").from_rewritten  # the process's list is still fresh
    monkeypatch.setattr(routing, "ACCOUNTS_TTL", 0.0)
    assert not routed("expired").from_rewritten


@pytest.mark.django_db(transaction=True)
def test_pausing_here_is_seen_at_once(outbox_settings, account, sandbox, make_account, handed):
    second = make_account(sandbox, "second@example.com", aliases=[OTHER])
    account.send_as_aliases = OTHER
    account.save()
    assert routed("both active").account == account  # the default first
    services.pause(account)  # an update(), not a save()
    assert routed("paused").account == second  # active accounts before paused ones


@pytest.mark.django_db(transaction=True)
def test_an_account_from_a_rolled_back_transaction_is_not_remembered(
    outbox_settings, account, sandbox, make_account, handed
):
    with pytest.raises(RuntimeError), transaction.atomic():
        make_account(sandbox, OTHER)
        assert not routed("inside").from_rewritten  # routed to the new account, uncommitted
        raise RuntimeError("rolled back")
    row = routed("after")  # would fail to commit if the rolled-back account were cached
    assert row.from_rewritten and row.account == account


@pytest.mark.django_db(transaction=True)
def test_cached_accounts_hold_no_secrets(outbox_settings, account, handed):
    routed("fill")
    (accounts,) = [cached for _, cached in routing._accounts.values()]
    assert [a.email for a in accounts] == [SENDER]
    assert "app_password" not in accounts[0].__dict__


# --- the message build ----------------------------------------------------------------------------


@pytest.mark.skipif(
    not routing._MESSAGE_TAKES_POLICY,
    reason="Django < 6.0 builds messages with its own MIME classes, not an email policy: "
    "routing.SMTP_POLICY is used on Django 6.0 and later only",
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: EmailMessage("Plain", "body\n", SENDER, ["to@example.net"]),
        lambda: EmailMessage(
            "Réinitialisation du mot de passe " * 4,
            "Bonjour Zoë,\n" + "ligne très longue " * 40,
            f'"Équipe, Support" <{SENDER}>',
            ['"Doe, Jane" <jane@example.net>', "Zoë <zoe@exämple.net>"],
            cc=["cc@example.net"],
            bcc=["hidden@example.net"],
            reply_to=["Help <help@example.net>"],
            headers={"X-Campaign": "ünïcode", "List-Unsubscribe": "<https://example.net/u>"},
        ),
        lambda: _with_parts(),
    ],
    ids=["plain", "non-ascii-and-folding", "alternatives-and-attachment"],
)
def test_the_message_build_gives_the_stock_policys_bytes(make):
    """The cached header classes (routing.SMTP_POLICY) change nothing in what is sent."""
    import email.policy

    fixed = {"Message-ID": "<fixed@example.com>", "Date": "Mon, 30 Nov 2026 10:00:00 -0000"}
    ours, stock = make(), make()
    ours.extra_headers.update(fixed)
    stock.extra_headers.update(fixed)

    def same_boundaries(data: bytes) -> bytes:  # multipart boundaries are random
        return re.sub(rb"={15}\d+==", b"BOUNDARY", data)

    for _ in range(2):  # the second build uses the classes the first one made
        built = ours.message(policy=routing.SMTP_POLICY).as_bytes()
        expected = stock.message(policy=email.policy.SMTP).as_bytes()
        assert same_boundaries(built) == same_boundaries(expected)


def _with_parts() -> EmailMessage:
    from django.core.mail import EmailMultiAlternatives

    m = EmailMultiAlternatives("Parts", "text", SENDER, ["to@example.net"])
    m.attach_alternative("<p>html é</p>", "text/html")
    m.attach("report.csv", "a,b\n1,2\n", "text/csv")
    m.attach("blob.bin", bytes(range(256)), "application/octet-stream")
    return m


def test_a_header_mapped_to_another_type_gets_it_at_once():
    """The classes are kept per header kind, not per name: a new mapping is never stale."""
    from email.headerregistry import HeaderRegistry, UnstructuredHeader

    registry = routing._HeaderClasses()
    assert issubclass(registry["To"], HeaderRegistry().registry["to"])
    registry.map_to_type("to", UnstructuredHeader)
    assert issubclass(registry["To"], UnstructuredHeader)
