"""Hands freshly queued rows to Celery from a thread of the caller's process.

When the caller's transaction commits, its rows are already in the outbox; handing their ids to
the broker is a network round trip that a web request need not wait for. With
``PUBLISH_IN_BACKGROUND`` (the default) the on-commit hook only appends the ids to this
process's :class:`Publisher`, whose thread publishes whatever has gathered, many rows in one go
when the site is busy (:func:`django_gmail_smtp.outbox.publish`). A broker that is slow or down
then never holds up a request.

Nothing is lost this way: the rows are committed before they are handed over. A hand-off that
fails leaves them for the sweeper after ``SWEEP_GRACE`` (as before); a process that ends normally
waits up to :data:`EXIT_WAIT` seconds for its thread to hand over what is pending; a process that
is killed in the milliseconds between a commit and its hand-off leaves the rows queued, and the
sweeper enqueues them after its "lost task" delay (10 x ``SWEEP_GRACE``, at least 5 minutes).

The hand-off happens in the caller's thread, as each transaction commits, when
``PUBLISH_IN_BACKGROUND`` is False, when Celery runs tasks eagerly (``task_always_eager``: the
"hand-off" is then the send itself), inside a Celery task (a worker queueing mail, such as the
newsletter planner: nobody waits for it, and a prefork child ends with ``os._exit``, which runs
no atexit hook), in a ``multiprocessing`` child (which ends the same way) and under uWSGI
before 2.0.27 without ``enable-threads`` or ``threads`` (whose workers never run a Python
thread). Another process that ends with ``os._exit`` right after queueing leaves its pending
rows to the sweeper's "lost task" delay.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence

from celery import current_task

from .conf import get_setting

logger = logging.getLogger(__name__)

#: Seconds a process that exits waits for its thread to hand over the rows still pending.
EXIT_WAIT = 10.0
#: Longest a waiter sleeps before it looks again whether the thread is still alive.
_WAIT_SLICE = 1.0

Batch = Sequence[tuple[int, str, str]]


class Publisher:
    """One thread per process that hands queued rows to Celery (started on first use, again in
    a forked child: a parent's pending rows are the parent's to hand over)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        #: (database alias or None, row) in the order they were committed
        self._pending: list[tuple[str | None, tuple[int, str, str]]] = []
        self._busy = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        alive = self._thread is not None and self._thread.is_alive()
        return f"<Publisher pending={len(self._pending)} busy={self._busy} running={alive}>"

    def submit(self, batch: Batch, *, using: str | None = None) -> None:
        """Queue these rows (committed on database ``using``) for the thread, which is started
        if need be; returns at once. Where no thread can start (the interpreter is shutting
        down), hands them over here."""
        if self._pid != os.getpid():
            # Forked without os.register_at_fork's hooks (uWSGI forks its workers from C):
            # the parent's thread and rows are not this process's.
            self._reset()
        with self._cond:
            started = True
            if self._thread is None or not self._thread.is_alive():
                started = self._start()
            if started:
                self._pending.extend((using, row) for row in batch)
                self._cond.notify_all()
        if not started:
            _publish(batch, using)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every row submitted so far was handed over (or its hand-off failed and
        was logged); True unless ``timeout`` seconds passed first (or the thread is gone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                if self._thread is None or not self._thread.is_alive():
                    return False  # nobody left to hand them over
                left = _WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, _WAIT_SLICE))  # and look at the thread again
        return True

    def _start(self) -> bool:
        thread = threading.Thread(target=self._run, name="gmail-smtp-publisher", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self._thread = thread
        return True

    def _run(self) -> None:
        from django.db import connections

        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                pending, self._pending = self._pending, []
                self._busy = True
            try:
                by_database: dict[str | None, list[tuple[int, str, str]]] = {}
                for using, row in pending:
                    by_database.setdefault(using, []).append(row)
                for using, rows in by_database.items():
                    _publish(rows, using)
            except BaseException:  # publish() logs a broker outage itself; this is a bug
                # Also SystemExit and the like: the thread goes on, or the rows committed
                # after these would wait for the sweeper.
                logger.exception(
                    "Could not hand %d outbound email(s) to Celery; they stay queued and the "
                    "sweeper will send them",
                    len(pending),
                )
            finally:
                try:
                    # publish() touches the database only when a hand-off failed: do not keep
                    # a connection open in this thread between hand-offs.
                    connections.close_all()
                except BaseException:
                    logger.exception("Could not close the publisher thread's connections")
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()

    def _at_exit(self) -> None:
        with self._cond:
            pending = len(self._pending) + self._busy
        if pending and not self.wait(EXIT_WAIT):
            logger.warning(
                "Exiting with %d outbound email(s) not yet handed to Celery: they are queued, "
                "and the sweeper enqueues them within 10 x SWEEP_GRACE (at least 5 minutes).",
                len(self._pending),
            )


publisher = Publisher()
atexit.register(publisher._at_exit)
os.register_at_fork(after_in_child=publisher._reset)


def _publish(batch: Batch, using: str | None) -> None:
    from . import outbox  # looked up each time, so tests can replace outbox.publish

    outbox.publish(batch, using=using)


def in_background() -> bool:
    """Whether committed rows are handed to Celery by the :class:`Publisher` thread."""
    if not get_setting("PUBLISH_IN_BACKGROUND"):
        return False
    from .tasks import send_outbound_email

    if send_outbound_email.app.conf.task_always_eager:
        return False
    if current_task:  # a worker's task queues mail: nobody waits, and prefork children exit
        return False  # without atexit (os._exit), which would leave the rows to the sweeper
    if multiprocessing.parent_process() is not None:
        return False  # a multiprocessing child also ends with os._exit, without atexit hooks
    return _threads_run()


#: uWSGI's own reading of a boolean option (``uwsgi_opt_true``): these mean off.
_UWSGI_OFF = {"0", "false", "no", "off"}


@functools.cache
def _threads_run() -> bool:
    """False under uWSGI before 2.0.27 started without threads (its workers then never run a
    Python thread; from 2.0.27 threads are always on)."""
    try:
        import uwsgi  # type: ignore[import-untyped, import-not-found, unused-ignore]  # only inside uWSGI
    except ImportError:
        return True
    if tuple(getattr(uwsgi, "version_info", ())[:3]) >= (2, 0, 27):
        return True
    options = getattr(uwsgi, "opt", {})
    # --threads (any number) implies --enable-threads.
    return "threads" in options or _uwsgi_option_on(options.get("enable-threads"))


def _uwsgi_option_on(value: object) -> bool:
    """A uWSGI boolean option as uWSGI reads it: True for a bare flag, else its last value
    (bytes) unless that reads as off."""
    if isinstance(value, list):
        value = value[-1] if value else None
    if value is None or value is False:
        return False
    if value is True:
        return True
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip().lower() not in _UWSGI_OFF


def hand_over(batch: Batch, *, using: str | None = None) -> None:
    """Hand rows committed on database ``using`` to Celery: through the thread, or here and
    now (see the module)."""
    if in_background():
        publisher.submit(batch, using=using)
    else:
        _publish(batch, using)


def wait_published(timeout: float | None = None) -> bool:
    """Wait until the rows this process queued so far were handed to Celery; True unless
    ``timeout`` seconds passed first. For scripts that must know, and for tests."""
    return publisher.wait(timeout)
