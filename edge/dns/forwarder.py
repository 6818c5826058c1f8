"""The one async slow path: forward a question upstream, validate, cache, serve stale.

Each upstream query goes out on a fresh connected UDP socket (a random
ephemeral source port, and the kernel delivers only datagrams from that
upstream) with a random ID; an answer counts only when its ID and question
match too.  A truncated answer is asked again over TCP.  Upstreams are tried
in order, the ones that failed recently last.

Answers are cached by (name, type, class, DO) with their answer and authority
sections kept as received: the question we send has the same layout as the
client's, so compression pointers stay valid when those bytes are replayed
behind any client's header and question.  TTLs are rewritten once a second.
A burst of the same question shares one upstream query (single flight).  When
every upstream fails, an expired answer may be served for ``serve_stale``
seconds with a short TTL (RFC 8767); after that the answer is SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TLRUCache

from edge.config import DnsConfig
from edge.dns.errors import FormErr, ServFail
from edge.dns.wire import (
    AD,
    HEADER,
    QR,
    RA,
    RD,
    TC,
    TYPE_SOA,
    Query,
    opt_record,
    walk_records,
)
from edge.view.addresses import parse_resolver_address

log = logging.getLogger("edge.dns.forwarder")

_PREFIX = struct.Struct("!HHHHH")
_TTL = struct.Struct("!I")
UPSTREAM_PAYLOAD = 1232
NEGATIVE_TTL_WITHOUT_SOA = 60
UPSTREAM_PENALTY = 30.0

Upstream = tuple[str, int]


class UpstreamFailed(Exception):
    """One upstream did not give a usable answer."""


@dataclass(slots=True)
class CachedAnswer:
    """Answer and authority records from upstream, replayable behind any spelling of the question."""

    rcode: int
    flags: int
    """Upstream flags kept in replies (AD) plus the RCODE."""
    ancount: int
    nscount: int
    body: bytes
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    stored: float
    expires: float
    stale_until: float
    prefixes: tuple[bytes, ...] = ()
    rendered_second: int = -1
    rendered: bytes = b""
    stale: bool = False

    def __post_init__(self) -> None:
        out = []
        for index in range(4):
            flags = QR | RA | self.flags | (RD if index & 2 else 0)
            out.append(_PREFIX.pack(flags, 1, self.ancount, self.nscount, index & 1))
        self.prefixes = tuple(out)

    def body_at(self, now: float) -> bytes:
        """The records with TTLs counted down to ``now`` (re-rendered at most once a second)."""
        second = int(now)
        if second != self.rendered_second:
            age = int(now - self.stored)
            body = bytearray(self.body)
            for offset, ttl in zip(self.ttl_offsets, self.ttls):
                _TTL.pack_into(body, offset, max(0, ttl - age))
            self.rendered = bytes(body)
            self.rendered_second = second
        return self.rendered

    def as_stale(self, ttl: int) -> CachedAnswer:
        body = bytearray(self.body)
        for offset in self.ttl_offsets:
            _TTL.pack_into(body, offset, ttl)
        return CachedAnswer(self.rcode, self.flags, self.ancount, self.nscount, bytes(body), (), (),
                            self.stored, self.expires, self.stale_until, rendered_second=-2,
                            rendered=bytes(body), stale=True)


@dataclass(slots=True)
class ForwarderStats:
    upstream_queries: int = 0
    upstream_failures: int = 0
    tcp_retries: int = 0
    mismatched: int = 0
    coalesced: int = 0
    served_stale: int = 0
    servfail: int = 0
    cache_stores: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


def cache_key(query: Query) -> bytes:
    return query.key + (b"\x01" if query.do else b"\x00")


@dataclass(slots=True)
class _Settings:
    upstreams: tuple[Upstream, ...]
    timeout: float
    min_ttl: int
    max_ttl: int
    negative_max_ttl: int
    serve_stale: float
    stale_ttl: int


def _settings(config: DnsConfig) -> _Settings:
    upstreams = tuple(u for u in (parse_resolver_address(text) for text in config.upstreams) if u is not None)
    return _Settings(upstreams, config.upstream_timeout, config.cache_min_ttl, config.cache_max_ttl,
                     config.negative_max_ttl, config.serve_stale, config.stale_ttl)


class Forwarder:
    def __init__(self, config: DnsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.settings = _settings(config)
        self.cache: TLRUCache[bytes, CachedAnswer] = self._new_cache(config.cache_size)
        self.hot: dict[bytes, CachedAnswer] = {}
        self.hot_second = -1
        self.inflight: dict[bytes, asyncio.Task[CachedAnswer]] = {}
        self.penalty: dict[Upstream, float] = {}
        self.stats = ForwarderStats()

    def _new_cache(self, size: int) -> TLRUCache[bytes, CachedAnswer]:
        return TLRUCache(maxsize=size, ttu=lambda _key, value, _now: value.stale_until, timer=self.clock)

    def reconfigure(self, config: DnsConfig) -> None:
        """New limits and upstream overrides; cached answers are kept."""
        self.settings = _settings(config)
        self.hot = {}
        if self.cache.maxsize != config.cache_size:
            old = self.cache
            self.cache = self._new_cache(config.cache_size)
            for key, value in list(old.items())[-config.cache_size:]:
                self.cache[key] = value

    def lookup(self, key: bytes, now: float) -> CachedAnswer | None:
        """A fresh cached answer (the synchronous hit path).

        Entries found this second are also kept in a plain dict that is dropped every
        second: repeated hits skip the cache's LRU and expiry bookkeeping, and recency
        is still recorded once a second.
        """
        second = int(now)
        if second == self.hot_second:
            entry = self.hot.get(key)
            if entry is not None and now < entry.expires:
                self.stats.cache_hits += 1
                return entry
        else:
            self.hot = {}
            self.hot_second = second
        try:
            entry = self.cache[key]  # item access: several times cheaper than TLRUCache.get
        except KeyError:
            self.stats.cache_misses += 1
            return None
        if now < entry.expires:
            self.hot[key] = entry
            self.stats.cache_hits += 1
            return entry
        self.stats.cache_misses += 1
        return None

    async def resolve(self, query: Query, view_upstreams: tuple[str, ...]) -> CachedAnswer:
        """Answer ``query`` from upstream, sharing one upstream query among identical questions."""
        key = cache_key(query)
        task = self.inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key, query, view_upstreams))
            self.inflight[key] = task
            task.add_done_callback(lambda _t: self.inflight.pop(key, None))
        else:
            self.stats.coalesced += 1
        return await asyncio.shield(task)

    def upstreams(self, view_upstreams: tuple[str, ...]) -> list[Upstream]:
        configured = self.settings.upstreams or tuple(
            u for u in (parse_resolver_address(text) for text in view_upstreams) if u is not None)
        now = self.clock()
        healthy = [u for u in configured if self.penalty.get(u, 0.0) <= now]
        return healthy + [u for u in configured if self.penalty.get(u, 0.0) > now]

    async def _fetch(self, key: bytes, query: Query, view_upstreams: tuple[str, ...]) -> CachedAnswer:
        settings = self.settings
        question = query.name + query.data[query.qend - 4:query.qend]
        for upstream in self.upstreams(view_upstreams):
            self.stats.upstream_queries += 1
            try:
                reply = await self._ask(upstream, question, query.do, settings.timeout)
                entry = self._entry(reply, len(question), settings)
            except (UpstreamFailed, OSError, asyncio.TimeoutError, FormErr) as exc:
                self.stats.upstream_failures += 1
                self.penalty[upstream] = self.clock() + UPSTREAM_PENALTY
                log.debug("upstream %s:%d failed: %s", upstream[0], upstream[1], exc or type(exc).__name__)
                continue
            self.penalty.pop(upstream, None)
            self.cache[key] = entry
            self.hot.pop(key, None)
            self.stats.cache_stores += 1
            return entry
        stale = self.cache.get(key)
        if stale is not None and self.clock() < stale.stale_until:
            self.stats.served_stale += 1
            return stale.as_stale(settings.stale_ttl)
        self.stats.servfail += 1
        raise ServFail("no upstream answered")

    async def _ask(self, upstream: Upstream, question: bytes, do: bool, timeout: float) -> bytes:
        query_id = secrets.randbits(16)
        message = (struct.pack("!HHHHHH", query_id, RD, 1, 0, 0, 1) + question
                   + opt_record(UPSTREAM_PAYLOAD, do))
        reply = await asyncio.wait_for(self._ask_udp(upstream, message, query_id, question), timeout)
        if (reply[2] << 8 | reply[3]) & TC:
            self.stats.tcp_retries += 1
            query_id = secrets.randbits(16)
            message = struct.pack("!H", query_id) + message[2:]
            reply = await asyncio.wait_for(self._ask_tcp(upstream, message, query_id, question), timeout)
        return reply

    async def _ask_udp(self, upstream: Upstream, message: bytes, query_id: int, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamDatagram(waiter, query_id, question, self.stats), remote_addr=upstream)
        try:
            transport.sendto(message)
            return await waiter
        finally:
            transport.close()

    async def _ask_tcp(self, upstream: Upstream, message: bytes, query_id: int, question: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(upstream[0], upstream[1])
        try:
            writer.write(struct.pack("!H", len(message)) + message)
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = await reader.readexactly(size)
                if _matches(reply, query_id, question):
                    return reply
                self.stats.mismatched += 1
        except asyncio.IncompleteReadError:
            raise UpstreamFailed("connection closed before an answer") from None
        finally:
            writer.close()

    def _entry(self, reply: bytes, question_size: int, settings: _Settings) -> CachedAnswer:
        flags = (reply[2] << 8) | reply[3]
        rcode = flags & 0xF
        if rcode not in (0, 3):
            raise UpstreamFailed(f"upstream answered rcode {rcode}")
        ancount, nscount = struct.unpack_from("!HH", reply, 6)
        body_at = HEADER + question_size
        spans, end = walk_records(reply, body_at, ancount + nscount)
        if end > len(reply):
            raise FormErr("records past the end")
        now = self.clock()
        answers = spans[:ancount]
        if rcode == 0 and answers:
            lifetime = min(max(min(s.ttl for s in answers), settings.min_ttl), settings.max_ttl)
        else:
            soa = next((s for s in spans[ancount:] if s.rtype == TYPE_SOA), None)
            if soa is not None:
                minimum = struct.unpack_from("!I", reply, soa.end - 4)[0]
                negative = min(soa.ttl, minimum)
            else:
                negative = NEGATIVE_TTL_WITHOUT_SOA
            lifetime = min(max(negative, settings.min_ttl), settings.negative_max_ttl)
        ttls = tuple(min(max(s.ttl, settings.min_ttl), settings.max_ttl) if i < ancount else min(s.ttl, lifetime)
                     for i, s in enumerate(spans))
        offsets = tuple(s.ttl_at - body_at for s in spans)
        return CachedAnswer(rcode, (flags & AD) | rcode, ancount, nscount, reply[body_at:end], offsets, ttls,
                            now, now + lifetime, now + lifetime + settings.serve_stale)


def _matches(reply: bytes, query_id: int, question: bytes) -> bool:
    if len(reply) < HEADER + len(question):
        return False
    if (reply[0] << 8 | reply[1]) != query_id or not reply[2] & 0x80 or (reply[4] << 8 | reply[5]) != 1:
        return False
    asked = reply[HEADER:HEADER + len(question)]
    name_size = len(question) - 4
    return asked[:name_size].lower() == question[:name_size] and asked[name_size:] == question[name_size:]


class _UpstreamDatagram(asyncio.DatagramProtocol):
    """Waits on a connected socket for the one datagram that answers our question."""

    def __init__(self, waiter: asyncio.Future[bytes], query_id: int, question: bytes, stats: ForwarderStats) -> None:
        self.waiter = waiter
        self.query_id = query_id
        self.question = question
        self.stats = stats
        self.transport: object = None

    def connection_made(self, transport: object) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        if self.waiter.done():
            return
        if _matches(data, self.query_id, self.question):
            self.waiter.set_result(data)
        else:
            self.stats.mismatched += 1

    def error_received(self, exc: Exception) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(UpstreamFailed(f"socket error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(UpstreamFailed("socket closed"))
