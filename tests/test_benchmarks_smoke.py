"""benchmarks/run.py runs: a quick pass over one cheap case prints its table and stores its JSON
(no timing is asserted: the figures belong to the machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .processes import ROOT

pytestmark = pytest.mark.integration


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/run.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_quick_run_of_one_case_prints_the_table_and_stores_json(tmp_path):
    path = tmp_path / "result.json"
    done = run(
        "--quick", "--only", "raw_next,ours_sync", "--json", str(path), "--broker", "atomicfs"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "raw pipelined client, body sent with the next envelope" in done.stdout
    assert "<= 1.10 x raw pipelined limit" in done.stdout  # ours_sync against raw_next
    document = json.loads(path.read_text())
    for name in ("raw_next", "ours_sync"):
        figures = document["results"][name]
        assert figures["ms_per_msg"] > 0 and figures["logins_per_100"] > 0
        assert len(document["runs"][name]) == 1  # --quick: one run
    (target,) = [t for t in document["targets"] if t["case"] == "ours_sync"]
    assert target["met"] in (True, False) and target["value"] > 0


def test_help_lists_every_case_and_unknown_cases_are_refused():
    listed = run("--list", timeout=60)
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert {
        "raw_next",
        "caller_sqlite",
        "caller_sqlite_wal",
        "caller_postgres",
        "bulk_100k",
    } <= set(names)
    assert "--quick" in run("--help", timeout=60).stdout
    unknown = run("--only", "no_such_case", timeout=60)
    assert unknown.returncode == 2 and "Unknown case" in unknown.stderr


CASE_IN_WAL = """
import sys
import benchmarks.run as R

def journal(bench, n):
    from django.db import connection
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        (mode,) = cursor.fetchone()
    return {"wal": float(mode == "wal"), "delete": float(mode == "delete")}

R.case("wal_probe", "probe", (1, 1), {}, journal_mode="wal")(journal)
R.case("default_probe", "probe", (1, 1), {})(journal)
sys.exit(R.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("case", "mode"), [("wal_probe", "wal"), ("default_probe", "delete")])
def test_a_case_in_wal_mode_runs_on_a_database_in_wal_mode(case, mode):
    # caller_sqlite_wal's premise: the whole case, peers included, runs in WAL mode, and the
    # other SQLite cases keep SQLite's default journal.
    done = subprocess.run(
        [sys.executable, "-c", CASE_IN_WAL, "--child", case, "--messages", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")},
            "CELERY_BROKER_URL": "",  # the folder broker, as run.py's children without Redis
        },
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("BENCH-RESULT ")]
    assert json.loads(line.removeprefix("BENCH-RESULT ")) == {
        "wal": float(mode == "wal"),
        "delete": float(mode == "delete"),
    }
