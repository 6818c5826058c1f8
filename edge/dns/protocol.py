"""Thin UDP and TCP protocols: frame, rate-limit, hand bytes to the engine, write what it returns.

Local answers and cache hits are written inside the callback that read the
query (a UDP listener's reader callback, which takes a batch of waiting
datagrams, or ``data_received``); only forwarded questions leave it, through
:meth:`ListenerHost.forward`.  TCP follows RFC 7766: length-prefixed messages,
several per connection, replies written as they complete (clients match IDs),
an idle timeout, a deadline for each message that further bytes do not
extend (a client trickling a byte every few seconds cannot hold a slot), and
caps on connections in total and per source address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from edge.config import Config
from edge.dns.datagrams import datagrams_for
from edge.dns.engine import Engine, Forward
from edge.metrics import Tally
from edge.ratelimit import RateLimiter
from edge.view.snapshot import Snapshot
from edge.view.store import ViewStore

log = logging.getLogger("edge.dns")

MAX_TCP_BUFFER = 65535 + 2


@dataclass(slots=True)
class DnsStats:
    udp_queries: int = 0
    tcp_queries: int = 0
    tcp_connections: int = 0
    tcp_refused: int = 0
    tcp_message_timeouts: int = 0
    """TCP connections closed because a message was not complete within ``dns.tcp_message_timeout``."""
    forwarded: int = 0
    dropped: int = 0
    udp_replies_dropped: int = 0
    """Replies the kernel would not take (send buffer full): dropped, as a UDP server does, never waited for."""


class ListenerHost(Protocol):
    """What the listeners use of the service that owns them (:class:`edge.dns.service.DnsService`).

    Stated here so that this module depends on nothing above it: the service imports the
    listeners, never the other way round.
    """

    config: Config
    store: ViewStore
    engine: Engine
    limiter: RateLimiter
    stats: DnsStats
    tally: Tally
    closing: bool
    connections: set[DnsStreamProtocol]
    tcp_per_source: dict[str, int]
    """Source address -> open TCP connections."""

    def forward(self, forward: Forward, send: Callable[[bytes | None], None], udp: bool) -> None:
        """Resolve ``forward`` upstream and ``send`` the reply (None: drop)."""


class DnsDatagramProtocol:
    """One UDP listening socket, read from the event loop's reader callback and answered inline.

    Each wake-up takes a batch of waiting queries (:mod:`edge.dns.datagrams`), answers
    the local ones and cache hits, and sends their replies together; forwarded questions
    are answered later with a ``sendto`` on the same socket.
    """

    def __init__(self, service: ListenerHost, network: str, sock: socket.socket | None = None) -> None:
        self.service = service
        self.network = network
        self.sock = sock
        self.datagrams = datagrams_for(sock) if sock is not None else None
        self.transport: asyncio.DatagramTransport | None = None
        """Where replies go when there is no socket (benchmarks hand in a collecting transport)."""
        self.loop: asyncio.AbstractEventLoop | None = None
        # Bound once: the per-datagram path does no attribute walks it can avoid.
        self.limiter = service.limiter
        self.engine = service.engine
        self.store = service.store
        self.stats = service.stats
        self.tally = service.tally

    def start(self) -> None:
        assert self.sock is not None
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self.readable)

    def close(self) -> None:
        if self.closed:
            return
        assert self.sock is not None  # closed says so when there is none
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self.sock is None or self.sock.fileno() < 0

    def readable(self) -> None:
        datagrams = self.datagrams
        assert datagrams is not None  # start() reads only a listener that has a socket
        received = datagrams.receive()
        if not received or self.service.closing:
            return  # while stopping, queries are read and ignored so the socket does not stay readable
        now = time.monotonic()
        snapshot = self.store.current
        memos = self.engine.reply_memos(snapshot, self.network, now)
        # The rate limit, when it is off, costs nothing per datagram.
        allow = self.limiter.allow if self.limiter.rate > 0 else None
        replies: list[bytes | None] = [None] * len(received)
        limited = cache_hits = 0
        try:
            for index, (data, address) in enumerate(received):
                if allow is not None and not allow(address, now):
                    limited += 1
                    continue
                try:
                    # A question this group of askers asked before: the reply is the query's own ID and
                    # the bytes kept (see edge.dns.engine.ReplyMemos); anything else goes to the engine.
                    local, cached = memos[address]
                    rest = data[2:]
                    memoized = local.get(rest)
                    if memoized is None:
                        memoized = cached.get(rest)
                        if memoized is None:
                            replies[index] = self._answer(data, address, snapshot, now, index)
                            continue
                        cache_hits += 1
                    replies[index] = data[:2] + memoized
                except Exception:
                    # One bad query costs its own answer, not the rest of the batch.
                    log.exception("dns: unexpected error on a UDP query from %s", address)
        finally:
            # Replies made so far go out now: the next batch reuses the source addresses they point at.
            stats = self.stats
            stats.udp_queries += len(received) - limited
            if limited:
                self.tally.count("rate_limited", "dns", limited)
            if cache_hits:
                self.engine.count_cache_hits(cache_hits)
            dropped = datagrams.send(replies)
            if dropped:
                stats.udp_replies_dropped += dropped
            self.tally.dns_replies(replies, now)

    def _answer(self, data: bytes, address: str, snapshot: Snapshot | None, now: float, index: int) -> bytes | None:
        """A query the reply memos do not hold: the engine's reply, or None when there is none to send now."""
        reply = self.engine.answer(data, snapshot, self.network, address, now, True)
        if isinstance(reply, bytes):
            return reply
        if reply is None:
            self.stats.dropped += 1
            self.tally.request("dropped", "NONE")
        else:
            assert self.datagrams is not None
            self.service.forward(reply, self._sender(self.datagrams.source(index), now), udp=True)
        return None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Answer one datagram (the same steps as :meth:`readable`, for callers that hold one)."""
        if self.service.closing:
            return
        now = time.monotonic()
        address = addr[0]
        if self.limiter.rate > 0 and not self.limiter.allow(address, now):
            self.tally.count("rate_limited", "dns")
            return
        self.stats.udp_queries += 1
        reply = self.engine.answer(data, self.store.current, self.network, address, now, True)
        if isinstance(reply, bytes):
            self.send(reply, addr)
            self.tally.dns_reply(reply, now)
        elif reply is None:
            self.stats.dropped += 1
            self.tally.request("dropped", "NONE")
        else:
            self.service.forward(reply, self._sender(addr, now), udp=True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (asyncio's signature names the base type for every protocol).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def send(self, reply: bytes, addr: tuple[Any, ...]) -> None:
        """Send one reply now; when the kernel will not take it, drop it (a UDP server never waits)."""
        if self.sock is None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(reply, addr)
            return
        try:
            self.sock.sendto(reply, addr)
        except OSError:
            # Send buffer full, or the client gone (ICMP error), or the socket closed: nothing to retry.
            self.stats.udp_replies_dropped += 1

    def _sender(self, addr: tuple[Any, ...], received: float) -> Callable[[bytes | None], None]:
        def send(reply: bytes | None) -> None:
            if reply is not None and not self.closed:
                self.send(reply, addr)
                self.tally.dns_reply(reply, received)
        return send


class DnsStreamProtocol(asyncio.Protocol):
    def __init__(self, service: ListenerHost, network: str) -> None:
        # per-connection
        self.service = service
        self.network = network
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.buffer = b""
        self.pending = 0
        self.paused = False
        self.write_paused = False
        # idle timeout
        self.last_activity = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        # whole-message deadline: armed when a message's first bytes arrive, never pushed back by more
        self.message_timer: asyncio.TimerHandle | None = None
        self.counted = False
        """Whether this connection holds one of its source address's slots."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream listener's connections always have a full Transport (asyncio's signature names the base type).
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.address = address = peer[0] if peer else ""
        service = self.service
        dns = service.config.dns
        per_source = service.tcp_per_source
        if (len(service.connections) >= dns.tcp_max_connections or service.closing
                or per_source.get(address, 0) >= dns.tcp_max_connections_per_source):
            service.stats.tcp_refused += 1
            transport.close()
            return
        per_source[address] = per_source.get(address, 0) + 1
        self.counted = True
        service.connections.add(self)
        service.stats.tcp_connections += 1
        self.last_activity = time.monotonic()
        self._arm_idle(dns.tcp_idle_timeout)

    def _arm_idle(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self.idle_timer = loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        timeout = self.service.config.dns.tcp_idle_timeout
        idle = time.monotonic() - self.last_activity
        if self.pending == 0 and idle >= timeout:
            self.close()
        else:
            self._arm_idle(max(timeout - idle, 0.05) if self.pending == 0 else timeout)

    def data_received(self, data: bytes) -> None:
        self.last_activity = now = time.monotonic()
        buffer = self.buffer + data if self.buffer else data
        service = self.service
        size = len(buffer)
        position = 0
        # Walk by offset: slicing the rest of a large read after every message would be quadratic.
        while size - position >= 2:
            end = position + 2 + ((buffer[position] << 8) | buffer[position + 1])
            if end > size:
                break
            message = buffer[position + 2:end]
            position = end
            service.stats.tcp_queries += 1
            reply = service.engine.answer(message, service.store.current, self.network, self.address, now, False)
            if reply is None:
                # A message without a readable header: the stream cannot be trusted any more.
                service.stats.dropped += 1
                self.close()
                return
            if isinstance(reply, bytes):
                self.write(reply)
                service.tally.dns_reply(reply, now)
            else:
                self.pending += 1
                service.forward(reply, self._forwarded_writer(now), udp=False)
                if self.pending >= service.config.dns.tcp_max_pipelined and not self.paused:
                    self.paused = True
                    assert self.transport is not None  # set by connection_made, before any data
                    self.transport.pause_reading()
        if position < size:
            if position or not self.buffer:
                # The first bytes of a new message: its deadline starts now.
                self._arm_message_deadline()
            self.buffer = buffer[position:]
        else:
            self.buffer = b""
            if self.message_timer is not None:
                self.message_timer.cancel()
                self.message_timer = None

    def _arm_message_deadline(self) -> None:
        if self.message_timer is not None:
            self.message_timer.cancel()
        loop = asyncio.get_running_loop()
        self.message_timer = loop.call_later(self.service.config.dns.tcp_message_timeout, self._message_expired)

    def _message_expired(self) -> None:
        """A message begun but not finished in time: a client holding the connection open byte by byte."""
        self.message_timer = None
        if self.paused or self.write_paused:
            # We stopped reading (our own backpressure): the client cannot finish; give it the time again.
            self._arm_message_deadline()
            return
        self.service.stats.tcp_message_timeouts += 1
        self.close()

    def write(self, reply: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(len(reply).to_bytes(2, "big") + reply)

    def _forwarded_writer(self, received: float) -> Callable[[bytes | None], None]:
        def write(reply: bytes | None) -> None:
            if reply is not None:
                self.service.tally.dns_reply(reply, received)
            self.write_forwarded(reply)
        return write

    def write_forwarded(self, reply: bytes | None) -> None:
        self.pending -= 1
        self.last_activity = time.monotonic()
        if reply is not None:
            self.write(reply)
        if self.paused and self.pending < self.service.config.dns.tcp_max_pipelined:
            self.paused = False
            if not self.write_paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        # A client that sends queries but does not read answers stops being read from.
        self.write_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.message_timer is not None:
            self.message_timer.cancel()
            self.message_timer = None
        service = self.service
        service.connections.discard(self)
        if self.counted:
            self.counted = False
            per_source = service.tcp_per_source
            left = per_source.get(self.address, 1) - 1
            if left > 0:
                per_source[self.address] = left
            else:
                per_source.pop(self.address, None)
        self.transport = None


