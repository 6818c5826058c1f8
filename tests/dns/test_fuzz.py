"""Garbage never crashes the engine or a listener: hypothesis on the pure engine, then through sockets."""

from __future__ import annotations

import socket

import dns.message
import dns.query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import DnsConfig
from edge.dns.acl import RecursionPolicy
from edge.dns.engine import Engine, Forward
from edge.dns.forwarder import Forwarder
from edge.dns.zonedata import make_preparer
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot

SNAPSHOT = build_snapshot(parse_view(demo_document()), [make_preparer()])


def _delegating_document() -> dict:
    """The demo view plus a zone cut and CNAMEs leaving the local zones (answers that go upstream)."""
    document = demo_document()
    document["cloud"]["dns_records"] += [
        {"name": "sub.demo.example", "type": "NS", "value": "ns1.sub.demo.example", "ttl": 300},
        {"name": "ns1.sub.demo.example", "type": "A", "value": "192.0.2.53", "ttl": 300},
        {"name": "alias.demo.example", "type": "CNAME", "value": "host.upstream.test", "ttl": 300},
        {"name": "into.demo.internal", "type": "CNAME", "value": "www.sub.demo.example", "ttl": 300},
    ]
    return document


DELEGATING = build_snapshot(parse_view(_delegating_document()), [make_preparer()])
CONFIG = DnsConfig()
ENGINE = Engine(CONFIG, Forwarder(CONFIG), RecursionPolicy())
SEEDS = [dns.message.make_query(name, rtype, **kwargs).to_wire() for name, rtype, kwargs in [
    ("ip-127-0-0-1.demo.internal", "A", {}),
    ("www.demo.example", "A", {"use_edns": 0}),
    ("nope.demo.internal", "AAAA", {"want_dnssec": True}),
    ("1.0.0.127.in-addr.arpa", "PTR", {"use_edns": 0, "payload": 4096}),
    ("example.com", "ANY", {}),
    ("alias.demo.example", "A", {"use_edns": 0}),
    ("x.sub.demo.example", "AAAA", {}),
    ("into.demo.internal", "TXT", {"want_dnssec": True}),
]] + [b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03a.b\x02\xc3\xa9\x04demo\x08internal\x00\x00\x01\x00\x01"]


def check(data: bytes, udp: bool) -> None:
    for address, snapshot in (("127.0.0.1", SNAPSHOT), ("127.0.0.9", SNAPSHOT), ("127.0.0.1", DELEGATING),
                              ("127.0.0.9", DELEGATING)):
        reply = ENGINE.answer(data, snapshot, "", address, 1000.0, udp)
        assert reply is None or isinstance(reply, (bytes, Forward))
        if isinstance(reply, bytes):
            assert len(reply) >= 12
            assert reply[:2] == data[:2]
            assert reply[2] & 0x80  # always a response
            if udp:
                assert len(reply) <= 1232


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes(data, udp):
    check(data, udp)


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            data[position] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=800, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.booleans())
def test_mutated_valid_queries(data, udp):
    check(data, udp)


def test_garbage_through_sockets_then_still_serving(edge):
    import random
    rng = random.Random(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for seed in SEEDS * 40:
            data = bytearray(seed)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            sock.sendto(bytes(data[:rng.randint(0, len(data))]), ("127.0.0.1", edge.port))
        sock.sendto(b"\xff" * 4000, ("127.0.0.1", edge.port))
    with socket.create_connection(("127.0.0.1", edge.port), timeout=3) as stream:
        stream.sendall(b"\xff\xff" + b"\x00" * 1000)
    query = dns.message.make_query("ip-127-0-0-1.demo.internal", "A")
    reply = dns.query.udp(query, "127.0.0.1", port=edge.port, timeout=3)
    assert reply.answer[0][0].address == "127.0.0.1"
