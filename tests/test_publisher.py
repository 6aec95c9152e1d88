"""The hand-off of committed rows to Celery from the publisher thread: the caller never waits
for the broker, rows committed together or while a hand-off runs go over in one, nothing is
left behind when the process exits or forks, and the caller's thread still hands over where a
thread would not do (the setting off, eager Celery, uWSGI without threads)."""

from __future__ import annotations

import os
import sys
import threading
import warnings

import pytest
from django.core.mail import EmailMessage
from django.db import transaction

from django_gmail_smtp import outbox, publisher
from django_gmail_smtp.models import OutboundEmail

from .conftest import SENDER
from .factories import run_queueing_script, with_keys

Status = OutboundEmail.Status
pytestmark = pytest.mark.django_db(transaction=True)


class Handoffs:
    """Stands in for outbox.publish: records each batch and the thread it ran in, and can be
    held (it then waits until released) to show what the caller does meanwhile."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: list[str] = []
        self.databases: list[str | None] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_next = False

    def __call__(self, batch, using=None) -> int:
        self.threads.append(threading.current_thread().name)
        self.databases.append(using)
        self.entered.set()
        assert self.release.wait(30), "the test never released the hand-off"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a bug in the hand-off")
        self.batches.append([pk for pk, *_ in batch])
        return len(batch)

    def ids(self) -> list[int]:
        return [pk for batch in self.batches for pk in batch]


@pytest.fixture
def handoffs(monkeypatch, outbox_settings, account):
    fake = Handoffs()
    monkeypatch.setattr(outbox, "publish", fake)
    yield fake
    fake.release.set()


def queue(i: int) -> int:
    message = EmailMessage(f"S{i}", "b", SENDER, [f"to{i}@example.net"])
    assert message.send() == 1
    return message.gmail_outbound_id


def test_send_mail_returns_while_the_broker_hand_off_is_still_running(handoffs):
    handoffs.release.clear()  # the broker "hangs"
    first = queue(0)
    assert handoffs.entered.wait(10)
    # The caller is back, its row committed, though the hand-off has not finished.
    assert OutboundEmail.objects.get(pk=first).status == Status.QUEUED
    assert handoffs.batches == []
    assert handoffs.threads == ["gmail-smtp-publisher"]
    # What is committed meanwhile goes over together, in one hand-off, once it is free.
    more = [queue(i) for i in (1, 2, 3)]
    handoffs.release.set()
    assert publisher.wait_published(timeout=30)
    assert handoffs.batches == [[first], more]


def test_one_transaction_is_one_hand_off_after_the_commit(handoffs):
    handoffs.release.clear()
    with transaction.atomic():
        ids = [queue(i) for i in range(3)]
        assert not handoffs.entered.is_set()  # nothing before the commit
    handoffs.release.set()
    assert publisher.wait_published(timeout=30)
    assert handoffs.batches == [ids]


def test_a_rolled_back_transaction_hands_nothing_over(handoffs):
    with pytest.raises(RuntimeError, match="rolled back"), transaction.atomic():
        queue(0)
        raise RuntimeError("rolled back")
    assert publisher.wait_published(timeout=30)
    assert handoffs.batches == [] and not OutboundEmail.objects.exists()


def test_an_error_in_a_hand_off_is_logged_and_the_thread_goes_on(handoffs, caplog):
    handoffs.fail_next = True
    lost = queue(0)
    assert publisher.wait_published(timeout=30)
    assert "Could not hand 1 outbound email(s) to Celery" in caplog.text
    assert "RuntimeError: a bug in the hand-off" in caplog.text
    # The row stays queued for the sweeper, and the next one is handed over as usual.
    assert OutboundEmail.objects.get(pk=lost).status == Status.QUEUED
    after = queue(1)
    assert publisher.wait_published(timeout=30)
    assert handoffs.ids() == [after]


@pytest.mark.parametrize("why", ["setting off", "eager Celery", "uWSGI without threads"])
def test_the_callers_thread_hands_over_where_a_thread_would_not_do(
    handoffs, settings, monkeypatch, why
):
    if why == "setting off":
        with_keys(settings, PUBLISH_IN_BACKGROUND=False)
    elif why == "eager Celery":
        from django_gmail_smtp.tasks import send_outbound_email

        conf = send_outbound_email.app.conf
        monkeypatch.setitem(conf, "task_always_eager", True)
    else:
        monkeypatch.setitem(sys.modules, "uwsgi", type(sys)("uwsgi"))  # opt: no enable-threads
        publisher._threads_run.cache_clear()
    try:
        assert not publisher.in_background()
        handoffs.release.clear()
        done = threading.Event()

        def release_once_entered() -> None:
            handoffs.entered.wait(10)
            done.set()
            handoffs.release.set()

        threading.Thread(target=release_once_entered).start()
        pk = queue(0)
        # The hand-off ran (and finished) before send_mail returned, in the caller's thread.
        assert done.is_set() and handoffs.ids() == [pk]
        assert handoffs.threads == [threading.current_thread().name]
    finally:
        publisher._threads_run.cache_clear()


def test_a_celery_task_that_queues_mail_hands_it_over_itself(handoffs):
    """A worker's child process (prefork) ends with os._exit, without atexit: a row queued by
    a task (the newsletter planner's) is handed over before the task returns."""
    from tests.celery_app import app

    @app.task(name="tests.test_publisher.queue_one", shared=False)
    def queue_one() -> int:
        return queue(0)

    assert publisher.in_background()  # outside the task
    pk = queue_one.apply().get()
    assert handoffs.ids() == [pk]
    assert handoffs.threads == [threading.current_thread().name]


def test_where_no_thread_can_start_the_rows_are_handed_over_at_once(handoffs, monkeypatch):
    def refuse(thread):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    fresh = publisher.Publisher()  # no thread yet
    monkeypatch.setattr(threading.Thread, "start", refuse)
    fresh.submit([(7, "transactional", SENDER)])
    assert handoffs.ids() == [7]
    assert handoffs.threads == [threading.current_thread().name]
    assert fresh.wait(timeout=0)


def test_the_thread_marks_a_failed_hand_off_on_the_database_the_rows_were_written_to(handoffs):
    """The thread cannot see the caller's context (a router reading it would guess): the
    database goes along with the rows."""
    queue(0)
    assert publisher.wait_published(timeout=30)
    assert handoffs.databases == ["default"]


def test_a_process_forked_without_fork_hooks_starts_its_own_thread(handoffs):
    """uWSGI forks its workers from C, without os.register_at_fork's hooks: the copy of the
    parent's publisher (its rows, its thread that looks alive) is dropped on first use."""
    copied = publisher.Publisher()
    copied._pid = os.getpid() + 1  # made in the "parent"
    copied._pending = [(None, (1, "transactional", SENDER))]
    copied._thread = threading.current_thread()  # "alive", but not this process's
    copied.submit([(2, "transactional", SENDER)])
    assert copied.wait(timeout=30)
    assert handoffs.ids() == [2]


def test_uwsgi_with_threads_enabled_hands_over_in_the_background(monkeypatch):
    module = type(sys)("uwsgi")
    module.opt = {"enable-threads": True}
    monkeypatch.setitem(sys.modules, "uwsgi", module)
    publisher._threads_run.cache_clear()
    try:
        assert publisher._threads_run()
    finally:
        publisher._threads_run.cache_clear()


@pytest.mark.integration
def test_a_forked_child_neither_hands_over_nor_waits_for_its_parents_rows(handoffs):
    handoffs.release.clear()
    queue(0)
    assert handoffs.entered.wait(10)
    queue(1)  # pending in the parent while its first hand-off hangs
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        pid = os.fork()
    if pid == 0:  # the child: report what it sees, then leave without any cleanup
        state = repr(publisher.publisher)
        ok = publisher.wait_published(timeout=0)
        os.write(write, f"{state}|{ok}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    assert child == "<Publisher pending=0 busy=False running=False>|True"
    handoffs.release.set()
    assert publisher.wait_published(timeout=30)
    assert len(handoffs.ids()) == 2  # the parent handed both over


@pytest.mark.integration
def test_a_process_that_exits_right_after_send_mail_still_hands_its_row_over(tmp_path):
    """The thread is a daemon, so exiting would kill it: atexit waits for what is pending
    (the broker here answers only once the process waits for it)."""
    done, handed = run_queueing_script(
        tmp_path,
        """
        queue_one("s")
        print("returned", flush=True)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "returned" in done.stdout
    assert handed == ["1"]
