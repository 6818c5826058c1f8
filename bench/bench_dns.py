"""Hot-path benchmarks of the DNS engine, without sockets.

``python -m pytest bench/bench_dns.py --benchmark-enable`` measures
``Engine.answer`` (query bytes in, reply bytes out) for a local hit, NXDOMAIN,
PTR, a forwarded cache hit, a local CNAME chased to a cached outside answer, and a
miss that must be rendered, plus the UDP
protocol callback with a collecting transport.
"""

from __future__ import annotations

import time

import dns.message
import dns.rcode
import dns.rrset
import pytest

from edge.config import Config, DnsConfig
from edge.dns.acl import RecursionPolicy
from edge.dns.engine import Engine
from edge.dns.forwarder import Forwarder, cache_key
from edge.dns.protocol import DnsDatagramProtocol
from edge.dns.service import DnsService
from edge.dns.wire import parse_query
from edge.dns.zonedata import make_preparer
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore

INSTANCE = "127.0.0.1"


@pytest.fixture(scope="module")
def setup():
    config = DnsConfig()
    document = demo_document()
    document["cloud"]["dns_records"].append(
        {"name": "alias.demo.example", "type": "CNAME", "value": "host.upstream.test", "ttl": 300})
    snapshot = build_snapshot(parse_view(document), [make_preparer()])
    forwarder = Forwarder(config)
    engine = Engine(config, forwarder, RecursionPolicy())
    # Seed the cache as a real upstream answer would.
    query = dns.message.make_query("www.example.com", "A", use_edns=0)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("www.example.com.", 300, "IN", "A", "192.0.2.80", "192.0.2.81"))
    wire = response.to_wire()
    entry = forwarder._entry(wire, len(parse_query(query.to_wire()).question), forwarder.settings)
    forwarder.cache[cache_key(parse_query(query.to_wire()))] = entry
    # And the target of a local CNAME that leaves the local zones (alias.demo.example below).
    query = dns.message.make_query("host.upstream.test", "A", use_edns=0)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("host.upstream.test.", 300, "IN", "A", "192.0.2.11"))
    entry = forwarder._entry(response.to_wire(), len(parse_query(query.to_wire()).question), forwarder.settings)
    forwarder.cache[cache_key(parse_query(query.to_wire()))] = entry
    return engine, snapshot


def run(benchmark, setup, name: str, rtype: str, expect: str, edns: bool = True) -> bytes:
    engine, snapshot = setup
    wire = dns.message.make_query(name, rtype, use_edns=0 if edns else False).to_wire()
    now = time.monotonic()
    engine.answer(wire, snapshot, "", INSTANCE, now)  # memoize, as the first query of a name does
    reply = benchmark(engine.answer, wire, snapshot, "", INSTANCE, now)
    assert isinstance(reply, bytes)
    assert dns.rcode.to_text(dns.message.from_wire(reply).rcode()) == expect
    return reply


def test_local_hit(benchmark, setup):
    run(benchmark, setup, "ip-127-0-0-1.demo.internal", "A", "NOERROR")


def test_local_hit_without_edns(benchmark, setup):
    run(benchmark, setup, "Ip-127-0-0-2.Demo.Internal", "A", "NOERROR", edns=False)


def test_nxdomain(benchmark, setup):
    run(benchmark, setup, "missing.demo.internal", "A", "NXDOMAIN")


def test_ptr(benchmark, setup):
    run(benchmark, setup, "1.0.0.127.in-addr.arpa", "PTR", "NOERROR")


def test_forwarded_cache_hit(benchmark, setup):
    reply = run(benchmark, setup, "WWW.example.com", "A", "NOERROR")
    assert len(dns.message.from_wire(reply).answer[0]) == 2


def test_chased_cname_cache_hit(benchmark, setup):
    """A local CNAME whose target is outside the local zones, the target's answer in the cache."""
    reply = run(benchmark, setup, "alias.demo.example", "A", "NOERROR")
    assert len(dns.message.from_wire(reply).answer) == 2


def test_render_on_first_use(benchmark, setup):
    """The memo miss path: parse, look up zone and horizon, render with dnslib."""
    engine, snapshot = setup
    wire = dns.message.make_query("ip-127-0-0-3.demo.internal", "A").to_wire()
    data = snapshot.extras["dns"]

    def first_use():
        data.memo.clear()
        data.memo_size = 0
        return engine.answer(wire, snapshot, "", INSTANCE, 0.0)

    assert isinstance(benchmark(first_use), bytes)


class CollectingTransport:
    def __init__(self) -> None:
        self.sent = 0

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent += 1

    def is_closing(self) -> bool:
        return False


def test_udp_protocol_callback(benchmark):
    store = ViewStore()
    service = DnsService(Config(dns=DnsConfig(rate_limit=0.0)), store)
    store.swap(build_snapshot(parse_view(demo_document()), service.preparers), "source")
    protocol = DnsDatagramProtocol(service, "")
    transport = CollectingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    wire = dns.message.make_query("ip-127-0-0-1.demo.internal", "A").to_wire()
    benchmark(protocol.datagram_received, wire, (INSTANCE, 5353))
    assert transport.sent >= 1


@pytest.mark.parametrize("way", ["batch", "socket"])
def test_udp_listener_batch_of_64(benchmark, way):
    """One wake-up of a UDP listener with 64 queries waiting: receive, answer, send (loopback, real syscalls).

    The median is per batch; divide by 64 for a query.  ``batch`` is recvmmsg/sendmmsg, ``socket``
    recvfrom/sendto per datagram.
    """
    import socket

    from edge.dns.datagrams import BATCH, BatchDatagrams, SocketDatagrams

    store = ViewStore()
    service = DnsService(Config(dns=DnsConfig(rate_limit=0.0)), store)
    store.swap(build_snapshot(parse_view(demo_document()), service.preparers), "source")
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((INSTANCE, 0))
    listener.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((INSTANCE, 0))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.setblocking(False)
    protocol = DnsDatagramProtocol(service, "", listener)
    if way == "socket":
        protocol.datagrams = SocketDatagrams(listener)
    elif not isinstance(protocol.datagrams, BatchDatagrams):
        pytest.skip("no recvmmsg/sendmmsg here")
    wire = dns.message.make_query("ip-127-0-0-1.demo.internal", "A").to_wire()
    target = listener.getsockname()

    def fill():
        try:
            while True:
                client.recv(4096)
        except BlockingIOError:
            pass
        for _ in range(BATCH):
            client.sendto(wire, target)
        return (), {}

    benchmark.pedantic(protocol.readable, setup=fill, rounds=300)
    assert client.recv(4096)[:2] == wire[:2]
    listener.close()
    client.close()
