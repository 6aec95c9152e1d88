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
    from .transport import ConnectionPool

# Models are imported inside the functions: a Celery app may import this module (for
# beat_schedule) before Django's app registry is ready.
_pool: ConnectionPool | None = None


def pool() -> ConnectionPool:
    """This worker process's connection pool (created after fork, closed at shutdown)."""
    from .transport import ConnectionPool

    global _pool
    if _pool is None:
        _pool = ConnectionPool()
    return _pool


@worker_process_shutdown.connect
def _close_pool(**kwargs: object) -> None:
    if _pool is not None:
        _pool.close()


@shared_task(name="django_gmail_smtp.tasks.send_outbound_email", ignore_result=True)
def send_outbound_email(outbound_id: int) -> str:
    """Send one outbox row (claimed atomically: a duplicate delivery does nothing)."""
    from . import outbox

    return outbox.deliver(int(outbound_id), pool=pool())


@shared_task(name="django_gmail_smtp.tasks.sweep_outbox", ignore_result=True)
def sweep_outbox() -> dict[str, int]:
    """Re-enqueue due deferred rows, queued rows that never reached the broker, and rows left
    sending past their lease."""
    from . import outbox

    return outbox.sweep()


def beat_schedule() -> dict[str, dict]:
    """The ready beat entry: ``app.conf.beat_schedule.update(beat_schedule())``."""
    return {
        "django-gmail-smtp-sweep-outbox": {
            "task": "django_gmail_smtp.tasks.sweep_outbox",
            "schedule": float(get_setting("SWEEP_INTERVAL")),
            "options": {"queue": get_setting("QUEUES")["transactional"], "expires": 50.0},
        }
    }
