"""Helpers for the browser tests: the example project's admin as a real server, Chromium, and
screenshots.

The server is ``manage.py runserver`` of example_project/ in its own process, with its own SQLite
database (whatever DATABASE_URL says), its own filesystem Celery broker folder, and GMAIL_SMTP
pointing at a ``GmailSandbox`` that runs in the test process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PROJECT = ROOT / "example_project"
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"

CHROMIUM = "/usr/bin/chromium"
#: Debian's Chromium, headless; without the background-networking flags its connections are
#: refused in sandboxed CI containers.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-pass-123"
ADMIN_EMAIL = "admin@example.net"

# Variables of the test run that must not reach the example project's server.
_INHERITED = (
    "DJANGO_SETTINGS_MODULE",
    "DATABASE_URL",
    "EMAIL_URL",
    "EMAIL_BACKEND",
    "CONTACT_EMAIL_BACKEND",
    "MAILER_BACKEND",  # MAILERS["default"] on Django 6.1
    "CONTACT_MAILER_BACKEND",  # MAILERS["contact"] on Django 6.1
    "DEFAULT_FROM_EMAIL",
    "CELERY_BROKER_URL",
    "CELERY_BROKER_FOLDER",
    "GMAIL_SMTP_TEST_DB",
    "GMAIL_SMTP_TEST_SETTINGS",
)


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return "Chromium is not installed: `apt-get install chromium` (.ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed: `pip install -e '.[browser]'` (in ./dev's .[test])"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(workdir: Path, gmail_smtp: dict[str, Any]) -> dict[str, str]:
    """The environment example_project/settings.py reads, for a server on ``workdir``."""
    env = {
        k: v for k, v in os.environ.items() if k not in _INHERITED and not k.startswith("GMAIL_")
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "example_project.settings",
            "DATABASE_URL": f"sqlite:///{workdir / 'admin.sqlite3'}",
            "SECRET_KEY": "browser-tests-secret-key-not-for-production-0123456789",
            "DEBUG": "True",  # runserver serves the admin's static files
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "GMAIL_SMTP_ENCRYPTION_KEYS": "browser-tests-encryption-key-0123456789",
            "CELERY_BROKER_URL": "filesystem://",
            "CELERY_BROKER_FOLDER": str(workdir / "broker"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    for key, value in gmail_smtp.items():
        env[f"GMAIL_SMTP_{key}"] = str(value)
    return env


class AdminServer:
    """``manage.py runserver`` of the example project, migrated, with a superuser."""

    def __init__(self, workdir: Path, gmail_smtp: dict[str, Any]) -> None:
        self.workdir = workdir
        self.env = server_env(workdir, gmail_smtp)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "runserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    def manage(self, *args: str, timeout: float = 60, **env: str) -> str:
        """Run ``manage.py ARGS`` on the server's database; return its output."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE_PROJECT,
            env={**self.env, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"manage.py {args[0]} failed:\n{output}"
        return result.stdout

    def python(self, code: str, *args: str) -> str:
        """Run Python with the server's Django set up (its database) and ``args`` in
        ``sys.argv[1:]``; return what it printed."""
        result = subprocess.run(
            [sys.executable, "-c", f"import django\ndjango.setup()\n{code}", *args],
            cwd=EXAMPLE_PROJECT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"python -c failed:\n{result.stdout}{result.stderr}"
        return result.stdout.strip()

    def start(self, timeout: float = 30) -> AdminServer:
        self.manage("migrate", "--noinput")
        self.manage(
            "createsuperuser",
            "--noinput",
            "--username",
            ADMIN_USER,
            "--email",
            ADMIN_EMAIL,
            DJANGO_SUPERUSER_PASSWORD=ADMIN_PASSWORD,
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "runserver", f"127.0.0.1:{self.port}", "--noreload"],
                cwd=EXAMPLE_PROJECT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"runserver exited:\n{self.log()}")
            try:
                if requests.get(self.url + "/admin/login/", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"runserver did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def reset_screenshots() -> Path:
    """test-artifacts/screenshots/, emptied of the previous run's pictures (unless several
    pytest-xdist workers share it)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if "PYTEST_XDIST_WORKER" not in os.environ:
        for old in SCREENSHOTS.glob("*.png"):
            old.unlink()
    return SCREENSHOTS
