"""Fixtures for the Eucalyptus drop-in: GNI documents, intip maps, a stand-in controller."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def stop_edge(process: subprocess.Popen) -> None:
    """SIGTERM and up to 15 s for a clean exit; SIGKILL if it is still running after that."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()


@dataclass
class StandInController:
    """The controller's metadata service on port 8773, reduced to what the tests need.

    It identifies the instance the way the real one does (``MetadataPipeline.java``):
    ``Euca-Instance-Id`` from 127.0.0.1, otherwise the connection's source address.
    (``emulator.py`` is the full controller; this one is for the cache's unit tests.)
    """

    by_address: dict[str, str] = field(default_factory=dict)
    """private address -> instance id"""
    data: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """instance id -> relative path (``latest/meta-data/ami-id``) -> body"""
    down: bool = False
    starting: bool = False
    delay: float = 0.0
    peers: list[str] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def add(self, instance_id: str, address: str, credentials_expiration: str | None = None) -> None:
        self.by_address[address] = instance_id
        suffix = instance_id[-4:]
        self.data[instance_id] = {
            "latest/meta-data/": b"ami-id\nhostname\ninstance-id\ninstance-type\nlocal-ipv4\npublic-keys/",
            "latest/meta-data/ami-id": f"emi-{suffix}0000".encode(),
            "latest/meta-data/instance-type": b"m1.small",
            "latest/meta-data/instance-id": instance_id.encode(),
            "latest/meta-data/public-keys/": b"0=admin",
            "latest/meta-data/public-keys/0/openssh-key": f"ssh-rsa AAAA{suffix} admin".encode(),
            "latest/user-data": f"#!/bin/sh\necho {instance_id}\n".encode(),
            "latest/meta-data/iam/security-credentials/role": json.dumps({
                "Code": "Success", "AccessKeyId": f"AKID{suffix}", "SecretAccessKey": "secret",
                "Token": "token", "Expiration": credentials_expiration or "2099-01-01T00:00:00Z"}).encode(),
        }


def _handler(controller: StandInController) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if controller.delay:
                time.sleep(controller.delay)
            if controller.down:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            peer = self.client_address[0]
            controller.peers.append(peer)
            header = self.headers.get("Euca-Instance-Id")
            instance_id = header if header and peer == "127.0.0.1" else controller.by_address.get(peer, "")
            path = self.path.lstrip("/")
            controller.requests.append((instance_id, path))
            body = controller.data.get(instance_id, {}).get(path)
            if controller.starting:
                body = b"System is still starting up"
            status = 200 if body is not None else 404
            body = body if body is not None else b"not found"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def controller() -> Iterator[StandInController]:
    stand_in = StandInController()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stand_in))
    server.daemon_threads = True
    port = server.server_address[1]
    stand_in.url = f"http://127.0.0.1:{port}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()
