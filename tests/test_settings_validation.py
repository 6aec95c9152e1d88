"""GMAIL_SMTP values of the wrong type or range, unknown keys and a misspelled dict name.

Every key is checked by a system check (E005, naming the key, the value's type and what to give)
and again when it is read, so a worker never dies on a raw ValueError and a configuration error
never counts as a delivery attempt.
"""

from __future__ import annotations

import io

import pytest
from django.core.checks import run_checks
from django.core.mail import EmailMessage, get_connection
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from django_gmail_smtp import outbox
from django_gmail_smtp.backends import CeleryGmailBackend, GmailSMTPBackend
from django_gmail_smtp.conf import DEFAULTS, SETTINGS, get_setting, validate_options
from django_gmail_smtp.exceptions import GmailConfigurationError
from django_gmail_smtp.models import OutboundAttempt, OutboundEmail
from django_gmail_smtp.transport import ConnectionPool

from .conftest import SENDER
from .factories import queued_row

pytestmark = pytest.mark.django_db

Status = OutboundEmail.Status
SYNC = "django_gmail_smtp.backends.GmailSMTPBackend"

#: one value of the wrong type for every key, with the type name the message must show
WRONG = {
    "HOST": (["smtp.gmail.com"], "list"),
    "PORT": ("abc", "str"),
    "SECURITY": ("tls", "str"),
    "TIMEOUT": ("30s", "str"),
    "CA_FILE": (42, "int"),
    "EHLO_HOSTNAME": (42, "int"),
    "TOKEN_URI": ("oauth2.googleapis.com/token", "str"),
    "AUTH_URI": (5, "int"),
    "CLIENT_ID": (12345, "int"),
    "CLIENT_SECRET": (["s3cr3t-value"], "list"),
    "OAUTH_REDIRECT_URI": ("/oauth/callback", "str"),
    "ENCRYPTION_KEYS": ([b"k" * 32, 7], "list"),
    "STRICT_FROM": ("False", "str"),
    "PUBLISH_IN_BACKGROUND": ("yes", "str"),
    "MAX_RECIPIENTS_PER_MESSAGE": ("100", "str"),
    "TOKEN_REFRESH_MARGIN": ("5m", "str"),
    "QUOTA_DATABASE": (1, "int"),
    "RESERVED_SHARE": ("10%", "str"),
    "PRIORITY": ("urgent", "str"),
    "QUEUES": ("gmail_smtp.transactional", "str"),
    "RETRY_BASE_DELAY": ("30s", "str"),
    "RETRY_MAX_DELAY": ("1h", "str"),
    "MAX_ATTEMPTS": (8.5, "float"),
    "SWEEP_GRACE": ("1m", "str"),
    "SWEEP_INTERVAL": ("1m", "str"),
    "SENDING_LEASE": ("10m", "str"),
    "POOL_IDLE_CHECK": (True, "bool"),
    "STREAM_BATCH": ("50", "str"),
    "CONNECTIONS_PER_ACCOUNT": (1.5, "float"),
    "CONNECTION_LEASE": ("1m", "str"),
    "CONNECTION_IDLE": ("10s", "str"),
    "BODY_RETENTION_DAYS": ("7d", "str"),
    "MAX_MESSAGE_SIZE": ("25MB", "str"),
    "TRANSPORT_CLASS": (42, "int"),
    "IMAP_HOST": (["imap.gmail.com"], "list"),
    "IMAP_PORT": ("993", "str"),
    "BOUNCE_INTERVAL": ("10m", "str"),
    "BOUNCE_SOFT_LIMIT": (2.5, "float"),
    "BOUNCE_ACTION": ("archive", "str"),
    "BOUNCE_LABEL": (42, "int"),
    "SITE_URL": ("www.example.com", "str"),
    "NEWSLETTER_TICK": ("1m", "str"),
    "NEWSLETTER_AUDIENCES": (["myapp.audiences.active_users"], "list"),
    "NEWSLETTER_ALIGNED_DOMAINS": ("example.com", "str"),
    "NEWSLETTER_BREAKER_RATE": ("5%", "str"),
    "NEWSLETTER_BREAKER_MINIMUM": (0, "int"),
    "NEWSLETTER_CONFIRMATIONS_PER_HOUR": ("30/h", "str"),
}
SECRETS = {"CLIENT_SECRET", "ENCRYPTION_KEYS"}


def errors(check_id: str = "django_gmail_smtp.E005") -> list[str]:
    return [m.msg for m in run_checks() if m.id == check_id]


def warnings(check_id: str) -> list:
    return [m for m in run_checks() if m.id == check_id]


def with_keys(settings, **values) -> None:
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, **values}


def test_every_key_has_a_spec_and_a_wrong_value_here():
    """The table covers every key in DEFAULTS (and this test covers the table)."""
    assert set(SETTINGS) == set(DEFAULTS)
    assert set(WRONG) == set(SETTINGS)
    for spec in SETTINGS.values():
        assert spec.description and spec.expected


@pytest.mark.parametrize("key", sorted(WRONG))
def test_wrong_type_is_a_check_error_naming_the_key(settings, key):
    """E005 names the key, the value's type and what to give; secrets are never shown."""
    value, type_name = WRONG[key]
    with_keys(settings, **{key: value})
    (text,) = errors()
    assert f'GMAIL_SMTP["{key}"]' in text
    shown = f"a {type_name}" if key in SECRETS else f"{value!r} ({type_name})"
    assert f"is {shown}" in text
    assert f"give {SETTINGS[key].expected}" in text
    if key in SECRETS:
        assert "s3cr3t" not in text and "kkkk" not in text


@pytest.mark.parametrize("key", sorted(WRONG))
def test_wrong_type_is_refused_when_read(settings, key):
    """Reading a bad value raises GmailConfigurationError (never a raw ValueError)."""
    value, _type_name = WRONG[key]
    with_keys(settings, **{key: value})
    with pytest.raises(GmailConfigurationError, match=rf'GMAIL_SMTP\["{key}"\]'):
        get_setting(key)


def test_timeout_message_reads_as_documented(settings):
    with_keys(settings, TIMEOUT="30s")
    with pytest.raises(GmailConfigurationError) as info:
        get_setting("TIMEOUT")
    assert str(info.value) == (
        "GMAIL_SMTP[\"TIMEOUT\"] is '30s' (str); give a number of seconds such as 30."
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("TIMEOUT", 0),
        ("TIMEOUT", -1),
        ("TIMEOUT", float("nan")),
        ("TIMEOUT", True),
        ("PORT", 0),
        ("PORT", 70000),
        ("PORT", 587.0),
        ("RESERVED_SHARE", 1.5),
        ("RESERVED_SHARE", -0.1),
        ("MAX_ATTEMPTS", 0),
        ("MAX_RECIPIENTS_PER_MESSAGE", 0),
        ("SENDING_LEASE", 0),
        ("SWEEP_GRACE", -5),
        ("QUOTA_DATABASE", "no-such-database"),
        ("QUEUES", {"urgent": "q"}),
        ("QUEUES", {"bulk": ""}),
        ("STRICT_FROM", 1),
    ],
)
def test_out_of_range_values_are_errors(settings, key, value):
    with_keys(settings, **{key: value})
    (text,) = errors()
    assert f'GMAIL_SMTP["{key}"]' in text


@pytest.mark.parametrize(
    ("values", "key", "expected"),
    [
        ({"PORT": 465, "SECURITY": "SSL"}, "SECURITY", "ssl"),
        ({"TIMEOUT": 2.5}, "TIMEOUT", 2.5),
        ({"ENCRYPTION_KEYS": "one-single-key-of-enough-length"}, "ENCRYPTION_KEYS", None),
        ({"QUEUES": {"bulk": "mail.bulk"}}, "QUEUES", None),
        ({"STRICT_FROM": True}, "STRICT_FROM", True),
        ({"BODY_RETENTION_DAYS": None}, "BODY_RETENTION_DAYS", 7),
        ({"EHLO_HOSTNAME": "", "OAUTH_REDIRECT_URI": ""}, "EHLO_HOSTNAME", ""),
    ],
)
def test_valid_values_pass(settings, values, key, expected):
    with_keys(settings, **values)
    assert errors() == []
    if expected is not None:
        assert get_setting(key) == expected


def test_partial_queues_keep_the_other_default(settings):
    with_keys(settings, QUEUES={"bulk": "mail.bulk"})
    assert outbox.queue_name("bulk") == "mail.bulk"
    assert outbox.queue_name("transactional") == "gmail_smtp.transactional"


def test_queues_as_a_string_names_the_setting(settings):
    """QUEUES as a string: E005, and dispatching names QUEUES instead of an AttributeError
    (which the dispatcher used to log as a broker outage)."""
    with_keys(settings, QUEUES="gmail_smtp.transactional")
    (text,) = errors()
    assert 'GMAIL_SMTP["QUEUES"]' in text and "dict" in text
    with pytest.raises(GmailConfigurationError, match="QUEUES"):
        outbox.queue_name("transactional")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PORT", "abc"),
        ("TIMEOUT", "30s"),
        ("SENDING_LEASE", "10m"),
        ("SWEEP_GRACE", "1m"),
        ("MAX_RECIPIENTS_PER_MESSAGE", "100x"),  # read by the accounts check
    ],
)
def test_manage_py_check_reports_instead_of_crashing(settings, key, value):
    """`manage.py check` stops with E005, not a raw ValueError from float()/int()."""
    settings.EMAIL_BACKEND = SYNC
    with_keys(settings, **{key: value})
    with pytest.raises(SystemCheckError) as info:
        call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
    assert "django_gmail_smtp.E005" in str(info.value)
    assert f'GMAIL_SMTP["{key}"]' in str(info.value)


def test_strict_from_string_false_is_an_error_not_true(settings, sandbox, account):
    """STRICT_FROM="False" used to count as true and refuse mail; now it is a config error,
    raised even with fail_silently, and nothing is sent."""
    with_keys(settings, STRICT_FROM="False")
    (text,) = errors()
    assert 'GMAIL_SMTP["STRICT_FROM"]' in text and "bool" in text
    message = EmailMessage("s", "b", "Shop <noreply@shop.example>", ["to@example.net"])
    with pytest.raises(GmailConfigurationError, match="STRICT_FROM"):
        get_connection(SYNC, fail_silently=True).send_messages([message])
    assert sandbox.stats.connections == 0 and sandbox.deliveries == []


def test_gmail_smtp_that_is_not_a_dict_is_e001(settings):
    settings.GMAIL_SMTP = "smtp.gmail.com"
    (error,) = [m for m in run_checks() if m.id == "django_gmail_smtp.E001"]
    assert "GMAIL_SMTP must be a dict" in error.msg


def test_email_timeout_of_the_wrong_type_is_an_error(settings):
    settings.EMAIL_BACKEND = SYNC
    settings.GMAIL_SMTP = {k: v for k, v in settings.GMAIL_SMTP.items() if k != "TIMEOUT"}
    settings.EMAIL_TIMEOUT = "30s"
    (text,) = errors()
    assert text.startswith("EMAIL_TIMEOUT is '30s' (str)")


# --- unknown keys and names ----------------------------------------------------------------------


def test_typo_key_gets_the_closest_name(settings):
    with_keys(settings, POTR=587)
    (warning,) = warnings("django_gmail_smtp.W007")
    assert "'POTR'" in warning.msg and 'Did you mean "PORT"?' in warning.hint
    assert errors() == []  # a warning, not an error


def test_lower_case_key_gets_the_upper_case_name(settings):
    with_keys(settings, port=587)
    (warning,) = warnings("django_gmail_smtp.W007")
    assert "'port'" in warning.msg
    assert '"PORT"' in warning.hint and "upper case" in warning.hint


def test_unknown_key_without_a_close_name_lists_the_keys(settings):
    with_keys(settings, COMPLETELY_DIFFERENT=1)
    (warning,) = warnings("django_gmail_smtp.W007")
    assert "STRICT_FROM" in warning.hint


def test_misspelled_dict_name_is_a_warning(settings):
    settings.GMAIL_SMPT = {"PORT": 587}
    (warning,) = warnings("django_gmail_smtp.W008")
    assert "GMAIL_SMPT" in warning.msg and "GMAIL_SMTP" in warning.msg


def test_no_warnings_for_the_test_settings():
    ids = {m.id for m in run_checks()}
    assert not ids & {
        "django_gmail_smtp.E005",
        "django_gmail_smtp.E006",
        "django_gmail_smtp.W007",
        "django_gmail_smtp.W008",
    }


# --- backend options (a Django 6.1 MAILERS entry's OPTIONS) ---------------------------------------


def test_validate_options_checks_lower_case_options():
    errors_ = validate_options(
        {"timeout": "30s", "port": 587, "strict_from": "no", "account": "x@example.com"},
        source='MAILERS["default"]["OPTIONS"]',
    )
    assert errors_ == [
        'MAILERS["default"]["OPTIONS"]["timeout"] is \'30s\' (str); give a number of '
        "seconds such as 30.",
        'MAILERS["default"]["OPTIONS"]["strict_from"] is \'no\' (str); give True or False '
        "(a bool, not a string).",
    ]


def test_mailers_options_of_the_wrong_type_are_e006(settings):
    settings.MAILERS = {
        "default": {"BACKEND": SYNC, "OPTIONS": {"port": "587x", "timeout": 5}},
        "other": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
    }
    (text,) = errors("django_gmail_smtp.E006")
    assert text.startswith('MAILERS["default"]["OPTIONS"]["port"] is \'587x\' (str)')


def test_mailers_options_that_are_not_a_dict_are_e006_not_a_crash(settings):
    settings.MAILERS = {"default": {"BACKEND": SYNC, "OPTIONS": ["timeout", 5]}}
    (text,) = errors("django_gmail_smtp.E006")
    assert text == 'MAILERS["default"]["OPTIONS"] is a list; give a dict of options.'


def test_option_of_the_wrong_type_is_refused_when_read(settings):
    from django_gmail_smtp.conf import connection_settings

    with pytest.raises(GmailConfigurationError, match='the "port" option'):
        connection_settings({"port": "587x"})


# --- the worker path: a configuration error is never a delivery attempt -----------------------


@pytest.fixture
def queued(settings, account, sandbox):
    """A row queued with good settings (its task is not dispatched: no commit in a test)."""
    message = EmailMessage("s", "b", SENDER, ["to@example.net"])
    assert CeleryGmailBackend().send_messages([message]) == 1
    return OutboundEmail.objects.get(pk=message.gmail_outbound_id)


@pytest.mark.parametrize(
    ("key", "value"),
    [("TIMEOUT", "30s"), ("CA_FILE", 42), ("EHLO_HOSTNAME", 42), ("RESERVED_SHARE", "10%")],
)
def test_config_error_in_the_worker_defers_without_an_attempt(
    settings, queued, sandbox, key, value
):
    """A bad setting met while delivering defers the row (reason config) and counts no attempt;
    it used to raise ValueError, which was retried and counted like a network error."""
    pool = ConnectionPool()
    with_keys(settings, **{key: value})
    try:
        assert outbox.deliver(queued.pk, pool=pool) == "deferred"
    finally:
        pool.close()
    queued.refresh_from_db()
    assert queued.status == OutboundEmail.Status.DEFERRED
    assert queued.reason == OutboundEmail.Reason.CONFIG
    assert queued.attempts == 0
    assert f'GMAIL_SMTP["{key}"]' in queued.last_error
    outcomes = list(
        OutboundAttempt.objects.filter(outbound=queued).values_list("outcome", flat=True)
    )
    assert outcomes == [OutboundAttempt.Outcome.DEFERRED]
    assert sandbox.stats.connections == 0 and sandbox.deliveries == []


def test_error_between_claim_and_send_is_recorded(account, settings, pool, no_dispatch):
    row = queued_row(account)
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "RESERVED_SHARE": 2}
    assert outbox.deliver(row.pk, pool=pool) == "deferred"
    row.refresh_from_db()
    assert row.status == Status.DEFERRED and row.reason == "config"
    assert "RESERVED_SHARE" in row.last_error


def test_bad_sending_lease_is_a_config_error_and_no_attempt(settings, queued, sandbox):
    """SENDING_LEASE is read before the row is claimed: the row is left as it was."""
    pool = ConnectionPool()
    with_keys(settings, SENDING_LEASE="10m")
    try:
        result = outbox.deliver(queued.pk, pool=pool)
    except GmailConfigurationError as exc:
        assert 'GMAIL_SMTP["SENDING_LEASE"]' in str(exc)
    else:
        assert result == "deferred"
    finally:
        pool.close()
    queued.refresh_from_db()
    assert queued.attempts == 0
    assert queued.status in (OutboundEmail.Status.QUEUED, OutboundEmail.Status.DEFERRED)
    assert sandbox.deliveries == []


def test_bad_sweep_grace_names_the_setting(settings):
    with_keys(settings, SWEEP_GRACE="1m")
    with pytest.raises(GmailConfigurationError, match=r'GMAIL_SMTP\["SWEEP_GRACE"\]'):
        outbox.sweep()


@pytest.mark.parametrize(("key", "value"), [("MAX_ATTEMPTS", "8x"), ("RETRY_BASE_DELAY", "30s")])
def test_bad_retry_setting_after_a_temporary_failure_defers_for_config(
    settings, queued, sandbox, key, value
):
    """A retry setting is read only after Gmail's 4xx: a bad one defers the row (reason
    config, no attempt counted) instead of raising out of the task and leaving it sending."""
    sandbox.fault("mail", reply="451 4.3.0 Mail server temporarily rejected message")
    pool = ConnectionPool()
    with_keys(settings, **{key: value})
    try:
        assert outbox.deliver(queued.pk, pool=pool) == "deferred"
    finally:
        pool.close()
    queued.refresh_from_db()
    assert queued.status == OutboundEmail.Status.DEFERRED
    assert queued.reason == OutboundEmail.Reason.CONFIG
    assert queued.attempts == 0 and queued.next_attempt_at is not None
    assert f'GMAIL_SMTP["{key}"]' in queued.last_error


@pytest.mark.parametrize("backend_class", [GmailSMTPBackend, CeleryGmailBackend])
def test_bad_backend_option_fails_when_the_mailer_is_created(backend_class):
    """A MAILERS entry's bad OPTIONS fail when the mailer is built, naming the option."""
    with pytest.raises(GmailConfigurationError, match=r'MAILERS\["default"\]\["OPTIONS"\]'):
        backend_class(alias="default", port="587x")
