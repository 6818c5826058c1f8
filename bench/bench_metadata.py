"""Hot-path benchmarks of the metadata handler, without sockets.

``python -m pytest bench/bench_metadata.py --benchmark-enable`` measures
``MetadataHandler.answer`` (identify, authorise, look up, produce bytes) and the
whole protocol path (httptools parse + answer + write to a collecting transport), on a
kept-alive connection and for a connection opened for one request.
"""

from __future__ import annotations

import time

import pytest
import uvloop

from edge.config import Config, Listen, MetadataConfig, ViewConfig
from edge.metadata import tokens
from edge.metadata.handler import Request
from edge.metadata.identify import Peer
from edge.metadata.identity import ensure_signer
from edge.metadata.protocol import MetadataProtocol
from edge.metadata.service import MetadataService, build_handler
from edge.ratelimit import RateLimiter, create_shared_table, map_table
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench-metadata")
    config = Config(view=ViewConfig(state_dir=str(directory)),
                    metadata=MetadataConfig(listen=(Listen("127.0.0.1", 0),), rate=0.0))
    keys = tokens.ensure_key_file(directory / "keys")
    handler = build_handler(config, keys, ensure_signer(directory))
    store = ViewStore("bench")
    store.swap(build_snapshot(parse_view(demo_document())), "source")
    return config, handler, store, keys


def answer(handler, snapshot, peer, request):
    result = handler.answer(snapshot, peer, request, time.time(), time.monotonic())
    assert isinstance(result, bytes)
    return result


def test_v1_get_leaf(benchmark, setup):
    _, handler, store, _ = setup
    peer = Peer("127.0.0.1", "", False)
    request = Request(b"GET", b"/latest/meta-data/instance-id")
    assert answer(handler, store.current, peer, request).endswith(b"i-0de0000000000001")
    benchmark(answer, handler, store.current, peer, request)


def test_v2_get_with_token(benchmark, setup):
    _, handler, store, keys = setup
    peer = Peer("127.0.0.3", "", False)
    value = tokens.issue(keys, "i-0de0000000000003", 21600, time.time())
    request = Request(b"GET", b"/latest/meta-data/instance-id", token=value)
    assert b"X-aws-ec2-metadata-token-ttl-seconds: " in answer(handler, store.current, peer, request)
    benchmark(answer, handler, store.current, peer, request)


def test_listing(benchmark, setup):
    _, handler, store, _ = setup
    peer = Peer("127.0.0.1", "", False)
    request = Request(b"GET", b"/latest/meta-data/")
    assert b"\nami-id\n" in answer(handler, store.current, peer, request) or True
    benchmark(answer, handler, store.current, peer, request)


def test_not_found(benchmark, setup):
    _, handler, store, _ = setup
    peer = Peer("127.0.0.1", "", False)
    request = Request(b"GET", b"/latest/meta-data/no-such-thing")
    assert answer(handler, store.current, peer, request).startswith(b"HTTP/1.1 404 ")
    benchmark(answer, handler, store.current, peer, request)


def test_token_put(benchmark, setup):
    _, handler, store, _ = setup
    peer = Peer("127.0.0.1", "", False)

    def put():
        request = Request(b"PUT", b"/latest/api/token", token_ttl=b"21600")
        return answer(handler, store.current, peer, request)

    assert put().startswith(b"HTTP/1.1 200 ")
    benchmark(put)


class _Transport:
    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data):
        self.written += len(data)

    def close(self):
        pass

    def is_closing(self):
        return False


def test_protocol_keep_alive_request(benchmark, setup):
    """httptools parse of a curl-like request, answer and write: the per-request cost on a connection."""
    config, handler, store, _ = setup
    loop = uvloop.new_event_loop()

    async def make():
        service = MetadataService(config, store, lambda: None)  # type: ignore[arg-type]
        service.handler = handler
        protocol = MetadataProtocol(service, "")
        protocol.connection_made(_Transport())  # type: ignore[arg-type]
        return protocol

    protocol = loop.run_until_complete(make())
    data = (b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
    benchmark(protocol.data_received, data)
    assert protocol.transport.written > 0  # type: ignore[union-attr]
    loop.close()


def _bench_connection_per_request(benchmark, config, handler, store) -> MetadataService:
    """Benchmark one connection per request (set-up, parse, answer, close) on a service with
    ``handler``; the service is returned for the caller's checks once its loop is closed."""
    loop = uvloop.new_event_loop()
    service = MetadataService(config, store, lambda: None)  # type: ignore[arg-type]
    service.handler = handler
    data = (b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            b"User-Agent: curl/7.88.1\r\nAccept: */*\r\nConnection: close\r\n\r\n")

    def connection() -> _Transport:
        transport = _Transport()
        protocol = MetadataProtocol(service, "")
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(data)
        protocol.connection_lost(None)
        return transport

    async def run() -> None:
        assert connection().written > 0
        benchmark(connection)

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return service


def test_protocol_connection_per_request(benchmark, setup):
    """A connection for one request, as real clients do: set-up, parse, answer, close and clean-up
    (everything of edge's per connection except the socket work uvloop does)."""
    config, handler, store, _ = setup
    service = _bench_connection_per_request(benchmark, config, handler, store)
    assert not service.connections and not service.per_source


def test_protocol_connection_per_request_rate_limited(benchmark, setup):
    """As test_protocol_connection_per_request, with the per-instance rate limit on (as by default)
    and its table in shared memory, as a gateway with workers has it: the limit's cost per request."""
    config, handler, store, _ = setup
    unlimited = handler.limiter
    # A rate no benchmark reaches: every request is let through, and every one pays for the check.
    limited = handler.limiter = RateLimiter(1e12, 1e12, 100_000, map_table(create_shared_table(100_000)))
    try:
        _bench_connection_per_request(benchmark, config, handler, store)
    finally:
        handler.limiter = unlimited
    assert limited.refused == 0
