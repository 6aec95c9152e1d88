"""tests/settings_nocelery.py plus the Celery app, loaded as a project's ``__init__.py`` does."""

from tests.celery_app import app as celery_app  # noqa: F401  (what proj/__init__.py does)
from tests.settings_nocelery import *  # noqa: F403
