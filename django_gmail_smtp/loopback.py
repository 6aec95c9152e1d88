"""A one-shot HTTP server on 127.0.0.1 that receives Google's OAuth redirect (loopback flow)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from django.utils.crypto import constant_time_compare

PAGE = (
    "<!doctype html><meta charset=utf-8><title>django-gmail-smtp</title>"
    "<body style='font-family:sans-serif;margin:3em'><h1>{title}</h1><p>{text}</p>"
)


class LoopbackReceiver:
    """Listen on ``http://127.0.0.1:PORT/`` for the first request carrying ``code`` or
    ``error`` and the ``state`` given to :meth:`expect`; :meth:`wait` returns its query
    parameters (or None on timeout).

    Requests with another state (a forged or stale redirect; any local process or web page
    can reach the port) are answered 400 and ignored, so they cannot end the sign-in.
    """

    def __init__(self, port: int = 0) -> None:
        self._answer: dict[str, str] | None = None
        self._state: str | None = None
        self._event = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                if "code" not in query and "error" not in query:
                    self.send_error(404)
                    return
                if not receiver._matches(query.get("state", "")):
                    self.send_error(
                        400,
                        "Not the sign-in started in the terminal",
                        "This answer does not belong to the sign-in the command is waiting "
                        "for; it was ignored.",
                    )
                    return
                ok = "code" in query
                body = PAGE.format(
                    title="Connected" if ok else "Not connected",
                    text="You can close this tab and return to the terminal."
                    if ok
                    else "Google answered: " + query.get("error", "").replace("<", ""),
                )
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write(body.encode())
                if receiver._answer is None:
                    receiver._answer = query
                    receiver._event.set()

            def log_message(self, format: str, *args: Any) -> None:
                return  # keep the terminal for the command's own words

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self.redirect_uri = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def expect(self, state: str) -> None:
        """Accept only the answer carrying ``state`` (the flow's anti-forgery state)."""
        self._state = state

    def _matches(self, state: str) -> bool:
        return bool(self._state and state) and constant_time_compare(state, self._state or "")

    def wait(self, timeout: float) -> dict[str, str] | None:
        self._event.wait(timeout)
        return self._answer
