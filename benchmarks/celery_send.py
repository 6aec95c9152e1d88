"""The Celery backend against the sync backend and against django-celery-email, over a slow link.

A Gmail sandbox (STARTTLS, like smtp.gmail.com:587) runs behind ``LatencyProxy``, which adds
25 ms to every round trip (12.5 ms each way), so each SMTP command costs what it costs from a
typical server to Gmail. Everything sends as one App Password account of the sandbox.

Part 1, caller blocking time: the median and p95 time ``send_mail()`` takes with
``GmailSMTPBackend`` (connects, STARTTLS, logs in and sends before returning) and with
``CeleryGmailBackend`` (writes the outbox row and publishes its id), interleaved, and the ratio
(target: well over 10x).

Part 2, worker throughput: 1,000 messages are queued with one ``send_messages()`` call, then
ONE real Celery worker (prefork, concurrency 2, prefetch multiplier 1) is started on this run's
own queues, and the time from its "ready" to the last row being ``sent`` gives messages per
second; the sandbox's login count gives logins per 1,000 messages. The baseline is
django-celery-email-reboot (the maintained fork of django-celery-email): the same 1,000 messages
through ``djcelery_email.backends.CeleryEmailBackend`` (chunks of 10 messages per task, its
default) with Django's SMTP backend behind it, on a worker started with the same options, timed
until the sandbox has accepted all of them. A second baseline row sends ``--per-message``
messages (200 by default, to stay within a few minutes) with one ``send_mail()`` call each, as
a web application sending one notification per request does: then every task is one message
and one SMTP login. This app's figure holds for both call patterns, since its backend makes one
task per message either way.

Runs on a throw-away test database and broker folder, both removed at the end, with the
broker Celery's tests use (kombu's filesystem transport, or Redis when REDIS_URL is set):

    .venv/bin/python benchmarks/celery_send.py
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python benchmarks/celery_send.py
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test .venv/bin/python benchmarks/celery_send.py

Needs the ``bench`` extra (``pip install -e '.[bench]'``) for the baseline. Options:
``--messages N`` (default 1000), ``--calls N`` (Part 1, default 30), ``--delay S`` (one way,
default 0.0125), ``--concurrency N`` (default 2), ``--per-message N`` (default 200; 0 skips
it), ``--skip-baseline``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import smtplib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.latency_proxy import LatencyProxy  # noqa: E402
from django_gmail_smtp.testing import GmailSandbox  # noqa: E402  (imports no Django)

SENDER = "bench@example.com"
RECIPIENT = "to@example.net"
APP_PASSWORD = "abcdefghijklmnop"
BODY = (
    "Hello,\n\nThis is a benchmark message of about a kilobyte, like a typical notification.\n\n"
    + "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. " * 10
)
SYNC = "django_gmail_smtp.backends.GmailSMTPBackend"
CELERY = "django_gmail_smtp.backends.CeleryGmailBackend"
BASELINE = "djcelery_email.backends.CeleryEmailBackend"
PART1_TARGET = 10.0


def log(text: str = "") -> None:
    print(text, flush=True)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Throughput:
    name: str
    messages: int
    seconds: float  # from the worker's "ready" to the last message done
    seconds_from_spawn: float
    logins: int
    connections: int
    queue_seconds: float  # the caller's time to hand over all messages
    done_before_ready: int
    busy_seconds: float  # the tasks' own run times, summed (from the worker's log)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def logins_per_1000(self) -> float:
        return self.logins * 1000 / self.messages

    @property
    def busy_ms_per_message(self) -> float:
        return self.busy_seconds * 1000 / self.messages


def task_seconds(worker_log: str) -> float:
    """The run times Celery logs for each task ("succeeded in 0.1234s"), summed."""
    return sum(float(m) for m in re.findall(r" succeeded in ([0-9.]+)s", worker_log))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--delay", type=float, default=0.0125)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--per-message", type=int, default=200)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    # A plain `kill` unwinds like Ctrl-C, so the cleanup below still runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tmp = Path(tempfile.mkdtemp(prefix="gmail_smtp_bench_celery_"))
    tag = args.tag = uuid.uuid4().hex[:8]
    # Read by tests/settings.py (filesystem broker) and benchmarks/settings.py (baseline queue),
    # here and in the workers, which inherit the environment.
    os.environ["CELERY_FS_DIR"] = str(tmp / "broker")
    os.environ["BENCH_BASELINE_QUEUE"] = f"bench.{tag}.djcelery_email"
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"

    sandbox = GmailSandbox(security="starttls")
    proxy: LatencyProxy | None = None
    try:
        log("Starting the Gmail sandbox and the latency proxy...")
        sandbox.start()
        sandbox.add_user(SENDER, app_password=APP_PASSWORD)
        proxy = LatencyProxy("127.0.0.1", sandbox.port, delay=args.delay)
        proxy.start()
        return with_django(args, tmp, tag, sandbox, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        sandbox.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def with_django(
    args: argparse.Namespace, tmp: Path, tag: str, sandbox: GmailSandbox, proxy: LatencyProxy
) -> int:
    import django

    django.setup()
    from django.conf import settings

    from benchmarks.celery_app import app
    from benchmarks.testdb import test_database

    queues = {
        "part1": {"transactional": f"bench.{tag}.p1.t", "bulk": f"bench.{tag}.p1.b"},
        "part2": {"transactional": f"bench.{tag}.p2.t", "bulk": f"bench.{tag}.p2.b"},
    }
    with test_database(tmp / "celery_send.sqlite3", "celery", log=log):
        try:
            settings.GMAIL_SMTP = {
                **settings.GMAIL_SMTP,
                **sandbox.settings(),
                "HOST": "127.0.0.1",
                "PORT": proxy.port,
                "SECURITY": "starttls",
                "CA_FILE": sandbox.ca_file,
            }
            return run(args, tmp, sandbox, proxy, queues)
        finally:
            names = [name for group in queues.values() for name in group.values()]
            names.append(os.environ["BENCH_BASELINE_QUEUE"])
            remove_queues(app, names, tag)


def remove_queues(app, names: list[str], tag: str) -> None:
    """Drop this run's queues from the broker (part 1's tasks are never consumed)."""
    with contextlib.suppress(Exception), app.connection_for_write() as broker:
        channel = broker.default_channel
        redis = broker.transport.driver_type == "redis"
        for name in names:
            with contextlib.suppress(Exception):
                channel.queue_purge(name)
                if redis:  # kombu keeps each queue's bindings in keys of their own
                    channel.client.delete(
                        f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"
                    )
        if redis:  # and each worker's remote-control queue in a shared set
            pidbox = "_kombu.binding.celery.pidbox"
            for member in channel.client.smembers(pidbox):
                if f"-{tag}@".encode() in member:
                    channel.client.srem(pidbox, member)


def describe_setup(sandbox: GmailSandbox, proxy: LatencyProxy) -> tuple[str, str, float, float]:
    from django.conf import settings
    from django.db import connection

    if connection.vendor == "postgresql":
        database = f"PostgreSQL, db {connection.settings_dict['NAME']}"
    else:
        database = f"SQLite, file {connection.settings_dict['NAME']}"
    broker_url = settings.CELERY_BROKER_URL
    broker = "Redis " + broker_url if broker_url.startswith("redis") else "kombu filesystem"

    def noop_rtt(port: int) -> float:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("bench.example.com")
            samples = []
            for _ in range(10):
                started = time.perf_counter()
                smtp.noop()
                samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    assert proxy.port is not None
    return database, broker, noop_rtt(sandbox.port), noop_rtt(proxy.port)


def run(
    args: argparse.Namespace,
    tmp: Path,
    sandbox: GmailSandbox,
    proxy: LatencyProxy,
    queues: dict[str, dict[str, str]],
) -> int:
    from django.conf import settings

    from django_gmail_smtp.models import GmailAccount, OutboundEmail

    GmailAccount.objects.create(
        email=SENDER,
        app_password="abcd efgh ijkl mnop",
        limits_preset="workspace",
        daily_limit=1_000_000,  # the benchmark is about speed, not the quota
        daily_recipient_limit=10_000_000,
        is_default=True,
    )
    database, broker, rtt_direct, rtt_proxy = describe_setup(sandbox, proxy)
    load_start = os.getloadavg()[0]
    log(f"Database: {database}")
    log(f"Broker: {broker}")
    log(
        f"SMTP NOOP round trip: {rtt_direct * 1000:.2f} ms direct, {rtt_proxy * 1000:.2f} ms "
        f"through the proxy (+{2 * args.delay * 1000:g} ms configured)"
    )
    sandbox.reset()

    # --- Part 1 ---
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "QUEUES": queues["part1"]}
    sync_times, celery_times = part1(args.calls)
    part1_logins = sandbox.stats.logins
    OutboundEmail.objects.all().delete()  # their tasks wait on part-1 queues nobody consumes
    sandbox.reset()

    # --- Part 2 ---
    settings.GMAIL_SMTP = {**settings.GMAIL_SMTP, "QUEUES": queues["part2"]}
    ours = part2_ours(args, tmp, sandbox, queues["part2"])
    sandbox.reset()
    baseline = per_message = None
    baseline_name = baseline_label()
    if not args.skip_baseline:
        baseline = part2_baseline(args, tmp, sandbox, proxy, args.messages, per_message=False)
        sandbox.reset()
        if args.per_message:
            per_message = part2_baseline(
                args, tmp, sandbox, proxy, args.per_message, per_message=True
            )

    # --- report ---
    sync_med, celery_med = statistics.median(sync_times), statistics.median(celery_times)
    ratio = sync_med / celery_med
    log()
    log("=" * 100)
    log("Summary")
    log(f"  Gmail sandbox (STARTTLS) behind a proxy: +{2 * args.delay * 1000:g} ms per round trip")
    log(
        f"  (SMTP NOOP measured {rtt_proxy * 1000:.1f} ms through it, "
        f"{rtt_direct * 1000:.2f} ms direct)"
    )
    log(f"  Database: {database}; broker: {broker}; worker: prefork x{args.concurrency}")
    log(
        f"  Load average (1 min) at the start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}"
        f" on {os.cpu_count()} CPUs"
    )
    log()
    log("Part 1: time send_mail() blocks the caller, one message, one recipient")
    log(f"  {'backend':<52}{'median ms':>11}{'p95 ms':>9}{'calls':>7}")
    for name, times in (
        ("GmailSMTPBackend (sync, baseline)", sync_times),
        ("CeleryGmailBackend (outbox row + publish)", celery_times),
    ):
        log(
            f"  {name:<52}{statistics.median(times) * 1000:>11.2f}"
            f"{percentile(times, 0.95) * 1000:>9.2f}{len(times):>7}"
        )
    log(
        f"  ratio sync / Celery (medians): {ratio:.1f}x   target well over {PART1_TARGET:g}x: "
        f"{'PASS' if ratio > PART1_TARGET else 'MISS'}"
    )
    log(f"  (the sync backend logged in {part1_logins} times: once per call, warm-up included)")
    log()
    log("Part 2: messages queued, then one worker started; throughput and logins")
    log(
        f"  {'sender':<62}{'msgs':>6}{'msg/s':>7}{'seconds':>9}{'logins/1000':>13}"
        f"{'conns':>7}{'busy ms/msg':>13}{'queue s':>9}"
    )
    rows = [("CeleryGmailBackend (this app; any call pattern)", ours)]
    if baseline is not None:
        rows.append((f"{baseline_name}, one send_messages() call", baseline))
    if per_message is not None:
        rows.append((f"{baseline_name}, one send_mail() per message", per_message))
    for name, result in rows:
        log(
            f"  {name:<62}{result.messages:>6}{result.rate:>7.1f}{result.seconds:>9.1f}"
            f"{result.logins_per_1000:>13.1f}{result.connections:>7}"
            f"{result.busy_ms_per_message:>13.1f}{result.queue_seconds:>9.2f}"
        )
    log(
        "  (seconds: from the worker's 'ready' to the last message sent; busy ms/msg: the tasks' "
        "own run times\n  per message, from the worker's log; 'queue s': the caller's time to "
        "hand all of them over)"
    )
    for name, result in rows[1:]:
        logins = f"{result.logins_per_1000 / ours.logins_per_1000:.0f}x" if ours.logins else "n/a"
        log(
            f"  vs {name}: throughput this app / baseline {ours.rate / result.rate:.2f}x, "
            f"logins baseline / this app {logins}"
        )
    for name, result in rows:
        if result.done_before_ready:
            log(f"  note: {name}: {result.done_before_ready} sent before 'ready' was seen")
    log("=" * 100)
    return 0


def part1(calls: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    from django.core.mail import get_connection, send_mail

    log(f"Part 1: {calls} send_mail() calls per backend (+{warmup} warm-up), interleaved")
    sync_times: list[float] = []
    celery_times: list[float] = []
    for i in range(warmup + calls):
        for path, times in ((SYNC, sync_times), (CELERY, celery_times)):
            started = time.perf_counter()
            sent = send_mail(
                f"Part 1 #{i}", BODY, SENDER, [RECIPIENT], connection=get_connection(path)
            )
            elapsed = time.perf_counter() - started
            if sent != 1:
                raise RuntimeError(f"{path} returned {sent} for one message")
            if i >= warmup:
                times.append(elapsed)
        if (i + 1) % 10 == 0:
            log(f"    {i + 1}/{warmup + calls} calls per backend")
    return sync_times, celery_times


def wait_for(
    count: Callable[[], int],
    n: int,
    label: str,
    worker,
    started: float,
    problems: Callable[[], str] = lambda: "",
) -> None:
    timeout = max(300.0, n * 0.5)
    last_report = time.perf_counter()
    while True:
        done = count()
        if done >= n:
            return
        now = time.perf_counter()
        if now - last_report >= 5:
            rate = done / (now - started) if now > started else 0.0
            log(f"    {label}: {done}/{n} sent ({rate:.1f} msg/s so far)")
            last_report = now
        trouble = problems()
        if not trouble and worker.process.poll() is not None:
            trouble = "the worker exited"
        if not trouble and now - started > timeout:
            trouble = f"timed out after {timeout:.0f} s"
        if trouble:
            tail = "\n".join(worker.log().splitlines()[-30:])
            raise RuntimeError(
                f"{label}: {done}/{n} sent after {now - started:.0f} s; {trouble}"
                f"\n--- worker log (tail) ---\n{tail}"
            )
        time.sleep(0.2)  # a gentle poll: SQLite readers and writers share one lock


def part2_ours(
    args: argparse.Namespace, tmp: Path, sandbox: GmailSandbox, queues: dict[str, str]
) -> Throughput:
    from django.core.mail import EmailMessage, get_connection

    from django_gmail_smtp.models import OutboundEmail
    from tests.processes import CeleryWorker

    Status = OutboundEmail.Status
    n = args.messages
    log(f"Part 2, this app: queueing {n} messages with CeleryGmailBackend...")
    messages = [EmailMessage(f"Bench #{i}", BODY, SENDER, [RECIPIENT]) for i in range(n)]
    started = time.perf_counter()
    queued = get_connection(CELERY).send_messages(messages)
    queue_seconds = time.perf_counter() - started
    if queued != n:
        raise RuntimeError(f"CeleryGmailBackend queued {queued} of {n}")
    log(
        f"    queued in {queue_seconds:.1f} s; starting one worker (concurrency {args.concurrency})"
    )

    def sent() -> int:
        return OutboundEmail.objects.filter(status=Status.SENT).count()

    def problems() -> str:
        bad = OutboundEmail.objects.filter(status__in=[Status.FAILED, Status.DEFERRED])
        row = bad.values("pk", "status", "reason", "last_error").first()
        return f"a row was not sent: {row}" if row else ""

    spawn = time.perf_counter()
    worker = CeleryWorker(
        queues=",".join(queues.values()),
        concurrency=args.concurrency,
        name=f"bench-ours-{args.tag}",
        log_path=tmp / "worker-ours.log",
    )
    try:
        worker.wait_ready()
        ready = time.perf_counter()
        early = sent()
        log(f"    worker ready after {ready - spawn:.1f} s")
        wait_for(sent, n, "this app", worker, ready, problems)
        done = time.perf_counter()
    finally:
        worker.stop()
    stats = sandbox.stats
    log(
        f"    done in {done - ready:.1f} s; "
        f"sandbox: {stats.logins} logins, {stats.messages} messages"
    )
    return Throughput(
        "ours",
        n,
        done - ready,
        done - spawn,
        stats.logins,
        stats.connections,
        queue_seconds,
        early,
        task_seconds(worker.log()),
    )


def baseline_label() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("django-celery-email-reboot", "django-celery-email"):
        with contextlib.suppress(PackageNotFoundError):
            return f"{distribution} {version(distribution)}"
    return "django-celery-email (not installed)"


def part2_baseline(
    args: argparse.Namespace,
    tmp: Path,
    sandbox: GmailSandbox,
    proxy: LatencyProxy,
    n: int,
    *,
    per_message: bool,
) -> Throughput:
    from django.core.mail import EmailMessage, get_connection, send_mail

    how = "one send_mail() per message" if per_message else "one send_messages() call"
    log(f"Part 2, baseline: queueing {n} messages with djcelery_email's backend, {how}...")
    started = time.perf_counter()
    if per_message:
        for i in range(n):
            send_mail(f"Bench #{i}", BODY, SENDER, [RECIPIENT], connection=get_connection(BASELINE))
    else:
        messages = [EmailMessage(f"Bench #{i}", BODY, SENDER, [RECIPIENT]) for i in range(n)]
        get_connection(BASELINE).send_messages(messages)
    queue_seconds = time.perf_counter() - started
    log(
        f"    queued in {queue_seconds:.1f} s; starting one worker (concurrency {args.concurrency})"
    )

    def delivered() -> int:
        return sandbox.stats.messages

    def problems() -> str:
        text = worker.log()
        for needle in ("Failed to send", "Cannot reach CELERY_EMAIL_BACKEND"):
            if needle in text:
                return f"the baseline worker logged {needle!r}"
        return ""

    spawn = time.perf_counter()
    from tests.processes import CeleryWorker

    worker = CeleryWorker(
        app="benchmarks.celery_app",
        name=f"bench-baseline-{args.tag}",
        queues=os.environ["BENCH_BASELINE_QUEUE"],
        concurrency=args.concurrency,
        log_path=tmp / f"worker-baseline-{'single' if per_message else 'batch'}.log",
        env={
            "DJANGO_SETTINGS_MODULE": "benchmarks.settings",
            "SSL_CERT_FILE": sandbox.ca_file,  # so Django's SMTP backend trusts the sandbox
            "BENCH_EMAIL_HOST": "127.0.0.1",
            "BENCH_EMAIL_PORT": str(proxy.port),
            "BENCH_EMAIL_HOST_USER": SENDER,
            "BENCH_EMAIL_HOST_PASSWORD": APP_PASSWORD,
        },
    )
    try:
        worker.wait_ready()
        ready = time.perf_counter()
        early = delivered()
        log(f"    worker ready after {ready - spawn:.1f} s")
        wait_for(delivered, n, "baseline", worker, ready, problems)
        done = time.perf_counter()
    finally:
        worker.stop()
    stats = sandbox.stats
    log(
        f"    done in {done - ready:.1f} s; "
        f"sandbox: {stats.logins} logins, {stats.messages} messages"
    )
    return Throughput(
        "baseline",
        n,
        done - ready,
        done - spawn,
        stats.logins,
        stats.connections,
        queue_seconds,
        early,
        task_seconds(worker.log()),
    )


if __name__ == "__main__":
    sys.exit(main())
