"""The site's Celery app (the usual Django one): ``celery -A example_project worker ...``.

Settings named ``CELERY_*`` configure it (see the Celery part of settings.py).
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
# tasks.py of each installed app: django_gmail_smtp.tasks, django_gmail_smtp.newsletters.tasks
app.autodiscover_tasks()


@app.on_after_configure.connect
def add_gmail_smtp_schedule(sender: Celery, **kwargs: object) -> None:
    """With ``--beat`` or ``celery beat``: the outbox sweeper every SWEEP_INTERVAL seconds and
    the newsletter planner every NEWSLETTER_TICK seconds (it queues each running campaign's
    next slice at the pace the accounts' quotas allow)."""
    from django_gmail_smtp.newsletters.tasks import beat_schedule as newsletter_schedule
    from django_gmail_smtp.tasks import beat_schedule

    sender.conf.beat_schedule.update(beat_schedule())
    sender.conf.beat_schedule.update(newsletter_schedule())
