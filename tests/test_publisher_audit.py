"""Audit of the publisher thread (django_gmail_smtp/publisher.py): cases where committed rows
are not handed to the broker although the process goes on or ends normally, and where the
uWSGI detection reads uWSGI's real ``uwsgi.opt`` / ``uwsgi.version_info`` wrongly."""

from __future__ import annotations

import sys
import threading

import pytest

from django_gmail_smtp import outbox, publisher

from .conftest import SENDER
from .factories import run_queueing_script
from .processes import wait_for


class _Died(BaseException):
    """What kills a thread without being an Exception (SystemExit, gevent's Timeout, ...)."""


def test_rows_submitted_while_a_hand_off_dies_are_still_handed_over(monkeypatch):
    """A BaseException out of publish() ends the thread; rows submitted during that hand-off
    then sit in ``_pending`` with nobody to publish them until the process queues mail again
    (and ``wait()`` without a timeout blocks for good: nobody notifies it any more)."""
    entered, release = threading.Event(), threading.Event()
    handed: list[int] = []

    def publish(batch, **_):
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
            raise _Died("killed in the hand-off")
        handed.extend(pk for pk, *_ in batch)
        return len(batch)

    monkeypatch.setattr(outbox, "publish", publish)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # no traceback noise
    fresh = publisher.Publisher()
    fresh.submit([(1, "transactional", SENDER)])
    assert entered.wait(10)
    fresh.submit([(2, "transactional", SENDER)])  # committed while the hand-off runs
    release.set()
    wait_for(
        lambda: handed == [2],
        timeout=10,
        message=lambda: f"row 2 to be handed over; {fresh!r}, handed {handed}",
    )


@pytest.mark.integration
def test_a_multiprocessing_child_that_returns_hands_its_rows_over(tmp_path):
    """multiprocessing's fork children end with os._exit() after run(). Python 3.10 to 3.12
    run no atexit hook there; 3.13 runs only those registered in the child (atexit._clear()
    first), so once the parent has imported the publisher (here: it queued a mail itself) the
    child's Publisher._at_exit is gone. The row a child queued right before returning is then
    not handed over by it (the sweeper enqueues it after 10 x SWEEP_GRACE, at least 5 minutes),
    though the child ended normally."""
    done, handed = run_queueing_script(
        tmp_path,
        """
        import multiprocessing
        from django.db import connections

        queue_one("parent")
        connections.close_all()
        process = multiprocessing.get_context("fork").Process(target=queue_one, args=("child",))
        process.start()
        process.join()
        print("child exit code", process.exitcode, flush=True)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "child exit code 0" in done.stdout
    handed = sorted(handed)
    assert handed == ["1", "2"], f"handed over: {handed} (row 1 is the parent's, 2 the child's)"


def _fake_uwsgi(monkeypatch, opt: dict, version_info: tuple) -> None:
    """The ``uwsgi`` module as uWSGI's Python plugin builds it under Python 3: option names are
    str, values bytes (True for a flag given without a value), version_info a 5-tuple."""
    module = type(sys)("uwsgi")
    module.opt = opt
    module.version_info = version_info
    module.version = ".".join(str(part) for part in version_info[:3]).encode()
    monkeypatch.setitem(sys.modules, "uwsgi", module)
    publisher._threads_run.cache_clear()


@pytest.fixture
def _uncached():
    yield
    publisher._threads_run.cache_clear()


@pytest.mark.usefixtures("_uncached")
@pytest.mark.parametrize("value", [b"false", b"0", b"no", b"off"])
def test_uwsgi_enable_threads_turned_off_in_its_config_is_seen_as_off(monkeypatch, value):
    """``enable-threads = false`` in an ini (or UWSGI_ENABLE_THREADS=0) leaves uWSGI 2.0.26 and
    older without threads (uwsgi_opt_true reads "false", "off", "no", "0" as off), but
    ``uwsgi.opt["enable-threads"]`` is then the non-empty bytes ``b"false"``: the rows go to a
    thread that only runs while the worker serves the next request."""
    _fake_uwsgi(monkeypatch, {"enable-threads": value}, (2, 0, 26, 0, b""))
    assert not publisher._threads_run()


@pytest.mark.usefixtures("_uncached")
def test_uwsgi_2_0_27_and_later_run_threads_without_the_option(monkeypatch):
    """Since uWSGI 2.0.27 (commit 1caea16d, "set enable threads by default") sanitize_args()
    sets has_threads unconditionally and --enable-threads is a stub: its workers do run Python
    threads, yet the publisher falls back to handing over in the request."""
    _fake_uwsgi(monkeypatch, {"module": b"proj.wsgi"}, (2, 0, 28, 0, b""))
    assert publisher._threads_run()
