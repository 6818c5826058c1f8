"""``edge view publish`` into a real etcd, and gateways (one process, and workers) serving the keyspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from edge.view.formats import decode_view
from tests.etcd.test_keyspace import PREFIX, demo, fetch, keyspace_source
from tests.fleet.gateway import Gateway
from tests.support import wait_until


def run_edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_edge_view_publish_then_gateways_serve_the_keyspace_and_follow_it(etcd, tmp_path) -> None:
    document = demo(1)
    view_file = tmp_path / "view.json"
    view_file.write_text(json.dumps(document))
    address = etcd.url(PREFIX)
    published = run_edge("view", "publish", str(view_file), "--etcd", address)
    assert published.returncode == 0, published.stderr
    assert "serial 1" in published.stdout and "1 transaction" in published.stdout
    again = run_edge("view", "publish", str(view_file), "--etcd", address)
    assert again.returncode == 0 and "nothing to change" in again.stdout
    checked = run_edge("view", "check", address)
    assert checked.returncode == 0 and "serial      1" in checked.stdout, checked.stdout + checked.stderr

    # Polls an hour apart: what the gateways serve next comes by the watch.
    gateways = [Gateway(name, host, address, tmp_path / name, env={"EDGE_VIEW_POLL_INTERVAL": "3600",
                                                                     "EDGE_WORKERS": workers})
                for name, host, workers in (("one", "127.0.1.1", "1"), ("two", "127.0.1.2", "2"))]
    for gateway in gateways:
        gateway.start()
    try:
        for gateway in gateways:
            wait_until(lambda: gateway.serial() == 1, timeout=20)
        probe = document["instances"][0]
        document["serial"] = 2
        probe["instance_type"] = "m7.metal"
        view_file.write_text(json.dumps(document))
        published = run_edge("view", "publish", str(view_file), "--etcd", address)
        assert published.returncode == 0 and "2 puts" in published.stdout, published.stdout + published.stderr
        for gateway in gateways:
            wait_until(lambda: gateway.serial() == 2, timeout=20)
            address_of_probe = probe["interfaces"][0]["private_ips"][0]
            if address_of_probe.startswith("127."):
                answer = gateway.get("/latest/meta-data/instance-type", source=address_of_probe)
                assert answer.status == 200 and answer.body == b"m7.metal"
        assert "build=delta" in gateways[0].log()
        metrics = gateways[0].admin("/metrics").body.decode()
        assert 'edge_view_source_events_total{event="watch_event"} 2.0' in metrics
        assert 'edge_view_source_events_total{event="full_read"} 1.0' in metrics
    finally:
        for gateway in gateways:
            gateway.stop()

    # A view that is not valid is refused and nothing is written.
    document["serial"] = 3
    document["instances"][0]["interfaces"][0]["mac"] = "nope"
    view_file.write_text(json.dumps(document))
    refused = run_edge("view", "publish", str(view_file), "--etcd", address)
    assert refused.returncode == 1 and "REJECTED" in refused.stdout
    assert decode_view(fetch(keyspace_source(etcd.endpoint)).document()).serial == 2
