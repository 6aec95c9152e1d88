"""Many processes race to send through one account: exactly its limit goes out."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from django_gmail_smtp.models import GmailAccount

from .processes import ROOT, child_env

PROCESSES = 8
MESSAGES = 300
LIMIT = 100


@pytest.mark.django_db(transaction=True)
def test_processes_race_one_account(sandbox, make_account):
    account = make_account(sandbox, daily_limit=LIMIT)
    env = child_env()
    start_at = time.time() + 3  # every process set up before the race starts
    per_process = [MESSAGES // PROCESSES + (i < MESSAGES % PROCESSES) for i in range(PROCESSES)]
    children = [
        subprocess.Popen(
            [sys.executable, "tests/scripts/race_sender.py", str(n), account.email, str(start_at)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in per_process
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    sent = sum(r["sent"] for r in results)
    refused = sum(r["refused"] for r in results)
    assert sent + refused == MESSAGES
    assert sent == LIMIT
    assert len(sandbox.deliveries) == LIMIT  # what Gmail (the sandbox) accepted
    assert sum(1 for r in results if r["sent"]) > 1  # the processes really raced
    status = GmailAccount.objects.get(pk=account.pk).quota_status()
    assert status.messages_used == LIMIT  # the ledger agrees with the sandbox
    assert status.exhausted_until is not None
