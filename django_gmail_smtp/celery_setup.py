"""Is Celery set up so that mail queued by ``CeleryGmailBackend`` can reach a worker?

Used by the system checks (``django_gmail_smtp.E007``, ``W009``, ``W010``) and by
``manage.py gmail_smtp check``. Three things go wrong silently otherwise, each leaving
outbox rows ``queued`` for ever:

- no Celery app of the project's own is loaded, so the tasks are published through Celery's
  built-in fallback app, which knows nothing of the Django settings (E007);
- the app has no broker URL, so Celery uses its default ``amqp://guest@localhost//`` (W009);
- the broker does not answer (W010). Finding that out needs the network, so it is only
  probed on request: by ``gmail_smtp check`` and by ``manage.py check --deploy``.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from celery import Celery
    from django.core.checks import CheckMessage

CELERY_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"
DOCS_URL = "https://django-gmail-smtp.readthedocs.io/en/latest/celery.html"
PROBE_TIMEOUT = 2.0  # seconds: long enough for a broker across a network, short for a command

NO_APP = "django_gmail_smtp.E007"
DEFAULT_BROKER = "django_gmail_smtp.W009"
BROKER_UNREACHABLE = "django_gmail_smtp.W010"


class Level(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the Celery set-up, in plain words."""

    id: str
    level: Level
    msg: str
    hint: str
    #: True when queued mail cannot be sent at all until this is fixed.
    stops_mail: bool

    def as_check_message(self) -> CheckMessage:
        """The Django system-check message (Error or Warning) for this problem."""
        from django.core.checks import Error, Warning

        cls = Error if self.level is Level.ERROR else Warning
        return cls(self.msg, hint=self.hint, id=self.id)


def celery_backend_in_use() -> bool:
    """True when EMAIL_BACKEND or any MAILERS entry (Django 6.1) is ``CeleryGmailBackend``."""
    from .checks import _our_mailers
    from .conf import legacy_email_setting

    if legacy_email_setting("EMAIL_BACKEND", "") == CELERY_BACKEND:  # Django < 6.1
        return True
    return any(cfg.get("BACKEND") == CELERY_BACKEND for cfg in _our_mailers().values())


def loaded_app() -> Celery | None:
    """The Celery app the tasks are sent with, or None when the project loaded none.

    ``celery.current_app`` never says "none": when no app was created it makes Celery's
    fallback app (``Celery("default", set_as_current=False)``), which does not read the Django
    settings. Look at Celery's state directly so that this check creates nothing.
    """
    from celery import _state

    tls = getattr(_state, "_tls", None)
    app = getattr(tls, "current_app", None) or getattr(_state, "default_app", None)
    if app is None or _is_fallback(app):
        return None
    return app


def _is_fallback(app: Celery) -> bool:
    # What celery._state.get_current_app() creates when no app exists.
    return (
        app.main == "default"
        and not app.set_as_current  # type: ignore[attr-defined]  # not in celery-types
        and not app.fixups  # type: ignore[attr-defined]  # not in celery-types
    )


def configured_broker_url(app: Celery) -> str | None:
    """The broker URL the app publishes to, or None when it is left at Celery's default."""
    # conf.broker_url includes the CELERY_BROKER_URL environment variable.
    return app.conf.broker_write_url or app.conf.broker_url or None


def broker_for_display(app: Celery) -> str:
    """The broker URL the app publishes to, with its password masked."""
    return app.connection_for_write().as_uri()


def celery_problems(probe: bool = False) -> list[Problem]:
    """What keeps queued mail from being sent; empty when the Celery backend is not used.

    With ``probe``, also connect to the broker (at most ``PROBE_TIMEOUT`` seconds).
    """
    if not celery_backend_in_use():
        return []
    app = loaded_app()
    if app is None:
        return [_no_app_problem()]
    problems = []
    if configured_broker_url(app) is None:
        problems.append(_default_broker_problem(app))
    if probe:
        unreachable = probe_broker(app)
        if unreachable is not None:
            problems.append(unreachable)
    return problems


def probe_broker(app: Celery, timeout: float = PROBE_TIMEOUT) -> Problem | None:
    """Connect to the app's broker once, without retrying; a Problem when that fails."""
    connection = app.connection_for_write(connect_timeout=timeout)
    if connection.transport_cls in ("redis", "rediss", "sentinel"):
        # kombu's Redis transport takes its timeouts from the transport options; without a
        # read timeout, a server that accepts but never replies would hang the probe.
        options = connection.transport_options
        assert options is not None  # a Connection always has a dict (None: the class default)
        options["socket_connect_timeout"] = timeout
        options["socket_timeout"] = timeout
    url = connection.as_uri()
    try:
        connection.ensure_connection(max_retries=0)
    except Exception as exc:  # kombu raises many kinds (OSError, OperationalError, ImportError)
        return Problem(
            id=BROKER_UNREACHABLE,
            level=Level.WARNING,
            msg=f"Could not connect to the Celery broker {url} "
            f"({_error_text(exc, connection)}), so mail queued by CeleryGmailBackend stays "
            "queued until the broker can be reached.",
            hint="Start the broker, or correct CELERY_BROKER_URL (host, port, user and "
            "password) so that this machine can reach it; then run "
            "`manage.py gmail_smtp check` again.",
            stops_mail=True,
        )
    finally:
        connection.release()
    return None


def _error_text(exc: BaseException, connection: object) -> str:
    text = f"{type(exc).__name__}: {exc}"
    password = getattr(connection, "password", None)
    if password:  # never echo the broker password, whatever the client library put in its error
        text = text.replace(str(password), "**")
    return text


def _project_package() -> str:
    """The package that holds the settings module ("proj" for "proj.settings")."""
    # Under override_settings SETTINGS_MODULE reads None; the environment still names it.
    module = getattr(settings, "SETTINGS_MODULE", None) or os.environ.get(
        "DJANGO_SETTINGS_MODULE", ""
    )
    package = module.rpartition(".")[0]
    return package or "proj"


def _no_app_problem() -> Problem:
    package = _project_package()
    path = package.replace(".", "/")
    return Problem(
        id=NO_APP,
        level=Level.ERROR,
        msg="CeleryGmailBackend is configured, but no Celery app is loaded, so queued mail will "
        "never be sent: it stays in the outbox as queued (Celery falls back to an app that "
        "ignores your CELERY_* settings).",
        hint=f"Create {path}/celery.py with `app = Celery({package!r})` and "
        '`app.config_from_object("django.conf:settings", namespace="CELERY")`, and load it '
        f"from {path}/__init__.py with `from .celery import app as celery_app`. See "
        f'"Sending from Celery" in the documentation: {DOCS_URL}',
        stops_mail=True,
    )


def _default_broker_problem(app: Celery) -> Problem:
    if _reads_django_settings(app):
        namespace = app.namespace  # type: ignore[attr-defined]  # not in celery-types
        name = f"{namespace}_BROKER_URL" if namespace else "BROKER_URL"
        hint = f'Set {name} (for instance "redis://localhost:6379/0") in your settings; set it '
    else:
        hint = (
            "The app does not read the Django settings: add "
            '`app.config_from_object("django.conf:settings", namespace="CELERY")` to it and '
            'set CELERY_BROKER_URL (for instance "redis://localhost:6379/0"), or give it '
            "`broker_url`; set it "
        )
    return Problem(
        id=DEFAULT_BROKER,
        level=Level.WARNING,
        msg=f"The Celery app {app.main!r} has no broker URL, so queued mail goes to Celery's "
        f"default broker {broker_for_display(app)}; unless a RabbitMQ runs there, it stays "
        "queued.",
        hint=hint + "explicitly even if the default is what you want.",
        stops_mail=False,
    )


def _reads_django_settings(app: Celery) -> bool:
    source = getattr(app, "_config_source", None)
    return source is settings or source == "django.conf:settings"
