"""The same fleet fed by etcd: view and token keys under two keys, etcd stopped and back."""

from __future__ import annotations

import json
import time

import pytest

from edge.metadata.tokens import generate_token_key_file
from tests.fleet.conftest import GATEWAY_HOSTS, expected_ids, fleet_document, start_gateways
from tests.fleet.gateway import Gateway
from tests.fleet.load import run_clients
from tests.support import wait_until

VIEW_KEY = "edge/view"
KEYS_KEY = "edge/token-keys"


@pytest.fixture
def etcd_fleet(tmp_path, etcd):
    key_file = tmp_path / "keys"
    generate_token_key_file(key_file)
    etcd.put(KEYS_KEY, key_file.read_text())
    document = fleet_document(1)
    etcd.put(VIEW_KEY, json.dumps(document))
    probe = sorted(expected_ids(document))[0]
    gateways = [Gateway(f"gw{n + 1}", host, etcd.url(VIEW_KEY), tmp_path / f"gw{n + 1}",
                        ["--poll-interval", "0.5", "--token-key-source", etcd.url(KEYS_KEY), "--workers", "1"],
                        {"EDGE_VIEW_BACKOFF_MAX": "1", "EDGE_METADATA_RATE": "0",
                         "EDGE_VIEW_CONNECT_TIMEOUT": "0.5", "EDGE_VIEW_READ_TIMEOUT": "1"}, probe)
                for n, host in enumerate(GATEWAY_HOSTS)]
    start_gateways(gateways)
    yield gateways, expected_ids(document)
    for gateway in gateways:
        gateway.stop()


def test_etcd_outage_restart_and_return(etcd, etcd_fleet) -> None:
    gateways, expected = etcd_fleet
    a, b, c = gateways
    endpoints = [(g.host, g.metadata_port) for g in gateways]
    source = sorted(expected)[3]
    token = a.token(source=source)
    assert all(g.get("/latest/meta-data/instance-id", source, token).status == 200 for g in gateways)

    # etcd stopped: every gateway keeps answering, stays ready, and keeps verifying tokens.
    etcd.stop()
    for gateway in gateways:
        wait_until(lambda g=gateway: g.view_summary()["consecutive_failures"] >= 2, timeout=10)
    report = run_clients(endpoints, expected, duration=1.0, threads=3)
    assert report.wrong == 0 and report.unanswered == 0 and report.answered > 0
    assert all(g.admin("/readyz").status == 200 for g in gateways)
    assert all(g.get("/latest/meta-data/instance-id", source, token).status == 200 for g in gateways)

    # Restarted while etcd is down: last good view and cached keys, at once.
    b.stop()
    b.start(wait=False)
    print(f"\netcd fleet: restarted gateway answered {b.wait_answering():.2f}s after start, etcd down")
    assert b.view_summary()["loaded_from"] == "state"
    assert b.get("/latest/meta-data/instance-id", source, token).status == 200

    # etcd back with a new serial: everyone converges; the spread is reported.
    etcd.start()
    etcd.put(VIEW_KEY, json.dumps(fleet_document(2)))
    published = time.monotonic()
    seen: dict[str, float] = {}
    deadline = published + 15
    while len(seen) < 3 and time.monotonic() < deadline:
        for gateway in gateways:
            if gateway.name not in seen and gateway.serial() == 2:
                seen[gateway.name] = round(time.monotonic() - published, 3)
        time.sleep(0.01)
    print(f"etcd fleet: serial 2 accepted after {seen}s, spread {max(seen.values()) - min(seen.values()):.3f}s")
    assert len(seen) == 3

    # A bad view in etcd is rejected by every gateway; they keep serving serial 2.
    etcd.put(VIEW_KEY, b'{"format": "edge-view/1", "serial": 3}')
    for gateway in gateways:
        wait_until(lambda g=gateway: g.view_summary()["last_poll_result"] == "rejected", timeout=10)
        assert gateway.serial() == 2
    report = run_clients(endpoints, expected, duration=0.5, threads=3)
    assert report.wrong == 0 and report.unanswered == 0
