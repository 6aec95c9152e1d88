"""The per-account connection limit: at most ``CONNECTIONS_PER_ACCOUNT`` connections to one
Gmail account are open at once across the site, whatever the number of worker processes.

Each allowed connection is a :class:`~django_gmail_smtp.models.ConnectionSlot` row in the quota
ledger's database. A worker process takes a free slot (one conditional UPDATE) before it opens
or reuses a connection to the account, renews the slot's lease while it streams that account's
mail, and gives it back when it closes the connection. A process killed while holding a slot
loses it when the lease (``CONNECTION_LEASE``) runs out; the sweeper then starts a stream for
the mail that waited (:func:`django_gmail_smtp.outbox.sweep`).

A process that finds every slot taken leaves its row queued: the holder takes it, since a holder
keeps claiming the account's due rows until none is left, and after giving its slot back looks
once more (and hands what it finds to Celery), so no row waits unseen. The lease is
``CONNECTION_LEASE`` but never longer than ``SENDING_LEASE``.

Row locks work the same on SQLite and PostgreSQL, so no Redis is needed. The lease is measured
by the ledger database's clock (:func:`~django_gmail_smtp.clock.db_now`), the same for every
process, whatever each machine's own clock says.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import Q

from .clock import db_now
from .conf import SettingsLike, get_setting
from .models import ConnectionSlot, normalize_address
from .quota import ledger_db

__all__ = ["Slot", "acquire", "holder_token", "release", "renew"]

_token: tuple[int, str] | None = None


def holder_token() -> str:
    """This process's name as a slot holder (new after a fork: prefork children differ)."""
    global _token
    pid = os.getpid()
    if _token is None or _token[0] != pid:
        _token = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}")
    return _token[1]


@dataclass
class Slot:
    """A slot this process holds: its connection to ``address`` may stay open."""

    address: str
    number: int
    holder: str
    db: str
    #: the priorities its stream sends (None: all); a warm connection keeps to them
    priorities: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"<Slot {self.address} #{self.number} {self.holder}>"


def _lease(seconds: float | None = None) -> timedelta:
    if seconds is None:
        # Never longer than the rows' lease: once the sweeper re-queues a dead stream's rows,
        # the next worker must be able to take the account's connection too.
        seconds = min(float(get_setting("CONNECTION_LEASE")), float(get_setting("SENDING_LEASE")))
    return timedelta(seconds=seconds)


def acquire(
    address: str,
    *,
    holder: str | None = None,
    options: SettingsLike = None,
    lease: float | None = None,
) -> Slot | None:
    """Take a slot of ``address`` (the one this process holds already, else a free one, else
    one whose lease ran out); None when all ``CONNECTIONS_PER_ACCOUNT`` are held by others."""
    address = normalize_address(address)
    holder = holder or holder_token()
    db = ledger_db(options)
    count = int(get_setting("CONNECTIONS_PER_ACCOUNT"))
    now = db_now(db)
    slots = ConnectionSlot.objects.using(db).filter(address=address, number__lt=count)
    for _try in range(2):
        # With one slot per account (the default) a single UPDATE decides.
        mine = (
            slots.filter(holder=holder).values_list("number", flat=True).first()
            if count > 1
            else None
        )
        numbers = [mine] if mine is not None else range(count)
        for number in numbers:
            taken = (
                slots.filter(number=number)
                .filter(Q(holder=holder) | Q(holder="") | Q(lease_expires_at__lt=now))
                .update(holder=holder, lease_expires_at=now + _lease(lease))
            )
            if taken:
                return Slot(address, number, holder, db)
        if mine is not None or slots.count() >= count:
            return None
        # First use of this account (or a higher CONNECTIONS_PER_ACCOUNT): create its rows.
        try:
            with transaction.atomic(using=db):
                ConnectionSlot.objects.using(db).bulk_create(
                    [ConnectionSlot(address=address, number=n) for n in range(count)],
                    ignore_conflicts=True,
                )
        except IntegrityError:
            pass
    return None


def renew(slot: Slot, *, lease: float | None = None) -> bool:
    """Extend the lease; False when the slot was lost (taken over after its lease ran out)."""
    return bool(
        ConnectionSlot.objects.using(slot.db)
        .filter(address=slot.address, number=slot.number, holder=slot.holder)
        .update(lease_expires_at=db_now(slot.db) + _lease(lease))
    )


def release(slot: Slot) -> None:
    """Give the slot back (its connection is closed, or about to be)."""
    ConnectionSlot.objects.using(slot.db).filter(
        address=slot.address, number=slot.number, holder=slot.holder
    ).update(holder="", lease_expires_at=None)


def held(address: str, *, options: SettingsLike = None) -> int:
    """How many slots of ``address`` are held now (by live leases)."""
    count = int(get_setting("CONNECTIONS_PER_ACCOUNT"))
    db = ledger_db(options)
    return (
        ConnectionSlot.objects.using(db)
        .filter(
            address=normalize_address(address),
            number__lt=count,
            lease_expires_at__gte=db_now(db),
        )
        .exclude(holder="")
        .count()
    )


def expire(options: SettingsLike = None) -> int:
    """Free slots whose lease ran out (their holder died); return how many."""
    db = ledger_db(options)
    return (
        ConnectionSlot.objects.using(db)
        .exclude(holder="")
        .filter(lease_expires_at__lt=db_now(db))
        .update(holder="", lease_expires_at=None)
    )
