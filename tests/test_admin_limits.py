"""The admin listener has the metadata listeners' limits, proven with a real `edge serve` and real sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import free_port, serve_argv, stop_session, wait_until

HEADER_TIMEOUT = 3.0
MAX_CONNECTIONS = 8


class Edge:
    def __init__(self, tmp_path: Path, workers: int = 1, config: Path | None = None) -> None:
        self.admin_port = free_port()
        self.log_path = tmp_path / "edge.log"
        self.log = open(self.log_path, "w")
        argv = serve_argv(tmp_path / "state", workers=workers, metadata_port=free_port(), dns_port=free_port(),
                          admin_port=self.admin_port)
        env = {**os.environ, "EDGE_METADATA_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}
        if config is None:
            env["EDGE_ADMIN_MAX_CONNECTIONS"] = str(MAX_CONNECTIONS)
        else:
            argv += ["--config", str(config)]
        self.process = subprocess.Popen(argv, stderr=self.log, env=env, start_new_session=True)
        wait_until(lambda: self.get("/healthz")[0] == 200, timeout=30)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.admin_port), timeout=10)

    def get(self, path: str) -> tuple[int, bytes]:
        with self.connect() as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            raw = read_until_closed(sock)
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        stop_session(self.process)
        self.log.close()


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def edge(tmp_path):
    started = Edge(tmp_path)
    yield started
    started.stop()


def send_until_refused(sock: socket.socket, chunk: bytes, limit: int) -> int:
    """Send ``chunk`` repeatedly, up to ``limit`` bytes, until the server stops taking them."""
    sent = 0
    try:
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def test_an_endless_request_line_or_header_is_answered_and_closed_and_memory_stays_bounded(edge):
    before = edge.rss_kib()
    for start, status in ((b"GET /", b"414"), (b"GET / HTTP/1.1\r\nX-Long: ", b"431")):
        with edge.connect() as sock:
            sock.settimeout(5)
            sock.sendall(start)
            send_until_refused(sock, b"a" * 65536, 64 << 20)
            sock.settimeout(10)
            raw = read_until_closed(sock)
        assert raw.startswith(b"HTTP/1.1 " + status), raw[:80]
    for garbage in (b"\xff\xfe\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
        with edge.connect() as sock:
            sock.sendall(garbage)
            assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    # The 64 MiB each did not stay in (or pass through) the process's memory.
    assert edge.rss_kib() - before < 16 * 1024
    assert edge.get("/healthz") == (200, b"ok\n")


def test_admin_connections_are_capped_and_idle_ones_closed_after_the_head_timeout(edge):
    held = [edge.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        with edge.connect() as refused:
            raw = read_until_closed(refused)
        assert raw.startswith(b"HTTP/1.1 429 "), raw[:80]
        # Connections that never complete a request head are closed after the head timeout:
        # idle ones, and one that sends a head and never finishes it.
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        wait_until(lambda: all(closed_by_server(sock) for sock in held), timeout=HEADER_TIMEOUT * 10)
    finally:
        for sock in held:
            sock.close()
    # Their places are free again, and the refusal was counted.
    assert edge.get("/healthz") == (200, b"ok\n")
    status, metrics = edge.get("/metrics")
    assert status == 200 and b'edge_connections_refused_total{protocol="admin"} 1.0' in metrics
    # A kept-alive connection is served, then closed when it stays idle as long.
    with edge.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        wait_until(lambda: closed_by_server(sock), timeout=HEADER_TIMEOUT * 10)


def test_sighup_gives_the_admin_listener_new_limits(tmp_path):
    """With workers the supervisor serves the admin listener; its reload applies the new cap."""
    config = tmp_path / "edge.toml"
    config.write_text("[admin]\nmax_connections = 8\n")
    edge = Edge(tmp_path, workers=2, config=config)
    try:
        config.write_text("[admin]\nmax_connections = 2\n")
        edge.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in edge.log_path.read_text(), timeout=30)
        held = [edge.connect() for _ in range(2)]
        try:
            with edge.connect() as refused:
                assert read_until_closed(refused).startswith(b"HTTP/1.1 429 ")
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: edge.get("/healthz") == (200, b"ok\n"), timeout=30)
    finally:
        edge.stop()
