"""Transport: one verified TLS connection to Gmail, authenticated, sending envelopes.

:class:`Transport` is the interface the delivery pipeline (and the account services) talk to;
:class:`ConnectionPool` is the SMTP implementation behind it, the default ``TRANSPORT_CLASS``.
Another transport (the Gmail API, a subclass of the pool) is a class taking a
:class:`~django_gmail_smtp.conf.MailerSettings`, named in ``GMAIL_SMTP["TRANSPORT_CLASS"]`` or
a mailer's ``transport_class`` option.

Every failure leaves here as an exception from :mod:`django_gmail_smtp.exceptions`, already
classified; nothing else in the app looks at SMTP codes.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Protocol, TypeVar, runtime_checkable

from django.core.mail.utils import DNS_NAME
from django.views.decorators.debug import sensitive_variables

from .conf import MailerSettings, SettingsLike, as_settings
from .credentials import SMTPCredentials, credentials_for
from .exceptions import (
    AuthenticationError,
    ConnectionFailed,
    GmailSMTPError,
    InsecureConnectionError,
    InvalidAddress,
    MessageTooLarge,
    PermanentError,
    RecipientsRefused,
    SecurityMismatch,
    TemporaryError,
    classify_reply,
)
from .models import GmailAccount
from .routing import Envelope, account_key

logger = logging.getLogger(__name__)


@dataclass
class SendResult:
    """What Gmail said about one accepted message."""

    reply: str
    message_id: str = ""
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


#: what :meth:`GmailConnection.stream` yields for each envelope it sent (or tried to): Gmail's
#: acceptance, or the classified error of that message alone
StreamItem = tuple[Envelope, "SendResult | GmailSMTPError"]
#: what a stream calls when it is about to wait for Gmail's reply (see
#: :meth:`GmailConnection.stream`)
OnWait = Callable[[], None]
_Item = TypeVar("_Item")


@runtime_checkable
class Transport(Protocol):
    """What connects to Gmail and sends, for one mailer's settings.

    A transport class is called with a :class:`~django_gmail_smtp.conf.MailerSettings`; one
    instance serves one thread and may keep connections open between sends until
    :meth:`close`. Failures are raised as classified
    :class:`~django_gmail_smtp.exceptions.GmailSMTPError` subclasses (an error raised after
    Gmail may have kept the message has ``maybe_delivered = True``), configuration problems
    as :class:`~django_gmail_smtp.exceptions.GmailConfigurationError`.
    """

    def open(self, account: GmailAccount) -> None:
        """Connect and authenticate ``account`` (reusing an open session); raise if it fails."""

    def send(self, envelope: Envelope) -> SendResult:
        """Send one envelope from its account; return Gmail's acceptance."""

    def close(self) -> None:
        """Close every open session; never raises."""


@runtime_checkable
class StreamingTransport(Transport, Protocol):
    """A transport that can also send many envelopes of one account in one stream
    (:meth:`ConnectionPool.stream`); the pipeline falls back to :meth:`Transport.send` per
    message for a transport without it."""

    def stream(
        self, account: GmailAccount, envelopes: Iterable[Envelope]
    ) -> Generator[StreamItem, None, None]:
        """Send ``envelopes`` (all from ``account``) one after another, yielding each one's
        outcome in order; envelopes never yielded were not sent (the stream stopped early).

        A stream may also take an ``on_wait`` keyword (see :meth:`GmailConnection.stream`);
        the pipeline passes it only to a ``stream`` whose signature has it."""


def _nodelay(sock: socket.socket) -> None:
    # Nagle would hold a small write (the EHLO after the TLS handshake, a pipelined envelope)
    # until the previous one is acknowledged: a round trip for nothing.
    with suppress(OSError, AttributeError):  # not TCP: nothing to do
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _SMTP(smtplib.SMTP):
    """smtplib's client with TCP_NODELAY set on its socket."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        _nodelay(sock)
        return sock


class _SMTP_SSL(smtplib.SMTP_SSL):
    """smtplib's implicit-TLS client with TCP_NODELAY set before the TLS handshake."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = smtplib.SMTP._get_socket(self, host, port, timeout)  # type: ignore[attr-defined]
        _nodelay(sock)
        return self.context.wrap_socket(sock, server_hostname=self._host)  # type: ignore[attr-defined]


def ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A context that verifies the certificate and host name; ``ca_file`` adds trust anchors."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            from .exceptions import GmailConfigurationError

            raise GmailConfigurationError(
                f'GMAIL_SMTP["CA_FILE"] = {ca_file!r} cannot be loaded ({exc.__class__.__name__}: '
                f"{exc}). Give the path of a PEM file of CA certificates, or remove the setting "
                "to use the system's trust store."
            ) from None
    return context


def ehlo_hostname(options: SettingsLike = None) -> str:
    return str(as_settings(options).ehlo_hostname or DNS_NAME.get_fqdn())


class GmailConnection:
    """An authenticated SMTP session for one account. Not thread-safe; use one per thread.

    ``options``: the mailer's :class:`~django_gmail_smtp.conf.MailerSettings` (or a mapping of
    backend options); None: the GMAIL_SMTP settings.
    """

    def __init__(self, account: GmailAccount, options: SettingsLike = None) -> None:
        self.account = account
        self.settings: MailerSettings = as_settings(options)
        self.host, self.port, self.security = (
            self.settings.host,
            self.settings.port,
            self.settings.security,
        )
        self.timeout = self.settings.timeout
        self.ca_file = self.settings.ca_file
        self.local_hostname = ehlo_hostname(self.settings)
        self._smtp: smtplib.SMTP | None = None
        self._credentials: SMTPCredentials | None = None
        self.logins = 0

    def __repr__(self) -> str:
        state = "open" if self._smtp else "closed"
        return f"<GmailConnection {self.account.email} {self.host}:{self.port} {state}>"

    @property
    def is_open(self) -> bool:
        return self._smtp is not None

    # --- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, secure, and log in. Raises a classified :class:`GmailSMTPError`."""
        if self._smtp is not None:
            return
        context = ssl_context(self.ca_file)
        # Read (and if needed refresh) the credentials first: a key or token problem is
        # reported without opening a connection.
        credentials = self._credentials_for()
        with self._guard("connect"):
            if self.security == "ssl":
                smtp: smtplib.SMTP = _SMTP_SSL(
                    self.host,
                    self.port,
                    local_hostname=self.local_hostname,
                    timeout=self.timeout,
                    context=context,
                )
            else:
                smtp = _SMTP(
                    self.host, self.port, local_hostname=self.local_hostname, timeout=self.timeout
                )
        self._smtp = smtp
        try:
            with self._guard("ehlo"):
                self._ehlo()
            if self.security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise InsecureConnectionError(
                        f"{self.host}:{self.port} does not offer STARTTLS, so no credentials were "
                        "sent (they would have crossed the network in the clear)",
                        account=self.account.email,
                        phase="starttls",
                        hint="Check HOST and PORT: Gmail offers STARTTLS on 587 (SECURITY "
                        "'starttls') and implicit TLS on 465 (SECURITY 'ssl').",
                    )
                with self._guard("starttls"):
                    code, reply = smtp.starttls(context=context)
                    if code != 220:
                        raise classify_reply(
                            code, reply, phase="starttls", account=self.account.email
                        )
                    self._ehlo()
            self._authenticate(credentials)
        except BaseException:
            self._abort()
            raise

    @sensitive_variables("rejected")
    def _credentials_for(
        self, *, force_refresh: bool = False, rejected: str | None = None
    ) -> SMTPCredentials:
        # A token refresh waits for Google as long as this mailer waits for Gmail.
        return credentials_for(
            self.account,
            force_refresh=force_refresh,
            rejected_token=rejected,
            timeout=self.timeout,
            margin=self.settings.token_refresh_margin,
        )

    def close(self) -> None:
        """Say QUIT and close; never raises."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    def _abort(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            with suppress(OSError):
                smtp.close()

    def __enter__(self) -> GmailConnection:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- steps -------------------------------------------------------------------------------
    def _ehlo(self) -> None:
        assert self._smtp is not None
        code, reply = self._smtp.ehlo()
        if code != 250:
            raise classify_reply(code, reply, phase="ehlo", account=self.account.email)

    def _authenticate(self, credentials: SMTPCredentials) -> None:
        smtp = self._smtp
        assert smtp is not None
        if not smtp.has_extn("auth"):
            raise InsecureConnectionError(
                f"{self.host}:{self.port} does not offer SMTP AUTH, so the account cannot log in",
                account=self.account.email,
                phase="auth",
                hint="Check HOST/PORT: Gmail offers AUTH on 587 after STARTTLS and on 465.",
            )
        try:
            self._login(credentials)
        except AuthenticationError as exc:
            if credentials.mechanism != "XOAUTH2" or exc.smtp_code != 535:
                self.account.mark_health(exc.health, str(exc), exc)
                raise
            # The token may have been revoked or expired early: refresh once and retry once.
            logger.info("Gmail rejected the access token of %s; refreshing", self.account.email)
            credentials = self._credentials_for(force_refresh=True, rejected=credentials.secret)
            try:
                self._login(credentials)
            except AuthenticationError as exc2:
                self.account.mark_health(exc2.health, str(exc2), exc2)
                raise
        self._credentials = credentials
        self.logins += 1
        if self.account.health != GmailAccount.Health.OK:
            self.account.mark_health(GmailAccount.Health.OK)
        elif self.account.pk:
            # A login that works releases mail deferred for credentials or configuration.
            self.account.release_deferred()

    def _login(self, credentials: SMTPCredentials) -> None:
        smtp = self._smtp
        assert smtp is not None
        advertised = (smtp.esmtp_features.get("auth") or "").upper().split()
        user = _login_name(credentials.user)
        with self._guard("auth"):
            try:
                if credentials.mechanism == "XOAUTH2":
                    smtp.auth("XOAUTH2", _xoauth2(user, credentials.secret))
                else:
                    mechanism = "PLAIN" if "PLAIN" in advertised or not advertised else "LOGIN"
                    smtp.user, smtp.password = user, credentials.secret
                    try:
                        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
                        smtp.auth(mechanism, method, initial_response_ok=True)
                    finally:
                        smtp.password = ""
            except smtplib.SMTPAuthenticationError as exc:
                raise classify_reply(
                    exc.smtp_code, exc.smtp_error, phase="auth", account=self.account.email
                ) from None

    @property
    def token_expiring(self) -> bool:
        """True when the OAuth token this session logged in with is about to expire."""
        return bool(self._credentials and self._credentials.expires_within(60))

    # --- sending -----------------------------------------------------------------------------
    def send(self, envelope: Envelope) -> SendResult:
        """Send one envelope over the open session; raise a classified error on refusal.

        An error raised after the whole message, up to DATA's final ".", was written and before
        Gmail's reply could be read (a dropped connection, a timeout) has ``maybe_delivered =
        True``: Gmail may have kept the message, so its quota must stay counted. Every other
        error (anything before the final ".", or a refusal Gmail answered after it) has
        ``maybe_delivered = False``: Gmail did not keep it.
        """
        if self._smtp is None:
            self.open()
        smtp = self._smtp
        assert smtp is not None
        options = self._options(envelope)
        if smtp.has_extn("pipelining"):
            _code, reply, refused = self._send_pipelined(envelope, options)
        else:
            _code, reply, refused = self._send_stepwise(envelope, options)
        result = SendResult(
            reply=reply.decode("utf-8", "replace"),
            message_id=envelope.message_id,
            refused=refused,
        )
        if refused:
            logger.warning(
                "Gmail refused %d of %d recipients of %s",
                len(refused),
                len(envelope.recipients),
                envelope.message_id or "a message",
            )
        return result

    def _options(self, envelope: Envelope) -> list[str]:
        """MAIL FROM's parameters for ``envelope``; raise (before anything is written) for a
        message too large for the server or addresses it cannot carry."""
        smtp = self._smtp
        assert smtp is not None
        account = self.account.email
        size_limit = int(smtp.esmtp_features.get("size") or 0)
        if size_limit and len(envelope.data) > size_limit:
            raise MessageTooLarge(
                f"The message is {len(envelope.data):,} bytes; the server accepts at most "
                f"{size_limit:,}, so it was not uploaded",
                account=account,
                phase="size",
            )
        options = []
        if size_limit:
            options.append(f"SIZE={len(envelope.data)}")
        if smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if not all(a.isascii() for a in [envelope.mail_from, *envelope.recipients]):
            if not smtp.has_extn("smtputf8"):
                raise InvalidAddress(
                    "An address has non-ASCII characters and the server does not offer SMTPUTF8",
                    account=account,
                    phase="mail",
                )
            options.append("SMTPUTF8")
        return options

    @staticmethod
    def _envelope_commands(envelope: Envelope, options: list[str]) -> bytes:
        """MAIL, every RCPT and DATA, as one pipelined write (RFC 2920)."""
        option_text = (" " + " ".join(options)) if options else ""
        lines = [f"MAIL FROM:{smtplib.quoteaddr(envelope.mail_from)}{option_text}"]
        lines += [f"RCPT TO:{smtplib.quoteaddr(r)}" for r in envelope.recipients]
        lines.append("DATA")
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        return "".join(line + "\r\n" for line in lines).encode(encoding)

    @staticmethod
    def _body(envelope: Envelope) -> bytes:
        """The DATA payload, dot-stuffed, with its final "."."""
        body = re.sub(rb"(?m)^\.", b"..", envelope.data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        return body + b".\r\n"

    def _envelope_replies(self, envelope: Envelope) -> tuple[GmailSMTPError | None, dict]:
        """Read the replies to a pipelined MAIL/RCPT/DATA; return the error that refuses the
        message (None when DATA's 354 came) and the recipients refused while others passed."""
        smtp = self._smtp
        assert smtp is not None
        account = self.account.email
        replies: list[tuple[int, bytes]] = []
        phases = ["mail"] + ["rcpt"] * len(envelope.recipients) + ["data"]
        for phase in phases:
            with self._guard(phase):
                try:
                    replies.append(smtp.getreply())
                except smtplib.SMTPServerDisconnected:
                    if not any(code == 421 for code, _ in replies):
                        raise
                    break  # Gmail closes the connection after a 421: classified below
        (mail_code, mail_reply), rcpt_replies = replies[0], replies[1:-1]
        data_code, data_reply = replies[-1] if len(replies) == len(phases) else (421, b"")
        if mail_code != 250:
            if mail_code == 421:
                self._abort()
            return classify_reply(mail_code, mail_reply, phase="mail", account=account), {}
        refused = {
            recipient: (code, reply.decode("utf-8", "replace"))
            for recipient, (code, reply) in zip(envelope.recipients, rcpt_replies, strict=False)
            if code not in (250, 251)
        }
        if len(rcpt_replies) < len(envelope.recipients) or len(refused) == len(envelope.recipients):
            if len(replies) < len(phases) or any(code == 421 for code, _ in replies):
                self._abort()
            return self._all_refused(refused or {"": (data_code, data_reply.decode())}), refused
        if data_code != 354:
            if data_code == 421:
                self._abort()
            return classify_reply(data_code, data_reply, phase="data", account=account), refused
        return None, refused

    def stream(
        self, envelopes: Iterable[Envelope], *, on_wait: OnWait | None = None
    ) -> Generator[StreamItem, None, None]:
        """Send ``envelopes`` over this session one after another, yielding each one's outcome
        (its :class:`SendResult`, or the classified error of that message alone) in order.

        With PIPELINING (RFC 2920) each message costs one round trip: its body and final "."
        go in the same write as the next message's MAIL, RCPT and DATA, and the replies to
        both come back together. An envelope is taken from ``envelopes`` only once the previous
        one's DATA was answered 354, so the caller may produce them lazily.

        A refusal (at MAIL, at RCPT for every recipient, at DATA, or after the final ".")
        concerns that message alone and the stream goes on. A dropped connection or a 421 ends
        the stream: the message whose body was written but not answered is yielded with
        ``maybe_delivered = True``; the one whose envelope only was written, and those never
        taken, are not yielded (nothing of them was delivered). Raises only when the session
        cannot be opened (or when ``on_wait`` raises: that ends the stream).

        ``on_wait``: called after each write, right before the stream waits for Gmail's
        replies to it, so the caller can do its bookkeeping (record the outcomes already
        yielded) while Gmail works instead of between the replies and the next write. Every
        outcome yielded before a message's body is written is followed by a call before the
        stream reads that body's reply (without PIPELINING: before the next message is sent).
        """
        if self._smtp is None:
            self.open()
        smtp = self._smtp
        assert smtp is not None
        if not smtp.has_extn("pipelining"):
            for envelope in envelopes:
                if on_wait is not None:
                    on_wait()  # one command at a time: nothing overlaps, record before sending
                try:
                    yield envelope, self.send(envelope)
                except GmailSMTPError as exc:
                    yield envelope, exc
                    if self._smtp is None:
                        return  # the connection is gone: the rest are untouched
            return
        source = iter(envelopes)
        current = next(source, None)
        previous: Envelope | None = None  # its 354 came: its body goes with the next write
        previous_refused: dict[str, tuple[int, str]] = {}
        rset = False
        completed = False
        try:
            while current is not None or previous is not None:
                write = self._body(previous) if previous is not None else b""
                error: GmailSMTPError | None = None
                if current is not None:
                    try:
                        options = self._options(current)
                    except GmailSMTPError as exc:
                        error = exc  # refused before anything of it is written
                    else:
                        write += (b"RSET\r\n" if rset else b"") + self._envelope_commands(
                            current, options
                        )
                try:
                    with self._guard("after_data" if previous is not None else "mail"):
                        smtp.send(write)
                except GmailSMTPError as exc:
                    if previous is not None:
                        exc.maybe_delivered = True  # the final "." may have gone out
                        yield previous, exc
                    elif current is not None:
                        yield current, exc  # nothing of it reached Gmail: a plain retry
                    return
                if on_wait is not None:
                    # Gmail works on what was just written: the caller's turn. Called even when
                    # the reply is already there (a fast server): skipping it would let the
                    # caller's unrecorded outcomes pile up for the whole stream.
                    on_wait()
                if previous is not None:
                    try:
                        with self._guard("after_data"):
                            code, reply = smtp.getreply()
                    except GmailSMTPError as exc:
                        # No reply to the final ".": Gmail may have kept it.
                        exc.maybe_delivered = True
                        yield previous, exc
                        return
                    if code == 250:
                        yield previous, self._result(previous, reply, previous_refused)
                    else:  # a definite refusal: Gmail did not keep the message
                        if code == 421:
                            self._abort()
                        yield (
                            previous,
                            classify_reply(
                                code, reply, phase="after_data", account=self.account.email
                            ),
                        )
                        if self._smtp is None:
                            return
                    previous, previous_refused = None, {}
                if current is None:
                    break
                if error is not None:
                    yield current, error
                    current = next(source, None)
                    continue
                try:
                    if rset:
                        with self._guard("mail"):
                            smtp.getreply()  # RSET's 250
                    error, refused = self._envelope_replies(current)
                except GmailSMTPError as exc:
                    yield current, exc  # dropped before its body: nothing of it was delivered
                    return
                if error is not None:
                    rset = True  # the server may still hold part of the transaction
                    yield current, error
                    if self._smtp is None:
                        return
                else:
                    rset = False
                    previous, previous_refused = current, refused
                current = next(source, None)
            if rset:
                if on_wait is not None:
                    on_wait()
                with self._guard("mail"):
                    smtp.rset()  # leave the session clean for the next send
            completed = True
        finally:
            if not completed and self._smtp is not None:
                # Stopped mid-transaction (the caller gave up on the stream): the session's
                # state is unknown, so it is not reused.
                self._abort()

    def _result(
        self, envelope: Envelope, reply: bytes, refused: dict[str, tuple[int, str]]
    ) -> SendResult:
        if refused:
            logger.warning(
                "Gmail refused %d of %d recipients of %s",
                len(refused),
                len(envelope.recipients),
                envelope.message_id or "a message",
            )
        return SendResult(
            reply=reply.decode("utf-8", "replace"),
            message_id=envelope.message_id,
            refused=refused,
        )

    def _send_pipelined(
        self, envelope: Envelope, options: list[str]
    ) -> tuple[int, bytes, dict[str, tuple[int, str]]]:
        """MAIL, every RCPT and DATA in one write (RFC 2920), then the body: two round trips
        per message instead of three plus one per recipient."""
        smtp = self._smtp
        assert smtp is not None
        account = self.account.email
        option_text = (" " + " ".join(options)) if options else ""
        lines = [f"MAIL FROM:{smtplib.quoteaddr(envelope.mail_from)}{option_text}"]
        lines += [f"RCPT TO:{smtplib.quoteaddr(r)}" for r in envelope.recipients]
        lines.append("DATA")
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        replies: list[tuple[int, bytes]] = []
        phases = ["mail"] + ["rcpt"] * len(envelope.recipients) + ["data"]
        with self._guard("mail"):
            smtp.send("".join(line + "\r\n" for line in lines).encode(encoding))
        for phase in phases:
            with self._guard(phase):
                try:
                    replies.append(smtp.getreply())
                except smtplib.SMTPServerDisconnected:
                    if not any(code == 421 for code, _ in replies):
                        raise
                    break  # Gmail closes the connection after a 421: classified below
        (mail_code, mail_reply), rcpt_replies = replies[0], replies[1:-1]
        data_code, data_reply = replies[-1] if len(replies) == len(phases) else (421, b"")
        if mail_code != 250:
            self._reset()
            raise classify_reply(mail_code, mail_reply, phase="mail", account=account)
        refused = {
            recipient: (code, reply.decode("utf-8", "replace"))
            for recipient, (code, reply) in zip(envelope.recipients, rcpt_replies, strict=False)
            if code not in (250, 251)
        }
        if len(rcpt_replies) < len(envelope.recipients) or len(refused) == len(envelope.recipients):
            self._reset()
            raise self._all_refused(refused or {"": (data_code, data_reply.decode())})
        if data_code != 354:
            self._reset()
            raise classify_reply(data_code, data_reply, phase="data", account=account)
        code, reply = self._send_body(envelope)
        return code, reply, refused

    def _send_stepwise(
        self, envelope: Envelope, options: list[str]
    ) -> tuple[int, bytes, dict[str, tuple[int, str]]]:
        """One command, one reply: for servers that do not offer PIPELINING."""
        smtp = self._smtp
        assert smtp is not None
        account = self.account.email
        with self._guard("mail"):
            code, reply = smtp.mail(envelope.mail_from, options)
            if code != 250:
                self._reset()
                raise classify_reply(code, reply, phase="mail", account=account)
        refused: dict[str, tuple[int, str]] = {}
        with self._guard("rcpt"):
            for recipient in envelope.recipients:
                code, reply = smtp.rcpt(recipient)
                if code not in (250, 251):
                    refused[recipient] = (code, reply.decode("utf-8", "replace"))
                    if code == 421:
                        break
        if len(refused) == len(envelope.recipients) or any(c == 421 for c, _ in refused.values()):
            self._reset()
            raise self._all_refused(refused)
        with self._guard("data"):
            code, reply = smtp.docmd("data")
            if code != 354:
                self._reset()
                raise classify_reply(code, reply, phase="data", account=account)
        code, reply = self._send_body(envelope)
        return code, reply, refused

    def _send_body(self, envelope: Envelope) -> tuple[int, bytes]:
        """Upload the message and its final "." (after DATA's 354), then read Gmail's reply.

        Once the final "." is written Gmail may keep the message even if its reply never
        arrives, so an error without a reply is marked ``maybe_delivered`` (see :meth:`send`).
        """
        smtp = self._smtp
        assert smtp is not None
        body = re.sub(rb"(?m)^\.", b"..", envelope.data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        with self._guard("after_data"):
            smtp.send(body + b".\r\n")
        try:
            with self._guard("after_data"):
                code, reply = smtp.getreply()
        except GmailSMTPError as exc:
            exc.maybe_delivered = True  # no reply to the final ".": Gmail may have kept it
            raise
        if code != 250:  # a definite refusal: Gmail did not keep the message
            self._reset()
            raise classify_reply(code, reply, phase="after_data", account=self.account.email)
        return code, reply

    def _all_refused(self, refused: dict[str, tuple[int, str]]) -> GmailSMTPError:
        code, reply = next(iter(refused.values()))
        first = classify_reply(code, reply, phase="rcpt", account=self.account.email)
        if isinstance(first, InvalidAddress) or type(first) is PermanentError:
            listed = ", ".join(f"{r} ({c})" for r, (c, _t) in refused.items())
            return RecipientsRefused(
                f"Gmail refused every recipient: {listed}",
                code=code,
                reply=reply,
                account=self.account.email,
                phase="rcpt",
                recipients=refused,
            )
        first.recipients = refused
        return first

    def _reset(self) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._abort()

    def noop(self) -> bool:
        """True if the session still answers (used before reusing a pooled connection)."""
        if self._smtp is None:
            return False
        try:
            return self._smtp.noop()[0] == 250
        except (smtplib.SMTPException, OSError):
            self._abort()
            return False

    @contextmanager
    def _guard(self, phase: str) -> Iterator[None]:
        """Turn socket, TLS and smtplib errors into classified errors; drop a dead session."""
        account = self.account.email
        try:
            yield
        except GmailSMTPError as exc:
            if exc.smtp_code == 421 or isinstance(exc, ConnectionFailed):
                self._abort()
            raise
        except ssl.SSLCertVerificationError as exc:
            self._abort()
            raise InsecureConnectionError(
                f"The certificate of {self.host}:{self.port} could not be verified "
                f"({exc.verify_message}), so no credentials were sent",
                account=account,
                phase=phase,
            ) from None
        except ssl.SSLError as exc:
            self._abort()
            if phase == "connect" and self.security == "ssl" and exc.reason in _PLAINTEXT_REPLY:
                raise SecurityMismatch(
                    f"SECURITY is 'ssl' but {self.host}:{self.port} answered without TLS: port "
                    "587 uses 'starttls', 465 uses 'ssl'. Set GMAIL_SMTP[\"SECURITY\"] to "
                    "'starttls' for this port, or PORT to 465. No credentials were sent."
                ) from None
            raise InsecureConnectionError(
                f"TLS with {self.host}:{self.port} failed ({exc.reason or exc}), so no "
                "credentials were sent",
                account=account,
                phase=phase,
            ) from None
        except smtplib.SMTPServerDisconnected as exc:
            self._abort()
            if "timed out" in str(exc):  # smtplib reports a read timeout this way
                raise self._timed_out(phase) from None
            raise ConnectionFailed(
                f"{self.host}:{self.port} closed the connection {_during(phase)}",
                account=account,
                phase=phase,
            ) from None
        except smtplib.SMTPConnectError as exc:
            self._abort()
            raise classify_reply(
                exc.smtp_code, exc.smtp_error, phase=phase, account=account
            ) from None
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code == 421:
                self._abort()
            raise classify_reply(
                exc.smtp_code, exc.smtp_error, phase=phase, account=account
            ) from None
        except UnicodeError:
            # e.g. a non-ASCII login or password: smtplib cannot encode it. The original
            # error would carry the credentials, so it is not chained.
            self._abort()
            raise InvalidAddress(
                f"Something sent during {phase} has characters SMTP cannot carry (a non-ASCII "
                "login, password or address)",
                account=account,
                phase=phase,
                hint="Use the account's ASCII address as its login, and an App Password (ASCII).",
            ) from None
        except TimeoutError:
            self._abort()
            raise self._timed_out(phase) from None
        except OSError as exc:
            self._abort()
            raise ConnectionFailed(
                f"Could not talk to {self.host}:{self.port} {_during(phase)} "
                f"({exc.__class__.__name__}: {exc.strerror or exc})",
                account=account,
                phase=phase,
            ) from None

    def _timed_out(self, phase: str) -> ConnectionFailed:
        hint = None
        if phase == "connect" and self.security == "starttls":
            # A server that speaks implicit TLS (465) waits, silent, for the TLS handshake.
            hint = (
                f"{ConnectionFailed.hint} If {self.host}:{self.port} speaks implicit TLS (like "
                "Gmail's 465), set SECURITY to 'ssl'."
            )
        return ConnectionFailed(
            f"{self.host}:{self.port} did not answer within {self.timeout:g} s {_during(phase)}",
            account=self.account.email,
            phase=phase,
            hint=hint,
        )


#: ssl error reasons for a server that answered in plain text (an SMTP greeting) to TLS
_PLAINTEXT_REPLY = frozenset(
    {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"}
)


def _during(phase: str) -> str:
    return "while connecting" if phase == "connect" else f"during {phase}"


class ConnectionPool:
    """The SMTP :class:`Transport`: authenticated connections kept open per account between
    sends, for one thread.

    A Celery worker process keeps one pool per mailer's settings, so a burst of N messages from
    one account costs one TLS handshake and one login, not N (and avoids Gmail's 454 "too many
    login attempts"). A pooled connection is reopened before its OAuth token expires, after a
    421 or a dropped connection, and when a NOOP shows an idle one has died.

    ``options``: the mailer's :class:`~django_gmail_smtp.conf.MailerSettings` (or a mapping
    of backend options); None: the GMAIL_SMTP settings. Subclasses may override
    :attr:`connection_class`.
    """

    connection_class: type[GmailConnection] = GmailConnection

    def __init__(self, options: SettingsLike = None) -> None:
        self.settings: MailerSettings = as_settings(options)
        self.idle_check = self.settings.pool_idle_check
        self._connections: dict[Any, GmailConnection] = {}
        self._last_used: dict[Any, float] = {}
        self.logins = 0

    @property
    def options(self) -> MailerSettings:
        """The settings this pool connects with (the name it had when it took a mapping)."""
        return self.settings

    def __repr__(self) -> str:
        return (
            f"<ConnectionPool {self.settings.host}:{self.settings.port} "
            f"{len(self._connections)} connection(s)>"
        )

    def open(self, account: GmailAccount) -> None:
        """Connect and log in ``account`` now (or check its pooled session still answers)."""
        self.connection(account)

    def connection(self, account: GmailAccount) -> GmailConnection:
        """An open, authenticated connection for ``account`` (reused when still good)."""
        key = account_key(account)
        connection = self._connections.get(key)
        if connection is not None:
            idle = time.monotonic() - self._last_used.get(key, 0.0)
            if connection.token_expiring or (
                connection.is_open and idle > self.idle_check and not connection.noop()
            ):
                connection.close()
            connection.account = account
        else:
            connection = self._connections[key] = self.connection_class(account, self.settings)
        if not connection.is_open:
            connection.open()
            self.logins += 1
        return connection

    def send(self, envelope: Envelope) -> SendResult:
        """Send over the account's pooled connection, opening one if needed.

        A reused connection that Gmail closed meanwhile (a drop or a 421 before DATA: nothing
        was sent) is replaced by a fresh one, once.
        """
        key = account_key(envelope.account)
        reused = key in self._connections and self._connections[key].is_open
        connection = self.connection(envelope.account)
        try:
            return connection.send(envelope)
        except (ConnectionFailed, TemporaryError) as exc:
            stale = isinstance(exc, ConnectionFailed) or exc.smtp_code == 421
            if not (reused and stale and exc.phase in ("mail", "rcpt")):
                raise
            connection.close()
            return self.connection(envelope.account).send(envelope)
        finally:
            self._last_used[key] = time.monotonic()

    def stream(
        self,
        account: GmailAccount,
        envelopes: Iterable[Envelope],
        *,
        on_wait: OnWait | None = None,
    ) -> Generator[StreamItem, None, None]:
        """Stream ``envelopes`` (all from ``account``) over its pooled connection (see
        :meth:`GmailConnection.stream`, which calls ``on_wait`` before it waits for a reply).
        A reused connection that Gmail closed meanwhile (the first message dropped or answered
        421 before DATA: nothing was sent) is replaced by a fresh one, once. Raises only when
        no connection can be opened."""
        key = account_key(account)
        reused = key in self._connections and self._connections[key].is_open
        connection = self.connection(account)
        source = iter(envelopes)
        try:
            first = True
            inner = connection.stream(source, on_wait=on_wait)
            for envelope, outcome in closing_iterator(inner):
                stale = isinstance(outcome, ConnectionFailed) or (
                    isinstance(outcome, TemporaryError) and outcome.smtp_code == 421
                )
                if (
                    first
                    and reused
                    and stale
                    and isinstance(outcome, GmailSMTPError)
                    and outcome.phase in ("mail", "rcpt")
                ):
                    inner.close()
                    connection.close()
                    connection = self.connection(account)
                    again_stream = connection.stream(chain([envelope], source), on_wait=on_wait)
                    with closing(again_stream) as again:
                        yield from again
                    return
                first = False
                self._last_used[key] = time.monotonic()
                yield envelope, outcome
        finally:
            self._last_used[key] = time.monotonic()

    def close_address(self, address: str) -> None:
        """QUIT the connection of the account ``address`` (if open); never raises."""
        address = address.strip().lower()
        for key, connection in list(self._connections.items()):
            if connection.account.email.strip().lower() == address:
                del self._connections[key]
                connection.close()

    def close(self) -> None:
        """QUIT every connection; never raises."""
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            connection.close()


def closing_iterator(generator: Generator[_Item, None, None]) -> Iterator[_Item]:
    """Iterate ``generator`` and close it when the iteration stops early (so a stream the
    caller gave up on cleans up its session at once, not when garbage collected)."""
    with closing(generator):
        yield from generator


def _login_name(address: str) -> str:
    """The login as SMTP AUTH can carry it: an internationalised domain in its IDNA form."""
    local, _, domain = address.rpartition("@")
    if domain and not domain.isascii():
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    return address


def _xoauth2(user: str, token: str) -> Any:
    """The smtplib auth object for XOAUTH2: the initial response, then an empty line on 334."""
    initial = f"user={user}\x01auth=Bearer {token}\x01\x01"

    def respond(challenge: bytes | None = None) -> str:
        # Gmail answers a bad token with 334 <base64 JSON>; the client must send an empty line.
        return initial if challenge is None else ""

    return respond


def make_transport(settings: MailerSettings) -> Transport:
    """A new transport of the mailer's ``transport_class``, for ``settings``."""
    transport = settings.transport()(settings)
    if not isinstance(transport, Transport):
        from .exceptions import GmailConfigurationError

        raise GmailConfigurationError(
            f"The transport_class {settings.transport_class!r} ({settings.source}) does not "
            "have the methods of django_gmail_smtp.transport.Transport (open, send, close)."
        )
    return transport


__all__ = [
    "ConnectionPool",
    "GmailConnection",
    "OnWait",
    "SendResult",
    "StreamItem",
    "StreamingTransport",
    "Transport",
    "make_transport",
    "ssl_context",
]
