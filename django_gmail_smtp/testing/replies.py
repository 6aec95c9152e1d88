"""What smtp.gmail.com says: its reply texts, the limits it advertises, and the XOAUTH2
initial response it expects. The single source of Gmail's wording for the sandbox and tests."""

from __future__ import annotations

import base64

from .tokens import MAIL_SCOPE

__all__ = [
    "AUTH_MECHANISMS",
    "DEFAULT_FAULT_REPLY",
    "GMAIL_HOSTNAME",
    "GMAIL_MAX_RECIPIENTS",
    "GMAIL_SIZE_LIMIT",
    "Replies",
    "xoauth2_initial_response",
]

GMAIL_HOSTNAME = "smtp.gmail.com"
#: EHLO's ``SIZE`` (about 25 MB of attachments after encoding)
GMAIL_SIZE_LIMIT = 35882577
#: recipients per message over SMTP
GMAIL_MAX_RECIPIENTS = 100
#: what EHLO advertises after TLS, in Gmail's order
AUTH_MECHANISMS = ("LOGIN", "PLAIN", "XOAUTH2", "PLAIN-CLIENTTOKEN", "OAUTHBEARER", "XOAUTH")
#: what a scripted fault answers when no reply is given
DEFAULT_FAULT_REPLY = "421 4.7.0 Try again later"


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
    # Replies the sandbox never sends by itself; script them with ``sandbox.fault(reply=...)``.
    TEMPORARY_PROBLEM = "421 4.3.0 Temporary System Problem. Try again later (10)."
    AUTH_TEMPORARY = (
        "454 4.7.0 Cannot authenticate due to a temporary system problem. Try again later."
    )
    UNUSUAL_RATE = (
        "421 4.7.28 Gmail has detected an unusual rate of mail originating from your account. "
        "To protect our users from spam, mail sent from your account has been temporarily "
        "rate limited. For more information, go to "
        "https://support.google.com/mail/?p=UnsolicitedRateLimitError"
    )
    RECEIVING_TOO_FAST = (
        "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents "
        "additional messages from being delivered. Please resend your message at a later point. "
        "For more information, go to https://support.google.com/mail/?p=ReceivingRate"
    )
    BLOCKED = (
        "550 5.7.1 Our system has detected that this message is likely unsolicited mail. To "
        "reduce the amount of spam sent to Gmail, this message has been blocked. For more "
        "information, go to https://support.google.com/mail/?p=UnsolicitedMessageError"
    )
    XOAUTH2_ERROR = {"status": "400", "schemes": "Bearer", "scope": MAIL_SCOPE}


def xoauth2_initial_response(user: str, access_token: str) -> str:
    """Return the base64 XOAUTH2 initial client response Gmail expects."""
    raw = f"user={user}\x01auth=Bearer {access_token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")
