"""Rate limiting per source address and no amplification for strangers."""

from __future__ import annotations

import socket
import time

import dns.message
import dns.query
import dns.rdatatype

from edge.ratelimit import RateLimiter


def burst(port: int, source: str, count: int, name: str = "ip-127-0-0-1.demo.internal") -> int:
    """Send ``count`` queries back to back from ``source``; return how many were answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        wire = dns.message.make_query(name, "A").to_wire()
        for _ in range(count):
            sock.sendto(wire, ("127.0.0.1", port))
        sock.settimeout(0.5)
        answered = 0
        try:
            while True:
                sock.recv(4096)
                answered += 1
        except TimeoutError:
            return answered


def test_rate_limit_per_source_address(edge_factory):
    server = edge_factory(rate_limit=50.0)
    answered = burst(server.port, "127.0.0.1", 300)
    assert 50 <= answered < 120  # the burst allowance plus what refills while sending
    assert server.service.limiter.refused >= 150
    # another client is unaffected
    assert burst(server.port, "127.0.0.2", 20) == 20


def test_rate_limit_refills(edge_factory):
    server = edge_factory(rate_limit=50.0)
    burst(server.port, "127.0.0.1", 200)
    time.sleep(0.5)
    assert burst(server.port, "127.0.0.1", 10) == 10


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(10.0, burst=10.0, max_entries=100)
    for index in range(10_000):
        limiter.allow(f"10.0.{index // 256}.{index % 256}", 0.0)
        assert len(limiter) <= 100


def test_rate_limiter_token_bucket_arithmetic():
    limiter = RateLimiter(10.0, burst=10.0, max_entries=100)
    assert all(limiter.allow("a", 0.0) for _ in range(10))
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("a", 0.1)  # one token back after 100 ms
    assert not limiter.allow("a", 0.1)
    assert RateLimiter(0.0, burst=1.0, max_entries=100).allow("a", 0.0)  # disabled


def test_small_any_from_a_stranger_gets_no_large_answer(edge_factory, demo):
    demo["cloud"]["dns_records"] += [{"name": name, "type": "TXT", "value": f"record {n} " + "z" * 200}
                                     for n in range(10) for name in ("demo.example", "big.demo.example")]
    server = edge_factory(demo)
    for name in ("demo.example", "big.demo.example", "example.com", "demo.internal", "100.51.198.in-addr.arpa"):
        query = dns.message.make_query(name, "ANY", use_edns=0, payload=4096)
        wire = query.to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.9", 0))
            sock.settimeout(2)
            sock.sendto(wire, ("127.0.0.1", server.port))
            reply = sock.recv(65535)
        parsed = dns.message.from_wire(reply)
        assert len(parsed.answer) <= 1, name
        assert len(reply) <= 4 * len(wire), (name, len(reply), len(wire))
    hinfo = dns.message.from_wire(reply_to(server.port, "big.demo.example"))
    assert hinfo.answer[0].rdtype == dns.rdatatype.HINFO


def reply_to(port: int, name: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.9", 0))
        sock.settimeout(2)
        sock.sendto(dns.message.make_query(name, "ANY").to_wire(), ("127.0.0.1", port))
        return sock.recv(65535)
