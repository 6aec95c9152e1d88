"""Quota: may this account send this many recipients now, across every process?

Gmail counts messages and recipients over a rolling 24 hours. The ledger keeps per-minute
buckets per sending address (:class:`~django_gmail_smtp.models.QuotaBucket`), so the window is
at most 1,440 rows whatever the history; buckets older than the window are rolled up into
per-day totals (:class:`~django_gmail_smtp.models.QuotaDay`, for the dashboard) and deleted.

:func:`reserve` is one transaction: it first writes the address's
:class:`~django_gmail_smtp.models.SenderQuota` row (a row lock on PostgreSQL, the database
write lock on SQLite), then sums the window, checks the limits and adds to the current
minute. Every process and machine therefore sees reservations one at a time. SQLite serialises
writers of one file, so it is correct on a single machine only; use PostgreSQL across machines.

The window is measured by the ledger database's clock (:mod:`~django_gmail_smtp.clock`), read
inside the reservation's transaction, never by the clock of the process that reserves: a
process whose clock runs ahead would otherwise see old sends leave the window early, and prune
them. On SQLite that is the clock of the one machine every process runs on.

A share of each account's quota (``RESERVED_SHARE``, default 10%) is kept for transactional
mail: bulk mail may use only the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from django.db import DEFAULT_DB_ALIAS, IntegrityError, transaction
from django.db.models import F, Sum
from django.db.models.functions import TruncDate

from .clock import DatabaseNow, db_now
from .conf import SettingsLike, as_settings, format_time
from .enums import Priority
from .exceptions import QuotaExceeded, TooManyRecipients
from .models import GmailAccount, Limits, QuotaBucket, QuotaDay, SenderQuota, normalize_address

logger = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)
BUCKET = timedelta(minutes=1)
#: buckets older than this are deleted (a little more than the window, for late releases)
KEEP = WINDOW + timedelta(hours=1)

TRANSACTIONAL = Priority.TRANSACTIONAL
BULK = Priority.BULK
PRIORITIES = tuple(Priority)

_clock: Callable[[], datetime] | None = None


def now(options: SettingsLike = None) -> datetime:
    """The quota clock: the ledger database's time, unless a test set one (:func:`set_clock`)."""
    if _clock is not None:
        return _clock()
    return db_now(ledger_db(options))


def set_clock(clock: Callable[[], datetime] | None) -> None:
    """Make the quota window use ``clock`` (tests); ``None`` restores the database's clock."""
    global _clock
    _clock = clock


def _database_time(value: object) -> datetime:
    # DatabaseNow's output_field is a BigIntegerField (what the SQL returns), so django-stubs
    # types its value as int; its converter has made it a datetime by the time we see it.
    return cast(datetime, value)


def _at(database_time: datetime) -> datetime:
    """The ledger's "now": the database's time read in the same statement, or the set clock."""
    return _clock() if _clock is not None else database_time


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _window_floor(moment: datetime) -> datetime:
    # A bucket holds sends in [minute, minute + 1 min); it counts until all of them are 24 h old.
    return moment - WINDOW - BUCKET


@dataclass
class Reservation:
    """Quota held for one message; :meth:`release` gives it back if Gmail did not accept it."""

    quota_id: int
    address: str
    minute: datetime
    messages: int
    recipients: int
    db: str = DEFAULT_DB_ALIAS
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        db = self.db
        QuotaBucket.objects.using(db).filter(quota_id=self.quota_id, minute=self.minute).update(
            messages=F("messages") - self.messages, recipients=F("recipients") - self.recipients
        )


@dataclass(frozen=True)
class QuotaStatus:
    """An account's quota at one moment (see :meth:`GmailAccount.quota_status`)."""

    address: str
    messages_used: int
    messages_limit: int
    recipients_used: int
    recipients_limit: int | None
    per_message_limit: int
    reserved_share: float
    bulk_messages_limit: int
    exhausted_until: datetime | None
    exhausted_reason: str
    next_slot_at: datetime | None
    at: datetime

    @property
    def messages_remaining(self) -> int:
        return max(0, self.messages_limit - self.messages_used)

    @property
    def recipients_remaining(self) -> int | None:
        if self.recipients_limit is None:
            return None
        return max(0, self.recipients_limit - self.recipients_used)

    @property
    def exhausted(self) -> bool:
        return self.exhausted_until is not None


def ledger_db(options: SettingsLike = None) -> str:
    """The database alias the ledger is kept in (``QUOTA_DATABASE``, default "default").

    A reservation is written in its own transaction on this alias. Point it at a second alias
    of the same database when mail is sent inside request transactions (ATOMIC_REQUESTS), so a
    reservation survives the request's rollback and its lock is not held until the request
    ends (a system check warns about this).
    """
    return as_settings(options).quota_database or DEFAULT_DB_ALIAS


def reserved_share(options: SettingsLike = None) -> float:
    """The share of each account's quota kept for transactional mail (validated with the
    settings: a fraction from 0 up to, not including, 1)."""
    return as_settings(options).reserved_share


def _caps(limits: Limits, priority: str, share: float) -> tuple[int, int | None]:
    if priority == BULK:
        bulk = lambda n: math.floor(n * (1 - share))  # noqa: E731
        return bulk(limits.messages), (
            None if limits.recipients is None else bulk(limits.recipients)
        )
    return limits.messages, limits.recipients


class _Head(NamedTuple):
    """The address's ledger row, read under its lock, and the database's time then."""

    quota_id: int
    exhausted_until: datetime | None
    reason: str
    database_time: datetime


def _lock(address: str, db: str) -> _Head:
    """Take the address's ledger lock (creating its row once); return its row and the time."""
    for _attempt in range(2):
        if SenderQuota.objects.using(db).filter(address=address).update(version=F("version") + 1):
            # The database's clock rides along in the read we make anyway: no extra query,
            # and it is read after the lock was granted.
            row = (
                SenderQuota.objects.using(db)
                .filter(address=address)
                .annotate(database_time=DatabaseNow())
                .values_list("id", "exhausted_until", "exhausted_reason", "database_time")
            )
            quota_id, exhausted_until, reason, database_time = row.get()
            return _Head(quota_id, exhausted_until, reason, _database_time(database_time))
        try:
            with transaction.atomic(using=db):
                SenderQuota.objects.using(db).create(address=address)
        except IntegrityError:
            pass  # another process created it first; lock it on the next turn
    raise RuntimeError(f"could not lock the quota ledger of {address}")


def _used(quota_id: int, at: datetime, db: str) -> tuple[int, int]:
    totals = (
        QuotaBucket.objects.using(db)
        .filter(quota_id=quota_id, minute__gt=_window_floor(at))
        .aggregate(m=Sum("messages"), r=Sum("recipients"))
    )
    return totals["m"] or 0, totals["r"] or 0


def _next_slot(
    quota_id: int,
    at: datetime,
    *,
    db: str,
    used: tuple[int, int],
    need: tuple[int, int],
    caps: tuple[int, int | None],
) -> datetime | None:
    """When enough of the window's sends leave it for ``need`` to fit under ``caps``."""
    used_m, used_r = used
    need_m, need_r = need
    cap_m, cap_r = caps
    if need_m > cap_m or (cap_r is not None and need_r > cap_r):
        return None
    buckets = (
        QuotaBucket.objects.using(db)
        .filter(quota_id=quota_id, minute__gt=_window_floor(at))
        .order_by("minute")
        .values_list("minute", "messages", "recipients")
    )
    for minute, messages, recipients in buckets.iterator():
        used_m -= messages
        used_r -= recipients
        if used_m + need_m <= cap_m and (cap_r is None or used_r + need_r <= cap_r):
            return minute + WINDOW + BUCKET
    return at


def message_priority(message: Any, default: str) -> Priority:
    """A message's priority: its ``gmail_priority`` attribute, else ``default``."""
    priority = getattr(message, "gmail_priority", None) or default
    if priority not in PRIORITIES:
        from .exceptions import InvalidMessage

        raise InvalidMessage(
            f"gmail_priority is {priority!r}; use 'transactional' or 'bulk'", phase="quota"
        )
    return Priority(priority)


def _address(account: GmailAccount) -> str:
    return normalize_address(account.email)


def reserve(
    account: GmailAccount,
    recipients: int,
    *,
    priority: str = TRANSACTIONAL,
    options: SettingsLike = None,
) -> Reservation:
    """Atomically check and reserve one message of ``recipients`` recipients for ``account``.

    Raises :class:`QuotaExceeded` (which limit, and when the next slot frees) when it does not
    fit, and :class:`TooManyRecipients` when the message alone exceeds the per-message limit.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
    settings = as_settings(options)
    limits = account.limits()
    address = _address(account)
    if recipients > limits.per_message:
        raise TooManyRecipients(
            f"The message has {recipients} recipients; {address} may send at most "
            f"{limits.per_message} per message, so it was not sent",
            account=address,
            phase="quota",
        )
    caps = _caps(limits, priority, settings.reserved_share)
    db = settings.quota_database
    with transaction.atomic(using=db):
        quota_id, exhausted_until, reason, database_time = _lock(address, db)
        at = _at(database_time)
        if exhausted_until is not None and exhausted_until > at:
            raise QuotaExceeded(
                f"{address} is blocked by Gmail's sending limit until "
                f"{_fmt(exhausted_until)} ({reason or 'Gmail answered 550 5.4.5'})",
                limit="gmail",
                next_slot_at=exhausted_until,
                account=address,
                phase="quota",
            )
        used = _used(quota_id, at, db)
        over = _over(used, (1, recipients), caps)
        if over:
            slot = _next_slot(quota_id, at, db=db, used=used, need=(1, recipients), caps=caps)
            raise QuotaExceeded(
                _over_text(address, over, used, caps, priority, slot),
                limit=over,
                next_slot_at=slot,
                account=address,
                phase="quota",
            )
        minute = _minute(at)
        updated = (
            QuotaBucket.objects.using(db)
            .filter(quota_id=quota_id, minute=minute)
            .update(messages=F("messages") + 1, recipients=F("recipients") + recipients)
        )
        if not updated:
            QuotaBucket.objects.using(db).create(
                quota_id=quota_id, minute=minute, messages=1, recipients=recipients
            )
            # A new minute: roll what has left the window into per-day totals, then drop it.
            # Never past the database's clock, even when a test clock runs ahead of it.
            _roll_up(quota_id, min(at, database_time) - KEEP, db)
    return Reservation(quota_id, address, minute, 1, recipients, db)


def reserve_many(
    account: GmailAccount,
    messages: Sequence[tuple[int, str]],
    *,
    options: SettingsLike = None,
) -> list[Reservation | QuotaExceeded | TooManyRecipients]:
    """Check and reserve several messages of ``account`` in one ledger transaction.

    ``messages``: each one's recipient count and priority, in sending order. Returns, for each,
    its :class:`Reservation` or the error :func:`reserve` would have raised for it (checked in
    order against what the ones before it reserved), so a stream of N messages costs one
    transaction, not N.
    """
    settings = as_settings(options)
    limits = account.limits()
    address = _address(account)
    db = settings.quota_database
    results: list[Reservation | QuotaExceeded | TooManyRecipients] = []
    with transaction.atomic(using=db):
        quota_id, exhausted_until, reason, database_time = _lock(address, db)
        at = _at(database_time)
        blocked = exhausted_until is not None and exhausted_until > at
        used = _used(quota_id, at, db) if not blocked else (0, 0)
        minute = _minute(at)
        added_m = added_r = 0
        for recipients, priority in messages:
            if priority not in PRIORITIES:
                raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
            if recipients > limits.per_message:
                results.append(
                    TooManyRecipients(
                        f"The message has {recipients} recipients; {address} may send at most "
                        f"{limits.per_message} per message, so it was not sent",
                        account=address,
                        phase="quota",
                    )
                )
                continue
            if blocked:
                results.append(
                    QuotaExceeded(
                        f"{address} is blocked by Gmail's sending limit until "
                        f"{_fmt(exhausted_until)} ({reason or 'Gmail answered 550 5.4.5'})",
                        limit="gmail",
                        next_slot_at=exhausted_until,
                        account=address,
                        phase="quota",
                    )
                )
                continue
            caps = _caps(limits, priority, settings.reserved_share)
            now_used = (used[0] + added_m, used[1] + added_r)
            over = _over(now_used, (1, recipients), caps)
            if over:
                slot = _next_slot(
                    quota_id, at, db=db, used=now_used, need=(1, recipients), caps=caps
                )
                results.append(
                    QuotaExceeded(
                        _over_text(address, over, now_used, caps, priority, slot),
                        limit=over,
                        next_slot_at=slot,
                        account=address,
                        phase="quota",
                    )
                )
                continue
            added_m += 1
            added_r += recipients
            results.append(Reservation(quota_id, address, minute, 1, recipients, db))
        if added_m:
            updated = (
                QuotaBucket.objects.using(db)
                .filter(quota_id=quota_id, minute=minute)
                .update(messages=F("messages") + added_m, recipients=F("recipients") + added_r)
            )
            if not updated:
                QuotaBucket.objects.using(db).create(
                    quota_id=quota_id, minute=minute, messages=added_m, recipients=added_r
                )
                _roll_up(quota_id, min(at, database_time) - KEEP, db)
    return results


def _roll_up(quota_id: int, before: datetime, db: str) -> None:
    """Move buckets older than ``before`` into QuotaDay rows (usually one bucket, one day).

    ``before`` is at least ``KEEP`` behind the database's clock, so a bucket in the window
    (or in the future, after a clock went back) is never pruned.
    """
    old = QuotaBucket.objects.using(db).filter(quota_id=quota_id, minute__lt=before)
    days = list(
        old.annotate(day=TruncDate("minute"))
        .values("day")
        .annotate(m=Sum("messages"), r=Sum("recipients"))
        .order_by()
    )
    if not days:
        return
    for row in days:
        updated = (
            QuotaDay.objects.using(db)
            .filter(quota_id=quota_id, day=row["day"])
            .update(messages=F("messages") + row["m"], recipients=F("recipients") + row["r"])
        )
        if not updated:
            QuotaDay.objects.using(db).create(
                quota_id=quota_id, day=row["day"], messages=row["m"], recipients=row["r"]
            )
    old.delete()


def _over(used: tuple[int, int], need: tuple[int, int], caps: tuple[int, int | None]) -> str:
    if used[0] + need[0] > caps[0]:
        return "messages"
    if caps[1] is not None and used[1] + need[1] > caps[1]:
        return "recipients"
    return ""


def _fmt(moment: datetime | None) -> str:
    if moment is None:
        return "never (the message alone is over the limit)"
    return format_time(moment)


def _over_text(
    address: str,
    limit: str,
    used: tuple[int, int],
    caps: tuple[int, int | None],
    priority: str,
    slot: datetime | None,
) -> str:
    index = 0 if limit == "messages" else 1
    share = " (bulk mail may not use the share kept for transactional mail)"
    return (
        f"{address} has used {used[index]} of the {caps[index]} {limit} it may send in 24 hours"
        f"{share if priority == BULK else ''}; the next slot frees at {_fmt(slot)}"
    )


def mark_exhausted(
    account: GmailAccount, reply: str = "", options: SettingsLike = None
) -> datetime:
    """Gmail answered 550 5.4.5: block the account until its window frees; return until when.

    If the ledger shows the account full, it is blocked until the oldest send leaves the
    window; if the ledger shows room (mail was sent outside this app), for 24 hours.
    """
    address = _address(account)
    limits = account.limits()
    db = ledger_db(options)
    with transaction.atomic(using=db):
        quota_id, current, _reason, database_time = _lock(address, db)
        at = _at(database_time)
        used = _used(quota_id, at, db)
        if _over(used, (1, 0), (limits.messages, limits.recipients)):
            until = _next_slot(
                quota_id,
                at,
                db=db,
                used=used,
                need=(1, 0),
                caps=(limits.messages, limits.recipients),
            )
        else:
            until = None
        until = max(until or at + WINDOW, at + BUCKET)
        if current and current > until:
            until = current
        SenderQuota.objects.using(db).filter(pk=quota_id).update(
            exhausted_until=until,
            exhausted_reason=f"Gmail answered {' '.join(reply.split())[:200]}"
            if reply
            else "Gmail answered 550 5.4.5",
        )
    logger.warning("Gmail's sending limit reached for %s; paused until %s", address, until)
    return until


def quota_status(account: GmailAccount, options: SettingsLike = None) -> QuotaStatus:
    """Used and remaining quota of ``account`` now."""
    address = _address(account)
    limits = account.limits()
    share = reserved_share(options)
    db = ledger_db(options)
    row = (
        SenderQuota.objects.using(db)
        .filter(address=address)
        .annotate(database_time=DatabaseNow())
        .values_list("id", "exhausted_until", "exhausted_reason", "database_time")
        .first()
    )
    if row is None:
        quota_id, exhausted_until, reason, at = None, None, "", now(options)
    else:
        quota_id, exhausted_until, reason, database_time = row
        at = _at(_database_time(database_time))
    used = _used(quota_id, at, db) if quota_id else (0, 0)
    if exhausted_until is not None and exhausted_until <= at:
        exhausted_until, reason = None, ""
    caps = (limits.messages, limits.recipients)
    next_slot = None
    if quota_id and used[0]:
        oldest = (
            QuotaBucket.objects.using(db)
            .filter(quota_id=quota_id, minute__gt=_window_floor(at), messages__gt=0)
            .order_by("minute")
            .values_list("minute", flat=True)
            .first()
        )
        next_slot = oldest + WINDOW + BUCKET if oldest else None
    if exhausted_until is None and _over(used, (1, 0), caps) and quota_id:
        exhausted_until = _next_slot(quota_id, at, db=db, used=used, need=(1, 0), caps=caps)
        reason = "the quota ledger is full"
    if exhausted_until is not None:
        next_slot = exhausted_until
    return QuotaStatus(
        address=address,
        messages_used=used[0],
        messages_limit=limits.messages,
        recipients_used=used[1],
        recipients_limit=limits.recipients,
        per_message_limit=limits.per_message,
        reserved_share=share,
        bulk_messages_limit=_caps(limits, BULK, share)[0],
        exhausted_until=exhausted_until,
        exhausted_reason=reason,
        next_slot_at=next_slot,
        at=at,
    )
