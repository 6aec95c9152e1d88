"""A site that queues through CeleryGmailBackend but loads no Celery app of its own.

For tests/test_celery_checks.py, which runs ``manage.py check`` with it in a new process: the
only clean way to have no Celery app at all (the test suite's own process loads one).
"""

SECRET_KEY = "tests-nocelery-secret-key-0123456789abcdefghijklmnop"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django_gmail_smtp"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
EMAIL_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"
GMAIL_SMTP = {"ENCRYPTION_KEYS": ["tests-encryption-key-0123456789abcdef"]}
# A closed port: set (so the broker is not Celery's default) but never answering.
CELERY_BROKER_URL = "redis://:broker-secret@127.0.0.1:1/0"
