"""Settings for the project's own test suite (pytest-django)."""

import json
import os
import tempfile
import uuid

import environ

from django_gmail_smtp.testing import broker  # registers the atomicfs:// broker URL scheme

env = environ.Env()

SECRET_KEY = "tests-secret-key-not-for-production-0123456789"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]

TMP = os.path.join(tempfile.gettempdir(), f"django_gmail_smtp_tests_{os.getuid()}")
os.makedirs(TMP, exist_ok=True)

DATABASES = {
    "default": env.db("DATABASE_URL", default="sqlite:///" + os.path.join(TMP, "db.sqlite3"))
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not memory, so worker processes started by the tests share the test database.
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(TMP, f"test_db_{os.getpid()}.sqlite3")}
    DATABASES["default"]["OPTIONS"] = {"timeout": 30}
if os.environ.get("GMAIL_SMTP_TEST_DB"):
    # Set by tests for the processes they start: use the test database, not the real one.
    DATABASES["default"] = json.loads(os.environ["GMAIL_SMTP_TEST_DB"])
if not DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A second alias of the same database, for tests of GMAIL_SMTP["QUOTA_DATABASE"].
    DATABASES["ledger"] = {**DATABASES["default"], "TEST": {"MIRROR": "default"}}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_gmail_smtp",
    "django_gmail_smtp.newsletters",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

EMAIL_BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
DEFAULT_FROM_EMAIL = "site@example.com"
SERVER_EMAIL = "site@example.com"

# Tests point HOST/PORT/CA_FILE at a sandbox per test (see tests/conftest.py).
GMAIL_SMTP = {
    "HOST": "127.0.0.1",
    "TIMEOUT": 10,
    "ENCRYPTION_KEYS": ["tests-encryption-key-0123456789abcdef"],
    "EHLO_HOSTNAME": "tests.example.com",
    "SITE_URL": "https://tests.example.com",
}

if os.environ.get("GMAIL_SMTP_TEST_SETTINGS"):
    GMAIL_SMTP = {**GMAIL_SMTP, **json.loads(os.environ["GMAIL_SMTP_TEST_SETTINGS"])}

# Celery: Redis when REDIS_URL is given (CI), else the embedded atomicfs:// broker (a folder, no
# server; kombu's own filesystem:// transport lets a worker read half-written messages).
REDIS_URL = env("REDIS_URL", default="")
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="") or (REDIS_URL or f"{broker.SCHEME}://")
# A pytest run (PYTEST_VERSION is set) gets a broker folder / Redis key prefix of its own, which
# the session fixture in tests/conftest.py removes at the end; the processes it starts inherit
# them through the environment. Outside pytest (a worker started by hand) they are fixed.
_OWN_RUN = "PYTEST_VERSION" in os.environ
_RUN_ID = uuid.uuid4().hex[:12]
if CELERY_BROKER_URL.startswith(("filesystem", broker.SCHEME)):
    BROKER_FOLDER_IS_TEMPORARY = _OWN_RUN and "CELERY_FS_DIR" not in os.environ
    _queue_dir = os.environ.setdefault(
        "CELERY_FS_DIR",
        os.path.join(TMP, f"broker-{_RUN_ID}" if BROKER_FOLDER_IS_TEMPORARY else "broker"),
    )
    os.makedirs(_queue_dir, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": _queue_dir,
        "data_folder_out": _queue_dir,
        "control_folder": os.path.join(_queue_dir, "control"),
        "polling_interval": 0.05,
    }
elif CELERY_BROKER_URL.startswith("redis"):
    # Every key of the run (queues, bindings, unacked tasks) starts with this prefix.
    REDIS_KEYS_ARE_TEMPORARY = _OWN_RUN and "GMAIL_SMTP_TEST_REDIS_PREFIX" not in os.environ
    REDIS_KEY_PREFIX = os.environ.setdefault(
        "GMAIL_SMTP_TEST_REDIS_PREFIX",
        f"django_gmail_smtp_tests:{_RUN_ID if REDIS_KEYS_ARE_TEMPORARY else 'manual'}:",
    )
    CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": REDIS_KEY_PREFIX}
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

LOGGING_CONFIG = None
