"""The one place settings are read.

Order of precedence for every option: keyword arguments given to a backend (which is also how a
Django 6.1 ``MAILERS`` entry's ``OPTIONS`` arrive), then the ``GMAIL_SMTP`` settings dict, then
(for ``TIMEOUT``, in projects without ``MAILERS``) Django's ``EMAIL_TIMEOUT``, then the default
below. :data:`SETTINGS` describes every key; values are checked as they are read.

The delivery path reads a mailer's options once, as one immutable :class:`MailerSettings`:
:func:`resolve` builds it from a backend's keyword arguments, :func:`for_mailer` from a
``MAILERS`` alias (cached per alias until a setting changes). An outbox row stores the alias
that queued it, so the Celery worker resolves the very same options as the backend did.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import django
from django.conf import settings
from django.utils import timezone
from django.utils.module_loading import import_string

from .enums import Priority
from .exceptions import GmailConfigurationError

DJANGO_61 = django.VERSION >= (6, 1)

try:
    from django.core.signals import setting_changed
except ImportError:  # Django < 4.2 kept it in django.test.signals only
    from django.test.signals import setting_changed

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
    "PUBLISH_IN_BACKGROUND": True,  # hand committed rows to Celery from a thread, not the caller
    "SWEEP_INTERVAL": 60,  # seconds between sweeps in the ready beat schedule
    "SENDING_LEASE": 600,  # seconds a worker may hold a row in "sending" before it is re-queued
    "POOL_IDLE_CHECK": 30,  # seconds idle after which a pooled connection is probed (NOOP)
    "STREAM_BATCH": 20,  # due messages of one account a worker takes per claim and streams
    "CONNECTIONS_PER_ACCOUNT": 1,  # connections to one account open at once, across the site
    "CONNECTION_LEASE": 60,  # seconds a worker's hold on an account's connection lasts unrenewed
    "CONNECTION_IDLE": 10,  # seconds a worker keeps an idle account connection (and its hold)
    "BODY_RETENTION_DAYS": 7,  # bodies of sent/failed/cancelled mail are dropped after; None: keep
    "MAX_MESSAGE_SIZE": 35882577,  # bytes; larger messages are refused (Gmail's advertised SIZE)
    "TRANSPORT_CLASS": "django_gmail_smtp.transport.ConnectionPool",
    # Newsletters (the optional django_gmail_smtp.newsletters app)
    "SITE_URL": None,  # base of absolute links in mail; None: the sites framework's domain
    "NEWSLETTER_TICK": 60,  # seconds between planner ticks in the ready beat schedule
    "NEWSLETTER_AUDIENCES": {},  # name -> dotted path of a callable returning a queryset
    "NEWSLETTER_ALIGNED_DOMAINS": [],  # From domains with SPF, DKIM and DMARC aligned
    "NEWSLETTER_BREAKER_RATE": 0.05,  # share of permanent refusals that pauses a campaign
    "NEWSLETTER_BREAKER_MINIMUM": 50,  # messages sent before that share is judged
    "NEWSLETTER_CONFIRMATIONS_PER_HOUR": 30,  # subscribe-form confirmation mails; None: no cap
    # Bounces read back from each account's inbox over IMAP
    "IMAP_HOST": "imap.gmail.com",
    "IMAP_PORT": 993,  # implicit TLS
    "BOUNCE_INTERVAL": None,  # seconds between bounce reads in the beat schedule; None: not run
    "BOUNCE_SOFT_LIMIT": 3,  # soft bounces of an address within 30 days before it is suppressed
    "BOUNCE_ACTION": None,  # None: only read; "label": add BOUNCE_LABEL; "move": move there
    "BOUNCE_LABEL": "Bounces",  # the Gmail label (IMAP folder) of processed reports
}

SECURITY_CHOICES = ("starttls", "ssl")
BOUNCE_ACTIONS = ("label", "move")
PRIORITY_CHOICES = ("transactional", "bulk")


# --- the settings table ------------------------------------------------------------------------
# One entry per key: what it means and what a valid value is. The system checks, get_setting()
# (which validates on read, so a worker never dies on a raw ValueError) and the docs' settings
# reference all come from this table.


class _Invalid(ValueError):
    """Raised by a validator; its text (if any) adds why to the standard message."""


Validator = Callable[[Any], Any]


@dataclass(frozen=True)
class Setting:
    """One ``GMAIL_SMTP`` key: its type/range check and its documentation."""

    name: str
    #: what a valid value is, completing "give ...": "a number of seconds such as 30"
    expected: str
    #: returns the value to use (possibly normalised), or raises ``_Invalid``
    validate: Validator
    description: str
    #: the value is a secret: messages show its type, never the value
    secret: bool = False
    #: a Django ``EMAIL_*`` setting used when the key is unset (projects without MAILERS)
    legacy: str | None = None

    def check(self, value: Any, label: str) -> Any:
        """``value`` as the app uses it; :class:`GmailConfigurationError` when it is invalid."""
        try:
            return self.validate(value)
        except _Invalid as exc:
            raise GmailConfigurationError(self.message(value, label, str(exc))) from None

    def message(self, value: Any, label: str, reason: str = "") -> str:
        kind = type(value).__name__
        article = "an" if kind[:1] in "aeiou" else "a"
        shown = f"{article} {kind}" if self.secret else f"{_short_repr(value)} ({kind})"
        why = f" ({reason})" if reason else ""
        return f"{label} is {shown}{why}; give {self.expected}."


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(
    *, integer: bool = False, minimum: float | None = None, above: float | None = None
) -> Validator:
    """A real number (an int with ``integer``), never a bool or a string such as "30s"."""
    kinds: tuple[type[float], ...] = (int,) if integer else (int, float)

    def validate(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _Invalid
        if value != value or value in (float("inf"), float("-inf")):  # NaN, infinity
            raise _Invalid
        if minimum is not None and value < minimum:
            raise _Invalid
        if above is not None and value <= above:
            raise _Invalid
        return value

    return validate


def _port(value: Any) -> int:
    value = _number(integer=True, minimum=1)(value)
    if value > 65535:
        raise _Invalid
    return value


def _share(value: Any) -> float:
    value = _number(minimum=0)(value)
    if value >= 1:
        raise _Invalid
    return value


def _bool(value: Any) -> bool:
    # Real booleans only: the string "False" is truthy, so it is refused, not guessed at.
    if not isinstance(value, bool):
        raise _Invalid
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid
    return value


def _maybe_empty_text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        raise _Invalid
    return value


def _path(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise _Invalid
    return os.fspath(value)


def _or_empty(validate: Validator) -> Validator:
    """Also accept "" (as an unset environment variable gives it): the same as None."""

    def check(value: Any) -> Any:
        return value if value == "" else validate(value)

    return check


def _choice(*choices: str) -> Validator:
    def validate(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise _Invalid
        return value.lower()

    return validate


def _keys(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(k, (str, bytes)) for k in value):
        raise _Invalid
    return value


def _audiences(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and "." in v for k, v in value.items()
    ):
        raise _Invalid
    return dict(value)


def _domains(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise _Invalid
    if not all(isinstance(d, str) and "." in d and "@" not in d for d in value):
        raise _Invalid("each a domain such as 'example.com'")
    return [d.strip().lower() for d in value]


def _queues(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise _Invalid
    unknown = [k for k in value if k not in PRIORITY_CHOICES]
    if unknown:
        raise _Invalid(f"unknown priority {unknown[0]!r}")
    if not all(isinstance(v, str) and v.strip() for v in value.values()):
        raise _Invalid
    return {**DEFAULTS["QUEUES"], **value}  # a partial dict keeps the other default


def _transport_class(value: Any) -> Any:
    # Imported when a mailer's transport is built, so a typo is reported there by name.
    if isinstance(value, type):
        return value
    if not isinstance(value, str) or "." not in value.strip(". "):
        raise _Invalid
    return value


def _database_alias(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid
    if value not in settings.DATABASES:
        raise _Invalid(f"there is no {value!r} in DATABASES")
    return value


_SECONDS = "a number of seconds"
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("HOST", "a host name such as 'smtp.gmail.com'", _text, "The SMTP server."),
        Setting(
            "PORT",
            "a whole number from 1 to 65535 such as 587",
            _port,
            "The SMTP port; None derives it from SECURITY (587 for starttls, 465 for ssl).",
        ),
        Setting(
            "SECURITY",
            "'starttls' (port 587) or 'ssl' (port 465)",
            _choice(*SECURITY_CHOICES),
            "How the connection is secured; None derives it from PORT.",
        ),
        Setting(
            "TIMEOUT",
            f"{_SECONDS} such as 30",
            _number(above=0),
            "Seconds to wait for the server at each step (Django's EMAIL_TIMEOUT when unset).",
            legacy="EMAIL_TIMEOUT",
        ),
        Setting(
            "CA_FILE",
            "the path of a PEM file of CA certificates, or None",
            _or_empty(_path),
            "Extra CA certificates to trust (a local or intercepting server).",
        ),
        Setting(
            "EHLO_HOSTNAME",
            "a fully-qualified host name such as 'mail.example.com', or None",
            _or_empty(_text),
            "The name sent with EHLO; socket.getfqdn() when unset.",
        ),
        Setting("TOKEN_URI", "an https:// URL", _url, "Google's OAuth token endpoint."),
        Setting("AUTH_URI", "an https:// URL", _url, "Google's OAuth consent screen."),
        Setting(
            "CLIENT_ID",
            "the OAuth client id (a string)",
            _maybe_empty_text,
            "The OAuth client id used for accounts that have none of their own.",
        ),
        Setting(
            "CLIENT_SECRET",
            "the OAuth client secret (a string)",
            _maybe_empty_text,
            "The OAuth client secret used for accounts that have none of their own.",
            secret=True,
        ),
        Setting(
            "OAUTH_REDIRECT_URI",
            "an https:// URL, or None",
            _or_empty(_url),
            "Connect with Google's callback URL; built from the request when unset.",
        ),
        Setting(
            "ENCRYPTION_KEYS",
            "a list of keys (strings), newest first",
            _keys,
            "Keys that encrypt stored credentials; derived from SECRET_KEY when unset.",
            secret=True,
        ),
        Setting(
            "STRICT_FROM",
            "True or False (a bool, not a string)",
            _bool,
            "Refuse mail whose From no account can send as, instead of sending it from the "
            "default account.",
        ),
        Setting(
            "MAX_RECIPIENTS_PER_MESSAGE",
            "a whole number of at least 1 such as 100",
            _number(integer=True, minimum=1),
            "Recipients (To, Cc and Bcc) allowed in one message; Gmail accepts 100.",
        ),
        Setting(
            "TOKEN_REFRESH_MARGIN",
            f"{_SECONDS} of at least 0 such as 300",
            _number(minimum=0),
            "Seconds before expiry an OAuth access token is treated as expired.",
        ),
        Setting(
            "QUOTA_DATABASE",
            "the alias of a database in DATABASES, or None",
            _or_empty(_database_alias),
            "The database alias of the quota ledger; None: 'default'.",
        ),
        Setting(
            "RESERVED_SHARE",
            "a fraction from 0 up to (not including) 1 such as 0.1",
            _share,
            "Share of each account's quota kept for transactional mail.",
        ),
        Setting(
            "PRIORITY",
            "'transactional' or 'bulk'",
            _choice(*PRIORITY_CHOICES),
            "The default priority of mail.",
        ),
        Setting(
            "QUEUES",
            "a dict such as {'transactional': 'gmail_smtp.transactional', "
            "'bulk': 'gmail_smtp.bulk'}",
            _queues,
            "The Celery queue of each priority.",
        ),
        Setting(
            "RETRY_BASE_DELAY",
            f"{_SECONDS} above 0 such as 30",
            _number(above=0),
            "Seconds before the first retry of a temporary failure.",
        ),
        Setting(
            "RETRY_MAX_DELAY",
            f"{_SECONDS} above 0 such as 3600",
            _number(above=0),
            "The longest wait between retries.",
        ),
        Setting(
            "MAX_ATTEMPTS",
            "a whole number of at least 1 such as 8",
            _number(integer=True, minimum=1),
            "Temporary failures before a message is failed.",
        ),
        Setting(
            "SWEEP_GRACE",
            f"{_SECONDS} of at least 0 such as 60",
            _number(minimum=0),
            "Seconds a queued message may wait for its task before the sweeper re-enqueues it.",
        ),
        Setting(
            "PUBLISH_IN_BACKGROUND",
            "True or False (a bool, not a string)",
            _bool,
            "Hand committed messages to Celery from a thread of the caller's process, so that "
            "send_mail() never waits for the broker (False: in the caller's thread, as its "
            "transaction commits).",
        ),
        Setting(
            "SWEEP_INTERVAL",
            f"{_SECONDS} above 0 such as 60",
            _number(above=0),
            "Seconds between sweeps in the ready beat schedule.",
        ),
        Setting(
            "SENDING_LEASE",
            f"{_SECONDS} above 0 such as 600",
            _number(above=0),
            "Seconds a worker may hold a message in 'sending' before it is re-queued.",
        ),
        Setting(
            "POOL_IDLE_CHECK",
            f"{_SECONDS} of at least 0 such as 30",
            _number(minimum=0),
            "Seconds idle after which a pooled connection is probed (NOOP) before reuse.",
        ),
        Setting(
            "STREAM_BATCH",
            "a whole number of at least 1 such as 20",
            _number(integer=True, minimum=1),
            "Due messages of one account a worker takes in one claim and streams over its "
            "connection (RFC 2920 pipelining), with their quota reserved and their outcomes "
            "recorded as each is accepted.",
        ),
        Setting(
            "CONNECTIONS_PER_ACCOUNT",
            "a whole number of at least 1 such as 1",
            _number(integer=True, minimum=1),
            "Connections to one Gmail account that the site's workers keep open at once, "
            "whatever their number and concurrency (Gmail answers too many logins with 454).",
        ),
        Setting(
            "CONNECTION_LEASE",
            f"{_SECONDS} above 0 such as 60",
            _number(above=0),
            "Seconds a worker's hold on an account's connection lasts without renewal: the "
            "hold of a worker that died is taken over after this.",
        ),
        Setting(
            "CONNECTION_IDLE",
            f"{_SECONDS} of at least 0 such as 10",
            _number(minimum=0),
            "Seconds a worker keeps an account's connection open (and sends that account's new "
            "mail over it) after its queue ran dry, before closing it for other workers.",
        ),
        Setting(
            "BODY_RETENTION_DAYS",
            "a number of days of at least 0 such as 7, or None to keep bodies",
            _number(minimum=0),
            "Days after which the sweeper drops the bodies of sent, failed and cancelled mail.",
        ),
        Setting(
            "MAX_MESSAGE_SIZE",
            "a whole number of bytes of at least 1 such as 35882577",
            _number(integer=True, minimum=1),
            "Messages larger than this many bytes are refused before they are queued or sent.",
        ),
        Setting(
            "TRANSPORT_CLASS",
            "the dotted path of a transport class such as "
            "'django_gmail_smtp.transport.ConnectionPool', or the class",
            _transport_class,
            "What connects to Gmail and sends (see transport.Transport): the SMTP connection "
            "pool, or a subclass or another transport of your own.",
        ),
        Setting(
            "SITE_URL",
            "the site's base URL such as 'https://www.example.com', or None",
            _or_empty(_url),
            "Base of absolute links in mail (unsubscribe, archive, confirm); None: https:// and "
            "the sites framework's current domain.",
        ),
        Setting(
            "NEWSLETTER_TICK",
            f"{_SECONDS} above 0 such as 60",
            _number(above=0),
            "Seconds between newsletter planner ticks in the ready beat schedule.",
        ),
        Setting(
            "NEWSLETTER_AUDIENCES",
            "a dict of names to dotted paths of callables returning a queryset, such as "
            "{'active users': 'myapp.audiences.active_users'}",
            _audiences,
            "Audiences a campaign may be sent to instead of a list (any model with an email "
            "field), offered in the admin.",
        ),
        Setting(
            "NEWSLETTER_ALIGNED_DOMAINS",
            "a list of domains such as ['example.com']",
            _domains,
            "From domains whose SPF, DKIM and DMARC are aligned: their campaigns may send more "
            "than 5,000 messages a day (Gmail's bulk-sender threshold).",
        ),
        Setting(
            "NEWSLETTER_BREAKER_RATE",
            "a fraction from 0 up to 1 such as 0.05",
            _share,
            "A campaign pauses itself once this share of its messages is refused permanently.",
        ),
        Setting(
            "NEWSLETTER_CONFIRMATIONS_PER_HOUR",
            "a whole number of at least 1 such as 30, or None for no cap",
            _number(integer=True, minimum=1),
            "Confirmation mails the subscribe forms may send in an hour, all lists together; "
            "past it a sign-up is asked to come back later (nothing is lost), so a script "
            "cannot use up the quota that password resets need.",
        ),
        Setting(
            "NEWSLETTER_BREAKER_MINIMUM",
            "a whole number of at least 1 such as 20",
            _number(integer=True, minimum=1),
            "Messages a campaign sends before its refusal rate is judged.",
        ),
        Setting(
            "IMAP_HOST",
            "a host name such as 'imap.gmail.com'",
            _text,
            "The IMAP server the bounce reader logs in to (implicit TLS, verified like SMTP's, "
            "with CA_FILE).",
        ),
        Setting(
            "IMAP_PORT",
            "a whole number from 1 to 65535 such as 993",
            _port,
            "The IMAP server's port (implicit TLS).",
        ),
        Setting(
            "BOUNCE_INTERVAL",
            f"{_SECONDS} above 0 such as 600, or None",
            _number(above=0),
            "Seconds between bounce reads in the ready beat schedule; None (the default) leaves "
            "the bounce reader out of it (run `manage.py gmail_smtp bounces` instead).",
        ),
        Setting(
            "BOUNCE_SOFT_LIMIT",
            "a whole number of at least 1 such as 3",
            _number(integer=True, minimum=1),
            "Soft (temporary) bounces of an address within 30 days before the newsletters "
            "suppress it.",
        ),
        Setting(
            "BOUNCE_ACTION",
            "None, 'label' or 'move'",
            _or_empty(_choice(*BOUNCE_ACTIONS)),
            "What the bounce reader does with a report it has processed: None only reads it; "
            "'label' adds the Gmail label BOUNCE_LABEL (an IMAP copy); 'move' moves it there, "
            "out of the inbox.",
        ),
        Setting(
            "BOUNCE_LABEL",
            "a label (IMAP folder) name such as 'Bounces'",
            _text,
            "The Gmail label (IMAP folder) BOUNCE_ACTION files processed reports under.",
        ),
    )
}


def user_settings() -> Mapping[str, Any]:
    """The ``GMAIL_SMTP`` settings dict (empty when unset)."""
    value = getattr(settings, "GMAIL_SMTP", None) or {}
    if not isinstance(value, Mapping):
        raise GmailConfigurationError(
            f"GMAIL_SMTP must be a dict of options, not {type(value).__name__}. "
            'Write it as GMAIL_SMTP = {"HOST": "smtp.gmail.com", ...}.'
        )
    return value


def get_setting(name: str, options: Mapping[str, Any] | None = None, default: Any = None) -> Any:
    """Option ``name`` (upper case): from ``options`` (lower-case keys), GMAIL_SMTP, DEFAULTS.

    A value of the wrong type or out of range raises :class:`GmailConfigurationError` naming
    the key, the value's type and what to give instead. The delivery path reads
    :class:`MailerSettings` instead (:func:`resolve`, :func:`for_mailer`); this stays for the
    settings that are not a mailer's (``SWEEP_GRACE``, ``QUEUES``, ...).
    """
    return _lookup(name, options, None, default)


def _lookup(name: str, options: Mapping[str, Any] | None, source: str | None, default: Any) -> Any:
    spec = SETTINGS.get(name)
    if options:
        value = options.get(name.lower())
        if value is not None:
            label = f'{source}["{name.lower()}"]' if source else f'the "{name.lower()}" option'
            return spec.check(value, label) if spec else value
    user = user_settings()
    if name in user and user[name] is not None:
        return spec.check(user[name], f'GMAIL_SMTP["{name}"]') if spec else user[name]
    if spec is not None and spec.legacy:
        value = legacy_email_setting(spec.legacy)
        if value is not None:
            return spec.check(value, spec.legacy)
    if name in DEFAULTS and DEFAULTS[name] is not None:
        return DEFAULTS[name]
    return default


def setting_errors(values: Mapping[str, Any], *, source: str = "GMAIL_SMTP") -> list[str]:
    """Messages for the known keys of ``values`` whose value has the wrong type or range.

    ``values`` uses the upper-case keys of GMAIL_SMTP; ``None`` means "use the default".
    """
    errors = []
    for name, value in values.items():
        spec = SETTINGS.get(name) if isinstance(name, str) else None
        if spec is None or value is None:
            continue
        try:
            spec.check(value, f'{source}["{name}"]')
        except GmailConfigurationError as exc:
            errors.append(str(exc))
    return errors


def validate_options(options: Mapping[str, Any], *, source: str) -> list[str]:
    """Messages for backend keyword options (lower case, as a MAILERS entry passes them)
    whose value has the wrong type or range. ``source`` names where they came from, such as
    ``'MAILERS["default"]["OPTIONS"]'``; names that are not settings are left to the caller.
    """
    errors = []
    for name, value in options.items():
        spec = SETTINGS.get(name.upper()) if isinstance(name, str) else None
        if spec is None or value is None:
            continue
        try:
            spec.check(value, f'{source}["{name}"]')
        except GmailConfigurationError as exc:
            errors.append(str(exc))
    return errors


def ensure_valid_options(options: Mapping[str, Any], *, source: str) -> None:
    """Raise :class:`GmailConfigurationError` listing every invalid option (see
    :func:`validate_options`)."""
    errors = validate_options(options, source=source)
    if errors:
        raise GmailConfigurationError(" ".join(errors))


def known_keys() -> list[str]:
    """Every key GMAIL_SMTP may hold."""
    return sorted(set(DEFAULTS) | set(SETTINGS))


def closest_key(name: str, candidates: Iterable[str] | None = None) -> str | None:
    """The valid key ``name`` was probably meant to be (``POTR`` -> ``PORT``), or None."""
    candidates = list(known_keys() if candidates is None else candidates)
    upper = name.upper()
    if upper in candidates:
        return upper
    matches = difflib.get_close_matches(upper, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


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
    # LazySettings forwards is_overridden to Settings; the django-stubs plugin does not see it.
    if not settings.is_overridden(name):  # type: ignore[misc]
        return default  # Django's defaults are empty; reading one warns on Django 6.1
    if DJANGO_61:
        # Django >= 6.1 warns about EMAIL_* settings once at startup; reading one here would
        # repeat that warning as if it came from this app.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(settings, name, default)
    return getattr(settings, name, default)  # Django < 6.1


def connection_settings(options: Mapping[str, Any] | None = None) -> tuple[str, int, str]:
    """Return ``(host, port, security)`` with PORT and SECURITY derived from each other."""
    if isinstance(options, MailerSettings):
        return options.host, options.port, options.security
    port, security = _port_and_security(
        get_setting("PORT", options), get_setting("SECURITY", options)
    )
    return get_setting("HOST", options), port, security


def _port_and_security(port: int | None, security: str | None) -> tuple[int, str]:
    """PORT and SECURITY derived from each other: 587/starttls, 465/ssl."""
    if port is None:
        port = 465 if security == "ssl" else 587
    if security is None:
        security = "ssl" if port == 465 else "starttls"
    return port, security


# --- one mailer's settings, resolved once ------------------------------------------------------

#: the GMAIL_SMTP keys a backend takes per mailer (lower case, as keyword arguments or a
#: MAILERS entry's OPTIONS); the others (QUEUES, SWEEP_*, ...) are the site's, not a mailer's
MAILER_OPTIONS = (
    "host",
    "port",
    "security",
    "timeout",
    "ca_file",
    "ehlo_hostname",
    "strict_from",
    "quota_database",
    "max_recipients_per_message",
    "reserved_share",
    "max_message_size",
    "priority",
    "retry_base_delay",
    "retry_max_delay",
    "max_attempts",
    "token_refresh_margin",
    "pool_idle_check",
    "transport_class",
)
#: backend arguments that belong to the mailer but are not GMAIL_SMTP keys
LOGIN_OPTIONS = ("account", "username", "password", "use_tls", "use_ssl")

#: our backends' dotted paths (a subclass of them counts as ours too, see is_our_backend)
BACKENDS = (
    "django_gmail_smtp.backends.GmailSMTPBackend",
    "django_gmail_smtp.backends.CeleryGmailBackend",
)


@dataclass(frozen=True, slots=True)
class MailerSettings:
    """Every option of one mailer, resolved (defaults < GMAIL_SMTP < the mailer's own options)
    and validated once; immutable and hashable, so a worker can key connection pools by it.

    Build it with :func:`resolve` (a backend's keyword arguments) or :func:`for_mailer` (a
    ``MAILERS`` alias). ``alias`` is where it came from and takes no part in comparisons: two
    mailers with the same options are the same settings. ``repr()`` never shows the password.
    """

    host: str
    port: int
    security: str
    timeout: float
    ca_file: str | None
    ehlo_hostname: str | None
    strict_from: bool
    quota_database: str
    max_recipients_per_message: int
    reserved_share: float
    max_message_size: int
    priority: Priority
    retry_base_delay: float
    retry_max_delay: float
    max_attempts: int
    token_refresh_margin: float
    pool_idle_check: float
    transport_class: str | type
    #: send everything from this account's address (the ``account`` option)
    account: str | None = None
    #: log in as this address, with ``password`` as its App Password (Django's auth_user)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    alias: str = field(default="", compare=False)

    @property
    def source(self) -> str:
        """Where these options are set, for messages: ``MAILERS["x"]["OPTIONS"]`` or GMAIL_SMTP."""
        return f'MAILERS["{self.alias}"]["OPTIONS"]' if self.alias else "GMAIL_SMTP"

    @property
    def login(self) -> tuple[str, str | None] | None:
        """``(username, password)`` when the mailer logs in as a given address, else None."""
        return (self.username, self.password) if self.username else None

    def transport(self) -> type:
        """The transport class (``transport_class``), imported."""
        value = self.transport_class
        if isinstance(value, type):
            return value
        try:
            return import_string(value)
        except ImportError as exc:
            raise GmailConfigurationError(
                f"The transport_class {value!r} ({self.source}) cannot be imported ({exc}). "
                "Give the dotted path of a transport class, such as "
                "'django_gmail_smtp.transport.ConnectionPool'."
            ) from None


SettingsLike = MailerSettings | Mapping[str, Any] | None


def resolve(
    options: Mapping[str, Any] | None = None, *, alias: str = "", source: str | None = None
) -> MailerSettings:
    """One mailer's settings from its options (lower-case keys: a backend's keyword arguments
    or a ``MAILERS`` entry's ``OPTIONS``), GMAIL_SMTP and the defaults.

    Every invalid value is reported at once, in one :class:`GmailConfigurationError` naming
    each (``source`` names where the options came from in those messages; by default the
    ``MAILERS`` entry of ``alias``). Names that are not options are left to the caller.
    """
    options = dict(options or {})
    if source is None and alias:
        source = f'MAILERS["{alias}"]["OPTIONS"]'
    if options.get("security") is None:  # Django's EMAIL_USE_SSL / EMAIL_USE_TLS spelling
        if options.get("use_ssl"):
            options["security"] = "ssl"
        elif options.get("use_tls"):
            options["security"] = "starttls"
    values: dict[str, Any] = {}
    errors: list[str] = []
    for name in MAILER_OPTIONS:
        try:
            values[name] = _lookup(name.upper(), options, source, None)
        except GmailConfigurationError as exc:
            errors.append(str(exc))
    for name in ("account", "username", "password"):
        value = options.get(name)
        if value is not None and not isinstance(value, str):
            label = f'{source}["{name}"]' if source else f'the "{name}" option'
            what = "an address" if name != "password" else "the App Password (a string)"
            errors.append(f"{label} is a {type(value).__name__}; give {what}.")
    if errors:
        raise GmailConfigurationError(" ".join(errors))
    port, security = _port_and_security(values.pop("port"), values.pop("security"))
    return _build(values, port, security, options, alias)


def _build(
    values: dict[str, Any], port: int, security: str, options: Mapping[str, Any], alias: str
) -> MailerSettings:
    return MailerSettings(
        host=values["host"],
        port=port,
        security=security,
        timeout=float(values["timeout"]),
        ca_file=values["ca_file"] or None,
        ehlo_hostname=values["ehlo_hostname"] or None,
        strict_from=bool(values["strict_from"]),
        quota_database=str(values["quota_database"] or "default"),
        max_recipients_per_message=int(values["max_recipients_per_message"]),
        reserved_share=float(values["reserved_share"]),
        max_message_size=int(values["max_message_size"]),
        priority=Priority(values["priority"]),
        retry_base_delay=float(values["retry_base_delay"]),
        retry_max_delay=float(values["retry_max_delay"]),
        max_attempts=int(values["max_attempts"]),
        token_refresh_margin=float(values["token_refresh_margin"]),
        pool_idle_check=float(values["pool_idle_check"]),
        transport_class=values["transport_class"],
        account=options.get("account") or None,
        username=options.get("username") or None,
        password=options.get("password") or None,
        alias=alias,
    )


_mailers: dict[str, MailerSettings] = {}


def for_mailer(alias: str | None) -> MailerSettings:
    """The settings of the mailer ``alias``: its ``MAILERS`` entry's ``OPTIONS`` over
    GMAIL_SMTP; ``None`` or ``""`` (``EMAIL_BACKEND``, or a backend built directly): GMAIL_SMTP
    alone. Cached per alias until a setting changes.

    An alias that is not in ``MAILERS`` any more, or whose entry no longer uses one of our
    backends, raises :class:`GmailConfigurationError` saying so.
    """
    key = alias or ""
    found = _mailers.get(key)
    if found is None:
        found = _mailers[key] = _from_mailers(key)
    return found


def _from_mailers(alias: str) -> MailerSettings:
    if not alias:
        return resolve()
    mailers = getattr(settings, "MAILERS", None)
    entry = mailers.get(alias) if isinstance(mailers, Mapping) else None
    if not isinstance(entry, Mapping):
        raise GmailConfigurationError(
            f'There is no MAILERS["{alias}"] entry, so mail of that mailer cannot be sent with '
            "its options. Add the entry back to MAILERS (or cancel its mail in the outbox)."
        )
    backend = entry.get("BACKEND")
    if not is_our_backend(backend):
        raise GmailConfigurationError(
            f'MAILERS["{alias}"] no longer uses a django_gmail_smtp backend (its BACKEND is '
            f"{backend!r}), so its mail in the outbox cannot be sent with its options. Point "
            "the entry back at CeleryGmailBackend, or cancel that mail in the outbox."
        )
    options = entry.get("OPTIONS") or {}
    if not isinstance(options, Mapping):
        raise GmailConfigurationError(
            f'MAILERS["{alias}"]["OPTIONS"] is a {type(options).__name__}; give a dict of '
            'options such as {"timeout": 20}.'
        )
    return resolve(options, alias=alias)


def usable_mailers() -> set[str]:
    """The mailer aliases whose settings resolve now ("" for GMAIL_SMTP alone): mail that was
    deferred for the configuration of one of these may be tried again."""
    usable = set()
    mailers = getattr(settings, "MAILERS", None)
    aliases = [""] + (list(mailers) if isinstance(mailers, Mapping) else [])
    for alias in aliases:
        try:
            for_mailer(alias)
        except GmailConfigurationError:
            continue
        usable.add(alias)
    return usable


def is_our_backend(path: Any) -> bool:
    """True for our backends' dotted paths, and for a subclass of them."""
    if path in BACKENDS:
        return True
    if not isinstance(path, str) or not path:
        return False
    from .backends import GmailBackendBase

    try:
        backend = import_string(path)
    except ImportError:
        return False
    return isinstance(backend, type) and issubclass(backend, GmailBackendBase)


def as_settings(options: SettingsLike = None) -> MailerSettings:
    """``options`` as a :class:`MailerSettings`: itself, resolved from a mapping of options,
    or (None) the GMAIL_SMTP settings."""
    if isinstance(options, MailerSettings):
        return options
    if options is None:
        return for_mailer(None)
    return resolve(options)


#: (alias, the options given) -> their MailerSettings: a backend is created for every
#: ``send_mail()``, and resolving its options each time was a tenth of what queueing cost
_resolved: dict[tuple[str, frozenset[tuple[str, type, Any]]], MailerSettings] = {}
#: distinct option sets kept at most (they come from code, so there are few)
RESOLVED_KEPT = 256


def resolve_cached(options: Mapping[str, Any], *, alias: str = "") -> MailerSettings:
    """:func:`resolve`, remembered per alias and options until a setting changes (as
    :func:`for_mailer` is). Options holding a password, or values that cannot be a key, are
    resolved every time; so is anything that raises."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        # With each value's type: True == 1, and a boolean where a number goes is refused.
        key = (alias, frozenset((k, type(v), v) for k, v in given.items()))
        found = _resolved.get(key)
    except TypeError:  # a value that cannot be a key (a list, a dict)
        return resolve(options, alias=alias)
    if found is None:
        found = resolve(options, alias=alias)
        if "password" not in given and len(_resolved) < RESOLVED_KEPT:
            _resolved[key] = found
    return found


def _forget_mailers(**kwargs: Any) -> None:
    _mailers.clear()
    _resolved.clear()


# Tests (override_settings) and a reloaded configuration change settings at run time.
setting_changed.connect(_forget_mailers, dispatch_uid="django_gmail_smtp.conf.forget_mailers")
