"""The test matrix over Python 3.10-3.13 and Django 4.2 / 5.2 / 6.0 / 6.1, and lint.

nox                                              # every session
nox -l                                           # list them
nox -s lint
nox -s "tests(python='3.12', django='5.2')" -- -k routing   # extra arguments go to pytest
"""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
DJANGOS = {
    "4.2": "Django>=4.2,<5.0",
    "5.2": "Django>=5.2,<6.0",
    "6.0": "Django>=6.0,<6.1",
    "6.1": "Django>=6.1a1,<6.2",  # pre-releases until 6.1 is out
}
# The Python versions each Django release supports (of those above).
SUPPORTED = {
    "4.2": {"3.10", "3.11", "3.12"},
    "5.2": {"3.10", "3.11", "3.12", "3.13"},
    "6.0": {"3.12", "3.13"},
    "6.1": {"3.12", "3.13"},
}


@nox.session
@nox.parametrize(
    "python,django",
    [(python, django) for django in DJANGOS for python in PYTHONS if python in SUPPORTED[django]],
)
def tests(session: nox.Session, django: str) -> None:
    """The test suite on one Python / Django pair (DATABASE_URL, REDIS_URL pass through)."""
    session.install("-e", ".[test]", DJANGOS[django])
    session.run("python", "-m", "django", "--version")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff format --check and ruff check."""
    session.install("ruff")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
