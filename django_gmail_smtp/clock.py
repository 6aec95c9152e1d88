"""What time is it on the database? One clock for every process that shares it.

Each process has its own clock, and clocks drift: a worker whose clock runs two hours ahead
sees the quota window two hours later than everyone else. Anything that several processes
compare against stored times (the quota window, outbox leases) should read the time from the
database they share instead. :func:`db_now` does that in one query; :class:`DatabaseNow` is the
same reading as a query expression, to fold into a statement the caller runs anyway::

    SenderQuota.objects.filter(pk=pk).annotate(now=DatabaseNow()).values_list("id", "now")

Both give Django's convention for datetimes: aware, in UTC, with ``USE_TZ = True``; naive, in
``TIME_ZONE``, with ``USE_TZ = False``.

Where the time comes from:

- PostgreSQL: ``STATEMENT_TIMESTAMP()``, the start of the current statement (inside a
  transaction, later than any lock an earlier statement waited for);
- MySQL / MariaDB: ``UTC_TIMESTAMP(6)``;
- SQLite: ``julianday('now')``, SQLite's own reading of the machine's clock (the C library's,
  never Python's). An SQLite database is a local file, so every process using it runs on one
  machine and this is that machine's clock: SQLite cannot correct a machine whose clock is
  wrong, but all processes agree;
- any other database: this process's clock (a warning is logged once); keep the clocks of the
  machines in sync (NTP).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import BigIntegerField, Func
from django.db.models.sql import Query
from django.utils import timezone

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models.sql.compiler import SQLCompiler

#: What the ``as_<vendor>`` methods return: SQL without parameters. The parameters are a list,
#: not the tuple django-stubs (Django 6) declares: Django 4.2's lookups ``extend()`` the list
#: an expression returns, and Django 6 accepts either.
_SqlNoParams = tuple[str, list[Any]]

logger = logging.getLogger(__name__)

__all__ = ["DatabaseNow", "db_now", "from_epoch_microseconds"]

EPOCH = datetime(1970, 1, 1, tzinfo=dt_timezone.utc)

# Microseconds since the Unix epoch, in UTC, as an integer: no time zone or driver conversion
# can shift it, whatever the session's time zone or USE_TZ.
_POSTGRESQL = "CAST(EXTRACT(EPOCH FROM STATEMENT_TIMESTAMP()) * 1000000 AS BIGINT)"
_MYSQL = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))"
# julianday('now') counts days; SQLite's 'now' has millisecond resolution, so round to it
# (2440587.5 is the Julian day of the Unix epoch).
_SQLITE = "CAST(ROUND((JULIANDAY('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000"

_warned: set[str] = set()


def from_epoch_microseconds(value: int) -> datetime:
    """Microseconds since the Unix epoch (UTC) as a datetime in Django's convention."""
    moment = EPOCH + timedelta(microseconds=int(value))
    if settings.USE_TZ:
        return moment
    # Naive datetimes are stored and compared as local time in TIME_ZONE (as timezone.now()).
    return timezone.make_naive(moment, timezone.get_default_timezone())


def _process_clock(vendor: str) -> datetime:
    if vendor not in _warned:
        _warned.add(vendor)
        logger.warning(
            "The clock of a %s database cannot be read; using this process's clock instead. "
            "Keep the clocks of every machine that sends mail in sync (NTP).",
            vendor,
        )
    return timezone.now()


class DatabaseNow(Func):
    """The database's current time, as a query expression (see the module's docstring).

    Its value in query results is already a datetime in Django's convention.
    """

    arity = 0
    output_field = BigIntegerField()

    def as_sql(  # type: ignore[override]  # list params: see _SqlNoParams
        self,
        compiler: SQLCompiler,
        connection: BaseDatabaseWrapper,
        function: str | None = None,
        template: str | None = None,
        arg_joiner: str | None = None,
        **extra_context: Any,
    ) -> _SqlNoParams:
        return "NULL", []  # unknown database: the converter falls back to the process clock

    def as_postgresql(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra_context: Any
    ) -> _SqlNoParams:
        return _POSTGRESQL, []

    def as_mysql(
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra_context: Any
    ) -> _SqlNoParams:
        return _MYSQL, []

    def as_sqlite(  # type: ignore[override]  # list params: see _SqlNoParams
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra_context: Any
    ) -> _SqlNoParams:
        return _SQLITE, []

    def get_db_converters(self, connection: Any) -> list[Any]:
        return [*super().get_db_converters(connection), self._to_datetime]

    @staticmethod
    def _to_datetime(value: int | None, expression: Any, connection: Any) -> datetime:
        if value is None:
            return _process_clock(connection.vendor)
        return from_epoch_microseconds(value)


def db_now(using: str = DEFAULT_DB_ALIAS) -> datetime:
    """The current time on database ``using`` (one query), in Django's datetime convention."""
    connection = connections[using]
    compiler = Query(None).get_compiler(connection=connection)
    sql, params = compiler.compile(DatabaseNow())
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {sql}", params)
        (value,) = cursor.fetchone()
    return DatabaseNow._to_datetime(value, None, connection)
