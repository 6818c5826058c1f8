"""What metrics cost on the hot paths: the same request with the real tally and with a tally that does nothing.

``python -m pytest bench/bench_instrumentation.py --benchmark-enable --benchmark-columns=median``;
the ratio of each ``counted`` median to its ``uncounted`` twin is the instrumentation overhead
(target: at most 1.10).
"""

from __future__ import annotations

import dns.message
import pytest

from edge.config import Config, DnsConfig
from edge.dns.protocol import DnsDatagramProtocol
from edge.dns.service import DnsService
from edge.metrics import NullTally
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore


class CollectingTransport:
    def __init__(self) -> None:
        self.sent = 0

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent += 1

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("counted", [True, False], ids=["counted", "uncounted"])
def test_dns_udp_local_hit(benchmark, counted: bool) -> None:
    store = ViewStore()
    service = DnsService(Config(dns=DnsConfig(rate_limit=0.0)), store)
    if not counted:
        service.tally = NullTally("dns")
    store.swap(build_snapshot(parse_view(demo_document()), service.preparers), "source")
    protocol = DnsDatagramProtocol(service, "")
    transport = CollectingTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    wire = dns.message.make_query("ip-127-0-0-1.demo.internal", "A").to_wire()
    benchmark(protocol.datagram_received, wire, ("127.0.0.1", 5353))
    assert transport.sent >= 1
    assert bool(service.tally.raw) == counted
