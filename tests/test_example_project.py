"""The example project's demo runs end to end: sandbox, migrate, password reset (sent at once),
contact form (queued, then sent by a real Celery worker on the embedded atomicfs:// broker)."""

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "example_project" / "demo.py"

pytestmark = pytest.mark.integration


def test_demo_sends_password_reset_and_contact_message_through_celery(tmp_path):
    database = tmp_path / "demo.sqlite3"
    broker = tmp_path / "broker"
    env = {
        **os.environ,
        # Whatever the environment says (CI sets PostgreSQL and Redis), the demo and its worker
        # use the database and broker given as flags; these would fail if they were used.
        "DATABASE_URL": "postgres://nobody@127.0.0.1:1/not_the_demo_database",
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the demo uses the example project's settings

    result = subprocess.run(
        [
            sys.executable,
            str(DEMO),
            "--database-url",
            f"sqlite:///{database}",
            "--broker-folder",
            str(broker),
            "--traceback",
        ],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )

    out = result.stdout
    output = out + result.stderr
    assert result.returncode == 0, output

    # The password reset: sent at once through the sync backend.
    assert "PasswordResetForm, GmailSMTPBackend" in out, output
    assert "Reset link: http://localhost:8000/accounts/reset/" in out, output

    # The contact form: the request only queued it; a real worker sent it.
    assert "Starting a Celery worker (embedded file broker, no server needed)..." in out, output
    ready = re.search(r"ready after [\d.]+ s: celery -A example_project worker .*\(pid (\d+);", out)
    assert ready, output
    queued = re.search(r"the view answered 302 in \d+ ms: it only wrote outbox row #(\d+)", out)
    assert queued, output
    row_id = int(queued.group(1))
    assert re.search(
        rf"=== Outbox row #{row_id} \(OutboundEmail, sent by the Celery worker\).*\n"
        r"  Status\s+sent\n",
        out,
    ), output
    assert re.search(r"Attempt log\s+\S+ sent 250 \(worker ", out), output
    assert re.search(r"Gmail's reply\s+250 2\.0\.0 OK", out), output
    assert re.search(r"Account\s+demo@example\.com", out), output
    contact = out.split("=== Contact form", 1)[-1]
    assert "via Celery" in contact.splitlines()[0], output
    assert re.search(r"Subject:\s+Contact form: message from Bob Visitor", contact), output
    assert re.search(r"Reply-To:\s+Bob Visitor <bob@example.org>", contact), output
    assert "Does this site really send its mail through Gmail?" in contact, output

    # The worker was stopped, and it really sent the row, on the demo's own database and broker.
    assert re.search(r"Stopping the Celery worker \(SIGTERM\)\.\.\.\n  (stopped|not stopped)", out)
    with pytest.raises(ProcessLookupError):
        os.kill(int(ready.group(1)), 0)
    with sqlite3.connect(database) as db:
        (status,) = db.execute(
            "SELECT status FROM django_gmail_smtp_outboundemail WHERE id = ?", (row_id,)
        ).fetchone()
    assert status == "sent"
    log = (tmp_path / "celery-worker.log").read_text()
    assert "send_outbound_email" in log and "succeeded" in log, log
    # The embedded broker that writes each task whole (not kombu's filesystem:// transport).
    assert "Connected to atomicfs://" in log, log
    assert (broker / "messages").is_dir()
