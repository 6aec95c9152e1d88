"""Database faults for the tests: a second connection, a lost connection, and recognising the
statement that records a row as sent (shared by the delivery and stream fault tests)."""

from __future__ import annotations

from django.db import OperationalError, connection

from django_gmail_smtp.enums import Status
from django_gmail_smtp.models import OutboundEmail

from .processes import wait_for


def raw_connection():
    """A second, independent connection to the test database (DB-API, autocommit)."""
    raw = connection.get_new_connection(connection.get_connection_params())
    if connection.vendor == "postgresql":
        raw.autocommit = True
    return raw


def kill_connection(conn) -> None:
    """Lose ``conn``'s database connection: PostgreSQL terminates its backend (as an operator
    or a failover does); SQLite, which has no server, gets the driver's error instead."""
    if conn.vendor != "postgresql":
        raise OperationalError("the database connection was lost (simulated)")
    raw = conn.connection
    pid = raw.info.backend_pid if hasattr(raw, "info") else raw.get_backend_pid()
    killer = raw_connection()
    try:
        cursor = killer.cursor()
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])

        def gone() -> bool:  # the backend exits asynchronously
            cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])
            return cursor.fetchone() is None

        wait_for(gone, 10, f"backend {pid} to be terminated")
    finally:
        killer.close()


def marks_sent(sql: str, params) -> bool:
    """The UPDATE that records an outbox row as sent."""
    return (
        sql.lstrip().upper().startswith("UPDATE")
        and OutboundEmail._meta.db_table in sql
        and Status.SENT in (params or ())
    )
