"""System checks (``manage.py check``): ids ``django_gmail_smtp.E0xx`` / ``W0xx``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.db import DatabaseError

from .conf import legacy_email_setting
from .exceptions import GmailConfigurationError

BACKENDS = (
    "django_gmail_smtp.backends.GmailSMTPBackend",
    "django_gmail_smtp.backends.CeleryGmailBackend",
)


def backend_in_use() -> bool:
    """True when EMAIL_BACKEND or any MAILERS entry names one of our backends."""
    if legacy_email_setting("EMAIL_BACKEND", "") in BACKENDS:
        return True
    mailers = getattr(settings, "MAILERS", None) or {}
    return any((cfg or {}).get("BACKEND") in BACKENDS for cfg in mailers.values())


@register("email")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list:
    from .conf import connection_settings, user_settings

    messages: list = []
    try:
        user_settings()
        _host, port, security = connection_settings()
    except GmailConfigurationError as exc:
        return [Error(str(exc), id="django_gmail_smtp.E001")]
    if (port == 465 and security == "starttls") or (port == 587 and security == "ssl"):
        messages.append(
            Error(
                f'GMAIL_SMTP has PORT {port} with SECURITY "{security}"; Gmail speaks implicit '
                "TLS on 465 and STARTTLS on 587.",
                hint='Use {"PORT": 587, "SECURITY": "starttls"} or {"PORT": 465, "SECURITY": '
                '"ssl"} (or set only one of them).',
                id="django_gmail_smtp.E002",
            )
        )
    if legacy_email_setting("EMAIL_USE_SSL", False) and legacy_email_setting(
        "EMAIL_USE_TLS", False
    ):
        messages.append(
            Error(
                "EMAIL_USE_TLS and EMAIL_USE_SSL are both True.",
                hint="Set only one: EMAIL_USE_TLS for port 587, EMAIL_USE_SSL for 465.",
                id="django_gmail_smtp.E003",
            )
        )
    keys = user_settings().get("ENCRYPTION_KEYS")
    if keys is None and not settings.DEBUG and backend_in_use():
        messages.append(
            Warning(
                'GMAIL_SMTP["ENCRYPTION_KEYS"] is not set, so stored credentials are encrypted '
                "with a key derived from SECRET_KEY; changing SECRET_KEY would make them "
                "unreadable.",
                hint='Generate a key with `python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"`, keep it in the environment, and set '
                'GMAIL_SMTP["ENCRYPTION_KEYS"] = [that key, SECRET_KEY] once (the old one '
                "last), then run `manage.py gmail_smtp rotate-keys`.",
                id="django_gmail_smtp.W003",
            )
        )
    else:
        try:
            from .crypto import fernet

            fernet()
        except GmailConfigurationError as exc:
            messages.append(Error(str(exc), id="django_gmail_smtp.E004"))
    messages.extend(_check_outbox_settings())
    return messages


def _check_outbox_settings() -> list:
    from django.db import connections

    from .conf import get_setting

    messages: list = []
    lease, timeout = float(get_setting("SENDING_LEASE")), float(get_setting("TIMEOUT"))
    # One send can wait TIMEOUT several times (connect, TLS, AUTH, MAIL, DATA, the reply).
    if lease < 8 * timeout:
        messages.append(
            Warning(
                f'GMAIL_SMTP["SENDING_LEASE"] ({lease:g} s) is short next to TIMEOUT '
                f"({timeout:g} s): a slow send could outlast its lease and be sent twice.",
                hint="Keep SENDING_LEASE at least 8 x TIMEOUT (the defaults are 600 and 30).",
                id="django_gmail_smtp.W005",
            )
        )
    alias = str(get_setting("QUOTA_DATABASE") or "default")
    db = settings.DATABASES.get(alias, {})
    uses_sync = legacy_email_setting("EMAIL_BACKEND", "") == BACKENDS[0] or any(
        (cfg or {}).get("BACKEND") == BACKENDS[0]
        for cfg in (getattr(settings, "MAILERS", None) or {}).values()
    )
    sqlite = "sqlite" in db.get("ENGINE", "")
    if uses_sync and db.get("ATOMIC_REQUESTS") and alias in connections and not sqlite:
        messages.append(
            Warning(
                f"ATOMIC_REQUESTS is on for the database {alias!r} that keeps the quota "
                "ledger, so GmailSMTPBackend reserves quota inside each request's "
                "transaction: a request that fails after sending loses the count, and "
                "the account's ledger lock is held until the request ends.",
                hint="Add a second alias for the same database (without ATOMIC_REQUESTS) "
                'and set GMAIL_SMTP["QUOTA_DATABASE"] to it, or send with '
                "CeleryGmailBackend.",
                id="django_gmail_smtp.W006",
            )
        )
    return messages


@register("email")
def check_accounts(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list:
    """Checks that read the accounts table (skipped while the table does not exist)."""
    if not backend_in_use():
        return []
    from .credentials import settings_account
    from .routing import Router

    try:
        router = Router()
        accounts = router.accounts()
    except (DatabaseError, RuntimeError):
        return []  # not migrated yet, or database access not allowed here
    if not accounts:
        return [
            Warning(
                "The Gmail backend is configured but there is no active GmailAccount and "
                "EMAIL_HOST_USER / EMAIL_HOST_PASSWORD are not set, so no mail can be sent.",
                hint="Add an account in the admin (Gmail SMTP > Gmail accounts), or set "
                "EMAIL_HOST_USER and EMAIL_HOST_PASSWORD (an App Password).",
                id="django_gmail_smtp.W001",
            )
        ]
    messages = []
    from .conf import get_setting

    strict = bool(get_setting("STRICT_FROM"))
    from email.utils import parseaddr

    for name in ("DEFAULT_FROM_EMAIL", "SERVER_EMAIL"):
        address = parseaddr(str(getattr(settings, name, "") or ""))[1]
        if address and not router.candidates(address):
            fallback = settings_account()
            if fallback is not None and fallback.can_send_as(address):
                continue
            text = f"{name} is {address!r}, which no active Gmail account can send as; " + (
                "STRICT_FROM is on, so such mail will be refused."
                if strict
                else "Gmail will send it from the default account's address instead."
            )
            messages.append(
                Warning(
                    text,
                    hint=f"Set {name} to an account's address, or add {address} as a verified "
                    "send-as alias of an account.",
                    id="django_gmail_smtp.W002",
                )
            )
    return messages
