"""The boot storm load generator and the classic design stand-in, in tiny configurations (correctness, not speed)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench import bootstorm
from bench.classic import UpstreamState, answer, start_classic
from bench.common import CorePlan, start_dnsmasq, stop
from edge.metadata.tree import Directory, meta_data
from edge.testing.generate import generate_view
from edge.view.formats import decode_view
from edge.view.snapshot import build_snapshot

needs_servers = pytest.mark.skipif(not all(shutil.which(t) for t in ("nginx", "dnsmasq", "taskset")),
                                reason="needs nginx, dnsmasq and taskset")

INSTANCES = 5


def expected_http_requests(document: dict) -> int:
    """What a complete first boot costs in HTTP requests, counted from the instances' metadata trees."""
    snapshot = build_snapshot(decode_view(json.dumps(document).encode()))

    def nodes(directory: Directory) -> int:
        return 1 + sum(nodes(c) if isinstance(c, Directory) else 1 for c in directory.children.values())

    total = 0
    for instance in snapshot.instances.values():
        total += 2 + nodes(meta_data(instance, snapshot)) + 1  # token, version probe, crawl, identity document
        total += 1 if instance.user_data is not None else 0
        total += 2 if instance.iam is not None else 0
    return total


@pytest.fixture
def world(tmp_path: Path):
    """A tiny view on loopback and the dnsmasq that owns the forwarded names."""
    document = generate_view(instances=INSTANCES, networks=1, loopback=True)
    view_path = tmp_path / "view.json"
    view_path.write_text(json.dumps(document))
    forward_port = bootstorm.free_port()
    forwarder = start_dnsmasq(
        [f"host-record=mirror-{n}.{bootstorm.FORWARD_ZONE},{bootstorm.forwarded_address(n)}"
         for n in range(bootstorm.FORWARDED_NAMES)], tmp_path, forward_port, (),
        (f"--local=/{bootstorm.FORWARD_ZONE}/",))
    yield document, view_path, forward_port
    stop(forwarder)


# Correctness only: servers and generator may share whatever cores this process may use.
_USABLE = tuple(sorted(os.sched_getaffinity(0)))
CORES = CorePlan(server=_USABLE, client=_USABLE)


def storm_against(running: bootstorm.Running, machines: list[bootstorm.Machine]) -> bootstorm.StormResult:
    try:
        bootstorm.wait_ready(running, machines[-1], timeout=30)
        return bootstorm.measure(running, machines, client_processes=1, client_cores=1)
    finally:
        for process in running.processes:
            stop(process)


@needs_servers
@pytest.mark.timeout(60)
def test_every_instance_boots_completely_against_edge(world, tmp_path: Path) -> None:
    document, view_path, forward_port = world
    running = bootstorm.start_edge(1, view_path, tmp_path, CORES, forward_port)
    result = storm_against(running, bootstorm.machines_of(document))

    assert result.errors == 0, result.error_examples
    assert result.booted == INSTANCES
    assert result.http_requests == expected_http_requests(document)
    assert result.dns_queries == 4 * INSTANCES
    assert result.boots_per_second > 0 and result.http_p99_ms > 0
    assert result.server_cpu_seconds > 0


@needs_servers
@pytest.mark.timeout(60)
def test_edge_with_credentials_over_http_from_the_slow_service(world, tmp_path: Path) -> None:
    document, view_path, forward_port = world
    running = bootstorm.start_target("edge-w1-http", document, view_path, tmp_path, CORES, forward_port,
                                     delay=0.001, upstream_workers=8)
    assert "credentials over HTTP" in running.name and len(running.server_pids) == 2
    result = storm_against(running, bootstorm.machines_of(document))

    assert result.errors == 0, result.error_examples
    assert result.booted == INSTANCES
    assert result.http_requests == expected_http_requests(document)


@needs_servers
@pytest.mark.timeout(60)
def test_wrong_answers_are_counted_as_errors(world, tmp_path: Path) -> None:
    """Same addresses, other instance ids: the generator must notice instead of counting boots."""
    document, view_path, forward_port = world
    impostors = bootstorm.machines_of(generate_view(instances=INSTANCES, networks=1, loopback=True, seed=2))
    running = bootstorm.start_edge(1, view_path, tmp_path, CORES, forward_port)
    try:
        bootstorm.wait_ready(running, bootstorm.machines_of(document)[-1], timeout=30)
        tally, _ = bootstorm.run_storm(impostors, "127.0.0.1", running.metadata_port, running.dns_port)
    finally:
        for process in running.processes:
            stop(process)

    assert tally.booted == 0
    assert tally.errors["wrong answer"] >= INSTANCES
    assert any("instance-id" in example for example in tally.examples)


@needs_servers
@pytest.mark.timeout(60)
def test_classic_design_answers_the_same_crawl(world, tmp_path: Path) -> None:
    document, view_path, forward_port = world
    stack = start_classic(document, view_path, tmp_path, CORES, bootstorm.FORWARD_ZONE, forward_port,
                          delay=0.002, workers=8)
    running = bootstorm.Running("classic", stack.metadata_port, stack.dns_port, stack.processes, stack.server_pids,
                                stack.commands)
    result = storm_against(running, bootstorm.machines_of(document))

    assert result.errors == 0, result.error_examples
    assert result.booted == INSTANCES
    assert result.http_requests == expected_http_requests(document)
    assert result.dns_queries == 4 * INSTANCES
    # Every request waited for the slow upstream.
    assert result.http_p50_ms >= 2.0


def test_classic_upstream_names_the_caller_and_checks_tokens() -> None:
    document = generate_view(instances=2, networks=1, loopback=True)
    state = UpstreamState(build_snapshot(decode_view(json.dumps(document).encode())))
    first, second = (i["interfaces"][0]["private_ips"][0] for i in document["instances"])

    status, token = answer(state, "PUT", "/latest/api/token", {"x-real-ip": first})
    assert status == 200 and token
    assert answer(state, "GET", "/latest/meta-data/instance-id",
                  {"x-real-ip": first, "x-aws-ec2-metadata-token": token.decode()}) == \
        (200, document["instances"][0]["id"].encode())
    # A token is bound to the address it was issued to.
    assert answer(state, "GET", "/latest/meta-data/instance-id",
                  {"x-real-ip": second, "x-aws-ec2-metadata-token": token.decode()})[0] == 401
    assert answer(state, "GET", "/latest/meta-data/instance-id", {"x-real-ip": "127.9.9.9"})[0] == 404
    status, listing = answer(state, "GET", "/latest/meta-data/", {"x-real-ip": second})
    assert status == 200 and b"instance-id" in listing.split(b"\n") and b"placement/" in listing.split(b"\n")
    assert answer(state, "GET", "/latest/meta-data/nope", {"x-real-ip": second})[0] == 404


def test_markdown_report_shows_ratios_and_errors() -> None:
    def result(target: str, rate: float, cpu: float, errors: int = 0) -> bootstorm.StormResult:
        return bootstorm.StormResult(
            target=target, instances=10, booted=10 - errors, seconds=1.0, boots_per_second=rate, http_requests=500,
            dns_queries=40, dns_retries=0, http_p50_ms=1, http_p99_ms=2, http_max_ms=3, dns_p50_ms=1,
            dns_p99_ms=2, dns_max_ms=3, errors=errors, error_kinds={"http 404": errors} if errors else {},
            error_examples=["127.0.0.16 GET /x: 404"] if errors else [], server_cpu_seconds=1,
            server_cpu_us_per_request=cpu, client_cpu_share=0.5)

    report = bootstorm.BootstormReport(
        instances=10, rounds=1, delay_ms=10, upstream_workers=64, client_processes=1,
        cores=CorePlan(server=(1,), client=(0,)),
        results={"edge-w1": [result("edge --workers 1", 500, 50)], "classic": [result("classic", 100, 100, 2)]},
        commands=[])
    text = bootstorm.markdown(report)

    assert "edge-w1 vs classic: 5.0x instances booted per second, 2.0x less server CPU per request" in text
    assert "classic: http 404 x2" in text and "127.0.0.16 GET /x: 404" in text


def test_machines_follow_the_view() -> None:
    document = generate_view(instances=3, networks=1, loopback=True)
    machines = bootstorm.machines_of(document)
    assert [m.instance_id for m in machines] == [i["id"] for i in document["instances"]]
    first = machines[0]
    assert first.private_name == "ip-" + first.address.replace(".", "-") + ".gen.internal"
    assert first.neighbour_address == machines[1].address
    assert first.ptr_name == ".".join(reversed(first.address.split("."))) + ".in-addr.arpa"
