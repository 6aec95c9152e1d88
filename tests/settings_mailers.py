"""Settings for the Celery workers of tests/test_mailers_pipeline.py: the test settings, plus
what those tests hand the worker through its environment.

- ``GMAIL_SMTP_TEST_MAILERS``: a JSON ``MAILERS`` dict (Django 6.1), as the test process has it.
- ``GMAIL_SMTP_TEST_LEDGER_SCHEMA`` (PostgreSQL): the ``ledger`` alias searches this schema
  first, so quota rows written through ``QUOTA_DATABASE="ledger"`` land in its tables and a
  test can tell them from rows written through ``default``.
"""

import json
import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

if os.environ.get("GMAIL_SMTP_TEST_MAILERS"):
    MAILERS = json.loads(os.environ["GMAIL_SMTP_TEST_MAILERS"])
    # Django 6.1 refuses the deprecated EMAIL_* settings next to MAILERS.
    for _name in [n for n in globals() if n.startswith("EMAIL_")]:
        del globals()[_name]

if os.environ.get("GMAIL_SMTP_TEST_LEDGER_SCHEMA") and "ledger" in DATABASES:
    _schema = os.environ["GMAIL_SMTP_TEST_LEDGER_SCHEMA"]
    DATABASES["ledger"] = {
        **DATABASES["default"],
        "OPTIONS": {
            **DATABASES["default"].get("OPTIONS", {}),
            "options": f"-c search_path={_schema},public",
        },
    }
