"""Account operations: what the admin and ``manage.py gmail_smtp`` do to a sender account.

Verify, send a test message, refresh the OAuth token, pause and resume, connect with Google
(with the pending-state bookkeeping a browser session needs), rotate the encryption keys, and
the one definition of "which accounts may send". The admin and the command only parse input
and render the :class:`Result` these return; nothing here knows about requests or terminals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.db import router as db_router
from django.db.models import QuerySet
from django.utils.crypto import constant_time_compare

from .conf import format_time
from .enums import Health
from .exceptions import GmailSMTPError
from .models import GmailAccount, normalize_address
from .routing import forget_accounts

if TYPE_CHECKING:
    from .credentials import Authorization

logger = logging.getLogger(__name__)

#: Errors an operation reports as a failed :class:`Result` instead of raising.
OPERATION_ERRORS = (GmailSMTPError, ImproperlyConfigured)

#: The session key under which a browser's pending Connect with Google flows are kept.
SESSION_KEY = "gmail_smtp_oauth"
#: Seconds a started Connect with Google waits for Google's answer.
PENDING_CONNECT_LIFETIME = 600
#: Connections one browser session may have pending at once (several tabs).
MAX_PENDING_CONNECTS = 5


@dataclass(frozen=True)
class Result:
    """The outcome of an account operation, in plain words.

    ``text`` is a whole sentence for a person; ``detail`` is the problem alone (empty on
    success); ``health`` is the account's health afterwards; ``changed`` says whether the
    operation changed anything (pause/resume of an account already in that state: False).
    """

    ok: bool
    text: str
    health: Health | None = None
    detail: str = ""
    changed: bool = True


@dataclass(frozen=True)
class SendTestResult(Result):
    """:func:`send_test`'s result: also who sent it, Gmail's 250 reply and refused recipients."""

    sender: str = ""
    to: str = ""
    reply: str = ""
    refused: Mapping[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RotationResult:
    """:func:`rotate_keys`' result: accounts re-encrypted, and secrets no key can read."""

    rotated: int
    unreadable: list[str]  # one plain sentence per secret that could not be decrypted

    @property
    def ok(self) -> bool:
        return not self.unreadable


def explain(exc: BaseException) -> str:
    """An error as a person reads it: what happened, Gmail's reply, then what to do.

    Gmail's reply ends without a full stop ("... - gsmtp"), so it is quoted and the advice is
    introduced, rather than run on after it.
    """
    detail = getattr(exc, "detail", None)
    if not isinstance(exc, GmailSMTPError) or detail is None:
        return str(exc)
    parts = [detail.rstrip(".") + "." if detail else type(exc).__name__ + "."]
    if exc.smtp_code:
        reply = f"{exc.smtp_code} {' '.join(exc.reply.split())}".strip()
        parts.append(f'Gmail replied: "{reply}".')
    if exc.hint:
        parts.append(f"What to do: {exc.hint}")
    return " ".join(parts)


def _health(account: GmailAccount) -> Health | None:
    try:
        return GmailAccount.Health(account.health)
    except ValueError:
        return None


# --- which accounts may send ---------------------------------------------------------------------


def eligible_accounts(*, include_paused: bool = False) -> QuerySet[GmailAccount]:
    """The accounts that may send, in the order routing prefers them.

    Active accounts (paused ones too, after them, with ``include_paused``), the default first,
    then oldest first. Health is not a filter: mail for an account whose credentials are
    refused waits for it (the outbox defers it) rather than going out from another account.
    """
    return GmailAccount.objects.eligible(include_paused=include_paused)


def sender_accounts(*, include_paused: bool = False) -> list[GmailAccount]:
    """:func:`eligible_accounts` as a list, or the unsaved account built from
    EMAIL_HOST_USER / EMAIL_HOST_PASSWORD when there is none (or an empty list)."""
    from .credentials import settings_account

    accounts = list(eligible_accounts(include_paused=include_paused))
    if not accounts and (fallback := settings_account()) is not None:
        accounts = [fallback]
    return accounts


def find_sender(address: str) -> GmailAccount | None:
    """The account (of :func:`sender_accounts`) whose own address is ``address``, or None."""
    address = normalize_address(address)
    return next((a for a in sender_accounts() if a.email == address), None)


# --- checking an account -------------------------------------------------------------------------


def verify(account: GmailAccount) -> Result:
    """Open a verified TLS connection and log in (refreshing an OAuth token if needed).

    Nothing is sent. The account's health is recorded either way.
    """
    from .transport import GmailConnection

    connection = GmailConnection(account)
    try:
        connection.open()
    except OPERATION_ERRORS as exc:
        detail = explain(exc)
        return Result(
            False, f"Could not verify {account.email}: {detail}", _health(account), detail
        )
    finally:
        connection.close()
    if account.health != GmailAccount.Health.OK:
        account.mark_health(GmailAccount.Health.OK, "")
    return Result(
        True,
        f"Verified {account.email}: connected over verified TLS and logged in. Ready to send.",
        _health(account),
    )


def send_test(
    account: GmailAccount, to: str, *, subject: str | None = None, body: str | None = None
) -> SendTestResult:
    """Send one short message from ``account`` to ``to`` now (not through the outbox)."""
    from django.core.mail import EmailMessage

    from .backends import GmailSMTPBackend

    if not to:
        return SendTestResult(
            False,
            "There is no address to send the test message to; add an email address to your "
            "user profile first.",
            _health(account),
            detail="no recipient",
            changed=False,
        )
    message = EmailMessage(
        subject=subject or f"Test message from {account.email}",
        body=body or f"This is a test message sent through {account.email} by django-gmail-smtp.\n",
        from_email=account.email,
        to=[to],
    )
    # The EMAIL_HOST_USER account is not in the table: the backend finds it by itself.
    backend = GmailSMTPBackend(account=None if account.from_settings else account.email)
    try:
        backend.send_messages([message])
    except OPERATION_ERRORS as exc:
        detail = explain(exc)
        return SendTestResult(
            False, f"Test message not sent: {detail}", _health(account), detail, False, to=to
        )
    status = getattr(message, "gmail_status", {}) or {}
    reply = str(status.get("reply", ""))
    sender = str(status.get("account") or account.email)
    return SendTestResult(
        True,
        f"Test message sent from {sender} to {to}. Gmail replied: {reply}",
        _health(account),
        sender=sender,
        to=to,
        reply=reply,
        refused=dict(status.get("refused") or {}),
    )


def refresh_token(account: GmailAccount) -> Result:
    """Get a new OAuth access token now (App Password accounts have none to refresh)."""
    from .credentials import credentials_for

    if account.auth_method == GmailAccount.AuthMethod.APP_PASSWORD:
        return Result(
            False,
            f"Nothing to refresh: {account.email} uses an App Password, not a token.",
            _health(account),
            detail="app password",
            changed=False,
        )
    try:
        creds = credentials_for(account, force_refresh=True)
    except OPERATION_ERRORS as exc:
        detail = explain(exc)
        return Result(
            False,
            f"Could not refresh the token of {account.email}: {detail}",
            _health(account),
            detail,
            False,
        )
    until = format_time(creds.expires_at, "%Y-%m-%d %H:%M")
    return Result(
        True,
        f"Refreshed {account.email}: new access token, valid until {until}.",
        _health(account),
    )


# --- pausing and resuming ------------------------------------------------------------------------


def pause(account: GmailAccount) -> Result:
    """Stop sending from ``account``; its mail waits in the outbox (deferred) until resumed."""
    changed = bool(
        GmailAccount.objects.filter(pk=account.pk, is_active=True).update(is_active=False)
    )
    forget_accounts(using=db_router.db_for_write(GmailAccount))  # update() sends no signal
    account.is_active = False
    return Result(
        True,
        f"Paused sending from {account.email}; its mail waits in the outbox.",
        _health(account),
        changed=changed,
    )


def resume(account: GmailAccount) -> Result:
    """Send from ``account`` again, and make the mail that waited for it due now."""
    changed = bool(
        GmailAccount.objects.filter(pk=account.pk, is_active=False).update(is_active=True)
    )
    forget_accounts(using=db_router.db_for_write(GmailAccount))  # update() sends no signal
    account.is_active = True
    released = account.release_deferred()
    text = f"Resumed sending from {account.email}."
    if released:
        text += f" {released} message(s) waiting for it will be sent now."
    return Result(True, text, _health(account), changed=changed)


def save_account(account: GmailAccount, *, credentials_changed: bool, resumed: bool) -> int:
    """Save an edited account. New credentials reset its health and cached token; new
    credentials or a resume make the mail that waited for it due. Returns how many rows."""
    if credentials_changed and account.pk:
        account.health, account.health_detail = GmailAccount.Health.UNKNOWN, ""
        account.access_token, account.token_expiry = "", None
    existed = account.pk is not None
    account.save()
    if existed and (credentials_changed or resumed):
        return account.release_deferred()
    return 0


# --- Connect with Google -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectResult(Result):
    """:func:`finish_pending_connect`'s result; ``account`` is None when no flow matched."""

    account: GmailAccount | None = None


class PendingConnects:
    """A browser session's started Connect with Google flows (state, PKCE verifier, expiry).

    Kept in ``store`` (the Django session) under :data:`SESSION_KEY`; at most
    :data:`MAX_PENDING_CONNECTS`, each for :data:`PENDING_CONNECT_LIFETIME` seconds, each
    used once. Expired entries are dropped whenever the list is read.
    """

    def __init__(self, store: MutableMapping[str, Any], key: str = SESSION_KEY) -> None:
        self.store, self.key = store, key

    def live(self) -> list[dict[str, Any]]:
        """The unexpired entries (expired ones are removed from the store)."""
        stored = self.store.get(self.key)
        entries = stored if isinstance(stored, list) else []
        now = time.time()
        live = [
            p
            for p in entries
            if isinstance(p, dict)
            and isinstance(p.get("expires"), (int, float))
            and p["expires"] > now
        ]
        if stored is not None and live != stored:
            self.store[self.key] = live
        return live

    def add(self, account: GmailAccount, flow: Authorization) -> None:
        """Remember ``flow`` (started for ``account``), dropping the oldest beyond the cap."""
        entries = self.live()
        entries.append(
            {
                "state": flow.state,
                "verifier": flow.verifier,
                "account": account.pk,
                "redirect_uri": flow.redirect_uri,
                "expires": time.time() + PENDING_CONNECT_LIFETIME,
            }
        )
        self.store[self.key] = entries[-MAX_PENDING_CONNECTS:]

    def take(self, state: str) -> dict[str, Any] | None:
        """The entry for ``state``, removed (a state is used once); None if there is none.

        A wrong state leaves the others alone: a forged answer must not cancel them."""
        entries = self.live()
        found = next(
            (p for p in entries if state and constant_time_compare(state, str(p["state"]))), None
        )
        if found is not None:
            self.store[self.key] = [p for p in entries if p is not found]
        return found


def start_connect(
    account: GmailAccount, redirect_uri: str, *, pending: PendingConnects | None = None
) -> Authorization:
    """Start Google's consent flow for ``account``; the caller sends the user to ``.url``.

    With ``pending``, the flow is remembered there for :func:`finish_pending_connect`.
    Raises ``ImproperlyConfigured`` (no OAuth client) with what to set.
    """
    from .credentials import start_authorization

    flow = start_authorization(account, redirect_uri)
    if pending is not None:
        pending.add(account, flow)
    return flow


GOOGLE_ERRORS = {"access_denied": "the Google user declined to grant access"}


def finish_connect(
    account: GmailAccount, flow: Authorization, *, state: str, code: str = "", error: str = ""
) -> Result:
    """Finish a consent flow with Google's answer (``state``, then ``code`` or ``error``).

    The refresh token is stored only when the state matches the flow and Google granted
    access to the account itself (or a configured alias); otherwise nothing is changed.
    """
    from .credentials import finish_authorization

    if not constant_time_compare(state or "", flow.state):
        return Result(
            False,
            "The answer's state does not match this request (another sign-in, or a forged "
            "redirect); nothing was changed. Start again.",
            _health(account),
            detail="state mismatch",
            changed=False,
        )
    if error:
        text = GOOGLE_ERRORS.get(error, error)
        return Result(
            False,
            f"Google did not connect {account.email}: {text}. Nothing was changed.",
            _health(account),
            detail=text,
            changed=False,
        )
    try:
        # Saves the account only once the grant is accepted, so a refused grant leaves the
        # stored credentials (and an account not created yet) as they were.
        finish_authorization(
            account, code=code, verifier=flow.verifier, redirect_uri=flow.redirect_uri
        )
    except OPERATION_ERRORS as exc:
        detail = explain(exc)
        return Result(False, f"Not connected: {detail}", _health(account), detail, False)
    return Result(
        True,
        f"Connected {account.email} with Google: the refresh token is stored (encrypted). "
        "Use Verify to check that Gmail accepts it.",
        _health(account),
    )


def finish_pending_connect(
    pending: PendingConnects, *, state: str, code: str = "", error: str = ""
) -> ConnectResult:
    """Finish the flow of ``pending`` that ``state`` names (see :func:`finish_connect`)."""
    from .credentials import Authorization

    entry = pending.take(state)
    if entry is None:
        return ConnectResult(
            False,
            "This Connect with Google answer does not match a connection started from this "
            f"browser session in the last {PENDING_CONNECT_LIFETIME // 60} minutes (wrong, "
            "reused or expired state). Start again from the account page.",
            detail="no pending connection",
            changed=False,
        )
    account = GmailAccount.objects.filter(pk=entry["account"]).first()
    if account is None:
        return ConnectResult(
            False,
            "The account this connection was started for no longer exists; nothing was changed.",
            detail="account deleted",
            changed=False,
        )
    flow = Authorization(
        url="", state=entry["state"], verifier=entry["verifier"], redirect_uri=entry["redirect_uri"]
    )
    result = finish_connect(account, flow, state=state, code=code, error=error)
    return ConnectResult(**{**result.__dict__, "account": account})


def account_to_connect(
    email: str, *, client_id: str | None = None, client_secret: str | None = None
) -> tuple[GmailAccount, bool]:
    """The account ``email`` (a new, unsaved OAuth2 account if there is none) with the OAuth
    client given applied; and whether it is new. Saved only by :func:`finish_connect`."""
    address = normalize_address(email)
    account = GmailAccount.objects.filter(email=address).first()
    created = account is None
    if account is None:
        account = GmailAccount(email=address, auth_method=GmailAccount.AuthMethod.OAUTH2)
        account.is_default = not GmailAccount.objects.filter(is_default=True).exists()
    if client_id:
        account.client_id = client_id
    if client_secret:
        account.client_secret = client_secret
    return account, created


# --- encryption keys -----------------------------------------------------------------------------


def rotate_keys() -> RotationResult:
    """Re-encrypt every stored secret with the first key of ENCRYPTION_KEYS.

    Secrets already under that key are left alone; one no configured key can decrypt is
    reported (by account and field, never by value) and left as it is.
    """
    from django.db import connections, router, transaction

    from .crypto import EncryptedTextField, decrypt, is_current

    alias = router.db_for_write(GmailAccount)
    connection = connections[alias]
    # Every encrypted field is concrete, so it has a column (None is for non-concrete fields).
    encrypted = [
        (f, f.column)
        for f in GmailAccount._meta.fields
        if isinstance(f, EncryptedTextField) and f.column is not None
    ]
    table = connection.ops.quote_name(GmailAccount._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(column) for _, column in encrypted)
    rotated, unreadable = 0, []
    with transaction.atomic(using=alias), connection.cursor() as cursor:
        # Raw values: the ORM would hand back decrypted text.
        cursor.execute(f"SELECT id, email, {columns} FROM {table}")  # noqa: S608
        for pk, email, *raw in cursor.fetchall():
            updates = {}
            for (model_field, _column), value in zip(encrypted, raw, strict=True):
                if not value or is_current(value):
                    continue
                try:
                    updates[model_field.attname] = decrypt(value)
                except ImproperlyConfigured:
                    unreadable.append(
                        f"{email}: the {model_field.verbose_name} cannot be decrypted with any "
                        "configured key; enter it again in the admin."
                    )
            if updates:
                GmailAccount.objects.using(alias).filter(pk=pk).update(**updates)
                rotated += 1
    logger.info("Re-encrypted the secrets of %d account(s)", rotated)
    return RotationResult(rotated=rotated, unreadable=unreadable)


def run_each(
    accounts: Iterable[GmailAccount], operation: Callable[[GmailAccount], Result]
) -> list[Result]:
    """``operation(account)`` for each account, in order (a list action over a selection)."""
    return [operation(account) for account in accounts]
