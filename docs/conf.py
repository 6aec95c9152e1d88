"""Sphinx configuration for the django-gmail-smtp documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The settings reference is generated from ``django_gmail_smtp.conf`` at build time (see
``_ext/gmail_settings.py``), so Django is configured minimally here to import the package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

import django  # noqa: E402
from django.conf import settings  # noqa: E402

# The docs describe the package's defaults, never a project's settings.
os.environ.pop("DJANGO_SETTINGS_MODULE", None)
if not settings.configured:
    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django_gmail_smtp",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        SECRET_KEY="docs-build-only",
        USE_TZ=True,
    )
    django.setup()

project = "django-gmail-smtp"
author = "django-gmail-smtp contributors"
copyright = "django-gmail-smtp contributors"

try:
    from importlib.metadata import version as _version

    release = _version("django-gmail-smtp")
except Exception:  # not installed: building from a plain checkout
    release = ""
version = release

extensions = [
    "myst_parser",
    "gmail_settings",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Every cross-reference must resolve (a setting renamed in the code breaks the build).
nitpicky = True

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "django-gmail-smtp"
html_static_path: list[str] = []
