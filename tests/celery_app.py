"""The Celery app the integration tests start real workers with."""

import os
from datetime import timedelta

from celery import Celery
from celery.signals import worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["django_gmail_smtp", "django_gmail_smtp.newsletters"])

#: names a file holding a number of seconds: the quota clock of every worker process is the
#: real time plus that offset, so a test moves the clock of all of them by rewriting the file
CLOCK_FILE_VARIABLE = "GMAIL_SMTP_TEST_CLOCK_FILE"


def file_clock(path: str):
    """A clock reading ``path``'s offset (seconds) on each call: the test's shared clock."""
    from django.utils import timezone

    def clock():
        with open(path) as f:
            offset = float(f.read().strip() or 0)
        return timezone.now() + timedelta(seconds=offset)

    return clock


@worker_process_init.connect
def _shared_clock(**kwargs):
    path = os.environ.get(CLOCK_FILE_VARIABLE)
    if path:
        from django_gmail_smtp import quota

        quota.set_clock(file_clock(path))


@app.on_after_configure.connect
def _beat(sender, **kwargs):
    from django_gmail_smtp.tasks import beat_schedule

    sender.conf.beat_schedule = beat_schedule()
