"""Shared fixtures: a Gmail sandbox wired into settings, and sender accounts on it.

The ``gmail_sandbox`` / ``gmail_sandbox_ssl`` fixtures come from the package's pytest plugin
(``django_gmail_smtp.testing.pytest_plugin``, registered as a pytest11 entry point).
"""

from __future__ import annotations

import shutil

import pytest

from django_gmail_smtp.models import GmailAccount
from tests.celery_app import app as celery_app  # noqa: F401  (the app tasks are sent with)

# The sandbox fixtures (gmail_sandbox, gmail_sandbox_ssl): the plugin is opt-in, as for users.
pytest_plugins = ["django_gmail_smtp.testing.pytest_plugin"]

APP_PASSWORD = "abcdefghijklmnop"
SENDER = "sender@example.com"
ALIAS = "alias@example.com"


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


def _wire(sandbox, settings):
    # Django's test environment swaps EMAIL_BACKEND for locmem; these tests send for real.
    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, **sandbox.settings()}
    return sandbox


@pytest.fixture
def sandbox(gmail_sandbox, settings):
    """A STARTTLS (587-style) sandbox that the app's settings point at."""
    return _wire(gmail_sandbox, settings)


@pytest.fixture
def ssl_sandbox(gmail_sandbox_ssl, settings):
    """An implicit-TLS (465-style) sandbox that the app's settings point at."""
    return _wire(gmail_sandbox_ssl, settings)


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
