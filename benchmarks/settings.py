"""Settings for benchmarks/run.py and celery_send.py: the test settings plus the peers.

``post_office`` (pip: django-post_office) queues in its own tables and sends with Django's SMTP
backend (``send_queued``, 5 threads, its default); run.py points Django's EMAIL_* settings at
the sandbox in the process that sends.

``djcelery_email`` (pip: django-celery-email-reboot, the maintained fork of django-celery-email)
is added with Django's SMTP backend behind it. Its queue and, in the baseline worker only, the
SMTP server and login come from environment variables the benchmark sets:
``BENCH_BASELINE_QUEUE``, ``BENCH_EMAIL_HOST``, ``BENCH_EMAIL_PORT``, ``BENCH_EMAIL_HOST_USER``,
``BENCH_EMAIL_HOST_PASSWORD``. (The worker also needs ``SSL_CERT_FILE`` set to the sandbox's CA,
so that Django's SMTP backend trusts the sandbox.)
"""

import os
from importlib.util import find_spec

from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS

# The peers come from the `bench` extra; without them, the cases of our own code still run
# (run.py reports the peers' cases as not run).
PEERS = [app for app in ("djcelery_email", "post_office") if find_spec(app) is not None]
INSTALLED_APPS = [*INSTALLED_APPS, *PEERS]

POST_OFFICE = {
    "BACKENDS": {"default": "django.core.mail.backends.smtp.EmailBackend"},
    "THREADS_PER_PROCESS": 5,  # the package's default, spelled out
    "DEFAULT_PRIORITY": "medium",  # queued, sent by send_queued (not "now")
}

CELERY_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
CELERY_EMAIL_TASK_CONFIG = {"queue": os.environ.get("BENCH_BASELINE_QUEUE", "djcelery_email")}
CELERY_EMAIL_CHUNK_SIZE = 10  # the package's default, spelled out: one SMTP session per chunk

if os.environ.get("BENCH_EMAIL_HOST_USER"):
    # Only in the baseline worker: the app's own code must not see an EMAIL_HOST_USER account.
    EMAIL_HOST = os.environ.get("BENCH_EMAIL_HOST", "127.0.0.1")
    EMAIL_PORT = int(os.environ.get("BENCH_EMAIL_PORT", "587"))
    EMAIL_USE_TLS = True
    EMAIL_HOST_USER = os.environ["BENCH_EMAIL_HOST_USER"]
    EMAIL_HOST_PASSWORD = os.environ.get("BENCH_EMAIL_HOST_PASSWORD", "")
    EMAIL_TIMEOUT = 30
