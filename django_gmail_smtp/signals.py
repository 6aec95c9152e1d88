"""Signals a site can connect to (alerting, analytics).

Every signal is sent with keyword arguments only:

- ``email_queued``: ``outbound`` (OutboundEmail), ``message`` (the Django EmailMessage).
- ``email_sent``: ``message`` (Django EmailMessage, or None from the outbox), ``account``
  (GmailAccount), ``result`` (transport.SendResult), ``outbound`` (OutboundEmail or None).
- ``email_deferred``: ``outbound``, ``reason`` ("quota", "auth", "config"), ``until``
  (datetime or None: until the account is fixed), ``error`` (the exception, or None).
- ``email_failed``: ``outbound``, ``error`` (the GmailSMTPError, or None).
- ``account_unhealthy``: ``account``, ``error``; sent when Gmail or Google starts refusing an
  account's credentials (by either backend, a check or the admin), so someone can be alerted.
  Its outbox mail waits, deferred, until the account is fixed.
"""

from django.dispatch import Signal

email_queued = Signal()
email_sent = Signal()
email_deferred = Signal()
email_failed = Signal()
account_unhealthy = Signal()
