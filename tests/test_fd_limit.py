"""File descriptors at start: the soft limit is raised to the hard one, and a hard limit below the
configuration's needs is logged with the numbers.  Each test starts `edge serve` with its own limits."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
from pathlib import Path

import pytest

from edge.fd_limit import SLACK
from tests.support import free_port, serve_argv, stop_session, wait_until

WARNING = "file descriptor limit below what the configuration needs"


class Edge:
    def __init__(self, tmp_path: Path, soft: int, hard: int, env: dict[str, str]) -> None:
        self.metadata_port = free_port()
        self.admin_port = free_port()
        self.log_path = tmp_path / "edge.log"
        self.log = open(self.log_path, "w")
        argv = serve_argv(tmp_path / "state", metadata_port=self.metadata_port, dns_port=free_port(),
                          admin_port=self.admin_port)

        def low_limits() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        self.process = subprocess.Popen(argv, stderr=self.log, env={**os.environ, **env}, start_new_session=True,
                                        preexec_fn=low_limits)
        wait_until(lambda: "edge started" in self.logs(), timeout=30)

    def logs(self) -> str:
        return self.log_path.read_text()

    def limits(self) -> tuple[int, int]:
        for line in Path(f"/proc/{self.process.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
        raise AssertionError("no open files limit")

    def stop(self) -> None:
        stop_session(self.process)
        self.log.close()


@pytest.fixture
def start(tmp_path):
    started: list[Edge] = []

    def starter(soft: int, hard: int, **env: str) -> Edge:
        edge = Edge(tmp_path / str(len(started)), soft, hard, env)
        started.append(edge)
        return edge

    (tmp_path / "0").mkdir()
    (tmp_path / "1").mkdir()
    yield starter
    for edge in started:
        edge.stop()


def test_a_hard_limit_below_the_configuration_is_raised_to_and_logged_with_the_numbers(start):
    edge = start(256, 512)
    assert edge.limits() == (512, 512)
    lines = [line for line in edge.logs().splitlines() if WARNING in line]
    assert len(lines) == 1, edge.logs()
    needed = 10_000 + 1024 + 64 + SLACK  # metadata, DNS TCP and admin connection caps (defaults) and slack
    for field in ("level=warning", "soft=512", "hard=512", "metadata=10000", "dns_tcp=1024", "admin=64",
                  f"slack={SLACK}", f"needed={needed}"):
        assert field in lines[0], (field, lines[0])
    assert "file descriptor limit raised" in edge.logs() and "was=256" in edge.logs()


def test_idle_connections_beyond_the_soft_limit_no_longer_block_requests(start):
    """The issue's case: with `ulimit -n 400`, 600 idle connections kept legitimate ones out."""
    caps = {"EDGE_METADATA_MAX_CONNECTIONS": "1000", "EDGE_METADATA_MAX_CONNECTIONS_PER_SOURCE": "1000",
            "EDGE_DNS_TCP_MAX_CONNECTIONS": "200", "EDGE_METADATA_HEADER_TIMEOUT": "60"}
    edge = start(400, 4096, **caps)
    assert edge.limits() == (4096, 4096)
    assert WARNING not in edge.logs()
    idle = []
    try:
        for _ in range(600):
            idle.append(socket.create_connection(("127.0.0.1", edge.metadata_port), timeout=10))
        with socket.create_connection(("127.0.0.1", edge.metadata_port), timeout=10) as sock:
            sock.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"i-0de0000000000001")
    finally:
        for sock in idle:
            sock.close()
