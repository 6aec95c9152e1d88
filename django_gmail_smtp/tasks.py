"""Celery tasks. Each takes ids only, never credentials or message content.

Run a worker for both queues (``celery -A proj worker -Q gmail_smtp.transactional,gmail_smtp.bulk``)
and, so a busy bulk queue never delays a password reset, a second one for transactional mail
alone (``-Q gmail_smtp.transactional``). Add :func:`beat_schedule` to the beat schedule.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import shared_task
from celery.signals import worker_process_shutdown

from .conf import get_setting

if TYPE_CHECKING:
    from .conf import MailerSettings
    from .slots import Slot
    from .transport import Transport

logger = logging.getLogger(__name__)

# Models are imported inside the functions: a Celery app may import this module (for
# beat_schedule) before Django's app registry is ready.

#: this worker process's transports, one per mailer's settings (created after fork)
_transports: dict[MailerSettings, Transport] = {}


def transport_for(settings: MailerSettings) -> Transport:
    """This worker process's transport for a mailer's settings (its connection pool): mail of
    mailers with the same options shares it, and each keeps its connections between tasks."""
    transport = _transports.get(settings)
    if transport is None:
        from .transport import make_transport

        transport = _transports[settings] = make_transport(settings)
    return transport


def pool() -> Transport:
    """This worker process's transport for the GMAIL_SMTP settings (``EMAIL_BACKEND`` mail)."""
    from .conf import for_mailer

    return transport_for(for_mailer(None))


#: the process's transports serve one thread at a time: the task's, or the keeper's
_lock = threading.RLock()
#: account connections kept warm after their stream drained: address -> (slot, idle deadline)
_warm: dict[str, tuple[Slot, float]] = {}
_keeper: tuple[int, threading.Thread] | None = None
#: seconds between the keeper's looks for new mail of a warm account
KEEPER_POLL = 0.05


def keep_warm(slot: Slot) -> None:
    """Keep the account's connection open (and its slot held) for ``CONNECTION_IDLE``
    seconds after its stream drained: its next mail goes out at once, whichever of the
    site's workers got its task (this process's keeper thread sends it), without a login."""
    from . import slots

    idle = float(get_setting("CONNECTION_IDLE"))
    if idle <= 0:
        _let_go(slot)
        return
    lease = min(float(get_setting("CONNECTION_LEASE")), float(get_setting("SENDING_LEASE")))
    if not slots.renew(slot, lease=idle + lease):
        _let_go(slot)  # taken over (its lease ran out): the connection is no longer ours
        return
    with _lock:
        _warm[slot.address] = (slot, time.monotonic() + idle)
    _start_keeper()


def _start_keeper() -> None:
    global _keeper
    with _lock:
        pid = os.getpid()
        if _keeper is not None and _keeper[0] == pid:
            return
        thread = threading.Thread(target=_keep, name="gmail-smtp-keeper", daemon=True)
        _keeper = (pid, thread)
        thread.start()


def _let_go(slot: Slot) -> None:
    """Close this process's connection of the slot's account, then give the slot back; start
    a stream elsewhere if mail came meanwhile."""
    from . import outbox, slots

    for transport in list(_transports.values()):
        close = getattr(transport, "close_address", None)
        if close is not None:
            close(slot.address)
    slots.release(slot)
    outbox.kick(slot.address)


def _keep() -> None:
    """The keeper thread: streams new mail of warm accounts, closes them when idle."""
    from django.db import connections

    from . import outbox, slots
    from .pipeline import stream_account

    global _keeper
    try:
        while True:
            time.sleep(KEEPER_POLL)
            with _lock:
                if not _warm:
                    _keeper = None  # under the lock: keep_warm starts a new one after this
                    return
                for address, (slot, deadline) in list(_warm.items()):
                    try:
                        if outbox.has_due(address, slot.priorities):
                            del _warm[address]
                            if not slots.renew(slot):
                                # Taken over while this process could not renew it (busy
                                # with another task): the mail is the new holder's.
                                _let_go(slot)
                                continue
                            stream_account(
                                slot,
                                address,
                                "",
                                [],
                                worker=outbox.WORKER_ID,
                                transports=transport_for,
                            )
                            keep_warm(slot)
                        elif time.monotonic() > deadline:
                            del _warm[address]
                            _let_go(slot)
                    except Exception:
                        logger.exception("Keeping the connection of %s failed", address)
                        _warm.pop(address, None)
                        try:
                            _let_go(slot)
                        except Exception:  # e.g. the database is down: the lease expires
                            logger.warning("Could not give back the slot of %s", address)
    finally:
        connections.close_all()


def served_priorities(app: Any) -> tuple[str, ...] | None:
    """The priorities whose queues this worker consumes (None: all of them, or unknown): a
    stream sends only those, so a worker serving the transactional queue alone never sends
    bulk mail."""
    try:
        names = set(app.amqp.queues.consume_from)
    except Exception:
        return None
    queues = get_setting("QUEUES")
    served = tuple(p for p, queue in queues.items() if queue in names)
    return served if served and len(served) < len(queues) else None


@worker_process_shutdown.connect
def _close_pool(**kwargs: object) -> None:
    from . import slots

    with _lock:
        warm = [slot for slot, _deadline in _warm.values()]
        _warm.clear()
        transports = list(_transports.values())
        _transports.clear()
        for transport in transports:
            transport.close()
        for slot in warm:
            try:
                slots.release(slot)
            except Exception:  # the database may be gone at shutdown: the lease expires
                logger.warning("Could not give back the connection slot of %s", slot.address)


@shared_task(name="django_gmail_smtp.tasks.send_outbound_email", ignore_result=True, bind=True)
def send_outbound_email(self: Any, outbound_id: int) -> str:
    """Send one outbox row (claimed atomically: a duplicate delivery does nothing), with the
    settings of the mailer that queued it."""
    from . import outbox

    # The outcome's plain value: what Celery logs and a result backend would store.
    # Only a worker keeps connections warm between tasks (a call in the caller's process,
    # or an eager one, gives the connection slot back at once).
    request = self.request
    in_worker = not (request.called_directly or request.is_eager)
    warm = keep_warm if in_worker else None
    priorities = served_priorities(self.app) if in_worker else None
    with _lock:
        outcome = outbox.deliver(
            int(outbound_id),
            transports=transport_for,
            keep_warm=warm,
            stream=True,
            priorities=priorities,
        )
    return str(outcome)


@shared_task(name="django_gmail_smtp.tasks.send_outbound_emails", ignore_result=True, bind=True)
def send_outbound_emails(self: Any, outbound_ids: list[int]) -> dict[str, int]:
    """Send several outbox rows queued together (one task per chunk of a bulk
    ``send_messages``, so queueing publishes once per chunk, not once per message), each as
    :func:`send_outbound_email` would; return how many had each outcome."""
    from . import outbox

    counts: dict[str, int] = {}
    request = self.request
    in_worker = not (request.called_directly or request.is_eager)
    warm = keep_warm if in_worker else None
    priorities = served_priorities(self.app) if in_worker else None
    with _lock:  # the first row's stream usually takes the others (they are then skipped)
        for outbound_id in outbound_ids:
            outcome = str(
                outbox.deliver(
                    int(outbound_id),
                    transports=transport_for,
                    keep_warm=warm,
                    stream=True,
                    priorities=priorities,
                )
            )
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


@shared_task(name="django_gmail_smtp.tasks.sweep_outbox", ignore_result=True)
def sweep_outbox() -> dict[str, int]:
    """Re-enqueue due deferred rows, queued rows that never reached the broker, and rows left
    sending past their lease."""
    from . import outbox

    return outbox.sweep()


@shared_task(name="django_gmail_smtp.tasks.read_bounces", ignore_result=True)
def read_bounces() -> dict[str, int]:
    """Read the bounces that reached each active account's inbox since the last run (IMAP)."""
    from .bounces import read_all

    results = read_all()
    return {
        "accounts": len(results),
        "unreadable": sum(not r.ok for r in results),
        "bounces": sum(r.bounces for r in results),
    }


def beat_schedule() -> dict[str, dict]:
    """The ready beat entries: ``app.conf.beat_schedule.update(beat_schedule())``. The bounce
    reader is among them only when ``BOUNCE_INTERVAL`` is set."""
    schedule = {
        "django-gmail-smtp-sweep-outbox": {
            "task": "django_gmail_smtp.tasks.sweep_outbox",
            "schedule": float(get_setting("SWEEP_INTERVAL")),
            "options": {"queue": get_setting("QUEUES")["transactional"], "expires": 50.0},
        }
    }
    bounce_interval = get_setting("BOUNCE_INTERVAL")
    if bounce_interval:
        # On the bulk queue: reading inboxes never delays a password reset.
        schedule["django-gmail-smtp-read-bounces"] = {
            "task": "django_gmail_smtp.tasks.read_bounces",
            "schedule": float(bounce_interval),
            "options": {"queue": get_setting("QUEUES")["bulk"], "expires": float(bounce_interval)},
        }
    return schedule
