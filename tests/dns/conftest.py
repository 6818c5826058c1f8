"""Fixtures: an edge DNS service on a uvloop thread, real upstream resolvers, and a dig wrapper."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from bench.common import free_port
from edge.config import Config, DnsConfig, Listen
from edge.dns.service import DnsService
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore


class EdgeDns:
    """A DnsService running on its own uvloop loop in a thread, like the server runs it."""

    def __init__(self, document: dict[str, Any], listen: tuple[str, ...] = ("127.0.0.1:0",), **dns: Any) -> None:
        self.config = Config(dns=DnsConfig(listen=tuple(Listen.parse(text) for text in listen), **dns))
        self.store = ViewStore()
        self.service = DnsService(self.config, self.store)
        self.load(document)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.service.start())
        self.addresses = self.service.addresses
        self.port = self.addresses[0][1]

    def load(self, document: dict[str, Any]) -> None:
        self.store.swap(build_snapshot(parse_view(document), self.service.preparers), "source")

    def call(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run(self, function: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return function()
        return self.call(wrapper())

    def port_for(self, network: str) -> int:
        return next(port for _, port, net in self.addresses if net == network)

    def close(self) -> None:
        try:
            self.call(self.service.stop(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture
def demo() -> dict[str, Any]:
    return copy.deepcopy(demo_document())


def delegating_document() -> dict[str, Any]:
    """The demo view with a zone cut below demo.example (NS records and glue in ``dns_records``)."""
    document = demo_document()
    document["cloud"]["dns_records"] += [
        {"name": "sub.demo.example", "type": "NS", "value": "ns1.sub.demo.example", "ttl": 300},
        {"name": "sub.demo.example", "type": "NS", "value": "ns.elsewhere.test", "ttl": 300},
        {"name": "ns1.sub.demo.example", "type": "A", "value": "192.0.2.53", "ttl": 300},
        {"name": "www.sub.demo.example", "type": "A", "value": "192.0.2.80", "ttl": 300},
    ]
    return document


@pytest.fixture
def edge_factory() -> Iterator[Callable[..., EdgeDns]]:
    started: list[EdgeDns] = []

    def start(document: dict[str, Any] | None = None, **kwargs: Any) -> EdgeDns:
        server = EdgeDns(document if document is not None else demo_document(), **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def edge(edge_factory: Callable[..., EdgeDns]) -> EdgeDns:
    """The demo view with listeners for the flat network and for ``vpc-demo``."""
    return edge_factory(listen=("127.0.0.1:0", "127.0.0.1:0@vpc-demo"))


class Dnsmasq:
    """A dnsmasq answering only from its command line (never from the internet)."""

    def __init__(self, *records: str, ttl: int = 1) -> None:
        if shutil.which("dnsmasq") is None:
            pytest.skip("dnsmasq not installed")
        self.port = free_port()
        self.args = ["dnsmasq", "--keep-in-foreground", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
                     "--no-hosts", "--no-poll", "--bind-interfaces", "--listen-address=127.0.0.1",
                     "--except-interface=nonexistent0", f"--port={self.port}", f"--local-ttl={ttl}",
                     "--local=/upstream.test/", "--log-facility=-", "--pid-file=", "--user=root",
                     "--group=root", *records]
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.process.stderr.read().decode()}")  # type: ignore[union-attr]
            time.sleep(0.02)
        raise RuntimeError("dnsmasq did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(5)


@pytest.fixture
def dnsmasq_factory() -> Iterator[Callable[..., Dnsmasq]]:
    started: list[Dnsmasq] = []

    def start(*records: str, ttl: int = 1) -> Dnsmasq:
        server = Dnsmasq(*records, ttl=ttl)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


UPSTREAM_RECORDS = (
    "--address=/www.upstream.test/192.0.2.10",
    "--host-record=host.upstream.test,192.0.2.11,2001:db8::11",
    "--txt-record=txt.upstream.test,hello upstream",
    "--cname=alias.upstream.test,host.upstream.test",
)


def big_txt_record(name: str, strings: int = 8) -> str:
    """A TXT record too big for one 1232-byte UDP answer (forces TCP)."""
    return f"--txt-record={name}," + ",".join("x" * 200 for _ in range(strings))


@dataclasses.dataclass
class DigResult:
    status: str
    flags: set[str]
    answer: list[str]
    authority: list[str]
    additional: list[str]
    opt: str
    raw: str


def dig(port: int, name: str, rtype: str = "A", *options: str, source: str | None = None,
        server: str = "127.0.0.1") -> DigResult:
    """Run ``dig`` and read its header, flags and sections."""
    args = ["dig", f"@{server}", "-p", str(port), name, rtype, "+time=2", "+tries=1", "+nocookie", *options]
    if source:
        args += ["-b", source]
    output = subprocess.run(args, capture_output=True, text=True, timeout=15, env={**os.environ, "HOME": "/tmp"}).stdout
    status = re.search(r"status: (\w+)", output)
    flags = re.search(r"flags: ([a-z ]*);", output)
    sections: dict[str, list[str]] = {"ANSWER": [], "AUTHORITY": [], "ADDITIONAL": []}
    current = None
    opt = ""
    for line in output.splitlines():
        heading = re.match(r";; (\w+) SECTION:", line)
        if heading:
            current = heading.group(1)
            continue
        if line.startswith("; EDNS:"):
            opt = line
        if not line.strip() or line.startswith(";"):
            if not line.strip():
                current = None
            continue
        if current in sections:
            sections[current].append(" ".join(line.split()))
    return DigResult(status.group(1) if status else "", set(flags.group(1).split()) if flags else set(),
                     sections["ANSWER"], sections["AUTHORITY"], sections["ADDITIONAL"], opt, output)
