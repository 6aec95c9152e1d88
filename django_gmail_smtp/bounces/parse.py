"""Reading a non-delivery report: who bounced, how (hard 5.x.x or soft 4.x.x), and which message.

Gmail's reports (From ``Mail Delivery Subsystem <mailer-daemon@googlemail.com>``) carry an
``X-Failed-Recipients`` header and usually follow RFC 3464: a ``multipart/report`` with a
human-readable part, a ``message/delivery-status`` part (one block of fields per recipient:
``Final-Recipient``, ``Action``, ``Status``, ``Diagnostic-Code``) and the original message or
its headers (``message/rfc822`` or ``text/rfc822-headers``), whose ``Message-ID`` says which
outbox row bounced. Other servers' reports that reach the inbox follow the same RFC or at
least name the failed recipients in ``X-Failed-Recipients``.

Only the standard library's :mod:`email` is used: RFC 3464 reports are simple to read, and
we need what bounce-detection libraries do not return (the original Message-ID, the status
code, the diagnostic text).
"""

from __future__ import annotations

import email
import email.header
import email.parser
import email.policy
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime

from ..enums import BounceKind

__all__ = [
    "BounceReport",
    "FailedRecipient",
    "MalformedReport",
    "NotABounce",
    "normalize_message_id",
    "parse_report",
]

#: longest report text kept (the human-readable part, for the admin and suppression detail)
MAX_REPORT_TEXT = 4000

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_CODE = re.compile(r"\b([45])\d\d\b")
_MESSAGE_ID_LINE = re.compile(r"^message-id:\s*(<[^>\s]+>)", re.IGNORECASE | re.MULTILINE)


class NotABounce(ValueError):
    """The message is not a delivery report (the reader leaves it alone)."""


class MalformedReport(ValueError):
    """The message looks like a delivery report but cannot be read; says why."""


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient a report is about."""

    address: str
    #: RFC 3464 ``Action``: "failed" (the message will not arrive), "delayed" (still trying), ...
    action: str
    #: the enhanced status code such as "5.1.1" ("" when the report gives none)
    code: str
    #: the remote server's words (``Diagnostic-Code``), or the report's text about it
    diagnostic: str
    kind: BounceKind
    #: ``Original-Recipient``: the address as it was sent to, before any forwarding
    original: str = ""

    @property
    def failed(self) -> bool:
        """True when the message did not and will not reach this recipient."""
        return self.action in ("failed", "")


@dataclass(frozen=True)
class BounceReport:
    """What one report says."""

    #: the report's own Message-ID ("" when it has none)
    message_id: str
    #: the Message-ID of the message that bounced ("" when the report does not include it)
    original_message_id: str
    recipients: tuple[FailedRecipient, ...]
    #: the human-readable text of the report, shortened to MAX_REPORT_TEXT characters
    text: str
    date: datetime | None

    def key(self, uid_validity: int | None = None, uid: int | None = None) -> str:
        """What identifies this report (``Bounce.report_id``): its Message-ID (hashed when it is
        longer than 255 characters), else its place in the mailbox."""
        if self.message_id:
            if len(self.message_id) <= 255:
                return self.message_id
            return "sha256:" + hashlib.sha256(self.message_id.encode()).hexdigest()
        return f"uid:{uid_validity or 0}:{uid or 0}"


def normalize_message_id(value: str | None) -> str:
    """A Message-ID as ``<left@right>``, whitespace and folding removed ("" if empty)."""
    text = "".join(str(value or "").split())
    if not text:
        return ""
    match = re.search(r"<[^<>]+>", text)
    if match:
        return match.group(0)
    return f"<{text.strip('<>')}>"


def parse_report(raw: bytes | Message) -> BounceReport:
    """Read a delivery report; :class:`NotABounce` or :class:`MalformedReport` if it is not one
    (or not a readable one)."""
    message = raw if isinstance(raw, Message) else _message(raw)
    dsn_parts = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"]
    failed_header = _addresses(message.get_all("X-Failed-Recipients") or [])
    if not dsn_parts and not failed_header:
        if message.get_content_type() == "multipart/report":
            raise MalformedReport(
                "a multipart/report without a message/delivery-status part or "
                "X-Failed-Recipients header"
            )
        raise NotABounce("no message/delivery-status part and no X-Failed-Recipients header")

    text = _report_text(message)
    recipients: dict[str, FailedRecipient] = {}
    for part in dsn_parts:
        for recipient in _dsn_recipients(part):
            recipients.setdefault(recipient.address, recipient)
    for address in failed_header:
        if address not in recipients:
            # X-Failed-Recipients lists permanent failures; the report's text may say more.
            code = _code_in(text)
            recipients[address] = FailedRecipient(
                address=address,
                action="failed",
                code=code,
                diagnostic=_diagnostic_line(text, address),
                kind=_kind(code, text, default=BounceKind.HARD),
            )
    if not recipients:
        raise MalformedReport("its delivery-status part names no recipient")

    return BounceReport(
        message_id=normalize_message_id(_header(message, "Message-ID")),
        original_message_id=_original_message_id(message),
        recipients=tuple(recipients.values()),
        text=text[:MAX_REPORT_TEXT],
        date=_date(_header(message, "Date")),
    )


# --- the parts -----------------------------------------------------------------------------------


def _message(raw: bytes) -> Message:
    if not isinstance(raw, (bytes, bytearray)) or not raw.strip():
        raise MalformedReport("the message is empty")
    # compat32: the lenient parser (a broken header never raises while it is read).
    return email.message_from_bytes(bytes(raw), policy=email.policy.compat32)


def _header(message: Message, name: str) -> str:
    value = message.get(name)
    if value is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except (LookupError, ValueError, UnicodeError):
        return str(value)


def _addresses(values: list[str]) -> list[str]:
    found = []
    for _name, address in getaddresses([str(v) for v in values]):
        address = address.strip().lower()
        if "@" in address and address not in found:
            found.append(address)
    return found


def _dsn_blocks(part: Message) -> list[Message]:
    """The field blocks of a message/delivery-status part (the first is per message)."""
    payload = part.get_payload()
    if isinstance(payload, list) and all(isinstance(p, Message) for p in payload):
        return [p for p in payload if isinstance(p, Message)]
    # Not parsed into blocks (an unusual transfer encoding): parse the text ourselves.
    data = part.get_payload(decode=True) or b""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(payload)
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    chunks = re.split(r"\r?\n\s*\r?\n", text.strip())
    return [parser.parsestr(chunk + "\n") for chunk in chunks if chunk.strip()]


def _dsn_recipients(part: Message) -> list[FailedRecipient]:
    found = []
    for block in _dsn_blocks(part)[1:]:
        address = _typed_address(block.get("Final-Recipient")) or _typed_address(
            block.get("Original-Recipient")
        )
        if not address:
            continue
        action = str(block.get("Action", "")).strip().lower()
        diagnostic = " ".join(str(block.get("Diagnostic-Code", "")).split())
        diagnostic = re.sub(r"^smtp;\s*", "", diagnostic, flags=re.IGNORECASE)
        status = _STATUS.search(str(block.get("Status", ""))) or _STATUS.search(diagnostic)
        code = ".".join(status.groups()) if status else ""
        found.append(
            FailedRecipient(
                address=address,
                action=action,
                code=code,
                diagnostic=diagnostic,
                kind=_kind(code, diagnostic, default=BounceKind.HARD),
                original=_typed_address(block.get("Original-Recipient")),
            )
        )
    return found


def _typed_address(value: object) -> str:
    """``rfc822; someone@example.com`` -> ``someone@example.com``."""
    if value is None:
        return ""
    text = " ".join(str(value).split())
    if ";" in text:
        text = text.split(";", 1)[1]
    addresses = _addresses([text])
    return addresses[0] if addresses else ""


def _kind(code: str, text: str, *, default: BounceKind) -> BounceKind:
    if code:
        return BounceKind.SOFT if code.startswith("4") else BounceKind.HARD
    smtp = _SMTP_CODE.search(text or "")
    if smtp:
        return BounceKind.SOFT if smtp.group(1) == "4" else BounceKind.HARD
    return default


def _code_in(text: str) -> str:
    status = _STATUS.search(text or "")
    return ".".join(status.groups()) if status else ""


def _diagnostic_line(text: str, address: str) -> str:
    """The line of the report's text with an SMTP reply in it (Gmail's "The response was:")."""
    for line in (text or "").splitlines():
        if _STATUS.search(line) or _SMTP_CODE.search(line):
            return " ".join(line.split())[:1000]
    return ""


def _report_text(message: Message) -> str:
    """The human-readable part: the first text/plain outside the attached original."""
    for part in _parts_outside_originals(message):
        if part.get_content_type() == "text/plain":
            return _decoded(part).strip()
    for part in _parts_outside_originals(message):
        if part.get_content_type() == "text/html":
            html = _decoded(part)
            return " ".join(re.sub(r"<[^>]+>", " ", html).split())
    return ""


def _parts_outside_originals(message: Message):
    """The parts of the report, without descending into an attached message."""
    stack = [message]
    while stack:
        part = stack.pop(0)
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "text/rfc822-headers", "message/delivery-status"):
            continue
        if part.is_multipart():
            payload = part.get_payload()
            stack[0:0] = [p for p in payload if isinstance(p, Message)]
            continue
        yield part


def _decoded(part: Message) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return str(part.get_payload() or "")
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _original_message_id(message: Message) -> str:
    """The Message-ID of the bounced message: from the attached message or its headers, or
    Gmail's ``X-Original-Message-ID`` field of the delivery-status part."""
    for part in message.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, Message):
                found = normalize_message_id(inner.get("Message-ID"))
                if found:
                    return found
        elif ctype == "text/rfc822-headers":
            headers = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(
                _decoded(part)
            )
            found = normalize_message_id(headers.get("Message-ID"))
            if found:
                return found
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = _dsn_blocks(part)
            found = normalize_message_id(blocks[0].get("X-Original-Message-ID")) if blocks else ""
            if found:
                return found
    # Some servers quote the original headers in the text instead.
    own = normalize_message_id(message.get("Message-ID"))
    for part in _parts_outside_originals(message):
        if part.get_content_maintype() == "text":
            for match in _MESSAGE_ID_LINE.finditer(_decoded(part)):
                if match.group(1) != own:
                    return normalize_message_id(match.group(1))
    return ""


def _date(value: str) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
