"""The sandbox's shared state: the accounts it knows, their rolling 24-hour quota, scripted
faults, accepted messages and counters, behind one lock.

The SMTP sessions (on the server's event loop thread), the OAuth endpoint (its HTTP threads)
and the test thread all read and write the same :class:`SandboxState`.
"""

from __future__ import annotations

import collections
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Literal, NamedTuple

from .replies import DEFAULT_FAULT_REPLY, Replies

__all__ = [
    "PHASES",
    "QUOTA_WINDOW",
    "AuthOutcome",
    "Delivered",
    "Fault",
    "SandboxState",
    "SandboxStats",
    "SandboxUser",
]

logger = logging.getLogger(__name__)

#: Gmail's sending limits are counted over a rolling 24 hours
QUOTA_WINDOW = 24 * 60 * 60
#: where a scripted :class:`Fault` can fire, in the order of an SMTP session
PHASES = frozenset({"connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "after_data"})


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


class AuthOutcome(NamedTuple):
    user: str | None
    reply: str


class SandboxState:
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

    def check_password(self, login: str, password: str) -> AuthOutcome:
        account = self.user(login)
        if account is None:
            return AuthOutcome(None, Replies.BAD_CREDENTIALS)
        secret = password.encode("utf-8")
        app_ok = account.app_password is not None and hmac.compare_digest(
            account.app_password.encode("utf-8"), secret
        )
        account_ok = account.account_password is not None and hmac.compare_digest(
            account.account_password.encode("utf-8"), secret
        )
        if not (app_ok or account_ok):
            return AuthOutcome(None, Replies.BAD_CREDENTIALS)
        if account.web_login_required:
            return AuthOutcome(None, Replies.WEB_LOGIN_REQUIRED)
        if not app_ok and account.require_app_password:
            return AuthOutcome(None, Replies.APP_PASSWORD_REQUIRED)
        return AuthOutcome(account.email, Replies.AUTH_ACCEPTED)

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
