"""Calibration: before comparing, each peer runs briefly and its rate must land in its expected range.

A peer far below its range means the machine is too busy to measure on (another
job on the server or generator core) or the peer is misconfigured (a rate limit
left on, the wrong worker count); far above means the generator or pinning
changed.  Either way the comparisons of that run are flagged, not trusted.

    python -m bench calibrate [--seconds 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import CorePlan, core_plan, free_port, start_dnsmasq, stop
from bench.peer_configs import dnsmasq_forwarding_args, dnsmasq_forwarding_lines

# Expected rates on this machine kind: 2 cores (AMD EPYC, 23 GiB), one server
# process pinned to cpu 1, the load generator (dnsperf -c 4 -q 100, wrk -t1) on
# cpu 0, everything on loopback, configurations of bench/peer_configs.py.
# Where the figures come from:
# * NSD: the side-by-side run of issue 16 (rrl-ratelimit 0, one server):
#   about 370k queries/s;
# * dnsmasq local hits and forwarded cache hits, nginx return 200 (keep-alive
#   and a new connection per request): the one-command report of 2026-11-25
#   19:26 UTC in bench/RESULTS.md (99k, 152k, 137k, 21k; dnsmasq lost a few
#   dozen queries in those runs, so its figures are approximate);
# * Knot DNS (one UDP worker, no modules) and nginx with a map of 1,000 source
#   addresses: no quiet figure yet; their ratio to NSD and to nginx return 200
#   in the same (loaded) short runs of 2026-12-05, about 1.1x and 0.7x, applied
#   to the quiet figures above, with wider ranges until a quiet run replaces them.
# Each range is about -30% / +25% of the figure: run-to-run spread on a quiet
# machine of this kind is within 15%.
EXPECTED: Mapping[tuple[str, str], tuple[float, float]] = {
    ("nsd", "local hits"): (260_000, 460_000),
    ("knot", "local hits"): (285_000, 510_000),
    ("dnsmasq", "local hits"): (70_000, 125_000),
    ("dnsmasq (forwarding, cache)", "forwarded, cache hits"): (105_000, 190_000),
    ("nginx return 200", "keep-alive"): (95_000, 172_000),
    ("nginx return 200", "connection per request"): (14_500, 26_500),
    ("nginx map $remote_addr", "keep-alive"): (67_000, 172_000),
}


@dataclass(frozen=True, slots=True)
class Calibration:
    """One peer's short run against its expected range."""

    peer: str
    workload: str
    rate: float
    low: float
    high: float
    problems: str = ""
    """Errors or timeouts in the run (a peer with them is not at its best)."""

    @property
    def verdict(self) -> str:
        if self.problems:
            return f"FLAGGED: {self.problems} (peer misconfigured or machine too noisy)"
        if self.rate < self.low:
            return "FLAGGED: below its range (machine too noisy / peer misconfigured)"
        if self.rate > self.high:
            return "FLAGGED: above its range (generator, pinning or machine changed)"
        return "ok"

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def judge(measured: Iterable[tuple[str, str, float, str]],
          expected: Mapping[tuple[str, str], tuple[float, float]] = EXPECTED) -> list[Calibration]:
    """(peer, workload, rate, problems) measurements against ``expected``; a peer without a range is an error."""
    verdicts = []
    for peer, workload, rate, problems in measured:
        if (peer, workload) not in expected:
            raise KeyError(f"no expected range for {peer} / {workload}: add one to bench/calibration.py EXPECTED")
        low, high = expected[(peer, workload)]
        verdicts.append(Calibration(peer, workload, rate, low, high, problems))
    return verdicts


def ranges_table(expected: Mapping[tuple[str, str], tuple[float, float]] = EXPECTED) -> str:
    """The expected ranges as a Markdown table (bench/RESULTS.md shows it)."""
    lines = ["| peer | workload | expected rate on this machine kind |", "|---|---|---:|"]
    lines += [f"| {peer} | {workload} | {low:,.0f}-{high:,.0f} |" for (peer, workload), (low, high) in expected.items()]
    return "\n".join(lines)


def markdown(verdicts: Sequence[Calibration]) -> str:
    lines = ["| peer | workload | rate in a short run | expected on this machine kind | verdict |",
             "|---|---|---:|---:|---|"]
    for v in verdicts:
        lines.append(f"| {v.peer} | {v.workload} | {v.rate:,.0f} | {v.low:,.0f}-{v.high:,.0f} | {v.verdict} |")
    flagged = [v for v in verdicts if not v.ok]
    if flagged:
        lines += ["", f"**CALIBRATION FLAGGED: {len(flagged)} of {len(verdicts)} peers outside their expected range "
                      "or not error-free; this run's comparisons are not trustworthy (machine too noisy / peer "
                      "misconfigured).**"]
    else:
        lines += ["", "Every peer landed in its expected range."]
    return "\n".join(lines)


def run(directory: Path, cores: CorePlan, seconds: float, log: Callable[[str], None] = print) -> list[Calibration]:
    """A short run of each installed peer, configured as in the comparisons; their verdicts."""
    from bench import dns_load, metadata_load, peers
    from bench.report import problems

    data = peers.dns_data(directory, 1000)
    measured: list[tuple[str, str, float, str]] = []
    processes: list[subprocess.Popen] = []

    def dns(peer: str, workload: str, process: subprocess.Popen, port: int, queries: Path) -> None:
        result = dns_load.measure(peer, workload, process.pid, port, queries, seconds, latency=False)
        sample = peers.Sample(peer, workload, result.qps, result.cpu_us_per_query, 0, 0, result.errors, result.lost,
                              result.drops)
        measured.append((peer, workload, result.qps, ", ".join(problems([sample]))))
        log(f"calibration: {peer} {workload} {result.qps:,.0f}")

    try:
        for kind in ("nsd", "knot", "dnsmasq"):
            if kind == "knot" and not shutil.which("knotd"):
                continue
            server, port = peers.start_dns_server(kind, directory, cores, data)
            processes.append(server)
            dns(kind, "local hits", server, port, data.hits)
            stop(server)

        upstream_port, port = free_port(), free_port()
        upstream = start_dnsmasq([f"host-record=host{n}.upstream.test,192.0.2.{n % 250 + 1}" for n in range(1000)],
                                 directory, upstream_port, cores.pin_client([]),
                                 ("--local-ttl=3600", "--local=/upstream.test/"))
        processes.append(upstream)
        forwarder = start_dnsmasq(dnsmasq_forwarding_lines(upstream_port), directory, port, cores.pin_server([]),
                                  dnsmasq_forwarding_args())
        processes.append(forwarder)
        dns_load.wait_udp(port, "host1.upstream.test")
        dns_load.dnsperf(port, data.forwarded, 1, ("-Q", "5000"))  # fill the cache
        dns("dnsmasq (forwarding, cache)", "forwarded, cache hits", forwarder, port, data.forwarded)
        stop(forwarder)
        stop(upstream)

        for mode, name in (("return", "nginx return 200"), ("map", "nginx map $remote_addr")):
            nginx, port = metadata_load.start_nginx(cores.server[0], directory, mode)
            processes.append(nginx)
            workloads = (("keep-alive", 64, False), ("connection per request", 32, True))
            for workload, connections, close in workloads if mode == "return" else workloads[:1]:
                sample = peers.measure_wrk(name, workload, [nginx.pid], port, metadata_load.PATH, cores, seconds,
                                           connections, close)
                measured.append((name, workload, sample.rate, ", ".join(problems([sample]))))
                log(f"calibration: {name} {workload} {sample.rate:,.0f}")
            stop(nginx)
    finally:
        for process in processes:
            stop(process)
    return judge(measured)


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per peer (at most 10)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-calibrate-") as temporary:
        verdicts = run(Path(temporary), core_plan(), min(max(args.seconds, 0.5), 10.0),
                       lambda text: print(text, file=sys.stderr))
    print(markdown(verdicts))
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
