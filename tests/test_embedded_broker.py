"""The embedded ``atomicfs://`` broker (django_gmail_smtp.testing.broker) between real processes.

kombu's ``filesystem://`` transport, which the tests and the demo used before, let a worker read
a message file before it was fully written (``JSONDecodeError``, the worker died, the message was
lost) and let two processes declaring queues at once lose a binding. These tests run the same
scenarios against ``atomicfs://``; run this file with ``GMAIL_SMTP_TEST_BROKER=filesystem`` to
see kombu's transport fail them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from django_gmail_smtp.testing import broker

from .processes import ROOT, CeleryWorker, wait_for

SCHEME = os.environ.get("GMAIL_SMTP_TEST_BROKER", broker.SCHEME)

# One peer process: "produce COUNT" publishes COUNT numbered messages through a direct exchange
# (declaring the queue, as Celery's producers do); "consume" takes messages until the stop file
# exists and the queue is empty, printing the number of each message it took.
PEER = """
import json, os, sys, time
from kombu import Connection, Exchange, Queue
import django_gmail_smtp.testing.broker  # registers atomicfs://

url, folder, role, tag = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
options = {"data_folder_in": folder, "data_folder_out": folder, "polling_interval": 0.01,
           "control_folder": os.path.join(folder, "control")}
queue = Queue("stress", Exchange("stress", type="direct"), routing_key="stress")
with Connection(url, transport_options=options) as connection:
    if role == "produce":
        producer = connection.Producer()
        for i in range(int(sys.argv[5])):
            producer.publish({"n": f"{tag}-{i}"}, exchange=queue.exchange, routing_key="stress",
                             declare=[queue], serializer="json")
    else:
        stop = os.path.join(folder, "stop")
        taken = []
        with connection.SimpleQueue(queue) as simple:
            while True:
                try:
                    message = simple.get(block=True, timeout=0.2)
                except simple.Empty:
                    if os.path.exists(stop):
                        break
                    continue
                taken.append(message.payload["n"])
                message.ack()
        print(json.dumps(taken))
"""


def _peer(url: str, folder: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PEER, url, str(folder), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _end(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _messages_left(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".stress.msg")]


@pytest.mark.integration
def test_every_message_is_taken_exactly_once_between_processes(tmp_path):
    """Two producers and two consumers at once: 3,000 messages, each taken exactly once."""
    url, per_producer = f"{SCHEME}://", 1500
    consumers = [_peer(url, tmp_path, "consume", f"c{i}") for i in range(2)]
    producers = [_peer(url, tmp_path, "produce", f"p{i}", str(per_producer)) for i in range(2)]
    processes = consumers + producers
    try:
        for producer in producers:
            _, err = producer.communicate(timeout=120)
            assert producer.returncode == 0, err
        wait_for(
            lambda: not _messages_left(tmp_path) or any(c.poll() is not None for c in consumers),
            timeout=120,
            message=lambda: f"the consumers to empty the queue ({_messages_left(tmp_path)[:3]})",
        )
        (tmp_path / "stop").touch()
        taken: list[str] = []
        for consumer in consumers:
            out, err = consumer.communicate(timeout=60)
            assert consumer.returncode == 0, f"a consumer crashed:\n{err}"
            taken += json.loads(out)
    finally:
        _end(processes)
    expected = {f"p{p}-{i}" for p in range(2) for i in range(per_producer)}
    assert len(taken) == len(set(taken)), "a message was taken twice"
    assert set(taken) == expected, f"{len(expected - set(taken))} messages were lost"
    assert not (tmp_path / "corrupt").exists()


BINDER = """
import os, sys, time
from kombu import Connection, Exchange, Queue
import django_gmail_smtp.testing.broker  # registers atomicfs://

url, folder, name, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = {"data_folder_in": folder, "data_folder_out": folder,
           "control_folder": os.path.join(folder, "control")}
with Connection(url, transport_options=options) as connection:
    channel = connection.channel()
    for r in range(rounds):  # every process binds its queue to each exchange, all at once
        Queue(name, Exchange(f"x{r}", type="direct"), routing_key=name)(channel).declare()
"""


@pytest.mark.integration
def test_queues_declared_at_once_by_many_processes_are_all_bound(tmp_path):
    """A binding lost to a concurrent declare would route that queue's messages nowhere."""
    names, rounds = [f"q{i}" for i in range(6)], 200
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BINDER, f"{SCHEME}://", str(tmp_path), name, str(rounds)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
    finally:
        _end(processes)
    options = {
        "data_folder_in": str(tmp_path),
        "data_folder_out": str(tmp_path),
        "control_folder": str(tmp_path / "control"),
    }
    with Connection(f"{SCHEME}://", transport_options=options) as connection:
        channel = connection.default_channel
        incomplete = {
            r: bound
            for r in range(rounds)
            if (bound := {entry.queue for entry in channel.get_table(f"x{r}")}) != set(names)
        }
    assert not incomplete, f"bindings lost in {len(incomplete)} of {rounds} exchanges"


@pytest.fixture
def channel(tmp_path):
    options = {
        "data_folder_in": str(tmp_path),
        "data_folder_out": str(tmp_path),
        "control_folder": str(tmp_path / "control"),
    }
    with Connection(f"{SCHEME}://", transport_options=options) as connection:
        yield connection.default_channel


def _publish(channel, text: str) -> None:
    queue = Queue("q", Exchange("q"), routing_key="q")
    channel.connection.client.Producer(channel).publish(
        {"text": text}, exchange=queue.exchange, routing_key="q", declare=[queue]
    )


def _take(channel):
    message = channel.basic_get("q")
    return message and message.decode()


def test_a_corrupt_message_file_is_set_aside_and_the_worker_goes_on(channel, tmp_path, caplog):
    _publish(channel, "before")
    corrupt = tmp_path / "00000000000000000000_0.q.msg"  # sorts first
    corrupt.write_bytes(b'{"body": "trunc')
    old = time.time() - 60
    os.utime(corrupt, (old, old))
    _publish(channel, "after")
    with caplog.at_level(logging.ERROR, logger="django_gmail_smtp.testing.broker"):
        assert [_take(channel), _take(channel), _take(channel)] == [
            {"text": "before"},
            {"text": "after"},
            None,
        ]
    assert (tmp_path / "corrupt" / corrupt.name).read_bytes() == b'{"body": "trunc'
    assert not corrupt.exists()
    assert "is not a valid message" in caplog.text and "moved to" in caplog.text


def test_a_message_file_still_being_written_is_left_for_later(channel, tmp_path):
    """kombu's own filesystem transport creates the file before writing it: not corrupt yet."""
    partial = tmp_path / "00000000000000000000_0.q.msg"
    partial.write_bytes(b"")
    assert _take(channel) is None
    assert partial.exists() and not (tmp_path / "corrupt").exists()


def test_a_message_is_written_whole_or_not_at_all(channel, tmp_path, monkeypatch):
    """No reader ever sees a message file before its last byte is written."""
    seen: list[list[str]] = []
    real_write = os.write

    def write(fd, data):
        seen.append([n for n in os.listdir(tmp_path) if n.endswith(".msg")])
        return real_write(fd, data[:7])  # short writes: the message takes several calls

    monkeypatch.setattr(broker.os, "write", write)
    _publish(channel, "x" * 100)
    monkeypatch.undo()
    assert len(seen) > 1 and all(names == [] for names in seen)
    assert _take(channel) == {"text": "x" * 100}


@pytest.mark.integration
@pytest.mark.django_db
def test_the_tests_and_their_workers_use_the_embedded_broker(settings, tmp_path):
    if settings.CELERY_BROKER_URL.startswith("redis"):
        pytest.skip("REDIS_URL is set: the tests use Redis")
    from tests.celery_app import app

    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, broker.Transport)
    worker = CeleryWorker(log_path=tmp_path / "worker.log", queues=f"unused.{os.getpid()}")
    try:
        worker.wait_ready()
    finally:
        worker.stop()
    assert f"Connected to {broker.SCHEME}://" in worker.log()


_CLEANUP_REPORT = "GMAIL_SMTP_TEST_CLEANUP_REPORT"


@pytest.mark.skipif(
    not os.environ.get(_CLEANUP_REPORT),
    reason="run by test_a_test_run_leaves_nothing_in_the_broker",
)
def test_queue_a_task_no_worker_takes(settings):
    """Leaves a task in the broker, as many tests do (no worker serves their queue)."""
    from tests.celery_app import app

    app.send_task("django_gmail_smtp.tasks.sweep_outbox", queue="gmail_smtp.cleanup_check")
    if settings.CELERY_BROKER_URL.startswith("redis"):
        import redis

        with redis.Redis.from_url(settings.CELERY_BROKER_URL) as client:
            assert list(client.scan_iter(f"{settings.REDIS_KEY_PREFIX}*"))
        report = {"redis_prefix": settings.REDIS_KEY_PREFIX}
    else:
        folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]
        assert any(name.endswith(".gmail_smtp.cleanup_check.msg") for name in os.listdir(folder))
        report = {"folder": folder}
    Path(os.environ[_CLEANUP_REPORT]).write_text(json.dumps(report))


@pytest.mark.integration
def test_a_test_run_leaves_nothing_in_the_broker(settings, tmp_path):
    """A pytest run removes its Redis keys or its broker folder, with the tasks left in them."""
    report = tmp_path / "report.json"
    inherited = ("CELERY_FS_DIR", "GMAIL_SMTP_TEST_REDIS_PREFIX", "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env[_CLEANUP_REPORT] = str(report)
    nested = f"{Path(__file__).relative_to(ROOT)}::test_queue_a_task_no_worker_takes"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nested],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    left = json.loads(report.read_text())
    if "redis_prefix" in left:
        import redis

        with redis.Redis.from_url(settings.CELERY_BROKER_URL) as client:
            assert list(client.scan_iter(f"{left['redis_prefix']}*")) == []
    else:
        assert not os.path.exists(left["folder"])
