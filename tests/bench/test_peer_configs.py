"""The peers' generated configurations: each at its best, checked by the peer's own tools and by real queries."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from bench.common import free_port, start_dnsmasq, stop, wait_tcp
from bench.dns_load import nsd_errors
from bench.peer_configs import (
    SERVERS,
    SETTINGS,
    dnsmasq_forwarding_args,
    dnsmasq_local_args,
    instance_addresses,
    knot_conf,
    nginx_conf,
    nsd_conf,
    settings_table,
    write_knot,
    write_nsd,
)
from bench.peers import dns_data
from tests.support import wait_until


def _options(text: str) -> dict[str, str]:
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())
            if value.strip()}


def test_nsd_config_turns_rate_limiting_off_with_edges_worker_count(tmp_path: Path) -> None:
    options = _options(nsd_conf(tmp_path, 5353, ["demo.example"]))
    assert options["rrl-ratelimit"] == "0" and options["rrl-whitelist-ratelimit"] == "0"
    assert options["server-count"] == str(SERVERS) == "1"
    assert options["reuseport"] == "yes"
    assert options["receive-buffer-size"] == str(4 * 1024 * 1024)
    assert options["control-enable"] == "yes" and options["control-interface"] == f"{tmp_path}/nsd.ctl"


def test_knot_config_has_one_udp_worker_and_no_modules(tmp_path: Path) -> None:
    text = knot_conf(tmp_path, 5353, ["demo.example"])
    assert "udp-workers: 1" in text
    assert "module" not in text and "rrl" not in text


def test_dnsmasq_caches_every_forwarded_name() -> None:
    assert "--cache-size=10000" in dnsmasq_local_args() and "--cache-size=10000" in dnsmasq_forwarding_args()


def test_the_settings_table_names_each_peers_options() -> None:
    table = settings_table()
    for option in ("rrl-ratelimit", "server-count", "reuseport", "udp-workers", "--cache-size", "map $remote_addr",
                   "return 200", "dns.rate_limit", "metadata.rate"):
        assert f"`{option}" in table, option
    assert {s.peer for s in SETTINGS} >= {"edge", "NSD", "Knot DNS", "dnsmasq", "nginx"}


@pytest.mark.skipif(shutil.which("nsd-checkconf") is None, reason="NSD is not installed")
def test_nsd_reads_rate_limiting_off_from_the_generated_config(tmp_path: Path) -> None:
    conf = write_nsd(tmp_path, free_port(), {"demo.example": "demo.example. 60 IN SOA a. b. 1 2 3 4 5\n"})
    for option, expected in (("rrl-ratelimit", "0"), ("server-count", "1"), ("reuseport", "yes"),
                             ("control-enable", "yes")):
        done = subprocess.run(["nsd-checkconf", "-o", option, str(conf)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected, option


@pytest.mark.skipif(shutil.which("nsd") is None, reason="NSD is not installed")
@pytest.mark.timeout(60)
def test_nsd_answers_a_burst_from_one_source_far_above_its_default_rate_limit(tmp_path: Path) -> None:
    # Debian's NSD limits one source to 200 answers/s by default (RRL): 600 queries in a burst
    # from one address would be mostly dropped or truncated. With the benchmark's config, none is.
    data = dns_data(tmp_path, 20)
    port = free_port()
    conf = write_nsd(tmp_path / "nsd", port, data.zone_texts)
    nsd = subprocess.Popen(["nsd", "-d", "-c", str(conf)], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = data.first_name
    try:
        wait_until(lambda: dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=0.3)
                   .rcode() == dns.rcode.NOERROR, timeout=20)
        answered = truncated = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(2.0)
            for batch in range(12):
                for number in range(50):
                    query = dns.message.make_query(name, "A")
                    query.id = batch * 50 + number
                    sock.sendto(query.to_wire(), ("127.0.0.1", port))
                for _ in range(50):
                    try:
                        reply = dns.message.from_wire(sock.recv(4096))
                    except TimeoutError:
                        break
                    answered += 1
                    truncated += bool(reply.flags & dns.flags.TC)
        assert (answered, truncated) == (600, 0)
        # NSD's own counters, read over its control socket, agree: nothing failed or dropped.
        assert nsd_errors(conf) == 0
        done = subprocess.run(["nsd-control", "-c", str(conf), "stats_noreset"], capture_output=True, text=True)
        assert int(dict(line.split("=", 1) for line in done.stdout.splitlines())["num.queries"]) >= 600
    finally:
        stop(nsd)


@pytest.mark.skipif(shutil.which("knotc") is None, reason="Knot DNS is not installed")
def test_knot_accepts_the_generated_config(tmp_path: Path) -> None:
    conf = write_knot(tmp_path, free_port(), {"demo.example": "demo.example. 60 IN SOA a. b. 1 2 3 4 5\n"})
    done = subprocess.run(["knotc", "-c", str(conf), "conf-check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
@pytest.mark.timeout(30)
def test_dnsmasq_answers_local_hits_from_the_benchmark_records(tmp_path: Path) -> None:
    data = dns_data(tmp_path, 20)
    port = free_port()
    server = start_dnsmasq(data.dnsmasq_lines, tmp_path, port, (), dnsmasq_local_args())
    try:
        for line in data.hits.read_text().splitlines()[:10]:
            name, qtype = line.split()
            reply = None

            def answered() -> bool:
                nonlocal reply
                reply = dns.query.udp(dns.message.make_query(name, qtype), "127.0.0.1", port=port, timeout=0.3)
                return True

            wait_until(answered, timeout=10)
            assert reply is not None and reply.rcode() == dns.rcode.NOERROR and reply.answer, line
    finally:
        stop(server)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["return", "map"])
def test_nginx_answers_by_mode(tmp_path: Path, mode: str) -> None:
    port = free_port()
    table = instance_addresses(1000, "i-0de0000000000001")
    table["127.0.0.2"] = "i-second"
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, port, "i-0de0000000000001", mode, table))
    nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf)], stdin=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        wait_tcp(port)

        def fetch(source: str) -> str:
            return subprocess.run(["curl", "-s", "--interface", source, f"http://127.0.0.1:{port}/latest/x"],
                                  capture_output=True, text=True, timeout=10).stdout

        assert fetch("127.0.0.1") == "i-0de0000000000001"
        assert fetch("127.0.0.2") == ("i-second" if mode == "map" else "i-0de0000000000001")
    finally:
        stop(nginx)


def test_an_unknown_nginx_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        nginx_conf(tmp_path, 80, "x", "proxy")


def test_results_show_the_peer_configuration_that_runs() -> None:
    results = (Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md").read_text()
    assert settings_table() in results
