"""One of the racing processes of tests/test_quota_race.py: send N messages, print counts."""

import json
import os
import sys
import time

import django

django.setup()

from django.core.mail import EmailMessage  # noqa: E402

from django_gmail_smtp.backends import GmailSMTPBackend  # noqa: E402
from django_gmail_smtp.exceptions import QuotaExceeded  # noqa: E402

count, sender, start_at = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))  # start together, to race
sent = refused = 0
with GmailSMTPBackend() as backend:
    for i in range(count):
        message = EmailMessage(f"race {os.getpid()} {i}", "body", sender, [f"r{i}@example.net"])
        try:
            sent += backend.send_messages([message])
        except QuotaExceeded:
            refused += 1
print(json.dumps({"sent": sent, "refused": refused}))
