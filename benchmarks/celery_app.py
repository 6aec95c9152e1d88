"""The Celery app of benchmarks/celery_send.py: the app's tasks and django-celery-email's."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")

app = Celery("benchmarks")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["django_gmail_smtp", "djcelery_email"])
