"""The DNS rate limit of a gateway with several workers (`edge serve --workers 2`)."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time

import dns.message
import pytest

from tests.metadata.test_workers import Workers
from tests.support import wait_until

RATE = 10.0
"""``dns.rate_limit``: packets per second per source address, and (one second of it) the burst."""
BURST = 10
SLACK = 3
"""Queries two workers may both let through when they update one bucket at the same instant (the
table is lock-free, documented as approximate); below the BURST a second table would add."""
QUIET = 3.0
"""Seconds without a reply after which the replies still missing are counted as dropped."""


@pytest.fixture
def gateway(tmp_path):
    # The metadata limit off: what is measured is DNS's own budget.
    started = Workers(tmp_path, {"EDGE_DNS_RATE_LIMIT": str(RATE), "EDGE_METADATA_RATE": "0"})
    yield started
    started.stop()


def flood(port: int, count: int) -> tuple[int, float]:
    """``count`` queries from 127.0.0.1, each from a socket (source port) of its own, so the kernel
    spreads them over the workers' SO_REUSEPORT listeners.  Returns the replies and the seconds from
    the first query to the last reply (the limiter saw every query it let through within them)."""
    wire = dns.message.make_query("ip-127-0-0-1.demo.internal", "A").to_wire()
    sockets = []
    selector = selectors.DefaultSelector()
    try:
        first = time.monotonic()
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            sock.sendto(wire, ("127.0.0.1", port))
        answered = 0
        last = first
        while answered < count:
            ready = selector.select(timeout=QUIET)
            if not ready:
                break
            for key, _ in ready:
                key.fileobj.recv(4096)  # type: ignore[union-attr]
                selector.unregister(key.fileobj)
                answered += 1
            last = time.monotonic()
        return answered, last - first
    finally:
        selector.close()
        for sock in sockets:
            sock.close()


def test_the_dns_rate_limit_holds_per_gateway_across_workers_and_restarts(gateway):
    wait_until(lambda: gateway.serving_workers() == 2, timeout=60)
    answered, elapsed = flood(gateway.dns_port, 400)
    # Each worker received about half: with a table of its own, each would grant a whole burst.
    # Together they granted one: the burst, plus what the rate refilled meanwhile.
    assert BURST <= answered <= BURST + RATE * elapsed + SLACK, (answered, elapsed)

    # A restarted worker maps the same table: still one budget, not a fresh one of its own.
    victim = gateway.workers()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(gateway.workers()) == 2 and victim not in gateway.workers(), timeout=30)
    wait_until(lambda: gateway.serving_workers() == 3, timeout=60)
    answered, elapsed = flood(gateway.dns_port, 400)
    assert answered <= BURST + RATE * elapsed + SLACK, (answered, elapsed)
