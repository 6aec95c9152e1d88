"""The README's install instructions, followed word for word on a new site.

For each supported Django line (6.1 with ``MAILERS``; 4.2 with ``EMAIL_BACKEND``): build the
wheel, install it into a clean virtualenv (no aiosmtpd, no django-environ), run
``django-admin startproject``, append the README's settings block for that Django, migrate and
send a password reset through the sandbox, all with deprecation warnings turned into errors.

It creates virtualenvs and installs packages from the package index, so it runs only when
``GMAIL_SMTP_INSTALL_TESTS=1`` (``.ci/run`` sets it in a step of its own).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from django_gmail_smtp.testing import GmailSandbox

from .processes import nested_pytest_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("GMAIL_SMTP_INSTALL_TESTS") != "1",
        reason="builds the wheel and installs it into new virtualenvs: set "
        "GMAIL_SMTP_INSTALL_TESTS=1 to run it (.ci/run does)",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
WARNINGS_AS_ERRORS = ["-W", "error::DeprecationWarning", "-W", "error::PendingDeprecationWarning"]
USER = "you@gmail.com"
APP_PASSWORD = "abcdefghijklmnop"


def readme_block(first_line: str) -> str:
    """The fenced Python block of README.md whose first line is ``first_line``."""
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S):
        if block.splitlines()[0].strip() == first_line:
            return block
    raise AssertionError(f"README.md has no ```python block starting with {first_line!r}")


def find_python(minors: tuple[int, ...]) -> str | None:
    """A Python 3.X interpreter for one of ``minors`` (PATH, then pyenv's installs)."""
    candidates = [f"python3.{m}" for m in minors]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for minor in minors:
        candidates += sorted(str(p) for p in pyenv_root.glob(f"versions/3.{minor}.*/bin/python3"))
    for candidate in candidates:
        path = shutil.which(candidate) or (candidate if Path(candidate).exists() else None)
        if path and subprocess.run([path, "-V"], capture_output=True).returncode == 0:
            return path
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (built,) = out.glob("django_gmail_smtp-*.whl")
    return built


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.mark.parametrize(
    ("django", "pythons", "block"),
    [
        ("Django>=6.1,<6.2", (13, 12), "# settings.py (Django 6.1)"),
        ("Django>=4.2,<5.0", (12, 11, 10), "# settings.py (Django 4.2 to 6.0)"),
    ],
    ids=["django-6.1", "django-4.2"],
)
def test_readme_install_sends_a_password_reset(wheel, tmp_path, django, pythons, block):
    python = find_python(pythons)
    if python is None:
        pytest.skip(f"no Python 3.{pythons[0]} here for {django}")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTHON"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel), django], tmp_path, env)

    # What a user's site gets: nothing of the sandbox or of the example project's tooling.
    probe = "import importlib.util as u; print(u.find_spec('aiosmtpd'), u.find_spec('environ'))"
    assert run([str(bin_dir / "python"), "-c", probe], tmp_path, env).split() == ["None", "None"]
    # The sandbox without its extra: an error that names the extra to install.
    sandbox_import = subprocess.run(
        [str(bin_dir / "python"), "-c", "import django_gmail_smtp.testing"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert sandbox_import.returncode != 0
    assert "pip install 'django-gmail-smtp[sandbox]'" in sandbox_import.stderr

    run([str(bin_dir / "django-admin"), "startproject", "mysite", str(tmp_path)], tmp_path, env)
    settings_py = tmp_path / "mysite" / "settings.py"
    with GmailSandbox() as sandbox:
        sandbox.add_user(USER, app_password=APP_PASSWORD)
        sandbox_settings = {k: v for k, v in sandbox.settings().items() if k != "TOKEN_URI"}
        settings_py.write_text(
            settings_py.read_text()
            + "\n"
            + readme_block(block)
            + f"\n# The test's stand-in for smtp.gmail.com\nGMAIL_SMTP = {sandbox_settings!r}\n"
        )
        urls_py = tmp_path / "mysite" / "urls.py"  # the site's password-reset views
        urls_py.write_text(
            urls_py.read_text() + "\nfrom django.urls import include\n\n"
            'urlpatterns += [path("accounts/", include("django.contrib.auth.urls"))]\n'
        )
        env.update(GMAIL_USER=USER, GMAIL_APP_PASSWORD=APP_PASSWORD)
        manage = [str(bin_dir / "python"), *WARNINGS_AS_ERRORS, "manage.py"]
        run([*manage, "migrate", "-v", "0"], tmp_path, env)
        run([*manage, "check", "--fail-level", "ERROR"], tmp_path, env)
        run(
            [
                *manage,
                "shell",
                "-c",
                "from django.contrib.auth.models import User\n"
                "from django.contrib.auth.forms import PasswordResetForm\n"
                "User.objects.create_user('alice', 'alice@example.com', 'x')\n"
                "form = PasswordResetForm({'email': 'alice@example.com'})\n"
                "assert form.is_valid()\n"
                "form.save(domain_override='example.com')\n",
            ],
            tmp_path,
            env,
        )
        (delivered,) = sandbox.wait_for(1)
    assert delivered.user == USER
    assert delivered.rcpt_tos == ["alice@example.com"]
    assert b"Password reset" in delivered.data


def test_sdist_runs_its_own_tests(tmp_path):
    """The sdist carries what its tests need (conftest, settings, helpers, the example
    project), and a test module runs from the unpacked sdist."""
    import tarfile

    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("django_gmail_smtp-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "django_gmail_smtp/py.typed",
        "tests/conftest.py",
        "tests/settings.py",
        "tests/processes.py",
        "tests/celery_app.py",
        "example_project/manage.py",
    ):
        assert needed in names, f"{needed} is missing from the sdist"
    unpacked = next(p for p in tmp_path.iterdir() if p.is_dir())
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_backend.py"],
        cwd=unpacked,
        env=nested_pytest_env(dict(os.environ), "sdist"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def readme_lines(first_line: str) -> list[str]:
    """The lines of README.md's ```python block whose first line is ``first_line``."""
    return readme_block(first_line).splitlines()


def test_readme_newsletters_install(wheel, tmp_path):
    """README's "Newsletters" four lines (and docs/newsletters.md's install steps) on a new
    Django 6.1 site set up as README says (settings block, Celery app): migrate, check, then a
    list, a subscriber from a CSV import, a campaign started and one planner tick, all through
    ``manage.py`` in the clean virtualenv."""
    python = find_python((13, 12))
    if python is None:
        pytest.skip("no Python 3.13 or 3.12 here for Django 6.1")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTHON"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel), "Django>=6.1,<6.2"],
        tmp_path,
        env,
    )
    run([str(bin_dir / "django-admin"), "startproject", "mysite", str(tmp_path)], tmp_path, env)
    site = tmp_path / "mysite"
    settings_py, urls_py = site / "settings.py", site / "urls.py"
    # README's "Newsletters" block: a few lines for settings.py, urls.py and proj/celery.py.
    sections: dict[str, list[str]] = {}
    for line in readme_lines("# settings.py (newsletters)"):
        if line.startswith("# "):
            current = sections.setdefault(line.split()[1], [])
        else:
            current.append(line)
    assert set(sections) == {"settings.py", "urls.py", "proj/celery.py,"}, sections
    # README's "Sending from Celery": the Celery app and proj/__init__.py, word for word.
    celery_block = readme_block(
        "# proj/celery.py: the usual Django Celery app, plus the sweeper's beat entry"
    )
    init_block = readme_block(
        "# proj/__init__.py: load the app when Django starts "
        "(without it, queued mail is never sent)"
    )
    (site / "celery.py").write_text(
        "import os\n\nfrom celery import Celery\n\n"
        'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")\n\n'
        + celery_block.rstrip("\n")
        + "\n"
        + "\n".join(sections["proj/celery.py,"])
        + "\n"
    )
    (site / "__init__.py").write_text(init_block)
    with GmailSandbox() as sandbox:
        sandbox.add_user(USER, app_password=APP_PASSWORD)
        sandbox_settings = {k: v for k, v in sandbox.settings().items() if k != "TOKEN_URI"}
        settings_py.write_text(
            settings_py.read_text()
            + "\n"
            + readme_block("# settings.py (Django 6.1)")
            + f"\n# The test's stand-in for smtp.gmail.com\nGMAIL_SMTP = {sandbox_settings!r}\n"
            + "\n".join(sections["settings.py"])
            + "\n"
        )
        urls_py.write_text(
            urls_py.read_text().replace(
                "from django.urls import path", "from django.urls import include, path"
            )
            + "\n"
            + "\n".join(sections["urls.py"])
            + "\n"
        )
        env.update(GMAIL_USER=USER, GMAIL_APP_PASSWORD=APP_PASSWORD)
        manage = [str(bin_dir / "python"), *WARNINGS_AS_ERRORS, "manage.py"]
        run([*manage, "migrate", "-v", "0"], tmp_path, env)
        run([*manage, "check", "--fail-level", "ERROR"], tmp_path, env)
        # The beat entry README's line adds is in the Celery app's schedule.
        schedule = run(
            [
                str(bin_dir / "python"),
                *WARNINGS_AS_ERRORS,
                "-c",
                "import django; django.setup()\n"
                "from mysite.celery import app\n"
                "app.loader.import_default_modules(); app.finalize()\n"
                "print(sorted(app.conf.beat_schedule))\n",
            ],
            tmp_path,
            {**env, "DJANGO_SETTINGS_MODULE": "mysite.settings"},
        )
        assert "django-gmail-smtp-plan-campaigns" in schedule
        (tmp_path / "readers.csv").write_text("email,name,city\nada@example.net,Ada,London\n")
        run(
            [
                *manage,
                "shell",
                "-c",
                "from django_gmail_smtp.newsletters.models import MailingList, Campaign\n"
                "weekly = MailingList.objects.create(name='Weekly', slug='weekly')\n"
                "Campaign.objects.create(name='Issue 1', mailing_list=weekly,\n"
                "    subject='Hello {{ subscriber.name }}',\n"
                "    text_template='News from {{ city }}')\n",
            ],
            tmp_path,
            env,
        )
        out = run(
            [*manage, "gmail_smtp", "newsletter", "import", "weekly", "readers.csv", "--activate"],
            tmp_path,
            env,
        )
        assert "1" in out, out
        run([*manage, "gmail_smtp", "newsletter", "start", "1", "--yes"], tmp_path, env)
        out = run(
            [
                *manage,
                "shell",
                "-c",
                "from django_gmail_smtp.newsletters.tasks import plan_campaigns\n"
                "from django_gmail_smtp.models import OutboundEmail\n"
                "print('tick', plan_campaigns())\n"
                "row = OutboundEmail.objects.get()\n"
                "print('outbox', row.recipients, row.subject)\n",
            ],
            tmp_path,
            env,
        )
        assert "outbox" in out and "ada@example.net" in out and "Hello Ada" in out, out
        progress = run([*manage, "gmail_smtp", "newsletter", "progress", "1"], tmp_path, env)
        assert "1" in progress, progress
