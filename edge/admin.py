"""The operations listener: ``/healthz``, ``/readyz``, ``/view`` (and ``/metrics`` when enabled).

It runs on its own address, never on an instance-facing one.  Liveness is
trivial; readiness asks the parts that can be unready (a view is loaded and
young enough, the gateway is not shutting down).

Its connections are the metadata listeners' HTTP/1.1 protocol with an admin
handler, so the same limits hold with the same code: the target and header
block sizes and the head timeout of ``[metadata]``, and ``admin.max_connections``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from edge.config import Config
from edge.lifecycle import Service
from edge.metadata.handler import Request
from edge.metadata.identify import Peer, TrustedProxies
from edge.metadata.protocol import Listeners, MetadataProtocol, ProtocolLimits
from edge.metrics import Metrics, NullTally
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
        self.services: Sequence[Service] = ()
        """The services of this process (a single-process gateway's): each must be listening."""
        self.starting = False
        """Set while the process is still starting: a SIGTERM then leaves at once, without the
        drain a ready gateway owes its routers, so it must not say it is ready."""

    def problems(self, now: float | None = None) -> list[str]:
        problems = []
        if self.shutting_down:
            problems.append("shutting down")
        if self.starting:
            problems.append("starting")
        if self.workers_serving is not None and self.workers_serving() == 0:
            problems.append("no worker is serving")
        problems += [f"{service.name} is not listening" for service in self.services if not service.ready]
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


class AdminHandler:
    """The admin routes as a handler of the HTTP connection protocol (what MetadataHandler is to metadata)."""

    def __init__(self, routes: AdminRoutes) -> None:
        self.routes = routes

    def answer(self, snapshot: object, peer: Peer, request: Request, now: float | None, mono: float | None) -> bytes:
        method = request.method.decode("latin-1")
        status, content_type, body = self.routes.answer(method, request.target.decode("latin-1"))
        keep_alive = request.keep_alive
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()
        return head if method == "HEAD" else head + body


_REFUSED = ("connections_refused", "admin")


def admin_limits(config: Config) -> ProtocolLimits:
    """The metadata listeners' limits, with the admin listener's own connection cap."""
    metadata, cap = config.metadata, config.admin.max_connections
    return ProtocolLimits(metadata.header_timeout, True, metadata.max_url_bytes, metadata.max_header_bytes,
                          max_connections=cap, max_connections_per_source=cap)


class AdminListener(Listeners, Service):
    """The admin listener: the metadata HTTP/1.1 connection protocol with :class:`AdminHandler`,
    under :func:`admin_limits`, on ``admin.listen``."""

    name = "admin"

    def __init__(self, config: Config, routes: AdminRoutes) -> None:
        super().__init__(admin_limits(config), routes.store, TrustedProxies(()), NullTally("admin"))
        # The connection protocol calls only answer(), which AdminHandler has with the same signature.
        self.handler = AdminHandler(routes)  # type: ignore[assignment]
        self.listen = config.admin.listen
        self.server: asyncio.Server | None = None

    def reload(self, config: Config) -> None:
        """New limits for the connections that follow (and the head timeout for all)."""
        self.limits = admin_limits(config)

    async def start(self, reuse_port: bool = False) -> None:
        """Listen on ``admin.listen`` (one process of a gateway holds it: never a shared port)."""
        if self.listen is None:
            return
        factory = functools.partial(MetadataProtocol, self, "")
        self.server = await asyncio.get_running_loop().create_server(factory, self.listen.host, self.listen.port,
                                                                     reuse_address=True)
        self.start_ticker()

    @property
    def ready(self) -> bool:
        return self.server is not None and not self.stopping

    @property
    def refused_connections(self) -> int:
        return self.tally.events.get(_REFUSED, 0)

    @refused_connections.setter
    def refused_connections(self, count: int) -> None:
        # Kept where a scrape reads it (edge_connections_refused_total{protocol="admin"}): the admin
        # listener has no periodic export of its own.
        self.tally.events[_REFUSED] = count

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self.server.sockets) if self.server is not None else ()

    async def stop(self, grace: float) -> None:
        """Operators' requests are short: no drain (``grace`` is for the instance-facing listeners)."""
        self.close()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        self.stop_ticker()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()


async def start_admin(config: Config, routes: AdminRoutes, metrics: Metrics | None = None) -> AdminListener | None:
    listen = config.admin.listen
    if listen is None:
        return None
    listener = AdminListener(config, routes)
    if metrics is not None:
        metrics.adopt(listener.tally)
    await listener.start()
    return listener
