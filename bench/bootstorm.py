"""Boot storm: N instances booting at once, each doing what cloud-init does, against edge and the classic design.

Every simulated instance speaks from its own loopback address (the view puts
the instances on ``127.x.y.z``), opens a new connection for every request as
real clients do, and runs the sequence of a first boot:

1. ``PUT /latest/api/token`` (IMDSv2), then every request carries the token;
2. ``GET /`` (version probe);
3. a crawl of ``/latest/meta-data/`` following every listing to every leaf
   (``public-keys/N=name`` is followed as ``public-keys/N/``), which includes
   ``iam/security-credentials/<role>`` for instances with a role;
4. ``/latest/user-data`` and ``/latest/dynamic/instance-identity/document``;
5. an SDK picking up credentials: ``iam/security-credentials/`` then ``.../<role>``;
6. DNS over UDP from its own address: its private name, a neighbour's name,
   its PTR and one name that must be forwarded (to a local dnsmasq on loopback).

Answers are checked (instance id, addresses, user-data, identity document,
credentials, DNS answers); anything else is an error, counted and shown.
Reported per run: instances fully booted per second (N / time until the last
instance finished), p50/p99/max per HTTP request and per DNS query, errors,
server CPU per request (utime+stime of the server process trees, including
reaped helper processes such as the credential ``process`` source), and the
load generator's CPU use (near 100% means the generator, not the server, set
the pace).

    python -m bench.bootstorm [--instances 1000] [--rounds 3] [--targets edge-w1,edge-w2,classic]

Targets: ``edge-wN`` is ``edge serve --workers N`` with IAM credentials from a
``process`` source (a shell script); ``edge-wN-http`` takes them over HTTP
from the same slow central service the classic design uses; ``classic`` is
described in :mod:`bench.classic`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import (CorePlan, core_plan, cpu_seconds, free_port, median_range, percentile,
                          raise_open_files_limit, self_cpu_seconds, start_dnsmasq, stop)

ROOT = Path(__file__).resolve().parent.parent
FORWARD_ZONE = "upstream.test"
FORWARDED_NAMES = 20
TOKEN_TTL = b"21600"
REQUEST_TIMEOUT = 30.0
STORM_TIMEOUT = 300.0
DNS_TIMEOUT = 1.0
DNS_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Machine:
    """One booting instance and what its answers must be."""

    address: str
    instance_id: str
    private_name: str
    ptr_name: str
    neighbour_name: str
    neighbour_address: str
    forwarded_name: str
    forwarded_address: str
    user_data: bytes | None
    role: str | None


def forwarded_address(number: int) -> str:
    return f"192.0.2.{number + 1}"


def machines_of(document: dict) -> list[Machine]:
    """The booting instances: every instance of the flat (loopback) network."""
    cloud = document["cloud"]
    template, domain = cloud["private_name_template"], cloud["internal_domain"]

    def name(address: str) -> str:
        return template.replace("{ip}", address.replace(".", "-")) + "." + domain

    flat = [i for i in document["instances"] if i["interfaces"][0]["network"] == ""]
    out = []
    for index, instance in enumerate(flat):
        address = instance["interfaces"][0]["private_ips"][0]
        neighbour = flat[(index + 1) % len(flat)]["interfaces"][0]["private_ips"][0]
        a, b, c, d = address.split(".")
        forwarded = index % FORWARDED_NAMES
        out.append(Machine(
            address=address, instance_id=instance["id"], private_name=name(address),
            ptr_name=f"{d}.{c}.{b}.{a}.in-addr.arpa", neighbour_name=name(neighbour), neighbour_address=neighbour,
            forwarded_name=f"mirror-{forwarded}.{FORWARD_ZONE}", forwarded_address=forwarded_address(forwarded),
            user_data=base64.b64decode(instance["user_data"]) if instance.get("user_data") else None,
            role=(instance.get("iam") or {}).get("role")))
    return out


# -- the load generator ------------------------------------------------------------------------

class _HttpExchange(asyncio.Protocol):
    """Sends one request on a fresh connection and completes with the raw response."""

    __slots__ = ("request", "done", "buffer", "transport", "complete_at")

    def __init__(self, request: bytes, done: asyncio.Future) -> None:
        self.request = request
        self.done = done
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.complete_at = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.complete_at < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            self.complete_at = end + 4 + length
        if len(self.buffer) >= self.complete_at and not self.done.done():
            self.done.set_result(bytes(self.buffer[:self.complete_at]))
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError(
                f"connection closed after {len(self.buffer)} bytes of an incomplete response"))


def _expire(done: asyncio.Future) -> None:
    if not done.done():
        done.set_exception(asyncio.TimeoutError(f"no complete answer within {REQUEST_TIMEOUT:g} s"))


class _DnsExchange(asyncio.DatagramProtocol):
    __slots__ = ("query_id", "done")

    def __init__(self, query_id: int, done: asyncio.Future) -> None:
        self.query_id = query_id
        self.done = done

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 2 and int.from_bytes(data[:2], "big") == self.query_id and not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


@dataclass(slots=True)
class Tally:
    """What one load generator process saw."""

    booted: int = 0
    http_seconds: list[float] = field(default_factory=list)
    dns_seconds: list[float] = field(default_factory=list)
    dns_retries: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    finished_at: float = 0.0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(detail)


class Boot:
    """The first-boot sequence of one instance."""

    def __init__(self, machine: Machine, host: str, metadata_port: int, dns_port: int, tally: Tally) -> None:
        self.machine = machine
        self.host = host
        self.metadata_port = metadata_port
        self.dns_port = dns_port
        self.tally = tally
        self.token = b""
        self.failed = False

    async def http(self, method: str, path: str, extra: bytes = b"") -> bytes | None:
        """The body of a 200 answer, or None after recording an error."""
        loop = asyncio.get_running_loop()
        request = (f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/bootstorm\r\n"
                   f"Accept: */*\r\nConnection: close\r\n").encode() + extra + b"\r\n"
        started = time.perf_counter()
        done = loop.create_future()
        # One timer instead of wait_for: the generator's own cost per request must stay small.
        timer = loop.call_later(REQUEST_TIMEOUT, _expire, done)
        try:
            transport, _ = await loop.create_connection(
                lambda: _HttpExchange(request, done), self.host, self.metadata_port,
                local_addr=(self.machine.address, 0))
            try:
                raw = await done
            finally:
                transport.close()
        except (OSError, asyncio.TimeoutError) as exc:
            return self._fail("http " + type(exc).__name__, f"{self.machine.address} {method} {path}: {exc!r}")
        finally:
            timer.cancel()
        self.tally.http_seconds.append(time.perf_counter() - started)
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head[9:12]
        if status != b"200":
            return self._fail(f"http {status.decode(errors='replace')}",
                              f"{self.machine.address} {method} {path}: {head.splitlines()[0]!r} {body[:80]!r}")
        return body

    def _fail(self, kind: str, detail: str) -> None:
        self.failed = True
        self.tally.error(kind, detail)
        return None

    def check(self, condition: bool, kind: str, detail: str) -> None:
        if not condition:
            self._fail(kind, f"{self.machine.address}: {detail}")

    async def get(self, path: str) -> bytes | None:
        return await self.http("GET", path, b"X-aws-ec2-metadata-token: " + self.token + b"\r\n")

    async def crawl(self, path: str, leaves: dict[str, bytes]) -> None:
        listing = await self.get(path)
        if listing is None:
            return
        for line in listing.decode().splitlines():
            if not line:
                continue
            if path.endswith("/public-keys/") and "=" in line:
                line = line.split("=", 1)[0] + "/"
            if line.endswith("/"):
                await self.crawl(path + line, leaves)
            else:
                body = await self.get(path + line)
                if body is not None:
                    leaves[path + line] = body

    async def resolve(self, name: str, qtype: str) -> list[str] | None:
        from dnslib import QTYPE, RCODE, DNSRecord

        loop = asyncio.get_running_loop()
        started = time.perf_counter()  # a retried query's latency includes the wait before the retry
        for _ in range(DNS_ATTEMPTS):
            query = DNSRecord.question(name, qtype)
            done = loop.create_future()
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _DnsExchange(query.header.id, done), local_addr=(self.machine.address, 0),
                    remote_addr=(self.host, self.dns_port))
            except OSError as exc:
                return self._fail("dns " + type(exc).__name__, f"{self.machine.address} {name} {qtype}: {exc!r}")
            try:
                transport.sendto(query.pack())
                raw = await asyncio.wait_for(done, DNS_TIMEOUT)
            except asyncio.TimeoutError:
                self.tally.dns_retries += 1
                continue
            except OSError as exc:
                return self._fail("dns " + type(exc).__name__, f"{self.machine.address} {name} {qtype}: {exc!r}")
            finally:
                transport.close()
            self.tally.dns_seconds.append(time.perf_counter() - started)
            reply = DNSRecord.parse(raw)
            if reply.header.rcode != RCODE.NOERROR:
                return self._fail(f"dns {RCODE.get(reply.header.rcode)}", f"{self.machine.address} {name} {qtype}")
            wanted = getattr(QTYPE, qtype)
            return [str(rr.rdata).rstrip(".") for rr in reply.rr if rr.rtype == wanted]
        return self._fail("dns timeout", f"{self.machine.address} {name} {qtype}: no answer in {DNS_ATTEMPTS} tries")

    async def run(self) -> None:
        m = self.machine
        token = await self.http("PUT", "/latest/api/token", b"X-aws-ec2-metadata-token-ttl-seconds: " + TOKEN_TTL
                                + b"\r\n")
        if token is None:
            return
        self.token = token
        versions = await self.get("/")
        if versions is not None:
            self.check(b"latest" in versions.split(b"\n"), "wrong answer", "version listing lacks latest")
        leaves: dict[str, bytes] = {}
        await self.crawl("/latest/meta-data/", leaves)
        meta = "/latest/meta-data/"
        self.check(leaves.get(meta + "instance-id") == m.instance_id.encode(), "wrong answer", "instance-id")
        self.check(leaves.get(meta + "local-ipv4") == m.address.encode(), "wrong answer", "local-ipv4")
        if m.role:
            crawled = leaves.get(f"{meta}iam/security-credentials/{m.role}", b"{}")
            self.check(json.loads(crawled).get("Code") == "Success", "wrong answer", "credentials in the crawl")
        if m.user_data is not None:
            user_data = await self.get("/latest/user-data")
            if user_data is not None:
                self.check(user_data == m.user_data, "wrong answer", "user-data")
        document = await self.get("/latest/dynamic/instance-identity/document")
        if document is not None:
            identity = json.loads(document)
            self.check(identity.get("instanceId") == m.instance_id and identity.get("privateIp") == m.address,
                       "wrong answer", "identity document")
        if m.role:
            roles = await self.get(meta + "iam/security-credentials/")
            if roles is not None:
                self.check(roles.decode().split() == [m.role], "wrong answer", f"role listing {roles!r}")
                credentials = await self.get(f"{meta}iam/security-credentials/{m.role}")
                if credentials is not None:
                    self.check(json.loads(credentials).get("AccessKeyId", "") != "", "wrong answer", "credentials")
        for name, qtype, expected in ((m.private_name, "A", m.address), (m.neighbour_name, "A", m.neighbour_address),
                                      (m.ptr_name, "PTR", m.private_name),
                                      (m.forwarded_name, "A", m.forwarded_address)):
            answers = await self.resolve(name, qtype)
            if answers is not None:
                self.check(answers == [expected], "wrong answer", f"{name} {qtype}: {answers} != [{expected}]")
        if not self.failed:
            self.tally.booted += 1


async def storm(machines: Sequence[Machine], host: str, metadata_port: int, dns_port: int) -> Tally:
    """All ``machines`` boot at once; returns when the last one is done."""
    tally = Tally()

    async def one(machine: Machine) -> None:
        try:
            await Boot(machine, host, metadata_port, dns_port, tally).run()
        except Exception as exc:  # a malformed answer must show up as an error, not end the storm
            tally.error("bad answer " + type(exc).__name__, f"{machine.address}: {exc!r}")
        tally.finished_at = max(tally.finished_at, time.time())

    tasks = [asyncio.ensure_future(one(machine)) for machine in machines]
    _, unfinished = await asyncio.wait(tasks, timeout=STORM_TIMEOUT)
    for task in unfinished:
        task.cancel()
        tally.error("not finished", f"an instance was still booting after {STORM_TIMEOUT:g} s")
    if unfinished:
        await asyncio.wait(unfinished)
        tally.finished_at = time.time()
    return tally


def _storm_process(machines: Sequence[Machine], host: str, metadata_port: int, dns_port: int, start_at: float,
                   results: multiprocessing.Queue) -> None:
    import uvloop
    raise_open_files_limit()
    time.sleep(max(0.0, start_at - time.time()))
    tally = uvloop.run(storm(machines, host, metadata_port, dns_port))
    results.put(tally)


def run_storm(machines: Sequence[Machine], host: str, metadata_port: int, dns_port: int,
              processes: int = 1) -> tuple[Tally, float]:
    """(merged tally, seconds from the common start to the last instance booted)."""
    import uvloop
    if processes <= 1:
        started = time.time()
        tally = uvloop.run(storm(machines, host, metadata_port, dns_port))
        return tally, tally.finished_at - started
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = context.Queue()
    start_at = time.time() + 0.5
    shards = [machines[n::processes] for n in range(processes)]
    children = [context.Process(target=_storm_process, args=(shard, host, metadata_port, dns_port, start_at, results))
                for shard in shards]
    for child in children:
        child.start()
    tallies = [results.get(timeout=600) for _ in children]
    for child in children:
        child.join()
    merged = Tally()
    for tally in tallies:
        merged.booted += tally.booted
        merged.http_seconds += tally.http_seconds
        merged.dns_seconds += tally.dns_seconds
        merged.dns_retries += tally.dns_retries
        merged.errors.update(tally.errors)
        merged.examples += tally.examples[: max(0, 10 - len(merged.examples))]
        merged.finished_at = max(merged.finished_at, tally.finished_at)
    return merged, merged.finished_at - start_at


# -- targets -----------------------------------------------------------------------------------

@dataclass(slots=True)
class Running:
    name: str
    metadata_port: int
    dns_port: int
    processes: list[subprocess.Popen]
    server_pids: list[int]
    commands: list[str]


CREDENTIALS_SCRIPT = """#!/bin/sh
# credential_process output for the role edge asks about (fixed, far-off expiry)
printf '{"Version": 1, "AccessKeyId": "ASIA%s", "SecretAccessKey": "bootstorm-secret", \
"SessionToken": "bootstorm-token", "Expiration": "2099-01-01T00:00:00Z"}' "$EDGE_ROLE"
"""


def start_edge(workers: int, view_path: Path, directory: Path, cores: CorePlan, forward_port: int,
               credentials_url: str = "") -> Running:
    """edge serving the view; credentials from a ``process`` script, or from ``credentials_url`` when given."""
    if credentials_url:
        credentials = f'kind = "http"\nurl = "{credentials_url}"\n'
    else:
        script = directory / "credentials.sh"
        script.write_text(CREDENTIALS_SCRIPT)
        script.chmod(0o755)
        credentials = f'kind = "process"\ncommand = ["{script}"]\n'
    config = directory / f"edge-w{workers}.toml"
    config.write_text(f'[dns]\nupstreams = ["127.0.0.1:{forward_port}"]\n\n[metadata.credentials]\n{credentials}')
    metadata_port, dns_port = free_port(), free_port()
    argv = cores.pin_server([
        sys.executable, "-m", "edge", "serve", "--config", str(config), "--view", str(view_path),
        "--state-dir", str(directory / f"edge-state-w{workers}"), "--workers", str(workers), "--log-level", "warning",
        "--metadata-listen", f"127.0.0.1:{metadata_port}", "--dns-listen", f"127.0.0.1:{dns_port}",
        "--admin-listen", f"127.0.0.1:{free_port()}"])
    process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL)
    kind = "http" if credentials_url else "process"
    command = " ".join(argv) + f"   # {config.name}: dns.upstreams, metadata.credentials kind={kind}"
    return Running(f"edge --workers {workers}", metadata_port, dns_port, [process], [process.pid], [command])


def start_target(target: str, document: dict, view_path: Path, directory: Path, cores: CorePlan, forward_port: int,
                 delay: float, upstream_workers: int) -> Running:
    if target.startswith("edge-w") and target.endswith("-http"):
        # Credentials from the central service over HTTP (once per instance and role) instead of a process.
        from bench.classic import start_upstream
        upstream, port, command = start_upstream(view_path, cores, delay, upstream_workers)
        try:
            running = start_edge(int(target[6:-5]), view_path, directory, cores, forward_port,
                                 f"http://127.0.0.1:{port}/latest/meta-data/iam/security-credentials/")
        except BaseException:
            stop(upstream)
            raise
        running.name += f" (credentials over HTTP from the {delay * 1000:g} ms service)"
        running.processes.append(upstream)
        running.server_pids.append(upstream.pid)
        running.commands.append(command)
        return running
    if target.startswith("edge-w"):
        return start_edge(int(target[6:]), view_path, directory, cores, forward_port)
    if target == "classic":
        from bench.classic import start_classic
        stack = start_classic(document, view_path, directory, cores, FORWARD_ZONE, forward_port, delay,
                              upstream_workers)
        return Running(f"classic (nginx -> {delay * 1000:g} ms upstream, {upstream_workers} at a time; dnsmasq)",
                       stack.metadata_port, stack.dns_port, stack.processes, stack.server_pids, stack.commands)
    raise ValueError(f"unknown target {target!r}")


def wait_ready(running: Running, probe: Machine, timeout: float = 60.0) -> None:
    """Until the target answers the probe instance's metadata and its DNS name correctly."""
    import uvloop

    async def ready() -> bool:
        tally = Tally()
        boot = Boot(probe, "127.0.0.1", running.metadata_port, running.dns_port, tally)
        token = await boot.http("PUT", "/latest/api/token", b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\n")
        if token is None:
            return False
        boot.token = token
        body = await boot.get("/latest/meta-data/instance-id")
        answers = await boot.resolve(probe.private_name, "A")
        return body == probe.instance_id.encode() and answers == [probe.address]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in running.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{running.name} exited with {process.returncode} before it was ready")
        try:
            if uvloop.run(asyncio.wait_for(ready(), 5)):
                return
        except (OSError, asyncio.TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{running.name} not ready within {timeout:g}s")


# -- measurement -------------------------------------------------------------------------------

@dataclass(slots=True)
class StormResult:
    target: str
    instances: int
    booted: int
    seconds: float
    boots_per_second: float
    http_requests: int
    dns_queries: int
    dns_retries: int
    http_p50_ms: float
    http_p99_ms: float
    http_max_ms: float
    dns_p50_ms: float
    dns_p99_ms: float
    dns_max_ms: float
    errors: int
    error_kinds: dict[str, int]
    error_examples: list[str]
    server_cpu_seconds: float
    server_cpu_us_per_request: float
    client_cpu_share: float
    """Load generator CPU seconds per second of storm, per generator core (1.0: saturated)."""


def measure(running: Running, machines: Sequence[Machine], client_processes: int, client_cores: int) -> StormResult:
    server_before = cpu_seconds(running.server_pids, children=True)
    client_before = self_cpu_seconds()
    tally, seconds = run_storm(machines, "127.0.0.1", running.metadata_port, running.dns_port, client_processes)
    client_used = self_cpu_seconds() - client_before
    server_used = cpu_seconds(running.server_pids, children=True) - server_before
    http = sorted(tally.http_seconds)
    dns = sorted(tally.dns_seconds)
    requests = len(http) + len(dns)
    return StormResult(
        target=running.name, instances=len(machines), booted=tally.booted, seconds=seconds,
        boots_per_second=tally.booted / seconds if seconds > 0 else 0.0,
        http_requests=len(http), dns_queries=len(dns), dns_retries=tally.dns_retries,
        http_p50_ms=percentile(http, 0.5) * 1000, http_p99_ms=percentile(http, 0.99) * 1000,
        http_max_ms=(http[-1] if http else 0.0) * 1000,
        dns_p50_ms=percentile(dns, 0.5) * 1000, dns_p99_ms=percentile(dns, 0.99) * 1000,
        dns_max_ms=(dns[-1] if dns else 0.0) * 1000,
        errors=sum(tally.errors.values()), error_kinds=dict(tally.errors), error_examples=list(tally.examples),
        server_cpu_seconds=server_used, server_cpu_us_per_request=server_used / max(requests, 1) * 1e6,
        client_cpu_share=client_used / seconds / max(1, min(client_processes, client_cores)) if seconds > 0 else 0.0)


@dataclass(slots=True)
class BootstormReport:
    instances: int
    rounds: int
    delay_ms: float
    upstream_workers: int
    client_processes: int
    cores: CorePlan
    results: dict[str, list[StormResult]]
    commands: list[str]

    def to_json(self) -> dict:
        return {"instances": self.instances, "rounds": self.rounds, "delay_ms": self.delay_ms,
                "upstream_workers": self.upstream_workers, "client_processes": self.client_processes,
                "server_cores": self.cores.server_list, "client_cores": self.cores.client_list,
                "results": {k: [asdict(r) for r in v] for k, v in self.results.items()}, "commands": self.commands}


def run_bootstorm(instances: int = 1000, rounds: int = 3, targets: Sequence[str] = ("edge-w1", "edge-w2", "classic"),
                  delay: float = 0.010, upstream_workers: int = 64, client_processes: int | None = None,
                  cores: CorePlan | None = None, log=print) -> BootstormReport:
    """Every target ``rounds`` times (interleaved), each round on a freshly started server.

    ``client_processes`` defaults to one load generator process per client core.
    """
    from edge.testing.generate import generate_view

    cores = cores or core_plan()
    client_processes = client_processes or len(cores.client)
    raise_open_files_limit()
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores.client)
    try:
        return _run_pinned(generate_view(instances=instances, networks=1, loopback=True), rounds, targets, delay,
                           upstream_workers, client_processes, cores, log)
    finally:
        os.sched_setaffinity(0, affinity)


def _run_pinned(document: dict, rounds: int, targets: Sequence[str], delay: float, upstream_workers: int,
                client_processes: int, cores: CorePlan, log) -> BootstormReport:
    machines = machines_of(document)
    results: dict[str, list[StormResult]] = {}
    commands: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edge-bootstorm-") as temporary:
        directory = Path(temporary)
        view_path = directory / "view.json"
        view_path.write_text(json.dumps(document))
        forward_port = free_port()
        forwarder = start_dnsmasq(
            [f"host-record=mirror-{n}.{FORWARD_ZONE},{forwarded_address(n)}" for n in range(FORWARDED_NAMES)],
            directory, forward_port, cores.pin_client([]), ("--local-ttl=3600", f"--local=/{FORWARD_ZONE}/"))
        try:
            for round_number in range(rounds):
                for target in targets:
                    running = start_target(target, document, view_path, directory, cores, forward_port, delay,
                                           upstream_workers)
                    try:
                        wait_ready(running, machines[-1])
                        if round_number == 0:
                            commands.extend(running.commands)
                        time.sleep(0.3)
                        result = measure(running, machines, client_processes, len(cores.client))
                    finally:
                        for process in running.processes:
                            stop(process)
                    results.setdefault(target, []).append(result)
                    log(f"bootstorm round {round_number + 1}/{rounds} {running.name}: "
                        f"{result.boots_per_second:,.0f} boots/s, {result.booted}/{result.instances} booted, "
                        f"http p99 {result.http_p99_ms:.1f} ms, errors {result.errors}")
        finally:
            stop(forwarder)
    commands.append(f"taskset -c {cores.client_list} dnsmasq --port=PORT --local=/{FORWARD_ZONE}/ "
                    f"(forwarded names mirror-0..{FORWARDED_NAMES - 1}.{FORWARD_ZONE}; not measured)")
    return BootstormReport(len(machines), rounds, delay * 1000, upstream_workers, client_processes, cores, results,
                           commands)


def markdown(report: BootstormReport) -> str:
    """A table of medians (min-max) per target, with ratios to the classic design."""
    lines = [
        f"{report.instances} instances booting at once, {report.rounds} round(s) per target (fresh server each "
        f"round); servers on cpu {report.cores.server_list}, load generator ({report.client_processes} process(es)) "
        f"on cpu {report.cores.client_list}. Classic upstream: {report.delay_ms:g} ms per request, "
        f"{report.upstream_workers} requests at a time. Server CPU includes helper processes and services "
        "(credential source).",
        "",
        "| target | booted/s median (min-max) | booted | HTTP p50 / p99 / max ms | DNS p50 / p99 / max ms "
        "| requests per boot | server CPU us/request | errors | generator CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, tuple[float, float]] = {}
    for target, runs in report.results.items():
        rate, low, high = median_range([r.boots_per_second for r in runs])
        cpu = statistics.median(r.server_cpu_us_per_request for r in runs)
        medians[target] = (rate, cpu)
        per_boot = statistics.median((r.http_requests + r.dns_queries) / max(r.instances, 1) for r in runs)
        lines.append(
            f"| {runs[0].target} | {rate:,.1f} ({low:,.1f}-{high:,.1f}) | "
            f"{min(r.booted for r in runs)}/{runs[0].instances} | "
            f"{statistics.median(r.http_p50_ms for r in runs):.1f} / "
            f"{statistics.median(r.http_p99_ms for r in runs):.1f}"
            f" / {max(r.http_max_ms for r in runs):.0f} | "
            f"{statistics.median(r.dns_p50_ms for r in runs):.2f} / {statistics.median(r.dns_p99_ms for r in runs):.1f}"
            f" / {max(r.dns_max_ms for r in runs):.0f} | {per_boot:.1f} | {cpu:,.0f} | "
            f"{sum(r.errors for r in runs)} | {statistics.median(r.client_cpu_share for r in runs):.0%} |")
    if "classic" in medians:
        classic_rate, classic_cpu = medians["classic"]
        for target, (rate, cpu) in medians.items():
            if target != "classic" and classic_rate > 0 and cpu > 0:
                lines.append(f"\n{target} vs classic: {rate / classic_rate:.1f}x instances booted per second, "
                             f"{classic_cpu / cpu:.1f}x less server CPU per request.")
    retries = [(r.target, r.dns_retries) for runs in report.results.values() for r in runs if r.dns_retries]
    if retries:
        lines.append("\nDNS queries sent again after a 1 s timeout: "
                     + "; ".join(f"{t}: {n}" for t, n in retries))
    errors = [(r.target, kind, count) for runs in report.results.values() for r in runs
              for kind, count in r.error_kinds.items()]
    if errors:
        lines.append("\nErrors: " + "; ".join(f"{t}: {k} x{c}" for t, k, c in errors))
        examples = [e for runs in report.results.values() for r in runs for e in r.error_examples][:5]
        lines.extend(f"    {example}" for example in examples)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000, help="instances booting at once (max 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per target (max 10)")
    parser.add_argument("--targets", default="edge-w1,edge-w2,classic",
                        help="edge-wN (credentials from a process), edge-wN-http (from the slow service), classic")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="classic upstream: delay per request")
    parser.add_argument("--upstream-workers", type=int, default=64,
                        help="classic upstream: requests handled at a time")
    parser.add_argument("--client-processes", type=int, help="load generator processes (default: one per core "
                        "of the load generator's half of the machine)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    report = run_bootstorm(
        instances=max(2, min(args.instances, 5000)), rounds=max(1, min(args.rounds, 10)),
        targets=[t for t in args.targets.split(",") if t], delay=args.delay_ms / 1000,
        upstream_workers=args.upstream_workers,
        client_processes=max(1, args.client_processes) if args.client_processes else None,
        log=lambda text: print(text, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    print(markdown(report))
    return 0 if all(r.errors == 0 for runs in report.results.values() for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
