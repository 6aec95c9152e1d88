"""The mailto half of ``List-Unsubscribe``: unsubscribe emails read from the sender's inbox.

Each campaign message carries ``List-Unsubscribe: <https://...>, <mailto:FROM?subject=
unsubscribe%20TOKEN>``. A mail program that uses the mailto sends an email with the subject
"unsubscribe TOKEN" to the campaign's From address, which lands in the sending account's
inbox. The bounce reader (:mod:`django_gmail_smtp.bounces.reader`) already logs in there; this
module registers a handler with it (from the app's ``ready()``), so each such email is acted on
as the one-click POST is: :func:`.subscribers.unsubscribe` with the method ``mailto``.

The token is the authority, as for the link: whoever sends it, only the address it was made
for is unsubscribed, and a token that is not valid (tampered, truncated, another site's)
changes nothing and is logged; that email is left in the inbox as it is.
"""

from __future__ import annotations

import logging
import re
from email.message import EmailMessage
from email.utils import parseaddr
from urllib.parse import unquote

from ..bounces.reader import InboxHandler, register_inbox_handler
from ..models import GmailAccount
from .tokens import read_test_unsubscribe_token

logger = logging.getLogger(__name__)

__all__ = ["HANDLER", "handle_unsubscribe_email", "register", "token_from_subject"]

#: "unsubscribe TOKEN" (a signed token: letters, digits and ``-_:.``), nothing else
_SUBJECT = re.compile(r"unsubscribe\s+([A-Za-z0-9_\-:.]+)", re.IGNORECASE)


def token_from_subject(subject: str) -> str | None:
    """The token of an unsubscribe email's subject ("unsubscribe TOKEN", also when the mail
    program left it URL-quoted, "unsubscribe%20TOKEN"); None for any other subject."""
    text = " ".join(unquote(subject or "").split())
    match = _SUBJECT.fullmatch(text)
    return match.group(1) if match else None


def handle_unsubscribe_email(account: GmailAccount, message: EmailMessage) -> bool:
    """Unsubscribe the address the email's token names; True when it did (or had already),
    False, changing nothing, for an email that is not one or whose token is not valid."""
    from .subscribers import UnsubscribeMethod, unsubscribe

    token = token_from_subject(str(message.get("Subject", "")))
    if token is None:
        return False  # a person's own mail that mentions unsubscribing: not ours to act on
    sender = parseaddr(str(message.get("From", "")))[1] or "an unknown sender"
    if read_test_unsubscribe_token(token) is not None:
        logger.info(
            "An unsubscribe email from %s in the inbox of %s answers a test send: nothing "
            "changed, and it is left in the inbox",
            sender,
            account.email,
        )
        return False
    if not unsubscribe(token, how=UnsubscribeMethod.MAILTO):
        logger.warning(
            "An unsubscribe email from %s in the inbox of %s carries a token that is not "
            "valid (tampered or not this site's): nothing changed, and it is left in the inbox",
            sender,
            account.email,
        )
        return False
    return True


#: the bounce reader's handler: candidates are the new messages whose subject has "unsubscribe"
HANDLER = InboxHandler(
    name="gmail_smtp_newsletters.unsubscribe",
    search='SUBJECT "unsubscribe"',
    handle=handle_unsubscribe_email,
    label="unsubscribe email(s)",
)


def register() -> None:
    """Have the bounce reader act on unsubscribe emails (the app's ``ready()`` calls it)."""
    register_inbox_handler(HANDLER)
