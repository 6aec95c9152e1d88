"""Plain messages are queued unbuilt: the caller stores their parts (checked, with the Date
and Message-ID fixed) and the worker builds them, so that queueing costs the caller no build.

What is checked here: which messages are stored so (and which keep their exact bytes), that
a draft builds to the message Django would have built, that bad input is still refused at
once, that the worker sends drafts alone and in a stream (a draft that does not build fails
its own row), that follow-ups, retention, the admin preview and search see them, and that the
outbox's lean INSERT writes what ``save()`` writes.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from datetime import timezone as dt_timezone
from email import message_from_bytes, policy
from email.utils import parsedate_to_datetime
from unittest import mock

import django.core.mail.message as django_message
import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.db import connection, transaction
from django.db.models.signals import post_save
from django.utils import timezone
from django.utils.translation import gettext_lazy

from django_gmail_smtp import outbox, routing
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.enums import Outcome, Reason, Status
from django_gmail_smtp.exceptions import HeaderInjection, InvalidMessage, MessageTooLarge
from django_gmail_smtp.models import OutboundEmail

from .conftest import ALIAS, SENDER
from .factories import with_keys

pytestmark = pytest.mark.django_db(transaction=True)


def queue(*messages: EmailMessage) -> list[OutboundEmail]:
    CeleryGmailBackend().send_messages(list(messages))
    return list(OutboundEmail.objects.order_by("pk"))


def normalised(data: bytes) -> bytes:
    """The bytes with the multipart boundaries (random in each build) made the same."""
    boundaries = set(re.findall(rb'boundary="([^"]+)"', data))
    for i, boundary in enumerate(sorted(boundaries)):
        data = data.replace(boundary, b"BOUNDARY%d" % i)
    return data


def eager_bytes(message: EmailMessage, draft: dict) -> bytes:
    """What the change replaced: the message routed and built at once, by Django's own code
    for the Date and Message-ID (not given as extra headers), made to write the draft's."""
    fixed = dict(draft["headers"])
    moment = parsedate_to_datetime(fixed["Date"])
    if moment.tzinfo is None:  # "-0000": Django's own moment is always aware
        moment = moment.replace(tzinfo=dt_timezone.utc)

    class Now:
        @staticmethod
        def now(tz=None):
            return moment

    with ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(django_message, "make_msgid", lambda **kw: fixed["Message-ID"])
        )
        if routing._MESSAGE_TAKES_POLICY:  # Django 6 writes a datetime
            stack.enter_context(mock.patch.object(django_message, "datetime", Now))
        else:  # Django < 6 writes formatdate()
            stack.enter_context(
                mock.patch.object(django_message, "formatdate", lambda **kw: fixed["Date"])
            )
        eager = routing.Router(options=CeleryGmailBackend().settings, include_paused=True)
        envelope = eager.route(message)
    assert envelope is not None and envelope.draft is None
    return envelope.data


def html_message() -> EmailMultiAlternatives:
    message = EmailMultiAlternatives(
        "Réinitialisez votre mot de passe, s'il vous plaît: un sujet assez long pour être plié",
        "Bonjour,\n\n" + "é" * 300 + "\n\nhttps://example.com/reset/abc/\n",
        f'"Équipe, Support" <{SENDER}>',
        ["Zoë Ärger <zoe@example.net>", "plain@example.net"],
        cc=["copy@bücher.example"],
        reply_to=["help@example.com"],
        headers={"List-Unsubscribe": "<https://example.com/u/1>", "X-Tag": "reset"},
    )
    message.attach_alternative("<p>Bonjour <b>é</b></p>", "text/html")
    return message


PLAIN_MESSAGES = {
    "ascii": lambda: EmailMessage("Reset", "Click the link.\n", SENDER, ["t@example.net"]),
    "html and non-ASCII": html_message,
    "html body": lambda: _html_body(),
    "lazy subject": lambda: EmailMessage(gettext_lazy("Reset"), "b", SENDER, ["t@example.net"]),
    "bcc": lambda: EmailMessage("s", "b", SENDER, ["t@example.net"], bcc=["hidden@example.net"]),
}


def _html_body() -> EmailMessage:
    message = EmailMessage("s", "<p>hi</p>", SENDER, ["t@example.net"])
    message.content_subtype = "html"
    return message


@pytest.mark.parametrize("kind", list(PLAIN_MESSAGES))
def test_a_plain_message_is_stored_unbuilt_and_builds_to_what_django_builds(
    kind, account, dispatched
):
    message = PLAIN_MESSAGES[kind]()
    (row,) = queue(message)
    assert bytes(row.mime) == b"" and row.draft is not None
    assert dict(row.draft["headers"])["Message-ID"] == row.message_id and row.message_id
    built = routing.build_draft(row.draft)
    assert normalised(built) == normalised(eager_bytes(message, row.draft))
    assert row.size >= len(built)  # at most: the exact size is checked on the built bytes
    parsed = message_from_bytes(built, policy=policy.SMTP)
    assert parsed["Message-ID"] == row.message_id and parsed["Date"]
    assert b"hidden@example.net" not in built  # Bcc is never a header


def test_a_rewritten_from_is_stored_rewritten(account, dispatched):
    (row,) = queue(EmailMessage("s", "b", "Someone <someone@elsewhere.example>", ["t@x.example"]))
    assert row.from_rewritten and row.draft is not None
    parsed = message_from_bytes(routing.build_draft(row.draft), policy=policy.SMTP)
    assert parsed["From"].addresses[0].addr_spec == SENDER
    assert parsed["Reply-To"].addresses[0].addr_spec == "someone@elsewhere.example"


class Custom(EmailMessage):
    def message(self, **kwargs):
        built = super().message(**kwargs)
        built["X-Custom"] = "1"
        return built


def _with_attribute() -> EmailMessage:
    message = EmailMessage("s", "b", SENDER, ["t@example.net"])
    message.template_name = "reset.txt"  # something our draft would not keep
    return message


def _with_encoding() -> EmailMessage:
    message = EmailMessage("s", "b", SENDER, ["t@example.net"])
    message.encoding = "iso-8859-1"
    return message


def _with_attachment() -> EmailMessage:
    message = EmailMessage("s", "b", SENDER, ["t@example.net"])
    message.attach("a.txt", "attached", "text/plain")
    return message


BUILT_AT_ONCE = {
    "attachment": _with_attachment,
    "subclass": lambda: Custom("s", "b", SENDER, ["t@example.net"]),
    "unknown attribute": _with_attribute,
    "encoding": _with_encoding,
    "own Message-ID": lambda: EmailMessage(
        "s", "b", SENDER, ["t@example.net"], headers={"Message-ID": "<mine@example.com>"}
    ),
    "own Date": lambda: EmailMessage(
        "s", "b", SENDER, ["t@example.net"], headers={"date": "Mon, 30 Nov 2026 10:00:00 +0000"}
    ),
    "header value not a string": lambda: EmailMessage(
        "s", "b", SENDER, ["t@example.net"], headers={"X-Tag": gettext_lazy("reset")}
    ),
}


@pytest.mark.parametrize("kind", list(BUILT_AT_ONCE))
def test_other_messages_keep_their_exact_bytes(kind, account, dispatched):
    message = BUILT_AT_ONCE[kind]()
    (row,) = queue(message)
    assert row.draft is None and bytes(row.mime) and row.size == len(bytes(row.mime))
    if kind == "subclass":
        assert b"X-Custom: 1" in bytes(row.mime)
    if kind == "own Message-ID":
        assert row.message_id == "<mine@example.com>"


def test_a_charset_other_than_utf8_builds_at_once(account, dispatched, settings):
    settings.DEFAULT_CHARSET = "iso-8859-1"
    (row,) = queue(EmailMessage("s", "b", SENDER, ["t@example.net"]))
    assert row.draft is None and bytes(row.mime)


def test_a_large_message_is_built_and_measured_at_once(account, dispatched, settings):
    with_keys(settings, MAX_MESSAGE_SIZE=50_000)
    (row,) = queue(EmailMessage("s", "x" * 24_000, SENDER, ["t@example.net"]))
    assert row.draft is None  # its estimate is over the limit: the exact size decides
    with pytest.raises(MessageTooLarge):
        queue(EmailMessage("s", "x" * 60_000, SENDER, ["t@example.net"]))


@pytest.mark.parametrize(
    "message",
    [
        EmailMessage("a\nBcc: x@evil.example", "b", SENDER, ["t@example.net"]),
        EmailMessage("s", "b", SENDER, ["t@example.net"], headers={"X-A": "1\r\nBcc: e@x.ex"}),
        EmailMessage("s", "b", SENDER, ["not an address"]),
        EmailMessage("s", "b", SENDER, ["t@example.net"], headers={"Bcc": "e@x.example"}),
        EmailMessage("s", "b", SENDER, ["t@example.net"], reply_to=["bad@"]),
    ],
    ids=["subject", "header", "recipient", "bcc header", "reply-to"],
)
def test_bad_input_is_still_refused_at_once(message, account, dispatched):
    with pytest.raises((InvalidMessage, HeaderInjection)):
        queue(message)
    assert not OutboundEmail.objects.exists()


def test_a_header_value_django_cannot_write_is_refused_in_plain_words(account, dispatched):
    message = EmailMessage("s", "b", SENDER, ["t@example.net"], headers={"X-Count": 3})
    if not routing._MESSAGE_TAKES_POLICY:  # Django < 6 writes str(3)
        (row,) = queue(message)
        assert b"X-Count: 3" in bytes(row.mime)
        return
    # Django 6's builder fails with a TypeError deep in the email package on a number.
    with pytest.raises(InvalidMessage, match="cannot be built: a header value is not text"):
        queue(message)
    assert not OutboundEmail.objects.exists()


def test_the_worker_sends_a_draft_as_queued(account, sandbox, pool, dispatched):
    message = html_message()
    (row,) = queue(message)
    assert outbox.deliver(row.pk, pool=pool) == Outcome.SENT
    (delivered,) = sandbox.deliveries
    assert normalised(delivered.data) == normalised(eager_bytes(message, row.draft))
    assert delivered.message["Message-ID"] == row.message_id
    row.refresh_from_db()
    assert row.status == Status.SENT and row.draft is not None


def test_a_stream_builds_each_draft_and_one_that_does_not_build_fails_alone(
    account, sandbox, pool, dispatched
):
    rows = queue(*[EmailMessage(f"m{i}", f"body {i}", SENDER, ["t@x.example"]) for i in range(4)])
    assert all(r.draft is not None for r in rows)
    broken = rows[2]
    OutboundEmail.objects.filter(pk=broken.pk).update(draft={**broken.draft, "v": 99})
    assert outbox.deliver(rows[0].pk, pool=pool, stream=True) == Outcome.SENT
    assert [d.subject for d in sandbox.deliveries] == ["m0", "m1", "m3"]
    assert [d.message.get_content().strip() for d in sandbox.deliveries] == [
        "body 0",
        "body 1",
        "body 3",
    ]
    broken.refresh_from_db()
    assert broken.status == Status.FAILED and broken.reason == Reason.PERMANENT
    assert "draft version 99" in broken.last_error and "same version" in broken.last_error
    sent = OutboundEmail.objects.filter(status=Status.SENT)
    assert sorted(sent.values_list("pk", flat=True)) == [rows[0].pk, rows[1].pk, rows[3].pk]


def test_a_draft_that_does_not_build_fails_alone_when_sent_by_itself(
    account, sandbox, pool, dispatched
):
    (row,) = queue(EmailMessage("s", "b", SENDER, ["t@x.example"]))
    OutboundEmail.objects.filter(pk=row.pk).update(draft={"v": 1, "subject": "s"})
    assert outbox.deliver(row.pk, pool=pool) == Outcome.FAILED
    row.refresh_from_db()
    assert row.status == Status.FAILED and "cannot be read back" in row.last_error
    assert sandbox.deliveries == []


def test_a_follow_up_for_refused_recipients_keeps_the_draft(account, sandbox, pool, dispatched):
    sandbox.fault("rcpt", reply="450 4.2.1 Try later", times=1)  # the first recipient
    (row,) = queue(EmailMessage("s", "b", SENDER, ["later@x.example", "ok@x.example"]))
    assert outbox.deliver(row.pk, pool=pool) == Outcome.SENT
    follow_up = OutboundEmail.objects.get(retry_of=row)
    assert follow_up.draft == row.draft and follow_up.message_id == row.message_id
    assert follow_up.recipients == ["later@x.example"]


def test_retention_drops_the_draft(account, dispatched):
    from datetime import timedelta

    (row,) = queue(EmailMessage("s", "b", SENDER, ["t@x.example"]))
    sent_at = timezone.now() - timedelta(days=2)
    OutboundEmail.objects.filter(pk=row.pk).update(status=Status.SENT, sent_at=sent_at)
    purged = outbox.purge(delete_sent_after=None, drop_bodies_after=timedelta(days=1))
    assert purged["bodies_dropped"] == 1
    row.refresh_from_db()
    assert row.draft is None and bytes(row.mime) == b"" and row.body_dropped_at


def test_the_admin_previews_and_searches_a_draft(account, dispatched, client):
    from .factories import staff_user

    (row,) = queue(html_message())
    client.force_login(staff_user("root", superuser=True))
    page = client.get(f"/admin/django_gmail_smtp/outboundemail/{row.pk}/change/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "Bonjour" in text and row.message_id.strip("<>") in text
    found = client.get("/admin/django_gmail_smtp/outboundemail/", {"q": "example.com/reset"})
    assert found.status_code == 200 and found.context["cl"].result_count == 1
    missing = client.get("/admin/django_gmail_smtp/outboundemail/", {"q": "nowhere-at-all"})
    assert missing.context["cl"].result_count == 0


# --- the lean INSERT ---------------------------------------------------------------------------


def _columns(pk: int) -> dict:
    values = OutboundEmail.objects.filter(pk=pk).values().get()
    return {k: v for k, v in values.items() if k not in ("id", "created_at", "updated_at")}


def test_the_lean_insert_writes_what_save_writes(account, dispatched):
    message = EmailMessage("s", "b", ALIAS, ["t@x.example"])
    router = CeleryGmailBackend().router()
    envelope = router.route(message)
    lean = outbox._new_row(envelope, message, priority="bulk", mailer="m", now=outbox._now())
    outbox.insert_one(lean, "default")
    saved = outbox._new_row(envelope, message, priority="bulk", mailer="m", now=lean.enqueued_at)
    saved.save(force_insert=True)
    assert lean.pk and lean.pk != saved.pk and not lean._state.adding
    assert _columns(lean.pk) == _columns(saved.pk)
    fresh = OutboundEmail.objects.get(pk=lean.pk)
    assert fresh.created_at and fresh.updated_at and fresh.draft == envelope.draft


def test_the_lean_insert_follows_the_callers_transaction(account, dispatched):
    with pytest.raises(RuntimeError), transaction.atomic():
        queue(EmailMessage("s", "b", SENDER, ["t@x.example"]))
        assert OutboundEmail.objects.count() == 1
        raise RuntimeError("the view failed")
    assert not OutboundEmail.objects.exists() and dispatched == []


def test_save_receivers_still_see_each_row(account, dispatched):
    seen = []

    def receiver(sender, instance, created, **kwargs):
        seen.append((instance.pk, created))

    post_save.connect(receiver, sender=OutboundEmail)
    try:
        (row,) = queue(EmailMessage("s", "b", SENDER, ["t@x.example"]))
    finally:
        post_save.disconnect(receiver, sender=OutboundEmail)
    assert seen == [(row.pk, True)]


def test_the_lean_insert_is_one_statement(account, dispatched):
    from django.test.utils import CaptureQueriesContext

    queue(EmailMessage("warm", "b", SENDER, ["t@x.example"]))  # the account list is cached
    with CaptureQueriesContext(connection) as queries:
        queue(EmailMessage("s", "b", SENDER, ["t@x.example"]))
    inserts = [q["sql"] for q in queries if q["sql"].startswith("INSERT")]
    assert len(inserts) == 1 and "django_gmail_smtp_outboundemail" in inserts[0]


def test_a_stream_builds_each_draft_while_it_waits_for_gmail(
    account, sandbox, pool, dispatched, monkeypatch
):
    from django_gmail_smtp import pipeline

    rows = queue(*[EmailMessage(f"m{i}", "b", SENDER, ["t@x.example"]) for i in range(5)])
    waiting = [False]
    built_while_waiting = []
    build_next, build_draft = pipeline.build_next, routing.build_draft

    def spy_next(unbuilt):
        waiting[0] = True
        try:
            build_next(unbuilt)
        finally:
            waiting[0] = False

    def spy_build(draft):
        built_while_waiting.append(waiting[0])
        return build_draft(draft)

    monkeypatch.setattr(pipeline, "build_next", spy_next)
    monkeypatch.setattr(routing, "build_draft", spy_build)
    assert outbox.deliver(rows[0].pk, pool=pool, stream=True) == Outcome.SENT
    assert len(sandbox.deliveries) == 5
    # The first is built when the stream starts; each other one while Gmail answers the one
    # before it, never in the stream's own path.
    assert built_while_waiting == [False, True, True, True, True]


def test_queueing_never_goes_through_save(account, dispatched, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("save() was called")

    monkeypatch.setattr(OutboundEmail, "save", refuse)
    (row,) = queue(EmailMessage("s", "b", SENDER, ["t@x.example"]))
    assert row.status == Status.QUEUED and row.draft is not None


def test_a_row_with_no_message_at_all_fails_instead_of_sending_an_empty_one(
    account, sandbox, pool, dispatched
):
    (row,) = queue(EmailMessage("s", "b", SENDER, ["t@x.example"]))
    OutboundEmail.objects.filter(pk=row.pk).update(draft=None, mime=b"")
    assert outbox.deliver(row.pk, pool=pool) == Outcome.FAILED
    row.refresh_from_db()
    assert row.status == Status.FAILED and "nothing to send" in row.last_error
    assert sandbox.deliveries == []


def test_the_worker_checks_the_size_of_what_it_built(account, sandbox, pool, dispatched, settings):
    (row,) = queue(EmailMessage("s", "x" * 3000, SENDER, ["t@x.example"]))
    assert row.draft is not None
    with_keys(settings, MAX_MESSAGE_SIZE=1000)  # lowered after it was queued
    assert outbox.deliver(row.pk, pool=pool) == Outcome.FAILED
    row.refresh_from_db()
    assert row.status == Status.FAILED and "MAX_MESSAGE_SIZE" in row.last_error
    assert sandbox.deliveries == []
