"""End to end: ``edge serve`` as a subprocess answering DNS, forwarding, picking up views and SIGHUP."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.view.demo import demo_document
from tests.dns.conftest import UPSTREAM_RECORDS, dig, free_port


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.mark.slow
def test_edge_serve_answers_forwards_follows_the_view_and_reloads(tmp_path: Path, dnsmasq_factory):
    first = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=60)
    document = copy.deepcopy(demo_document())
    view = tmp_path / "view.json"
    view.write_text(json.dumps(document))
    config = tmp_path / "edge.toml"
    config.write_text(f'[dns]\nupstreams = ["{first.address}"]\n')
    dns_port, vpc_port = free_port(), free_port()
    args = [sys.executable, "-m", "edge", "serve", "--config", str(config), "--view", str(view),
            "--state-dir", str(tmp_path / "state"), "--poll-interval", "0.2",
            "--metadata-listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
            "--dns-listen", f"127.0.0.1:{dns_port}", "--dns-listen", f"127.0.0.1:{vpc_port}@vpc-demo"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # A supervisor and a worker per core start: give a loaded machine time.
        wait_for(lambda: dig(dns_port, "ip-127-0-0-1.demo.internal").status == "NOERROR", timeout=45)
        assert dig(dns_port, "ec2-198-51-100-11.demo.example").answer[0].endswith("198.51.100.11")
        assert dig(vpc_port, "ec2-198-51-100-11.demo.example").answer[0].endswith("127.0.0.1")
        cached = dig(dns_port, "www.upstream.test", source="127.0.0.1")
        assert cached.status == "NOERROR" and cached.answer[0].endswith("192.0.2.10")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, process.stderr.read() if process.stderr else ""
