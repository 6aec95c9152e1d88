"""Routing: which account sends a message, and the envelope it goes out with.

The account is chosen from the message's From header: an active account whose own address or
send-as alias it is. Otherwise the default account sends it with From set to the account's
address (what Gmail would do anyway, made explicit) and the original address as Reply-To,
unless ``STRICT_FROM`` refuses it.
"""

from __future__ import annotations

import copy
import email.policy
import functools
import inspect
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from datetime import timezone as dt_timezone
from email.errors import HeaderParseError
from email.headerregistry import Address, AddressHeader, BaseHeader, HeaderRegistry
from email.utils import format_datetime, formatdate, make_msgid, parseaddr
from typing import Any

from django.conf import settings as django_settings
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.utils import DNS_NAME
from django.db import connections
from django.db import router as db_router
from django.db.models.signals import post_delete, post_save
from django.utils.functional import Promise
from django.utils.timezone import get_current_timezone
from django.views.decorators.debug import sensitive_variables

from .conf import SettingsLike, as_settings, setting_changed
from .credentials import default_account, settings_account
from .exceptions import (
    HeaderInjection,
    InvalidMessage,
    MessageTooLarge,
    NoSenderAccount,
    SenderNotAllowed,
    TooManyRecipients,
)
from .models import GmailAccount, normalize_address, normalize_app_password


@dataclass(repr=False)
class Envelope:
    """One message ready for the transport: who sends it, to whom, and the exact bytes."""

    account: GmailAccount
    mail_from: str
    recipients: list[str]
    data: bytes
    message_id: str = ""
    from_rewritten: bool = False
    original_from: str = ""

    def __repr__(self) -> str:
        return (
            f"<Envelope {self.account.email} -> {len(self.recipients)} recipient(s), "
            f"{self.size} bytes>"
        )

    @property
    def size(self) -> int:
        """The message's size in bytes (for one not built yet: at most this many)."""
        return len(self.data)

    @property
    def draft(self) -> dict[str, Any] | None:
        """The message's parts, when it is stored unbuilt (see :func:`draft_of`)."""
        return None


class DraftEnvelope(Envelope):
    """An envelope whose bytes are built from a draft (:func:`draft_of`) when first read.

    The outbox stores a plain message unbuilt (the caller does not pay for the build) and
    the worker builds it, while it waits for Gmail's reply to the message before (see
    :meth:`build`). A draft that no longer builds raises
    :class:`~django_gmail_smtp.exceptions.InvalidMessage` where the bytes are first read:
    the transport's error for that message alone."""

    def __init__(
        self,
        *,
        draft: dict[str, Any],
        estimate: int = 0,
        max_size: int | None = None,
        **fields: Any,
    ) -> None:
        self._draft = draft
        self._estimate = estimate
        self._max_size = max_size
        self._built: bytes | None = None
        super().__init__(data=b"", **fields)

    @property
    def data(self) -> bytes:
        if self._built is None:
            self._built = build_draft(self._draft)
        if self._max_size is not None and len(self._built) > self._max_size:
            # Never at queue time's estimate; checked again on what was built, to be sure.
            raise MessageTooLarge(
                f"The message is {len(self._built):,} bytes; Gmail accepts at most "
                f'{self._max_size:,} (GMAIL_SMTP["MAX_MESSAGE_SIZE"]), so it was not sent',
                account=self.account.email,
                phase="size",
            )
        return self._built

    @data.setter
    def data(self, value: bytes) -> None:
        self._built = value or None

    @property
    def built(self) -> bool:
        return self._built is not None

    def build(self) -> bool:
        """Build the bytes now (False: the draft does not build, or is too large; reading
        ``data`` raises)."""
        try:
            self.data  # noqa: B018
        except (InvalidMessage, MessageTooLarge):
            return False
        return True

    @property
    def size(self) -> int:
        return len(self._built) if self._built is not None else self._estimate

    @property
    def draft(self) -> dict[str, Any] | None:
        return self._draft


def account_key(account: GmailAccount) -> Any:
    """A stable identity for an account, saved or not (the EMAIL_HOST_USER fallback)."""
    return account.pk or ("settings", account.email)


def header_from(message: EmailMessage) -> str:
    """The From header Django will write (an explicit extra header wins over from_email)."""
    headers = {k.lower(): v for k, v in (message.extra_headers or {}).items()}
    return str(headers.get("from") or message.from_email or "")


def _has_header(message: EmailMessage, name: str) -> bool:
    return any(k.lower() == name.lower() for k in (message.extra_headers or {}))


# --- the per-process account list of the outbox's routers -----------------------------------------

#: seconds a process reuses the account list it routes queued mail with. Changes made in this
#: process (saving or deleting an account, pausing one, a setting) take effect at once; changes
#: made in another process within this many seconds, since no query asks whether there are any
#: (that query would cost what the cache saves). A queued row is checked again by the worker
#: (paused, unhealthy, deleted and re-added accounts). The one exception: for that long after
#: another process deletes an account, mail routed to it here fails to commit (IntegrityError).
ACCOUNTS_TTL = 2.0
#: fields routing reads; secrets are neither loaded nor kept in the process's memory
ROUTING_FIELDS = ("id", "email", "send_as_aliases", "is_active", "is_default")
#: (database alias, include_paused) -> (monotonic time loaded, accounts)
_accounts: dict[tuple[str, bool], tuple[float, list[GmailAccount]]] = {}
#: id() of a (thread's) connection -> id() of its outermost atomic block that wrote an account
_dirty: dict[int, int] = {}


def forget_accounts(**kwargs: Any) -> None:
    """Drop the process's cached account lists (connected to GmailAccount's post_save and
    post_delete and to ``setting_changed``; call it after changing accounts with ``update()``).

    A write inside a transaction also stops the cache from being filled on that connection
    until the transaction ends: a list read then could hold rows a rollback removes."""
    _accounts.clear()
    alias = kwargs.get("using")
    if alias is not None and connections[alias].in_atomic_block:
        connection = connections[alias]  # this thread's
        _dirty[id(connection)] = id(connection.atomic_blocks[0])


def _cacheable(alias: str) -> bool:
    """Whether this thread may fill the cache: not inside a transaction that wrote accounts."""
    connection = connections[alias]
    dirty = _dirty.get(id(connection))
    if dirty is None:
        return True
    if connection.in_atomic_block and id(connection.atomic_blocks[0]) == dirty:
        return False
    _dirty.pop(id(connection), None)  # that transaction has ended (committed or rolled back)
    return True


def routing_accounts(*, include_paused: bool) -> list[GmailAccount]:
    """The eligible accounts (see ``GmailAccount.objects.eligible``), or the EMAIL_HOST_USER
    account when there are none, with only the fields routing reads; cached per process for
    :data:`ACCOUNTS_TTL` seconds. The list is shared: do not change its accounts."""
    alias = db_router.db_for_read(GmailAccount)
    key = (alias, include_paused)
    now = time.monotonic()
    cached = _accounts.get(key)
    if cached is not None and now - cached[0] < ACCOUNTS_TTL and _cacheable(alias):
        return cached[1]
    eligible = GmailAccount.objects.using(alias).eligible(include_paused=include_paused)
    accounts = list(eligible.only(*ROUTING_FIELDS))
    if not accounts:
        fallback = settings_account()
        if fallback is not None:
            accounts = [fallback]
    if _cacheable(alias):
        _accounts[key] = (now, accounts)
    return accounts


post_save.connect(forget_accounts, sender=GmailAccount, dispatch_uid="gmail_smtp.routing.save")
post_delete.connect(forget_accounts, sender=GmailAccount, dispatch_uid="gmail_smtp.routing.del")
setting_changed.connect(forget_accounts, dispatch_uid="gmail_smtp.routing.settings")


class Router:
    """Choose accounts by From address. Build one per batch; it caches the account list.

    ``options``: the mailer's :class:`~django_gmail_smtp.conf.MailerSettings` (or a mapping of
    backend options; None: GMAIL_SMTP). Its ``account`` option (or ``account`` here) sends
    everything from that address; its ``username``/``password`` log in as that address (see
    :func:`explicit_account`). ``include_paused``: paused (inactive) accounts may be chosen
    too, after active ones; the outbox uses this so mail for a paused account waits for it
    instead of being refused. ``cached``: use the process's account list
    (:func:`routing_accounts`, for queueing: the accounts are only routed to, never logged in
    with) rather than reading it for this router. ``unbuilt``: return a plain message as a
    :class:`DraftEnvelope` (its parts, checked, and built when it is sent: see
    :func:`draft_of`), for the outbox.
    """

    def __init__(
        self,
        *,
        account: str | None = None,
        options: SettingsLike = None,
        include_paused: bool = False,
        cached: bool = False,
        unbuilt: bool = False,
    ):
        settings = as_settings(options)
        account = account or settings.account
        self.forced = normalize_address(account) if account else None
        self.strict = settings.strict_from
        self.max_recipients = settings.max_recipients_per_message
        self.max_size = settings.max_message_size
        self.include_paused = include_paused
        self.cached = cached
        self.unbuilt = unbuilt
        self._accounts: list[GmailAccount] | None = None
        if settings.login is not None:
            login = explicit_account(*settings.login)
            self._accounts = [login]
            self.forced = login.email

    def accounts(self) -> list[GmailAccount]:
        if self._accounts is None and self.cached:
            self._accounts = routing_accounts(include_paused=self.include_paused)
        if self._accounts is None:
            eligible = GmailAccount.objects.eligible(include_paused=self.include_paused)
            self._accounts = list(eligible)
            if not self._accounts:
                fallback = settings_account()
                if fallback is not None:
                    self._accounts = [fallback]
        return self._accounts

    def candidates(self, address: str) -> list[GmailAccount]:
        """Active accounts that may send as ``address``, own address first, then aliases."""
        address = normalize_address(address)
        accounts = self.accounts()
        own = [a for a in accounts if normalize_address(a.email) == address]
        aliased = [a for a in accounts if a not in own and address in a.aliases()]
        return sorted(own + aliased, key=lambda a: not a.is_active)  # active ones first

    def default(self) -> GmailAccount:
        accounts = self.accounts()
        for account in accounts:
            if account.is_default:
                return account
        return default_account()

    def route(self, message: EmailMessage, *, exclude: Iterable[Any] = ()) -> Envelope | None:
        """Pick the account for ``message`` and build its envelope and bytes.

        ``exclude``: accounts (pks) already tried, for failover; then only another account
        that can send as the same From is returned, or None when there is none.
        """
        check_headers(message)
        from_header = header_from(message)
        name, address = _parse_from(from_header)
        _check_address(
            "From",
            from_header,
            hint="Set from_email (or DEFAULT_FROM_EMAIL) to an address like "
            "'Site <noreply@example.com>'. Nothing was sent.",
        )
        for reply_to in message.reply_to or ():
            _check_address("Reply-To", reply_to)
        excluded = set(exclude)
        if self.forced:
            accounts = [a for a in self.accounts() if normalize_address(a.email) == self.forced]
            if not accounts:
                raise NoSenderAccount(
                    f"No active Gmail account {self.forced} exists (asked for by the backend's "
                    "'account' option). Add it in the admin or fix the option."
                )
            if excluded:
                return None
            candidates = accounts if accounts[0].can_send_as(address) else []
            fallback = accounts[0]
        else:
            candidates = [a for a in self.candidates(address) if account_key(a) not in excluded]
            fallback = None
            if excluded and not candidates:
                return None
        if candidates:
            account, rewritten = candidates[0], False
        elif self.strict:
            raise SenderNotAllowed(
                f"No Gmail account here can send as {address} and STRICT_FROM is on, so the "
                "message was refused",
                sender=address,
            )
        else:
            account, rewritten = fallback or self.default(), True
        return self.build(message, account, rewritten=rewritten, name=name, address=address)

    def build(
        self,
        message: EmailMessage,
        account: GmailAccount,
        *,
        rewritten: bool,
        name: str,
        address: str,
    ) -> Envelope:
        if rewritten:
            message = _rewrite_from(message, name, account.email, address)
            mail_from = account.email
        else:
            mail_from = address
        recipients = self._recipients(message)
        if self.unbuilt:
            draft, estimate = _draft(message, max_size=self.max_size)
            if draft is not None:
                return DraftEnvelope(
                    draft=draft,
                    estimate=estimate,
                    account=account,
                    mail_from=envelope_address(mail_from),
                    recipients=recipients,
                    message_id=draft["headers"][1][1],  # see draft_of
                    from_rewritten=rewritten,
                    original_from=address,
                )
        data, message_id = _message_bytes(message)
        return Envelope(
            account=account,
            mail_from=envelope_address(mail_from),
            recipients=recipients,
            data=data,
            message_id=message_id,
            from_rewritten=rewritten,
            original_from=address,
        )

    def _recipients(self, message: EmailMessage) -> list[str]:
        raw = [str(addr) for addr in message.recipients()]
        for addr in raw:
            _refuse_control_characters("The recipient", addr)
        try:
            recipients = [envelope_address(addr) for addr in raw]
        except ValueError as exc:
            raise InvalidMessage(
                f"A recipient address is not valid: {exc}",
                hint="Correct the address (user@example.com form). Nothing was sent.",
            ) from None
        if not recipients:
            raise InvalidMessage(
                "The message has no recipients (To, Cc and Bcc are empty), so nothing was sent"
            )
        unique = list(dict.fromkeys(recipients))
        if len(unique) > self.max_recipients:
            raise TooManyRecipients(
                f"The message has {len(unique)} recipients; Gmail accepts at most "
                f"{self.max_recipients} per message, so it was not sent"
            )
        return unique


@sensitive_variables("password")
def explicit_account(username: str, password: str | None) -> GmailAccount:
    """The account a mailer's ``username``/``password`` log in as (Django's ``auth_user`` and
    ``auth_password``): with a password, an App Password login that is never stored; without
    one, the active account of that address (or an unsaved one, which fails to log in with a
    clear error)."""
    address = normalize_address(username)
    if not password:
        account = GmailAccount.objects.eligible().filter(email=address).first()
        if account is not None:
            return account
    account = GmailAccount(
        email=address,
        auth_method=GmailAccount.AuthMethod.APP_PASSWORD,
        app_password=normalize_app_password(password or ""),
        is_default=True,
    )
    account.from_settings = True
    return account


def _rewrite_from(message: EmailMessage, name: str, account_address: str, original: str):
    """A copy of ``message`` with From set to the account and Reply-To set to the original."""
    clone = copy.copy(message)
    clone.extra_headers = {
        k: v for k, v in (message.extra_headers or {}).items() if k.lower() != "from"
    }
    clone.from_email = _with_name(name, account_address)
    if not message.reply_to and not _has_header(message, "Reply-To"):
        clone.reply_to = [_with_name(name, original)]
    return clone


#: ``parseaddr`` of the From header, remembered: the same few come back with every message
_parse_from = functools.lru_cache(maxsize=1024)(parseaddr)


def _check_address(label: str, address: str, hint: str | None = None) -> None:
    try:
        envelope_address(address)
    except ValueError as exc:
        raise InvalidMessage(
            f"The {label} address is not valid: {exc}",
            hint=hint or "Correct the address (user@example.com form). Nothing was sent.",
        ) from None


def _with_name(name: str, address: str) -> str:
    """``Name <address>`` for a header. Unlike ``formataddr`` this keeps a non-ASCII domain
    (Django encodes it when it builds the message) instead of raising UnicodeEncodeError."""
    if not name:
        return address
    return str(Address(display_name=name, addr_spec=address))


def _message_bytes(message: EmailMessage) -> tuple[bytes, str]:
    from .exceptions import BadHeaderError

    try:
        if _MESSAGE_TAKES_POLICY:
            mime = message.message(policy=SMTP_POLICY)
            data = mime.as_bytes()
        else:  # Django < 6.0
            mime = message.message()
            # Django < 6.0's SafeMIME* classes take linesep; the stubs describe Django 6's message.
            data = mime.as_bytes(linesep="\r\n")  # type: ignore[call-arg]
    except ValueError as exc:  # BadHeaderError is one (an alias of ValueError from Django 6.1)
        text = str(exc)
        injection = BadHeaderError is not ValueError and isinstance(exc, BadHeaderError)
        if injection or any(m in text.lower() for m in ("\n", "\r", "newline", "linefeed")):
            raise HeaderInjection(f"The message cannot be built: {text}") from None
        raise InvalidMessage(f"The message cannot be built: {text}") from None
    except (HeaderParseError, IndexError, AttributeError):
        # The stdlib's address parser fails on some malformed addresses in extra headers.
        raise InvalidMessage(_UNREADABLE_ADDRESS, hint=_UNREADABLE_HINT) from None
    except TypeError as exc:  # Django 6 hands a header value that is not text to the parser
        raise InvalidMessage(
            f"The message cannot be built: a header value is not text ({exc})",
            hint="Give the values in headers=... as strings. Nothing was sent.",
        ) from None
    message_id = str(mime.get("Message-ID", "") or "")
    return data, message_id


_MESSAGE_TAKES_POLICY = "policy" in inspect.signature(EmailMessage.message).parameters


# --- messages stored unbuilt ----------------------------------------------------------------------

#: the version of the draft format; a worker refuses (fails the row, saying so) a draft it
#: does not know rather than sending something else than was queued
DRAFT_VERSION = 1
#: per-instance attributes a draft keeps (a message with others is built at once)
_DRAFT_ATTRIBUTES = frozenset(
    {
        "_connection",
        "connection",
        "alternatives",
        "attachments",
        "bcc",
        "body",
        "cc",
        "encoding",
        "extra_headers",
        "from_email",
        "reply_to",
        "subject",
        "to",
        "content_subtype",
    }
)
#: what ``str.splitlines`` breaks at besides CR and LF (those are refused as injection)
_LINE_BREAKS = frozenset("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_UTF8 = frozenset({"utf-8", "utf8"})
#: extra headers the email package parses (a message with one is built at once, so that a bad
#: value is refused now), but for the address headers :func:`check_headers` reads itself
_STRUCTURED_HEADERS = frozenset(HeaderRegistry().registry) - {"to", "cc", "reply-to", "from"}


def draft_of(message: EmailMessage, *, max_size: int) -> dict[str, Any] | None:
    """The parts of a plain message, to store and build later (None: build it now).

    A plain message is one of Django's own classes (``EmailMessage`` or
    ``EmailMultiAlternatives``, not a subclass, whose ``message()`` may do more) with text
    parts only (body and alternatives, no attachments), its own strings as headers and
    addresses, the default encoding (a UTF-8 ``DEFAULT_CHARSET``), and well under
    ``max_size`` (the limit is checked on the built bytes for anything else). Its Date and
    Message-ID are fixed now, as Django would write them, so every build of the draft is the
    same message. The caller has already checked what the build would refuse (headers, the
    addresses, the recipients): a draft builds (see :func:`build_draft`).
    """
    return _draft(message, max_size=max_size)[0]


def _draft(message: EmailMessage, *, max_size: int) -> tuple[dict[str, Any] | None, int]:
    """:func:`draft_of`, and its :func:`draft_estimate`."""
    if type(message) not in _PLAIN_CLASSES or message.attachments:
        return None, 0
    attributes = vars(message)
    if any(n not in _DRAFT_ATTRIBUTES and not n.startswith("gmail_") for n in attributes):
        return None, 0
    if message.encoding is not None or _charset() not in _UTF8:
        return None, 0
    subject, body = _text(message.subject), _text(message.body)
    from_email = _text(message.from_email)
    if subject is None or body is None or from_email is None:
        return None, 0
    lists = {}
    for name in ("to", "cc", "reply_to"):
        values = list(getattr(message, name) or ())
        if not all(isinstance(v, str) for v in values):
            return None, 0
        lists[name] = [str(v) for v in values]
    extra = message.extra_headers or {}
    if not all(type(k) is str and type(v) is str for k, v in extra.items()):
        return None, 0
    names = {k.lower() for k in extra}
    if names & _STRUCTURED_HEADERS:
        return None, 0  # Django and the email package check these as they build: build it now
    alternatives = []
    for alternative in getattr(message, "alternatives", None) or ():
        content, mimetype = alternative[0], alternative[1]
        if not isinstance(content, str) or not isinstance(mimetype, str) or "/" not in mimetype:
            return None, 0
        alternatives.append([str(content), str(mimetype)])
    header_texts = [subject, from_email, *lists["to"], *lists["cc"], *lists["reply_to"]]
    header_texts += extra.values()
    if any(_LINE_BREAKS.intersection(text) for text in header_texts):
        return None, 0  # line breaks of Unicode's own: the email package refuses them
    # Where Django puts them (before the extra headers), fixed now, as Django would write them.
    # A list of pairs, not an object: PostgreSQL's jsonb does not keep the order of keys.
    headers = [["Date", _date_header()], ["Message-ID", make_msgid(domain=str(DNS_NAME))]]
    headers += [[str(k), str(v)] for k, v in extra.items()]
    draft: dict[str, Any] = {
        "v": DRAFT_VERSION,
        "subject": subject,
        "body": body,
        "from_email": from_email,
        **lists,
        "headers": headers,  # [name, value] pairs, Date and Message-ID first
    }
    if alternatives:
        draft["alternatives"] = alternatives
    if "content_subtype" in attributes:
        if not isinstance(attributes["content_subtype"], str):
            return None, 0
        draft["content_subtype"] = str(attributes["content_subtype"])
    try:
        estimate = draft_estimate(draft)
    except UnicodeEncodeError:  # a lone surrogate: no database or message can hold it
        return None, 0
    if estimate > max_size or "\x00" in body or any("\x00" in c for c, _ in alternatives):
        return None, 0  # a NUL: PostgreSQL's jsonb cannot hold it (the bytes can)
    return draft, estimate


def draft_estimate(draft: dict[str, Any]) -> int:
    """At most how many bytes the draft builds to: the UTF-8 bytes of the body and the
    alternatives four times over (quoted-printable writes a byte as three, and a line end
    becomes CRLF), those of the headers and addresses eight times over (encoded words, IDNA
    domains) with room for each, plus room for the MIME structure. Raises UnicodeEncodeError
    for text that UTF-8 cannot write."""
    bodies = [draft["body"], *(content for content, _ in draft.get("alternatives", ()))]
    headers = [draft["subject"], draft["from_email"], draft.get("content_subtype", "")]
    headers += [*draft["to"], *draft["cc"], *draft["reply_to"]]
    headers += [f"{k}: {v}" for k, v in draft["headers"]]
    headers += [mimetype for _, mimetype in draft.get("alternatives", ())]
    size = 4 * sum(len(text.encode("utf-8")) for text in bodies)
    size += sum(8 * len(text.encode("utf-8")) + 64 for text in headers)
    return size + 2048 * len(bodies) + 4096


def build_draft(draft: dict[str, Any]) -> bytes:
    """The bytes of a message stored as a draft (:func:`draft_of`), built by Django as the
    message itself would have been. Raises :class:`InvalidMessage` for a draft that does not
    build (made by another version, or refused by this Django)."""
    if not draft:
        raise InvalidMessage(
            "The stored message is empty, so there is nothing to send (it was queued by a "
            "version of the app that stored it elsewhere, or its body was removed)",
            hint="Queue the message again.",
        )
    if not isinstance(draft, dict) or draft.get("v") != DRAFT_VERSION:
        version = draft.get("v") if isinstance(draft, dict) else None
        raise InvalidMessage(
            f"The stored message is in a form this version cannot build (draft version "
            f"{version!r}, this version builds {DRAFT_VERSION})",
            hint="Run the same version of django-gmail-smtp in the workers as in the site "
            "that queues the mail, then retry the message.",
        )
    try:
        alternatives = draft.get("alternatives") or ()
        message = (EmailMultiAlternatives if alternatives else EmailMessage)(
            subject=draft["subject"],
            body=draft["body"],
            from_email=draft["from_email"],
            to=draft["to"],
            cc=draft["cc"],
            reply_to=draft["reply_to"],
            headers={str(k): str(v) for k, v in draft["headers"]},
        )
        for content, mimetype in alternatives:
            message.attach_alternative(content, mimetype)  # type: ignore[attr-defined]
        if "content_subtype" in draft:
            message.content_subtype = draft["content_subtype"]
        return _message_bytes(message)[0]
    except InvalidMessage:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise InvalidMessage(
            f"The stored message cannot be read back ({type(exc).__name__}: {exc})",
            hint="Queue it again; if this repeats, report it with the row's id.",
        ) from None


_PLAIN_CLASSES = (EmailMessage, EmailMultiAlternatives)


def _text(value: Any) -> str | None:
    """A string, or a lazy translation (made a string now); None for anything else."""
    return str(value) if isinstance(value, str | Promise) else None


def _charset() -> str:
    return str(django_settings.DEFAULT_CHARSET).lower().replace("_", "-")


def _date_header() -> str:
    """The Date header Django writes into a message built now."""
    if _MESSAGE_TAKES_POLICY:  # Django 6: a datetime, written by the email package
        use_local = django_settings.EMAIL_USE_LOCALTIME
        moment = datetime.now(get_current_timezone() if use_local else dt_timezone.utc)
        return format_datetime(moment)
    return formatdate(localtime=django_settings.EMAIL_USE_LOCALTIME)


class _HeaderClasses(HeaderRegistry):
    """The standard library's header registry, creating each header class once.

    ``HeaderRegistry.__getitem__`` builds a new class (``type(...)``) for every header of every
    message: about a third of the time Django 6 spends building a short message. The classes
    hold no state, so one per header kind gives the same headers and the same bytes
    (``tests/test_caller_speed.py`` compares them with the stock policy's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes: dict[type, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._classes.get(kind)
        if made is None:
            made = self._classes[kind] = super().__getitem__(name)
        return made


#: ``email.policy.SMTP`` (CRLF line ends, as SMTP sends them) with the header classes above.
SMTP_POLICY = email.policy.SMTP.clone(header_factory=_HeaderClasses())


def envelope_address(address: str) -> str:
    """The addr-spec of ``address`` for MAIL FROM / RCPT TO (IDNA domain; ValueError if bad)."""
    address = str(address)
    if _PLAIN_ADDRESS.fullmatch(address):
        # user@example.com, the common case: what the parser below would return, at a
        # fraction of its cost (it dominates queueing many messages to distinct recipients).
        return address
    return _envelope_address(address)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: a bare dot-atom address with an ASCII host name: nothing to parse, quote or encode
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")


# The stdlib's address parser is slow and the same From (and often the same recipients) comes
# back with every message: remember the last few thousand answers (a ValueError is not kept).
@functools.lru_cache(maxsize=4096)
def _envelope_address(address: str) -> str:
    if any(c in address for c in "\r\n\x00"):
        raise ValueError(f"{address!r} contains a line break or a NUL character")
    try:
        parsed = AddressHeader.value_parser(address)
        defects = {str(d) for d in parsed.all_defects}
        mailboxes = parsed.all_mailboxes
    except (HeaderParseError, IndexError, AttributeError, TypeError):
        # The stdlib parser itself fails on some malformed input ("to@" before Python 3.13,
        # "to@[" on every version): the address is not valid, whatever the reason.
        raise ValueError(f"{address!r} is not an address of the form user@example.com") from None
    if defects:
        raise ValueError(f"{address!r} is not a valid address ({'; '.join(sorted(defects))})")
    if len(mailboxes) != 1 or not mailboxes[0].domain or not mailboxes[0].local_part:
        raise ValueError(f"{address!r} is not a single address of the form user@example.com")
    mailbox = mailboxes[0]
    if not mailbox.domain.isascii():
        try:
            domain = mailbox.domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(
                f"{address!r} has a domain that cannot be written in ASCII (IDNA): a label is "
                "empty or longer than 63 characters"
            ) from None
        return str(Address(username=mailbox.local_part, domain=domain))
    return mailbox.addr_spec


_CONTROL_CHARACTERS = {"\r": "a carriage return", "\n": "a line feed", "\x00": "a NUL character"}
_NAME_CHARACTERS = {**_CONTROL_CHARACTERS, ":": "a colon"}


def check_headers(message: EmailMessage) -> None:
    """Refuse header names and values that could add or split headers (header injection).

    A Bcc header is refused (it would show the blind copies to everyone: use ``bcc=``).
    Names may not contain CR, LF, NUL or a colon (``{"X-A\\r\\nBcc: ...": "1"}`` would add a
    header); values, the subject and addresses may not contain CR, LF or NUL. Raises
    :class:`HeaderInjection` before anything is stored or sent.
    """
    for name, value in (message.extra_headers or {}).items():
        name = str(name)
        for char, what in _NAME_CHARACTERS.items():
            if char in name:
                raise HeaderInjection(f"The header name {name!r} contains {what}")
        if not name or not all(33 <= ord(c) <= 126 for c in name):
            raise InvalidMessage(
                f"The header name {name!r} is not valid",
                hint="Header names are made of printable ASCII characters (letters, digits, "
                "'-'), without spaces. Nothing was sent.",
            )
        _refuse_control_characters(f"The {name} header", value)
        if name.lower() == "bcc":  # Django 6 refuses it too; before 6 it was written out
            raise InvalidMessage(
                "A Bcc header was given in headers=...: every recipient would see it",
                hint='Pass blind copies as bcc=["..."] instead. Nothing was sent.',
            )
        if name.lower() in _ADDRESS_HEADERS:
            _check_address_header(str(value))
    _refuse_control_characters("The subject", message.subject)
    _refuse_control_characters("The From address", message.from_email)
    for label, addresses in (
        ("To", message.to),
        ("Cc", message.cc),
        ("Bcc", message.bcc),
        ("Reply-To", message.reply_to),
    ):
        for address in addresses or ():
            _refuse_control_characters(f"The {label} address", address)


_ADDRESS_HEADERS = frozenset({"to", "cc", "reply-to"})
_UNREADABLE_ADDRESS = "The message cannot be built: an address in its headers cannot be read"
_UNREADABLE_HINT = (
    "Check the addresses in the To, Cc and Reply-To headers given in headers=... "
    "(user@example.com form). Nothing was sent."
)


def _check_address_header(value: str) -> None:
    """An address header given in ``headers=`` must parse, on every Django version (before
    6.0 Django's message builder passes it through unread)."""
    try:
        parsed = AddressHeader.value_parser(value)
        mailboxes = parsed.all_mailboxes
    except (HeaderParseError, IndexError, AttributeError):
        raise InvalidMessage(_UNREADABLE_ADDRESS, hint=_UNREADABLE_HINT) from None
    if (
        parsed.all_defects
        or not mailboxes
        or any(not m.domain or not m.local_part for m in mailboxes)
    ):
        raise InvalidMessage(_UNREADABLE_ADDRESS, hint=_UNREADABLE_HINT)


def _refuse_control_characters(label: str, value: Any) -> None:
    text = "" if value is None else str(value)
    for char, what in _CONTROL_CHARACTERS.items():
        if char in text:
            raise HeaderInjection(f"{label} {text!r} contains {what}")
