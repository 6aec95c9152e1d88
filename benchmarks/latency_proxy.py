"""A TCP proxy that adds latency: every chunk waits ``delay`` seconds in each direction.

Used by ``benchmarks/celery_send.py`` to put the Gmail sandbox "far away" (25 ms round trip by
default, about what a server in Europe sees to smtp.gmail.com). It works at the TCP level, so
TLS (STARTTLS or implicit) passes through untouched and the sandbox's certificate for 127.0.0.1
still verifies when the client connects to the proxy on 127.0.0.1.

    proxy = LatencyProxy("127.0.0.1", sandbox.port, delay=0.0125)
    port = proxy.start()  # runs its own event loop in a background thread
    ...                   # connect to 127.0.0.1:port
    proxy.stop()

Each chunk is delivered ``delay`` seconds after it arrived (chunks in flight overlap, as on a
real link), in order. Half-closes are forwarded after the data before them.

Run it as a script for a self-check: it times round trips to an echo server with and without
the proxy (``.venv/bin/python benchmarks/latency_proxy.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
import time


class LatencyProxy:
    """Forward TCP connections to ``target_host:target_port``, delaying each direction."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay: float = 0.0125,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self.listen = (host, port)
        self.port: int | None = None
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        where = f"{self.listen[0]}:{self.port}" if self.port else "stopped"
        return f"<LatencyProxy {where} -> {self.target[0]}:{self.target[1]} +{self.delay:g}s>"

    def __enter__(self) -> LatencyProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> int:
        """Start listening (in a background thread); return the port to connect to."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already running")
        # select() takes timeouts in microseconds; epoll (the default) rounds them up to whole
        # milliseconds, which made each 12.5 ms wait about 14 ms.
        loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self._thread.start()
        started.wait()
        future = asyncio.run_coroutine_threadsafe(self._listen(), loop)
        self.port = future.result(10)
        return self.port

    def stop(self) -> None:
        """Stop listening and drop every open connection. Safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None
        self.port = None

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        return self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # --- forwarding ---------------------------------------------------------------------------
    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ):
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        upstream_writer = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            for writer in (client_writer, upstream_writer):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer),
                self._pipe(upstream_reader, client_writer),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio's stream callback logs a cancelled handler)
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, delivering each chunk ``delay`` after it arrived, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # end of stream: forward the half-close
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except OSError:
                    data = b""
                queue.put_nowait((loop.time() + self.delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()


def _self_check(delay: float = 0.0125, rounds: int = 20) -> None:
    """Time round trips to a local echo server directly and through the proxy."""

    def echo_server() -> tuple[socket.socket, int]:
        server = socket.create_server(("127.0.0.1", 0))

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    while chunk := conn.recv(65536):
                        conn.sendall(chunk)

        threading.Thread(target=serve, daemon=True).start()
        return server, server.getsockname()[1]

    def rtt(port: int) -> float:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            samples = []
            for i in range(rounds):
                started = time.perf_counter()
                sock.sendall(b"ping %d\n" % i)
                sock.recv(100)
                samples.append(time.perf_counter() - started)
        return sorted(samples)[len(samples) // 2]

    server, port = echo_server()
    try:
        direct = rtt(port)
        with LatencyProxy("127.0.0.1", port, delay=delay) as proxy:
            assert proxy.port is not None
            proxied = rtt(proxy.port)
    finally:
        server.close()
    print(f"median round trip, direct:        {direct * 1000:7.2f} ms")
    print(f"median round trip, through proxy: {proxied * 1000:7.2f} ms ({delay:g} s each way)")


if __name__ == "__main__":
    _self_check()
