"""Celery tasks. Each takes ids only, never credentials or message content.

Run a worker for both queues (``celery -A proj worker -Q gmail_smtp.transactional,gmail_smtp.bulk``)
and, so a busy bulk queue never delays a password reset, a second one for transactional mail
alone (``-Q gmail_smtp.transactional``). Add :func:`beat_schedule` to the beat schedule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery import shared_task
from celery.signals import worker_process_shutdown

from .conf import get_setting

if TYPE_CHECKING:
    from .conf import MailerSettings
    from .transport import Transport

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


@worker_process_shutdown.connect
def _close_pool(**kwargs: object) -> None:
    transports = list(_transports.values())
    _transports.clear()
    for transport in transports:
        transport.close()


@shared_task(name="django_gmail_smtp.tasks.send_outbound_email", ignore_result=True)
def send_outbound_email(outbound_id: int) -> str:
    """Send one outbox row (claimed atomically: a duplicate delivery does nothing), with the
    settings of the mailer that queued it."""
    from . import outbox

    # The outcome's plain value: what Celery logs and a result backend would store.
    return str(outbox.deliver(int(outbound_id), transports=transport_for))


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
