"""Shared fixtures: a Gmail sandbox wired into settings, sender accounts on it, admin users,
the outbox without a broker, and real Celery workers. Plain helpers are in ``factories.py``.

The ``gmail_sandbox`` / ``gmail_sandbox_ssl`` fixtures come from the package's pytest plugin
(``django_gmail_smtp.testing.pytest_plugin``, registered as a pytest11 entry point).
"""

from __future__ import annotations

import shutil
import uuid
from contextlib import ExitStack

import pytest

from django_gmail_smtp import outbox, publisher
from django_gmail_smtp.backends import CeleryGmailBackend
from django_gmail_smtp.models import GmailAccount
from django_gmail_smtp.testing import GmailSandbox
from django_gmail_smtp.transport import ConnectionPool
from tests.celery_app import app as celery_app  # noqa: F401  (the app tasks are sent with)

from .factories import ALIAS, APP_PASSWORD, FAST, SENDER, staff_user, wire, with_keys
from .processes import CeleryWorker

# The sandbox fixtures (gmail_sandbox, gmail_sandbox_ssl): the plugin is opt-in, as for users.
pytest_plugins = ["django_gmail_smtp.testing.pytest_plugin"]

__all__ = ["ALIAS", "APP_PASSWORD", "SENDER"]  # imported by the test modules


@pytest.fixture(autouse=True)
def _handed_over():
    """Every row a test queued is handed to Celery before the next test starts (the
    publisher thread would otherwise publish one test's rows during the next)."""
    yield
    assert publisher.wait_published(timeout=30), "the publisher thread is stuck"


@pytest.fixture(scope="session", autouse=True)
def _broker_cleanup():
    """Leave nothing in the broker: this run's Redis keys, or its embedded broker folder."""
    yield
    from django.conf import settings

    if getattr(settings, "REDIS_KEYS_ARE_TEMPORARY", False):
        prefix = settings.REDIS_KEY_PREFIX
        import redis

        client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        try:
            for keys in _batched(client.scan_iter(match=f"{prefix}*", count=1000), 500):
                client.delete(*keys)
        finally:
            client.close()
    elif getattr(settings, "BROKER_FOLDER_IS_TEMPORARY", False):
        folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]
        shutil.rmtree(folder, ignore_errors=True)


def _batched(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- the sandbox -------------------------------------------------------------------------------


@pytest.fixture
def sandbox(gmail_sandbox, settings):
    """A STARTTLS (587-style) sandbox that the app's settings point at."""
    return wire(gmail_sandbox, settings)


@pytest.fixture
def ssl_sandbox(gmail_sandbox_ssl, settings):
    """An implicit-TLS (465-style) sandbox that the app's settings point at."""
    return wire(gmail_sandbox_ssl, settings)


@pytest.fixture
def make_sandbox(settings):
    """Start a sandbox with these options (``GmailSandbox(**options)``), wired into settings;
    each is stopped after the test."""
    with ExitStack() as stack:
        yield lambda **options: wire(stack.enter_context(GmailSandbox(**options)), settings)


# --- accounts and admin users -------------------------------------------------------------------


@pytest.fixture
def make_account(db):
    """Create a GmailAccount (App Password by default) and the matching sandbox user."""

    def make(sandbox, email=SENDER, *, password=APP_PASSWORD, aliases=(), **fields):
        sandbox.add_user(email, app_password=password, aliases=list(aliases))
        fields.setdefault("is_default", not GmailAccount.objects.filter(is_default=True).exists())
        return GmailAccount.objects.create(
            email=email,
            app_password=fields.pop("app_password", "abcd efgh ijkl mnop"),
            send_as_aliases="\n".join(aliases),
            **fields,
        )

    return make


@pytest.fixture
def account(sandbox, make_account):
    """The default App Password account, with one send-as alias, on the STARTTLS sandbox."""
    return make_account(sandbox, aliases=[ALIAS])


@pytest.fixture
def staff(client):
    """A superuser ("admin", admin@example.net), logged in to the test client."""
    user = staff_user("admin", superuser=True)
    client.force_login(user)
    return user


@pytest.fixture
def admin_client(client, staff):
    """The test client, logged in as the ``staff`` superuser (pytest-django's has no email
    at example.net)."""
    return client


# --- the outbox without a broker ----------------------------------------------------------------


@pytest.fixture
def dispatched(monkeypatch, settings):
    """Row ids handed to Celery (and their countdowns), instead of a broker (handed over in
    the committing thread, so that they are there once the commit returns)."""
    with_keys(settings, PUBLISH_IN_BACKGROUND=False)
    calls: list[tuple[int, float | None]] = []
    monkeypatch.setattr(
        outbox,
        "dispatch",
        lambda pk, priority, countdown=None: calls.append((pk, countdown)) or True,
    )
    # Freshly queued rows are handed over in batches, on commit.
    monkeypatch.setattr(
        outbox,
        "publish",
        lambda batch, **_: calls.extend((pk, None) for pk, *_ in batch) or len(batch),
    )
    return calls


@pytest.fixture
def no_dispatch(dispatched):
    """Queued rows are not handed to a broker (tests deliver them with ``outbox.deliver``)."""


@pytest.fixture
def pool():
    """A connection pool for in-process delivery, closed after the test."""
    p = ConnectionPool()
    yield p
    p.close()


@pytest.fixture
def outbox_settings(settings, sandbox):
    """The Celery backend on the sandbox, retrying after 10 s, at most 4 attempts."""
    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"
    with_keys(settings, RETRY_BASE_DELAY=10, MAX_ATTEMPTS=4)
    return settings


@pytest.fixture
def celery_backend(outbox_settings):
    """A CeleryGmailBackend with ``outbox_settings``."""
    return CeleryGmailBackend()


# --- real Celery workers ------------------------------------------------------------------------


@pytest.fixture
def queues(settings):
    """Queue names of this test alone, so no task of an earlier test reaches its workers;
    their Redis bindings are removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    names = {"transactional": f"gmail_smtp.transactional.{tag}", "bulk": f"gmail_smtp.bulk.{tag}"}
    yield names
    _forget_queues(settings.CELERY_BROKER_URL, names)


def _forget_queues(broker_url, queues):
    """Remove these queues' bindings from Redis (kombu keeps them per queue name)."""
    if not broker_url.startswith("redis"):
        return
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        for name in queues.values():
            keys = list(client.scan_iter(f"*{name}*"))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def celery_settings(settings, sandbox, queues):
    """The Celery backend on the sandbox, with ``FAST`` timings and this test's queues."""
    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.CeleryGmailBackend"
    with_keys(settings, **FAST, QUEUES=queues)
    return settings


@pytest.fixture
def start_worker(celery_settings, queues, tmp_path):
    """Start a real Celery worker on this test's queues (``queues_served`` picks some);
    other keywords go to :class:`~tests.processes.CeleryWorker`. Stopped after the test."""
    workers = []

    def start(*, queues_served=("transactional", "bulk"), **kwargs) -> CeleryWorker:
        name = kwargs.setdefault("name", f"w{len(workers) + 1}")
        kwargs["queues"] = ",".join(queues[q] for q in queues_served)
        worker = CeleryWorker(log_path=tmp_path / f"{name}.log", **kwargs)
        workers.append(worker)
        return worker.wait_ready()

    yield start
    for worker in workers:
        worker.stop()
