"""Newsletters at scale: enrolment time and memory, planner tick cost, against today's ways.

Part 1, enrolment: ``Campaign.start()`` of a list of 100,000 active subscribers (1% of them
on the suppression list, enrolled as suppressed), and of a queryset audience of 100,000 users
(``User.objects.filter(is_active=True)``), each in a fresh child process: seconds, the
process's RSS just before the call and its peak during the call (Linux: VmHWM after resetting
it through ``/proc/self/clear_refs``, so the set-up's peak does not count; elsewhere
``resource.getrusage``'s ``ru_maxrss``), and the growth between the two. Targets: at
most 60 s and at most 200 MB peak RSS, on SQLite and on PostgreSQL.

Part 2, planner tick cost: the same ``planner.tick()`` on a running campaign of 1,000
recipients (A) and one of 1,000,000 (B), each half sent already (the steady state of a
campaign in progress). B's rows are written directly (batched INSERT on SQLite, COPY on
PostgreSQL), not through ``start()``, to keep the set-up short. The quota clock is held
(``quota.set_clock``) and, before each tick, the campaign's last-planned time is set one
``NEWSLETTER_TICK`` back with no credit, so every tick queues the same slice (``--slice``,
default 3 messages: 4,321 a day, what a few Workspace accounts send and the domain guard lets
an unaligned domain send); after each tick its messages are marked sent and recorded as a
worker's receivers would (not timed). Only the campaign being timed is running; A and B
alternate, so drift hits both alike. Prints the median and p90 milliseconds per tick, the
queries per tick (``CaptureQueriesContext``, on separate ticks, which also time each
statement to show where B's time goes next to A's), and B/A (target: at most 1.2). A's ticks
of 10x the slice give a tick's fixed cost and its cost per message queued. ``progress()`` is
timed too, for information (no target).

Part 3, baselines in the same run, each in a fresh child process: what a site does today to
mail the same list, rendering subject, text and HTML per recipient with Django templates:

- a ``send_mail()`` loop through ``CeleryGmailBackend`` (one outbox row and one Celery
  publish per message); 5,000 messages by default (``--send-mail``), extrapolated linearly
  to 100,000 (the table says so);
- django-post_office's ``send_many()`` with an ``EmailTemplate`` and a context per
  recipient (it renders each message and inserts them all with one ``bulk_create``): the
  whole list in one call.

The table gives, per case: seconds, milliseconds per message, peak RSS (and its growth), time
per message against each baseline (lower is better) and the target. A campaign does its
per-message work in two steps, enrolment at start and rendering + outbox row at each tick, so
the summary also adds enrolment's and a tick's per-message cost up against the baselines'.
The figures are also written as JSON to ``benchmarks/results/`` (ignored by git).

Runs on a throw-away test database (and broker folder), destroyed at the end:

    .venv/bin/python benchmarks/newsletters.py                      # SQLite (temporary file)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \\
        .venv/bin/python benchmarks/newsletters.py                  # PostgreSQL
    .venv/bin/python benchmarks/newsletters.py --quick              # a small smoke run

Needs django-post_office (the ``bench`` extra: ``pip install -e '.[bench]'``); without it, that
baseline is skipped. ``--profile`` prints cProfile's top functions of each measured call (to
stderr) and of a tick of B.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

RESULTS = Path(__file__).resolve().parent / "results"
NEWS = "news@bench.example.com"
SUBJECT = "{{ campaign_name }}: news for {{ subscriber.name|default:'you' }}"
TEXT = (
    "Hello {{ subscriber.name|default:'there' }},\n\n"
    + "This month's news, about a kilobyte of text like a typical newsletter. " * 12
    + "\n\nUnsubscribe: {{ unsubscribe_url }}\n"
)
HTML = (
    "<html><body><p>Hello {{ subscriber.name|default:'there' }},</p>"
    + "<p>This month's news, about a kilobyte of text like a typical newsletter.</p>" * 12
    + '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>'
)
CELERY = "django_gmail_smtp.backends.CeleryGmailBackend"
ENROL_SECONDS = 60.0
ENROL_MB = 200.0
TICK_RATIO = 1.2
CHILD_MARK = "BENCH-CHILD-RESULT "


def log(text: str = "") -> None:
    print(text, flush=True)


# --- memory --------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """The process's peak RSS: since :func:`reset_peak_rss` where Linux allows it (VmHWM),
    else since the process started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def lifetime_peak_rss_mb() -> float:
    """The process's peak RSS since it started (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux 4.0+: clear_refs 5), so the next peak is
    that of the call that follows, not of the process's set-up."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    """The process's RSS now (/proc on Linux; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        return peak_rss_mb()


# --- Django --------------------------------------------------------------------------------------


def setup_django() -> None:
    """The test settings, plus post_office when it is installed (its tables and models)."""
    import importlib.util

    import django
    from django.conf import settings

    if importlib.util.find_spec("post_office") and "post_office" not in settings.INSTALLED_APPS:
        settings.INSTALLED_APPS = [*settings.INSTALLED_APPS, "post_office"]
    django.setup()
    import tests.celery_app  # noqa: F401  (the Celery app the outbox publishes through)


def has_post_office() -> bool:
    from django.apps import apps

    return apps.is_installed("post_office")


# --- set-up --------------------------------------------------------------------------------------


def subscriber_email(i: int) -> str:
    return f"reader{i:07d}@bench-readers.example.net"


def bulk_rows(model: Any, columns: list[str], rows: Iterable[tuple], label: str) -> int:
    """Insert rows fast: COPY on PostgreSQL, batched executemany elsewhere."""
    from django.db import connection, transaction

    table = connection.ops.quote_name(model._meta.db_table)
    names = ", ".join(
        connection.ops.quote_name(model._meta.get_field(name).column) for name in columns
    )
    started = time.perf_counter()
    done = 0
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    done += 1
        else:
            adapt = connection.ops.adapt_datetimefield_value
            marks = ", ".join(["%s"] * len(columns))
            sql = f"INSERT INTO {table} ({names}) VALUES ({marks})"
            batch: list[tuple] = []
            for row in rows:
                batch.append(tuple(adapt(v) if isinstance(v, datetime) else v for v in row))
                done += 1
                if len(batch) >= 20_000:
                    cursor.executemany(sql, batch)
                    batch.clear()
            if batch:
                cursor.executemany(sql, batch)
    log(f"    {label}: {done:,} rows in {time.perf_counter() - started:.1f} s")
    return done


def insert_subscribers(mailing_list: Any, n: int, *, fields: dict[str, str]) -> int:
    """``n`` active subscribers of ``mailing_list`` (imported from a CSV), inserted fast."""
    from django_gmail_smtp.newsletters.models import Subscriber

    now = datetime.now(UTC)
    merge = json.dumps(fields)
    return bulk_rows(
        Subscriber,
        [
            "mailing_list",
            "email",
            "name",
            "fields",
            "status",
            "consent_at",
            "consent_method",
            "consent_source",
            "created_at",
            "updated_at",
        ],
        (
            (
                mailing_list.pk,
                subscriber_email(i),
                f"Reader {i}",
                merge,
                Subscriber.Status.ACTIVE,
                now,
                Subscriber.Consent.IMPORT,
                "bench.csv",
                now,
                now,
            )
            for i in range(n)
        ),
        "subscribers",
    )


def analyze(*models: Any) -> None:
    """Refresh planner statistics, as PostgreSQL's autovacuum would after a bulk load."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for model in models:
                cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")


@dataclass
class World:
    account_id: int
    list_id: int
    subscriber_ids: list[int]


def build_world(args: argparse.Namespace) -> World:
    from django.contrib.auth.models import User

    from django_gmail_smtp.models import GmailAccount
    from django_gmail_smtp.newsletters.models import MailingList, Subscriber, Suppression

    account = GmailAccount.objects.create(
        email=NEWS,
        app_password="abcdefghijklmnop",
        limits_preset="gmail",
        daily_limit=100_000_000,  # the pace comes from the campaigns' max_per_day
        is_default=True,
    )
    mailing_list = MailingList.objects.create(name="Bench", slug="bench", from_email=NEWS)
    now = datetime.now(UTC)
    n = args.subscribers
    log(f"Set-up: {n:,} active subscribers, {n // 100:,} suppressed addresses, {n:,} users")
    insert_subscribers(mailing_list, n, fields={"city": "Lyon"})
    bulk_rows(
        Suppression,
        ["email", "reason", "detail", "created_at"],
        ((subscriber_email(i), Suppression.Reason.UNSUBSCRIBED, "", now) for i in range(0, n, 100)),
        "suppressions",
    )
    bulk_rows(
        User,
        [
            "username",
            "email",
            "first_name",
            "last_name",
            "password",
            "is_active",
            "is_staff",
            "is_superuser",
            "date_joined",
        ],
        (
            (
                f"user{i:07d}",
                f"User{i:07d}@Bench-Users.example.org",  # normalized at enrolment
                "User",
                f"Number {i}",
                "!",
                True,
                False,
                False,
                now,
            )
            for i in range(n)
        ),
        "users",
    )
    analyze(Subscriber, Suppression, User)
    ids = list(
        Subscriber.objects.filter(mailing_list=mailing_list)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    return World(account.pk, mailing_list.pk, ids)


def make_campaign(world: World, name: str, **fields: Any):
    from django_gmail_smtp.newsletters.models import Campaign

    return Campaign.objects.create(
        name=name,
        from_email=NEWS,
        subject=SUBJECT.replace("{{ campaign_name }}", "{{ campaign.name }}"),
        text_template=TEXT,
        html_template=HTML,
        **fields,
    )


# --- child processes: one measured call each ----------------------------------------------------


def run_child(kind: str, args: argparse.Namespace, **params: Any) -> dict[str, Any]:
    """Run ``kind`` in a fresh process on the test database; return its figures."""
    from django.db import connection

    env = dict(os.environ)
    env["GMAIL_SMTP_TEST_DB"] = json.dumps(connection.settings_dict, default=str)
    command = [sys.executable, __file__, "--child", kind, "--params", json.dumps(params)]
    if args.profile:
        command.append("--profile")
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    result = None
    for line in done.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            result = json.loads(line[len(CHILD_MARK) :])
        else:
            log(f"    | {line}")
    if done.returncode or result is None:
        raise RuntimeError(f"the {kind} child process failed (exit code {done.returncode})")
    return result


def child_main(kind: str, params: dict[str, Any], profile: bool) -> int:
    setup_django()
    from django.db import connection

    connection.ensure_connection()
    body = {"enrol": child_enrol, "send_mail": child_send_mail, "send_many": child_send_many}[kind]
    prepared = body(params)  # returns the measured call, after its set-up
    import gc

    gc.collect()
    peak_before = lifetime_peak_rss_mb()  # the set-up's (imports, Django, the query)
    reset = reset_peak_rss()
    before = current_rss_mb()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    figures = prepared()
    seconds = time.perf_counter() - started
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        print(f"cProfile of {kind} {params}:\n" + out.getvalue(), file=sys.stderr)
    figures.update(
        seconds=seconds,
        rss_before_mb=before,
        peak_before_mb=peak_before,
        peak_mb=peak_rss_mb() if reset else lifetime_peak_rss_mb(),
        peak_is_the_calls=reset,
        lifetime_peak_mb=lifetime_peak_rss_mb(),
    )
    print(CHILD_MARK + json.dumps(figures), flush=True)
    return 0


def child_enrol(params: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    from django.contrib.auth.models import User

    from django_gmail_smtp.newsletters.models import Campaign

    campaign = Campaign.objects.get(pk=params["campaign"])
    audience = User.objects.filter(is_active=True) if params["audience"] == "users" else None

    def call() -> dict[str, Any]:
        return {"enrolled": campaign.start(audience)}

    return call


def _templates():
    from django.template import engines

    engine = engines["django"]
    return (
        engine.from_string(SUBJECT.replace("{{ campaign_name }}", "Bench")),
        engine.from_string(TEXT),
        engine.from_string(HTML),
    )


def child_send_mail(params: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """A site's loop today: render each message, send_mail() it through CeleryGmailBackend."""
    from django.conf import settings
    from django.core.mail import send_mail

    from django_gmail_smtp.newsletters.models import Subscriber

    settings.EMAIL_BACKEND = CELERY
    subject, text, html = _templates()
    count = params["count"]

    def call() -> dict[str, Any]:
        rows = (
            Subscriber.objects.filter(status=Subscriber.Status.ACTIVE)
            .order_by("pk")
            .values_list("email", "name")[:count]
        )
        sent = 0
        for email, name in rows.iterator(chunk_size=1000):
            context = {
                "subscriber": {"email": email, "name": name},
                "unsubscribe_url": f"https://bench.example.com/unsubscribe/{email}",
            }
            sent += send_mail(
                " ".join(subject.render(context).split()),
                text.render(context),
                NEWS,
                [email],
                html_message=html.render(context),
            )
        return {"messages": sent}

    return call


def child_send_many(params: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """django-post_office's send_many(): an EmailTemplate and a context per recipient."""
    from post_office import mail
    from post_office.models import EmailTemplate

    from django_gmail_smtp.newsletters.models import Subscriber

    template = EmailTemplate.objects.create(
        name=f"bench-{uuid.uuid4().hex[:8]}",
        subject=SUBJECT.replace("{{ campaign_name }}", "Bench"),
        content=TEXT,
        html_content=HTML,
    )
    count = params["count"]

    def call() -> dict[str, Any]:
        rows = (
            Subscriber.objects.filter(status=Subscriber.Status.ACTIVE)
            .order_by("pk")
            .values_list("email", "name")[:count]
        )
        kwargs_list = [
            {
                "sender": NEWS,
                "recipients": [email],
                "template": template,
                "context": {
                    "subscriber": {"email": email, "name": name},
                    "unsubscribe_url": f"https://bench.example.com/unsubscribe/{email}",
                },
            }
            for email, name in rows.iterator(chunk_size=1000)
        ]
        return {"messages": len(mail.send_many(kwargs_list))}

    return call


# --- part 2: the planner tick ---------------------------------------------------------------------


@dataclass
class TickCase:
    name: str
    size: int
    campaign_id: int
    samples: list[float] = field(default_factory=list)  # seconds per tick
    queued: list[int] = field(default_factory=list)
    queries: float = 0.0
    statements: list[str] = field(default_factory=list)
    #: the captured tick's statements with their seconds
    timed: list[tuple[float, str]] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)


def recipient_rows(
    campaign_id: int, size: int, world: World, sent_at: datetime
) -> Iterator[tuple[Any, ...]]:
    """``size`` recipients, the first half sent; the first pending ones (up to the list's
    size) are subscribers of the list, the others addresses of an audience."""
    half = size // 2
    linked = min(size - half, len(world.subscriber_ids))
    for i in range(size):
        k = i - half
        if 0 <= k < linked:
            subscriber, email = world.subscriber_ids[k], subscriber_email(k)
        else:
            subscriber, email = None, f"member{i:07d}@bench-audience.example.org"
        if i < half:
            yield (
                campaign_id,
                subscriber,
                email,
                f"Member {i}",
                "{}",
                "sent",
                NEWS,
                "",
                sent_at,
                sent_at,
            )
        else:
            yield (
                campaign_id,
                subscriber,
                email,
                f"Member {i}",
                "{}",
                "pending",
                "",
                "",
                None,
                None,
            )


def make_tick_case(name: str, size: int, world: World, args: argparse.Namespace) -> TickCase:
    from django_gmail_smtp.newsletters import planner
    from django_gmail_smtp.newsletters.models import Campaign, CampaignRecipient

    tick_seconds = tick_length()
    # Exactly --slice messages per tick's worth of pace (+1 a day against rounding down).
    per_day = int(args.slice * 86400 / tick_seconds) + 1
    campaign = make_campaign(
        world,
        f"Tick {name}",
        mailing_list_id=world.list_id,
        max_per_day=per_day,
        status=Campaign.Status.DRAFT,
        # The domain guard caps an unaligned From domain at 5,000 a day: a faster pace needs
        # (and a site sending that much has) SPF, DKIM and DMARC aligned.
        domain_aligned=per_day > planner.DOMAIN_LIMIT,
    )
    bulk_rows(
        CampaignRecipient,
        [
            "campaign",
            "subscriber",
            "email",
            "name",
            "fields",
            "status",
            "account_email",
            "error",
            "queued_at",
            "sent_at",
        ],
        recipient_rows(campaign.pk, size, world, datetime.now(UTC) - timedelta(hours=6)),
        f"campaign {name}: recipients",
    )
    return TickCase(name, size, campaign.pk)


def tick_length() -> float:
    from django_gmail_smtp.conf import get_setting

    return float(get_setting("NEWSLETTER_TICK"))


def only_running(case: TickCase, cases: list[TickCase], moment: datetime) -> None:
    """Make ``case`` the only running campaign, last planned one tick ago, with no credit."""
    from django_gmail_smtp.newsletters.models import Campaign

    others = [c.campaign_id for c in cases if c is not case]
    Campaign.objects.filter(pk__in=others).update(status=Campaign.Status.DRAFT)
    Campaign.objects.filter(pk=case.campaign_id).update(
        status=Campaign.Status.RUNNING,
        started_at=moment - timedelta(days=1),
        planned_at=moment - timedelta(seconds=tick_length()),
        plan_credit=0.0,
    )


def settle(case: TickCase) -> int:
    """What a worker does with the slice (not timed): each message is sent, and recorded on its
    recipient as the outbox's signal receivers do."""
    from django.utils import timezone

    from django_gmail_smtp.enums import Status
    from django_gmail_smtp.models import OutboundEmail
    from django_gmail_smtp.newsletters import campaigns
    from django_gmail_smtp.newsletters.models import CampaignRecipient

    ids = list(
        CampaignRecipient.objects.filter(
            campaign_id=case.campaign_id, status=CampaignRecipient.Status.QUEUED
        ).values_list("outbound_id", flat=True)
    )
    rows = OutboundEmail.objects.filter(pk__in=[i for i in ids if i])
    rows.update(status=Status.SENT, sent_at=timezone.now(), gmail_reply="250 2.0.0 OK bench")
    for row in rows:
        campaigns.record_outbound(row)
    return len(ids)


class StatementTimer:
    """An execute wrapper that records each statement's SQL and seconds."""

    def __init__(self) -> None:
        self.statements: list[tuple[float, str]] = []

    def __call__(self, execute: Callable, sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.statements.append((time.perf_counter() - started, sql))


def time_ticks(cases: list[TickCase], args: argparse.Namespace, moment: datetime) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django_gmail_smtp import quota
    from django_gmail_smtp.newsletters import planner

    quota.set_clock(lambda: moment)

    def one(case: TickCase) -> tuple[float, int]:
        only_running(case, cases, moment)
        started = time.perf_counter()
        counts = planner.tick(moment)
        elapsed = time.perf_counter() - started
        settle(case)
        return elapsed, counts.get("queued", 0)

    for case in cases:  # warm-up: caches, the first connection to the broker
        for _ in range(2):
            one(case)
    for round_no in range(args.ticks):
        order = cases if round_no % 2 == 0 else cases[::-1]
        for case in order:
            elapsed, queued = one(case)
            case.samples.append(elapsed)
            case.queued.append(queued)
    # Queries per tick (CaptureQueriesContext), and where the time goes: separate ticks with
    # every statement timed by an execute wrapper (Django's own query log rounds to 1 ms).
    captured: dict[str, list[list[tuple[float, str]]]] = {case.name: [] for case in cases}
    counted: dict[str, list[int]] = {case.name: [] for case in cases}
    for _ in range(max(3, args.ticks // 3)):
        for case in cases:
            only_running(case, cases, moment)
            timer = StatementTimer()
            with CaptureQueriesContext(connection) as ctx, connection.execute_wrapper(timer):
                planner.tick(moment)
            settle(case)
            captured[case.name].append(timer.statements)
            counted[case.name].append(len(ctx.captured_queries))
    for case in cases:
        runs = captured[case.name]
        case.queries = statistics.median(counted[case.name])
        case.statements = [" ".join(sql.split())[:140] for _, sql in runs[-1]]
        # Per distinct statement (its SQL with placeholders): seconds per tick, median of runs.
        per_run: list[dict[str, float]] = []
        for run in runs:
            totals: dict[str, float] = {}
            for seconds, sql in run:
                key = " ".join(sql.split())
                totals[key] = totals.get(key, 0.0) + seconds
            per_run.append(totals)
        keys = {key for totals in per_run for key in totals}
        case.timed = sorted(
            ((statistics.median(t.get(key, 0.0) for t in per_run), key) for key in keys),
            reverse=True,
        )
    if args.profile:
        import cProfile
        import io
        import pstats

        big = cases[-1]
        only_running(big, cases, moment)
        profiler = cProfile.Profile()
        profiler.enable()
        planner.tick(moment)
        profiler.disable()
        settle(big)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        log(f"cProfile of one tick of {big.name}:\n{out.getvalue()}")


def time_marginal(case: TickCase, args: argparse.Namespace, moment: datetime) -> dict[str, float]:
    """A tick's cost per message: ticks of ``case`` queueing 10x the slice (its pace raised,
    the domain marked aligned), against its ticks at the slice."""
    from django_gmail_smtp.newsletters import planner
    from django_gmail_smtp.newsletters.models import Campaign

    bigger = args.slice * 10
    before = Campaign.objects.filter(pk=case.campaign_id).values("max_per_day", "domain_aligned")
    saved = dict(before.get())
    Campaign.objects.filter(pk=case.campaign_id).update(
        max_per_day=int(bigger * 86400 / tick_length()) + 1, domain_aligned=True
    )
    samples, queued = [], []
    try:
        for i in range(9):
            only_running(case, [case], moment)
            started = time.perf_counter()
            counts = planner.tick(moment)
            elapsed = time.perf_counter() - started
            settle(case)
            if i >= 2:  # after two warm-up ticks
                samples.append(elapsed)
                queued.append(counts.get("queued", 0))
    finally:
        Campaign.objects.filter(pk=case.campaign_id).update(**saved)
    slice_s = median(case.samples)
    bigger_s = median(samples)
    n = statistics.median(queued)
    per_message = (bigger_s - slice_s) / max(1, n - args.slice)
    return {
        "slice": args.slice,
        "slice_median_s": slice_s,
        "bigger_slice": n,
        "bigger_median_s": bigger_s,
        "per_message_s": per_message,
        "fixed_s": slice_s - args.slice * per_message,
    }


def time_progress(cases: list[TickCase], rounds: int = 5) -> None:
    from django_gmail_smtp.newsletters.models import Campaign

    for case in cases:
        campaign = Campaign.objects.get(pk=case.campaign_id)
        campaign.progress()  # warm-up
        for _ in range(rounds):
            started = time.perf_counter()
            campaign.progress()
            case.progress.append(time.perf_counter() - started)


# --- the report ----------------------------------------------------------------------------------


def big_median_ms(results: dict[str, Any]) -> float:
    return results["ticks"][-1]["median_s"] * 1000


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def p90(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))] if ordered else 0.0


def ratio_text(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.3f}"


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    n = args.subscribers
    base_mail = results.get("send_mail")
    base_many = results.get("send_many")
    mail_per = base_mail["seconds"] / base_mail["messages"] if base_mail else None
    many_per = base_many["seconds"] / base_many["messages"] if base_many else None
    rows: list[tuple[str, ...]] = []

    def mb(figures: dict[str, Any]) -> str:
        growth = figures["peak_mb"] - figures["rss_before_mb"]
        return f"{figures['peak_mb']:.0f} (+{growth:.0f})"

    for key, label in (("enrol_list", "start(): list"), ("enrol_users", "start(): queryset")):
        figures = results.get(key)
        if not figures:
            continue
        per = figures["seconds"] / max(1, figures["enrolled"])
        met = figures["seconds"] <= ENROL_SECONDS and figures["peak_mb"] <= ENROL_MB
        rows.append(
            (
                f"{label} {figures['enrolled']:,}",
                f"{figures['seconds']:.1f}",
                f"{per * 1000:.3f}",
                mb(figures),
                ratio_text(per, mail_per),
                ratio_text(per, many_per),
                f"<= {ENROL_SECONDS:.0f} s, <= {ENROL_MB:.0f} MB",
                "met" if met else "NOT met",
            )
        )
    ticks = results.get("ticks", [])
    small = ticks[0] if ticks else None
    for case in ticks:
        med = case["median_s"]
        per = med / max(1, case["slice"])
        ratio = med / small["median_s"] if small else 1.0
        is_big = case is not small
        rows.append(
            (
                f"tick, campaign {case['name']} {case['size']:,}",
                f"{med:.4f}",
                f"{per * 1000:.3f}",
                "-",
                ratio_text(per, mail_per),
                ratio_text(per, many_per),
                f"{case['name']}/{small['name']} <= {TICK_RATIO}" if is_big else "(baseline A)",
                ("met" if ratio <= TICK_RATIO else "NOT met") + f" ({ratio:.2f})"
                if is_big
                else "-",
            )
        )
    for figures, label in ((base_mail, "send_mail loop"), (base_many, "post_office send_many")):
        if not figures:
            continue
        measured = figures["messages"]
        per = figures["seconds"] / measured
        if measured < n:
            label += f" {measured:,} -> {n:,} (extrapolated)"
            seconds = f"{per * n:.1f}"
        else:
            label += f" {measured:,}"
            seconds = f"{figures['seconds']:.1f}"
        rows.append(
            (
                label,
                seconds,
                f"{per * 1000:.3f}",
                mb(figures),
                ratio_text(per, mail_per),
                ratio_text(per, many_per),
                "(baseline)",
                "-",
            )
        )
    header = (
        "case",
        "seconds",
        "ms/msg",
        "peak RSS MB (+growth)",
        "vs send_mail/msg",
        "vs send_many/msg",
        "target",
        "result",
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    log(line(header))
    log("-" * len(line(header)))
    for r in rows:
        log(line(r))
    log(
        "(tick rows: seconds = median per tick, ms/msg = per message of its slice; RSS = peak of"
        " the call in a fresh process, growth = peak minus RSS just before the call;"
        " vs = time per message relative to the baseline, lower is better)"
    )
    marginal = results.get("tick_marginal")
    enrol = results.get("enrol_list")
    if marginal and enrol:
        per = marginal["per_message_s"]
        enrol_per = enrol["seconds"] / max(1, enrol["enrolled"])
        total = enrol_per + per
        versus = [
            f"{total / b:.2f}x {name}'s"
            for b, name in ((mail_per, "the send_mail loop"), (many_per, "send_many"))
            if b
        ]
        log(
            f"A tick costs {marginal['fixed_s'] * 1000:.1f} ms plus {per * 1000:.2f} ms per message"
            f" it queues (from A's ticks of {marginal['slice']} and of "
            f"{marginal['bigger_slice']:.0f} messages: {marginal['slice_median_s'] * 1000:.1f}"
            f" and {marginal['bigger_median_s'] * 1000:.1f} ms)."
        )
        log(
            f"A campaign's work per message: enrolment {enrol_per * 1000:.3f} ms + its tick's "
            f"{per * 1000:.2f} ms = {total * 1000:.2f} ms, "
            + ", ".join(versus)
            + "; plus the tick's fixed cost, once a NEWSLETTER_TICK per running campaign."
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Targets: enrolment of 100,000 <= 60 s and <= 200 MB peak RSS; tick B/A <= 1.2.",
    )
    parser.add_argument("--subscribers", type=int, default=100_000, help="list and user count")
    parser.add_argument("--small", type=int, default=1_000, help="recipients of campaign A")
    parser.add_argument("--big", type=int, default=1_000_000, help="recipients of campaign B")
    parser.add_argument(
        "--slice",
        type=int,
        default=3,
        help="messages queued per tick (default 3: 4,321 a day, what a few accounts send and "
        "the domain guard allows an unaligned domain; above 3 the campaigns are marked aligned)",
    )
    parser.add_argument("--ticks", type=int, default=25, help="timed ticks per campaign")
    parser.add_argument("--send-mail", type=int, default=5_000, help="send_mail() loop size")
    parser.add_argument(
        "--send-many", type=int, default=None, help="send_many() size (default: --subscribers)"
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (under a minute)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, json.loads(args.params), args.profile)
    if args.quick:
        args.subscribers, args.big, args.ticks, args.send_mail = 5_000, 20_000, 5, 500
    args.send_many = args.send_many or args.subscribers
    # A plain `kill` unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tmp = Path(tempfile.mkdtemp(prefix="gmail_smtp_bench_newsletters_"))
    tag = uuid.uuid4().hex[:8]
    # Read by tests/settings.py here and in the child processes, which inherit the environment:
    # this run's own broker folder and queues (nothing consumes them; they are removed).
    os.environ["CELERY_FS_DIR"] = str(tmp / "broker")
    extra = json.loads(os.environ.get("GMAIL_SMTP_TEST_SETTINGS") or "{}")
    queues = {"transactional": f"bench.{tag}.t", "bulk": f"bench.{tag}.b"}
    os.environ["GMAIL_SMTP_TEST_SETTINGS"] = json.dumps({**extra, "QUEUES": queues})
    try:
        return with_database(args, tmp, queues)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_database(args: argparse.Namespace, tmp: Path, queues: dict[str, str]) -> int:
    setup_django()
    from benchmarks.testdb import test_database
    from django_gmail_smtp import quota

    with test_database(tmp / "newsletters.sqlite3", "newsletters", log=log):
        try:
            run(args)
        finally:
            quota.set_clock(None)
            remove_queues(list(queues.values()))
    return 0


def remove_queues(names: list[str]) -> None:
    """Drop this run's queues from the broker (Redis; a broker folder goes with its folder)."""
    import contextlib

    from tests.celery_app import app

    with contextlib.suppress(Exception), app.connection_for_write() as broker:
        if broker.transport.driver_type != "redis":
            return
        channel = broker.default_channel
        for name in names:
            with contextlib.suppress(Exception):
                channel.queue_purge(name)
                channel.client.delete(f"_kombu.binding.{name}")


def run(args: argparse.Namespace) -> None:
    from django.conf import settings
    from django.db.models import Count

    from benchmarks.testdb import database_label
    from django_gmail_smtp.newsletters.models import Campaign, CampaignRecipient

    db = database_label()
    load_start = os.getloadavg()
    log(f"Database: {db}")
    log(f"Broker: {settings.CELERY_BROKER_URL.split('@')[-1]} (nothing consumes this run's queues)")
    world = build_world(args)
    results: dict[str, Any] = {}

    log(f"Part 1: Campaign.start() of {args.subscribers:,}, each in a fresh process")
    list_campaign = make_campaign(world, "Enrol list", mailing_list_id=world.list_id)
    results["enrol_list"] = run_child("enrol", args, campaign=list_campaign.pk, audience="list")
    log(f"    list: {results['enrol_list']['seconds']:.1f} s")
    users_campaign = make_campaign(world, "Enrol users")
    results["enrol_users"] = run_child("enrol", args, campaign=users_campaign.pk, audience="users")
    log(f"    queryset: {results['enrol_users']['seconds']:.1f} s")
    # Out of the planner's way (a status, not cancel(), which would touch every recipient).
    Campaign.objects.filter(pk__in=[list_campaign.pk, users_campaign.pk]).update(
        status=Campaign.Status.CANCELLED
    )
    results["enrol_list"]["statuses"] = dict(
        list_campaign.recipients.values_list("status").annotate(n=Count("pk")).order_by()
    )

    log(
        f"Part 2: planner ticks, campaign A {args.small:,} and B {args.big:,} recipients "
        f"(half sent), slice {args.slice}"
    )
    cases = [
        make_tick_case("A", args.small, world, args),
        make_tick_case("B", args.big, world, args),
    ]
    analyze(CampaignRecipient)
    moment = datetime.now(UTC).replace(microsecond=0)
    time_ticks(cases, args, moment)
    marginal = time_marginal(cases[0], args, moment)
    time_progress(cases)
    tick_results = []
    for case in cases:
        tick_results.append(
            {
                "name": case.name,
                "size": case.size,
                "slice": args.slice,
                "median_s": median(case.samples),
                "p90_s": p90(case.samples),
                "queued_per_tick": sorted(set(case.queued)),
                "queries": case.queries,
                "progress_median_s": median(case.progress),
                "samples_s": case.samples,
            }
        )
    results["ticks"] = tick_results
    results["tick_marginal"] = marginal

    log("Part 3: baselines, each in a fresh process")
    results["send_mail"] = run_child("send_mail", args, count=args.send_mail)
    log(f"    send_mail loop: {results['send_mail']['seconds']:.1f} s")
    if has_post_office():
        results["send_many"] = run_child("send_many", args, count=args.send_many)
        log(f"    send_many: {results['send_many']['seconds']:.1f} s")
    else:
        log("    django-post_office is not installed: its baseline is skipped")
    load_end = os.getloadavg()

    log("")
    log("Newsletters at scale")
    log(f"Database: {db}")
    log(f"Python {platform.python_version()}, {os.cpu_count()} CPUs")
    log(
        f"Load average (1 min) at the start / end: {load_start[0]:.2f} / {load_end[0]:.2f}"
        + ("   [--quick: figures too small to judge the targets]" if args.quick else "")
    )
    log(
        f"Set-up: list of {args.subscribers:,} active subscribers ({args.subscribers // 100:,} "
        f"of them suppressed); {args.subscribers:,} users; tick campaigns' rows written directly"
        " (COPY / batched INSERT), not through start()"
    )
    log("")
    report(results, args)
    log("")
    statuses = results["enrol_list"].get("statuses", {})
    log(f"List enrolment, recipients by status: {statuses}")
    for case in results["ticks"]:
        log(
            f"Tick {case['name']} ({case['size']:,}): median {case['median_s'] * 1000:.1f} ms, "
            f"p90 {case['p90_s'] * 1000:.1f} ms, queued per tick {case['queued_per_tick']}, "
            f"{case['queries']} queries per tick; progress() median "
            f"{case['progress_median_s'] * 1000:.1f} ms (information, no target)"
        )
    small, big = cases[0], cases[-1]
    small_ms = {sql: seconds * 1000 for seconds, sql in small.timed}
    total_big = sum(seconds for seconds, _ in big.timed) * 1000
    log(
        f"Where a tick's database time goes: {total_big:.1f} ms of B's "
        f"{big_median_ms(results):.1f} ms (the rest is Python: rendering, routing, publishing)."
        f" Slowest statements of B, ms per tick (A's same statement):"
    )
    slowest = []
    for seconds, sql in big.timed[:8]:
        ms = seconds * 1000
        log(f"  {ms:7.2f} ({small_ms.get(sql, 0.0):6.2f})  {sql[:110]}")
        slowest.append({"ms": ms, "small_ms": small_ms.get(sql, 0.0), "sql": sql})
    results["ticks"][-1]["slowest"] = slowest
    results["ticks"][-1]["database_ms"] = total_big
    results["ticks"][0]["database_ms"] = sum(s for s, _ in small.timed) * 1000

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    vendor = "postgresql" if db.startswith("PostgreSQL") else "sqlite"
    path = RESULTS / f"newsletters-{vendor}-{stamp}.json"
    document = {
        "benchmark": "newsletters",
        "database": db,
        "quick": args.quick,
        "load_average": {"start": load_start, "end": load_end},
        "options": {k: v for k, v in vars(args).items() if k not in ("child", "params")},
        "targets": {"enrol_seconds": ENROL_SECONDS, "enrol_mb": ENROL_MB, "tick_ratio": TICK_RATIO},
        "results": results,
    }
    path.write_text(json.dumps(document, indent=2, default=str))
    log(f"Figures written to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
