"""What the newsletters do when the outbox reports on one of their messages.

The outbox's signals (:mod:`django_gmail_smtp.signals`) tell a campaign that its message was
sent, failed or deferred: the recipient's status follows, an address Gmail refuses for good
goes on the suppression list, and the circuit breaker pauses the campaign on ``421 4.7.28``,
``550 5.7.1`` or too many refusals. The planner's reconcile does the same at its next tick, so
a signal missed (a worker killed between the two) changes nothing.

A receiver never breaks the outbox's recording: anything it raises is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import receiver

from .. import signals

logger = logging.getLogger(__name__)


def _record(outbound: Any) -> None:
    if outbound is None:  # the sync backend: not a campaign's message
        return
    try:
        from .campaigns import record_outbound

        record_outbound(outbound)
    except Exception:
        logger.exception(
            "Could not record the outcome of outbound email %s on its campaign; the planner's "
            "next tick will",
            getattr(outbound, "pk", None),
        )


@receiver(signals.email_sent, dispatch_uid="gmail_smtp_newsletters_sent")
def on_sent(sender: Any, outbound: Any = None, **kwargs: Any) -> None:
    _record(outbound)


@receiver(signals.email_failed, dispatch_uid="gmail_smtp_newsletters_failed")
def on_failed(sender: Any, outbound: Any = None, **kwargs: Any) -> None:
    _record(outbound)


@receiver(signals.email_deferred, dispatch_uid="gmail_smtp_newsletters_deferred")
def on_deferred(sender: Any, outbound: Any = None, **kwargs: Any) -> None:
    _record(outbound)
