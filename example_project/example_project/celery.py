"""The site's Celery app (the usual Django one): ``celery -A example_project worker ...``.

Settings named ``CELERY_*`` configure it (see the Celery part of settings.py).
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()  # tasks.py of each installed app: django_gmail_smtp.tasks


@app.on_after_configure.connect
def add_gmail_smtp_schedule(sender: Celery, **kwargs: object) -> None:
    """Run the outbox sweeper every SWEEP_INTERVAL seconds (with ``--beat`` or ``celery beat``)."""
    from django_gmail_smtp.tasks import beat_schedule

    sender.conf.beat_schedule.update(beat_schedule())
