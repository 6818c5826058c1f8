"""Three gateways on distinct loopback addresses sharing a token key file and a control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.generate import generate_view
from tests.conftest import ControlPlane, _handler
from tests.etcd.server import ETCD, EtcdServer
from tests.fleet.gateway import Gateway
from tests.support import wait_until

GATEWAY_HOSTS = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
INSTANCES = 30
POLL_INTERVAL = 0.5
BACKOFF_MAX = 1.0
JITTER = 0.2


class StoppableControlPlane(ControlPlane):
    """The shared test control plane, on a port that survives stop() and start()."""

    def start(self, port: int = 0) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/view.json"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def restart(self) -> None:
        self.start(self.port)


def fleet_document(serial: int, instance_type: str = "") -> dict:
    document = generate_view(instances=INSTANCES, networks=1, loopback=True, serial=serial, user_data_bytes=64)
    if instance_type:
        for instance in document["instances"]:
            instance["instance_type"] = instance_type
    return document


def expected_ids(document: dict) -> dict[str, str]:
    return {instance["interfaces"][0]["private_ips"][0]: instance["id"] for instance in document["instances"]}


@dataclass
class Fleet:
    gateways: list[Gateway]
    plane: StoppableControlPlane
    key_file: Path
    expected: dict[str, str]

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(g.host, g.metadata_port) for g in self.gateways]

    def publish(self, document: dict) -> None:
        self.plane.publish(document)


def start_gateways(gateways: list[Gateway]) -> None:
    for gateway in gateways:
        gateway.start(wait=False)
    for gateway in gateways:
        gateway.wait_answering()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    key_file = root / "token-keys"
    generated = subprocess.run([sys.executable, "-m", "edge", "keys", "generate", str(key_file)],
                               capture_output=True, text=True, timeout=30)
    assert generated.returncode == 0, generated.stderr
    plane = StoppableControlPlane()
    plane.start()
    document = fleet_document(1)
    plane.publish(document)
    common = ["--poll-interval", str(POLL_INTERVAL), "--token-key-file", str(key_file), "--workers", "1"]
    env = {"EDGE_VIEW_BACKOFF_MAX": str(BACKOFF_MAX), "EDGE_VIEW_POLL_JITTER": str(JITTER),
           "EDGE_METADATA_RATE": "0"}
    probe = sorted(expected_ids(document))[0]
    gateways = [Gateway(f"gw{n + 1}", host, plane.url, root / f"gw{n + 1}", list(common), dict(env), probe)
                for n, host in enumerate(GATEWAY_HOSTS)]
    # The second gateway runs two workers behind a supervisor (as production does on every core);
    # the third also enforces a maximum view age, to show readiness following it.
    gateways[1].extra_args[-1] = "2"
    gateways[2].env["EDGE_VIEW_MAX_VIEW_AGE"] = "2"
    start_gateways(gateways)
    for gateway in gateways:
        wait_until(lambda g=gateway: g.serial() == 1, timeout=10)
    yield Fleet(gateways, plane, key_file, expected_ids(document))
    for gateway in gateways:
        gateway.stop()
    plane.stop()


def dump(document: dict) -> bytes:
    return json.dumps(document).encode()


@pytest.fixture
def etcd(tmp_path) -> Iterator[EtcdServer]:
    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    server = EtcdServer(tmp_path / "etcd-data")
    server.start()
    yield server
    server.stop()
