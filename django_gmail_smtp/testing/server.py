"""Compatibility module: the sandbox used to live here in one file.

It is now split by job; import from :mod:`django_gmail_smtp.testing` (or the module that owns a
name):

- :mod:`~django_gmail_smtp.testing.replies`: Gmail's reply texts (``Replies``), its limits and
  the XOAUTH2 initial response;
- :mod:`~django_gmail_smtp.testing.state`: users, quota, scripted faults (``Fault``),
  accepted messages (``Delivered``) and counters (``SandboxStats``);
- :mod:`~django_gmail_smtp.testing.smtp`: the SMTP session speaking like smtp.gmail.com
  (``GmailSMTP``);
- :mod:`~django_gmail_smtp.testing.listener`: the thread and event loop serving it;
- :mod:`~django_gmail_smtp.testing.sandbox`: ``GmailSandbox``, the public facade.
"""

from __future__ import annotations

from .replies import (
    AUTH_MECHANISMS,
    DEFAULT_FAULT_REPLY,
    GMAIL_HOSTNAME,
    GMAIL_MAX_RECIPIENTS,
    GMAIL_SIZE_LIMIT,
    Replies,
    xoauth2_initial_response,
)
from .sandbox import GmailSandbox
from .smtp import GmailSMTP, Security
from .state import PHASES, QUOTA_WINDOW, Delivered, Fault, SandboxStats, SandboxUser

__all__ = [
    "AUTH_MECHANISMS",
    "DEFAULT_FAULT_REPLY",
    "GMAIL_HOSTNAME",
    "GMAIL_MAX_RECIPIENTS",
    "GMAIL_SIZE_LIMIT",
    "PHASES",
    "QUOTA_WINDOW",
    "Delivered",
    "Fault",
    "GmailSMTP",
    "GmailSandbox",
    "Replies",
    "SandboxStats",
    "SandboxUser",
    "Security",
    "xoauth2_initial_response",
]
