"""The outbox on each broker a site runs: Redis and RabbitMQ, with a worker started as the
README says (``celery -A proj worker -Q gmail_smtp.transactional,gmail_smtp.bulk``).

The sending side and the worker are separate processes configured only by
``CELERY_BROKER_URL``, as on a real site. A broker that is not running here is skipped.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import pytest

from django_gmail_smtp.models import OutboundEmail

from .conftest import SENDER
from .processes import ROOT, CeleryWorker, child_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BROKERS = {
    "redis": "redis://127.0.0.1:6379/5",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}

SEND = """
import django
django.setup()
import tests.celery_app  # what a project's __init__.py does: load its Celery app
from django.core.mail import EmailMessage
from django_gmail_smtp.backends import CeleryGmailBackend
message = EmailMessage("Over {broker}", "Body", "{sender}", ["to@example.net"])
assert CeleryGmailBackend().send_messages([message]) == 1
"""


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_worker_on_each_broker_sends_queued_mail(broker, account, sandbox, settings, tmp_path):
    url = BROKERS[broker]
    if not reachable(url):
        pytest.skip(f"{broker} is not running on {urlsplit(url).netloc}")
    tag = uuid.uuid4().hex[:8]
    queues = {"transactional": f"gmail_smtp.transactional.{tag}", "bulk": f"gmail_smtp.bulk.{tag}"}
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "QUEUES": queues}
    prefix = f"django_gmail_smtp_tests:{tag}:"  # Redis: the sender and worker share it
    env = {"CELERY_BROKER_URL": url, "GMAIL_SMTP_TEST_REDIS_PREFIX": prefix}
    worker = CeleryWorker(
        queues=",".join(queues.values()), log_path=tmp_path / "worker.log", env=env
    )
    try:
        worker.wait_ready()
        assert url.split("://")[0] in worker.log()  # connected to this broker, not another
        sender = subprocess.run(
            [sys.executable, "-c", SEND.format(broker=broker, sender=SENDER)],
            cwd=ROOT,
            env={**child_env(), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sender.returncode == 0, sender.stderr
        wait_for(
            lambda: OutboundEmail.objects.filter(status=OutboundEmail.Status.SENT).count() == 1,
            30,
            lambda: f"the {broker} worker did not send the message:\n{worker.log()[-3000:]}",
        )
    finally:
        worker.stop()
        _clean_up(url, prefix, list(queues.values()))
    (delivered,) = sandbox.deliveries
    assert delivered.message["Subject"] == f"Over {broker}"


def _clean_up(url: str, prefix: str, queues) -> None:
    """Leave nothing of this test in the broker: its Redis keys, its RabbitMQ queues."""
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        # kombu keeps some keys (bindings, the queue's list) outside global_keyprefix.
        keys = list(client.scan_iter(f"{prefix}*"))
        for name in queues:
            keys += client.scan_iter(f"*{name}*")
        if keys:
            client.delete(*keys)
        return
    from kombu import Connection

    with Connection(url, connect_timeout=2) as connection:
        channel = connection.default_channel
        for name in queues:
            channel.queue_delete(name)
