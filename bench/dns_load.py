"""Load test: edge (1 worker) vs NSD vs dnsmasq on the same 1,000-instance data, in one run, with dnsperf.

    python bench/dns_load.py [--seconds 8] [--instances 1000] [--rounds 3]

Every server is pinned to one core and dnsperf to the other (``taskset``),
listens on a free 127.0.0.1 port, and answers the same questions (private
names, public names and PTRs of the flat network).  For each server the
script reports queries/s at full load, server CPU time per query (utime +
stime of the server's processes from /proc over the run, divided by the
queries completed: with one dnsperf thread the load generator is often the
limit, so rate alone cannot separate fast servers), and p50/p99 latency from
a second, rate-limited run with per-query output.  edge is also measured on
forwarded names answered from its cache (upstream: a dnsmasq, warmed first).
All servers run at once (idle ones cost nothing) and are measured in
interleaved rounds; medians are reported because the host is shared.
Everything stays on loopback and each run is bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_user_system, free_port, generator_cpu_seconds  # noqa: E402
from bench.generate import generate_view  # noqa: E402
from bench.peer_configs import DNSPERF_OUTSTANDING, SERVERS, dnsmasq_local_args, write_nsd  # noqa: E402
from edge.dns.zonefile import zone_texts  # noqa: E402
from edge.view.parse import parse_view  # noqa: E402
from edge.view.snapshot import build_snapshot, reverse_name  # noqa: E402

SERVER_CORE = "1"
CLIENT_CORE = "0"
TICKS = os.sysconf("SC_CLK_TCK")


def wait_udp(port: int, name: str, timeout: float = 20.0) -> None:
    """Until the server on ``port`` answers ``name A`` with NOERROR: a server still loading its data (edge
    answers SERVFAIL until its first view is in) is not ready to be measured."""
    query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00\x00\x01\x00\x01")
    deadline = time.monotonic() + timeout
    last = "no answer"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            sock.sendto(query, ("127.0.0.1", port))
            try:
                reply = sock.recv(4096)
            except OSError:
                time.sleep(0.1)
                continue
            if reply[:2] == b"\x12\x34" and len(reply) >= 4:
                if reply[3] & 0x0F == 0:
                    return
                last = f"rcode {reply[3] & 0x0F}"
                time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer {name} with NOERROR ({last})")


@dataclass
class Result:
    server: str
    workload: str
    qps: float
    completed: int
    lost: int
    cpu_us_per_query: float
    user_share: float = 0.0
    """Fraction of the server's CPU time spent in user space (the rest is the kernel's)."""
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rcodes: str = ""
    """dnsperf's response code summary: every workload here should be all NOERROR."""
    errors: int = 0
    """Answers whose response code is not NOERROR: every question here has an answer."""
    drops: int = 0
    """Queries the kernel dropped at the server's sockets during the run (receive buffer full, from
    /proc/net/udp), plus those the server itself counted as failed where it counts them (NSD's
    num.rxerr/txerr/dropped, edge's edge_replies_dropped_total)."""
    generator_busy: float = 0.0
    """Share of its core dnsperf used over the run: near 1, dnsperf set the rate, not the server."""


def dnsperf(port: int, queries: Path, seconds: float, extra: tuple[str, ...] = ()) -> str:
    args = ["taskset", "-c", CLIENT_CORE, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
            "-l", str(seconds), "-c", "4", "-q", str(DNSPERF_OUTSTANDING), "-t", "2", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout


def udp_drops(port: int, table: str = "/proc/net/udp") -> int:
    """Datagrams dropped so far at the UDP sockets bound to ``port`` (the ``drops`` column of /proc/net/udp)."""
    suffix = f":{port:04X}"
    dropped = 0
    for line in Path(table).read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 13 and fields[1].endswith(suffix):
            dropped += int(fields[-1])
    return dropped


def nsd_errors(conf: Path) -> int:
    """NSD's own count of queries it failed: receive and send errors and dropped queries (``nsd-control
    stats_noreset``: num.rxerr + num.txerr + num.dropped); needs the remote control of bench/peer_configs.py."""
    done = subprocess.run(["nsd-control", "-c", str(conf), "stats_noreset"], capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"nsd-control stats_noreset failed: {(done.stdout + done.stderr).strip()[-300:]}")
    values = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return sum(int(float(values.get(key, "0"))) for key in ("num.rxerr", "num.txerr", "num.dropped"))


EDGE_EXPORT_INTERVAL = 1.0
"""Seconds between a worker's copies of its plain counters into /metrics (edge/dns/service.py)."""


def edge_errors(admin_port: int, settle: bool = True) -> int:
    """edge's own count of DNS answers it could not send (``edge_replies_dropped_total{protocol="dns"}`` on its
    admin listener's /metrics); with ``settle``, read after the workers' next export of their counters."""
    if settle:
        time.sleep(EDGE_EXPORT_INTERVAL * 1.5)
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return int(sum(float(value) for value in
                   re.findall(r'^edge_replies_dropped_total\{[^}]*protocol="dns"[^}]*\} ([\d.e+]+)$', text,
                              re.MULTILINE)))


def measure(name: str, workload: str, pid: int, port: int, queries: Path, seconds: float,
            latency: bool = True, own_errors: Callable[[], int] | None = None) -> Result:
    """One full-load dnsperf run against the server ``pid`` on ``port``; with ``latency``, then a second,
    rate-limited run for p50/p99.  ``own_errors`` reads the server's own count of failed queries (its
    increase over the run is added to the kernel's socket drops)."""
    own_before = own_errors() if own_errors else 0  # first: reading them costs the server CPU too
    user_before, system_before = cpu_user_system(pid)
    drops_before = udp_drops(port)
    generator_before, started = generator_cpu_seconds(), time.monotonic()
    output = dnsperf(port, queries, seconds)
    generator_busy = (generator_cpu_seconds() - generator_before) / max(time.monotonic() - started, 1e-9)
    drops = udp_drops(port) - drops_before
    user_after_run, system_after_run = cpu_user_system(pid)
    if own_errors:
        drops += own_errors() - own_before
    user, system = user_after_run - user_before, system_after_run - system_before
    used = user + system
    completed = int(re.search(r"Queries completed:\s+(\d+)", output).group(1))  # type: ignore[union-attr]
    lost = int(re.search(r"Queries lost:\s+(\d+)", output).group(1))  # type: ignore[union-attr]
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    rcodes = re.search(r"Response codes:\s+(.*)", output)
    rcode_text = rcodes.group(1).strip() if rcodes else ""
    result = Result(name, workload, qps, completed, lost, used / max(completed, 1) * 1e6, user / max(used, 1e-9),
                    rcodes=rcode_text, errors=not_noerror(rcode_text), drops=drops, generator_busy=generator_busy)
    if not latency:
        return result
    # Latency at a fixed, moderate rate, one line per query.
    verbose = dnsperf(port, queries, min(seconds, 3), ("-Q", "20000", "-v"))
    latencies = sorted(float(m) for m in re.findall(r"^> \w+ .* ([\d.]+)$", verbose, re.MULTILINE))
    if latencies:
        result.p50_ms = statistics.median(latencies) * 1000
        result.p99_ms = latencies[int(len(latencies) * 0.99) - 1] * 1000
    return result


def not_noerror(rcodes: str) -> int:
    """Answers other than NOERROR in dnsperf's ``Response codes:`` line (``NOERROR 91007 (100.00%), ...``)."""
    return sum(int(count) for code, count in re.findall(r"([A-Z]+) (\d+) \(", rcodes) if code != "NOERROR")


def dnsmasq_records(snapshot: object) -> list[str]:
    """dnsmasq configuration lines holding the snapshot's A and PTR records for the local-hits workload."""
    lines = []
    for name, entry in sorted(snapshot.names.items()):  # type: ignore[attr-defined]
        for record in entry.records_for(""):
            if record.type == "A":
                lines.append(f"host-record={name},{record.value}")
    # host-record derives PTRs for its own addresses; public addresses need explicit ones.
    derived = {reverse_name(line.rsplit(",", 1)[1]) for line in lines}
    for name, entry in sorted(snapshot.names.items()):  # type: ignore[attr-defined]
        for record in entry.records_for(""):
            if record.type == "PTR" and name not in derived:
                lines.append(f"ptr-record={name},{record.value}")
    return lines


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    options = parser.parse_args()
    for tool in ("dnsperf", "nsd", "dnsmasq", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="edge-dns-load-"))
    document = generate_view(instances=options.instances, networks=1, loopback=True, user_data_bytes=0)
    (work / "view.json").write_text(json.dumps(document))
    snapshot = build_snapshot(parse_view(document))
    texts = zone_texts(snapshot, "")
    questions = []
    for name in sorted(snapshot.names):
        for record in snapshot.names[name].records_for(""):
            if record.type in ("A", "PTR"):
                questions.append(f"{name} {record.type}")
    random.Random(1).shuffle(questions)
    hits = work / "hits.txt"
    hits.write_text("\n".join(questions) + "\n")
    forwarded = work / "forwarded.txt"
    forwarded.write_text("".join(f"host{n}.upstream.test A\n" for n in range(1000)))

    processes: list[subprocess.Popen[bytes]] = []
    rounds: list[list[Result]] = []
    try:
        # Upstream for edge's forwarded workload (not measured itself).
        upstream_port = free_port()
        upstream_conf = work / "upstream.conf"
        upstream_conf.write_text("".join(f"host-record=host{n}.upstream.test,192.0.2.{n % 250 + 1}\n"
                                         for n in range(1000)))
        processes.append(subprocess.Popen(
            ["taskset", "-c", CLIENT_CORE, "dnsmasq", "--keep-in-foreground", f"--conf-file={upstream_conf}",
             "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
             "--except-interface=nonexistent0", f"--port={upstream_port}", "--local-ttl=3600", "--pid-file=",
             "--user=root", "--group=root", "--local=/upstream.test/"], stderr=subprocess.DEVNULL))
        wait_udp(upstream_port, "host1.upstream.test")

        # edge: one worker; the per-source rate limit is off because all load comes from one address.
        edge_port, edge_admin_port = free_port(), free_port()
        config = work / "edge.toml"
        config.write_text(f'[dns]\nupstreams = ["127.0.0.1:{upstream_port}"]\nrecursion_cidrs = ["127.0.0.0/8"]\n'
                          f"rate_limit = 0.0\n")
        edge = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, sys.executable, "-m", "edge", "serve", "--workers", str(SERVERS),
             "--config", str(config),
             "--view", str(work / "view.json"), "--state-dir", str(work / "state"), "--log-level", "warning",
             "--dns-listen", f"127.0.0.1:{edge_port}", "--metadata-listen", f"127.0.0.1:{free_port()}",
             "--admin-listen", f"127.0.0.1:{edge_admin_port}"], cwd=ROOT, stderr=subprocess.DEVNULL)
        processes.append(edge)

        # NSD, one server process, response rate limiting off (bench/peer_configs.py).
        nsd_port = free_port()
        nsd_conf = write_nsd(work / "nsd", nsd_port, texts)
        nsd = subprocess.Popen(["taskset", "-c", SERVER_CORE, "nsd", "-d", "-c", str(nsd_conf)],
                               stderr=subprocess.DEVNULL)
        processes.append(nsd)

        # dnsmasq with the same records: host-record lines, plus ptr-record where it cannot derive the PTR.
        dnsmasq_port = free_port()
        dnsmasq_conf = work / "dnsmasq.conf"
        dnsmasq_conf.write_text("\n".join(dnsmasq_records(snapshot)) + "\n")
        dnsmasq = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, "dnsmasq", "--keep-in-foreground", f"--conf-file={dnsmasq_conf}",
             "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
             "--except-interface=nonexistent0", f"--port={dnsmasq_port}", "--pid-file=", "--user=root",
             "--group=root", *dnsmasq_local_args()], stderr=subprocess.DEVNULL)
        processes.append(dnsmasq)

        for port in (edge_port, nsd_port, dnsmasq_port):
            wait_udp(port, questions[0].split()[0])
        dnsperf(edge_port, hits, 1)  # first use renders and memoizes each answer
        dnsperf(edge_port, forwarded, 1, ("-Q", "5000"))  # fill the forwarding cache
        edge_counted = lambda: edge_errors(edge_admin_port)  # noqa: E731
        nsd_counted = lambda: nsd_errors(nsd_conf)  # noqa: E731
        targets = [("edge", "all hits", edge.pid, edge_port, hits, edge_counted),
                   ("edge", "forwarded, cache hits", edge.pid, edge_port, forwarded, edge_counted),
                   ("nsd", "all hits", nsd.pid, nsd_port, hits, nsd_counted),
                   ("dnsmasq", "all hits", dnsmasq.pid, dnsmasq_port, hits, None)]
        # Interleaved rounds, medians reported: the host is shared and noisy.
        for _ in range(options.rounds):
            rounds.append([measure(name, workload, pid, port, queries, options.seconds, own_errors=counted)
                           for name, workload, pid, port, queries, counted in targets])
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(work, ignore_errors=True)

    results = []
    for index in range(len(rounds[0])):
        samples = [r[index] for r in rounds]
        results.append(Result(samples[0].server, samples[0].workload,
                              statistics.median(s.qps for s in samples),
                              int(statistics.median(s.completed for s in samples)),
                              sum(s.lost for s in samples),
                              statistics.median(s.cpu_us_per_query for s in samples),
                              statistics.median(s.user_share for s in samples),
                              statistics.median(s.p50_ms for s in samples),
                              statistics.median(s.p99_ms for s in samples),
                              samples[-1].rcodes,
                              sum(s.errors for s in samples),
                              sum(s.drops for s in samples),
                              statistics.median(s.generator_busy for s in samples)))
    if options.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    print(f"{'server':8} {'workload':24} {'qps':>9} {'lost':>6} {'cpu us/q':>9} {'user %':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7}")
    for r in results:
        print(f"{r.server:8} {r.workload:24} {r.qps:9.0f} {r.lost:6d} {r.cpu_us_per_query:9.2f} "
              f"{r.user_share * 100:7.0f} {r.p50_ms:7.3f} {r.p99_ms:7.3f}  {r.rcodes}")
    by = {(r.server, r.workload): r for r in results}
    edge_hits, nsd_hits, dnsmasq_hits = by[("edge", "all hits")], by[("nsd", "all hits")], by[("dnsmasq", "all hits")]
    fwd = by[("edge", "forwarded, cache hits")]
    troubled = [f"{r.server} {r.workload}: {r.errors} errors, {r.lost} lost, {r.drops} dropped" for r in results
                if r.errors or r.lost or r.drops]
    if troubled:
        print("INVALID, no ratios: a server was not error-free (" + "; ".join(troubled) + ")")
        return 1
    print(f"edge/nsd qps: {edge_hits.qps / nsd_hits.qps:.2f}x   "
          f"edge/dnsmasq qps: {edge_hits.qps / dnsmasq_hits.qps:.2f}x   "
          f"cpu per query edge/dnsmasq: {edge_hits.cpu_us_per_query / dnsmasq_hits.cpu_us_per_query:.2f}x   "
          f"edge/nsd: {edge_hits.cpu_us_per_query / nsd_hits.cpu_us_per_query:.2f}x   "
          f"forwarded cache hits / local hits (qps): {fwd.qps / edge_hits.qps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
