"""Messages refused before anything is stored or sent, with both backends, over real sockets.

Header names and values that could add a header (CR, LF, NUL, a colon in a name), addresses
the stdlib parser chokes on (``to@``), and a From with a display name and a non-ASCII domain.
"""

from __future__ import annotations

from email.utils import parseaddr

import pytest
from django.core.mail import BadHeaderError, EmailMessage, get_connection

from django_gmail_smtp import outbox
from django_gmail_smtp.exceptions import HeaderInjection, InvalidMessage
from django_gmail_smtp.models import OutboundEmail
from django_gmail_smtp.transport import ConnectionPool

from .conftest import SENDER

pytestmark = pytest.mark.django_db

TO = "to@example.net"
BACKENDS = {
    "sync": "django_gmail_smtp.backends.GmailSMTPBackend",
    "celery": "django_gmail_smtp.backends.CeleryGmailBackend",
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, sandbox, account):
    """Each backend, wired to the sandbox, with fail_silently on (refusals still raise)."""
    return get_connection(BACKENDS[request.param], fail_silently=True)


def deliver_queued(sandbox) -> None:
    """Send what the Celery backend queued, in-process (the sync backend has sent already)."""
    pool = ConnectionPool()
    try:
        for pk in OutboundEmail.objects.values_list("pk", flat=True):
            assert outbox.deliver(pk, pool=pool) == "sent"
    finally:
        pool.close()


def assert_nothing_sent(sandbox) -> None:
    assert sandbox.stats.connections == 0
    assert sandbox.deliveries == []
    assert not OutboundEmail.objects.exists()


# --- header injection (item 5) --------------------------------------------------------------------

INJECTIONS = {
    "name-crlf": {"headers": {"X-A\r\nFrom: evil@example.org": "1"}},
    "name-lf": {"headers": {"X-A\nBcc: evil@example.org": "1"}},
    "name-cr": {"headers": {"X-A\rBcc: evil@example.org": "1"}},
    "name-nul": {"headers": {"X-A\x00": "1"}},
    "name-colon": {"headers": {"From: evil@example.org\r\nX-A": "1"}},
    "name-colon-only": {"headers": {"X-A:B": "1"}},
    "value-cr": {"headers": {"X-A": "1\rBcc: evil@example.org"}},
    "value-nul": {"headers": {"X-A": "v\x00al"}},
    "subject-nul": {"subject": "Hello\x00there"},
    "to-nul": {"to": ["victim@example.net\x00"]},
    "reply-to-nul": {"reply_to": ["a\x00@example.net"]},
}


@pytest.mark.parametrize("case", sorted(INJECTIONS))
def test_header_injection_is_refused_by_both_backends(backend, sandbox, case):
    """HeaderInjection (a BadHeaderError) even with fail_silently; nothing sent or queued."""
    fields = {"subject": "s", "to": [TO], **INJECTIONS[case]}
    message = EmailMessage(body="b", from_email=SENDER, **fields)
    with pytest.raises(HeaderInjection) as info:
        backend.send_messages([message])
    assert isinstance(info.value, BadHeaderError)
    assert "nothing was sent" in str(info.value).lower()
    assert_nothing_sent(sandbox)


def test_header_name_with_a_space_is_invalid(backend, sandbox):
    message = EmailMessage("s", "b", SENDER, [TO], headers={"X A": "1"})
    with pytest.raises(InvalidMessage, match="header name 'X A' is not valid"):
        backend.send_messages([message])
    assert_nothing_sent(sandbox)


def test_ordinary_extra_headers_still_go_out(backend, sandbox):
    message = EmailMessage(
        "s", "b", SENDER, [TO], headers={"X-Campaign": "42", "List-Id": "<news.example.com>"}
    )
    assert backend.send_messages([message]) == 1
    deliver_queued(sandbox)
    (delivered,) = sandbox.deliveries
    assert delivered.message["X-Campaign"] == "42"
    assert delivered.message["List-Id"] == "<news.example.com>"


# --- addresses the parser chokes on (item 15) -----------------------------------------------------

BAD_ADDRESSES = {
    "no-domain": "to@",
    "open-bracket": "to@[",
    "named-no-domain": "Name <to@>",
    "no-local-part": "@example.com",
    "idna-label-too-long": "a@" + "ü" * 70 + ".com",
}


@pytest.mark.parametrize("address", BAD_ADDRESSES.values(), ids=BAD_ADDRESSES.keys())
@pytest.mark.parametrize("field", ["to", "cc", "bcc", "reply_to", "from_email"])
def test_bad_address_is_invalid_message_not_a_crash(backend, sandbox, field, address):
    """An address like ``to@`` raises InvalidMessage saying which address is wrong (it raised
    IndexError before Python 3.13, AttributeError for ``to@[``); nothing sent or queued."""
    fields = {"subject": "s", "body": "b", "from_email": SENDER, "to": [TO]}
    fields[field] = address if field == "from_email" else [address]
    with pytest.raises(InvalidMessage) as info:
        backend.send_messages([EmailMessage(**fields)])
    text = str(info.value)
    assert repr(address) in text
    assert "valid" in text or "ASCII" in text
    assert "codec" not in text and "index" not in text.lower()
    assert info.value.__cause__ is None
    assert_nothing_sent(sandbox)


@pytest.mark.parametrize("header", ["To", "Cc", "Reply-To"])
def test_unreadable_address_in_an_extra_header_is_invalid_message(backend, sandbox, header):
    message = EmailMessage("s", "b", SENDER, [TO], headers={header: "x <to@["})
    with pytest.raises(InvalidMessage, match="address in its headers cannot be read"):
        backend.send_messages([message])
    assert_nothing_sent(sandbox)


# --- a From with a display name and a non-ASCII domain (item 14) ----------------------------------


def test_idna_from_with_display_name_no_account_owns(backend, sandbox):
    """Django's test_encodes_idna_in_smtp_commands, with no account owning the From: it is sent
    from the default account, the original address kept as Reply-To (it used to crash in
    formataddr with UnicodeEncodeError, even with fail_silently)."""
    message = EmailMessage(
        from_email="lists@discussão.example.org",
        to=["To Example <to@漢字.example.com>"],
        bcc=["monitor@discussão.example.org"],
        headers={
            "From": "Gestor de listas <lists@discussão.example.org>",
            "To": "Discussão Django <django@discussão.example.org>",
        },
    )
    assert backend.send_messages([message]) == 1
    deliver_queued(sandbox)
    (delivered,) = sandbox.deliveries
    assert delivered.mail_from == SENDER
    assert delivered.rcpt_tos == [
        "to@xn--p8s937b.example.com",
        "monitor@xn--discusso-xza.example.org",
    ]
    name, address = parseaddr(str(delivered.message["From"]))
    assert (name, address) == ("Gestor de listas", SENDER)
    name, address = parseaddr(str(delivered.message["Reply-To"]))
    assert name == "Gestor de listas"
    assert address in ("lists@discussão.example.org", "lists@xn--discusso-xza.example.org")


def test_idna_from_owned_by_an_account_goes_out_as_idna(sandbox, make_account, settings):
    """The same message from an account that owns the IDN address: MAIL FROM in IDNA form."""
    sandbox.add_user("lists@xn--discusso-xza.example.org", app_password="abcdefghijklmnop")
    from django_gmail_smtp.models import GmailAccount

    GmailAccount.objects.create(
        email="lists@discussão.example.org", app_password="abcdefghijklmnop", is_default=True
    )
    message = EmailMessage(
        from_email="lists@discussão.example.org",
        to=["To Example <to@漢字.example.com>"],
        bcc=["monitor@discussão.example.org"],
        headers={"From": "Gestor de listas <lists@discussão.example.org>"},
    )
    assert get_connection(BACKENDS["sync"]).send_messages([message]) == 1
    (delivered,) = sandbox.deliveries
    assert delivered.mail_from == "lists@xn--discusso-xza.example.org"
    assert delivered.rcpt_tos == [
        "to@xn--p8s937b.example.com",
        "monitor@xn--discusso-xza.example.org",
    ]
