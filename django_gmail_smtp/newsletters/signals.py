"""Signals of the newsletters, for alerting and analytics.

Each is sent by :class:`~django_gmail_smtp.newsletters.models.Campaign` with keyword arguments
only, once the change is committed:

- ``campaign_started``: ``campaign``, ``enrolled`` (how many recipients were enrolled).
- ``campaign_paused``: ``campaign``, ``reason`` (why: the operator's words, or Gmail's reply
  when the circuit breaker paused it, such as ``421 4.7.28 ...``), ``automatic`` (True when the
  circuit breaker paused it).
- ``campaign_finished``: ``campaign``, ``reason`` (a short summary such as "1,200 sent,
  3 failed"): no recipient is waiting or in the outbox any more. A cancelled campaign does not
  send it.
- ``subscriber_unsubscribed`` (sent by ``Suppression``): ``email``, ``mailing_list`` (None:
  from every campaign), ``campaign`` (or None), ``how`` (a
  :class:`~django_gmail_smtp.newsletters.subscribers.UnsubscribeMethod`); once per unsubscribe,
  not again when the same link is used twice.
"""

from django.dispatch import Signal

campaign_started = Signal()
campaign_paused = Signal()
campaign_finished = Signal()
subscriber_unsubscribed = Signal()
