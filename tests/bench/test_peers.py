"""The peers the runner configures itself answer the benchmark's questions correctly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from bench.common import free_port, start_dnsmasq, stop
from bench.peer_configs import write_knot
from bench.peers import dns_data


def _ask_retrying(port: int, name: str, qtype: str) -> dns.message.Message:
    last: Exception | None = None
    for _ in range(50):
        try:
            return dns.query.udp(dns.message.make_query(name, qtype), "127.0.0.1", port=port, timeout=0.2)
        except (dns.exception.Timeout, OSError) as exc:
            last = exc
    raise AssertionError(f"no answer from port {port}: {last!r}")


def questions(path: Path, count: int) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()[:count]
    return [(line.split()[0], line.split()[1]) for line in lines]


@pytest.mark.skipif(shutil.which("knotd") is None, reason="Knot DNS (knotd) is not installed")
@pytest.mark.timeout(30)
def test_knot_serves_the_benchmark_zones(tmp_path: Path) -> None:
    data = dns_data(tmp_path, 50)
    port = free_port()
    knot = subprocess.Popen(["knotd", "-c", str(write_knot(tmp_path / "knot", port, data.zone_texts))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        asked = questions(data.hits, 20)
        assert {qtype for _, qtype in asked} == {"A", "PTR"}
        for name, qtype in asked:
            reply = _ask_retrying(port, name, qtype)
            assert reply.rcode() == dns.rcode.NOERROR, (name, qtype)
            assert reply.answer and reply.answer[0].rdtype == dns.rdatatype.from_text(qtype), (name, qtype)
            if name.startswith("ip-"):
                assert reply.answer[0][0].address == name.split(".")[0][3:].replace("-", ".")
        assert _ask_retrying(port, "nope." + data.first_name.split(".", 1)[1], "A").rcode() == dns.rcode.NXDOMAIN
    finally:
        stop(knot)


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
@pytest.mark.timeout(30)
def test_caching_dnsmasq_forwards_the_benchmark_names(tmp_path: Path) -> None:
    upstream_port, forwarder_port = free_port(), free_port()
    upstream = start_dnsmasq(["host-record=host7.upstream.test,192.0.2.8"], tmp_path, upstream_port, (),
                             ("--local=/upstream.test/",))
    forwarder = start_dnsmasq([f"server=127.0.0.1#{upstream_port}"], tmp_path, forwarder_port, (),
                              ("--cache-size=10000",))
    try:
        reply = _ask_retrying(forwarder_port, "host7.upstream.test", "A")
        assert [r.address for r in reply.answer[0]] == ["192.0.2.8"]
    finally:
        stop(forwarder)
        stop(upstream)
