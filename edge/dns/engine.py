"""Query bytes in, reply bytes out: the pure core of the DNS service.

``Engine.answer`` takes a packet, who sent it (listener network and source
address), the current snapshot and the time, and returns the reply bytes,
None (drop), or a :class:`Forward` the service completes asynchronously.
It never awaits.  This module is also the one place where errors become
RCODEs (:meth:`Engine.error_reply`).

The common case avoids every general parser: a packet with one question, no
answer or authority records and at most one plain OPT is recognised by byte
comparisons, its key looked up in the snapshot's answer memo, and the reply
assembled from the query's own header and question plus stored bytes.

A UDP reply made that way is also kept whole, minus its ID, under the query's
bytes minus its ID (:class:`ReplyMemos`): the next identical query from the
same group of askers is one dict lookup, and its reply is its own ID followed
by the stored bytes.  Everything a reply depends on is in that key (the
question as spelt, RD, the EDNS payload size and DO bit, so truncation too)
or in the group (recursion offered, horizon); the memo is dropped with the
snapshot or the configuration, and replies from the forwarding cache, whose
TTLs count down, are dropped every second.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge.config import DnsConfig
from edge.dns.acl import RecursionPolicy
from edge.dns.errors import EDE_NOT_READY, EDE_STALE_ANSWER, SERVFAIL, DnsError, Refused, Unanswerable
from edge.dns.forwarder import CachedAnswer, Forwarder, cache_key
from edge.dns.local import NOT_LOCAL, answer_local
from edge.dns.render import Onward, spliced_body
from edge.dns.wire import (
    HEADER,
    PLAIN_UDP_PAYLOAD,
    QR,
    RA,
    RD,
    TC,
    Query,
    error_reply,
    opt_record,
    parse_query,
    truncated,
)
from edge.dns.zonedata import DnsData, Horizon, dns_data
from edge.view.snapshot import Snapshot

log = logging.getLogger("edge.dns")

_TC_BYTE = TC >> 8
"""The truncation bit in a reply's third byte."""
_PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00"
_NO_ADDITIONAL = b"\x00\x00"
_ONE_ADDITIONAL = b"\x00\x01"
_OPT_TYPE = b"\x00\x29"
_NO_OPTIONS = b"\x00\x00"
"""An OPT RDLEN of zero: the only OPT the fast path takes (any other goes through the option checks)."""
_NO_SNAPSHOT = object()
_SPLICED_LIMIT = 4096
ReplyGroup = tuple[dict[bytes, bytes], dict[bytes, bytes]]
"""(local replies, cached replies) of one group of askers; see :class:`ReplyMemos`."""
_NO_REPLIES: ReplyGroup = ({}, {})
"""The groups before any view is loaded: nothing is memoized, every query takes :meth:`Engine.answer`."""


@dataclass(frozen=True, slots=True)
class Forward:
    """A question for upstream; the service resolves it and calls :meth:`Engine.forwarded`."""

    query: Query
    upstreams: tuple[str, ...]
    """The view's upstream resolvers at the time of the query."""
    client: Query | None = None
    """When ``query`` is the target of a local CNAME chain: the client's own query."""
    chain: Onward | None = None
    """That local chain, whose records come before the upstream answer."""


class Engine:
    def __init__(self, config: DnsConfig, forwarder: Forwarder, policy: RecursionPolicy) -> None:
        self.forwarder = forwarder
        self.policy = policy
        self.not_ready = 0
        """Queries answered SERVFAIL because no view was loaded yet."""
        self._not_ready_logged = False
        self.configure(config)

    def configure(self, config: DnsConfig) -> None:
        # Per-snapshot caches are rebuilt with the new settings.  Never None, so that "no view yet" is
        # always a change of snapshot and reaches the not-ready answer below.
        self._snapshot: object = _NO_SNAPSHOT
        self.payload = config.edns_payload
        self.opt_plain = opt_record(config.edns_payload, False)
        self.opt_do = opt_record(config.edns_payload, True)

    def answer(self, data: bytes, snapshot: Snapshot | None, network: str, address: str, now: float,
               udp: bool = True) -> bytes | Forward | None:
        if snapshot is None:
            return self._not_ready(data, address)
        if snapshot is not self._snapshot:
            self._switch(snapshot)
        table = self._table
        size = len(data)
        # Fast path: QUERY opcode, not a response, one question, nothing else but maybe one plain OPT.
        if size > 16 and not data[2] & 0xF8 and data[4:10] == _PLAIN_COUNTS:
            end = data.find(0, HEADER) + 1
            if end:
                qend = end + 4
                additional = data[10:12]
                if additional == _NO_ADDITIONAL and qend == size:
                    opt = b""
                    limit = PLAIN_UDP_PAYLOAD
                elif (additional == _ONE_ADDITIONAL and qend + 11 == size and data[qend] == 0
                      and data[qend + 1:qend + 3] == _OPT_TYPE and data[qend + 6] == 0
                      and data[qend + 9:] == _NO_OPTIONS):
                    do = data[qend + 7] & 0x80
                    opt = self.opt_do if do else self.opt_plain
                    limit = min(max((data[qend + 3] << 8) | data[qend + 4], PLAIN_UDP_PAYLOAD), self.payload)
                else:
                    opt = None
                if opt is not None:
                    askers = self._askers.get(network)
                    if askers is None:
                        askers = self._askers_for(network)
                    recursion, memo, _, group = askers[address]
                    found = memo.get(data[HEADER:end].lower() + data[end:qend])
                    if found is not None:
                        if found is NOT_LOCAL:
                            if recursion:
                                key = data[HEADER:end].lower() + data[end:qend] + (b"\x01" if opt is self.opt_do
                                                                                    else b"\x00")
                                entry = self.forwarder.lookup(key, now)
                                if entry is not None:
                                    reply = (data[:2] + entry.prefixes[(2 if data[2] & 1 else 0) | (1 if opt else 0)]
                                             + data[HEADER:qend] + entry.body_at(now) + opt)
                                    if udp:
                                        if len(reply) > limit:
                                            return self._truncate(reply, data, qend, opt)
                                        self._replies.remember_cached(group[1], data, reply, entry, now)
                                    return reply
                        # An answer with somewhere to go on upstream (a zone cut, a CNAME leaving the local
                        # zones), for a client that may recurse and asks to, takes the slow path.  (The memo
                        # holds Answers and the NOT_LOCAL object, so its values are typed object.)
                        elif found.onward is None or not (recursion and data[2] & 1):  # type: ignore[attr-defined]
                            # An Answer, as above.
                            reply = found.assemble(data, qend, data[2] & 1, recursion, opt)  # type: ignore[attr-defined]
                            if udp:
                                if len(reply) > limit:
                                    reply = self._truncate(reply, data, qend, opt)
                                self._replies.remember(group[0], data, reply)
                            return reply
        try:
            return self._answer_slow(data, snapshot, table, network, address, now, udp)
        except Unanswerable:
            return None
        except DnsError as exc:
            return self.error_reply(data, exc.rcode, self._recursion(snapshot, network, address), exc.ede)
        except Exception:
            log.exception("dns: unexpected error answering a query from %s", address)
            return self.error_reply(data, SERVFAIL, self._recursion(snapshot, network, address))

    def _not_ready(self, data: bytes, address: str) -> bytes | None:
        """No view has been loaded yet (a fresh gateway whose first view was rejected): SERVFAIL, EDE 14."""
        self.not_ready += 1
        if not self._not_ready_logged:
            self._not_ready_logged = True
            log.warning("dns: no view loaded yet; answering SERVFAIL (EDE 14, not ready) until one is "
                        "(first query from %s)", address)
        return self.error_reply(data, SERVFAIL, False, EDE_NOT_READY)

    def _switch(self, snapshot: Snapshot) -> None:
        """Per-snapshot lookups, cached so a query does not repeat them."""
        self._table = dns_data(snapshot)  # the preparer's, or built now (tests, tools)
        self._askers: dict[str, _Askers] = {}
        """Listener network -> source address -> (may recurse, answer memo, horizon)."""
        self._spliced: dict[bytes, tuple[CachedAnswer, Onward, int, bytes]] = {}
        """Question key -> (upstream entry, local chain, second, body) of chased CNAME answers."""
        self._replies = ReplyMemos()
        self._groups: dict[str, _ReplyGroups] = {}
        """Listener network -> source address -> (memoized local replies, memoized cache replies)."""
        self._snapshot = snapshot
        self._current = snapshot

    def _askers_for(self, network: str) -> _Askers:
        askers = self._askers[network] = _Askers(self.policy, self._current, self._table, network, self._replies)
        return askers

    def reply_memos(self, snapshot: Snapshot | None, network: str,
                    now: float) -> Mapping[str, ReplyGroup]:
        """Source address -> (local replies, forwarding-cache replies) memoized for its group of askers, each
        keyed by a query's bytes after its ID and holding the UDP reply's bytes after its ID.

        Called once per batch of datagrams; a query found in neither goes to :meth:`answer`, which fills them.
        Both hold whole replies minus their ID; one taken from the second is a cache hit: report them with
        :meth:`count_cache_hits`.
        """
        if snapshot is None:
            return _NOT_READY_GROUPS
        if snapshot is not self._snapshot:
            self._switch(snapshot)
        self._replies.tick(int(now), self.forwarder.stats.cache_stores)
        groups = self._groups.get(network)
        if groups is None:
            askers = self._askers.get(network)
            if askers is None:
                askers = self._askers_for(network)
            groups = self._groups[network] = _ReplyGroups(askers)
        return groups

    def count_cache_hits(self, count: int) -> None:
        """Replies served from :meth:`reply_memos`' forwarding-cache dict, counted as the lookups they stand for."""
        self.forwarder.stats.cache_hits += count

    def _recursion(self, snapshot: Snapshot, network: str, address: str) -> bool:
        try:
            return self.policy.allowed(snapshot, network, address)
        except Exception:
            return False

    def _answer_slow(self, data: bytes, snapshot: Snapshot, table: DnsData, network: str, address: str,
                     now: float, udp: bool) -> bytes | Forward:
        query = parse_query(data)
        askers = self._askers.get(network)
        if askers is None:
            askers = self._askers_for(network)
        recursion, memo, horizon, group = askers[address]
        key = query.key
        found = memo.get(key)
        if found is None:
            found = answer_local(table, horizon, query.name, query.qtype, query.qclass)
            table.remember(memo, key, found)
        opt = self.opt_for(query)
        if found is not NOT_LOCAL:
            # The memo's values are Answers or the NOT_LOCAL object (typed object): this is an Answer.
            onward: Onward | None = found.onward  # type: ignore[attr-defined]
            if onward is None or not (recursion and query.rd):
                # An Answer, as above.
                reply = self._fit(found.assemble(data, query.qend, query.rd, recursion, opt),  # type: ignore[attr-defined]
                                  query, opt, udp)
                if udp:
                    self._replies.remember(group[0], data, reply)
                return reply
            if onward.count:
                return self._chase_upstream(query, onward, snapshot, now, udp)
            # At or below a zone cut: the upstream answer to the question itself.
        elif not recursion:
            raise Refused("recursion not offered to this client")
        entry = self.forwarder.lookup(cache_key(query), now)
        if entry is not None:
            reply = self.forwarded_reply(query, entry, now, udp)
            if udp and not reply[2] & _TC_BYTE:  # not truncated
                self._replies.remember_cached(group[1], data, reply, entry, now)
            return reply
        return Forward(query, snapshot.view.cloud.upstream_resolvers)

    def _chase_upstream(self, query: Query, chain: Onward, snapshot: Snapshot, now: float,
                        udp: bool) -> bytes | Forward:
        """A local CNAME chain whose target is not local: resolve the target (RFC 1034 3.6.2)."""
        data = query.data
        qtype_class = data[query.qend - 4:query.qend]
        head = data[:2] + bytes((data[2] & 0x01, 0)) + b"\x00\x01\x00\x00\x00\x00\x00\x00"
        target = Query(head + chain.name + qtype_class, query.flags, HEADER + len(chain.name) + 4, chain.name,
                       query.qtype, query.qclass, query.edns, query.payload, query.do)
        entry = self.forwarder.lookup(cache_key(target), now)
        if entry is not None:
            return self._chained_reply(query, chain, target, entry, now, udp)
        return Forward(target, snapshot.view.cloud.upstream_resolvers, query, chain)

    def _chained_reply(self, query: Query, chain: Onward, target: Query, entry: CachedAnswer, now: float,
                       udp: bool) -> bytes:
        """The local chain, then the upstream answer for its target, as one reply to ``query``.

        AA is clear: part of the answer is not ours.  The RCODE is that of the last name.
        """
        # Splicing decodes and re-packs the upstream records (tens of microseconds); the result is
        # kept for the rest of the second, the granularity at which cached TTLs count down.
        key = query.key
        second = int(now)
        held = self._spliced.get(key)
        if held is not None and held[0] is entry and held[1] is chain and held[2] == second:
            body = held[3]
        else:
            body = spliced_body(query.name, query.qtype, query.qclass, chain.records, target.question,
                                entry.body_at(now), entry.ancount, entry.nscount)
            if len(self._spliced) >= _SPLICED_LIMIT:
                self._spliced.clear()
            self._spliced[key] = (entry, chain, second, body)
        opt = self.opt_for(query)
        if opt and entry.stale:
            opt = opt_record(self.payload, query.do, 0, EDE_STALE_ANSWER)
        flags = QR | RA | (query.flags & RD) | entry.flags
        head = query.data[:2] + struct.pack("!HHHHH", flags, 1, chain.count + entry.ancount, entry.nscount,
                                            1 if opt else 0)
        reply = head + query.data[HEADER:query.qend] + body + opt
        return self._fit(reply, query, opt, udp)

    def forwarded(self, forward: Forward, entry: CachedAnswer, now: float, udp: bool) -> bytes:
        """The reply to a forwarded question once upstream answered (or a stale answer stood in)."""
        if forward.chain is not None and forward.client is not None:
            return self._chained_reply(forward.client, forward.chain, forward.query, entry, now, udp)
        return self.forwarded_reply(forward.query, entry, now, udp)

    def failed(self, forward: Forward, error: BaseException) -> bytes | None:
        """The reply to a forwarded question that upstream did not answer."""
        return self.failed_forward(forward.client or forward.query, error)

    def opt_for(self, query: Query) -> bytes:
        if not query.edns:
            return b""
        return self.opt_do if query.do else self.opt_plain

    def forwarded_reply(self, query: Query, entry: CachedAnswer, now: float, udp: bool) -> bytes:
        opt = self.opt_for(query)
        if opt and entry.stale:
            opt = opt_record(self.payload, query.do, 0, EDE_STALE_ANSWER)
        reply = (query.data[:2] + entry.prefixes[(2 if query.rd else 0) | (1 if opt else 0)]
                 + query.data[HEADER:query.qend] + entry.body_at(now) + opt)
        return self._fit(reply, query, opt, udp)

    def _fit(self, reply: bytes, query: Query, opt: bytes, udp: bool) -> bytes:
        if udp:
            limit = min(query.payload, self.payload) if query.edns else PLAIN_UDP_PAYLOAD
            if len(reply) > limit:
                return truncated(reply, query, opt)
        return reply

    def _truncate(self, reply: bytes, data: bytes, qend: int, opt: bytes) -> bytes:
        return truncated(reply, Query(data, 0, qend, b"", 0, 0), opt)

    def error_reply(self, data: bytes, rcode: int, recursion: bool, ede: int | None = None) -> bytes | None:
        """The one mapping from a failed query to its reply (None: drop)."""
        return error_reply(data, rcode, recursion, self.payload, ede)

    def failed_forward(self, query: Query, error: BaseException) -> bytes | None:
        if not isinstance(error, DnsError):
            log.warning("dns: forwarding failed unexpectedly: %r", error)
            return self.error_reply(query.data, SERVFAIL, True)
        return self.error_reply(query.data, error.rcode, True, error.ede)



class ReplyMemos:
    """UDP replies kept whole, minus their ID, by query minus its ID, for each group of askers that get the
    same replies (same horizon, same recursion policy): the fastest answer to a question asked again.

    Local replies stand as long as the snapshot and configuration.  A reply from the forwarding cache
    stands for the second it was made in (its TTLs count down once a second, and the cache sees the name
    in use once a second), if its entry stays fresh that long, and until the cache stores anything new
    (it may have replaced or evicted that entry).  Truncated and stale answers are not kept.

    Bounded in entries and in the size of a reply kept, so that questions spelt every which way (case,
    EDNS sizes) cannot grow it without limit; when full it starts over.
    """

    LIMIT = 16384
    LARGEST = 512
    """Longer replies (rare: big TXT sets, long referrals) are assembled each time instead."""

    def __init__(self) -> None:
        self._groups: dict[tuple[int, bool], ReplyGroup] = {}
        self._size = 0
        self._second = -1
        self._stores = -1

    def group(self, memo: dict[bytes, object], recursion: bool) -> ReplyGroup:
        """(local replies, cached replies) for the askers of the horizon whose answer memo is ``memo``."""
        key = (id(memo), recursion)  # the memo lives as long as the snapshot, and so do these
        found = self._groups.get(key)
        if found is None:
            found = self._groups[key] = ({}, {})
        return found

    def remember(self, replies: dict[bytes, bytes], query: bytes, reply: bytes) -> None:
        if len(reply) <= self.LARGEST:
            self._keep(replies, query[2:], reply[2:])

    def remember_cached(self, replies: dict[bytes, bytes], query: bytes, reply: bytes, entry: CachedAnswer,
                        now: float) -> None:
        """Keep ``reply``, made from ``entry`` at ``now``, for the rest of this second if it stays fresh that long."""
        if not entry.stale and entry.expires >= int(now) + 1:
            self.remember(replies, query, reply)

    def _keep(self, replies: dict[bytes, Any], key: bytes, value: object) -> None:
        if key in replies:
            replies[key] = value
            return
        if self._size >= self.LIMIT:
            for local, cached in self._groups.values():
                local.clear()
                cached.clear()
            self._size = 0
        replies[key] = value
        self._size += 1

    def tick(self, second: int, stores: int) -> None:
        """Forget the cached replies when the second changed or the cache stored something."""
        if second != self._second or stores != self._stores:
            self._second = second
            self._stores = stores
            for _, cached in self._groups.values():
                if cached:
                    self._size -= len(cached)
                    cached.clear()


class _Askers(dict[str, "tuple[bool, dict[bytes, object], Horizon, ReplyGroup]"]):
    """Source address -> (may recurse, answer memo, horizon, reply memos) for one listener network and snapshot.

    Bounded; refilled on demand.  The memo is shared by every asker of the same horizon, the reply memos
    by every asker of the same horizon and recursion policy.
    """

    LIMIT = 65536

    def __init__(self, policy: RecursionPolicy, snapshot: Snapshot, table: DnsData, network: str,
                 replies: ReplyMemos) -> None:
        super().__init__()
        self.policy = policy
        self.snapshot = snapshot
        self.table = table
        self.network = network
        self.replies = replies

    def __missing__(self, address: str) -> tuple[bool, dict[bytes, object], Horizon,
                                                 ReplyGroup]:
        if len(self) >= self.LIMIT:
            self.clear()
        horizon = self.table.horizon_for(self.snapshot, self.network, address)
        recursion = self.policy.allowed(self.snapshot, self.network, address)
        memo = self.table.memo_for(horizon)
        found = self[address] = (recursion, memo, horizon, self.replies.group(memo, recursion))
        return found


class _ReplyGroups(dict[str, "ReplyGroup"]):
    """Source address -> its group's reply memos (:meth:`Engine.reply_memos`); bounded as :class:`_Askers`."""

    def __init__(self, askers: _Askers) -> None:
        super().__init__()
        self.askers = askers

    def __missing__(self, address: str) -> ReplyGroup:
        if len(self) >= _Askers.LIMIT:
            self.clear()
        found = self[address] = self.askers[address][3]
        return found


class _NotReadyGroups(dict[str, "ReplyGroup"]):
    """Every address, before a view is loaded: nothing memoized (and nothing stored here)."""

    def __missing__(self, address: str) -> ReplyGroup:
        return _NO_REPLIES


_NOT_READY_GROUPS = _NotReadyGroups()
