"""The Celery app the integration tests start real workers with."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["django_gmail_smtp"])


@app.on_after_configure.connect
def _beat(sender, **kwargs):
    from django_gmail_smtp.tasks import beat_schedule

    sender.conf.beat_schedule = beat_schedule()
