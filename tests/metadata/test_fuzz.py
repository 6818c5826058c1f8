"""Random bytes and random valid-looking requests through the protocol: never a crash, always bounded."""

from __future__ import annotations

import asyncio
import re
import socket

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imds_harness import connect, make_config, parse, read_all, request

from edge.metadata.identity import ensure_signer
from edge.metadata.protocol import MAX_QUEUED, MetadataProtocol
from edge.metadata.service import MetadataService, build_handler
from edge.metadata.tokens import ensure_key_file
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore

STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
FUZZ = {"deadline": None, "derandomize": True, "database": None,
        "suppress_health_check": [HealthCheck.function_scoped_fixture]}
"""Deterministic runs: the same examples every time, nothing written to the working tree."""


class MockTransport:
    def __init__(self, peer: str = "127.0.0.1") -> None:
        self.peer = peer
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def get_extra_info(self, name: str, default=None):
        return (self.peer, 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """A service with a handler but no listeners, on its own uvloop loop."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    config = make_config(tmp_path, rate=0.0)
    store = ViewStore("fuzz")
    store.swap(build_snapshot(parse_view(demo_document())), "source")

    async def refresh() -> None:
        return None

    service = MetadataService(config, store, refresh)
    service.handler = build_handler(config, ensure_key_file(tmp_path / "keys"), ensure_signer(tmp_path))
    loop = uvloop.new_event_loop()
    yield service, loop
    loop.close()


def feed(offline, chunks: list[bytes], peer: str = "127.0.0.1") -> tuple[MockTransport, MetadataProtocol]:
    service, loop = offline

    async def run() -> tuple[MockTransport, MetadataProtocol]:
        transport = MockTransport(peer)
        protocol = MetadataProtocol(service, "")
        protocol.connection_made(transport)  # type: ignore[arg-type]
        for chunk in chunks:
            protocol.data_received(chunk)
            if transport.closed:
                break
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport, protocol

    return loop.run_until_complete(run())


def check_bounded(transport: MockTransport, protocol: MetadataProtocol) -> None:
    for data in transport.written:
        assert data.startswith(b"HTTP/1.1 "), data[:40]
    assert len(protocol._target) <= protocol.limits.max_url_bytes + 65536
    assert len(protocol.queue or ()) <= MAX_QUEUED


@settings(max_examples=300, **FUZZ)
@given(st.lists(st.binary(max_size=512), max_size=8))
def test_random_bytes(offline, chunks):
    transport, protocol = feed(offline, chunks)
    check_bounded(transport, protocol)
    assert offline[0].connections == set() and offline[0].per_source == {}


METHODS = st.sampled_from([b"GET", b"HEAD", b"PUT", b"POST", b"OPTIONS", b"DELETE", b"get", b"PATCH"])
SEGMENTS = st.sampled_from([b"", b"latest", b"2009-04-04", b"meta-data", b"api", b"token", b"user-data", b"iam",
                            b"security-credentials", b"instance-id", b"dynamic", b"instance-identity", b"..",
                            b"%2e%2e", b"placement", b"public-keys", b"0", b"\xff", b"?x=1", b"#f"])
HEADERS = st.sampled_from([b"X-aws-ec2-metadata-token", b"X-aws-ec2-metadata-token-ttl-seconds", b"X-Forwarded-For",
                           b"X-Edge-Network-Id", b"X-Neutron-Network-ID", b"Connection", b"Content-Length",
                           b"Transfer-Encoding", b"Host", b"Expect"])
VALUES = st.one_of(st.sampled_from([b"60", b"0", b"21601", b"close", b"keep-alive", b"127.0.0.2", b"chunked",
                                    b"vpc-demo", b"5", b"-1", b"100-continue", b""]),
                   st.binary(max_size=64).filter(lambda v: b"\r" not in v and b"\n" not in v))


@st.composite
def requests(draw) -> bytes:
    method = draw(METHODS)
    path = b"/" + b"/".join(draw(st.lists(SEGMENTS, max_size=6)))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1"]))
    headers = b"".join(name + b": " + value + b"\r\n"
                       for name, value in draw(st.lists(st.tuples(HEADERS, VALUES), max_size=5)))
    body = draw(st.sampled_from([b"", b"", b"x" * 5]))
    return method + b" " + path + b" " + version + b"\r\n" + headers + b"\r\n" + body


@settings(max_examples=400, **FUZZ)
@given(st.lists(requests(), min_size=1, max_size=6), st.integers(min_value=1, max_value=64),
       st.sampled_from(["127.0.0.1", "127.0.0.3", "127.0.9.9"]))
def test_random_valid_looking_requests(offline, pipelined, chunk_size, peer):
    stream = b"".join(pipelined)
    chunks = [stream[i:i + chunk_size] for i in range(0, len(stream), chunk_size)]
    transport, protocol = feed(offline, chunks, peer)
    check_bounded(transport, protocol)
    statuses = [int(m) for m in STATUS.findall(b"".join(transport.written))]
    # One answer per request, plus at most one error answer for trailing garbage before the close.
    assert len(statuses) <= len(pipelined) + 1
    assert set(statuses) <= {200, 400, 401, 403, 404, 405, 413, 414, 429, 431, 503}
    assert 500 not in statuses


@settings(max_examples=25, **FUZZ)
@given(st.lists(st.binary(min_size=1, max_size=2048), min_size=1, max_size=4))
def test_random_bytes_over_a_real_socket(server, chunks):
    with connect(server.port) as sock:
        sock.settimeout(2)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            read_all(sock)
        except OSError:  # the server may answer 400 and close before all bytes are sent
            pass
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id"))[0] == 200


def test_client_that_does_not_read_stops_being_read(offline):
    """Answers pile up only to the transport's high-water mark: then edge stops reading the client."""
    service, loop = offline

    class SlowReader(MockTransport):
        def __init__(self) -> None:
            super().__init__()
            self.buffered = 0
            self.protocol: MetadataProtocol | None = None

        def write(self, data: bytes) -> None:
            super().write(data)
            self.buffered += len(data)
            if self.buffered > 65536 and self.protocol is not None and not self.protocol.writing_paused:
                self.protocol.pause_writing()

    async def run() -> tuple[bool, bool]:
        transport = SlowReader()
        protocol = MetadataProtocol(service, "")
        transport.protocol = protocol
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
        paused_while_full = transport.paused
        transport.buffered = 0
        protocol.resume_writing()
        resumed = not transport.paused
        protocol.connection_lost(None)
        return paused_while_full, resumed

    paused_while_full, resumed = loop.run_until_complete(run())
    assert paused_while_full and resumed
