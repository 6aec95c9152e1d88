"""Celery set-up checks: E007 (no Celery app), W009 (default broker), W010 (broker unreachable).

Mail queued through CeleryGmailBackend stays ``queued`` silently when Celery is not set up;
the system checks and ``manage.py gmail_smtp check`` say so. Tests that install a Celery app
of their own put the test project's app (tests/celery_app.py) back afterwards.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery, _state
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError

from django_gmail_smtp import celery_setup
from django_gmail_smtp.celery_setup import BROKER_UNREACHABLE, DEFAULT_BROKER, NO_APP
from tests.celery_app import app as project_app

from .conftest import SENDER

ROOT = Path(__file__).resolve().parent.parent
CELERY_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"
CELERY_IDS = {NO_APP, DEFAULT_BROKER, BROKER_UNREACHABLE}
SECRET = "broker-secret"
CLOSED_PORT_BROKERS = [f"redis://:{SECRET}@127.0.0.1:1/0", f"amqp://guest:{SECRET}@127.0.0.1:1//"]


def celery_messages(deploy: bool = False) -> dict[str, str]:
    """The Celery check messages of ``manage.py check --tag email`` (``--deploy`` with deploy)."""
    messages = run_checks(include_deployment_checks=deploy, tags=["email"])
    return {m.id: f"{m.msg}\n{m.hint}" for m in messages if m.id in CELERY_IDS}


@pytest.fixture
def celery_backend(settings, monkeypatch):
    """CeleryGmailBackend as EMAIL_BACKEND (the test runner swaps in locmem); no broker URL in
    the environment (Celery would prefer it to the settings)."""
    settings.EMAIL_BACKEND = CELERY_BACKEND
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    return settings


@pytest.fixture
def no_celery_app() -> Iterator[None]:
    """No Celery app at all, as in a site that never imports its celery.py; restored after."""
    default, current = _state.default_app, _state._tls.current_app
    _state.set_default_app(None)
    _state._set_current_app(None)
    try:
        yield
    finally:
        _state.set_default_app(default)
        _state._set_current_app(current)
    assert celery_setup.loaded_app() is project_app


@pytest.fixture
def use_app(no_celery_app) -> Iterator:
    """Make a new Celery app the one tasks are sent with (as a project's celery.py would)."""
    apps = []

    def use(app: Celery) -> Celery:
        apps.append(app)
        _state.set_default_app(app)
        app.set_current()
        return app

    yield use
    for app in apps:
        app.close()


def new_app(broker_url: str | None = None, *, from_django: bool = True) -> Celery:
    # fixups=[]: no Django fix-up (it would connect signal receivers that outlive the test).
    app = Celery("proj", fixups=[], set_as_current=False)
    if from_django:
        app.config_from_object("django.conf:settings", namespace="CELERY")
    if broker_url is not None:
        app.conf.broker_url = broker_url
    return app


def gmail_smtp_check() -> tuple[str, CommandError | None]:
    out = io.StringIO()
    try:
        call_command("gmail_smtp", "check", stdout=out, stderr=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


def manage_check(settings_module: str, *args: str) -> subprocess.CompletedProcess:
    """``manage.py check`` in a new process, with only the settings module choosing the app."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE")
    }
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "django", "check", "--settings", settings_module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- not in use ------------------------------------------------------------------------------


def test_nothing_is_checked_without_the_celery_backend(settings, no_celery_app):
    """The sync backend does not need Celery: no Celery message even with no app loaded."""
    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
    assert not celery_setup.celery_backend_in_use()
    assert celery_setup.celery_problems(probe=True) == []
    assert celery_messages() == {}


@pytest.mark.skipif(__import__("django").VERSION < (6, 1), reason="MAILERS exists from Django 6.1")
def test_a_mailers_entry_counts_as_using_the_celery_backend(settings, no_celery_app):
    settings.MAILERS = {
        "default": {"BACKEND": "django_gmail_smtp.backends.GmailSMTPBackend"},
        "queued": {"BACKEND": CELERY_BACKEND, "OPTIONS": {}},
    }
    assert celery_setup.celery_backend_in_use()
    assert NO_APP in celery_messages()


# --- 1. no Celery app ------------------------------------------------------------------------


def test_no_celery_app_is_an_error_with_the_fix(celery_backend, no_celery_app):
    """E007: nothing created a Celery app; the message says mail is never sent, and how to fix."""
    assert celery_setup.loaded_app() is None
    text = celery_messages()[NO_APP]
    assert "never be sent" in text
    # tests.settings is the settings module, so the project package is "tests".
    assert "tests/celery.py" in text and "tests/__init__.py" in text
    assert 'config_from_object("django.conf:settings", namespace="CELERY")' in text
    assert celery_setup.DOCS_URL in text
    # Checking must not create Celery's fallback app (it would then stay the default app).
    assert _state.default_app is None


def test_celerys_fallback_app_counts_as_no_app(celery_backend, no_celery_app):
    """What `celery.current_app` gives when no app was created is Celery's fallback: E007."""
    fallback = _state.get_current_app()  # creates it, as the first apply_async would
    assert fallback.main == "default" and _state.default_app is fallback
    assert celery_setup.loaded_app() is None
    assert set(celery_messages()) == {NO_APP}


def test_no_celery_app_fails_gmail_smtp_check(celery_backend, no_celery_app, account, sandbox):
    celery_backend.EMAIL_BACKEND = CELERY_BACKEND  # the sandbox fixture set the sync backend
    out, error = gmail_smtp_check()
    assert "FAIL  Celery: CeleryGmailBackend is configured, but no Celery app is loaded" in out
    assert "tests/celery.py" in out
    assert f"OK    {SENDER}" in out  # the accounts are still checked
    assert str(error) == "queued mail cannot reach a Celery worker; see above for what to fix."


@pytest.mark.integration
def test_manage_py_check_reports_a_site_without_celery_app():
    """End to end, in a fresh process: the settings load no Celery app -> E007, exit status 1;
    the same settings plus the import a project's __init__.py does -> no issue."""
    result = manage_check("tests.settings_nocelery")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "(django_gmail_smtp.E007)" in result.stderr
    assert "tests/celery.py" in result.stderr

    result = manage_check("tests.settings_celery")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "django_gmail_smtp" not in result.stdout + result.stderr


# --- 2. Celery's default broker ----------------------------------------------------------------


def test_default_broker_warns(celery_backend, use_app):
    """W009: the app has no broker URL, so Celery would publish to amqp://guest@localhost//."""
    del celery_backend.CELERY_BROKER_URL
    use_app(new_app())
    assert celery_setup.configured_broker_url(celery_setup.loaded_app()) is None
    messages = celery_messages()
    assert set(messages) == {DEFAULT_BROKER}
    assert "amqp://guest:**@localhost:5672//" in messages[DEFAULT_BROKER]
    assert "Set CELERY_BROKER_URL" in messages[DEFAULT_BROKER]


def test_default_broker_hint_when_the_app_ignores_django_settings(celery_backend, use_app):
    use_app(new_app(from_django=False))
    text = celery_messages()[DEFAULT_BROKER]
    assert "does not read the Django settings" in text
    assert 'config_from_object("django.conf:settings", namespace="CELERY")' in text


@pytest.mark.parametrize(
    "where", ["setting", "app.conf", "environment"], ids=["setting", "conf", "env"]
)
def test_default_broker_set_explicitly_does_not_warn(celery_backend, use_app, monkeypatch, where):
    """The default URL is fine when the user chose it: no W009."""
    url = "amqp://guest@localhost//"
    del celery_backend.CELERY_BROKER_URL
    if where == "setting":
        celery_backend.CELERY_BROKER_URL = url
    elif where == "environment":
        monkeypatch.setenv("CELERY_BROKER_URL", url)
    use_app(new_app(url if where == "app.conf" else None))
    assert celery_messages() == {}


# --- 3. broker unreachable ---------------------------------------------------------------------


@pytest.mark.parametrize("url", CLOSED_PORT_BROKERS, ids=["redis", "amqp"])
def test_unreachable_broker_fails_gmail_smtp_check(celery_backend, use_app, account, url):
    """`gmail_smtp check` probes the broker: FAIL, the URL without its password, exit 1."""
    celery_backend.EMAIL_BACKEND = CELERY_BACKEND  # the sandbox fixture set the sync backend
    use_app(new_app(url))
    started = time.monotonic()
    out, error = gmail_smtp_check()
    assert time.monotonic() - started < 10  # one try, no retries
    assert "FAIL  Celery: Could not connect to the Celery broker" in out
    assert "127.0.0.1:1" in out and ":**@" in out
    assert SECRET not in out and SECRET not in str(error)
    assert "correct CELERY_BROKER_URL" in out
    assert str(error) == "queued mail cannot reach a Celery worker; see above for what to fix."


@pytest.mark.parametrize("url", CLOSED_PORT_BROKERS, ids=["redis", "amqp"])
def test_unreachable_broker_is_reported_by_check_deploy_only(celery_backend, use_app, url):
    """W010 comes with `check --deploy`; a plain `check` (every runserver reload) stays offline."""
    use_app(new_app(url))
    assert celery_messages() == {}
    messages = celery_messages(deploy=True)
    assert set(messages) == {BROKER_UNREACHABLE}
    assert "127.0.0.1:1" in messages[BROKER_UNREACHABLE]
    assert SECRET not in messages[BROKER_UNREACHABLE]


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A port that accepts TCP connections (the kernel completes them) but never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()


def _connection_attempted(server: socket.socket) -> bool:
    try:
        client, _ = server.accept()
    except BlockingIOError:
        return False
    client.close()
    return True


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_plain_check_does_no_network_io_and_the_probe_gives_up(
    celery_backend, use_app, silent_server, scheme
):
    """`manage.py check` never connects; the probe of `check --deploy` gives up after ~2 s on
    a broker that accepts the connection but never replies."""
    port = silent_server.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"amqp://127.0.0.1:{port}//"
    use_app(new_app(url))
    assert celery_messages() == {}
    assert not _connection_attempted(silent_server)

    found: dict[str, str] = {}
    probe = threading.Thread(target=lambda: found.update(celery_messages(deploy=True)))
    probe.daemon = True
    probe.start()
    probe.join(timeout=15)
    assert not probe.is_alive(), "the broker probe hangs on a silent broker"
    assert set(found) == {BROKER_UNREACHABLE}
    assert _connection_attempted(silent_server)


# --- the good case ---------------------------------------------------------------------------


def test_the_project_app_and_its_broker_pass(celery_backend, settings, account, sandbox):
    """The test project's app (tests/celery_app.py, loaded by conftest as a project's
    __init__.py would) with the test broker (atomicfs://, or Redis with REDIS_URL): no issue."""
    settings.EMAIL_BACKEND = CELERY_BACKEND  # the sandbox fixture set the sync backend
    assert celery_setup.loaded_app() is project_app
    assert celery_setup.celery_problems(probe=True) == []
    assert celery_messages(deploy=True) == {}
    out, error = gmail_smtp_check()
    assert error is None, out
    broker = celery_setup.broker_for_display(project_app)
    assert f"OK    Celery: app 'tests', broker {broker} answers" in out
