"""Processes share one account: exactly its limit goes out, whatever their clocks say."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest
from django.core.mail import EmailMessage

from django_gmail_smtp import quota
from django_gmail_smtp.clock import db_now
from django_gmail_smtp.models import GmailAccount, QuotaBucket, QuotaDay, SenderQuota

from .processes import ROOT, child_env

PROCESSES = 8
MESSAGES = 300
LIMIT = 100


@pytest.mark.integration
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


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_process_with_clock_ahead_keeps_to_the_window(sandbox, make_account):
    """A sender whose clock runs 2 h ahead neither sees old sends leave early nor prunes them.

    The ledger already holds 6 sends from 23 h 30 min ago (still in the window) and 5 from 26 h
    ago (gone). This process sends 2, then a process whose clock is 2 h ahead tries 10: only 2
    fit. By its own clock the 6 would have left the window, and pruning would delete them.
    """
    limit = 10
    account = make_account(sandbox, daily_limit=limit)
    head = SenderQuota.objects.create(address=account.email)
    minute = db_now().replace(second=0, microsecond=0)
    in_window = QuotaBucket.objects.create(
        quota=head, minute=minute - timedelta(hours=23, minutes=30), messages=6, recipients=6
    )
    QuotaBucket.objects.create(
        quota=head, minute=minute - timedelta(hours=26), messages=5, recipients=5
    )
    for i in range(2):
        assert EmailMessage("s", "b", account.email, [f"p{i}@example.net"]).send() == 1

    child = subprocess.run(
        [sys.executable, "tests/scripts/skewed_sender.py", "7200", "10", account.email],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    ahead = datetime.fromisoformat(result["clock"]) - db_now()
    assert timedelta(hours=1, minutes=55) < ahead < timedelta(hours=2, minutes=5)  # it was skewed

    assert (result["sent"], result["refused"]) == (2, 8)
    assert len(sandbox.deliveries) == 4  # 6 + 4: never more than the limit in 24 h
    assert QuotaBucket.objects.filter(pk=in_window.pk).exists()  # still in the window: kept
    assert not QuotaBucket.objects.filter(minute__lt=minute - quota.KEEP).exists()
    assert QuotaDay.objects.get(quota=head).messages == 5  # the old one was rolled up
    status = GmailAccount.objects.get(pk=account.pk).quota_status()
    assert status.messages_used == limit
