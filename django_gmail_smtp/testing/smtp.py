"""The SMTP session that speaks like smtp.gmail.com: an ``aiosmtpd.smtp.SMTP`` subclass.

It reproduces what a sending client has to get right: STARTTLS before AUTH, AUTH PLAIN,
LOGIN and XOAUTH2 (App Passwords, account passwords and access tokens), MAIL/RCPT/DATA with
Gmail's reply codes and texts, the per-message recipient cap, the size limit, the rolling
daily quota and scripted faults. One :class:`GmailSMTP` is created per connection by the
:class:`~django_gmail_smtp.testing.listener.ServerThread`; everything it shares lives in
:class:`~django_gmail_smtp.testing.state.SandboxState`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import email.policy
import json
import logging
import re
import secrets
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, AnyStr, Literal, cast

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException

from .replies import AUTH_MECHANISMS, Replies
from .state import Delivered, Fault, SandboxState

__all__ = ["GmailSMTP", "Security", "ServerConfig"]

logger = logging.getLogger(__name__)

Security = Literal["starttls", "ssl"]

_ADDRESS_RE = re.compile(r"^[^\s<>@]+@[^\s<>@]+$")


@dataclass(frozen=True)
class ServerConfig:
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
        config: ServerConfig,
        state: SandboxState,
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

    async def push(self, status: AnyStr) -> None:
        override, self._reply_override = self._reply_override, None
        if override is not None:
            await super().push(override)
        else:
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
            # aiosmtpd types it as BaseTransport; a stream server's transport is always a Transport.
            cast(asyncio.Transport, transport).abort()
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
        # aiosmtpd's Session leaves auth_data unannotated (inferred None); it holds any value.
        self.session.auth_data = user  # type: ignore[assignment]
        self._login = user
        self._mechanism = mechanism
        self._failed_auths = 0
        self._state.count("logins")
        await self.push(Replies.AUTH_ACCEPTED)

    async def _decode_response(self, initial: str | None, challenge: str = "") -> bytes | None:
        """The client's base64 response: the initial one, or the answer to a 334 challenge."""
        if initial is None:
            response = await self.challenge_auth(challenge)
            return None if response is MISSING else response
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
        message = BytesParser(policy=email.policy.default).parsebytes(data)
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
