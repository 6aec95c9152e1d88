"""Start real processes (senders, Celery workers) that share the test database and sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 30.0,
    message: str | Callable[[], str] = "the condition",
    *,
    interval: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns something true and return that; fail after
    ``timeout`` seconds with ``message`` (a callable is called then, to describe the state)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(interval)


def nested_pytest_env(env: dict[str, str], name: str) -> dict[str, str]:
    """``env`` for a pytest run started inside this one: on a server database it gets a test
    database of its own (``DATABASE_URL``'s name + ``_name``). With the same name it would
    drop and recreate this run's test database, then drop it at its end."""
    url = env.get("DATABASE_URL")
    if url:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        env = {**env, "DATABASE_URL": urlunsplit(parts._replace(path=f"{parts.path}_{name}"))}
    return env


def child_env(**gmail_smtp: object) -> dict[str, str]:
    """Environment for a child process: the test database and the current GMAIL_SMTP."""
    db = dict(connection.settings_dict)
    db["NAME"] = connection.settings_dict["NAME"]
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["GMAIL_SMTP_TEST_DB"] = json.dumps(db, default=str)
    env["GMAIL_SMTP_TEST_SETTINGS"] = json.dumps({**settings.GMAIL_SMTP, **gmail_smtp})
    return env


class CeleryWorker:
    """A real ``celery worker`` process on the test broker, database and sandbox."""

    def __init__(
        self,
        *,
        queues: str = "gmail_smtp.transactional,gmail_smtp.bulk",
        concurrency: int = 1,
        name: str = "w1",
        beat: bool = False,
        log_path: Path,
        app: str = "tests.celery_app",
        env: dict[str, str] | None = None,
        **gmail_smtp: object,
    ) -> None:
        """``env`` adds to (or overrides) :func:`child_env`; other keywords go to GMAIL_SMTP."""
        self.log_path = log_path
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-Q",
            queues,
            "-n",
            f"{name}@%h",
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--prefetch-multiplier",
            "1",
        ]
        if beat:
            args += ["--beat", "--schedule", str(log_path.with_suffix(".beat"))]
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**child_env(**gmail_smtp), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> CeleryWorker:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the Celery worker exited:\n{self.log()}")
            return " ready." in self.log()

        wait_for(ready, timeout, lambda: f"the Celery worker to be ready:\n{self.log()}")
        return self

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and children) at once."""
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """End the worker: the test has made its assertions, so no warm shutdown is needed."""
        self.kill()
        self._log.close()
