"""A sender whose clock is wrong (tests/test_quota_race.py): send N messages, print counts.

Usage: ``skewed_sender.py SHIFT_SECONDS COUNT FROM``. Python's idea of the time in this process
(``time.time`` and ``django.utils.timezone.now``) runs SHIFT_SECONDS ahead of the machine's,
as on a server whose clock is off. The database's clock is not affected.
"""

import json
import os
import sys
import time
from datetime import timedelta

import django
from django.utils import timezone

shift, count, sender = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
_real_time, _real_now = time.time, timezone.now
time.time = lambda: _real_time() + shift
timezone.now = lambda: _real_now() + timedelta(seconds=shift)

django.setup()

from django.core.mail import EmailMessage  # noqa: E402

from django_gmail_smtp.backends import GmailSMTPBackend  # noqa: E402
from django_gmail_smtp.exceptions import QuotaExceeded  # noqa: E402

sent = refused = 0
with GmailSMTPBackend() as backend:
    for i in range(count):
        message = EmailMessage(f"skewed {os.getpid()} {i}", "body", sender, [f"s{i}@example.net"])
        try:
            sent += backend.send_messages([message])
        except QuotaExceeded:
            refused += 1
# What this process believed the time was, so the test can check the shift really applied.
print(json.dumps({"sent": sent, "refused": refused, "clock": timezone.now().isoformat()}))
