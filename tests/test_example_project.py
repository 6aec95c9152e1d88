"""The example project's demo runs end to end: sandbox, migrate, password reset (sent at once),
contact form (queued, then sent by a real Celery worker on the embedded atomicfs:// broker).
Its settings and code use no deprecated mail API: ``MAILERS`` on Django 6.1, no ``EMAIL_*``."""

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import django
import pytest

EXAMPLE_PROJECT = Path(__file__).resolve().parent.parent / "example_project"
DEMO = EXAMPLE_PROJECT / "demo.py"
DJANGO_61 = django.VERSION >= (6, 1)
# Deprecated APIs are errors in the subprocesses (RemovedInDjango2028Warning is a
# PendingDeprecationWarning): in the settings, the contact view, the Celery worker.
DEPRECATIONS_AS_ERRORS = "error::DeprecationWarning,error::PendingDeprecationWarning"


def example_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for the example project's settings, on a database and broker folder in
    ``tmp_path``, without the test run's own mail or login variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DJANGO_SETTINGS_MODULE", "EMAIL_URL")
        and not k.startswith("GMAIL_")  # GMAIL_USER, GMAIL_APP_PASSWORD, GMAIL_SMTP_*
        and not k.endswith(("EMAIL_BACKEND", "MAILER_BACKEND"))
    }
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'example.sqlite3'}",
            "CELERY_BROKER_URL": "atomicfs://",
            "CELERY_BROKER_FOLDER": str(tmp_path / "broker"),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


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
        # The contact view, the settings and the worker use no deprecated API.
        "PYTHONWARNINGS": DEPRECATIONS_AS_ERRORS,
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

    # The newsletter: 12 readers at 9 a day (10, less the transactional share), paced over two
    # days by the planner on the demo's clock, sent by the worker; a one-click unsubscribe
    # (POST, no cookie, no CSRF token) keeps the next issue from her.
    newsletter = out.split("=== Newsletter", 1)[-1]
    assert "Forecast before starting: about 1 day 8 hours at 9/day across 1 account" in newsletter
    # A tick every 6 hours of demo time from the next full hour: the first issue finishes
    # 36 hours after it started (7 ticks), whatever the hour the demo runs at (it used to look
    # for "Tue", which holds only when the demo starts before noon).
    first_issue = newsletter.split("The message grace@example.net received", 1)[0]
    ticks = re.findall(r"^  \w{3} \d\d:\d\d  \[[#.]+\] .*$", first_issue, re.MULTILINE)
    assert len(ticks) == 7, output
    assert re.search(r"\] 12 sent,  0 waiting   finished: 12 sent, 0 failed$", ticks[-1]), output
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in newsletter, output
    assert "GET  (what a link scanner does)    -> 200" in newsletter, output
    assert "is still subscribed" in newsletter, output
    assert "POST List-Unsubscribe=One-Click   -> 200 (no redirect)" in newsletter, output
    assert "Every other reader got 2, grace@example.net 1" in newsletter, output
    assert "The busiest 24 hours: 9 messages from news@example.com" in newsletter, output

    # The worker was stopped, and it really sent the row, on the demo's own database and broker.
    assert re.search(r"Stopping the Celery worker \(SIGTERM\)\.\.\.\n  (stopped|not stopped)", out)
    with pytest.raises(ProcessLookupError):
        os.kill(int(ready.group(1)), 0)
    with sqlite3.connect(database) as db:
        (status, mailer) = db.execute(
            "SELECT status, mailer FROM django_gmail_smtp_outboundemail WHERE id = ?", (row_id,)
        ).fetchone()
    assert status == "sent"
    # On Django 6.1 the view sent with message.send(using="contact"): the MAILERS entry's alias.
    assert mailer == ("contact" if DJANGO_61 else "")
    log = (tmp_path / "celery-worker.log").read_text()
    assert "send_outbound_email" in log and "succeeded" in log, log
    # The embedded broker that writes each task whole (not kombu's filesystem:// transport).
    assert "Connected to atomicfs://" in log, log
    assert (broker / "messages").is_dir()


def test_manage_py_check_passes_with_deprecation_warnings_as_errors(tmp_path):
    """The example settings configure mail without a deprecated setting (on Django 6.1 every
    EMAIL_* setting is deprecated in favour of MAILERS)."""
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-W",
            "error::PendingDeprecationWarning",
            str(EXAMPLE_PROJECT / "manage.py"),
            "check",
        ],
        env=example_env(tmp_path),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr


# The example settings module's mail settings, imported in a fresh interpreter.
SHOW_MAIL_SETTINGS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from example_project import settings
email = {
    name: getattr(settings, name)
    for name in dir(settings)
    if name.startswith("EMAIL_") or name == "CONTACT_EMAIL_BACKEND"
}
print(json.dumps({"email": email, "mailers": getattr(settings, "MAILERS", None)}))
"""
EMAIL_URL = "smtp+tls://me%40example.com:abcdefghijklmnop@smtp.gmail.com:587"


def example_mail_settings(tmp_path: Path, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SHOW_MAIL_SETTINGS, str(EXAMPLE_PROJECT)],
        env=example_env(tmp_path, **env),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(not DJANGO_61, reason="MAILERS is new in Django 6.1")
def test_settings_define_mailers_and_no_email_settings_on_django_61(tmp_path):
    found = example_mail_settings(tmp_path)
    assert found["email"] == {}  # Django refuses EMAIL_* settings next to MAILERS
    mailers = found["mailers"]
    assert mailers["default"]["BACKEND"] == "django_gmail_smtp.backends.GmailSMTPBackend"
    assert mailers["contact"]["BACKEND"] == "django_gmail_smtp.backends.CeleryGmailBackend"
    # No login in the environment: the accounts in the admin send.
    assert mailers["default"]["OPTIONS"] == {"username": "", "password": ""}

    # The one-variable habit: EMAIL_URL becomes the mailers' login OPTIONS, still no EMAIL_*.
    found = example_mail_settings(
        tmp_path,
        EMAIL_URL=EMAIL_URL,
        CONTACT_MAILER_BACKEND="django_gmail_smtp.backends.GmailSMTPBackend",
    )
    assert found["email"] == {}
    login = {"username": "me@example.com", "password": "abcdefghijklmnop"}
    assert found["mailers"]["default"]["OPTIONS"] == login
    assert found["mailers"]["contact"]["OPTIONS"] == login
    assert found["mailers"]["contact"]["BACKEND"] == "django_gmail_smtp.backends.GmailSMTPBackend"

    # GMAIL_USER / GMAIL_APP_PASSWORD win over EMAIL_URL.
    found = example_mail_settings(
        tmp_path, EMAIL_URL=EMAIL_URL, GMAIL_USER="you@example.com", GMAIL_APP_PASSWORD="x" * 16
    )
    login = {"username": "you@example.com", "password": "x" * 16}
    assert found["mailers"]["default"]["OPTIONS"] == login


@pytest.mark.skipif(DJANGO_61, reason="Django < 6.1 has no MAILERS")
def test_settings_keep_email_settings_before_django_61(tmp_path):
    found = example_mail_settings(tmp_path, EMAIL_URL=EMAIL_URL, GMAIL_USER="you@example.com")
    assert found["mailers"] is None
    email = found["email"]
    assert email["EMAIL_BACKEND"] == "django_gmail_smtp.backends.GmailSMTPBackend"
    assert email["CONTACT_EMAIL_BACKEND"] is None  # the contact form uses EMAIL_BACKEND
    # GMAIL_USER wins over EMAIL_URL's user; the rest comes from EMAIL_URL (for Django's own
    # SMTP backend too).
    assert email["EMAIL_HOST_USER"] == "you@example.com"
    assert email["EMAIL_HOST_PASSWORD"] == "abcdefghijklmnop"
    assert (email["EMAIL_HOST"], email["EMAIL_PORT"], email["EMAIL_USE_TLS"]) == (
        "smtp.gmail.com",
        587,
        True,
    )
