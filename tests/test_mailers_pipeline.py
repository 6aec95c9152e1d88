"""One mailer's options, resolved once, mean the same in the request and in the Celery worker.

A ``MAILERS`` entry (or a backend's keyword arguments) may point at another server, CA, timeout
or quota database than ``GMAIL_SMTP``. The outbox row records the mailer's alias and the worker
resolves the same :class:`~django_gmail_smtp.conf.MailerSettings` from it; both backends and the
task go through one :class:`~django_gmail_smtp.pipeline.Pipeline`.

The tests marked ``integration`` start a real Celery worker (with ``tests.settings_mailers``,
which hands it the test's ``MAILERS``) and a second sandbox on another port with its own CA.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.db import connection, transaction

from django_gmail_smtp import conf, outbox, signals, tasks
from django_gmail_smtp.backends import CeleryGmailBackend, GmailSMTPBackend
from django_gmail_smtp.enums import Outcome, Reason
from django_gmail_smtp.exceptions import GmailConfigurationError
from django_gmail_smtp.models import OutboundEmail, SenderQuota
from django_gmail_smtp.pipeline import Pipeline
from django_gmail_smtp.quota import quota_status
from django_gmail_smtp.testing import GmailSandbox

from .conftest import APP_PASSWORD, SENDER
from .factories import FAST, all_sent, outbox_state, with_keys
from .processes import CeleryWorker, wait_for

pytestmark = pytest.mark.django_db

CELERY = "django_gmail_smtp.backends.CeleryGmailBackend"
needs_mailers = pytest.mark.skipif(
    not hasattr(mail, "mailers"), reason="MAILERS exists from Django 6.1 (nox runs it there)"
)
on_postgresql = pytest.mark.skipif(
    connection.vendor == "sqlite",
    reason="QUOTA_DATABASE needs a second alias of a server database (the 'ledger' alias of "
    "tests/settings.py exists on PostgreSQL only)",
)
#: a lease longer than the 3 s the slow-greeting test waits for
WORKER = {**FAST, "SENDING_LEASE": 30}


@pytest.fixture
def second(tmp_path):
    """A second sandbox, on another port, with its own CA (GMAIL_SMTP's CA does not trust it)."""
    with GmailSandbox(cert_dir=tmp_path / "second-ca") as sandbox:
        sandbox.add_user(SENDER, app_password=APP_PASSWORD)
        yield sandbox


@pytest.fixture(autouse=True)
def _worker_transports():
    """The in-process "worker" keeps its pools in tasks; close them after each test."""
    yield
    tasks._close_pool()


def options_of(sandbox, **extra):
    """A MAILERS entry's OPTIONS (or keyword arguments) pointing at ``sandbox``."""
    return {
        "host": sandbox.host,
        "port": sandbox.port,
        "security": sandbox.security,
        "ca_file": sandbox.ca_file,
        **extra,
    }


def message(subject="hello", sender=SENDER):
    return EmailMessage(subject, "body", sender, ["to@example.net"])


# --- settings resolved once ----------------------------------------------------------------------


def test_options_over_gmail_smtp_over_defaults(settings):
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "TIMEOUT": 7, "MAX_ATTEMPTS": 3}
    resolved = conf.resolve({"timeout": 2})
    assert resolved.timeout == 2  # the option
    assert resolved.max_attempts == 3  # GMAIL_SMTP
    assert resolved.retry_base_delay == 30  # the default
    assert (resolved.port, resolved.security) == (587, "starttls")
    assert (conf.resolve({"security": "ssl"}).port, conf.resolve({"port": 465}).security) == (
        465,
        "ssl",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.timeout = 1
    assert conf.resolve({"timeout": 2}) == resolved
    assert hash(conf.resolve({"timeout": 2})) == hash(resolved)


def test_every_invalid_option_is_reported_at_once(settings):
    with pytest.raises(GmailConfigurationError) as info:
        conf.resolve({"port": "587x", "timeout": "5s"}, alias="second")
    text = str(info.value)
    assert 'MAILERS["second"]["OPTIONS"]["port"]' in text
    assert 'MAILERS["second"]["OPTIONS"]["timeout"]' in text


def test_the_password_is_not_in_the_settings_repr():
    resolved = conf.resolve({"username": "me@example.com", "password": "qrstuvwxyzabcdef"})
    assert resolved.login == ("me@example.com", "qrstuvwxyzabcdef")
    assert "qrstuvwxyzabcdef" not in repr(resolved)


def test_for_mailer_reads_the_entry_and_forgets_it_when_settings_change(settings):
    settings.MAILERS = {
        "second": {"BACKEND": CELERY, "OPTIONS": {"host": "smtp.example.net", "timeout": 3}}
    }
    resolved = conf.for_mailer("second")
    assert (resolved.alias, resolved.host, resolved.timeout) == ("second", "smtp.example.net", 3)
    assert resolved.source == 'MAILERS["second"]["OPTIONS"]'
    assert conf.for_mailer("second") is resolved  # resolved once
    assert conf.for_mailer("") is conf.for_mailer(None)
    assert conf.for_mailer(None).host == settings.GMAIL_SMTP["HOST"]
    settings.MAILERS = {"second": {"BACKEND": CELERY, "OPTIONS": {"host": "smtp2.example.net"}}}
    assert conf.for_mailer("second").host == "smtp2.example.net"


class OwnBackend(CeleryGmailBackend):
    """A site's subclass of our backend: its MAILERS entries are ours too."""


def test_for_mailer_refuses_an_alias_that_is_gone_or_not_ours(settings):
    settings.MAILERS = {
        "smtp": {"BACKEND": "django.core.mail.backends.smtp.EmailBackend"},
        "own": {"BACKEND": f"{__name__}.OwnBackend", "OPTIONS": {"timeout": 4}},
    }
    with pytest.raises(GmailConfigurationError, match=r'no MAILERS\["gone"\] entry'):
        conf.for_mailer("gone")
    with pytest.raises(GmailConfigurationError, match=r'MAILERS\["smtp"\] no longer uses'):
        conf.for_mailer("smtp")
    assert conf.for_mailer("own").timeout == 4


# --- the row records its mailer; the worker resolves the same settings ---------------------------


def test_keyword_arguments_of_a_mailers_entry_reach_the_worker(
    settings, account, sandbox, second, django_capture_on_commit_callbacks
):
    """CeleryGmailBackend(alias=..., **OPTIONS), as Django 6.1 builds a MAILERS entry's backend:
    the worker's delivery goes to the second sandbox, trusting its own CA."""
    settings.MAILERS = {"second": {"BACKEND": CELERY, "OPTIONS": options_of(second)}}
    with django_capture_on_commit_callbacks(execute=False):
        sent = CeleryGmailBackend(alias="second", **options_of(second)).send_messages([message()])
    assert sent == 1
    row = OutboundEmail.objects.get()
    assert tasks.send_outbound_email(row.pk) == Outcome.SENT
    assert len(second.deliveries) == 1 and sandbox.deliveries == []
    assert row.mailer == "second"


@needs_mailers
def test_mail_queued_through_mailers_records_its_alias(
    settings, account, sandbox, second, django_capture_on_commit_callbacks
):
    settings.MAILERS = {
        "default": {"BACKEND": CELERY},
        "second": {"BACKEND": CELERY, "OPTIONS": options_of(second)},
    }
    with django_capture_on_commit_callbacks(execute=False):
        mail.mailers["second"].send_messages([message("second")])
        mail.mailers.default.send_messages([message("default")])
    rows = dict(OutboundEmail.objects.values_list("subject", "mailer"))
    assert rows == {"second": "second", "default": "default"}
    for pk in OutboundEmail.objects.values_list("pk", flat=True):
        assert outbox.deliver(pk, transports=tasks.transport_for) == Outcome.SENT
    assert [d.subject for d in second.deliveries] == ["second"]
    assert [d.subject for d in sandbox.deliveries] == ["default"]


def test_a_backend_without_an_alias_records_none(account, sandbox):
    CeleryGmailBackend().send_messages([message()])
    assert OutboundEmail.objects.get().mailer == ""


def test_a_row_whose_mailer_is_gone_waits_for_the_configuration(settings, account, sandbox):
    """Its MAILERS entry was removed after it was queued: deferred for the configuration (on
    the backoff, no attempt counted), saying which entry is missing."""
    settings.MAILERS = {"old": {"BACKEND": CELERY}}
    CeleryGmailBackend(alias="old").send_messages([message()])
    settings.MAILERS = {}
    row = OutboundEmail.objects.get()
    assert outbox.deliver(row.pk, transports=tasks.transport_for) == Outcome.DEFERRED
    row.refresh_from_db()
    assert (row.reason, row.attempts) == (Reason.CONFIG, 0) and row.next_attempt_at is not None
    assert 'no MAILERS["old"] entry' in row.last_error
    assert sandbox.stats.connections == 0


def test_celery_backend_refuses_options_its_worker_cannot_see(settings, second):
    """Without a MAILERS entry to read them from, keyword arguments would be lost on the way to
    the worker (which would send with GMAIL_SMTP): refused when the backend is built."""
    with pytest.raises(GmailConfigurationError, match=r"given port, ca_file other than in GMAIL"):
        CeleryGmailBackend(port=second.port, ca_file=second.ca_file)
    settings.MAILERS = {"second": {"BACKEND": CELERY, "OPTIONS": options_of(second)}}
    with pytest.raises(GmailConfigurationError, match=r'timeout other than in MAILERS\["second"\]'):
        CeleryGmailBackend(alias="second", **options_of(second, timeout=3))
    with pytest.raises(GmailConfigurationError, match=r'no MAILERS\["nowhere"\] entry'):
        CeleryGmailBackend(alias="nowhere")
    # Options used while queueing may differ; the sync backend takes any option.
    CeleryGmailBackend(priority="bulk", strict_from=True, max_message_size=1000)
    GmailSMTPBackend(port=second.port, ca_file=second.ca_file)


def test_a_mailers_login_reaches_the_worker_never_the_row(settings, sandbox):
    """MAILERS username/password (no GmailAccount): the worker reads them from the alias."""
    sandbox.add_user("login@example.com", app_password="qrstuvwxyzabcdef")
    login = {"username": "login@example.com", "password": "qrst uvwx yzab cdef"}
    settings.MAILERS = {"login": {"BACKEND": CELERY, "OPTIONS": login}}
    CeleryGmailBackend(alias="login", **login).send_messages([message(sender="x@example.org")])
    row = OutboundEmail.objects.get()
    stored = json.dumps(
        {f.attname: str(getattr(row, f.attname)) for f in OutboundEmail._meta.concrete_fields}
    )
    assert "qrst" not in stored and "qrst" not in bytes(row.mime).decode()
    assert tasks.send_outbound_email(row.pk) == Outcome.SENT
    assert sandbox.deliveries[0].user == "login@example.com"


def test_a_worker_keeps_one_transport_per_settings(settings):
    settings.MAILERS = {
        "a": {"BACKEND": CELERY, "OPTIONS": {"timeout": 3}},
        "b": {"BACKEND": CELERY, "OPTIONS": {"timeout": 3}},
        "c": {"BACKEND": CELERY, "OPTIONS": {"timeout": 4}},
    }
    first = tasks.transport_for(conf.for_mailer("a"))
    assert tasks.transport_for(conf.for_mailer("b")) is first  # the same options
    other = tasks.transport_for(conf.for_mailer("c"))
    assert other is not first and other.settings.timeout == 4
    assert tasks.pool() is tasks.transport_for(conf.for_mailer(None))
    assert tasks.pool() is not first


@on_postgresql
@pytest.mark.django_db(transaction=True, databases=["default", "ledger"])
def test_quota_database_option_is_used_by_the_worker_path(settings, account, sandbox):
    """The reservation is made on the mailer's ledger alias: it survives a rollback of the
    default connection's transaction (on the default alias it would be rolled back)."""
    settings.MAILERS = {"ledgered": {"BACKEND": CELERY, "OPTIONS": {"quota_database": "ledger"}}}
    CeleryGmailBackend(alias="ledgered", quota_database="ledger").send_messages([message()])
    row = OutboundEmail.objects.get()
    with pytest.raises(RuntimeError), transaction.atomic():
        assert outbox.deliver(row.pk, transports=tasks.transport_for) == Outcome.SENT
        raise RuntimeError("roll back the default connection's work")
    assert len(sandbox.deliveries) == 1
    assert quota_status(account, conf.for_mailer("ledgered")).messages_used == 1


# --- one pipeline ---------------------------------------------------------------------------------


def test_both_backends_and_the_task_go_through_one_pipeline(
    account, sandbox, monkeypatch, django_capture_on_commit_callbacks
):
    calls = []
    route, attempt, attempt_many = Pipeline.route, Pipeline.attempt, Pipeline.attempt_many

    def spy_route(self, router, msg, default, *, action):
        calls.append(("route", action))
        return route(self, router, msg, default, action=action)

    def spy_attempt(self, envelope, priority):
        calls.append(("attempt", self.settings.alias))
        return attempt(self, envelope, priority)

    def spy_attempt_many(self, account, items, **kwargs):  # streamed (one message here)
        calls.append(("attempt", self.settings.alias))
        return attempt_many(self, account, items, **kwargs)

    def on_sent(sender, outbound, **kwargs):
        calls.append(("email_sent", sender.__name__, outbound is not None))

    monkeypatch.setattr(Pipeline, "route", spy_route)
    monkeypatch.setattr(Pipeline, "attempt", spy_attempt)
    monkeypatch.setattr(Pipeline, "attempt_many", spy_attempt_many)
    signals.email_sent.connect(on_sent, weak=False)
    try:
        assert GmailSMTPBackend().send_messages([message("sync")]) == 1
        with django_capture_on_commit_callbacks(execute=False):
            assert CeleryGmailBackend().send_messages([message("celery")]) == 1
        row = OutboundEmail.objects.get()
        assert tasks.send_outbound_email(row.pk) == Outcome.SENT
    finally:
        signals.email_sent.disconnect(on_sent)
    assert calls == [
        ("route", "sent"),
        ("attempt", ""),
        ("email_sent", "GmailSMTPBackend", False),
        ("route", "queued"),
        ("attempt", ""),
        ("email_sent", "CeleryGmailBackend", True),
    ]
    assert [d.subject for d in sandbox.deliveries] == ["sync", "celery"]


# --- with a real worker ---------------------------------------------------------------------------


@pytest.fixture
def start_worker(settings, sandbox, queues, tmp_path):
    """Start a Celery worker that has the test's GMAIL_SMTP and MAILERS (set them first):
    ``tests.settings_mailers``, where the shared ``start_worker`` has ``tests.settings``."""
    with_keys(settings, **WORKER, QUEUES=queues)
    workers = []

    def start(**env: str) -> CeleryWorker:
        env = {
            "DJANGO_SETTINGS_MODULE": "tests.settings_mailers",
            "GMAIL_SMTP_TEST_MAILERS": json.dumps(getattr(settings, "MAILERS", {})),
            **env,
        }
        name = f"m{len(workers) + 1}"
        worker = CeleryWorker(
            queues=",".join(queues.values()), name=name, log_path=tmp_path / f"{name}.log", env=env
        )
        workers.append(worker)
        return worker.wait_ready()

    yield start
    for worker in workers:
        worker.stop()


@pytest.mark.integration
@needs_mailers
@pytest.mark.django_db(transaction=True)
def test_worker_delivers_through_a_mailers_entry_to_its_server(
    settings, account, sandbox, second, start_worker
):
    settings.MAILERS = {
        "default": {"BACKEND": CELERY},
        "second": {"BACKEND": CELERY, "OPTIONS": options_of(second)},
    }
    start_worker()
    assert mail.mailers["second"].send_messages([message("via MAILERS")]) == 1
    wait_for(all_sent(1), 60, outbox_state)
    assert [d.subject for d in second.deliveries] == ["via MAILERS"]
    assert sandbox.deliveries == []
    assert OutboundEmail.objects.get().mailer == "second"


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_worker_delivers_through_keyword_arguments_to_their_server(
    settings, account, sandbox, second, start_worker
):
    """The backend built by hand with the entry's alias and options (as Django 6.1 builds it)."""
    settings.MAILERS = {"second": {"BACKEND": CELERY, "OPTIONS": options_of(second)}}
    start_worker()
    backend = CeleryGmailBackend(alias="second", **options_of(second))
    assert backend.send_messages([message("via keyword arguments")]) == 1
    wait_for(all_sent(1), 60, outbox_state)
    assert [d.subject for d in second.deliveries] == ["via keyword arguments"]
    assert sandbox.deliveries == []


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_worker_times_out_by_the_mailers_timeout(settings, account, second, start_worker):
    """The server greets after 3 s: GMAIL_SMTP's TIMEOUT (10 s) would wait for it, the mailer's
    (1 s) does not, so the first attempt times out and is retried."""
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, **second.settings(), "TIMEOUT": 10}
    settings.MAILERS = {"slow": {"BACKEND": CELERY, "OPTIONS": options_of(second, timeout=1)}}
    second.fault("connect", delay=3, times=1)
    start_worker()
    CeleryGmailBackend(alias="slow", **options_of(second, timeout=1)).send_messages([message()])
    wait_for(all_sent(1), 60, outbox_state)
    row = OutboundEmail.objects.get()
    assert [a.outcome for a in row.log.all()] == ["retry", "sent"]
    assert "did not answer within 1 s" in row.log.first().reply
    assert len(second.deliveries) == 1


@pytest.fixture
def ledger_schema(db):
    """A schema with its own quota tables, which the worker's ``ledger`` alias writes to."""
    schema = f"ledger_{uuid.uuid4().hex[:8]}"
    tables = [m._meta.db_table for m in (SenderQuota,)] + [
        "django_gmail_smtp_quotabucket",
        "django_gmail_smtp_quotaday",
    ]
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA {schema}")
        for table in tables:
            cursor.execute(f"CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)")
    yield schema
    with connection.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.integration
@on_postgresql
@pytest.mark.django_db(transaction=True, databases=["default", "ledger"])
def test_worker_reserves_quota_in_the_mailers_quota_database(
    settings, account, sandbox, start_worker, ledger_schema
):
    settings.MAILERS = {"ledgered": {"BACKEND": CELERY, "OPTIONS": {"quota_database": "ledger"}}}
    start_worker(GMAIL_SMTP_TEST_LEDGER_SCHEMA=ledger_schema)
    CeleryGmailBackend(alias="ledgered", quota_database="ledger").send_messages([message()])
    wait_for(all_sent(1), 60, outbox_state)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT address FROM {ledger_schema}.django_gmail_smtp_senderquota")
        assert [r[0] for r in cursor.fetchall()] == [SENDER]
        cursor.execute(f"SELECT sum(messages) FROM {ledger_schema}.django_gmail_smtp_quotabucket")
        assert cursor.fetchone()[0] == 1
    assert not SenderQuota.objects.exists()  # nothing in the default alias's tables
