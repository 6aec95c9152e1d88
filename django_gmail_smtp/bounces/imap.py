"""One account's inbox over IMAP: log in as the account does for SMTP, list new reports by UID.

Gmail's IMAP server (``imap.gmail.com:993``, implicit TLS) takes the same credentials as its
SMTP server: an App Password (``LOGIN``) or the account's OAuth access token (SASL
``XOAUTH2``; the scope ``https://mail.google.com/`` covers IMAP). The certificate is verified
as for SMTP, with ``GMAIL_SMTP["CA_FILE"]`` added to the trust store when set.

Python's :mod:`imaplib` does all of it; the few commands needed (``UID SEARCH``, ``UID FETCH``
with ``BODY.PEEK[]`` so nothing is marked read, ``UID COPY``/``UID MOVE``) do not call for a
dependency.
"""

from __future__ import annotations

import imaplib
import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from django.views.decorators.debug import sensitive_variables

from ..conf import get_setting
from ..credentials import SMTPCredentials, credentials_for
from ..enums import Health
from ..exceptions import (
    AuthenticationError,
    GmailConfigurationError,
    GmailSMTPError,
)
from ..models import GmailAccount
from ..transport import ssl_context

logger = logging.getLogger(__name__)

__all__ = [
    "IMAPError",
    "IMAPLoginRefused",
    "IMAPUnavailable",
    "Inbox",
    "MailboxState",
]

#: UIDs fetched per ``UID FETCH`` (each report is a few kilobytes)
FETCH_BATCH = 25

# Reports come from the delivery subsystem of Gmail (mailer-daemon@googlemail.com) or of the
# receiving server (MAILER-DAEMON@..., postmaster@...), or carry the headers of one.
_SENDER_SEARCH = "OR FROM mailer-daemon FROM postmaster"
_REPORT_SEARCH = (
    f'OR OR {_SENDER_SEARCH} HEADER X-Failed-Recipients "" HEADER Content-Type delivery-status'
)


class IMAPError(Exception):
    """The inbox could not be read. ``detail`` says what happened and what to do;
    ``health`` is the IMAP login's health it shows (None: unchanged, e.g. a network error)."""

    health: Health | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class IMAPLoginRefused(IMAPError):
    """The IMAP server refused the account's credentials."""

    health = Health.CREDENTIALS_REJECTED

    def __init__(self, detail: str, health: Health = Health.CREDENTIALS_REJECTED) -> None:
        super().__init__(detail)
        self.health = health


class IMAPUnavailable(IMAPError):
    """The server could not be reached, the TLS handshake failed, or it answered oddly."""


@dataclass(frozen=True)
class MailboxState:
    """What ``SELECT`` said about a mailbox."""

    uid_validity: int | None
    uid_next: int | None


class Inbox:
    """An authenticated IMAP session on one account (a context manager).

    ``host``/``port``/``timeout``/``ca_file`` default to ``IMAP_HOST``, ``IMAP_PORT``,
    ``TIMEOUT`` and ``CA_FILE``.
    """

    def __init__(
        self,
        account: GmailAccount,
        *,
        host: str | None = None,
        port: int | None = None,
        timeout: float | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.account = account
        self.host = host or str(get_setting("IMAP_HOST"))
        self.port = int(port or get_setting("IMAP_PORT"))
        self.timeout = float(timeout or get_setting("TIMEOUT"))
        self.ca_file = ca_file if ca_file is not None else (get_setting("CA_FILE") or None)
        self._imap: imaplib.IMAP4_SSL | None = None
        self.capabilities: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        state = "open" if self._imap else "closed"
        return f"<Inbox {self.account.email} {self.host}:{self.port} {state}>"

    def __enter__(self) -> Inbox:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- connecting ----------------------------------------------------------------------------
    def open(self) -> None:
        """Connect over verified TLS and log in; raises :class:`IMAPError`."""
        if self._imap is not None:
            return
        try:
            context = ssl_context(self.ca_file)
        except GmailConfigurationError as exc:  # an unreadable CA_FILE
            raise IMAPError(str(exc)) from None
        credentials = self._credentials()
        try:
            self._imap = imaplib.IMAP4_SSL(
                self.host, self.port, ssl_context=context, timeout=self.timeout
            )
        except ssl.SSLCertVerificationError as exc:
            raise IMAPUnavailable(
                f"The certificate of {self.host}:{self.port} could not be verified "
                f"({exc.verify_message}), so the bounce reader did not log in. Check "
                'IMAP_HOST and, for a local server, GMAIL_SMTP["CA_FILE"].'
            ) from None
        except (OSError, imaplib.IMAP4.error) as exc:
            raise self._unavailable("connect", exc) from None
        try:
            self._login(credentials)
            # What the server offers once logged in (MOVE, UIDPLUS): ask again.
            self.capabilities = frozenset(
                _text(self._command("CAPABILITY", self._imap.capability)).upper().split()
            )
        except BaseException:
            self._abort()
            raise

    @sensitive_variables("credentials")
    def _credentials(self, **kwargs: Any) -> SMTPCredentials:
        try:
            return credentials_for(self.account, timeout=self.timeout, **kwargs)
        except AuthenticationError as exc:
            # A dead refresh token (recorded on the account too: it stops SMTP as well).
            health = Health(exc.health) if exc.health else Health.CREDENTIALS_REJECTED
            raise IMAPLoginRefused(_explain(exc), health) from None
        except GmailSMTPError as exc:  # the token endpoint could not be reached
            raise IMAPUnavailable(_explain(exc)) from None
        except GmailConfigurationError as exc:
            raise IMAPError(str(exc)) from None

    @sensitive_variables("credentials")
    def _login(self, credentials: SMTPCredentials) -> None:
        try:
            self._authenticate(credentials)
        except IMAPLoginRefused:
            if credentials.mechanism != "XOAUTH2":
                raise
            # The token may have been revoked or expired early: refresh once, try once more.
            logger.info("IMAP refused the access token of %s; refreshing", self.account.email)
            fresh = self._credentials(force_refresh=True, rejected_token=credentials.secret)
            self._authenticate(fresh)

    @sensitive_variables("credentials")
    def _authenticate(self, credentials: SMTPCredentials) -> None:
        imap = self._imap
        assert imap is not None
        try:
            if credentials.mechanism == "XOAUTH2":
                imap.authenticate("XOAUTH2", _xoauth2(credentials.user, credentials.secret))
            else:
                imap.login(credentials.user, credentials.secret)
        except imaplib.IMAP4.abort as exc:
            raise self._unavailable("login", exc) from None
        except imaplib.IMAP4.error as exc:
            raise IMAPLoginRefused(self._refused_text(credentials, exc)) from None
        except OSError as exc:
            raise self._unavailable("login", exc) from None

    def _refused_text(self, credentials: SMTPCredentials, exc: Exception) -> str:
        reply = " ".join(_text(list(exc.args)).split()) or "no reason given"
        if credentials.mechanism == "XOAUTH2":
            what = (
                "Reconnect the account with Google (its token must carry the scope "
                "https://mail.google.com/); on Google Workspace, check that an administrator "
                "has not turned IMAP off for this user."
            )
        else:
            what = (
                "Check the account's App Password (Verify in the admin tests the same one over "
                "SMTP); on Google Workspace, check that an administrator has not turned IMAP "
                "off for this user."
            )
        return (
            f"The IMAP server {self.host}:{self.port} refused the login of "
            f"{self.account.email}, so its bounces cannot be read (sending is not affected). "
            f'It replied: "{reply}". What to do: {what}'
        )

    def _unavailable(self, phase: str, exc: BaseException) -> IMAPUnavailable:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, (socket.timeout, TimeoutError)):
            reason = f"no answer within {self.timeout:g} s"
        return IMAPUnavailable(
            f"Could not read the inbox of {self.account.email} at {self.host}:{self.port} "
            f"({phase}: {reason}). It is tried again at the next run; check IMAP_HOST and "
            "IMAP_PORT if it keeps failing."
        )

    def close(self) -> None:
        """Log out and close; never raises."""
        imap, self._imap = self._imap, None
        if imap is None:
            return
        try:
            imap.logout()
        except (OSError, imaplib.IMAP4.error):
            with suppress(OSError, imaplib.IMAP4.error):
                imap.shutdown()

    def _abort(self) -> None:
        imap, self._imap = self._imap, None
        if imap is not None:
            with suppress(OSError, imaplib.IMAP4.error):
                imap.shutdown()

    # --- reading -------------------------------------------------------------------------------
    def _command(self, name: str, method: Callable[..., tuple[str, list[Any]]], *args: Any):
        """Run an imaplib command; an error answer or a broken connection is IMAPUnavailable."""
        try:
            typ, data = method(*args)
        except (OSError, imaplib.IMAP4.error) as exc:
            raise self._unavailable(name, exc) from None
        if typ != "OK":
            raise self._unavailable(name, imaplib.IMAP4.error(_text(data)))
        return data

    def select(self, mailbox: str = "INBOX", *, readonly: bool = True) -> MailboxState:
        """Open ``mailbox`` (read-only unless reports are to be labelled or moved)."""
        imap = self._require()
        self._command("SELECT", imap.select, _quoted(mailbox), readonly)
        return MailboxState(
            uid_validity=_number(imap.response("UIDVALIDITY")[1]),
            uid_next=_number(imap.response("UIDNEXT")[1]),
        )

    def report_uids(self, after: int) -> list[int]:
        """UIDs above ``after`` of messages that look like delivery reports, ascending."""
        imap = self._require()
        try:
            return self.search_uids(after, _REPORT_SEARCH)
        except IMAPUnavailable:
            if self._imap is None or imap.state != "SELECTED":
                raise
            # A server that does not search by header: the reports' senders alone.
            return self.search_uids(after, _SENDER_SEARCH)

    def search_uids(self, after: int, criteria: str) -> list[int]:
        """UIDs above ``after`` of messages matching the IMAP SEARCH ``criteria`` (such as
        ``SUBJECT "unsubscribe"``), ascending."""
        imap = self._require()
        data = self._command("UID SEARCH", imap.uid, "SEARCH", f"UID {after + 1}:*", criteria)
        uids = sorted({int(n) for n in _text(data).split() if n.isdigit()})
        # "n:*" always matches the last message, even when its UID is below n.
        return [uid for uid in uids if uid > after]

    def fetch(self, uids: list[int]) -> Iterator[tuple[int, bytes]]:
        """``(uid, raw message)`` for each of ``uids`` still there, without marking it read."""
        imap = self._require()
        for start in range(0, len(uids), FETCH_BATCH):
            batch = uids[start : start + FETCH_BATCH]
            data = self._command(
                "UID FETCH", imap.uid, "FETCH", ",".join(map(str, batch)), "(UID BODY.PEEK[])"
            )
            for item in data:
                if not isinstance(item, tuple) or len(item) < 2:
                    continue
                match = re.search(rb"UID (\d+)", item[0])
                if match:
                    yield int(match.group(1)), item[1]

    def file(self, uids: list[int], action: str, label: str) -> None:
        """Label (``"label"``: copy to the label's folder, which is how Gmail's IMAP adds a
        label) or move (``"move"``) the messages ``uids`` of the selected mailbox."""
        if not uids:
            return
        imap = self._require()
        target = _quoted(label)
        try:
            imap.create(target)  # "already exists" is an error answer, and harmless
        except (OSError, imaplib.IMAP4.error) as exc:
            raise self._unavailable("CREATE", exc) from None
        numbers = ",".join(map(str, uids))
        if action == "move" and "MOVE" in self.capabilities:
            self._command("UID MOVE", imap.uid, "MOVE", numbers, target)
            return
        self._command("UID COPY", imap.uid, "COPY", numbers, target)
        if action == "move":
            if "UIDPLUS" not in self.capabilities:
                # A plain EXPUNGE would also remove whatever else the owner marked deleted.
                logger.warning(
                    "%s:%s offers neither MOVE nor UIDPLUS: reports of %s were copied to %r "
                    "and left in the inbox",
                    self.host,
                    self.port,
                    self.account.email,
                    label,
                )
                return
            self._command("UID STORE", imap.uid, "STORE", numbers, "+FLAGS.SILENT", r"(\Deleted)")
            self._command("UID EXPUNGE", imap.uid, "EXPUNGE", numbers)

    def _require(self) -> imaplib.IMAP4_SSL:
        if self._imap is None:
            raise IMAPUnavailable(f"The IMAP session of {self.account.email} is not open.")
        return self._imap


# --- helpers --------------------------------------------------------------------------------


def _xoauth2(user: str, token: str) -> Callable[[bytes], bytes]:
    """imaplib's auth object for XOAUTH2: the token, then an empty line if it is refused
    (the server then sends a base64 JSON error as a challenge and waits for one)."""
    answers = iter([f"user={user}\x01auth=Bearer {token}\x01\x01".encode()])

    def respond(challenge: bytes) -> bytes:
        return next(answers, b"")

    return respond


def _explain(exc: BaseException) -> str:
    from ..services import explain

    return explain(exc)


def _quoted(name: str) -> str:
    """A mailbox name as an IMAP quoted string (imaplib sends arguments as they are)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number(values: list[Any] | None) -> int | None:
    for value in values or []:
        text = value.decode() if isinstance(value, bytes) else str(value)
        if text.strip().isdigit():
            return int(text.strip())
    return None


def _text(data: list[Any]) -> str:
    return " ".join(
        (d.decode("utf-8", "replace") if isinstance(d, bytes) else str(d))
        for d in data or []
        if d is not None and not isinstance(d, tuple)
    )
