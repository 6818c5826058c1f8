"""The operations listener: ``/healthz``, ``/readyz``, ``/view`` (and ``/metrics`` when enabled).

It runs on its own address, never on an instance-facing one.  Liveness is
trivial; readiness asks the parts that can be unready (a view is loaded and
young enough, the gateway is not shutting down).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httptools

from edge.config import Config
from edge.redact import redact
from edge.view.store import ViewStore

log = logging.getLogger("edge.admin")

Body = tuple[int, str, bytes]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
            503: "Service Unavailable"}


class Readiness:
    """Whether this gateway should receive traffic, and if not, why."""

    def __init__(self, store: ViewStore, max_view_age: float = 0.0,
                 workers_serving: Callable[[], int] | None = None) -> None:
        self.store = store
        self.max_view_age = max_view_age
        self.shutting_down = False
        self.workers_serving = workers_serving

    def problems(self, now: float | None = None) -> list[str]:
        problems = []
        if self.shutting_down:
            problems.append("shutting down")
        if self.workers_serving is not None and self.workers_serving() == 0:
            problems.append("no worker is serving")
        if self.store.current is None:
            problems.append("no view loaded")
        elif self.max_view_age > 0:
            confirmed = self.store.status.confirmed_at or self.store.status.loaded_at or 0.0
            age = (time.time() if now is None else now) - confirmed
            if age > self.max_view_age:
                problems.append(f"view is {age:.0f}s old (max_view_age {self.max_view_age:g}s)")
        return problems


def view_summary(store: ViewStore, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    status = store.status
    snapshot = store.current
    return {
        "ready": snapshot is not None,
        "serial": snapshot.serial if snapshot else None,
        "version": (snapshot.view.version or None) if snapshot else None,
        "generated": snapshot.view.generated if snapshot else None,
        "loaded_at": status.loaded_at,
        "loaded_from": status.loaded_from or None,
        "age": None if status.loaded_at is None else round(now - status.loaded_at, 3),
        "confirmed_at": status.confirmed_at,
        "source": redact(status.source),
        "counts": snapshot.counts() if snapshot else {},
        "last_poll_at": status.last_poll_at,
        "last_poll_result": status.last_poll_result or None,
        "last_poll_error": redact(status.last_error) or None,
        "consecutive_failures": status.consecutive_failures,
        "state_write_error": status.state_write_error or None,
    }


class AdminRoutes:
    def __init__(self, store: ViewStore, readiness: Readiness,
                 metrics: Callable[[], tuple[str, bytes]] | None = None) -> None:
        self.store = store
        self.readiness = readiness
        self.metrics = metrics

    def answer(self, method: str, path: str) -> Body:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            problems = self.readiness.problems()
            if problems:
                return 503, "text/plain", ("not ready: " + "; ".join(problems) + "\n").encode()
            return 200, "text/plain", b"ready\n"
        if path == "/view":
            return 200, "application/json", json.dumps(view_summary(self.store), indent=1).encode() + b"\n"
        if path == "/metrics" and self.metrics is not None:
            content_type, body = self.metrics()
            return 200, content_type, body
        return 404, "text/plain", b"not found\n"


class _AdminProtocol(asyncio.Protocol):
    """HTTP/1.1 for a handful of operator requests: simple, not tuned."""

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(400, "text/plain", b"bad request\n", keep_alive=False, head=False)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        status, content_type, body = self.routes.answer(method, self.url.decode("latin-1"))
        self.url = b""
        self._send(status, content_type, body, keep_alive=self.parser.should_keep_alive(), head=method == "HEAD")

    def _send(self, status: int, content_type: str, body: bytes, keep_alive: bool, head: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head_bytes = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                      f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()
        self.transport.write(head_bytes if head else head_bytes + body)
        if not keep_alive:
            self.transport.close()


async def start_admin(config: Config, routes: AdminRoutes) -> asyncio.AbstractServer | None:
    listen = config.admin.listen
    if listen is None:
        return None
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _AdminProtocol(routes), listen.host, listen.port, reuse_address=True)
