"""The etcd view source against a real etcd member (and proxies in front of it)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import pytest

from edge.config import ViewConfig
from edge.errors import SourceError, ViewTooLarge
from edge.etcd import open_view_source
from edge.etcd.client import EtcdAddress, EtcdError
from edge.etcd.view_source import EtcdSource
from edge.view.demo import demo_document
from edge.view.formats import decode_view
from tests.etcd.server import RecordingProxy
from tests.support import free_port

FAST = ViewConfig(connect_timeout=0.5, read_timeout=0.5)


def view_bytes(serial: int) -> bytes:
    document = demo_document()
    document["serial"] = serial
    return json.dumps(document).encode()


def fetch(source: EtcdSource) -> bytes | None:
    return asyncio.run(source.fetch())


def test_addresses_parse() -> None:
    address = EtcdAddress.parse("etcd://10.0.0.1:2379,[fd00::2]:2379/edge/view")
    assert address.endpoints == (("10.0.0.1", 2379), ("fd00::2", 2379))
    assert address.key == b"edge/view" and address.scheme == "http"
    assert EtcdAddress.parse("etcds://h:1//edge/view%20x").key == b"/edge/view x"
    assert EtcdAddress.parse("etcds://h:1/k").scheme == "https"
    for bad in ("etcd://h:1", "etcd://h:1/", "etcd:///k", "etcd://h/k", "etcd://h:0/k", "http://h:1/k"):
        with pytest.raises(EtcdError):
            EtcdAddress.parse(bad)
    with pytest.raises(SourceError):
        open_view_source("etcd://nohost/k", FAST)


def test_view_from_etcd_is_delivered_then_polled_header_only(etcd) -> None:
    etcd.put("edge/view", view_bytes(1))
    proxy = RecordingProxy(etcd.endpoint).start()
    try:
        source = open_view_source(f"etcd://{proxy.endpoint}/edge/view", FAST)
        assert isinstance(source, EtcdSource)
        data = fetch(source)
        assert data is not None and decode_view(data).serial == 1
        assert fetch(source) is None
        assert fetch(source) is None
        # Unchanged polls moved only the header: no value crossed the wire.
        assert [("kvs" in e.response) for e in proxy.exchanges] == [True, False, False]
        assert all(len(json.dumps(e.response)) < 300 for e in proxy.exchanges[1:])
        assert [e.request.get("min_mod_revision") for e in proxy.exchanges[1:]] == [
            str(source.revision + 1)] * 2

        etcd.put("edge/view", view_bytes(2))
        data = fetch(source)
        assert data is not None and decode_view(data).serial == 2
        assert fetch(source) is None
        assert source.value_fetches == 2
    finally:
        proxy.close()


def test_missing_key_is_an_error_and_deletion_is_noticed(etcd) -> None:
    source = open_view_source(etcd.url("edge/view"), FAST)
    with pytest.raises(SourceError, match="key not found"):
        fetch(source)
    etcd.put("edge/view", view_bytes(1))
    assert fetch(source) is not None
    etcd.delete("edge/view")
    with pytest.raises(SourceError, match="key not found"):
        fetch(source)
    etcd.put("edge/view", view_bytes(1))
    assert fetch(source) is not None


def test_gzip_values_are_inflated_within_the_cap(etcd) -> None:
    etcd.put("v", gzip.compress(view_bytes(3)))
    assert decode_view(fetch(open_view_source(etcd.url("v"), FAST))).serial == 3
    small = ViewConfig(connect_timeout=0.5, read_timeout=0.5, max_size=4096)
    etcd.put("big", b"x" * 5000)
    with pytest.raises(ViewTooLarge):
        fetch(open_view_source(etcd.url("big"), small))
    etcd.put("bomb", gzip.compress(b" " * 100_000))
    with pytest.raises(ViewTooLarge):
        fetch(open_view_source(etcd.url("bomb"), small))
    etcd.put("broken", gzip.compress(view_bytes(1))[:40])
    with pytest.raises(SourceError, match="gzip"):
        fetch(open_view_source(etcd.url("broken"), FAST))


def test_failover_skips_dead_hanging_and_failing_members_and_remembers_the_live_one(etcd) -> None:
    etcd.put("edge/view", view_bytes(1))
    dead = f"127.0.0.1:{free_port()}"
    hanging = RecordingProxy(etcd.endpoint, mode="hang").start()
    failing = RecordingProxy(etcd.endpoint, mode="error").start()
    live = RecordingProxy(etcd.endpoint).start()
    try:
        source = open_view_source(f"etcd://{dead},{hanging.endpoint},{failing.endpoint},{live.endpoint}/edge/view", FAST)
        assert decode_view(fetch(source)).serial == 1
        assert source.client.endpoint == live.endpoint
        assert len(failing.exchanges) == 1 and len(live.exchanges) == 1
        # The next polls go straight to the member that answered.
        assert fetch(source) is None and fetch(source) is None
        assert len(failing.exchanges) == 1 and len(live.exchanges) == 3
        # When it dies, the client moves on (wrapping around) and the others can take over again.
        live.close()
        failing.mode = "forward"
        etcd.put("edge/view", view_bytes(2))
        assert decode_view(fetch(source)).serial == 2
        assert source.client.endpoint == failing.endpoint
    finally:
        for proxy in (hanging, failing, live):
            proxy.close()


def test_every_member_down_is_one_bounded_error_naming_each(etcd) -> None:
    ports = [free_port(), free_port()]
    source = open_view_source(f"etcd://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/edge/view", FAST)
    with pytest.raises(SourceError) as caught:
        fetch(source)
    assert f"127.0.0.1:{ports[0]}" in str(caught.value) and f"127.0.0.1:{ports[1]}" in str(caught.value)


def test_etcd_stopped_then_back_resumes_without_refetching_the_same_value(etcd) -> None:
    etcd.put("edge/view", view_bytes(1))
    source = open_view_source(etcd.url("edge/view"), FAST)
    assert fetch(source) is not None
    etcd.stop()
    with pytest.raises(SourceError):
        fetch(source)
    etcd.start()
    assert fetch(source) is None
    assert source.value_fetches == 1


def test_a_cluster_restored_to_an_older_revision_is_read_again(etcd) -> None:
    for serial in range(1, 6):
        etcd.put("edge/view", view_bytes(serial))
    source = open_view_source(etcd.url("edge/view"), FAST)
    assert decode_view(fetch(source)).serial == 5
    before = source.revision
    etcd.wipe()
    etcd.start()
    etcd.put("edge/view", view_bytes(6))
    data = fetch(source)
    assert data is not None and decode_view(data).serial == 6
    assert source.revision < before


@pytest.mark.parametrize(("body", "says"), [
    (b"hello", "not JSON"),
    # JSON, but not a range answer: a value that is not base64, a revision that is not a number, no header.
    (b'{"header":{"revision":"7"},"count":"1","kvs":[{"key":"aw==","value":"not base64!","mod_revision":"7"}]}',
     "malformed answer to /v3/kv/range"),
    (b'{"header":{"revision":"seven"},"count":"1"}', "malformed answer to /v3/kv/range"),
    (b'{"count":"1"}', "malformed answer to /v3/kv/range"),
])
def test_garbage_from_a_member_is_a_source_error(body: bytes, says: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def answer() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        connection.close()

    import threading
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(SourceError, match=says):
            fetch(open_view_source(f"etcd://127.0.0.1:{port}/k", FAST))
    finally:
        thread.join(2)
        listener.close()


def test_etcds_verifies_the_member_with_the_configured_ca(tmp_path) -> None:
    import os

    from tests.etcd.server import ETCD, EtcdServer, make_tls
    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    tls = make_tls(tmp_path / "tls")
    server = EtcdServer(tmp_path / "etcd-tls", tls=tls)
    server.start()
    try:
        server.put("edge/view", view_bytes(4))
        trusted = ViewConfig(connect_timeout=1, read_timeout=1, ca_file=str(tls.ca_file))
        assert decode_view(fetch(open_view_source(server.url("edge/view"), trusted))).serial == 4
        # Without the CA the member is not trusted; plain HTTP to a TLS port fails too.
        with pytest.raises(SourceError, match="TLS|certificate"):
            fetch(open_view_source(server.url("edge/view"), FAST))
        with pytest.raises(SourceError):
            fetch(open_view_source(f"etcd://{server.endpoint}/edge/view", FAST))
    finally:
        server.stop()


def test_edge_view_check_reads_etcd(etcd) -> None:
    import subprocess
    import sys
    etcd.put("edge/view", view_bytes(9))
    result = subprocess.run([sys.executable, "-m", "edge", "view", "check", etcd.url("edge/view")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "serial      9" in result.stdout
    result = subprocess.run([sys.executable, "-m", "edge", "view", "check", etcd.url("edge/absent")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "key not found" in result.stderr


def test_the_etcd_client_knows_nothing_of_the_configuration_or_the_token_keys() -> None:
    import subprocess
    import sys
    # edge.config checks etcd addresses with edge.etcd.client: the client importing the configuration
    # back would be an import cycle.
    code = "import sys, edge.etcd.client; print(sorted(m for m in sys.modules if m.startswith('edge.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert loaded.stdout.strip() == "['edge.errors', 'edge.etcd', 'edge.etcd.client']"
