"""``GmailSandbox``, the public facade: starts and stops the SMTP server and the OAuth
endpoint, and lets a test add users, script faults, set quotas and wait for messages.

This module imports nothing from Django, so a sandbox can run in any plain Python process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

from .certs import CertificateFiles, ensure_certificates, server_ssl_context
from .listener import ServerThread, bind_socket
from .replies import DEFAULT_FAULT_REPLY, GMAIL_HOSTNAME, GMAIL_MAX_RECIPIENTS, GMAIL_SIZE_LIMIT
from .smtp import Security, ServerConfig
from .state import PHASES, Delivered, Fault, SandboxState, SandboxStats, SandboxUser
from .tokens import MAIL_SCOPE, OAuthAuthority, TokenServer

__all__ = ["GmailSandbox"]

logger = logging.getLogger(__name__)

_REPLY_RE = re.compile(r"^[2-5][0-9][0-9]( |$)")


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
        self._state = SandboxState(clock)
        self._state.on_delivery = on_delivery
        self._oauth = OAuthAuthority(users=self._state, on_request=self._count_token_request)
        self._state.token_user = self._oauth.access_token_user
        self._lifecycle = threading.Lock()
        self._smtp: ServerThread | None = None
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
            config = ServerConfig(
                security=self.security,
                offer_starttls=self.offer_starttls,
                tls_context=server_ssl_context(certs),
                **self._options,  # type: ignore[arg-type]
            )
            sock = bind_socket(host, port)
            server = ServerThread(config, self._state, sock)
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
