"""The HTTP/1.1 connection: a thin asyncio protocol around the httptools parser.

Parser callbacks only collect, and only the callbacks edge needs are defined
(each one costs a Python call per request); the answer is computed and written
inline when a message is complete (no task per request).  Pipelined requests
are answered in order: while one waits on the slow path, later ones queue and
reading pauses.
Limits (target length, header block, body, slow heads, queue depth) turn into
their protocol answer in :mod:`edge.metadata.responses` and close the
connection; nothing a client sends can grow memory without bound.

The connections of one set of listeners share a :class:`Listeners`: their
:class:`ProtocolLimits`, the open connections counted per source for the
connection caps, and the ticker that closes heads that take too long.  The
metadata service is one; the admin listener is another, with its own handler,
so both enforce the same limits with the same code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httptools

from edge.config import MetadataConfig, hops_by_network
from edge.metadata.fallback import NeedFallback
from edge.metadata.handler import NeedCredentials, Pending, Request, UnknownSource
from edge.metadata.identify import Peer, TrustedProxies, canonical_peer
from edge.metadata.responses import ANSWERS, Outcome
from edge.metrics import Tally

if TYPE_CHECKING:
    from edge.metadata.handler import MetadataHandler
    from edge.view.store import ViewStore

log = logging.getLogger("edge.metadata")

MAX_QUEUED = 64
"""Pipelined requests held while an earlier one waits; more closes the connection."""

_HEADER_FIELDS = {
    b"x-aws-ec2-metadata-token": "token",
    b"x-aws-ec2-metadata-token-ttl-seconds": "token_ttl",
    b"x-forwarded-for": "forwarded_for",
    b"x-edge-network-id": "network_header",
    b"x-neutron-network-id": "network_header",
}
_FIELD_FIRST = frozenset((b"x", b"X"))
_FIELD_LENGTHS = frozenset(len(name) for name in _HEADER_FIELDS)
"""Headers of another first letter or length (Host, User-Agent, Accept-Encoding...) are skipped without
lower-casing them."""
_SINGLE_FIELDS = frozenset(("token", "token_ttl"))
"""Fields a request may carry once: sent twice, neither value is taken (see on_header)."""

_monotonic = time.monotonic
_NEVER = 1 << 62


PEERS_REMEMBERED = 16_384
"""Source addresses whose :class:`Peer` is reused by their next connection; the oldest is forgotten
first, one at a time (a Peer may hold the last reference to an instance of a replaced view, so
dropping thousands at once could stall the loop the way freeing a whole snapshot would)."""


@dataclass(frozen=True, slots=True)
class ProtocolLimits:
    """What a set of listeners allows one client: each breach has its protocol answer (responses.py)."""

    header_timeout: float
    keep_alive: bool
    max_url_bytes: int
    max_header_bytes: int
    max_connections: int
    max_connections_per_source: int
    gateway_hops: int = 0
    """Routed hops from the instances to this gateway, added to an answer's hop limit."""
    gateway_hops_by_network: dict[str, int] = field(default_factory=dict)
    """The same for the listeners of one network, where it differs."""
    max_body_bytes: int = 64 * 1024

    @classmethod
    def of(cls, config: MetadataConfig) -> ProtocolLimits:
        return cls(config.header_timeout, config.keep_alive, config.max_url_bytes, config.max_header_bytes,
                   config.max_connections, config.max_connections_per_source, config.gateway_hops,
                   hops_by_network(config.gateway_hops_by_network))


class Listeners:
    """What the connections of one set of listeners share: limits, open connections, peers, the ticker.

    Subclasses set ``handler`` (whose ``answer`` gives each request's bytes) before connections arrive
    and call :meth:`start_ticker` once the loop runs.
    """

    handler: MetadataHandler

    def __init__(self, limits: ProtocolLimits, store: ViewStore, trusted_proxies: TrustedProxies,
                 tally: Tally) -> None:
        self.limits = limits
        self.store = store
        self.trusted_proxies = trusted_proxies
        self.tally = tally
        """Per-request counts and latencies; the composition root exports them as metrics."""
        self.connections: set[MetadataProtocol] = set()
        self.per_source: dict[str, int] = {}
        """Open connections per source address; the protocol counts them (caps in ``limits``)."""
        self.peers: OrderedDict[str, Peer] = OrderedDict()
        """Socket peer name -> its Peer: an instance opens a connection per request, so its identity
        (and the attachment it last looked up) carry over instead of being rebuilt every time."""
        self.stopping = False
        self._ticker: asyncio.TimerHandle | None = None
        self.tick = 0
        """Incremented by the ticker; connection deadlines are in ticks so requests never read a clock for them."""
        self.idle_deadline = 0
        """The deadline a connection gets when it starts waiting for a request head."""
        # plain counters, exported as metrics by the owner
        self.rejected = 0
        self.timeouts = 0
        self.refused_connections = 0

    def new_peer(self, address: str, network: str) -> Peer:
        """The Peer of a connection from ``address`` (the socket's peer name) to a listener on ``network``;
        remembered for the next connection from the same address."""
        canonical = canonical_peer(address) if ":" in address else address
        proxies = self.trusted_proxies
        peer = Peer(canonical, network, bool(proxies.networks) and canonical in proxies)
        peers = self.peers
        peers[address] = peer
        if len(peers) > PEERS_REMEMBERED:
            peers.popitem(last=False)
        return peer

    def start_ticker(self) -> None:
        """Close connections whose request head is overdue (one timer for all of them)."""
        self.tick += 1
        tick = self.tick
        for connection in [c for c in self.connections if c.deadline < tick]:
            connection.timed_out()
        interval = min(1.0, self.limits.header_timeout / 4)
        # header_timeout .. header_timeout + one interval after the last answer or the connection.
        self.idle_deadline = tick + math.ceil(self.limits.header_timeout / interval)
        self._ticker = asyncio.get_running_loop().call_later(interval, self.start_ticker)

    def stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def close_connections(self, grace: float) -> None:
        """Close idle connections now, let the others finish for ``grace`` seconds, then abort them."""
        self.stopping = True
        for connection in list(self.connections):
            connection.close_if_idle()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()

    async def await_source(self, network: str, address: str) -> None:
        """Wait for a view that knows ``address`` (only listeners that answer from the view wait)."""


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the outcome is on the protocol."""


class LeaveUnanswered(Exception):
    """Raised by a slow step: close the connection without an answer, so the client retries elsewhere."""


class MetadataProtocol(asyncio.Protocol):
    # Slots: a connection is set up for every request of a typical client, so its cost counts.
    __slots__ = ("service", "network", "limits", "handler", "store", "transport", "peer", "parser",
                 "deadline", "closing", "busy", "queue", "slow_task", "counted_source", "_since_progress",
                 "_reject", "_target", "_header_size", "_body_size", "_request", "_has_fields",
                 "writing_paused", "_max_url_bytes", "_max_header_bytes", "_max_body_bytes", "_keep_alive")

    peer: Peer
    """Who is asking; set by connection_made, before any request."""

    def __init__(self, service: Listeners, network: str) -> None:
        # global
        self.service = service
        self.network = network
        limits: ProtocolLimits = service.limits
        self.limits = limits
        self._max_url_bytes = limits.max_url_bytes
        self._max_header_bytes = limits.max_header_bytes
        self._max_body_bytes = limits.max_body_bytes
        self._keep_alive = limits.keep_alive
        """The limits read per request, copied out of ``limits`` (one attribute lookup fewer each)."""
        self.handler = service.handler
        """Reload updates the handler in place, so holding it is safe."""
        self.store = service.store
        # per connection
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.deadline = _NEVER
        """Service tick by which the next request head must be complete (the service ticker checks)."""
        self.closing = False
        self.busy = False
        self.writing_paused = False
        self.queue: deque[Request] | None = None
        """Pipelined requests waiting behind one on the slow path (created when first needed)."""
        self.slow_task: asyncio.Task[None] | None = None
        self.counted_source: str | None = None
        self._since_progress = 0
        """Bytes received since the parser last completed a target or a message: httptools buffers an
        unfinished header line itself, so this is what bounds it."""
        self._reject: Outcome | None = None
        # per request
        self._target = b""
        """The target so far: a request's first (nearly always only) piece is kept as is (b"" + url is url)."""
        self._header_size = 0
        self._body_size = 0
        self._request: Request | None = None
        """Reused for every request answered inline; a request handed to the slow path keeps its own.
        Made when first needed: a request the table of answers takes (on_message_complete) needs none."""
        self._has_fields = False

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        # A stream listener's connections always have a full Transport (the base type is asyncio's
        # signature for every kind of protocol); not typing.cast, a Python call per connection.
        transport: asyncio.Transport = base_transport  # type: ignore[assignment]
        self.transport = transport
        service = self.service
        peername = transport.get_extra_info("peername")
        address = peername[0] if peername else ""
        peer = service.peers.get(address)
        if peer is None or peer.network != self.network:
            peer = service.new_peer(address, self.network)
        self.peer = peer
        # The connection caps are counted here rather than in a service method: this runs once per
        # request for most clients.
        source = peer.address
        per_source = service.per_source
        count = per_source.get(source, 0)
        connections = service.connections
        limits = self.limits
        if len(connections) >= limits.max_connections or count >= limits.max_connections_per_source:
            service.refused_connections += 1
            self.closing = True
            transport.write(ANSWERS[Outcome.THROTTLED].close)
            transport.close()
            return
        per_source[source] = count + 1
        connections.add(self)
        self.counted_source = source
        self.deadline = service.idle_deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        source = self.counted_source
        if source is not None:
            self.counted_source = None
            service = self.service
            service.connections.discard(self)
            per_source = service.per_source
            count = per_source.get(source, 0) - 1
            if count > 0:
                per_source[source] = count
            else:
                per_source.pop(source, None)
        if self.slow_task is not None and not self.slow_task.done():
            self.slow_task.cancel()
        if self.queue:
            self.queue.clear()
        # The parser refers back to this protocol: without that cycle the connection is freed as soon
        # as uvloop lets go of it, instead of by the cycle collector (which would run every few
        # hundred connections).
        del self.parser

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._since_progress += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if self._reject is not None:
                self.fail(self._reject)
            else:
                log.error("metadata request failed peer=%s", self.peer.address,
                          exc_info=exc.__context__)
                self.fail(Outcome.INTERNAL)
            return
        except httptools.HttpParserUpgrade:
            # A request asking to switch protocols (h2c, WebSocket, CONNECT) has been answered as
            # HTTP/1.1 with "Connection: close" (on_message_complete); what follows it is in a protocol
            # edge does not speak, so nothing more is read and nothing else is written.
            if not self.closing and self.transport is not None:
                self.transport.pause_reading()
            return
        except httptools.HttpParserError:
            self.fail(Outcome.BAD_REQUEST)
            return
        if self._since_progress > self._max_header_bytes:
            self.fail(Outcome.HEADERS_TOO_LARGE)

    def pause_writing(self) -> None:
        # A client that pipelines requests without reading the answers stops being read,
        # so its answers cannot pile up in the write buffer.
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.transport is not None and not self.busy and not self.closing:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        # A half-closed client may still be waiting for answers on the slow path.
        return self.busy

    def fail(self, outcome: Outcome) -> None:
        """Answer ``outcome`` (unless an earlier answer is still pending) and close."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.service.rejected += 1
        if not self.busy and not self.queue:
            self.transport.write(ANSWERS[outcome].close)
        self.transport.close()

    def timed_out(self) -> None:
        self.service.timeouts += 1
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def close_if_idle(self) -> None:
        if not self.busy and not self._target and self._header_size == 0 and self.transport is not None:
            self.closing = True
            self.transport.close()

    # -- parser callbacks ------------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        target = self._target = self._target + url
        self._since_progress = 0
        if len(target) > self._max_url_bytes:
            self._reject = Outcome.URL_TOO_LONG
            raise _Reject

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._header_size + len(name) + len(value) + 4
        self._header_size = size
        if size > self._max_header_bytes:
            self._reject = Outcome.HEADERS_TOO_LARGE
            raise _Reject
        if name[:1] in _FIELD_FIRST and len(name) in _FIELD_LENGTHS:
            field = _HEADER_FIELDS.get(name.lower())
            if field is not None:
                request = self._request
                if request is None:
                    request = self._request = Request(b"", b"")
                if field in _SINGLE_FIELDS and getattr(request, field) is not None:
                    # Sent twice, the header has no one meaning: an empty value is refused where it is
                    # used (400 for a token lifetime, 401 for a token), whatever the order.
                    value = b""
                setattr(request, field, value)
                self._has_fields = True

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        self._since_progress = 0
        if self._body_size > self._max_body_bytes:
            self._reject = Outcome.BODY_TOO_LARGE
            raise _Reject

    def on_message_complete(self) -> None:
        self._since_progress = 0
        if self.closing:
            return
        parser = self.parser
        method = parser.get_method()
        target = self._target
        # After a request that asks to switch protocols the parser reads nothing more (data_received):
        # its answer closes the connection.
        keep_alive = (parser.should_keep_alive() and self._keep_alive and not self.service.stopping
                      and not parser.should_upgrade())
        # Per-request state is reset here rather than in on_message_begin: one callback fewer per request.
        self._target = b""
        self._header_size = 0
        if self._body_size:
            self._body_size = 0
        if not self._has_fields and method == b"GET" and not self.busy:
            # A GET with no token or identifying header, from a peer whose answers come down to the rate
            # limit and the rendered answer for the target in the current view (the handler decided, see
            # MetadataHandler.identify): one lookup instead of the handler's checks.
            peer = self.peer
            answers = peer.answers
            # A peer holds answers only once a view is served, and the store never goes back to none.
            if answers is not None and peer.generation == self.store.current.generation:  # type: ignore[union-attr]
                found = answers.get(target)
                if found is not None:
                    started = _monotonic()
                    limited = peer.limited
                    if limited is None or self.handler.limiter.allow(limited, started):
                        data = found.keep_alive if keep_alive else found.close
                    else:
                        data = self.handler.throttle(keep_alive, False)
                    self.send(data, target, keep_alive, started)
                    return
        request = self._request
        if request is None:
            request = self._request = Request(b"", b"")
        request.method = method
        request.target = target
        request.keep_alive = keep_alive
        if self.busy:
            if self.queue is not None and len(self.queue) >= MAX_QUEUED:
                self._reject = Outcome.THROTTLED
                raise _Reject
            if self.queue is None:
                self.queue = deque()
            self.queue.append(request)
            self._request = None
            self._has_fields = False
            return
        if not self.handle(request):
            # The slow path keeps this request: the next one gets its own.
            self._request = None
            self._has_fields = False
        elif self._has_fields or request.hop_limit:
            request.token = request.token_ttl = request.forwarded_for = request.network_header = None
            request.hop_limit = 0
            self._has_fields = False

    # -- answering -------------------------------------------------------------------------------

    def handle(self, request: Request) -> bool:
        """Answer ``request`` now (True), or hand it to the slow path (False): every request read,
        inline from on_message_complete, or later from the queue."""
        request.started = mono = _monotonic()
        result = self.handler.answer(self.store.current, self.peer, request, None, mono)
        if isinstance(result, bytes):
            self.write(result, request)
            return True
        self.wait(request, result)
        return False

    def wait(self, request: Request, pending: Pending) -> None:
        """Stop reading and answer ``request`` on the slow path; later requests queue behind it."""
        self.busy = True
        self.deadline = _NEVER
        assert self.transport is not None
        self.transport.pause_reading()
        self.slow_task = asyncio.get_running_loop().create_task(self.slow(request, pending))

    def write(self, data: bytes, request: Request) -> None:
        if request.hop_limit:
            self.set_hop_limit(request.hop_limit)
        self.send(data, request.target, request.keep_alive, request.started)

    def send(self, data: bytes, target: bytes, keep_alive: bool, started: float) -> None:
        """Write the answer ``data`` to a request for ``target`` complete at ``started``, count it, and
        wait for the next request or close."""
        transport = self.transport
        assert transport is not None
        transport.write(data)
        self.service.tally.http_reply(target, data, started)
        if keep_alive:
            self.deadline = self.service.idle_deadline
        else:
            self.closing = True
            transport.close()

    def set_hop_limit(self, hops: int) -> None:
        # The instance's hop limit counts from the instance (AWS's meaning); the routers between the
        # instances and this gateway each take one more.
        limits = self.limits
        hops = min(hops + limits.gateway_hops_by_network.get(self.network, limits.gateway_hops), 255)
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
                # An IPv4 client on a dual-stack socket is governed by IP_TTL.
                try:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
                except OSError:
                    pass
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
        except OSError as exc:
            log.warning("cannot set hop limit peer=%s error=%s", self.peer.address, exc)

    async def slow(self, request: Request, pending: Pending) -> None:
        service = self.service
        try:
            result: bytes | Pending = pending
            while not isinstance(result, bytes):
                if isinstance(result, UnknownSource):
                    await service.await_source(result.network, result.address)
                    request.waited = True
                    result = self.handler.answer(self.store.current, self.peer, request, None, _monotonic())
                elif isinstance(result, NeedCredentials):
                    found = await self.handler.credentials.fetch(result.instance, result.address, result.role)
                    result = self.handler.finish_credentials(result, found, request)
                elif isinstance(result, NeedFallback):
                    fallback = self.handler.fallback
                    assert fallback is not None
                    answered = await fallback.fetch(self.store.current, result.instance, result.address, result.path)
                    finished = self.handler.finish_fallback(result, answered, request)
                    # None: the fallback has nothing there (or is down with nothing kept), the view answers.
                    result = finished if finished is not None else self.handler.answer(
                        self.store.current, self.peer, request, None, _monotonic())
        except asyncio.CancelledError:
            return
        except LeaveUnanswered:
            self.closing = True
            if self.transport is not None:
                self.transport.close()
            return
        except Exception:
            log.exception("metadata slow path failed peer=%s", self.peer.address)
            result = ANSWERS[Outcome.INTERNAL].close
            request.keep_alive = False
        if self.closing and self.transport is not None and self.transport.is_closing():
            return
        self.busy = False
        self.write(result, request)
        while self.queue and not self.busy and not self.closing:
            self.handle(self.queue.popleft())
        if not self.busy and not self.closing and not self.writing_paused and self.transport is not None:
            self.transport.resume_reading()
