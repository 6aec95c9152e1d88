"""An outside audit of messages queued unbuilt (drafts), the lean one-row INSERT and the cached
option resolution.

The rule checked throughout: storing a message as a draft must not change what queueing
accepts or what is sent. Whatever the eager build refuses (raises) at queue time is refused at
queue time; what the worker builds is byte for byte what the eager build would have written
(Date, Message-ID and the multipart boundaries aside); ``MAX_MESSAGE_SIZE`` holds on the
built bytes; a draft stores on every supported database (PostgreSQL's jsonb included).
"""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.db import IntegrityError, connection, transaction
from django.db.models.signals import pre_save
from django.utils.translation import gettext_lazy

from django_gmail_smtp import conf, outbox, routing
from django_gmail_smtp.admin.outbox import OutboundEmailAdmin
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.enums import Reason
from django_gmail_smtp.exceptions import (
    GmailConfigurationError,
    InvalidMessage,
    MessageTooLarge,
)
from django_gmail_smtp.models import OutboundEmail

from .conftest import SENDER
from .factories import staff_user, with_keys
from .test_unbuilt import eager_bytes, normalised, queue

pytestmark = pytest.mark.django_db(transaction=True)

TO = ["t@example.net"]


def eager_refuses(make) -> Exception | None:
    """The error the eager build (the path before the change) raises for the message."""
    router = routing.Router(options=CeleryGmailBackend().settings, include_paused=True)
    try:
        router.route(make())
    except InvalidMessage as exc:
        return exc
    return None


def _alternatives(body: str, html: str, **kwargs) -> EmailMultiAlternatives:
    message = EmailMultiAlternatives("s", body, SENDER, TO, **kwargs)
    message.attach_alternative(html, "text/html")
    return message


def _subtype(body: str, subtype: str) -> EmailMessage:
    message = EmailMessage("s", body, SENDER, TO)
    message.content_subtype = subtype
    return message


# --- what is built -----------------------------------------------------------------------------

TRICKY = {
    "long non-ASCII subject": lambda: EmailMessage(
        "Réinitialisez votre mot de passe — " * 8, "b", SENDER, TO
    ),
    "names needing quotes": lambda: EmailMessage(
        "s",
        "b",
        f'"Équipe, Support" <{SENDER}>',
        ['"Doe, John" <j@example.net>', "Zoë Ärger <z@example.net>"],
        cc=['"a.b (c)" <c@example.net>'],
    ),
    "IDN To, Cc, Reply-To": lambda: EmailMessage(
        "s",
        "b",
        SENDER,
        ["z@bücher.example"],
        cc=["Ünï <c@münchen.example>"],
        reply_to=["Zoë <r@bücher.example>"],
    ),
    "IDN From (rewritten)": lambda: EmailMessage("s", "b", "Ö <x@bücher.example>", TO),
    "line over 998": lambda: EmailMessage("s", "x" * 2500 + "\nend\n", SENDER, TO),
    "non-ASCII line over 998": lambda: EmailMessage("s", "é" * 1500 + "\n", SENDER, TO),
    "only LF": lambda: EmailMessage("s", "\n" * 40, SENDER, TO),
    "only CRLF": lambda: EmailMessage("s", "\r\n" * 40, SENDER, TO),
    "lone CR": lambda: EmailMessage("s", "a\rb\r" * 20, SENDER, TO),
    "Unicode line breaks in the body": lambda: EmailMessage(
        "s", "a\u2028b\x85c\x0bd\x0ce", SENDER, TO
    ),
    "HTML alternative": lambda: _alternatives("Grüße\n", "<p>Grüße <b>é</b></p>"),
    "HTML alternative, empty body": lambda: _alternatives("", "<p>é</p>"),
    "content_subtype html": lambda: _subtype("<p>é</p>", "html"),
    "lazy subject and body": lambda: EmailMessage(
        gettext_lazy("Reset"), gettext_lazy("Body"), SENDER, TO
    ),
    "extra headers": lambda: EmailMessage(
        "s",
        "b",
        SENDER,
        TO,
        headers={
            "List-Unsubscribe": "<https://example.com/u/1>, <mailto:u@example.com>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "In-Reply-To": "<parent@example.com>",
            "References": "<a@example.com> <parent@example.com>",
            "Auto-Submitted": "auto-generated",
            "X-Note": "Grüße aus Köln " * 10,
        },
    ),
    "header names differing by case": lambda: EmailMessage(
        "s", "b", SENDER, TO, headers={"X-Tag": "a", "x-tag": "b", "X-TAG": "c"}
    ),
    "headers in no sorted order": lambda: EmailMessage(
        "s", "b", SENDER, TO, headers={"X-Zz": "1", "X-A": "2", "X-Mmmmmmm": "3", "X-B": "4"}
    ),
    "From override in headers": lambda: EmailMessage(
        "s", "b", "site@example.com", TO, headers={"From": f"Équipe <{SENDER}>"}
    ),
    "reply_to and a Reply-To header": lambda: EmailMessage(
        "s", "b", SENDER, TO, reply_to=["r@example.net"], headers={"Reply-To": "h@example.net"}
    ),
    "To header shown instead of to": lambda: EmailMessage(
        "s", "b", SENDER, TO, headers={"To": "Shown <shown@example.net>"}
    ),
}


@pytest.mark.parametrize("kind", list(TRICKY))
def test_a_draft_builds_to_the_bytes_the_eager_build_wrote(kind, account, dispatched):
    (row,) = queue(TRICKY[kind]())
    assert row.draft is not None, "expected a plain message to be stored unbuilt"
    built = routing.build_draft(row.draft)
    assert normalised(built) == normalised(eager_bytes(TRICKY[kind](), row.draft))
    assert row.size >= len(built)
    parsed = message_from_bytes(built, policy=policy.SMTP)
    assert parsed["Message-ID"] == row.message_id


def test_a_draft_read_back_from_the_database_keeps_the_order_of_its_headers(account, dispatched):
    """jsonb (PostgreSQL) reorders an object's keys: the order must survive the database."""
    (row,) = queue(TRICKY["headers in no sorted order"]())
    stored = OutboundEmail.objects.get(pk=row.pk).draft
    built = message_from_bytes(routing.build_draft(stored), policy=policy.SMTP)
    assert list(built.keys())[-6:] == ["Date", "Message-ID", "X-Zz", "X-A", "X-Mmmmmmm", "X-B"]
    message = TRICKY["headers in no sorted order"]()
    assert normalised(routing.build_draft(stored)) == normalised(eager_bytes(message, stored))


def test_a_body_with_a_nul_character_is_queued(account, dispatched):
    """Django builds it (a NUL byte in the body); PostgreSQL's jsonb cannot hold \\u0000."""
    make = lambda: _alternatives("a\x00b\n", "<p>\x00</p>")  # noqa: E731
    assert eager_refuses(make) is None
    (row,) = queue(make())
    built = bytes(row.mime) or routing.build_draft(row.draft)
    assert b"a\x00b" in built


# --- what queueing refuses ---------------------------------------------------------------------


def _bad_alternative_subtype() -> EmailMultiAlternatives:
    message = _alternatives("b", "<p>x</p>")
    message.alternative_subtype = "related"  # Django 6 refuses the attribute
    return message


def _alternative_without_a_slash() -> EmailMultiAlternatives:
    message = EmailMultiAlternatives("s", "b", SENDER, TO)
    message.attach_alternative("<p>x</p>", "html")
    return message


REFUSED_BY_THE_BUILD = {
    "subject with U+2028": lambda: EmailMessage("a\u2028b", "b", SENDER, TO),
    "subject with a form feed": lambda: EmailMessage("a\x0cb", "b", SENDER, TO),
    "header value with NEL": lambda: EmailMessage("s", "b", SENDER, TO, headers={"X-A": "a\x85b"}),
    "header value with U+2029": lambda: EmailMessage(
        "s", "b", SENDER, TO, headers={"List-Id": "a\u2029b"}
    ),
    "lone surrogate in the subject": lambda: EmailMessage("s\ud800", "b", SENDER, TO),
    "lone surrogate in the body": lambda: EmailMessage("s", "a\udc80b", SENDER, TO),
    "lone surrogate in a header": lambda: EmailMessage(
        "s", "b", SENDER, TO, headers={"X-A": "\ud800"}
    ),
    "lone surrogate in the HTML": lambda: _alternatives("b", "<p>\ud800</p>"),
    "alternative mimetype without a slash": _alternative_without_a_slash,
    "alternative_subtype": _bad_alternative_subtype,
}


@pytest.mark.parametrize("kind", list(REFUSED_BY_THE_BUILD))
def test_queueing_refuses_what_the_eager_build_refuses(kind, account, dispatched):
    make = REFUSED_BY_THE_BUILD[kind]
    refused = eager_refuses(make)
    if refused is None:
        # This Django builds it: queueing takes it too, and stores what the worker can send.
        (row,) = queue(make())
        built = routing.build_draft(row.draft) if row.draft else bytes(row.mime)
        assert row.message_id and f"Message-ID: {row.message_id}".encode() in built
        return
    with pytest.raises(type(refused)):
        queue(make())
    assert not OutboundEmail.objects.exists()


# --- MAX_MESSAGE_SIZE ----------------------------------------------------------------------------


def _long_subtype() -> EmailMessage:
    return _subtype("b", "x" * 60_000)


def _long_alternative_type() -> EmailMultiAlternatives:
    message = EmailMultiAlternatives("s", "b", SENDER, TO)
    message.attach_alternative("<p>x</p>", "text/" + "y" * 60_000)
    return message


def _many_reply_to() -> EmailMessage:
    # Each 8 UTF-8 bytes are written as 30 or more: an encoded word and a punycode domain.
    return EmailMessage("s", "b", SENDER, TO, reply_to=["é<x@ü>"] * 12_000)


OVER_THE_ESTIMATE = {
    "long content_subtype": _long_subtype,
    "long alternative mimetype": _long_alternative_type,
    "many short non-ASCII Reply-To": _many_reply_to,
}


@pytest.mark.parametrize("kind", list(OVER_THE_ESTIMATE))
def test_max_message_size_holds_for_what_a_draft_builds_to(kind, account, dispatched, settings):
    make = OVER_THE_ESTIMATE[kind]
    size = len(routing._message_bytes(make())[0])
    # Each of these is stored unbuilt under a limit just below its size: draft_estimate() is below
    # what the draft builds to (a subtype or mimetype is not counted; an address list grows
    # more than four times), and the worker does not check MAX_MESSAGE_SIZE again.
    with_keys(settings, MAX_MESSAGE_SIZE=size - 100)  # boundaries vary in length
    with pytest.raises(MessageTooLarge):
        queue(make())
    assert not OutboundEmail.objects.exists()


# --- the lean INSERT -----------------------------------------------------------------------------


def _rows(count: int = 1, **fields) -> list[OutboundEmail]:
    """``count`` new rows of one routed message (the same Message-ID and draft)."""
    message = EmailMessage("s", "b", SENDER, ["t@x.example"])
    envelope = CeleryGmailBackend().router().route(message)
    now = outbox._now()
    rows = []
    for _ in range(count):
        row = outbox._new_row(envelope, message, priority="bulk", mailer="m", now=now)
        for name, value in fields.items():
            setattr(row, name, value)
        rows.append(row)
    return rows


def _columns(pk: int) -> dict:
    values = OutboundEmail.objects.filter(pk=pk).values().get()
    return {k: v for k, v in values.items() if k not in ("id", "created_at", "updated_at")}


def test_a_row_that_differs_from_the_defaults_is_written_as_it_is(account, dispatched):
    now = outbox._now()
    changed = dict(
        attempts=2,
        reason=Reason.RETRY,
        last_error="Gmail said later",
        refused_recipients={"a@x.example": [450, "later"]},
        next_attempt_at=now,
        claimed_by="worker-1",
    )
    lean, saved = _rows(2, **changed)
    outbox.insert_one(lean, "default")
    saved.save(force_insert=True)
    assert _columns(lean.pk) == _columns(saved.pk)
    assert _columns(lean.pk)["attempts"] == 2 and _columns(lean.pk)["claimed_by"] == "worker-1"


def test_a_receiver_for_every_model_still_sees_the_row(account, dispatched):
    seen = []

    def receiver(sender, instance, **kwargs):
        if sender is OutboundEmail:
            seen.append(instance.subject)

    pre_save.connect(receiver)  # no sender: every model
    try:
        queue(EmailMessage("seen", "b", SENDER, ["t@x.example"]))
    finally:
        pre_save.disconnect(receiver)
    assert seen == ["seen"]


def test_a_failed_lean_insert_marks_the_transaction_for_rollback(account, dispatched):
    """As save() does: the caller's transaction cannot go on as if the row were written."""
    with transaction.atomic():
        with pytest.raises(IntegrityError):
            outbox.insert_one(_rows(account_email=None)[0], connection.alias)
        assert transaction.get_rollback()
        transaction.set_rollback(False)
    assert not OutboundEmail.objects.exists()


# --- resolved options ----------------------------------------------------------------------------


def test_an_option_of_the_wrong_type_is_refused_even_after_an_equal_valid_one(db):
    conf.resolve_cached({"timeout": 1})
    with pytest.raises(GmailConfigurationError, match="timeout"):
        conf.resolve({"timeout": True})  # what resolve_cached stands for
    with pytest.raises(GmailConfigurationError, match="timeout"):
        conf.resolve_cached({"timeout": True})  # True == 1: the same cache key


def test_a_changed_setting_is_seen_by_the_next_backend(account, dispatched, settings):
    with_keys(settings, MAX_MESSAGE_SIZE=1_000_000)
    assert CeleryGmailBackend().settings.max_message_size == 1_000_000
    with_keys(settings, MAX_MESSAGE_SIZE=2_000_000)
    assert CeleryGmailBackend().settings.max_message_size == 2_000_000


def test_a_password_is_never_kept(db):
    options = {"username": "robot@example.com", "password": "abcd efgh ijkl mnop"}
    first = conf.resolve_cached(options)
    assert first.password and conf.resolve_cached(options) is not first
    assert not any(s.password for s in conf._resolved.values())


# --- the admin -----------------------------------------------------------------------------------

CHANGE = "/admin/django_gmail_smtp/outboundemail/{}/change/"
CHANGELIST = "/admin/django_gmail_smtp/outboundemail/"
SECRET_LINK = "https://example.com/reset/c0ffee-7b3f9a/"


def test_the_change_view_labels_size_and_last_error():
    assert OutboundEmailAdmin.size_text.short_description == "size"
    assert OutboundEmailAdmin.error_text.short_description == "last error"


@pytest.mark.parametrize("who", ["superuser", "viewer", "no_permission"])
def test_a_draft_row_in_the_admin_for_each_kind_of_user(who, account, dispatched, client):
    (row,) = queue(_alternatives(f"Grüße, {SECRET_LINK}\n", f'<a href="{SECRET_LINK}">x</a>'))
    assert row.draft is not None
    users = {
        "superuser": lambda: staff_user("root", superuser=True),
        "viewer": lambda: staff_user("viewer", "view_outboundemail"),
        "no_permission": lambda: staff_user("nobody"),
    }
    client.force_login(users[who]())
    page = client.get(CHANGE.format(row.pk))
    found = client.get(CHANGELIST, {"q": "c0ffee-7b3f9a"})
    if who == "no_permission":
        assert page.status_code == 403 and found.status_code == 403
        return
    assert page.status_code == 200 and found.status_code == 200
    text = page.content.decode()
    size = len(routing.build_draft(row.draft))
    assert f"{size:,} bytes" in text
    if who == "superuser":
        assert SECRET_LINK in text and found.context["cl"].result_count == 1
    else:
        assert SECRET_LINK not in text and "c0ffee" not in text
        assert found.context["cl"].result_count == 0


def test_the_admin_finds_a_draft_by_a_non_ascii_word_of_its_body(account, dispatched, client):
    (row,) = queue(EmailMessage("s", "Herzliche Grüße aus Köln\n", SENDER, TO))
    assert row.draft is not None
    client.force_login(staff_user("root", superuser=True))
    found = client.get(CHANGELIST, {"q": "Grüße aus Köln"})
    assert found.status_code == 200 and found.context["cl"].result_count == 1
