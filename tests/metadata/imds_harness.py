"""Test helpers: a metadata service running on a uvloop loop in a background thread, and raw-socket helpers.

Tests talk to it over real loopback sockets; each simulated instance binds its
client socket to its own 127.0.0.0/8 address.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import uvloop

from edge.config import Config, CredentialsConfig, Listen, MetadataConfig, ViewConfig
from edge.metadata.service import MetadataService, TokenKeyProvider
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore


def demo(**changes: Any) -> dict[str, Any]:
    """The demo view; ``changes`` maps instance id -> dict merged into that instance."""
    document = demo_document()
    for instance in document["instances"]:
        extra = changes.get(instance["id"])
        if extra:
            for key, value in extra.items():
                if isinstance(value, dict) and isinstance(instance.get(key), dict):
                    instance[key] = {**instance[key], **value}
                else:
                    instance[key] = value
    return document


def add_instance(document: dict[str, Any], number: int, address: str, **fields: Any) -> dict[str, Any]:
    """A copy of ``document`` with one more flat-network instance at ``address``."""
    document = copy.deepcopy(document)
    template = copy.deepcopy(document["instances"][1])
    template.update(id=f"i-0ad{number:013x}", reservation_id=f"r-0ad{number:05x}")
    interface = template["interfaces"][0]
    mac = f"d0:0d:ad:{number >> 16 & 255:02x}:{number >> 8 & 255:02x}:{number & 255:02x}"
    interface.update(id=f"eni-0ad{number:05x}", mac=mac,
                     private_ips=[address], public_ip=None)
    template.update(fields)
    document["instances"].append(template)
    document["serial"] += 1
    return document


class Harness:
    """One service on its own loop thread; ``call`` runs a function on that loop."""

    def __init__(self, config: Config, document: dict[str, Any] | None,
                 on_refresh: Callable[[Harness], Any] | None = None,
                 token_keys: TokenKeyProvider | None = None) -> None:
        self.config = config
        self.on_refresh = on_refresh
        self.refreshes = 0
        self.loop = uvloop.new_event_loop()
        self.store = ViewStore("test")
        if document is not None:
            self.store.swap(build_snapshot(parse_view(document)), "source")
        self.service = MetadataService(config, self.store, self._refresh, token_keys=token_keys)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.service.start())
        self.ports = [port for _, port in self.service.addresses]
        self.port = self.ports[0]

    async def _refresh(self) -> None:
        self.refreshes += 1
        if self.on_refresh is not None:
            result = self.on_refresh(self)
            if asyncio.iscoroutine(result):
                await result

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[[], Any]) -> Any:
        done: Future[Any] = Future()

        def invoke() -> None:
            try:
                done.set_result(function())
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return done.result(10)

    def swap(self, document: dict[str, Any]) -> None:
        snapshot = build_snapshot(parse_view(document))
        self.call(lambda: self.store.swap(snapshot, "source"))

    def close(self) -> None:
        try:
            self.run(self.service.stop(0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def make_config(tmp_path: Any, credentials: CredentialsConfig | None = None, **metadata: Any) -> Config:
    fields: dict[str, Any] = {"listen": (Listen("127.0.0.1", 0),)}
    fields.update(metadata)
    if credentials is not None:
        fields["credentials"] = credentials
    return Config(view=ViewConfig(state_dir=str(tmp_path / "state")), metadata=MetadataConfig(**fields))


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``data`` from ``source`` and read until the server closes."""
    with connect(port, source) as sock:
        sock.sendall(data)
        return read_all(sock)


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            source: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 169.254.169.254", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode(), source)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-case headers, body) of one complete response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def token(port: int, ttl: int = 60, source: str = "127.0.0.1") -> str:
    status, _, body = parse(request(port, "PUT", "/latest/api/token",
                                    {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)}, source))
    assert status == 200
    return body.decode()


