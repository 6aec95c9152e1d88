"""An embedded Celery broker in a folder, safe for many processes: ``atomicfs://``.

The tests and the demo need a broker without a server. kombu's ``filesystem://`` transport is
one, but it is not safe between processes (kombu 5.7):

* a producer creates the message file, then locks it, then writes it, and a consumer lists the
  folder and reads files without taking the lock, so it can read a file that is still empty or
  half written: the worker dies with ``JSONDecodeError`` and the message, already removed from
  the folder, is lost;
* the exchange table is rewritten in place, truncated before its lock is taken, so a publish
  that races a worker's ``queue_bind`` can read an empty table and the message is routed to no
  queue, silently;
* a taken message is moved to the system temporary folder, which is a copy, not an atomic
  rename, when that folder is on another file system.

This transport keeps kombu's folder layout and options but writes every file in a private
temporary name and ``os.replace()``\\s it into place, so a reader sees a whole file or none;
takes a message by reading it and then unlinking it (exactly one consumer's unlink succeeds);
and moves a file that cannot be decoded to ``<data folder>/corrupt/`` with an error in the log
instead of crashing the worker. Select it with a broker URL::

    import django_gmail_smtp.testing.broker  # registers the atomicfs:// scheme with kombu

    CELERY_BROKER_URL = "atomicfs://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {"data_folder_in": path, "data_folder_out": path}

(``data_folder_in`` and ``data_folder_out`` name the same folder for a broker that producers and
workers share; ``control_folder`` defaults to ``<data folder>/control``.) Every process that
connects must import this module first, which a settings module that names the URL does.

It is a broker for tests and development: messages a worker has taken but not yet acknowledged
live in that worker's memory, as with kombu's own filesystem and memory transports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem, virtual
from kombu.utils.json import dumps, loads

__all__ = ["SCHEME", "Channel", "Transport"]

logger = logging.getLogger(__name__)

#: The URL scheme of this transport (``atomicfs://``), registered with kombu on import.
SCHEME = "atomicfs"

#: A message file that cannot be decoded is left alone for this many seconds, in case a writer
#: that does not write atomically (kombu's own filesystem transport) is still writing it.
INCOMPLETE_GRACE = 5.0

_TMP_FOLDER = ".tmp"  # starts with "." and has no ".msg" suffix: never taken for a message
_CORRUPT_FOLDER = "corrupt"


def write_atomically(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``folder/name`` so that no reader ever sees part of it."""
    tmp_folder = folder / _TMP_FOLDER
    tmp_folder.mkdir(parents=True, exist_ok=True)
    tmp = tmp_folder / f"{uuid.uuid4().hex}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        target = folder / name
        os.replace(tmp, target)  # same folder tree, so same file system: atomic
        return target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) across processes."""
    # Unbuffered: the file is only locked, never read or written.
    with open(path, "a+b", buffering=0) as file:
        filesystem.lock(file, filesystem.LOCK_EX)  # type: ignore[attr-defined]  # not in kombu-stubs
        try:
            yield
        finally:
            filesystem.unlock(file)


class Channel(filesystem.Channel):
    """kombu's filesystem channel with atomic writes, atomic takes and corrupt-file handling."""

    # -- messages --------------------------------------------------------------------------------

    # kombu's filesystem channel's signature; kombu-stubs mark it as an incompatible override
    # of the virtual channel's _put(queue, message) too (argument name and type).
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        # Zero-padded wall-clock nanoseconds: names sort in publishing order across processes.
        name = f"{time.time_ns():020d}_{uuid.uuid4().hex}.{queue}.msg"
        try:
            write_atomically(Path(self.data_folder_out), name, dumps(payload).encode())
        except OSError as exc:
            raise ChannelError(
                f"Cannot add a message to {self.data_folder_out!r}: {exc}. "
                "Check that the broker folder exists and is writable."
            ) from exc

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        # ``timeout`` is part of kombu's channel interface; a folder is never waited on.
        folder = Path(self.data_folder_in)
        wanted = f"{queue}.msg"
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            raise Empty() from None
        for name in names:
            if name.partition(".")[2] != wanted:
                continue
            payload = self._take(folder / name)
            if payload is not None:
                return payload
        raise Empty()

    def _take(self, path: Path) -> dict[str, Any] | None:
        """The message in ``path``, removed from the queue; None if another consumer took it
        first, or if the file is not a message (then it is set aside)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None  # another consumer took it
        except OSError as exc:
            raise ChannelError(f"Cannot read message file {str(path)!r}: {exc}") from exc
        try:
            payload = loads(data.decode())
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._set_aside(path, exc)
            return None
        # Whoever removes the file owns the message: exactly one consumer's unlink succeeds.
        try:
            if self.store_processed:
                processed = Path(self.processed_folder)
                processed.mkdir(parents=True, exist_ok=True)
                os.rename(path, processed / path.name)
            else:
                path.unlink()
        except FileNotFoundError:
            return None
        return payload

    def _set_aside(self, path: Path, error: Exception) -> None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        if age < INCOMPLETE_GRACE:
            return  # maybe still being written by a non-atomic writer: look again later
        corrupt = path.parent / _CORRUPT_FOLDER
        corrupt.mkdir(exist_ok=True)
        try:
            os.rename(path, corrupt / path.name)
        except FileNotFoundError:
            return  # another consumer set it aside
        logger.error(
            "The broker message file %s is not a valid message (%s); it was moved to %s so "
            "the worker can go on. Inspect it, and delete it once you know why it was written.",
            path.name,
            error,
            corrupt,
        )

    def _purge(self, queue: str) -> int:
        folder = Path(self.data_folder_in)
        wanted = f"{queue}.msg"
        count = 0
        for name in os.listdir(folder):
            if name.partition(".")[2] == wanted:
                try:
                    (folder / name).unlink()
                except FileNotFoundError:
                    continue  # taken by a consumer meanwhile
                count += 1
        return count

    # -- exchange tables -------------------------------------------------------------------------
    # Read without a lock (every write is an atomic replace); changed under an exclusive lock
    # on a separate lock file, so two binds never lose one another's entry.

    @property
    def control_folder(self) -> Path:
        options = self.transport_options
        default = Path(options.get("data_folder_in", "data_in")) / "control"
        return Path(options.get("control_folder", default))

    def _table_file(self, exchange: str) -> Path:
        """The exchange table's file (kombu's name for it, which also validates ``exchange``)."""
        return self._exchange_file(exchange)  # type: ignore[attr-defined]  # not in kombu-stubs

    # The return type is kombu's filesystem channel's, which kombu-stubs also mark as an
    # incompatible override of the virtual channel's list[tuple[str, str, str]].
    def get_table(self, exchange: str) -> list[filesystem.exchange_queue_t]:  # type: ignore[override]
        file = self._table_file(exchange)
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot read the exchange table {str(file)!r}: {exc}") from exc
        try:
            return [filesystem.exchange_queue_t(*entry) for entry in loads(data)]
        except (ValueError, TypeError) as exc:
            raise ChannelError(
                f"The exchange table {str(file)!r} is damaged ({exc}). Stop the workers, delete "
                "it and restart them: they declare their queues again."
            ) from exc

    def _update_table(self, exchange: str, change: Any) -> None:
        file = self._table_file(exchange)
        self.control_folder.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive_lock(self.control_folder / f".{file.name}.lock"):
                table = self.get_table(exchange)
                new = change(list(table))
                if new != table:
                    write_atomically(self.control_folder, file.name, dumps(new).encode())
        except OSError as exc:
            raise ChannelError(f"Cannot update the exchange table {str(file)!r}: {exc}") from exc

    def queue_bind(
        self, queue: str, exchange: str | None = None, routing_key: str = "", *args, **kwargs
    ) -> None:
        exchange = exchange or "amq.direct"
        if self.state.has_binding(queue, exchange, routing_key):
            # Bound earlier by this process, but the folder may have been emptied since: a
            # table without the entry would route the queue's messages nowhere.
            meta = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, None)
            # kombu-stubs give prepare_bind() 4 items; it returns (routing_key, pattern, queue).
            self._queue_bind(exchange, *meta)  # type: ignore[call-arg]
            return
        super().queue_bind(queue, exchange, routing_key, *args, **kwargs)

    def _lookup(
        self, exchange: str, routing_key: str, default: str | None = None
    ) -> list[str] | set[str]:
        queues = super()._lookup(exchange, routing_key, default)
        if not queues:
            logger.warning(
                "A message for exchange %r with routing key %r matched no queue and was "
                "dropped: declare the queue (start a worker for it) before sending to it.",
                exchange,
                routing_key,
            )
        return queues

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._update_table(exchange, lambda table: table if entry in table else [entry, *table])

    def _delete(self, queue: str, exchange: str, routing_key: str, pattern: str, *args, **kwargs):
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._update_table(exchange, lambda table: [e for e in table if e != entry])


class Transport(filesystem.Transport):
    """The ``atomicfs://`` transport (see the module's docstring)."""

    Channel = Channel
    driver_name = SCHEME

    #: Bindings each process has declared, per broker folder (kombu keeps one per class).
    _states: dict[str, virtual.BrokerState] = {}

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options
        folder = os.path.abspath(options.get("data_folder_in", "data_in"))
        self.state = self._states.setdefault(folder, virtual.BrokerState())
        for option in ("data_folder_in", "data_folder_out"):
            if folder := client.transport_options.get(option):
                os.makedirs(folder, exist_ok=True)


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
