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
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

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
    Query,
    error_reply,
    opt_record,
    parse_query,
    truncated,
)
from edge.dns.zonedata import DnsData, Horizon, dns_data
from edge.view.snapshot import Snapshot

log = logging.getLogger("edge.dns")

_PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00"
_NO_ADDITIONAL = b"\x00\x00"
_ONE_ADDITIONAL = b"\x00\x01"
_OPT_TYPE = b"\x00\x29"
_NO_OPTIONS = b"\x00\x00"
"""An OPT RDLEN of zero: the only OPT the fast path takes (any other goes through the option checks)."""
_NO_SNAPSHOT = object()
_SPLICED_LIMIT = 4096


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
                    recursion, memo, _ = askers[address]
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
                                    if udp and len(reply) > limit:
                                        return self._truncate(reply, data, qend, opt)
                                    return reply
                        # An answer with somewhere to go on upstream (a zone cut, a CNAME leaving the local
                        # zones), for a client that may recurse and asks to, takes the slow path.  (The memo
                        # holds Answers and the NOT_LOCAL object, so its values are typed object.)
                        elif found.onward is None or not (recursion and data[2] & 1):  # type: ignore[attr-defined]
                            # An Answer, as above.
                            reply = found.assemble(data, qend, data[2] & 1, recursion, opt)  # type: ignore[attr-defined]
                            if udp and len(reply) > limit:
                                return self._truncate(reply, data, qend, opt)
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
        self._snapshot = snapshot
        self._current = snapshot

    def _askers_for(self, network: str) -> _Askers:
        askers = self._askers[network] = _Askers(self.policy, self._current, self._table, network)
        return askers

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
        recursion, memo, horizon = askers[address]
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
                reply = found.assemble(data, query.qend, query.rd, recursion, opt)  # type: ignore[attr-defined]
                return self._fit(reply, query, opt, udp)
            if onward.count:
                return self._chase_upstream(query, onward, snapshot, now, udp)
            # At or below a zone cut: the upstream answer to the question itself.
        elif not recursion:
            raise Refused("recursion not offered to this client")
        entry = self.forwarder.lookup(cache_key(query), now)
        if entry is not None:
            return self.forwarded_reply(query, entry, now, udp)
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



class _Askers(dict[str, "tuple[bool, dict[bytes, object], Horizon]"]):
    """Source address -> (may recurse, answer memo, horizon) for one listener network and snapshot.

    Bounded; refilled on demand.  The memo is shared by every asker of the same horizon.
    """

    LIMIT = 65536

    def __init__(self, policy: RecursionPolicy, snapshot: Snapshot, table: DnsData, network: str) -> None:
        super().__init__()
        self.policy = policy
        self.snapshot = snapshot
        self.table = table
        self.network = network

    def __missing__(self, address: str) -> tuple[bool, dict[bytes, object], Horizon]:
        if len(self) >= self.LIMIT:
            self.clear()
        horizon = self.table.horizon_for(self.snapshot, self.network, address)
        found = self[address] = (self.policy.allowed(self.snapshot, self.network, address),
                                 self.table.memo_for(horizon), horizon)
        return found
