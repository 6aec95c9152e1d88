"""The demo's clock: real time plus an offset the demo moves forward. Not for a real site.

A newsletter to an account allowed 10 messages a day takes days by design. ``./dev demo`` shows
it in seconds by moving time forward: it writes an offset (seconds) to a file, and every clock
the quota reads follows it: the demo's own (the planner's ticks, the ETA), the sandbox's (its
Gmail-like daily limit) and the Celery worker's, which imports this module
(``celery ... worker --include demo_clock``) and reads the file named by ``DEMO_CLOCK_FILE``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init

VARIABLE = "DEMO_CLOCK_FILE"


def offset(path: str | os.PathLike[str]) -> float:
    """Seconds the demo's clock is ahead of real time."""
    try:
        return float(Path(path).read_text().strip() or 0)
    except FileNotFoundError:
        return 0.0


def quota_clock(path: str | os.PathLike[str]) -> Callable[[], datetime]:
    """A clock for ``django_gmail_smtp.quota.set_clock``: now plus the file's offset."""
    from django.utils import timezone

    def now() -> datetime:
        return timezone.now() + timedelta(seconds=offset(path))

    return now


@worker_process_init.connect
def _follow_the_demo_clock(**kwargs: Any) -> None:
    """In each worker process: reserve quota on the demo's time, as the demo plans on it."""
    path = os.environ.get(VARIABLE)
    if path:
        from django_gmail_smtp import quota

        quota.set_clock(quota_clock(path))
