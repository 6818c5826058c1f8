"""The boot storm load generator and the classic design stand-in, in tiny configurations (correctness, not speed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from bench import bootstorm
from bench.classic import UpstreamState, answer, start_classic
from bench.common import CorePlan, start_dnsmasq, stop
from bench.generate import generate_view
from edge.metadata.tree import Directory, meta_data
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

    # The classic design answered two requests wrongly: no ratio is printed, the report says why.
    assert "vs classic:" not in text
    assert "**INVALID: no ratio, a server was not error-free** (classic: 2 errors, 2 boots not completed)." in text
    assert "classic: http 404 x2" in text and "127.0.0.16 GET /x: 404" in text

    report.results["classic"] = [result("classic", 100, 100)]
    text = bootstorm.markdown(report)
    assert "edge-w1 vs classic: 5.0x instances booted per second, 2.0x less server CPU per request" in text
    assert "INVALID" not in text

    retried = result("edge --workers 1", 500, 50)
    retried.dns_retries = 3
    report.results["edge-w1"] = [retried]
    assert "(edge --workers 1: 3 DNS timeouts)" in bootstorm.markdown(report)


def test_machines_follow_the_view() -> None:
    document = generate_view(instances=3, networks=1, loopback=True)
    machines = bootstorm.machines_of(document)
    assert [m.instance_id for m in machines] == [i["id"] for i in document["instances"]]
    first = machines[0]
    assert first.private_name == "ip-" + first.address.replace(".", "-") + ".gen.internal"
    assert first.neighbour_address == machines[1].address
    assert first.ptr_name == ".".join(reversed(first.address.split("."))) + ".in-addr.arpa"


def test_markdown_report_states_the_ceilings() -> None:
    def result(target: str, rate: float) -> bootstorm.StormResult:
        return bootstorm.StormResult(
            target=target, instances=10, booted=10, seconds=1.0, boots_per_second=rate, http_requests=550,
            dns_queries=40, dns_retries=0, http_p50_ms=1, http_p99_ms=2, http_max_ms=3, dns_p50_ms=1,
            dns_p99_ms=2, dns_max_ms=3, errors=0, error_kinds={}, error_examples=[], server_cpu_seconds=1,
            server_cpu_us_per_request=50, client_cpu_share=0.5, client_cpu_us_per_request=42)

    report = bootstorm.BootstormReport(
        instances=10, rounds=1, delay_ms=10, upstream_workers=64, client_processes=1,
        cores=CorePlan(server=(1,), client=(0,)),
        results={"edge-w1": [result("edge --workers 1", 150)], "classic": [result("classic", 75)]},
        commands=[], connection_ceiling_rps=14_300)
    text = bootstorm.markdown(report)

    # 64 / 10 ms = 6,400 requests/s over 55 HTTP requests per boot; 14,300 / 55 = 260 boots/s.
    assert "64 / 10 ms = 6,400 requests/s, 116.4 boots/s at 55.0 HTTP requests per boot (measured: 75.0)" in text
    assert "reached 14,300 requests/s in this run, 260.0 boots/s" in text
    assert "5x the classic design is 375.0 boots/s, 1.4x that ceiling: out of reach on this machine" in text
    assert "| 50% (42) |" in text
    report.connection_ceiling_rps = None
    assert "Ceiling, this machine" not in bootstorm.markdown(report)


def _reply(question: bootstorm.DnsQuestion, *records: str, rcode: int = 0) -> bytes:
    from dnslib import RR, DNSRecord

    reply = DNSRecord.parse(question.query).reply()
    reply.header.rcode = rcode
    for record in records:
        reply.add_answer(*RR.fromZone(record))
    return reply.pack()


def test_dns_answers_are_checked() -> None:
    own = bootstorm.dns_question("ip-127-0-0-5.gen.internal", "A", "127.0.0.5", 4660)
    ptr = bootstorm.dns_question("5.0.0.127.in-addr.arpa", "PTR", "ip-127-0-0-5.gen.internal", 4661)
    assert own.query[:2] == b"\x12\x34"

    assert bootstorm.dns_problem(own, _reply(own, "ip-127-0-0-5.gen.internal. 60 A 127.0.0.5")) is None
    assert bootstorm.dns_problem(ptr, _reply(ptr, "5.0.0.127.in-addr.arpa. 60 PTR ip-127-0-0-5.gen.internal.")) \
        is None
    # Not one record alone, but the one wanted: still right.
    assert bootstorm.dns_problem(own, _reply(own, "ip-127-0-0-5.gen.internal. 60 A 127.0.0.5",
                                             "ip-127-0-0-5.gen.internal. 60 TXT hello")) is None
    assert bootstorm.dns_problem(own, _reply(own, "ip-127-0-0-5.gen.internal. 60 A 127.0.0.6")) == (
        "wrong answer", "ip-127-0-0-5.gen.internal A: ['127.0.0.6'] != [127.0.0.5]")
    assert bootstorm.dns_problem(own, _reply(own, "ip-127-0-0-5.gen.internal. 60 A 127.0.0.5",
                                             "ip-127-0-0-5.gen.internal. 60 A 127.0.0.7"))[0] == "wrong answer"
    # The right data in a record of another type is not the answer.
    assert bootstorm.dns_problem(ptr, _reply(ptr, "5.0.0.127.in-addr.arpa. 60 CNAME ip-127-0-0-5.gen.internal."))[0] \
        == "wrong answer"
    assert bootstorm.dns_problem(own, _reply(own, rcode=3))[0] == "dns NXDOMAIN"
    assert bootstorm.dns_problem(own, b"\x12\x34\x81")[0].startswith("bad answer")


def test_response_length() -> None:
    assert bootstorm.response_length(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab") == 43
    assert bootstorm.response_length(b"HTTP/1.1 200 OK\r\nServer: x\r\ncontent-length:3\r\nA: b\r\n\r\n") == 57
    assert bootstorm.response_length(b"HTTP/1.1 200 OK\r\nContent-Len") == -1
    assert bootstorm.response_length(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nbody until the end") == 0


def _serve_once_per_connection(answers: list[list[bytes]]) -> tuple[int, threading.Thread]:
    """A TCP server on loopback answering its n-th connection with the pieces ``answers[n]`` (sent apart),
    then closing it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve() -> None:
        with listener:
            for pieces in answers:
                connection, _ = listener.accept()
                with connection:
                    connection.recv(65536)
                    for piece in pieces:
                        connection.sendall(piece)
                        time.sleep(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_http_answers_in_pieces_are_put_together_and_cut_short_ones_are_errors() -> None:
    port, server = _serve_once_per_connection([
        [b"HTTP/1.1 200 OK\r\nContent-", b"Length: 5\r\n\r\nab", b"cde"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"],
        [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"],
    ])
    machine = bootstorm.machines_of(generate_view(instances=2, networks=1, loopback=True))[0]
    tally = bootstorm.Tally()
    boot = bootstorm.Boot(machine, tally)
    bodies = []

    def program() -> bootstorm.Program:
        for _ in range(3):
            bodies.append((yield from boot.http(b"GET", b"/x", b" HTTP/1.1\r\nConnection: close\r\n\r\n")))

    assert bootstorm.Storm("127.0.0.1", port, 0, tally).run([program()], 10.0) == 0
    server.join(5)

    assert bodies == [b"abcde", None, None]
    assert tally.errors == {"http ConnectionError": 1, "http 404": 1}
    assert len(tally.http_seconds) == 2


def test_a_target_that_is_not_there_is_an_error_per_instance() -> None:
    machines = bootstorm.machines_of(generate_view(instances=3, networks=1, loopback=True))
    closed = bootstorm.free_port()
    tally, _ = bootstorm.run_storm(machines, "127.0.0.1", closed, closed)

    assert tally.booted == 0
    assert tally.errors == {"http ConnectionRefusedError": 3}
