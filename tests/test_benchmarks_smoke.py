"""benchmarks/run.py runs: a quick pass over one cheap case prints its table and stores its JSON
(no timing is asserted: the figures belong to the machine)."""

from __future__ import annotations

import json
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
    assert {"raw_next", "caller_sqlite", "caller_postgres", "bulk_100k"} <= set(names)
    assert "--quick" in run("--help", timeout=60).stdout
    unknown = run("--only", "no_such_case", timeout=60)
    assert unknown.returncode == 2 and "Unknown case" in unknown.stderr
