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
# Where the figures come from: short runs on a quiet machine (load average under
# 0.4, nothing else running) on 2026-12-06 at 02:00 UTC, several runs each:
# * NSD 137k-161k and Knot DNS 143k (after its UDP worker was moved back to the
#   server core: Knot pins worker N to CPU N itself, see CorePlan.repin_server_threads).
#   In these runs dnsperf used 97-99% of its core while NSD used 87-89% of its
#   own: **one generator core cannot saturate NSD or Knot here**, so their
#   ranges are what the generator can offer them, and the comparisons read
#   their CPU per query (closed loop and at equal offered load), not their rate;
# * dnsmasq local hits 100k, dnsmasq forwarding from its cache 137k, nginx
#   return 200 keep-alive 140k and a new connection per request 21k, nginx
#   with a map of 1,000 source addresses 141k (keep-alive).
# (The 370k and 285k-510k of earlier ranges for NSD and Knot came from a
# side-by-side run that this machine no longer reproduces on a quiet day, and
# Knot then shared the generator's core; both are replaced.)
# Each range is about -30% / +25% of the figure: run-to-run spread on a quiet
# machine of this kind is within 15%.
EXPECTED: Mapping[tuple[str, str], tuple[float, float]] = {
    ("nsd", "local hits"): (105_000, 190_000),
    ("knot", "local hits"): (100_000, 180_000),
    ("dnsmasq", "local hits"): (70_000, 125_000),
    ("dnsmasq (forwarding, cache)", "forwarded, cache hits"): (105_000, 190_000),
    ("nginx return 200", "keep-alive"): (95_000, 172_000),
    ("nginx return 200", "connection per request"): (14_500, 26_500),
    ("nginx map $remote_addr", "keep-alive"): (98_000, 175_000),
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
    generator_busy: float = 0.0
    """Share of its core the load generator used: near 1, the rate is the generator's (still checked against
    the range, which then says the generator and the machine are as expected)."""

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


def judge(measured: Iterable[tuple[str, str, float, str] | tuple[str, str, float, str, float]],
          expected: Mapping[tuple[str, str], tuple[float, float]] = EXPECTED) -> list[Calibration]:
    """(peer, workload, rate, problems[, generator busy share]) measurements against ``expected``; a peer
    without a range is an error."""
    verdicts = []
    for peer, workload, rate, problems, *busy in measured:
        if (peer, workload) not in expected:
            raise KeyError(f"no expected range for {peer} / {workload}: add one to bench/calibration.py EXPECTED")
        low, high = expected[(peer, workload)]
        verdicts.append(Calibration(peer, workload, rate, low, high, problems, busy[0] if busy else 0.0))
    return verdicts


def ranges_table(expected: Mapping[tuple[str, str], tuple[float, float]] = EXPECTED) -> str:
    """The expected ranges as a Markdown table (bench/RESULTS.md shows it)."""
    lines = ["| peer | workload | expected rate on this machine kind |", "|---|---|---:|"]
    lines += [f"| {peer} | {workload} | {low:,.0f}-{high:,.0f} |" for (peer, workload), (low, high) in expected.items()]
    return "\n".join(lines)


def markdown(verdicts: Sequence[Calibration]) -> str:
    lines = ["| peer | workload | rate in a short run | expected on this machine kind | generator core busy "
             "| verdict |",
             "|---|---|---:|---:|---:|---|"]
    for v in verdicts:
        lines.append(f"| {v.peer} | {v.workload} | {v.rate:,.0f} | {v.low:,.0f}-{v.high:,.0f} "
                     f"| {v.generator_busy:.0%} | {v.verdict} |")
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
                              result.drops, result.generator_busy)
        measured.append((peer, workload, result.qps, ", ".join(problems([sample])), result.generator_busy))
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
                measured.append((name, workload, sample.rate, ", ".join(problems([sample])), sample.generator_busy))
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
