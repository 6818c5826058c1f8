"""What metrics cost on the hot paths: the same request with the real tally and with a tally that does nothing.

``python -m pytest bench/bench_instrumentation.py --benchmark-enable --benchmark-columns=median``;
the ratio of each ``counted`` median to its ``uncounted`` twin is the instrumentation overhead
(target: at most 1.10).
"""

from __future__ import annotations

import dns.message
import pytest

from bench.bench_dns import CollectingTransport
from bench.bench_metadata import _Transport as HttpTransport
from edge.config import Config, DnsConfig
from edge.dns.protocol import DnsDatagramProtocol
from edge.dns.service import DnsService
from edge.metrics import NullTally
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore


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


@pytest.mark.parametrize("counted", [True, False], ids=["counted", "uncounted"])
def test_metadata_keep_alive_request(benchmark, tmp_path, counted: bool) -> None:
    import uvloop

    from edge.config import Listen, MetadataConfig, ViewConfig
    from edge.metadata import tokens
    from edge.metadata.identity import ensure_signer
    from edge.metadata.protocol import MetadataProtocol
    from edge.metadata.service import MetadataService, build_handler

    config = Config(view=ViewConfig(state_dir=str(tmp_path)),
                    metadata=MetadataConfig(listen=(Listen("127.0.0.1", 0),), rate=0.0))
    handler = build_handler(config, tokens.ensure_key_file(tmp_path / "keys"), ensure_signer(tmp_path))
    store = ViewStore("bench")
    store.swap(build_snapshot(parse_view(demo_document())), "source")
    loop = uvloop.new_event_loop()

    async def make() -> tuple[MetadataService, MetadataProtocol]:
        service = MetadataService(config, store, lambda: None)  # type: ignore[arg-type]
        service.handler = handler
        if not counted:
            service.tally = NullTally("http")
        protocol = MetadataProtocol(service, "")
        protocol.connection_made(HttpTransport())  # type: ignore[arg-type]
        return service, protocol

    service, protocol = loop.run_until_complete(make())
    data = (b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
    benchmark(protocol.data_received, data)
    assert protocol.transport.written > 0  # type: ignore[union-attr]
    assert bool(service.tally.replies) == counted
    loop.close()
