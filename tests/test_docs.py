"""The documentation in docs/ stays true to the code.

- Every settings key is described in the code (``conf.SETTINGS``), which the settings reference
  renders; every backend argument and every system check id is documented.
- The troubleshooting page names, for each Gmail reply, the exception ``classify_reply`` gives
  and what the outbox does with it.
- The examples run: the quick start's settings blocks send through the sandbox, and the
  sandbox-testing examples pass under pytest.
- The site builds with ``sphinx -W`` (skipped, with the reason, when Sphinx is not installed).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import django
import pytest

from django_gmail_smtp import conf
from django_gmail_smtp.exceptions import classify_reply
from django_gmail_smtp.testing import GmailSandbox

from .processes import nested_pytest_env

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOCS_EXTRAS = ("sphinx", "myst_parser", "furo")


def _extension():
    """docs/_ext/gmail_settings.py, the Sphinx extension that renders the settings reference."""
    spec = importlib.util.spec_from_file_location(
        "gmail_settings_ext", DOCS / "_ext" / "gmail_settings.py"
    )
    if spec is None or spec.loader is None or importlib.util.find_spec("sphinx") is None:
        pytest.skip("Sphinx is not installed: pip install sphinx myst-parser furo")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


# --- the settings reference ---------------------------------------------------------------------


def test_every_settings_key_is_described_in_the_code():
    undescribed = [
        name
        for name in conf.DEFAULTS
        if name not in conf.SETTINGS
        or not conf.SETTINGS[name].description.strip()
        or not conf.SETTINGS[name].expected.strip()
    ]
    assert not undescribed, (
        f"GMAIL_SMTP keys without a description in conf.SETTINGS: {undescribed}; the docs' "
        "settings reference renders from it"
    )
    stale = sorted(set(conf.SETTINGS) - set(conf.DEFAULTS))
    assert not stale, f"conf.SETTINGS describes keys that have no default: {stale}"


def test_the_readme_settings_table_shows_the_real_defaults():
    """Each row of the README's settings table names a real key with its real default; the
    core sending keys (all but the newsletters' and the bounce reader's) are all there."""
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_0-9]+)` \| `([^`]*)` \|", readme, re.M))
    assert rows, "the README's settings table was not found"
    unknown = sorted(set(rows) - set(conf.DEFAULTS))
    assert not unknown, f"README lists keys that do not exist: {unknown}"
    wrong = {
        key: (shown, conf.DEFAULTS[key])
        for key, shown in rows.items()
        if ast.literal_eval(shown) != conf.DEFAULTS[key]
    }
    assert not wrong, f"README defaults differ from the code (README, code): {wrong}"
    elsewhere = ("NEWSLETTER_", "BOUNCE_", "IMAP_", "SITE_URL")
    missing = sorted(k for k in conf.DEFAULTS if k not in rows and not k.startswith(elsewhere))
    assert not missing, f"README's settings table lacks {missing}"


def test_settings_reference_renders_every_key():
    ext = _extension()
    rows = ext.settings_rows()
    assert [name for name, _default, _spec in rows] == list(conf.DEFAULTS)
    assert all(spec is not None for _name, _default, spec in rows)


def test_every_backend_argument_is_documented():
    ext = _extension()
    arguments = ext.backend_keyword_arguments()
    undocumented = [n for n in ext.backend_only_arguments() if n not in ext.BACKEND_ARGUMENTS]
    stale = [n for n in ext.BACKEND_ARGUMENTS if n not in arguments]
    assert not undocumented, f"add to BACKEND_ARGUMENTS in docs/_ext: {undocumented}"
    assert not stale, f"BACKEND_ARGUMENTS documents arguments the backends lack: {stale}"


def test_every_system_check_id_is_documented():
    source = "".join(
        (ROOT / "django_gmail_smtp" / name).read_text() for name in ("checks.py", "celery_setup.py")
    )
    in_code = set(re.findall(r'"django_gmail_smtp\.([EW]\d{3})"', source))
    page = (DOCS / "settings.md").read_text()
    in_docs = set(re.findall(r"^\| `([EW]\d{3})` \|", page, flags=re.M))
    assert in_code, "no check ids found in checks.py"
    assert in_code == in_docs, (
        f"system checks table in docs/settings.md: missing {sorted(in_code - in_docs)}, "
        f"no longer in the code {sorted(in_docs - in_code)}"
    )


# --- troubleshooting -------------------------------------------------------------------------


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r"^## ", (DOCS / page).read_text(), flags=re.M)[1:]
    return {part.splitlines()[0]: part for part in parts}


#: (heading prefix, code, a reply as Gmail sends it, the outbox's outcome in the docs' words)
GMAIL_REPLIES = [
    ("535 5.7.8", 535, "5.7.8 Username and Password not accepted.", "unhealthy"),
    ("534 5.7.9", 534, "5.7.9 Application-specific password required.", "unhealthy"),
    (
        "534 5.7.14",
        534,
        "5.7.14 <https://accounts.google.com/> Please log in via your web browser",
        "unhealthy",
    ),
    ("530 5.7.0", 530, "5.7.0 Must issue a STARTTLS command first.", "retries"),
    ("550 5.4.5", 550, "5.4.5 Daily user sending limit exceeded.", "deferred"),
    ("421 4.x.x", 421, "4.7.0 Try again later, closing connection.", "retries"),
    ("454 4.7.0", 454, "4.7.0 Too many login attempts, please try again later.", "retries"),
    ("452 4.5.3", 452, "4.5.3 Your message has too many recipients.", "`failed`"),
    ("552 5.3.4", 552, "5.3.4 Your message exceeded Google's message size limits.", "`failed`"),
    (
        "553 5.1.3",
        553,
        "5.1.3 The recipient address <a b> is not a valid RFC 5321 address.",
        "`failed`",
    ),
    ("555 5.5.2", 555, "5.5.2 Syntax error.", "`failed`"),
    (
        "421 4.7.28",
        421,
        "4.7.28 Our system has detected an unusual rate of unsolicited mail",
        "retried",
    ),
    (
        "450 4.2.1",
        450,
        "4.2.1 The user you are trying to contact is receiving mail too quickly",
        "retried",
    ),
    ("550 5.7.1", 550, "5.7.1 This message is likely unsolicited mail.", "`failed`"),
]


@pytest.mark.parametrize(("heading", "code", "reply", "outcome"), GMAIL_REPLIES)
def test_troubleshooting_names_what_the_app_does(heading, code, reply, outcome):
    sections = _sections("troubleshooting.md")
    matching = [text for title, text in sections.items() if title.startswith(heading + ":")]
    assert matching, f"docs/troubleshooting.md has no section '## {heading}: ...'"
    section = matching[0]
    error = classify_reply(code, reply, phase="rcpt", account="me@example.com")
    assert f"`{type(error).__name__}`" in section, (
        f"classify_reply gives {type(error).__name__} for {code} {reply[:20]}...; the "
        f"'{heading}' section of docs/troubleshooting.md does not say so"
    )
    assert outcome in section


def test_troubleshooting_covers_invalid_grant():
    sections = _sections("troubleshooting.md")
    [section] = [text for title, text in sections.items() if title.startswith("invalid_grant")]
    assert "`ConsentRequired`" in section
    assert "`needs_consent`" in section


# --- examples --------------------------------------------------------------------------------


def _settings_block(first_line: str) -> str:
    """The ```python block of docs/quickstart.md whose first line is ``first_line``."""
    page = (DOCS / "quickstart.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", page, flags=re.S):
        if block.splitlines()[0].strip() == first_line:
            return block
    raise AssertionError(f"docs/quickstart.md has no ```python block starting {first_line!r}")


SEND_ONE = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.core.mail import send_mail
send_mail("Docs", "The quick start works.", None, ["reader@example.org"])
"""


def _send_with_settings(tmp_path: Path, block: str, sandbox: GmailSandbox, **env: str):
    """Run ``block`` as a settings module (plus the sandbox's server) and send one message."""
    site = tmp_path / "docsite"
    site.mkdir()
    (site / "__init__.py").write_text("")
    base = f"""
        SECRET_KEY = "docs-example-{"x" * 40}"
        INSTALLED_APPS = [
            "django.contrib.auth", "django.contrib.contenttypes", "django_gmail_smtp",
        ]
        DATABASES = {{"default": {{
            "ENGINE": "django.db.backends.sqlite3", "NAME": {str(tmp_path / "db.sqlite3")!r},
        }}}}
        DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
        USE_TZ = True
    """
    sandbox_settings = json.dumps(sandbox.settings())
    (site / "settings.py").write_text(
        textwrap.dedent(base)
        + block
        + f"\nGMAIL_SMTP = {{**globals().get('GMAIL_SMTP', {{}}), **{sandbox_settings}}}\n"
    )
    return subprocess.run(
        [sys.executable, "-c", SEND_ONE],
        cwd=tmp_path,
        env=_child_env(
            DJANGO_SETTINGS_MODULE="docsite.settings",
            PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
            **env,
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS is a Django 6.1 setting")
def test_quickstart_django_61_environ_block_sends(tmp_path):
    block = _settings_block("# settings.py (Django 6.1, with django-environ)")
    with GmailSandbox() as sandbox:
        sandbox.add_user("you@gmail.com", app_password="abcdefghijklmnop")
        result = _send_with_settings(
            tmp_path,
            block,
            sandbox,
            GMAIL_USER="you@gmail.com",
            GMAIL_APP_PASSWORD="abcd efgh ijkl mnop",
            DEFAULT_FROM_EMAIL="you@gmail.com",
        )
        assert result.returncode == 0, result.stderr
        [delivered] = sandbox.wait_for(1, timeout=10)
    assert delivered.user == "you@gmail.com"
    assert delivered.rcpt_tos == ["reader@example.org"]


@pytest.mark.integration
def test_quickstart_django_42_environ_block_sends(tmp_path):
    block = _settings_block("# settings.py (Django 4.2-6.0, with django-environ)")
    with GmailSandbox() as sandbox:
        sandbox.add_user("you@gmail.com", app_password="abcdefghijklmnop")
        result = _send_with_settings(
            tmp_path,
            block + '\nDEFAULT_FROM_EMAIL = "you@gmail.com"\n',
            sandbox,
            EMAIL_URL="smtp+tls://you%40gmail.com:abcdefghijklmnop@smtp.gmail.com:587",
        )
        assert result.returncode == 0, result.stderr
        [delivered] = sandbox.wait_for(1, timeout=10)
    assert delivered.user == "you@gmail.com"


@pytest.mark.integration
def test_sandbox_testing_examples_pass():
    """docs/examples/ (included in docs/sandbox-testing.md) run under pytest-django."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(DOCS / "examples"),
            "-q",
            "-p",
            "no:cacheprovider",
            "--ds=tests.settings",
        ],
        cwd=ROOT,
        env=nested_pytest_env(_child_env(), "docs_examples"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b5 passed\b", result.stdout), result.stdout[-2000:]


# --- the build -------------------------------------------------------------------------------


@pytest.mark.integration
def test_docs_build_without_warnings(tmp_path):
    missing = [name for name in DOCS_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: pip install sphinx myst-parser furo "
            "(the docs extra) to build the documentation"
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-E",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"sphinx -W failed:\n{result.stderr[-6000:]}"
    assert (tmp_path / "html" / "settings.html").exists()
