"""Cost of one quota check-and-reserve (``django_gmail_smtp.quota.reserve``) vs history size.

Measures the time and the number of queries of one ``reserve()`` for an account with:

- A: 1,000 past sends in the 24-hour window (1,000 per-minute buckets of one send each);
- B: 1,000,000 past sends in the window, spread over its 1,440 per-minute buckets;
- C (stress): B plus 1,000,000 older bucket rows that were not pruned yet.

and prints mean, p50 and p95 microseconds per reserve, queries per reserve, and the ratios B/A
and C/A against the target (at most 1.2: the cost must not grow with the history).

Every timed reserve is the steady-state path: ``quota.set_clock`` pins the clock inside a minute
whose bucket already exists (the ledger updates that bucket), 3 hours behind the database's
clock, which each reserve still reads. The new-minute path (a bucket is created and what has
left the window is pruned) is timed separately afterwards; for C its first reserve prunes the
whole backlog and is reported on its own.

Each case has its own account. Phase 1 times A and B with the table holding only their rows;
phase 2 adds C's 1,001,440 rows and times A, B and C again on the large table. Within a phase
the cases are timed in interleaved rounds, so drift (disk, cache, CPU frequency) hits them alike.

Runs on a throw-away test database (Django's test database machinery), destroyed at the end:

    .venv/bin/python benchmarks/quota_reserve.py                      # SQLite (temporary file)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \\
        .venv/bin/python benchmarks/quota_reserve.py                  # PostgreSQL

Options: ``--reserves N`` (timed reserves per case and phase, default 2000), ``--history N``
(sends in B's window, default 1,000,000), ``--backlog N`` (C's unpruned rows, default 1,000,000).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402

django.setup()

from django.db import connection, transaction  # noqa: E402
from django.test.utils import (  # noqa: E402
    CaptureQueriesContext,
)
from django.utils import timezone  # noqa: E402

from benchmarks.testdb import database_label, test_database  # noqa: E402
from django_gmail_smtp import quota  # noqa: E402
from django_gmail_smtp.models import GmailAccount, QuotaBucket, SenderQuota  # noqa: E402

TARGET = 1.2
WARMUP = 200
ROUNDS = 10
NEW_MINUTES = 100
WINDOW_MINUTES = 1440


def log(text: str) -> None:
    print(text, flush=True)


# --- data --------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    description: str
    account: GmailAccount
    quota_id: int
    history_rows: int = 0
    samples: dict[str, list[int]] = field(default_factory=dict)  # phase -> ns per reserve
    new_minute: list[int] = field(default_factory=list)
    first_new_minute_ns: int | None = None
    queries_steady: float = 0.0
    queries_new_minute: float = 0.0
    plan: str = ""


def make_case(name: str, description: str) -> Case:
    email = f"bench-{name.lower()}@example.com"
    account = GmailAccount.objects.create(
        email=email,
        app_password="abcdefghijklmnop",
        limits_preset="workspace",
        daily_limit=100_000_000,  # high enough that every reserve succeeds
        daily_recipient_limit=1_000_000_000,
        is_default=False,
    )
    sender_quota = SenderQuota.objects.create(address=email)
    return Case(name, description, account, sender_quota.pk)


def window_rows(
    quota_id: int, current: datetime, sends: int, buckets: int
) -> Iterator[tuple[int, datetime, int, int]]:
    """``sends`` spread over ``buckets`` distinct minutes of the window, the current one first."""
    buckets = min(buckets, WINDOW_MINUTES, sends)
    base, extra = divmod(sends, buckets)
    for i in range(buckets):
        back = i * WINDOW_MINUTES // buckets  # 0 .. 1439 minutes ago, evenly spaced
        count = base + (1 if i < extra else 0)
        yield quota_id, current - timedelta(minutes=back), count, count


def backlog_rows(
    quota_id: int, current: datetime, rows: int
) -> Iterator[tuple[int, datetime, int, int]]:
    """``rows`` buckets older than the ledger keeps (``quota.KEEP``), one send each."""
    oldest_kept = current - quota.KEEP - timedelta(minutes=1)
    for i in range(rows):
        yield quota_id, oldest_kept - timedelta(minutes=i), 1, 1


def bulk_insert(rows: Iterable[tuple[int, datetime, int, int]], total: int, label: str) -> None:
    """Insert bucket rows fast: COPY on PostgreSQL, batched executemany elsewhere."""
    table = connection.ops.quote_name(QuotaBucket._meta.db_table)
    columns = ", ".join(
        connection.ops.quote_name(QuotaBucket._meta.get_field(name).column)
        for name in ("quota", "minute", "messages", "recipients")
    )
    started = time.perf_counter()
    step = max(1, total // 5)
    done = 0

    def progress() -> None:
        if total >= 100_000 and done % step == 0:
            log(f"    {label}: {done:,} / {total:,} rows ({time.perf_counter() - started:.1f} s)")

    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    done += 1
                    progress()
        else:
            adapt = connection.ops.adapt_datetimefield_value
            sql = f"INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s)"
            batch: list[tuple] = []
            for quota_id, minute, messages, recipients in rows:
                batch.append((quota_id, adapt(minute), messages, recipients))
                done += 1
                if len(batch) >= 50_000:
                    cursor.executemany(sql, batch)
                    batch.clear()
                progress()
            if batch:
                cursor.executemany(sql, batch)
    log(f"    {label}: {done:,} rows in {time.perf_counter() - started:.1f} s")


def analyze() -> None:
    """Refresh planner statistics, as PostgreSQL's autovacuum would after a bulk load."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {connection.ops.quote_name(QuotaBucket._meta.db_table)}")


# --- timing ------------------------------------------------------------------------------------


def pin(moment: datetime) -> None:
    quota.set_clock(lambda: moment)


def reserve_ns(case: Case) -> int:
    started = time.perf_counter_ns()
    quota.reserve(case.account, 1)
    return time.perf_counter_ns() - started


def time_steady(cases: list[Case], phase: str, pinned: datetime, reserves: int) -> None:
    pin(pinned)
    for case in cases:
        for _ in range(WARMUP):
            quota.reserve(case.account, 1)
        case.samples[phase] = []
    per_round = max(1, reserves // ROUNDS)
    for round_no in range(ROUNDS):
        order = cases[round_no % len(cases) :] + cases[: round_no % len(cases)]
        for case in order:
            case.samples[phase].extend(reserve_ns(case) for _ in range(per_round))
        log(f"    round {round_no + 1}/{ROUNDS}: {per_round} reserves x {len(cases)} cases")


def count_queries(case: Case, moment: Callable[[int], datetime], n: int = 10) -> float:
    with CaptureQueriesContext(connection) as ctx:
        for i in range(n):
            pin(moment(i))
            quota.reserve(case.account, 1)
    return len(ctx.captured_queries) / n


def statements(case: Case, moment: datetime) -> list[str]:
    pin(moment)
    with CaptureQueriesContext(connection) as ctx:
        quota.reserve(case.account, 1)
    return [" ".join(q["sql"].split())[:110] for q in ctx.captured_queries]


def window_plan(case: Case, at: datetime) -> str:
    queryset = QuotaBucket.objects.filter(
        quota_id=case.quota_id, minute__gt=quota._window_floor(at)
    ).values("messages", "recipients")
    lines = [line.strip() for line in queryset.explain().splitlines() if line.strip()]
    return " | ".join(lines[:3])


# --- report ------------------------------------------------------------------------------------


def summary(samples: list[int]) -> tuple[float, float, float]:
    """Mean, p50, p95 in microseconds."""
    ordered = sorted(samples)
    p = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] / 1000  # noqa: E731
    return statistics.fmean(ordered) / 1000, p(0.50), p(0.95)


def verdict(ratio: float) -> str:
    return "PASS" if ratio <= TARGET else "MISS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reserves", type=int, default=2000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    args = parser.parse_args()
    # A plain `kill` unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tmpdir = tempfile.mkdtemp(prefix="gmail_smtp_bench_")
    try:
        with test_database(os.path.join(tmpdir, "quota_reserve.sqlite3"), "quota", log=log):
            try:
                run(args)
            finally:
                quota.set_clock(None)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


def run(args: argparse.Namespace) -> None:
    db = database_label()
    log(f"Database: {db}")
    load_start = os.getloadavg()[0]
    # Behind the database's clock: the ledger never prunes past that clock, so the new-minute
    # path below (which moves the pinned clock up to ~2 h on) prunes as it does in production.
    pinned = timezone.now().replace(second=30, microsecond=0) - timedelta(hours=3)
    current = pinned.replace(second=0)

    a = make_case("A", "1,000 sends in the window")
    b = make_case("B", f"{args.history:,} sends in the window")
    c = make_case("C", f"B + {args.backlog:,} unpruned older rows")

    log("Phase 1: loading A and B")
    bulk_insert(window_rows(a.quota_id, current, 1000, 1000), 1000, "A window")
    bulk_insert(
        window_rows(b.quota_id, current, args.history, WINDOW_MINUTES), WINDOW_MINUTES, "B window"
    )
    a.history_rows, b.history_rows = 1000, WINDOW_MINUTES
    analyze()
    rows_phase1 = QuotaBucket.objects.count()
    log(f"Phase 1: timing {args.reserves} steady-state reserves per case ({rows_phase1:,} rows)")
    time_steady([a, b], "1", pinned, args.reserves)

    log("Phase 2: loading C")
    bulk_insert(
        window_rows(c.quota_id, current, args.history, WINDOW_MINUTES), WINDOW_MINUTES, "C window"
    )
    bulk_insert(backlog_rows(c.quota_id, current, args.backlog), args.backlog, "C backlog")
    c.history_rows = WINDOW_MINUTES + args.backlog
    analyze()
    rows_phase2 = QuotaBucket.objects.count()
    log(f"Phase 2: timing {args.reserves} steady-state reserves per case ({rows_phase2:,} rows)")
    time_steady([a, b, c], "2", pinned, args.reserves)

    for case in (a, b, c):
        case.queries_steady = count_queries(case, lambda i: pinned)
        case.plan = window_plan(case, pinned)
    steady_sql = statements(a, pinned)

    log(f"New-minute path: {NEW_MINUTES} reserves per case, each in a new minute")
    for k in range(1, NEW_MINUTES + 1):
        moment = pinned + timedelta(minutes=k)
        pin(moment)
        for case in (a, b, c):
            elapsed = reserve_ns(case)
            if case is c and k == 1:
                case.first_new_minute_ns = elapsed  # prunes the whole backlog
            else:
                case.new_minute.append(elapsed)
    left = QuotaBucket.objects.filter(quota_id=c.quota_id, minute__lt=pinned - quota.KEEP).count()
    base = pinned + timedelta(minutes=NEW_MINUTES)
    for case in (a, b, c):
        case.queries_new_minute = count_queries(
            case, lambda i: base + timedelta(minutes=i + 1), n=5
        )
    new_minute_sql = statements(a, base + timedelta(minutes=10))

    # --- the figures ---
    log("")
    log("quota.reserve(): one check-and-reserve, steady state (the current minute's bucket exists)")
    log(f"Database: {db}")
    log(f"Timed reserves per case and phase: {args.reserves} (after {WARMUP} warm-up)")
    log(f"Load average (1 min) at the start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}")
    log("")
    header = (
        f"{'phase':<6}{'case':<5}{'history':<40}{'bucket rows':>12}{'table rows':>12}"
        f"{'mean us':>10}{'p50 us':>10}{'p95 us':>10}{'queries':>9}"
    )
    log(header)
    log("-" * len(header))
    stats: dict[tuple[str, str], tuple[float, float, float]] = {}
    for phase, cases, rows in (("1", [a, b], rows_phase1), ("2", [a, b, c], rows_phase2)):
        for case in cases:
            stats[phase, case.name] = summary(case.samples[phase])
            mean, p50, p95 = stats[phase, case.name]
            log(
                f"{phase:<6}{case.name:<5}{case.description:<40}{case.history_rows:>12,}"
                f"{rows:>12,}{mean:>10.0f}{p50:>10.0f}{p95:>10.0f}{case.queries_steady:>9.1f}"
            )
    log("(queries: the statements Django ran for one reserve, BEGIN and COMMIT included)")
    log("")
    log("Ratios against baseline A (same phase, so the same table):")
    for label, num, den in (
        ("B/A (phase 1)", ("1", "B"), ("1", "A")),
        ("B/A (phase 2)", ("2", "B"), ("2", "A")),
        ("C/A (phase 2)", ("2", "C"), ("2", "A")),
    ):
        mean_ratio = stats[num][0] / stats[den][0]
        p50_ratio = stats[num][1] / stats[den][1]
        log(
            f"  {label}: mean {mean_ratio:.2f}, p50 {p50_ratio:.2f}  "
            f"target <= {TARGET}: {verdict(mean_ratio)} (mean), {verdict(p50_ratio)} (p50)"
        )
    log("")
    log("Plan of the window scan (rows summed by each reserve):")
    for case in (a, b, c):
        log(f"  {case.name}: {case.plan}")
    log("")
    log(f"New-minute path ({NEW_MINUTES} reserves per case, each creating a bucket and pruning):")
    for case in (a, b, c):
        mean, p50, p95 = summary(case.new_minute)
        log(
            f"  {case.name}: mean {mean:.0f} us, p50 {p50:.0f} us, p95 {p95:.0f} us, "
            f"{case.queries_new_minute:.1f} queries"
        )
    if c.first_new_minute_ns is not None:
        log(
            f"  C's first new-minute reserve pruned the {args.backlog:,}-row backlog in "
            f"{c.first_new_minute_ns / 1e6:.0f} ms (rows older than KEEP left: {left:,})"
        )
    log("")
    log("Statements of one steady-state reserve:")
    for sql in steady_sql:
        log(f"  {sql}")
    log("Statements of one new-minute reserve:")
    for sql in new_minute_sql:
        log(f"  {sql}")


if __name__ == "__main__":
    sys.exit(main())
