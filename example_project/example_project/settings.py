"""Settings of the example site: everything comes from the environment (django-environ).

The mail part (from ``DEFAULT_FROM_EMAIL`` down: ``MAILERS`` on Django 6.1, the ``EMAIL_*``
settings before it) is what a real site needs to send through Gmail.
"""

from pathlib import Path

import django
import environ

BASE_DIR = Path(__file__).resolve().parent.parent  # example_project/
env = environ.Env()

SECRET_KEY = env("SECRET_KEY", default="dev-only-insecure-key-for-the-example-project")
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_gmail_smtp",
    "django_gmail_smtp.newsletters",  # optional: lists, campaigns, one-click unsubscribe
    "contact",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A Celery worker writes to the same file: wait for its lock instead of failing at once.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("timeout", 20)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
LOGIN_REDIRECT_URL = "/"
# The demo (demo.py) serves the site over http://, so it silences the newsletters' warning
# that one-click unsubscribe links should be https (gmail_smtp_newsletters.W001).
SILENCED_SYSTEM_CHECKS = env.list("SILENCED_SYSTEM_CHECKS", default=[])

# --- Mail --------------------------------------------------------------------------------------
# The From of mail the site sends. It should be a Gmail account's address or one of its
# send-as aliases (see GmailAccount in the admin); otherwise the default account sends it.
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="Example site <site@example.com>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
# The contact form writes to these people.
MANAGERS = [("Site staff", env("STAFF_EMAIL", default="staff@example.com"))]

# Sender accounts live in the database (admin: Gmail SMTP > Gmail accounts); their secrets are
# encrypted with ENCRYPTION_KEYS (newest first; a key derived from SECRET_KEY when unset).
# Unset values (None) fall back to the package defaults: smtp.gmail.com, 587 with STARTTLS.
GMAIL_SMTP = {
    "HOST": env("GMAIL_SMTP_HOST", default="smtp.gmail.com"),
    "PORT": env.int("GMAIL_SMTP_PORT", default=None),  # 587 (starttls) or 465 (ssl)
    "SECURITY": env("GMAIL_SMTP_SECURITY", default=None),  # "starttls" or "ssl"
    "CA_FILE": env("GMAIL_SMTP_CA_FILE", default=None),  # only for a local sandbox
    "TOKEN_URI": env("GMAIL_SMTP_TOKEN_URI", default=None),  # Google's OAuth token endpoint
    "AUTH_URI": env("GMAIL_SMTP_AUTH_URI", default=None),
    "ENCRYPTION_KEYS": env.list("GMAIL_SMTP_ENCRYPTION_KEYS", default=None),
    # Newsletters (django_gmail_smtp.newsletters): absolute links in their mail (unsubscribe,
    # web archive, subscription confirmation) start with the site's public https:// address.
    "SITE_URL": env("GMAIL_SMTP_SITE_URL", default="https://www.example.com"),
    # Seconds between the planner's ticks (its beat entry, see example_project/celery.py).
    "NEWSLETTER_TICK": env.int("GMAIL_SMTP_NEWSLETTER_TICK", default=None),
    # Campaigns may go to a list or to one of these querysets (the admin offers their names).
    "NEWSLETTER_AUDIENCES": {"Active users": "example_project.audiences.active_users"},
}

# Optional: an App Password account to log in as, so the site can send before you add an
# account in the admin (it is never stored). Two variables,
#   GMAIL_USER=you@gmail.com GMAIL_APP_PASSWORD=abcdefghijklmnop
# or django-environ's one variable (the server still comes from GMAIL_SMTP):
#   EMAIL_URL=smtp+tls://you%40gmail.com:abcdefghijklmnop@smtp.gmail.com:587
# With neither, the accounts in the admin send.
_email_url = env.email_url("EMAIL_URL") if env("EMAIL_URL", default="") else {}
_login = {
    "username": env("GMAIL_USER", default=_email_url.get("EMAIL_HOST_USER", "")),
    "password": env("GMAIL_APP_PASSWORD", default=_email_url.get("EMAIL_HOST_PASSWORD", "")),
}

if django.VERSION >= (6, 1):
    # Two mailers. "default" (password resets, send_mail, mail_admins) sends at once.
    # "contact" (the contact form's message.send(using="contact")) goes through the outbox:
    # the visitor's request only writes a row and a Celery worker sends it (see Celery below),
    # so nobody waits on Gmail. Either BACKEND can be switched from the environment, e.g.
    # CONTACT_MAILER_BACKEND=django_gmail_smtp.backends.GmailSMTPBackend to send at once too.
    MAILERS = {
        "default": {
            "BACKEND": env("MAILER_BACKEND", default="django_gmail_smtp.backends.GmailSMTPBackend"),
            "OPTIONS": _login,
        },
        "contact": {
            "BACKEND": env(
                "CONTACT_MAILER_BACKEND", default="django_gmail_smtp.backends.CeleryGmailBackend"
            ),
            "OPTIONS": _login,
        },
    }
else:  # Django < 6.1: no MAILERS, the EMAIL_* settings instead
    EMAIL_BACKEND = env("EMAIL_BACKEND", default="django_gmail_smtp.backends.GmailSMTPBackend")
    # The contact form's backend, if not EMAIL_BACKEND: with CONTACT_EMAIL_BACKEND=
    # django_gmail_smtp.backends.CeleryGmailBackend the visitor's request only writes an outbox
    # row and a Celery worker sends it (see Celery below), while password resets still go out
    # at once.
    CONTACT_EMAIL_BACKEND = env("CONTACT_EMAIL_BACKEND", default=None)
    # With no GmailAccount at all, the backend logs in as EMAIL_HOST_USER with
    # EMAIL_HOST_PASSWORD (an App Password).
    EMAIL_HOST_USER, EMAIL_HOST_PASSWORD = _login["username"], _login["password"]
    if _email_url:
        # EMAIL_URL also drives Django's own SMTP backend, so switching back and forth is the
        # one line EMAIL_BACKEND=django.core.mail.backends.smtp.EmailBackend.
        for _name in ("EMAIL_BACKEND", "EMAIL_HOST_USER", "EMAIL_HOST_PASSWORD"):
            _email_url.pop(_name)  # keep the ones set above
        globals().update(_email_url)  # EMAIL_HOST, EMAIL_PORT, EMAIL_USE_TLS, ...

# --- Celery (for CeleryGmailBackend: the outbox) ------------------------------------------------
# The app is example_project/celery.py. A real site uses Redis or RabbitMQ,
#   CELERY_BROKER_URL=redis://localhost:6379/0
# The default, atomicfs:// (django_gmail_smtp.testing.broker), needs no server: each task is a
# file in var/broker/messages/, written whole before any worker can see it (kombu's own
# filesystem:// transport lets a worker read a half-written task). Fine for one machine and for
# trying things out, not for production.
# From example_project/, a worker for both queues with the beat that sweeps the outbox:
#   celery -A example_project worker -Q gmail_smtp.transactional,gmail_smtp.bulk --beat
# or, on a real site, the worker(s) and a single beat as separate processes:
#   celery -A example_project worker -Q gmail_smtp.transactional,gmail_smtp.bulk
#   celery -A example_project beat
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="atomicfs://")
if CELERY_BROKER_URL.startswith(("atomicfs://", "filesystem://")):
    # Registers the atomicfs:// scheme with kombu, in the site and in each worker.
    import django_gmail_smtp.testing.broker  # noqa: F401

    _broker_folder = Path(env("CELERY_BROKER_FOLDER", default=str(BASE_DIR / "var" / "broker")))
    (_broker_folder / "messages").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_folder / "messages"),
        "data_folder_out": str(_broker_folder / "messages"),
        "control_folder": str(_broker_folder / "control"),  # else ./control, wherever you are
        "polling_interval": 0.1,  # seconds between looks at the folder
    }
CELERY_TASK_IGNORE_RESULT = True  # the outbox row is the result
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
