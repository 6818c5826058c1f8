"""The native peers edge is compared with: installing them, their versions, and the runs not covered elsewhere.

``bench/metadata_load.py`` (edge vs nginx) and ``bench/dns_load.py`` (edge vs
NSD and dnsmasq) own their comparisons; this module adds, on the same data
and with the same pinning:

* DNS local hits on Knot DNS (when installed);
* DNS forwarded cache hits: edge vs dnsmasq forwarding with its cache, both
  in front of the same upstream dnsmasq;
* edge ``--workers 1`` vs ``--workers 2`` (``edge serve``) for metadata
  keep-alive (wrk) and DNS local hits (dnsperf).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    CorePlan,
    cpu_seconds,
    free_port,
    generator_cpu_seconds,
    start_dnsmasq,
    start_helper_server,
    stop,
    tool_version,
    wait_tcp,
)
from bench.peer_configs import dnsmasq_forwarding_args, dnsmasq_forwarding_lines, write_knot

ROOT = Path(__file__).resolve().parent.parent

# tool -> Debian package that provides it
TOOLS = {"nginx": "nginx-light", "nsd": "nsd", "dnsmasq": "dnsmasq-base", "wrk": "wrk", "dnsperf": "dnsperf",
         "knotd": "knot", "taskset": "util-linux", "curl": "curl"}
OPTIONAL = {"knotd"}


def ensure_tools(install: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Install missing peers with apt-get when root; returns the tools still missing."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = sorted({TOOLS[tool] for tool in missing})
        log(f"installing Debian packages (services neither started nor enabled): {' '.join(packages)}")
        subprocess.run(["bash", str(ROOT / "tests" / "install-debian-packages"), *packages],
                       stdout=subprocess.DEVNULL, check=False, timeout=600)
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    return missing


def versions() -> dict[str, str]:
    edge_rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True).stdout.strip()
    return {
        "edge": edge_rev or "unknown",
        "nginx": tool_version(["nginx", "-v"], r"nginx/(\S+)"),
        "NSD": tool_version(["nsd", "-v"]),
        "Knot DNS": tool_version(["knotd", "--version"]),
        "dnsmasq": tool_version(["dnsmasq", "--version"]),
        "wrk": tool_version(["wrk", "-v"], r"wrk \S*?(\d+\.\d+\.\d+)"),
        "dnsperf": _package_version("dnsperf"),
        "uvloop": _python_version("uvloop"),
        "httptools": _python_version("httptools"),
    }


def _package_version(package: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _python_version(module: str) -> str:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return "unknown"


# -- measurements -----------------------------------------------------------------------------------

@dataclass(slots=True)
class Sample:
    """One measured run of one server on one workload."""

    server: str
    workload: str
    rate: float
    cpu_us: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    """Wrong answers: wrk's socket errors and non-2xx responses, DNS answers other than NOERROR."""
    timeouts: int = 0
    """Requests never answered: wrk's timeouts, dnsperf's lost queries."""
    drops: int = 0
    """The server's own count: queries the kernel dropped at its UDP sockets (/proc/net/udp)."""
    generator_busy: float = 0.0
    """Share of its core the load generator used over the run (bench.common.GENERATOR_LIMITED)."""


def wrk(port: int, path: str, cores: CorePlan, duration: float, connections: int,
        close: bool) -> tuple[int, float, float, float, int, int]:
    """(requests, requests/s, p50 ms, p99 ms, errors, timeouts) of one ``wrk -t1`` run."""
    argv = cores.pin_client(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"])
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    output = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    return parse_wrk(output)


def parse_wrk(output: str) -> tuple[int, float, float, float, int, int]:
    """(requests, requests/s, p50 ms, p99 ms, errors, timeouts) from ``wrk --latency``'s output."""
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _latency_ms(re.search(r"50%\s+([\d.]+\w+)", output).group(1))  # type: ignore[union-attr]
    p99 = _latency_ms(re.search(r"99%\s+([\d.]+\w+)", output).group(1))  # type: ignore[union-attr]
    errors = timeouts = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        connect, read, write, timeout = (int(g) for g in socket_errors.groups())
        errors += connect + read + write
        timeouts += timeout
    return requests, rate, p50, p99, errors, timeouts


def _latency_ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def measure_wrk(server: str, workload: str, pids: list[int], port: int, path: str, cores: CorePlan,
                duration: float, connections: int, close: bool) -> Sample:
    before, generator_before, started = cpu_seconds(pids), generator_cpu_seconds(), time.monotonic()
    requests, rate, p50, p99, errors, timeouts = wrk(port, path, cores, duration, connections, close)
    used = cpu_seconds(pids) - before
    generator_busy = (generator_cpu_seconds() - generator_before) / max(time.monotonic() - started, 1e-9)
    return Sample(server, workload, rate, used / max(requests, 1) * 1e6, p50, p99, errors, timeouts,
                  generator_busy=generator_busy)


def _start_script(cores: CorePlan, script: str, *args: str) -> tuple[subprocess.Popen, int]:
    """One of the bench/ helper servers that print ``port=N`` once listening, on the server cores."""
    process, port = start_helper_server(script, *args, prefix=cores.pin_server([]))
    wait_tcp(port)
    return process, port


def metadata_vs_nginx(directory: Path, cores: CorePlan, duration: float) -> list[Sample]:
    """edge's metadata worker vs nginx ``return 200`` (the floor), nginx answering from a ``map`` of
    source addresses (the realistic static peer) and the bare uvloop+httptools floor when present,
    keep-alive and connection per request, with the servers of bench/metadata_load.py."""
    from bench import metadata_load

    processes: list[subprocess.Popen] = []
    samples = []
    try:
        edge, edge_port = _start_script(cores, "metadata_server.py", "--state-dir", str(directory / "edge-state"))
        processes.append(edge)
        nginx, nginx_port = metadata_load.start_nginx(cores.server[0], directory, "return")
        processes.append(nginx)
        nginx_map, nginx_map_port = metadata_load.start_nginx(cores.server[0], directory, "map")
        processes.append(nginx_map)
        servers = [("edge", edge, edge_port), ("nginx return 200", nginx, nginx_port),
                   ("nginx map $remote_addr", nginx_map, nginx_map_port)]
        if (ROOT / "bench" / "metadata_bare.py").exists():
            bare, bare_port = _start_script(cores, "metadata_bare.py")
            processes.append(bare)
            servers.append(("bare uvloop+httptools (floor)", bare, bare_port))
        for name, _, port in servers:
            check = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}{metadata_load.PATH}"],
                                   capture_output=True, text=True).stdout
            if check != metadata_load.BODY:
                raise RuntimeError(f"{name} answered {check!r} for {metadata_load.PATH}")
        for mode, connections, close in (("keep-alive", 64, False), ("connection per request", 32, True)):
            for name, process, port in servers:
                time.sleep(0.3)
                samples.append(measure_wrk(name, mode, [process.pid], port, metadata_load.PATH, cores, duration,
                                           connections, close))
    finally:
        for process in processes:
            stop(process)
    return samples


def _edge_serve(directory: Path, cores: CorePlan, workers: int, view: str, config_text: str) -> tuple[
        subprocess.Popen, int, int, int]:
    """``edge serve`` on the server cores: (process, metadata port, DNS port, admin port)."""
    config = directory / f"edge-serve-w{workers}.toml"
    config.write_text(config_text)
    metadata_port, dns_port, admin_port = free_port(), free_port(), free_port()
    argv = cores.pin_server([sys.executable, "-m", "edge", "serve", "--config", str(config), "--view", view,
                             "--state-dir", str(directory / f"state-w{workers}"), "--workers", str(workers),
                             "--log-level", "warning", "--metadata-listen", f"127.0.0.1:{metadata_port}",
                             "--dns-listen", f"127.0.0.1:{dns_port}", "--admin-listen", f"127.0.0.1:{admin_port}"])
    return subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL), metadata_port, dns_port, admin_port


def metadata_workers(directory: Path, cores: CorePlan, duration: float) -> list[Sample]:
    """``edge serve --workers 1`` vs ``--workers 2``, metadata keep-alive, demo view, rate limit off."""
    from bench import metadata_load

    samples = []
    for workers in (1, 2):
        process, port, _, _ = _edge_serve(directory, cores, workers, "demo",
                                       "[metadata]\nrate = 0.0\nmax_connections_per_source = 100000\n")
        try:
            _wait_http(port, metadata_load.PATH, metadata_load.BODY)
            samples.append(measure_wrk(f"edge --workers {workers}", "keep-alive", [process.pid], port,
                                       metadata_load.PATH, cores, duration, 64, False))
        finally:
            stop(process)
    return samples


def _wait_http(port: int, path: str, body: str, timeout: float = 30.0) -> None:
    wait_tcp(port, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}{path}"], capture_output=True,
                          text=True).stdout == body:
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} never answered {path} with {body!r}")


@dataclass(slots=True)
class DnsData:
    view_path: Path
    hits: Path
    forwarded: Path
    first_name: str
    zone_texts: dict[str, str]
    dnsmasq_lines: list[str]
    """host-record / ptr-record lines giving dnsmasq the same records (bench/dns_load.py)."""


def dns_data(directory: Path, instances: int) -> DnsData:
    """The same questions dns_load.py asks: every A and PTR of the flat network, shuffled; 1,000 forwarded names."""
    from bench.generate import generate_view
    from edge.dns.zonefile import zone_texts
    from edge.view.parse import parse_view
    from edge.view.snapshot import build_snapshot

    document = generate_view(instances=instances, networks=1, loopback=True, user_data_bytes=0)
    view_path = directory / "dns-view.json"
    view_path.write_text(json.dumps(document))
    snapshot = build_snapshot(parse_view(document))
    questions = [f"{name} {record.type}" for name in sorted(snapshot.names)
                 for record in snapshot.names[name].records_for("") if record.type in ("A", "PTR")]
    random.Random(1).shuffle(questions)
    hits = directory / "dns-hits.txt"
    hits.write_text("\n".join(questions) + "\n")
    forwarded = directory / "dns-forwarded.txt"
    forwarded.write_text("".join(f"host{n}.upstream.test A\n" for n in range(1000)))
    from bench.dns_load import dnsmasq_records
    return DnsData(view_path, hits, forwarded, questions[0].split()[0], zone_texts(snapshot, ""),
                   dnsmasq_records(snapshot))


def dns_extra(directory: Path, cores: CorePlan, seconds: float, instances: int) -> list[Sample]:
    """Knot local hits; edge --workers 1/2 local hits; forwarded cache hits for edge and caching dnsmasq."""
    from bench import dns_load

    data = dns_data(directory, instances)
    samples: list[Sample] = []
    processes: list[subprocess.Popen] = []

    def record(server: str, workload: str, process: subprocess.Popen, port: int, queries: Path,
               own_errors: Callable[[], int] | None = None) -> None:
        result = dns_load.measure(server, workload, process.pid, port, queries, seconds, own_errors=own_errors)
        samples.append(Sample(server, workload, result.qps, result.cpu_us_per_query, result.p50_ms, result.p99_ms,
                              result.errors, result.lost, result.drops, result.generator_busy))

    try:
        upstream_port = free_port()
        upstream = start_dnsmasq([f"host-record=host{n}.upstream.test,192.0.2.{n % 250 + 1}" for n in range(1000)],
                                 directory, upstream_port, cores.pin_client([]),
                                 ("--local-ttl=3600", "--local=/upstream.test/"))
        processes.append(upstream)
        dns_load.wait_udp(upstream_port, "host1.upstream.test")

        if shutil.which("knotd"):
            knot_port = free_port()
            knot_conf = write_knot(directory / "knot", knot_port, data.zone_texts)
            knot = subprocess.Popen(cores.pin_server(["knotd", "-c", str(knot_conf)]),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            processes.append(knot)
            dns_load.wait_udp(knot_port, data.first_name)
            cores.repin_server_threads(knot.pid)
            record("knot", "all hits", knot, knot_port, data.hits)
            stop(knot)

        config = (f'[dns]\nupstreams = ["127.0.0.1:{upstream_port}"]\nrecursion_cidrs = ["127.0.0.0/8"]\n'
                  "rate_limit = 0.0\n")
        for workers in (1, 2):
            edge, _, dns_port, admin_port = _edge_serve(directory, cores, workers, str(data.view_path), config)
            processes.append(edge)
            dns_load.wait_udp(dns_port, data.first_name)
            dns_load.dnsperf(dns_port, data.hits, 1)  # first use renders and memoizes each answer
            counted = lambda: dns_load.edge_errors(admin_port)  # noqa: E731
            record(f"edge --workers {workers}", "all hits", edge, dns_port, data.hits, counted)
            if workers == 1:
                dns_load.dnsperf(dns_port, data.forwarded, 1, ("-Q", "5000"))  # fill the cache
                record("edge", "forwarded, cache hits", edge, dns_port, data.forwarded, counted)
            stop(edge)

        forwarder_port = free_port()
        forwarder = start_dnsmasq(dnsmasq_forwarding_lines(upstream_port), directory, forwarder_port,
                                  cores.pin_server([]), dnsmasq_forwarding_args())
        processes.append(forwarder)
        dns_load.wait_udp(forwarder_port, "host1.upstream.test")
        dns_load.dnsperf(forwarder_port, data.forwarded, 1, ("-Q", "5000"))
        record("dnsmasq (forwarding, cache)", "forwarded, cache hits", forwarder, forwarder_port, data.forwarded)
    finally:
        for process in processes:
            stop(process)
    return samples


def dns_load_run(seconds: float, instances: int) -> list[Sample]:
    """One round of ``bench/dns_load.py --json`` (edge vs NSD vs dnsmasq), parsed.

    One round per call, so the caller sees every run (dns_load.py reports only
    medians of its rounds).  ``EDGE_WORKERS=1``: the comparison is one edge
    worker against one NSD server process, whatever edge's default.
    """
    argv = [sys.executable, str(ROOT / "bench" / "dns_load.py"), "--seconds", f"{seconds:g}", "--instances",
            str(instances), "--rounds", "1", "--json"]
    for attempt in (1, 2):
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds * 20 + 180,
                              env=dict(os.environ, EDGE_WORKERS="1"))
        if done.returncode == 0:
            break
        # A server that did not come up in time on a busy machine: one more try, then give up loudly.
        if attempt == 2:
            raise RuntimeError(f"dns_load.py failed twice ({done.returncode}): {done.stderr[-500:]}")
    rows, _ = json.JSONDecoder().raw_decode(done.stdout.lstrip())
    return [Sample(r["server"], r["workload"], r["qps"], r["cpu_us_per_query"], r["p50_ms"], r["p99_ms"],
                   r.get("errors", 0), r["lost"], r.get("drops", 0), r.get("generator_busy", 0.0)) for r in rows]


DNS_SERVERS = ("edge", "nsd", "knot", "dnsmasq")
"""The servers answering the local-hits workload, as the open-loop sweep and the calibration start them."""


def start_dns_server(kind: str, directory: Path, cores: CorePlan, data: DnsData) -> tuple[subprocess.Popen, int]:
    """One of DNS_SERVERS on the server cores, configured as in the comparisons, answering ``data``; ready and
    (edge) warmed: (process, port)."""
    from bench import dns_load
    from bench.peer_configs import SERVERS, dnsmasq_local_args, write_nsd

    port = free_port()
    if kind == "edge":
        process, _, port, _ = _edge_serve(directory, cores, SERVERS, str(data.view_path),
                                          "[dns]\nrate_limit = 0.0\n")
    elif kind == "nsd":
        conf = write_nsd(directory / f"nsd-{port}", port, data.zone_texts)
        process = subprocess.Popen(cores.pin_server(["nsd", "-d", "-c", str(conf)]), stdin=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    elif kind == "knot":
        conf = write_knot(directory / f"knot-{port}", port, data.zone_texts)
        process = subprocess.Popen(cores.pin_server(["knotd", "-c", str(conf)]), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elif kind == "dnsmasq":
        process = start_dnsmasq(data.dnsmasq_lines, directory, port, cores.pin_server([]), dnsmasq_local_args())
    else:
        raise ValueError(f"unknown DNS server {kind!r} (known: {', '.join(DNS_SERVERS)})")
    try:
        dns_load.wait_udp(port, data.first_name, timeout=30)
        if kind == "knot":
            cores.repin_server_threads(process.pid)
        if kind == "edge":
            dns_load.dnsperf(port, data.hits, 1)  # first use renders and memoizes each answer
    except Exception:
        stop(process)
        raise
    return process, port
