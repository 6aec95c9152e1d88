"""Bounces read back from each sending account's own inbox, over IMAP, with its credentials.

Gmail reports most delivery failures after it has accepted a message: a non-delivery report
from ``mailer-daemon@googlemail.com`` lands in the sending account's inbox. The reader logs in
to that inbox (``imap``), reads the reports that arrived since its last run (``parse``) and
records each bounced recipient of an outbox row once (``reader``), sending
``signals.email_bounced``; the newsletters app suppresses the address on that signal. Other
apps may have it act on other mail in the same inboxes (``register_inbox_handler``): the
newsletters app reads the unsubscribe emails of ``List-Unsubscribe``'s mailto so.

Run it with ``manage.py gmail_smtp bounces`` or the Celery task ``tasks.read_bounces`` (in the
beat schedule when ``BOUNCE_INTERVAL`` is set).
"""

from .imap import IMAPError, IMAPLoginRefused, IMAPUnavailable, Inbox
from .parse import BounceReport, FailedRecipient, MalformedReport, NotABounce, parse_report
from .reader import (
    InboxHandler,
    ReadResult,
    inbox_handlers,
    read_account,
    read_all,
    record_report,
    register_inbox_handler,
    unregister_inbox_handler,
)

__all__ = [
    "BounceReport",
    "FailedRecipient",
    "IMAPError",
    "IMAPLoginRefused",
    "IMAPUnavailable",
    "Inbox",
    "InboxHandler",
    "MalformedReport",
    "NotABounce",
    "ReadResult",
    "inbox_handlers",
    "parse_report",
    "read_account",
    "read_all",
    "record_report",
    "register_inbox_handler",
    "unregister_inbox_handler",
]
