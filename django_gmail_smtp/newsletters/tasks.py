"""The planner's Celery task and its beat entry.

Add :func:`beat_schedule` to the beat schedule next to the outbox's sweep::

    app.conf.beat_schedule.update(django_gmail_smtp.tasks.beat_schedule())
    app.conf.beat_schedule.update(django_gmail_smtp.newsletters.tasks.beat_schedule())
"""

from __future__ import annotations

from celery import shared_task

from ..conf import get_setting


@shared_task(name="django_gmail_smtp.newsletters.tasks.plan_campaigns", ignore_result=True)
def plan_campaigns() -> dict[str, int]:
    """One planner tick: reconcile every campaign and queue each running one's next slice."""
    from .planner import tick

    return tick()


def beat_schedule() -> dict[str, dict]:
    """The ready beat entry: every ``NEWSLETTER_TICK`` seconds, on the transactional queue (a
    busy bulk queue never delays it); a tick that waited longer than its interval is dropped,
    the next one plans for the time that passed."""
    interval = float(get_setting("NEWSLETTER_TICK"))
    return {
        "django-gmail-smtp-plan-campaigns": {
            "task": "django_gmail_smtp.newsletters.tasks.plan_campaigns",
            "schedule": interval,
            "options": {
                "queue": get_setting("QUEUES")["transactional"],
                "expires": max(1.0, interval * 0.9),
            },
        }
    }
