"""Runs the Gmail SMTP server: binds the listening socket and serves :class:`GmailSMTP`
sessions on a private asyncio event loop in a daemon thread, so a plain (synchronous) test or
process can start and stop it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from typing import Any

from .smtp import GmailSMTP, ServerConfig
from .state import SandboxState

__all__ = ["ServerThread", "bind_socket"]

logger = logging.getLogger(__name__)


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Clients that refuse our certificate or vanish mid-handshake are expected in tests.
    if isinstance(context.get("exception"), (ssl.SSLError, ConnectionError, TimeoutError)):
        logger.debug("sandbox connection error: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind one listening socket (even for names resolving to several addresses)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ServerThread:
    """Runs the SMTP server on a private event loop in a daemon thread."""

    def __init__(self, config: ServerConfig, state: SandboxState, sock: socket.socket) -> None:
        self._config = config
        self._state = state
        self._sock = sock
        self._live: set[GmailSMTP] = set()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_exception_handler)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="gmail-sandbox-smtp", daemon=True)

    def start(self, timeout: float = 5.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the sandbox SMTP server did not start in time")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def _factory(self) -> GmailSMTP:
        return GmailSMTP(self._config, self._state, self._live, self._loop)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            ssl_context = self._config.tls_context if self._config.security == "ssl" else None
            self._server = loop.run_until_complete(
                loop.create_server(self._factory, sock=self._sock, ssl=ssl_context)
            )
        except BaseException as exc:
            self._error = exc
            self._sock.close()
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for protocol in list(self._live):
            protocol.abort_connection()
        abort_clients = getattr(self._server, "abort_clients", None)  # Python >= 3.13
        if abort_clients is not None:
            abort_clients()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
