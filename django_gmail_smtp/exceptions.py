"""Every error this app raises, and the one place Gmail's replies are classified.

All sending errors derive from :class:`GmailSMTPError`, which is also an
:class:`smtplib.SMTPException`, so code written for Django's SMTP backend keeps working; each
error also inherits the natural stdlib type (an authentication failure is an
:class:`smtplib.SMTPAuthenticationError`). Configuration errors derive from
:class:`~django.core.exceptions.ImproperlyConfigured` instead and stay outside the base class,
so ``fail_silently`` never hides them.

Every message says what happened and what to do, in plain words, and never contains a secret.
"""

from __future__ import annotations

import smtplib
from datetime import datetime
from typing import Any

import django
from django.core.exceptions import ImproperlyConfigured

from .enums import ErrorCategory, Health

if django.VERSION >= (6, 1):
    # Django >= 6.1: BadHeaderError is a deprecated alias of ValueError (importing it warns).
    BadHeaderError = ValueError
else:  # Django < 6.1
    from django.core.mail import BadHeaderError


class GmailConfigurationError(ImproperlyConfigured):
    """The app's settings or accounts are set up wrongly; sending cannot work until fixed."""

    category = ErrorCategory.CONFIG


class NoSenderAccount(GmailConfigurationError):
    """No active GmailAccount and no EMAIL_HOST_USER to fall back on."""


class EncryptionKeyError(GmailConfigurationError):
    """A stored secret cannot be decrypted (or ENCRYPTION_KEYS is malformed)."""


class SecurityMismatch(GmailConfigurationError):
    """SECURITY does not match what the server speaks on PORT (``ssl`` against a STARTTLS
    port): retrying cannot help, so it is a configuration error, never a delivery attempt."""


class GmailSMTPError(smtplib.SMTPException):
    """Base class of every sending error.

    Attributes: ``smtp_code`` and ``smtp_error`` (as on :class:`smtplib.SMTPResponseException`,
    ``None``/``b""`` when the error did not come from a reply), ``enhanced_code`` (``"5.7.8"``),
    ``account`` (the sender address, never a secret), ``phase`` (``"connect"``, ``"auth"``,
    ``"mail"``, ``"rcpt"``, ``"data"``, ...), ``recipients`` (refused recipients, if any),
    ``maybe_delivered`` (True only when Gmail may have kept the message: no reply to DATA's
    final ".").
    """

    #: what a person should do about it; appended to the message
    hint: str = ""
    #: how the delivery pipeline treats it
    category: ErrorCategory = ErrorCategory.PERMANENT
    #: set by the transport when the error came after the final "." and before Gmail's reply
    maybe_delivered: bool = False

    def __init__(
        self,
        message: str = "",
        *,
        code: int | None = None,
        reply: str | bytes | None = None,
        account: str | None = None,
        phase: str | None = None,
        hint: str | None = None,
        recipients: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        if isinstance(reply, bytes):
            reply = reply.decode("utf-8", "replace")
        self.smtp_code = code
        self.smtp_error = (reply or "").encode("utf-8", "replace")
        self.reply = reply or ""
        self.enhanced_code = _enhanced_code(self.reply)
        self.account = account
        self.phase = phase
        self.recipients = recipients or {}
        if hint is not None:
            self.hint = hint
        self.detail = message
        Exception.__init__(self, self._compose())

    def _compose(self) -> str:
        parts = [self.detail.rstrip(".") + "." if self.detail else type(self).__name__]
        if self.smtp_code:
            parts.append(f"Gmail replied: {self.smtp_code} {_one_line(self.reply)}".rstrip())
        if self.hint:
            parts.append(self.hint)
        return " ".join(parts)

    def __str__(self) -> str:
        return self.args[0] if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle-safe (Celery result backends, multiprocessing) despite keyword-only arguments.
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[GmailSMTPError], state: dict[str, Any]) -> GmailSMTPError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    Exception.__init__(error, error._compose())
    return error


# --- authentication --------------------------------------------------------------------------


# GmailSMTPError's smtp_code is None and its smtp_error bytes when no reply came (documented);
# the stubs declare smtplib's as int and bytes | str.
class AuthenticationError(GmailSMTPError, smtplib.SMTPAuthenticationError):  # type: ignore[misc]
    """Gmail refused the credentials; nothing is sent from this account until they are fixed."""

    category = ErrorCategory.AUTH
    #: the GmailAccount.health this error puts the account in
    health: Health = Health.CREDENTIALS_REJECTED
    hint = "Check the account's credentials in the admin, then run `manage.py gmail_smtp check`."


class BadCredentials(AuthenticationError):
    """535 5.7.8: wrong user name, App Password or access token."""

    hint = (
        "The App Password (or OAuth token) is wrong or was revoked. Create a new App Password at "
        "https://myaccount.google.com/apppasswords (or reconnect the account with Google) and "
        "save it on the account."
    )


class AppPasswordRequired(AuthenticationError):
    """534 5.7.9: the account has 2-Step Verification and needs an App Password."""

    hint = (
        "This account uses 2-Step Verification, so its normal password cannot be used for SMTP. "
        "Create an App Password at https://myaccount.google.com/apppasswords and use it instead."
    )


class WebLoginRequired(AuthenticationError):
    """534 5.7.14: Google wants a person to sign in through a browser first."""

    hint = (
        "Google blocked the sign-in until someone logs in to this account in a web browser. "
        "Sign in at https://mail.google.com, confirm any security prompt, then try again; better, "
        "switch the account to an App Password or OAuth2."
    )


class ConsentRequired(AuthenticationError):
    """The OAuth refresh token is dead (``invalid_grant``): revoked, expired or unused too long."""

    health = Health.NEEDS_CONSENT

    hint = (
        "The account's OAuth refresh token was revoked or expired (password change, 6 months "
        "unused, or 7 days for an app in 'Testing' status). Connect the account with Google "
        "again (admin: Connect with Google, or `manage.py gmail_smtp authorize EMAIL`)."
    )


class OAuthClientError(AuthenticationError):
    """Google's token endpoint refused the OAuth client (wrong client id or secret)."""

    hint = (
        "Google does not accept this OAuth client id/secret. Copy them again from the Google "
        "Cloud console (APIs & Services > Credentials) into the account or GMAIL_SMTP."
    )


class TokenRefreshError(GmailSMTPError):
    """The token endpoint could not be reached or answered an unexpected error."""

    category = ErrorCategory.TEMPORARY
    hint = "Google's token endpoint could not be used just now; the send can be retried later."


# --- quota -----------------------------------------------------------------------------------


class QuotaExceeded(GmailSMTPError):
    """The account may not send now: our quota ledger or Gmail's 550 5.4.5 said so."""

    category = ErrorCategory.QUOTA
    hint = (
        "Gmail limits each account over a rolling 24 hours; wait until the next slot frees, "
        "add another sender account, or raise the limit if Google allows more."
    )

    def __init__(
        self,
        message: str = "",
        *,
        limit: str | None = None,
        next_slot_at: datetime | None = None,
        **kwargs: Any,
    ) -> None:
        self.limit = limit
        self.next_slot_at = next_slot_at
        super().__init__(message, **kwargs)


# --- temporary -------------------------------------------------------------------------------


class TemporaryError(GmailSMTPError):
    """Try again later: 421, 450-454, a dropped connection or a timeout."""

    category = ErrorCategory.TEMPORARY
    hint = "This is usually temporary; the message can be sent again later."


class ConnectionFailed(TemporaryError, smtplib.SMTPServerDisconnected):
    """The connection could not be opened, dropped, or timed out."""

    hint = (
        "Check that the server is reachable (GMAIL_SMTP HOST/PORT, firewall, DNS); "
        "the message can be sent again later."
    )


class TooManyLoginAttempts(TemporaryError):
    """454 4.7.0: too many logins; connections should be reused."""

    hint = (
        "Gmail throttles accounts that log in too often. Wait a few minutes; reuse one "
        "connection for a batch (the Celery backend does this for you)."
    )


# --- security --------------------------------------------------------------------------------


class InsecureConnectionError(GmailSMTPError, smtplib.SMTPNotSupportedError):
    """TLS could not be established or verified; no credential was sent.

    A configuration problem (wrong HOST, missing CA_FILE, a server that wants STARTTLS): the
    outbox defers such mail for its configuration and retries it on the backoff, without
    counting attempts, instead of retrying it as a passing fault."""

    category = ErrorCategory.CONFIG
    # Each message says once that no credentials were sent; the hint does not repeat it.
    hint = (
        "Make sure HOST is the server's real name (smtp.gmail.com), and if you use a local or "
        'intercepting server, give its CA certificate in GMAIL_SMTP["CA_FILE"].'
    )


# --- permanent, for this message -------------------------------------------------------------


class PermanentError(GmailSMTPError):
    """Gmail refused this message; sending it again will not help."""

    category = ErrorCategory.PERMANENT
    hint = "Fix the message (or its addresses) before sending it again."


class MessageTooLarge(PermanentError):
    """552 5.3.4, or larger than the size the server advertised."""

    hint = (
        "Gmail accepts messages up to about 25 MB after encoding (SIZE 35882577). Send large "
        "files as links instead of attachments."
    )


# recipients maps to (code, str) here, so it can be shown and stored as JSON; smtplib's has bytes.
class InvalidAddress(PermanentError, smtplib.SMTPRecipientsRefused):  # type: ignore[misc]
    """553 5.1.3 / 555 5.5.2: an address is not valid."""

    hint = "Correct the address (user@example.com form, no spaces or line breaks)."


# recipients: see InvalidAddress.
class RecipientsRefused(PermanentError, smtplib.SMTPRecipientsRefused):  # type: ignore[misc]
    """Gmail refused every recipient of the message."""

    hint = "Check the recipient addresses listed."


class TooManyRecipients(PermanentError):
    """More than Gmail's 100 recipients for one message (452 4.5.3, or refused before sending)."""

    hint = (
        "Gmail accepts at most 100 recipients per message over SMTP. Split the recipients "
        "into several messages (Bcc counts too)."
    )


# smtp_code and smtp_error: see AuthenticationError.
class SenderNotAllowed(PermanentError, smtplib.SMTPSenderRefused):  # type: ignore[misc]
    """STRICT_FROM is on and no account can send as the message's From address (``.sender``)."""

    def __init__(self, message: str = "", *, sender: str = "", **kwargs: Any) -> None:
        self.sender = sender
        super().__init__(message, **kwargs)

    hint = (
        "Add the address as a send-as alias of an account (Gmail settings > Accounts > "
        "'Send mail as', then on the account here), send from an account's own address, or "
        'set GMAIL_SMTP["STRICT_FROM"] = False to send from the default account instead.'
    )


class InvalidMessage(PermanentError, ValueError):
    """The message cannot be sent as built (header injection, no recipients, bad header)."""

    hint = "Fix the message as described; nothing was sent."


class HeaderInjection(InvalidMessage, BadHeaderError):
    """A header name, value or address contains a line break, a NUL character, or (a name)
    a colon: refused, as Django's BadHeaderError."""

    hint = (
        "Headers (Subject, From, To, ...), their names and addresses must not contain line "
        "breaks or NUL characters, nor a header name a colon; this is refused to prevent "
        "header injection. Nothing was sent."
    )


# --- classification --------------------------------------------------------------------------


def _enhanced_code(reply: str) -> str:
    first = reply.strip().split(" ", 1)[0] if reply else ""
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return first
    return ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def classify_reply(
    code: int,
    reply: str | bytes,
    *,
    phase: str,
    account: str | None = None,
) -> GmailSMTPError:
    """Turn one of Gmail's negative replies into the matching exception (not raised)."""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    enhanced = _enhanced_code(reply)
    kwargs: dict[str, Any] = {"code": code, "reply": reply, "account": account, "phase": phase}

    if (code == 550 and enhanced == "5.4.5") or "sending limit exceeded" in reply.lower():
        return QuotaExceeded(
            f"Gmail says the daily sending limit of {account or 'the account'} is reached",
            limit="gmail",
            **kwargs,
        )
    if code == 454 and "too many login" in reply.lower():
        return TooManyLoginAttempts(f"Gmail refused to log in {account or ''}".strip(), **kwargs)
    if code == 452 and enhanced == "4.5.3":
        return TooManyRecipients("Gmail refused the message for too many recipients", **kwargs)
    if code == 535:
        return BadCredentials(f"Gmail did not accept the credentials of {account}", **kwargs)
    if code == 534 and enhanced == "5.7.9":
        return AppPasswordRequired(f"Gmail wants an App Password for {account}", **kwargs)
    if code == 534:
        return WebLoginRequired(f"Gmail wants a browser sign-in for {account}", **kwargs)
    if code == 530:
        return InsecureConnectionError(
            "Gmail required STARTTLS or authentication before sending",
            hint='Use SECURITY "starttls" on port 587 or "ssl" on port 465.',
            **kwargs,
        )
    if code == 552:
        return MessageTooLarge("Gmail refused the message as too large", **kwargs)
    if code in (553, 555) or (code == 550 and enhanced.startswith("5.1.")):
        return InvalidAddress("Gmail refused an address", **kwargs)
    if 400 <= code < 500:
        return TemporaryError(f"Gmail answered {code} (temporary) at {phase}", **kwargs)
    return PermanentError(f"Gmail refused the message at {phase}", **kwargs)
