"""Signals a site can connect to (alerting, analytics).

Every signal is sent with keyword arguments only. The sender of ``email_sent`` is the backend
class the message went through (``GmailSMTPBackend``, or ``CeleryGmailBackend`` when the worker
sent it); the outbox's own signals (``email_queued``, ``email_deferred``, ``email_failed``) are
sent by ``OutboundEmail``.

- ``email_queued``: ``outbound`` (OutboundEmail), ``message`` (the Django EmailMessage).
- ``email_sent``: ``message`` (Django EmailMessage, or None from the outbox), ``account``
  (GmailAccount), ``result`` (transport.SendResult; ``result.refused`` lists the recipients
  Gmail refused while accepting the others), ``outbound`` (OutboundEmail or None),
  ``follow_up``: from the outbox, the queued OutboundEmail that retries the recipients Gmail
  refused temporarily (4xx, e.g. ``450 4.2.1``), alone, with its ``retry_of`` set; None if
  there were none, if the message had used up MAX_ATTEMPTS, or from the sync backend.
- ``email_deferred``: ``outbound``, ``reason`` ("quota", "auth", "config"), ``until``
  (datetime, or None: until the account is fixed), ``error`` (the exception, or None). A
  configuration error is retried on the retry backoff; a successful send from the account
  (by either backend), a check or verify that succeeds, or a login that makes the account
  healthy again makes its "auth" and "config" deferrals due at once.
- ``email_failed``: ``outbound``, ``error`` (the GmailSMTPError, or None).
- ``account_unhealthy``: ``account``, ``error``; sent when Gmail or Google starts refusing an
  account's credentials (by either backend, a check or the admin), so someone can be alerted.
  Its outbox mail waits, deferred, until the account is fixed.
- ``email_bounced``: ``bounce`` (the new :class:`~django_gmail_smtp.models.Bounce`: its
  ``recipient``, ``kind`` ("hard" or "soft"), ``code`` such as "5.1.1", ``diagnostic`` and
  ``report``), ``outbound`` (the OutboundEmail it bounced), ``account`` (the GmailAccount whose
  inbox held the report); sent by ``Bounce`` once per recipient and report, when the bounce
  reader (``tasks.read_bounces``, ``manage.py gmail_smtp bounces``) records it. The outbox row
  keeps its status ``sent`` (Gmail accepted it) and gets ``bounced_at``. Receivers run after
  the bounce is stored; one that raises is logged and does not stop the reader.
"""

from django.dispatch import Signal

email_queued = Signal()
email_sent = Signal()
email_deferred = Signal()
email_failed = Signal()
account_unhealthy = Signal()
email_bounced = Signal()
