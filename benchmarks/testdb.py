"""The benchmarks' throw-away database: created like Django's test runner creates one, with the
aliases that mirror "default" pointed at it, and destroyed afterwards (Django set up first)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def test_database(
    sqlite_file: Path | str, name: str, *, log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """A new test database: the file ``sqlite_file`` on SQLite, else
    ``test_gmail_smtp_bench_<name>_<pid>`` on the configured server. ``log``: told when it is
    created and destroyed."""
    from django.db import connection, connections
    from django.test.utils import setup_test_environment, teardown_test_environment

    def say(text: str) -> None:
        if log is not None:
            log(text)

    test_settings = connection.settings_dict.setdefault("TEST", {})
    if connection.vendor == "sqlite":
        test_settings["NAME"] = str(sqlite_file)
    else:
        test_settings["NAME"] = f"test_gmail_smtp_bench_{name}_{os.getpid()}"
    setup_test_environment()
    say("Creating the test database...")
    old_name = connection.creation.create_test_db(
        verbosity=0, autoclobber=True, serialize=False, keepdb=False
    )
    for alias in connections:  # aliases that mirror "default" in tests (TEST MIRROR) too
        if connections[alias].settings_dict.get("TEST", {}).get("MIRROR") == "default":
            connections[alias].creation.set_as_test_mirror(connection.settings_dict)
    try:
        yield
    finally:
        say("Destroying the test database...")
        connection.close()
        connection.creation.destroy_test_db(old_name, verbosity=0, keepdb=False)
        teardown_test_environment()


def database_label() -> str:
    """Which database the benchmark ran on, for its report."""
    from django.db import connection

    settings_dict = connection.settings_dict
    if connection.vendor == "postgresql":
        connection.ensure_connection()
        version = connection.connection.info.server_version
        where = f"{settings_dict.get('HOST') or 'socket'}:{settings_dict.get('PORT') or 5432}"
        name = settings_dict["NAME"]
        return f"PostgreSQL {version // 10000}.{version % 10000} at {where}, db {name}"
    import sqlite3

    return f"SQLite {sqlite3.sqlite_version}, file {settings_dict['NAME']}"
