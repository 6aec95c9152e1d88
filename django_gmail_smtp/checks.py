"""System checks (``manage.py check``): ids ``django_gmail_smtp.E0xx`` / ``W0xx``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.db import DatabaseError

from .conf import is_our_backend, legacy_email_setting
from .exceptions import GmailConfigurationError

BACKENDS = (
    "django_gmail_smtp.backends.GmailSMTPBackend",
    "django_gmail_smtp.backends.CeleryGmailBackend",
)
SETTINGS_NAME = "GMAIL_SMTP"


def backend_in_use() -> bool:
    """True when EMAIL_BACKEND or any MAILERS entry names one of our backends."""
    if is_our_backend(legacy_email_setting("EMAIL_BACKEND", "")):
        return True
    return bool(_our_mailers())


def _our_mailers() -> dict[str, Mapping[str, Any]]:
    """The MAILERS entries (Django 6.1) that use one of our backends, by alias."""
    mailers = getattr(settings, "MAILERS", None) or {}
    return {
        alias: cfg
        for alias, cfg in mailers.items()
        if isinstance(cfg, Mapping) and is_our_backend(cfg.get("BACKEND"))
    }


@register("email")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list:
    from .conf import connection_settings, user_settings

    messages: list = _check_settings_name()
    try:
        user = user_settings()
    except GmailConfigurationError as exc:
        return [*messages, Error(str(exc), id="django_gmail_smtp.E001")]
    messages += _check_unknown_keys(user)
    errors = _check_setting_types(user)
    if errors:
        # The checks below read these values; they would only repeat the same errors.
        return messages + errors
    _host, port, security = connection_settings()
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


def _check_settings_name() -> list:
    """W008: a setting named like GMAIL_SMTP (GMAIL_SMPT, GMAILSMTP) is never read."""
    names = [n for n in dir(settings) if n.isupper() and n != SETTINGS_NAME]
    return [
        Warning(
            f"The setting {name} is not read by django_gmail_smtp; did you mean {SETTINGS_NAME}?",
            hint=f"Rename {name} to {SETTINGS_NAME}.",
            id="django_gmail_smtp.W008",
        )
        for name in difflib.get_close_matches(SETTINGS_NAME, names, n=3, cutoff=0.8)
    ]


def _check_unknown_keys(user: Mapping[str, Any]) -> list:
    """W007: a key GMAIL_SMTP does not have (a typo such as POTR, or a lower-case port)."""
    from .conf import closest_key, known_keys

    known = set(known_keys())
    messages = []
    for key in user:
        if isinstance(key, str) and key in known:
            continue
        suggestion = closest_key(str(key))
        if suggestion is None:
            hint = f"Remove it; the keys are: {', '.join(sorted(known))}."
        elif suggestion == str(key).upper():
            hint = f'Did you mean "{suggestion}"? The keys are upper case.'
        else:
            hint = f'Did you mean "{suggestion}"?'
        messages.append(
            Warning(
                f"{SETTINGS_NAME} has an unknown key {key!r}, which is ignored.",
                hint=hint,
                id="django_gmail_smtp.W007",
            )
        )
    return messages


def _check_setting_types(user: Mapping[str, Any]) -> list:
    """E005: a GMAIL_SMTP value (or EMAIL_TIMEOUT) of the wrong type or out of range;
    E006: the same for the OPTIONS of a MAILERS entry that uses our backend."""
    from .conf import SETTINGS, setting_errors, validate_options

    hint = "Correct the value in your settings; leaving the key out uses the default."
    errors = [Error(text, hint=hint, id="django_gmail_smtp.E005") for text in setting_errors(user)]
    if backend_in_use():
        for spec in SETTINGS.values():
            if not spec.legacy:
                continue
            value = legacy_email_setting(spec.legacy)
            if value is not None and user.get(spec.name) is None:
                try:
                    spec.check(value, spec.legacy)
                except GmailConfigurationError as exc:
                    errors.append(Error(str(exc), hint=hint, id="django_gmail_smtp.E005"))
    for alias, cfg in _our_mailers().items():
        options = cfg.get("OPTIONS") or {}
        source = f'MAILERS["{alias}"]["OPTIONS"]'
        if not isinstance(options, Mapping):
            text = f"{source} is a {type(options).__name__}; give a dict of options."
            errors.append(Error(text, hint=hint, id="django_gmail_smtp.E006"))
            continue
        errors += [
            Error(text, hint=hint, id="django_gmail_smtp.E006")
            for text in validate_options(options, source=source)
        ]
    return errors


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
        cfg.get("BACKEND") == BACKENDS[0] for cfg in _our_mailers().values()
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
        strict = router.strict
    except (DatabaseError, RuntimeError):
        return []  # not migrated yet, or database access not allowed here
    except GmailConfigurationError:
        return []  # a bad setting: check_settings reports it
    if not accounts:
        options = [cfg.get("OPTIONS") for cfg in _our_mailers().values()]
        if any(isinstance(o, Mapping) and o.get("username") for o in options):
            return []  # the MAILERS entry logs in as its "username" option
        if hasattr(settings, "MAILERS"):  # Django >= 6.1: EMAIL_* settings are not allowed
            fallback = "give the MAILERS entry 'username' and 'password' OPTIONS (an App Password)"
            missing = "its MAILERS entry has no 'username' option"
        else:
            fallback = "set EMAIL_HOST_USER and EMAIL_HOST_PASSWORD (an App Password)"
            missing = "EMAIL_HOST_USER / EMAIL_HOST_PASSWORD are not set"
        return [
            Warning(
                "The Gmail backend is configured but there is no active GmailAccount and "
                f"{missing}, so no mail can be sent.",
                hint=f"Add an account in the admin (Gmail SMTP > Gmail accounts), or {fallback}.",
                id="django_gmail_smtp.W001",
            )
        ]
    messages = []
    from email.utils import parseaddr

    for name in ("DEFAULT_FROM_EMAIL", "SERVER_EMAIL"):
        address = parseaddr(str(getattr(settings, name, "") or ""))[1]
        if address and not router.candidates(address):
            fallback_account = settings_account()
            if fallback_account is not None and fallback_account.can_send_as(address):
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


@register("email")
def check_celery(app_configs: Any = None, **kwargs: Any) -> list:
    """E007: CeleryGmailBackend without a Celery app; W009: without a broker URL.

    No network I/O here: this runs on every ``manage.py`` command and ``runserver`` reload."""
    from .celery_setup import celery_problems

    return [problem.as_check_message() for problem in celery_problems(probe=False)]


@register("email", deploy=True)
def check_celery_broker(app_configs: Any = None, **kwargs: Any) -> list:
    """W010 (``check --deploy`` only): the Celery broker does not answer (a probe of ~2 s)."""
    from .celery_setup import celery_backend_in_use, loaded_app, probe_broker

    app = loaded_app() if celery_backend_in_use() else None
    problem = probe_broker(app) if app is not None else None
    return [problem.as_check_message()] if problem is not None else []
