"""The one place settings are read.

Order of precedence for every option: keyword arguments given to a backend (which is also how a
Django 6.1 ``MAILERS`` entry's ``OPTIONS`` arrive), then the ``GMAIL_SMTP`` settings dict, then
the default below.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
GOOGLE_AUTH_URI = "https://accounts.google.com/o/oauth2/v2/auth"
GMAIL_SCOPE = "https://mail.google.com/"

DEFAULTS: dict[str, Any] = {
    "HOST": "smtp.gmail.com",
    "PORT": None,  # derived from SECURITY: 587 for starttls, 465 for ssl
    "SECURITY": None,  # derived from PORT: "ssl" on 465, "starttls" otherwise
    "TIMEOUT": 30,
    "CA_FILE": None,
    "EHLO_HOSTNAME": None,  # a fully-qualified name; socket.getfqdn() when unset
    "TOKEN_URI": GOOGLE_TOKEN_URI,
    "AUTH_URI": GOOGLE_AUTH_URI,
    "CLIENT_ID": "",
    "CLIENT_SECRET": "",
    "OAUTH_REDIRECT_URI": None,  # Connect with Google's callback; built from the request when unset
    "ENCRYPTION_KEYS": None,  # list of keys, newest first; derived from SECRET_KEY when unset
    "STRICT_FROM": False,
    "MAX_RECIPIENTS_PER_MESSAGE": 100,
    "TOKEN_REFRESH_MARGIN": 300,  # seconds before expiry an access token is treated as expired
    "QUOTA_DATABASE": None,  # database alias of the quota ledger; None: "default"
    "RESERVED_SHARE": 0.1,  # share of each account's quota kept for transactional mail
    "PRIORITY": "transactional",  # default priority of mail: "transactional" or "bulk"
    # Celery outbox
    "QUEUES": {"transactional": "gmail_smtp.transactional", "bulk": "gmail_smtp.bulk"},
    "RETRY_BASE_DELAY": 30,  # seconds before the first retry of a temporary failure
    "RETRY_MAX_DELAY": 3600,  # longest wait between retries
    "MAX_ATTEMPTS": 8,  # temporary failures before a message is failed
    "SWEEP_GRACE": 60,  # seconds a queued row may wait for its task before it is re-enqueued
    "SWEEP_INTERVAL": 60,  # seconds between sweeps in the ready beat schedule
    "SENDING_LEASE": 600,  # seconds a worker may hold a row in "sending" before it is re-queued
    "POOL_IDLE_CHECK": 30,  # seconds idle after which a pooled connection is probed (NOOP)
    "BODY_RETENTION_DAYS": 7,  # the sweeper drops bodies of mail sent longer ago; None: keep
}

SECURITY_CHOICES = ("starttls", "ssl")


def user_settings() -> Mapping[str, Any]:
    """The ``GMAIL_SMTP`` settings dict (empty when unset)."""
    value = getattr(settings, "GMAIL_SMTP", None) or {}
    if not isinstance(value, Mapping):
        from .exceptions import GmailConfigurationError

        raise GmailConfigurationError(
            f"GMAIL_SMTP must be a dict of options, not {type(value).__name__}. "
            'Write it as GMAIL_SMTP = {"HOST": "smtp.gmail.com", ...}.'
        )
    return value


def get_setting(name: str, options: Mapping[str, Any] | None = None, default: Any = None) -> Any:
    """Option ``name`` (upper case): from ``options`` (lower-case keys), GMAIL_SMTP, DEFAULTS."""
    if options:
        value = options.get(name.lower())
        if value is not None:
            return value
    user = user_settings()
    if name in user and user[name] is not None:
        return user[name]
    if name in DEFAULTS and DEFAULTS[name] is not None:
        return DEFAULTS[name]
    return default


def local(moment: datetime) -> datetime:
    """``moment`` in the current time zone (aware with USE_TZ, already local without)."""
    return timezone.localtime(moment) if timezone.is_aware(moment) else moment


def format_time(moment: datetime | None, fmt: str = "%Y-%m-%d %H:%M %Z") -> str:
    """A moment for people to read, in the current time zone; "-" for None."""
    if moment is None:
        return "-"
    return local(moment).strftime(fmt).strip()


def legacy_email_setting(name: str, default: Any = None) -> Any:
    """A Django ``EMAIL_*`` setting, unless the project has moved to ``MAILERS``.

    Django 6.1 deprecates the ``EMAIL_*`` settings in favour of ``MAILERS``; a project that
    defines ``MAILERS`` no longer uses them, so they are not read (nor warned about) then.
    """
    if hasattr(settings, "MAILERS"):  # Django >= 6.1 style configuration
        return default
    return getattr(settings, name, default)


def connection_settings(options: Mapping[str, Any] | None = None) -> tuple[str, int, str]:
    """Return ``(host, port, security)`` with PORT and SECURITY derived from each other."""
    host = get_setting("HOST", options)
    port = get_setting("PORT", options)
    security = get_setting("SECURITY", options)
    if security is not None:
        security = str(security).lower()
        if security not in SECURITY_CHOICES:
            from .exceptions import GmailConfigurationError

            raise GmailConfigurationError(
                f'GMAIL_SMTP["SECURITY"] is {security!r}; use "starttls" (port 587) or "ssl" '
                "(port 465)."
            )
    if port is None:
        port = 465 if security == "ssl" else 587
    port = int(port)
    if security is None:
        security = "ssl" if port == 465 else "starttls"
    return host, port, security
