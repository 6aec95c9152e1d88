"""pytest fixtures for the Gmail sandbox.

Enable with ``-p django_gmail_smtp.testing.pytest_plugin`` (or ``pytest_plugins`` in the
root ``conftest.py``). Each fixture is a fresh, started ``GmailSandbox``, stopped after the
test; add users, faults and quotas in the test, then point ``GMAIL_SMTP`` at
``sandbox.settings()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .sandbox import GmailSandbox

__all__ = ["gmail_sandbox", "gmail_sandbox_ssl"]


@pytest.fixture
def gmail_sandbox() -> Iterator[GmailSandbox]:
    """A started Gmail sandbox on 127.0.0.1 speaking STARTTLS (like port 587)."""
    with GmailSandbox(security="starttls") as sandbox:
        yield sandbox


@pytest.fixture
def gmail_sandbox_ssl() -> Iterator[GmailSandbox]:
    """A started Gmail sandbox on 127.0.0.1 speaking implicit TLS (like port 465)."""
    with GmailSandbox(security="ssl") as sandbox:
        yield sandbox
