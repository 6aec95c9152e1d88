"""A local SMTP server that answers like smtp.gmail.com, plus the ``GmailSandbox`` facade.

The server is an ``aiosmtpd.smtp.SMTP`` subclass running on its own event loop in a background
thread; every client, in any process, talks to it over a real (TLS) socket. It reproduces the
parts of Gmail's behaviour a sending client has to get right: STARTTLS before AUTH, App
Passwords and XOAUTH2, Gmail's reply codes and texts, the per-message recipient cap, the size
limit and a rolling 24-hour sending quota. Faults can be scripted per phase.

This module imports nothing from Django, so a sandbox can run in any plain Python process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import email.policy
import hmac
import json
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, Literal, NamedTuple, cast

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException

from .certs import CertificateFiles, ensure_certificates, server_ssl_context
from .tokens import MAIL_SCOPE, OAuthAuthority, TokenServer

__all__ = [
    "GMAIL_MAX_RECIPIENTS",
    "GMAIL_SIZE_LIMIT",
    "PHASES",
    "Delivered",
    "Fault",
    "GmailSandbox",
    "Replies",
    "SandboxStats",
    "xoauth2_initial_response",
]

logger = logging.getLogger(__name__)

GMAIL_HOSTNAME = "smtp.gmail.com"
GMAIL_SIZE_LIMIT = 35882577
GMAIL_MAX_RECIPIENTS = 100
QUOTA_WINDOW = 24 * 60 * 60
AUTH_MECHANISMS = ("LOGIN", "PLAIN", "XOAUTH2", "PLAIN-CLIENTTOKEN", "OAUTHBEARER", "XOAUTH")
PHASES = frozenset({"connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "after_data"})
Security = Literal["starttls", "ssl"]

DEFAULT_FAULT_REPLY = "421 4.7.0 Try again later"
_REPLY_RE = re.compile(r"^[2-5][0-9][0-9]( |$)")
_ADDRESS_RE = re.compile(r"^[^\s<>@]+@[^\s<>@]+$")


class Replies:
    """Gmail's replies, as the sandbox sends them (each followed by ``<id> - gsmtp``)."""

    STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first."
    AUTH_REQUIRED = "530 5.7.0 Authentication Required."
    AUTH_ACCEPTED = "235 2.7.0 Accepted"
    BAD_CREDENTIALS = (
        "535 5.7.8 Username and Password not accepted. For more information, go to "
        "https://support.google.com/mail/?p=BadCredentials"
    )
    APP_PASSWORD_REQUIRED = (
        "534 5.7.9 Application-specific password required. For more information, go to "
        "https://support.google.com/mail/?p=InvalidSecondFactor"
    )
    WEB_LOGIN_REQUIRED = (
        "534 5.7.14 <https://accounts.google.com/signin/continue?sarp=1&scc=1&plt=sandbox> "
        "Please log in via your web browser and then try again. Learn more at "
        "https://support.google.com/mail/answer/78754"
    )
    TOO_MANY_LOGINS = "454 4.7.0 Too many login attempts, please try again later."
    TOO_MANY_RECIPIENTS = (
        "452 4.5.3 Your message has too many recipients. For more information regarding "
        "Google's sending limits, visit https://support.google.com/mail/?p=TooManyRecipientsError"
    )
    BAD_RECIPIENT = "553 5.1.3 The recipient address <{address}> is not a valid RFC 5321 address."
    SYNTAX_ERROR = "555 5.5.2 Syntax error."
    DAILY_LIMIT = (
        "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending "
        "limits go to https://support.google.com/a/answer/166852"
    )
    TOO_BIG = (
        "552 5.3.4 Your message exceeded Google's message size limits. For more information, "
        "visit https://support.google.com/mail/?p=MaxSizeError"
    )
    XOAUTH2_ERROR = {"status": "400", "schemes": "Bearer", "scope": MAIL_SCOPE}


def xoauth2_initial_response(user: str, access_token: str) -> str:
    """Return the base64 XOAUTH2 initial client response Gmail expects."""
    raw = f"user={user}\x01auth=Bearer {access_token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


# -- public data types -----------------------------------------------------------------------


@dataclass
class Delivered:
    """A message the sandbox accepted (answered 250 after DATA)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    """The message exactly as received in DATA (dot-unstuffed)."""
    user: str
    """The authenticated login (the account's address as registered)."""
    message: EmailMessage
    received_at: float
    """``sb.clock()`` when the message was accepted."""
    message_id: str
    """The queue id the server put in its 250 reply."""
    mechanism: str = ""
    """The AUTH mechanism used: ``PLAIN``, ``LOGIN`` or ``XOAUTH2``."""
    tls_version: str | None = None
    """``TLSv1.3`` and so on; None if the message came over plaintext."""
    gmail_from: str = ""
    """The From address Gmail would show: the header's if it is the account or one of its
    aliases, otherwise the account's own address (Gmail rewrites it)."""

    @property
    def subject(self) -> str:
        """The decoded Subject header, or an empty string."""
        return str(self.message.get("Subject", ""))


@dataclass
class Fault:
    """A scripted misbehaviour, consumed each time it fires (``times=None``: forever).

    When it fires the server waits ``delay`` seconds, then drops the connection (``drop``),
    answers ``reply`` instead of the normal response, or, with neither, carries on normally.
    """

    phase: str
    reply: str | None = DEFAULT_FAULT_REPLY
    drop: bool = False
    times: int | None = 1
    user: str | None = None
    delay: float = 0.0
    fired: int = 0

    def describe(self) -> str:
        """A short description for logs."""
        action = "drop" if self.drop else (self.reply or "carry on")
        return f"wait {self.delay:g}s, then {action}" if self.delay else action

    def matches(self, phase: str, login: str | None) -> bool:
        """Whether the fault applies at ``phase`` for the connection's ``login``."""
        if self.phase != phase or (self.times is not None and self.times <= 0):
            return False
        return self.user is None or (login is not None and login.lower() == self.user.lower())


@dataclass
class SandboxStats:
    """Counters since the sandbox started (or since ``reset()``)."""

    connections: int = 0
    """SMTP sessions (after the TLS handshake, for implicit TLS)."""
    starttls: int = 0
    """STARTTLS commands accepted."""
    logins: int = 0
    """Successful AUTH commands."""
    auth_failures: int = 0
    """Failed AUTH commands (bad credentials, bad tokens, 454s)."""
    plaintext_auth_attempts: int = 0
    """AUTH commands received over an unencrypted connection (credentials possibly leaked)."""
    rejected: int = 0
    """MAIL, RCPT, DATA commands and message bodies answered with a 4xx or 5xx."""
    messages: int = 0
    """Messages accepted."""
    token_requests: int = 0
    """Requests to the OAuth endpoint."""


@dataclass
class SandboxUser:
    """A Gmail account the sandbox knows."""

    email: str
    app_password: str | None = None
    account_password: str | None = None
    aliases: tuple[str, ...] = ()
    require_app_password: bool = False
    web_login_required: bool = False
    daily_limit: int | None = None
    """Messages per rolling 24 hours; None: unlimited."""
    recipient_limit: int | None = None
    """Recipients per rolling 24 hours; None: unlimited."""

    def __repr__(self) -> str:
        return f"SandboxUser({self.email!r})"


class _AuthOutcome(NamedTuple):
    user: str | None
    reply: str


# -- shared state ----------------------------------------------------------------------------


class _SandboxState:
    """Everything the SMTP sessions, the token endpoint and the test thread share."""

    def __init__(self, clock: Callable[[], float] | None) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.clock: Callable[[], float] = clock or time.time
        self.users: dict[str, SandboxUser] = {}
        self.faults: list[Fault] = []
        self.deliveries: list[Delivered] = []
        self.stats = SandboxStats()
        self.ledger: dict[str, collections.deque[tuple[float, int]]] = {}
        self.bad_recipients: set[str] = set()
        self.quota_phase: Literal["mail", "data"] = "mail"
        self.on_delivery: Callable[[Delivered], None] | None = None
        self.token_user: Callable[[str], str | None] = lambda token: None

    # users (also the OAuth endpoint's UserDirectory)

    def user(self, email: str) -> SandboxUser | None:
        with self.lock:
            return self.users.get(email.strip().lower())

    def canonical_user(self, email: str) -> str | None:
        account = self.user(email)
        return account.email if account else None

    def default_consent_user(self) -> str | None:
        with self.lock:
            return next(iter(self.users.values())).email if self.users else None

    # counters and faults

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def take_fault(self, phase: str, login: str | None) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(phase, login):
                    if fault.times is not None:
                        fault.times -= 1
                    fault.fired += 1
                    return fault
        return None

    # authentication

    def check_password(self, login: str, password: str) -> _AuthOutcome:
        account = self.user(login)
        if account is None:
            return _AuthOutcome(None, Replies.BAD_CREDENTIALS)
        secret = password.encode("utf-8")
        app_ok = account.app_password is not None and hmac.compare_digest(
            account.app_password.encode("utf-8"), secret
        )
        account_ok = account.account_password is not None and hmac.compare_digest(
            account.account_password.encode("utf-8"), secret
        )
        if not (app_ok or account_ok):
            return _AuthOutcome(None, Replies.BAD_CREDENTIALS)
        if account.web_login_required:
            return _AuthOutcome(None, Replies.WEB_LOGIN_REQUIRED)
        if not app_ok and account.require_app_password:
            return _AuthOutcome(None, Replies.APP_PASSWORD_REQUIRED)
        return _AuthOutcome(account.email, Replies.AUTH_ACCEPTED)

    def check_token(self, login: str, token: str) -> str | None:
        account = self.user(login)
        owner = self.token_user(token)
        if account is None or owner is None or owner.lower() != account.email.lower():
            return None
        return account.email

    # quota

    def _usage(self, key: str, now: float) -> tuple[int, int]:
        entries = self.ledger.get(key)
        if not entries:
            return 0, 0
        while entries and entries[0][0] <= now - QUOTA_WINDOW:
            entries.popleft()
        recent = [count for at, count in entries if at <= now]
        return len(recent), sum(recent)

    def quota_usage(self, email: str) -> tuple[int, int]:
        with self.lock:
            return self._usage(email.lower(), self.clock())

    def quota_allows(self, email: str, messages: int, recipients: int) -> bool:
        with self.lock:
            account = self.users.get(email.lower())
            if account is None:
                return True
            used_messages, used_recipients = self._usage(email.lower(), self.clock())
            if account.daily_limit is not None and used_messages + messages > account.daily_limit:
                return False
            return not (
                account.recipient_limit is not None
                and used_recipients + recipients > account.recipient_limit
            )

    # deliveries

    def accept(self, delivered: Delivered) -> bool:
        """Record a message, unless it would break the user's quota (checked atomically)."""
        with self.lock:
            if not self.quota_allows(delivered.user, 1, len(delivered.rcpt_tos)):
                return False
            key = delivered.user.lower()
            self.ledger.setdefault(key, collections.deque()).append(
                (delivered.received_at, len(delivered.rcpt_tos))
            )
            self.deliveries.append(delivered)
            self.stats.messages += 1
            self.changed.notify_all()
            callback = self.on_delivery
        if callback is not None:
            try:
                callback(delivered)
            except Exception:
                logger.exception("on_delivery callback failed for %s", delivered.message_id)
        return True

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.deliveries.clear()
            self.ledger.clear()
            self.stats = SandboxStats()
            self.changed.notify_all()


# -- the SMTP protocol -----------------------------------------------------------------------


@dataclass(frozen=True)
class _ServerConfig:
    security: Security
    offer_starttls: bool
    tls_context: ssl.SSLContext
    size_limit: int | None
    max_recipients: int
    hostname: str
    max_auth_failures: int | None
    timeout: float
    pipelining: bool = True


def _new_session_id() -> str:
    return f"{secrets.token_hex(7)[:13]}-{secrets.token_hex(10)}sm{secrets.randbelow(10**8):08d}"


def _split_path(arg: str) -> tuple[str, str] | None:
    """Split ``<address> params`` (the part after ``FROM:``/``TO:``)."""
    arg = arg.strip()
    if arg.startswith("<"):
        end = arg.find(">")
        if end < 0:
            return None
        return arg[1:end].strip(), arg[end + 1 :].strip()
    address, _, rest = arg.partition(" ")
    return address, rest.strip()


def _strip_keyword(keyword: str, arg: str | None) -> str | None:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword) :]


class _GmailHandler:
    """aiosmtpd hooks for the commands ``GmailSMTP`` does not override."""

    async def handle_NOOP(self, server: GmailSMTP, session: Any, envelope: Any, arg: str) -> str:
        return server.gsmtp("250 2.0.0 OK")

    async def handle_RSET(self, server: GmailSMTP, session: Any, envelope: Any) -> str:
        return server.gsmtp("250 2.1.5 Flushed")

    async def handle_QUIT(self, server: GmailSMTP, session: Any, envelope: Any) -> str:
        return server.gsmtp("221 2.0.0 closing connection")

    async def handle_VRFY(self, server: GmailSMTP, session: Any, envelope: Any, addr: str) -> str:
        return server.gsmtp("252 2.1.5 Send some mail, I'll try my best")

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            logger.debug("sandbox STARTTLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS handshake failed"
        logger.exception("sandbox SMTP session error")
        return f"451 4.3.0 Sandbox internal error: {error.__class__.__name__}"


class GmailSMTP(SMTP):
    """One SMTP session speaking Gmail's dialect. Created per connection by ``GmailSandbox``."""

    # Long enough for any XOAUTH2 initial response; DATA lines are not limited by this.
    line_length_limit = 8192

    def __init__(
        self,
        config: _ServerConfig,
        state: _SandboxState,
        live: set[GmailSMTP],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._sid = _new_session_id()
        # aiosmtpd keeps this dict on the class and clears it per connection; keep our own.
        self.command_size_limits = collections.defaultdict(lambda: self.line_length_limit)
        self._config = config
        self._state = state
        self._live = live
        self._login: str | None = None
        self._mechanism = ""
        self._failed_auths = 0
        self._sequence = 0
        self._reply_override: str | None = None
        self._sticky_auth_fault: Fault | None = None
        super().__init__(
            _GmailHandler(),
            data_size_limit=config.size_limit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            ident=f"ESMTP {self._sid} - gsmtp",
            tls_context=config.tls_context if self._starttls_configured() else None,
            require_starttls=False,  # checked here, to answer with Gmail's text
            timeout=config.timeout,
            auth_required=False,
            auth_require_tls=False,
            loop=loop,
        )

    # -- plumbing -----------------------------------------------------------------------------

    def gsmtp(self, text: str) -> str:
        """Append Gmail's ``<id> - gsmtp`` trailer to a reply."""
        return f"{text} {self._sid} - gsmtp"

    def _starttls_configured(self) -> bool:
        return self._config.security == "starttls" and self._config.offer_starttls

    def _tls_active(self) -> bool:
        return self._config.security == "ssl" or self._tls_protocol is not None

    def _needs_starttls(self) -> bool:
        return self._starttls_configured() and not self._tls_active()

    def _tls_version(self) -> str | None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        return ssl_object.version() if ssl_object is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgraded = self.transport is not None
        super().connection_made(transport)
        if upgraded:  # STARTTLS: the client starts over
            self._login = None
            self._mechanism = ""
        else:
            self._live.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._live.discard(self)
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        if self._reply_override is not None:
            status, self._reply_override = self._reply_override, None
        await super().push(status)

    def _cancel_session(self) -> None:
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def close_connection(self) -> None:
        """Close after the replies already written (as Gmail does after a 421)."""
        if self.transport is not None:
            self.transport.close()
        self._cancel_session()

    def abort_connection(self) -> None:
        """Drop the TCP connection at once, without a reply."""
        transport = self._original_transport or self.transport
        if transport is not None:
            transport.abort()
        self._cancel_session()

    async def _reject(self, text: str) -> None:
        self._state.count("rejected")
        await self.push(self.gsmtp(text))

    async def _fault(self, phase: str, login: str | None = None, *, rejects: bool = False) -> bool:
        """Apply a scripted fault for ``phase``; True if it answered (or dropped) the command."""
        fault = self._state.take_fault(phase, login or self._login)
        if fault is None:
            return False
        return await self._apply_fault(fault, phase, rejects=rejects)

    async def _apply_fault(self, fault: Fault, phase: str, *, rejects: bool = False) -> bool:
        logger.info("sandbox fault at %s: %s", phase, fault.describe())
        if fault.delay > 0:
            await asyncio.sleep(fault.delay)
        if fault.drop:
            self.abort_connection()
            return True
        if fault.reply is None:
            return False
        if rejects and fault.reply[0] in "45":
            self._state.count("rejected")
        await self.push(fault.reply)
        if fault.reply.startswith("421"):
            self.close_connection()
        return True

    async def _auth_fault(self, login: str) -> bool:
        """Apply an ``auth`` fault. Once fired it holds for the rest of the connection, since
        clients such as smtplib's ``login()`` retry with another mechanism at once."""
        fault = self._sticky_auth_fault
        if fault is None or not (fault.user is None or fault.user.lower() == login.lower()):
            fault = self._state.take_fault("auth", login or None)
        if fault is None:
            return False
        if fault.reply is None and not fault.drop:  # only a delay
            return await self._apply_fault(fault, "auth")
        self._sticky_auth_fault = fault
        self._auth_failed()
        return await self._apply_fault(fault, "auth")

    async def _transaction_precheck(self) -> bool:
        """The checks MAIL, RCPT and DATA share; True if the command was answered."""
        assert self.session is not None
        if not self.session.host_name:
            await self._reject("503 5.5.1 EHLO/HELO first.")
        elif self._needs_starttls():
            await self._reject(Replies.STARTTLS_FIRST)
        elif not self.session.authenticated:
            await self._reject(Replies.AUTH_REQUIRED)
        else:
            return False
        return True

    # -- connection and greeting ----------------------------------------------------------------

    async def _handle_client(self) -> None:
        self._state.count("connections")
        fault = self._state.take_fault("connect", None)
        if fault is not None:
            logger.info("sandbox fault at connect: %s", fault.describe())
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if fault.drop:
                self.abort_connection()
                return
            if fault.reply is not None and not fault.reply.startswith("2"):
                await self.push(fault.reply)
                self.close_connection()
                return
            self._reply_override = fault.reply  # replaces the greeting (None: keeps it)
        await super()._handle_client()

    async def _hello(self, hostname: str | None, *, extended: bool) -> bool:
        """What EHLO and HELO share; False when the command was already answered."""
        assert self.session is not None
        if not hostname:
            await self.push("501 5.5.4 Empty HELO/EHLO argument not allowed, closing connection.")
            self.close_connection()
            return False
        if await self._fault("ehlo"):
            return False
        self._set_rset_state()
        self.session.extended_smtp = extended
        self.session.host_name = hostname
        return True

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not await self._hello(hostname, extended=True):
            return
        assert self.session is not None
        peer = self.session.peer[0] if isinstance(self.session.peer, tuple) else self.session.peer
        lines = [f"{self.hostname} at your service, [{peer}]"]
        if self._config.size_limit:
            lines.append(f"SIZE {self._config.size_limit}")
        lines.append("8BITMIME")
        if self._needs_starttls():
            lines.append("STARTTLS")
        else:  # after TLS, or on the deliberately broken plaintext server
            lines.append("AUTH " + " ".join(AUTH_MECHANISMS))
        lines.append("ENHANCEDSTATUSCODES")
        if self._config.pipelining:
            lines.append("PIPELINING")
        lines.append("SMTPUTF8")
        for index, line in enumerate(lines):
            await self.push(f"250{' ' if index == len(lines) - 1 else '-'}{line}")

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not await self._hello(hostname, extended=False):
            return
        await self.push(f"250 {self.hostname} at your service")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push(self.gsmtp("501 5.5.4 Syntax: STARTTLS"))
            return
        if not self._needs_starttls():
            await self.push(self.gsmtp("502 5.5.1 Unrecognized command."))
            return
        if await self._fault("starttls"):
            return
        self._state.count("starttls")
        self._reply_override = "220 2.0.0 Ready to start TLS"
        await super().smtp_STARTTLS(arg)

    # -- AUTH -----------------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        assert self.session is not None
        if not self._tls_active():
            self._state.count("plaintext_auth_attempts")
            logger.warning("sandbox received AUTH over an unencrypted connection")
        if not self.session.host_name or not self.session.extended_smtp:
            await self.push(self.gsmtp("503 5.5.1 EHLO/HELO first."))
            return
        if self._needs_starttls():
            await self.push(self.gsmtp(Replies.STARTTLS_FIRST))
            return
        if self.session.authenticated:
            await self.push(self.gsmtp("503 5.5.1 Already authenticated."))
            return
        args = (arg or "").split()
        if not 1 <= len(args) <= 2:
            await self.push(self.gsmtp("501 5.5.2 Syntax error: AUTH mechanism [initial-response]"))
            return
        limit = self._config.max_auth_failures
        if limit is not None and self._failed_auths >= limit:
            self._state.count("auth_failures")
            await self.push(self.gsmtp(Replies.TOO_MANY_LOGINS))
            return
        mechanism, initial = args[0].upper(), (args[1] if len(args) == 2 else None)
        if mechanism in ("PLAIN", "LOGIN"):
            credentials = await (
                self._read_plain(initial) if mechanism == "PLAIN" else self._read_login(initial)
            )
            if credentials is None:
                return  # already answered (malformed or aborted)
            login, password = credentials
            if await self._auth_fault(login):
                return
            outcome = self._state.check_password(login, password)
            if outcome.user is None:
                self._auth_failed()
                await self.push(self.gsmtp(outcome.reply))
                return
            await self._auth_succeeded(outcome.user, mechanism)
        elif mechanism == "XOAUTH2":
            await self._auth_xoauth2(initial)
        else:
            await self.push(self.gsmtp("504 5.7.4 Unrecognized authentication type."))

    def _auth_failed(self) -> None:
        self._failed_auths += 1
        self._state.count("auth_failures")

    async def _auth_succeeded(self, user: str, mechanism: str) -> None:
        assert self.session is not None
        self.session.authenticated = True
        self.session.auth_data = user
        self._login = user
        self._mechanism = mechanism
        self._failed_auths = 0
        self._state.count("logins")
        await self.push(Replies.AUTH_ACCEPTED)

    async def _decode_response(self, initial: str | None, challenge: str = "") -> bytes | None:
        """The client's base64 response: the initial one, or the answer to a 334 challenge."""
        if initial is None:
            response = await self.challenge_auth(challenge)
            return None if response is MISSING else cast(bytes, response)
        if initial == "=":  # RFC 4954: an empty initial response
            return b""
        try:
            return base64.b64decode(initial, validate=True)
        except binascii.Error:
            await self.push(self.gsmtp("501 5.5.2 Cannot Decode response"))
            return None

    async def _read_plain(self, initial: str | None) -> tuple[str, str] | None:
        blob = await self._decode_response(initial)
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push(self.gsmtp("501 5.5.2 Cannot Decode response"))
            return None
        return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")

    async def _read_login(self, initial: str | None) -> tuple[str, str] | None:
        login = await self._decode_response(initial, "Username:")
        if login is None:
            return None
        password = await self._decode_response(None, "Password:")
        if password is None:
            return None
        return login.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    async def _auth_xoauth2(self, initial: str | None) -> None:
        blob = await self._decode_response(initial)
        if blob is None:
            return
        fields: dict[str, str] = {}
        for part in blob.decode("utf-8", "replace").split("\x01"):
            name, sep, value = part.partition("=")
            if sep:
                fields[name.lower()] = value
        login = fields.get("user", "")
        scheme, _, token = fields.get("auth", "").partition(" ")
        if await self._auth_fault(login):
            return
        user = (
            self._state.check_token(login, token.strip())
            if login and scheme.lower() == "bearer"
            else None
        )
        if user is None:
            self._auth_failed()
            error = json.dumps(Replies.XOAUTH2_ERROR, separators=(",", ":"))
            await self.push("334 " + base64.b64encode(error.encode()).decode("ascii"))
            await self._reader.readline()  # the client's (empty) acknowledgement
            await self.push(self.gsmtp(Replies.BAD_CREDENTIALS))
            return
        await self._auth_succeeded(user, "XOAUTH2")

    # -- the mail transaction -------------------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if await self._transaction_precheck():
            return
        if self.envelope.mail_from is not None:
            await self._reject("503 5.5.1 Nested MAIL command.")
            return
        if await self._fault("mail", rejects=True):
            return
        rest = _strip_keyword("FROM:", arg)
        path = _split_path(rest) if rest is not None else None
        if path is None or (path[0] and not _ADDRESS_RE.match(path[0])):
            await self._reject(Replies.SYNTAX_ERROR)
            return
        address, params = path
        options = params.split()
        for option in options:
            name, _, value = option.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not value.isdigit():
                    await self._reject(Replies.SYNTAX_ERROR)
                    return
                if self._config.size_limit and int(value) > self._config.size_limit:
                    await self._reject(Replies.TOO_BIG)
                    return
            elif name == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    await self._reject(Replies.SYNTAX_ERROR)
                    return
            elif name == "SMTPUTF8":
                self.envelope.smtp_utf8 = True
            elif name != "AUTH":
                await self._reject(f"555 5.5.4 Unsupported option: {name}")
                return
        assert self._login is not None
        if self._state.quota_phase == "mail":
            account = self._state.user(self._login)
            needs_recipient = account is not None and account.recipient_limit is not None
            if not self._state.quota_allows(self._login, 1, 1 if needs_recipient else 0):
                await self._reject(Replies.DAILY_LIMIT)
                return
        self.envelope.mail_from = address
        self.envelope.mail_options.extend(options)
        await self.push(self.gsmtp("250 2.1.0 OK"))

    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if await self._transaction_precheck():
            return
        if self.envelope.mail_from is None:
            await self._reject("503 5.5.1 MAIL first.")
            return
        if await self._fault("rcpt", rejects=True):
            return
        if len(self.envelope.rcpt_tos) >= self._config.max_recipients:
            await self._reject(Replies.TOO_MANY_RECIPIENTS)
            return
        rest = _strip_keyword("TO:", arg)
        path = _split_path(rest) if rest is not None else None
        if path is None:
            await self._reject(Replies.SYNTAX_ERROR)
            return
        address, params = path
        bad = {entry.lower() for entry in list(self._state.bad_recipients)}  # list(): atomic
        if not _ADDRESS_RE.match(address) or address.lower() in bad:
            await self._reject(Replies.BAD_RECIPIENT.format(address=address))
            return
        if params:
            await self._reject(f"555 5.5.4 Unsupported option: {params.split()[0]}")
            return
        assert self._login is not None
        if self._state.quota_phase == "mail" and not self._state.quota_allows(
            self._login, 0, len(self.envelope.rcpt_tos) + 1
        ):
            await self._reject(Replies.DAILY_LIMIT)
            return
        self.envelope.rcpt_tos.append(address)
        await self.push(self.gsmtp("250 2.1.5 OK"))

    async def smtp_DATA(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if await self._transaction_precheck():
            return
        if not self.envelope.rcpt_tos:
            await self._reject("503 5.5.1 RCPT first.")
            return
        if arg:
            await self._reject("501 5.5.4 Syntax: DATA")
            return
        if await self._fault("data", rejects=True):
            return
        await self.push(self.gsmtp("354 Go ahead"))
        data, too_big = await self._read_data()
        envelope = self.envelope
        self._set_post_data_state()
        if too_big:
            await self._reject(Replies.TOO_BIG)
            return
        if await self._fault("after_data", rejects=True):
            return
        assert self._login is not None and envelope.mail_from is not None
        await self._deliver(envelope.mail_from, list(envelope.rcpt_tos), data)

    async def _read_data(self) -> tuple[bytes, bool]:
        """Read the message up to the lone dot; return it unstuffed, and whether it was too big."""
        limit = self._config.size_limit
        body = bytearray()
        mid_line = too_big = False
        while True:
            try:
                chunk = await self._reader.readuntil(b"\r\n")
                ended = True
            except asyncio.LimitOverrunError as exc:  # a long line: take it in pieces
                chunk = await self._reader.read(max(exc.consumed, 1))
                ended = False
            if not mid_line:
                if ended and chunk == b".\r\n":
                    return bytes(body), too_big
                if chunk.startswith(b"."):
                    chunk = chunk[1:]
            mid_line = not ended
            if too_big:
                continue
            if limit and len(body) + len(chunk) > limit:
                too_big = True
                body.clear()
                continue
            body += chunk

    async def _deliver(self, mail_from: str, rcpt_tos: list[str], data: bytes) -> None:
        assert self._login is not None
        self._sequence += 1
        message_id = f"{self._sid}.{self._sequence}"
        message = cast(EmailMessage, BytesParser(policy=email.policy.default).parsebytes(data))
        delivered = Delivered(
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            data=data,
            user=self._login,
            message=message,
            received_at=self._state.clock(),
            message_id=message_id,
            mechanism=self._mechanism,
            tls_version=self._tls_version(),
            gmail_from=self._gmail_from(message),
        )
        if not self._state.accept(delivered):
            await self._reject(Replies.DAILY_LIMIT)
            return
        logger.info("sandbox accepted %s from %s for %s", message_id, self._login, rcpt_tos)
        await self.push(f"250 2.0.0 OK  {int(delivered.received_at)} {message_id} - gsmtp")

    def _gmail_from(self, message: EmailMessage) -> str:
        assert self._login is not None
        account = self._state.user(self._login)
        allowed = {self._login.lower()} | {a.lower() for a in (account.aliases if account else ())}
        try:
            header = message["From"]
            addresses = header.addresses if header is not None else ()
        except Exception:  # a header the parser could not make sense of
            addresses = ()
        if addresses and addresses[0].addr_spec.lower() in allowed:
            return addresses[0].addr_spec
        return self._login


# -- the event loop thread -------------------------------------------------------------------


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Clients that refuse our certificate or vanish mid-handshake are expected in tests.
    if isinstance(context.get("exception"), (ssl.SSLError, ConnectionError, TimeoutError)):
        logger.debug("sandbox connection error: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


def _bind(host: str, port: int) -> socket.socket:
    """Bind one listening socket (even for names resolving to several addresses)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _ServerThread:
    """Runs the SMTP server on a private event loop in a daemon thread."""

    def __init__(self, config: _ServerConfig, state: _SandboxState, sock: socket.socket) -> None:
        self._config = config
        self._state = state
        self._sock = sock
        self._live: set[GmailSMTP] = set()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_exception_handler)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="gmail-sandbox-smtp", daemon=True)

    def start(self, timeout: float = 5.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the sandbox SMTP server did not start in time")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def _factory(self) -> GmailSMTP:
        return GmailSMTP(self._config, self._state, self._live, self._loop)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            ssl_context = self._config.tls_context if self._config.security == "ssl" else None
            self._server = loop.run_until_complete(
                loop.create_server(self._factory, sock=self._sock, ssl=ssl_context)
            )
        except BaseException as exc:
            self._error = exc
            self._sock.close()
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for protocol in list(self._live):
            protocol.abort_connection()
        abort_clients = getattr(self._server, "abort_clients", None)  # Python >= 3.13
        if abort_clients is not None:
            abort_clients()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


# -- the facade ------------------------------------------------------------------------------


class GmailSandbox:
    """A local smtp.gmail.com and Google OAuth endpoint, for tests and offline development.

    Usage::

        with GmailSandbox() as sb:
            sb.add_user("me@example.com", app_password="abcd efgh ijkl mnop")
            settings.GMAIL_SMTP = sb.settings()
            ...
            [message] = sb.wait_for(1)

    ``security`` is ``"starttls"`` (587-style) or ``"ssl"`` (465-style implicit TLS).
    ``offer_starttls=False`` makes a deliberately broken server that never offers STARTTLS
    but offers AUTH in the clear; ``stats.plaintext_auth_attempts`` shows whether a client
    fell for it. ``pipelining=False`` stops advertising PIPELINING (clients must then wait
    for each reply). All methods are thread-safe.
    """

    def __init__(
        self,
        security: Security = "starttls",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token_port: int = 0,
        size_limit: int | None = GMAIL_SIZE_LIMIT,
        max_recipients: int = GMAIL_MAX_RECIPIENTS,
        offer_starttls: bool = True,
        cert_dir: str | os.PathLike[str] | None = None,
        hostname: str = GMAIL_HOSTNAME,
        max_auth_failures: int | None = 3,
        timeout: float = 300.0,
        pipelining: bool = True,
        clock: Callable[[], float] | None = None,
        on_delivery: Callable[[Delivered], None] | None = None,
    ) -> None:
        if security not in ("starttls", "ssl"):
            raise ValueError(f"security must be 'starttls' or 'ssl', not {security!r}")
        self.security: Security = security
        self.offer_starttls = offer_starttls
        self._requested = (host, port, token_port)
        self._options = {
            "size_limit": size_limit,
            "max_recipients": max_recipients,
            "hostname": hostname,
            "max_auth_failures": max_auth_failures,
            "timeout": timeout,
            "pipelining": pipelining,
        }
        self._cert_dir = cert_dir
        self._certs: CertificateFiles | None = None
        self._state = _SandboxState(clock)
        self._state.on_delivery = on_delivery
        self._oauth = OAuthAuthority(users=self._state, on_request=self._count_token_request)
        self._state.token_user = self._oauth.access_token_user
        self._lifecycle = threading.Lock()
        self._smtp: _ServerThread | None = None
        self._tokens: TokenServer | None = None
        self._address: tuple[str, int] | None = None

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self._address else "stopped"
        return f"<GmailSandbox {self.security} {where}>"

    def __enter__(self) -> GmailSandbox:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the servers are listening."""
        return self._address is not None

    def start(self) -> None:
        """Start the SMTP server and the OAuth endpoint (fast once certificates exist)."""
        with self._lifecycle:
            if self._smtp is not None:
                raise RuntimeError("the sandbox is already running")
            host, port, token_port = self._requested
            certs = self._certificates()
            config = _ServerConfig(
                security=self.security,
                offer_starttls=self.offer_starttls,
                tls_context=server_ssl_context(certs),
                **self._options,  # type: ignore[arg-type]
            )
            sock = _bind(host, port)
            server = _ServerThread(config, self._state, sock)
            tokens = TokenServer(self._oauth, host="127.0.0.1", port=token_port)
            try:
                tokens.start()
                server.start()
            except BaseException:
                tokens.stop()
                server.stop()
                sock.close()
                raise
            self._smtp, self._tokens = server, tokens
            self._address = (host, sock.getsockname()[1])
            logger.info("Gmail sandbox listening on %s:%s (%s)", host, self.port, self.security)

    def stop(self) -> None:
        """Stop both servers, dropping open connections. Safe to call twice."""
        with self._lifecycle:
            server, tokens = self._smtp, self._tokens
            self._smtp = self._tokens = None
            self._address = None
            if server is not None:
                server.stop()
            if tokens is not None:
                tokens.stop()

    def _certificates(self) -> CertificateFiles:
        if self._certs is None:
            self._certs = ensure_certificates(self._cert_dir)
        return self._certs

    def _require_running(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("the sandbox is not running; call start() or use it as a context")
        return self._address

    # -- where it listens -----------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The host SMTP listens on."""
        return self._requested[0]

    @property
    def port(self) -> int:
        """The port SMTP listens on (the actual one when started with port 0)."""
        return self._require_running()[1]

    @property
    def ca_file(self) -> str:
        """Path of the PEM CA certificate that signed the server certificate."""
        return str(self._certificates().ca_file)

    @property
    def token_uri(self) -> str:
        """The OAuth token endpoint, ``http://127.0.0.1:NNNN/token``."""
        self._require_running()
        assert self._tokens is not None
        return self._tokens.base_url + "/token"

    @property
    def auth_uri(self) -> str:
        """The consent-screen stand-in, ``http://127.0.0.1:NNNN/authorize``."""
        self._require_running()
        assert self._tokens is not None
        return self._tokens.base_url + "/authorize"

    def settings(self) -> dict[str, Any]:
        """A ``GMAIL_SMTP`` settings dict pointing at this sandbox."""
        return {
            "HOST": self.host,
            "PORT": self.port,
            "SECURITY": self.security,
            "CA_FILE": self.ca_file,
            "TOKEN_URI": self.token_uri,
            "AUTH_URI": self.auth_uri,
        }

    # -- accounts and credentials ---------------------------------------------------------------

    def add_user(
        self,
        email: str,
        app_password: str | None = None,
        *,
        account_password: str | None = None,
        aliases: Iterable[str] = (),
        daily_limit: int | None = None,
        recipient_limit: int | None = None,
        require_app_password: bool = False,
        web_login_required: bool = False,
    ) -> None:
        """Add (or replace) an account.

        ``app_password`` is stored without spaces, as Google shows it in groups of four.
        ``account_password`` is the account's normal password: accepted unless
        ``require_app_password`` (then 534 5.7.9). ``web_login_required`` answers any right
        password with 534 5.7.14. ``daily_limit`` and ``recipient_limit`` are the rolling
        24-hour message and recipient quotas (see ``set_quota``).
        """
        user = SandboxUser(
            email=email.strip(),
            app_password=app_password.replace(" ", "") if app_password is not None else None,
            account_password=account_password,
            aliases=tuple(aliases),
            require_app_password=require_app_password,
            web_login_required=web_login_required,
            daily_limit=daily_limit,
            recipient_limit=recipient_limit,
        )
        with self._state.lock:
            self._state.users[user.email.lower()] = user

    def set_quota(
        self, email: str, messages: int | None = None, recipients: int | None = None
    ) -> None:
        """Set a user's rolling 24-hour limits on messages and recipients (None: unlimited)."""
        with self._state.lock:
            account = self._state.users.get(email.strip().lower())
            if account is None:
                raise ValueError(f"no sandbox user {email!r}; add_user() first")
            account.daily_limit = messages
            account.recipient_limit = recipients

    def quota_usage(self, email: str) -> tuple[int, int]:
        """Messages and recipients the user sent in the 24 hours before ``clock()``."""
        return self._state.quota_usage(email)

    def add_oauth_client(
        self, client_id: str, client_secret: str, redirect_uris: Iterable[str] | None = None
    ) -> None:
        """Register an OAuth client (``redirect_uris=None`` accepts any redirect URI)."""
        self._oauth.add_client(client_id, client_secret, redirect_uris)

    def issue_refresh_token(self, email: str, client_id: str, scope: str = MAIL_SCOPE) -> str:
        """Mint a refresh token, as if ``email`` had consented to ``client_id``."""
        return self._oauth.issue_refresh_token(email, client_id, scope)

    def issue_access_token(self, email: str, expires_in: float = 3600) -> str:
        """Mint an access token XOAUTH2 accepts for ``email`` during ``expires_in`` seconds."""
        return self._oauth.issue_access_token(email, expires_in)

    def revoke(self, token: str) -> None:
        """Revoke a refresh token (and its access tokens) or an access token."""
        self._oauth.revoke(token)

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far fail XOAUTH2."""
        self._oauth.expire_access_tokens()

    def add_service_account(self, email: str, client_id: str = "1234") -> dict[str, str]:
        """Register a service account with domain-wide delegation; return its JSON key info."""
        return self._oauth.add_service_account(
            email,
            client_id,
            auth_uri=self.auth_uri if self.running else "",
            token_uri=self.token_uri if self.running else "",
        )

    @property
    def rotate_refresh_tokens(self) -> bool:
        """If true, each refresh returns a new refresh token and invalidates the old one."""
        return self._oauth.rotate_refresh_tokens

    @rotate_refresh_tokens.setter
    def rotate_refresh_tokens(self, value: bool) -> None:
        self._oauth.rotate_refresh_tokens = value

    @property
    def consent_user(self) -> str | None:
        """The account that consents at ``/authorize`` (overrides ``login_hint``)."""
        return self._oauth.consent_user

    @consent_user.setter
    def consent_user(self, value: str | None) -> None:
        self._oauth.consent_user = value

    @property
    def consent_error(self) -> str | None:
        """If set (e.g. ``"access_denied"``), ``/authorize`` redirects with this error."""
        return self._oauth.consent_error

    @consent_error.setter
    def consent_error(self, value: str | None) -> None:
        self._oauth.consent_error = value

    def _count_token_request(self) -> None:
        self._state.count("token_requests")

    # -- behaviour ------------------------------------------------------------------------------

    def fault(
        self,
        phase: str,
        reply: str | None = None,
        drop: bool = False,
        times: int | None = 1,
        user: str | None = None,
        delay: float = 0.0,
    ) -> Fault:
        """Script a fault: at ``phase``, answer ``reply`` instead (or drop the connection).

        Phases: ``connect``, ``ehlo``, ``starttls``, ``auth``, ``mail``, ``rcpt``, ``data``
        (the DATA command) and ``after_data`` (after the body, before the 250; the message is
        not stored). ``reply`` defaults to ``421 4.7.0 Try again later``; a 421 closes the
        connection after sending it, as Gmail does. ``drop=True`` closes the connection at
        once instead. ``delay`` waits that many seconds first; with a delay and neither
        ``reply`` nor ``drop`` the session then carries on normally (a slow server).

        The fault fires ``times`` times (None: until ``reset()``), only for the login ``user``
        if given (so never before AUTH). Returns the ``Fault``; ``fired`` counts its uses.
        An ``auth`` fault, once fired, answers every further AUTH on that connection too
        (smtplib's ``login()`` retries PLAIN failures with LOGIN).
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(PHASES)}")
        if reply is None and not drop and not delay:
            reply = DEFAULT_FAULT_REPLY
        if reply is not None and not _REPLY_RE.match(reply):
            raise ValueError(f"reply must start with a 3-digit SMTP code: {reply!r}")
        if delay < 0:
            raise ValueError("delay must not be negative")
        fault = Fault(phase=phase, reply=reply, drop=drop, times=times, user=user, delay=delay)
        with self._state.lock:
            self._state.faults.append(fault)
        return fault

    @property
    def quota_phase(self) -> Literal["mail", "data"]:
        """When the daily limit is answered: at ``"mail"`` (MAIL FROM) or ``"data"``."""
        return self._state.quota_phase

    @quota_phase.setter
    def quota_phase(self, value: Literal["mail", "data"]) -> None:
        if value not in ("mail", "data"):
            raise ValueError("quota_phase must be 'mail' or 'data'")
        self._state.quota_phase = value

    @property
    def bad_recipients(self) -> set[str]:
        """Addresses RCPT rejects with 553 5.1.3 (case-insensitive); mutate it freely."""
        return self._state.bad_recipients

    @bad_recipients.setter
    def bad_recipients(self, value: Iterable[str]) -> None:
        with self._state.lock:
            self._state.bad_recipients = set(value)

    @property
    def clock(self) -> Callable[[], float]:
        """The sandbox's clock (epoch seconds) used by the quota window and ``received_at``."""
        return self._state.clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        with self._state.lock:
            self._state.clock = value

    # -- observation ----------------------------------------------------------------------------

    @property
    def deliveries(self) -> list[Delivered]:
        """The accepted messages, oldest first (a copy)."""
        with self._state.lock:
            return list(self._state.deliveries)

    @property
    def stats(self) -> SandboxStats:
        """A snapshot of the counters."""
        with self._state.lock:
            return dataclasses.replace(self._state.stats)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Delivered]:
        """Block until at least ``n`` messages were accepted; return them.

        Raises ``AssertionError`` describing what did arrive if ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        with self._state.changed:
            while len(self._state.deliveries) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    arrived = "; ".join(
                        f"{d.mail_from} -> {', '.join(d.rcpt_tos)} ({d.subject!r})"
                        for d in self._state.deliveries
                    )
                    raise AssertionError(
                        f"expected at least {n} message(s) within {timeout:g}s, "
                        f"got {len(self._state.deliveries)}: {arrived or 'none'} "
                        f"[{self._state.stats}]"
                    )
                self._state.changed.wait(remaining)
            return list(self._state.deliveries)

    def reset(self) -> None:
        """Forget deliveries, faults, counters and quota usage; users and tokens stay."""
        self._state.reset()
