"""System checks (django_gmail_smtp.E0xx / W0xx) and the `manage.py gmail_smtp` command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError

from django_gmail_smtp.management.commands.gmail_smtp import Command

from .conftest import ALIAS, SENDER

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
WRONG_PASSWORD = "wrongpasswordxyz"


def check_ids() -> list[str]:
    return [m.id for m in run_checks() if (m.id or "").startswith("django_gmail_smtp.")]


def messages(check_id: str) -> list[str]:
    return [m.msg for m in run_checks() if m.id == check_id]


def gmail_smtp(*args: str) -> str:
    """Run `manage.py gmail_smtp ARGS` in-process and return what it printed."""
    out = io.StringIO()
    call_command("gmail_smtp", *args, stdout=out, stderr=out)
    return out.getvalue()


def gmail_smtp_failing(*args: str) -> tuple[str, CommandError]:
    out = io.StringIO()
    with pytest.raises(CommandError) as info:
        call_command("gmail_smtp", *args, stdout=out, stderr=out)
    return out.getvalue(), info.value


@pytest.fixture
def backend(settings):
    """The Gmail backend configured as EMAIL_BACKEND (the test runner swaps in locmem)."""
    settings.EMAIL_BACKEND = BACKEND
    settings.EMAIL_HOST_USER = ""
    settings.EMAIL_HOST_PASSWORD = ""
    return settings


# --- system checks ---------------------------------------------------------------------------


def test_e002_port_465_with_starttls(backend, settings):
    """PORT 465 with SECURITY starttls is error E002, with the fix in the hint."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "PORT": 465, "SECURITY": "starttls"}
    errors = [m for m in run_checks() if m.id == "django_gmail_smtp.E002"]
    assert len(errors) == 1
    assert errors[0].is_serious()
    assert '"SECURITY": "ssl"' in errors[0].hint


def test_no_e002_for_consistent_port_and_security(backend, settings):
    """PORT 465 with SECURITY ssl is fine."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "PORT": 465, "SECURITY": "ssl"}
    assert "django_gmail_smtp.E002" not in check_ids()


def test_e002_fails_manage_py_check(backend, settings):
    """`manage.py check` refuses to pass with E002."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "PORT": 465, "SECURITY": "starttls"}
    with pytest.raises(Exception, match="E002"):
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())


def test_w001_no_account_and_no_email_host_user(backend):
    """W001 when the backend is configured but there is no account and no EMAIL_HOST_USER."""
    (text,) = messages("django_gmail_smtp.W001")
    assert "no active GmailAccount" in text


def test_no_w001_with_an_account(backend, account):
    """No W001 once an account exists."""
    assert "django_gmail_smtp.W001" not in check_ids()


def test_no_w001_with_email_host_user(backend):
    """No W001 when EMAIL_HOST_USER / EMAIL_HOST_PASSWORD are set instead."""
    backend.EMAIL_HOST_USER = "fallback@example.com"
    backend.EMAIL_HOST_PASSWORD = "abcd efgh ijkl mnop"
    assert "django_gmail_smtp.W001" not in check_ids()


needs_mailers = pytest.mark.skipif(
    not __import__("django").VERSION >= (6, 1), reason="MAILERS exists from Django 6.1"
)


@needs_mailers
def test_w001_on_mailers_names_the_mailers_fix(db, settings):
    """On Django 6.1 W001 points at the MAILERS options, never at the EMAIL_* settings."""
    settings.MAILERS = {"default": {"BACKEND": BACKEND, "OPTIONS": {}}}
    (text,) = messages("django_gmail_smtp.W001")
    assert "'username'" in text and "EMAIL_HOST_USER" not in text


@needs_mailers
def test_no_w001_with_mailers_username_option(db, settings):
    """A MAILERS entry that logs in with username/password OPTIONS can send: no W001."""
    options = {"username": "fallback@example.com", "password": "abcd efgh ijkl mnop"}
    settings.MAILERS = {"default": {"BACKEND": BACKEND, "OPTIONS": options}}
    assert "django_gmail_smtp.W001" not in check_ids()


def test_no_w001_when_backend_not_in_use(settings):
    """No account warnings when another EMAIL_BACKEND is configured."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.EMAIL_HOST_USER = ""
    assert "django_gmail_smtp.W001" not in check_ids()


def test_w002_default_from_email_no_account_can_send_as(backend, account, settings):
    """W002 when DEFAULT_FROM_EMAIL is an address no account can send as."""
    settings.DEFAULT_FROM_EMAIL = "Site <site@example.com>"
    texts = [t for t in messages("django_gmail_smtp.W002") if "DEFAULT_FROM_EMAIL" in t]
    assert len(texts) == 1
    assert "site@example.com" in texts[0]


@pytest.mark.parametrize("address", [SENDER, f"Team <{ALIAS}>"])
def test_no_w002_for_account_address_or_alias(backend, account, settings, address):
    """No W002 when DEFAULT_FROM_EMAIL is an account's own address or a send-as alias."""
    settings.DEFAULT_FROM_EMAIL = address
    texts = [t for t in messages("django_gmail_smtp.W002") if "DEFAULT_FROM_EMAIL" in t]
    assert texts == []


def test_w003_no_encryption_keys_in_production(backend, settings):
    """W003 when ENCRYPTION_KEYS is unset and DEBUG is False."""
    settings.DEBUG = False
    settings.GMAIL_SMTP = {k: v for k, v in settings.GMAIL_SMTP.items() if k != "ENCRYPTION_KEYS"}
    (text,) = messages("django_gmail_smtp.W003")
    assert "SECRET_KEY" in text


def test_no_w003_in_debug(backend, settings):
    """No W003 while DEBUG is True."""
    settings.DEBUG = True
    settings.GMAIL_SMTP = {k: v for k, v in settings.GMAIL_SMTP.items() if k != "ENCRYPTION_KEYS"}
    assert "django_gmail_smtp.W003" not in check_ids()


def test_no_w003_with_encryption_keys(backend, settings):
    """No W003 when ENCRYPTION_KEYS is set."""
    settings.DEBUG = False
    assert settings.GMAIL_SMTP.get("ENCRYPTION_KEYS")
    assert "django_gmail_smtp.W003" not in check_ids()


def test_atomic_requests_check_warns_about_the_ledger(settings):
    from django.core.checks import run_checks

    settings.EMAIL_BACKEND = "django_gmail_smtp.backends.GmailSMTPBackend"
    settings.DATABASES = {
        **settings.DATABASES,
        "default": {**settings.DATABASES["default"], "ATOMIC_REQUESTS": True},
    }
    ids = {m.id for m in run_checks()}
    expected = "django_gmail_smtp.W006"
    if "sqlite" in settings.DATABASES["default"]["ENGINE"]:
        assert expected not in ids
    else:
        assert expected in ids


# --- gmail_smtp check ------------------------------------------------------------------------


def test_check_reports_ok(account, sandbox):
    """`gmail_smtp check` logs in and prints OK for a working account; nothing is sent."""
    out = gmail_smtp("check")
    assert "OK" in out and SENDER in out
    assert "FAIL" not in out
    assert sandbox.stats.logins == 1
    assert sandbox.deliveries == []


def test_check_reports_fail_with_the_fix(sandbox, make_account):
    """A wrong App Password prints FAIL with what to do, and the command exits with an error."""
    make_account(sandbox, app_password=WRONG_PASSWORD)
    out, error = gmail_smtp_failing("check")
    assert "FAIL" in out and SENDER in out
    assert "https://myaccount.google.com/apppasswords" in out
    assert WRONG_PASSWORD not in out
    assert "1 account(s) cannot send" in str(error)


def test_check_account_filter(sandbox, make_account):
    """`check --account` checks only that account (a bad other account does not fail it)."""
    make_account(sandbox)
    make_account(sandbox, "broken@example.com", app_password=WRONG_PASSWORD, is_default=False)
    out = gmail_smtp("check", "--account", SENDER)
    assert SENDER in out and "broken@example.com" not in out
    assert sandbox.stats.connections == 1

    out, _ = gmail_smtp_failing("check", "--account", "broken@example.com")
    assert "FAIL" in out and "broken@example.com" in out


def test_check_unknown_account(account, sandbox):
    """`check --account` with an address that is no account says so."""
    _, error = gmail_smtp_failing("check", "--account", "nobody@example.com")
    assert "nobody@example.com" in str(error)
    assert sandbox.stats.connections == 0


# --- gmail_smtp send-test / quota ------------------------------------------------------------


def test_send_test_delivers_and_prints_gmails_reply(account, sandbox):
    """`send-test TO` delivers one message to TO and prints Gmail's 250 reply."""
    out = gmail_smtp("send-test", "someone@example.net")
    (delivered,) = sandbox.deliveries
    assert delivered.rcpt_tos == ["someone@example.net"]
    assert delivered.user == SENDER
    assert "2.0.0 OK" in out
    assert delivered.message_id in out  # the queue id from Gmail's reply
    assert "someone@example.net" in out


def test_send_test_failure_is_a_command_error(sandbox, make_account):
    """`send-test` with a wrong App Password fails with the reason and sends nothing."""
    make_account(sandbox, app_password=WRONG_PASSWORD)
    _, error = gmail_smtp_failing("send-test", "someone@example.net")
    assert "Not sent" in str(error) and "App Password" in str(error)
    assert sandbox.deliveries == []


def test_quota_lists_every_account(sandbox, make_account):
    """`quota` prints a table row per account, counting what each has sent."""
    make_account(sandbox)
    make_account(sandbox, "second@example.com", is_default=False)
    gmail_smtp("send-test", "someone@example.net", "--account", SENDER)
    out = gmail_smtp("quota")
    lines = out.splitlines()
    assert lines[0].split()[0] == "ACCOUNT"
    (first,) = [line for line in lines if line.startswith(SENDER)]
    (second,) = [line for line in lines if line.startswith("second@example.com")]
    assert "1/500" in first
    assert "0/500" in second


def test_quota_account_filter(sandbox, make_account):
    """`quota --account` shows only that account."""
    make_account(sandbox)
    make_account(sandbox, "second@example.com", is_default=False)
    out = gmail_smtp("quota", "--account", "second@example.com")
    assert "second@example.com" in out and SENDER not in out


# --- help ------------------------------------------------------------------------------------


def test_command_help_lists_subcommands():
    """`gmail_smtp --help` names every subcommand and says how to get their help."""
    text = Command().create_parser("manage.py", "gmail_smtp").format_help()
    for subcommand in ("check", "send-test", "quota", "rotate-keys"):
        assert subcommand in text
    assert "--help" in text


@pytest.mark.parametrize(
    ("subcommand", "expected"),
    [
        ("check", ["--account", "Nothing is sent"]),
        ("send-test", ["TO", "--account", "--subject"]),
        ("quota", ["--account", "24 hours"]),
        ("rotate-keys", ["ENCRYPTION_KEYS"]),
    ],
)
@pytest.mark.integration
def test_subcommand_help(subcommand, expected):
    """`manage.py gmail_smtp SUBCOMMAND --help` explains the subcommand and its options."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "django", "gmail_smtp", subcommand, "--help"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for text in expected:
        assert text in help_text


# --- migrations ------------------------------------------------------------------------------


def test_models_and_migrations_agree():
    """`makemigrations --check --dry-run` finds nothing to write."""
    out = io.StringIO()
    try:
        call_command(
            "makemigrations", "django_gmail_smtp", "--check", "--dry-run", stdout=out, stderr=out
        )
    except SystemExit:
        pytest.fail("models and migrations disagree:\n" + out.getvalue())
