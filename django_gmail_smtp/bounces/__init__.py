"""Bounces read back from each sending account's own inbox, over IMAP, with its credentials.

Gmail reports most delivery failures after it has accepted a message: a non-delivery report
from ``mailer-daemon@googlemail.com`` lands in the sending account's inbox. The reader logs in
to that inbox (``imap``), reads the reports that arrived since its last run (``parse``) and
records each bounced recipient of an outbox row once (``reader``), sending
``signals.email_bounced``; the newsletters app suppresses the address on that signal.

Run it with ``manage.py gmail_smtp bounces`` or the Celery task ``tasks.read_bounces`` (in the
beat schedule when ``BOUNCE_INTERVAL`` is set).
"""

from .imap import IMAPError, IMAPLoginRefused, IMAPUnavailable, Inbox
from .parse import BounceReport, FailedRecipient, MalformedReport, NotABounce, parse_report
from .reader import ReadResult, read_account, read_all, record_report

__all__ = [
    "BounceReport",
    "FailedRecipient",
    "IMAPError",
    "IMAPLoginRefused",
    "IMAPUnavailable",
    "Inbox",
    "MalformedReport",
    "NotABounce",
    "ReadResult",
    "parse_report",
    "read_account",
    "read_all",
    "record_report",
]
