"""One command, one report: every comparison in one run on this machine.

    python -m bench all [--quick] [--only SECTIONS] [--no-install] [--output bench/results/latest.md]
    python -m bench bootstorm [...]      (the boot storm alone, see bench/bootstorm.py)
    python -m bench calibrate [...]      (the calibration step alone, see bench/calibration.py)

``all`` checks the peers (installing nginx-light, nsd, dnsmasq-base, wrk,
dnsperf and knot with apt-get when root and missing), then runs, with servers
and load generators pinned to different cores and everything on loopback:
a calibration step (each peer's rate in a short run against its expected range
on this machine kind, bench/calibration.py); metadata keep-alive and connection
per request vs nginx ``return 200`` and nginx answering from a ``map``; DNS
local hits vs NSD, Knot and dnsmasq; DNS forwarded cache hits vs a caching
dnsmasq; ``edge --workers 1`` vs ``--workers 2``; the boot storm (edge w1, w2,
classic design); the view pipeline at scale; and (full run) the
pytest-benchmark hot-path suites with timing.  Each comparison is repeated
(3 times, once with ``--quick``) and reported as medians with min-max.  Every
peer runs with the settings of bench/peer_configs.py (its best for the
workload, per its manual); a comparison in which any server shows errors,
timeouts or dropped queries prints INVALID instead of a ratio.  An open-loop
sweep (bench/open_loop.py) records latency percentiles against offered load
for edge and each peer, and the run draws pictures into ``--plots``
(bench/plots/ by default; matplotlib from the ``bench`` extra): those latencies,
and view build time and memory against instance count.  The
Markdown report is written to ``--output`` (and its raw figures next to it as
JSON) and printed.  Full run about 15-20 minutes, ``--quick`` about 4.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import core_plan, machine

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Plan:
    calibration_seconds: float
    rounds: int
    metadata_seconds: float
    dns_seconds: float
    dns_instances: int
    storm_instances: int
    storm_rounds: int
    scale_sizes: str
    scale_repeat: int
    timed_benchmarks: bool
    sweep_seconds: float
    dns_rates: tuple[int, ...]
    http_rates: tuple[int, ...]
    storm_targets: tuple[str, ...] = ("edge-w1", "edge-w2", "classic")


FULL = Plan(calibration_seconds=2, rounds=3, metadata_seconds=5, dns_seconds=5, dns_instances=1000, storm_instances=1000, storm_rounds=3,
            scale_sizes="1000,10000,100000", scale_repeat=3, timed_benchmarks=True, sweep_seconds=2,
            dns_rates=(10_000, 25_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000, 350_000, 400_000, 450_000),
            http_rates=(1_000, 2_000, 5_000, 10_000, 15_000, 20_000, 30_000, 40_000, 60_000, 80_000),
            storm_targets=("edge-w1", "edge-w2", "edge-w1-http", "classic"))
QUICK = Plan(calibration_seconds=1, rounds=1, metadata_seconds=2, dns_seconds=2, dns_instances=1000, storm_instances=200, storm_rounds=2,
             scale_sizes="1000,10000", scale_repeat=1, timed_benchmarks=False, sweep_seconds=1,
             dns_rates=(10_000, 50_000, 100_000, 200_000, 300_000), http_rates=(1_000, 5_000, 10_000, 20_000))


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Report:
    """Sections in order; a section that fails says so and the run goes on."""

    def __init__(self) -> None:
        self.sections: list[tuple[str, str]] = []
        self.raw: dict[str, object] = {}
        self.commands: list[str] = []
        self.timings: list[tuple[str, float]] = []

    def run(self, title: str, body: Callable[[], str]) -> None:
        log(f"{title} ...")
        started = time.monotonic()
        try:
            text = body()
        except Exception as exc:
            traceback.print_exc()
            text = f"**Not measured: {type(exc).__name__}: {exc}**"
        elapsed = time.monotonic() - started
        self.timings.append((title, elapsed))
        log(f"{title}: {elapsed:.0f} s")
        self.sections.append((title, text))


SECTIONS = ("calibration", "metadata", "workers", "dns", "openloop", "bootstorm", "scale", "hotpaths")


PLOTS = ROOT / "bench" / "plots"


def picture(path: Path, alt: str) -> str:
    """A Markdown image link to ``path``, relative to bench/ where RESULTS.md lives."""
    return f"![{alt}]({Path(os.path.relpath(path, ROOT / 'bench')).as_posix()})"


def run_all(plan: Plan, install: bool, argv: list[str], classic_delay: float = 0.010,
            classic_workers: int = 64, only: tuple[str, ...] = SECTIONS,
            plots: Path = PLOTS) -> tuple[str, dict[str, object]]:
    """(Markdown report, raw figures); pictures are written to ``plots``."""
    from bench import bootstorm, calibration, open_loop, peers
    from bench import plots as pictures
    from bench.peer_configs import settings_table
    from bench.report import benchmark_table, comparison, key_values

    started = time.monotonic()

    def drawn_by() -> str:
        """The footer of every picture: which command drew it, when, and how busy the machine was."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"python -m bench all{' --quick' if plan is QUICK else ''}, {stamp}, "
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    missing = peers.ensure_tools(install, log)
    required_missing = [tool for tool in missing if tool not in peers.OPTIONAL]
    if required_missing:
        raise SystemExit(f"missing tools: {', '.join(required_missing)} (install them or run as root)")
    cores = core_plan()
    report = Report()
    report.commands.append("python -m bench " + " ".join(shlex.quote(a) for a in argv))
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as temporary:
        directory = Path(temporary)

        def calibrate() -> str:
            round_dir = directory / "calibration"
            round_dir.mkdir()
            verdicts = calibration.run(round_dir, cores, plan.calibration_seconds, log)
            report.raw["calibration"] = [dict(asdict(v), verdict=v.verdict) for v in verdicts]
            report.commands.append(f"python -m bench calibrate --seconds {plan.calibration_seconds:g}   (ranges: "
                                   "bench/calibration.py EXPECTED)")
            return calibration.markdown(verdicts)

        def metadata_vs_nginx() -> str:
            samples = []
            for round_number in range(plan.rounds):
                round_dir = directory / f"metadata-{round_number}"
                round_dir.mkdir()
                samples += peers.metadata_vs_nginx(round_dir, cores, plan.metadata_seconds)
            report.raw["metadata_vs_nginx"] = [asdict(s) for s in samples]
            report.commands.append(
                f"edge: taskset -c {cores.server_list} python bench/metadata_server.py (one worker, demo view); "
                f"nginx: taskset -c {cores.server[0]} nginx (worker_processes 1, return 200, config of "
                f"bench/metadata_load.py); floor: taskset -c {cores.server_list} python bench/metadata_bare.py; "
                f"load: taskset -c {cores.client_list} wrk -t1 -c64 -d{plan.metadata_seconds:g}s --latency "
                "(close: -c32 -H 'Connection: close') http://127.0.0.1:PORT/latest/meta-data/instance-id")
            parts = ["nginx `return 200` is the floor (one fixed answer); nginx with a `map` of 1,000 source "
                     "addresses to answers is the realistic static peer."]
            for mode in ("keep-alive", "connection per request"):
                parts.append(f"**{mode}**\n\n" + comparison([s for s in samples if s.workload == mode], "edge",
                                                             "req/s"))
            return "\n\n".join(parts)

        def metadata_workers() -> str:
            samples = []
            for _ in range(plan.rounds):
                samples += peers.metadata_workers(directory, cores, plan.metadata_seconds)
            report.raw["metadata_workers"] = [asdict(s) for s in samples]
            report.commands.append(
                f"taskset -c {cores.server_list} python -m edge serve --view demo --workers N (metadata.rate = 0); "
                f"taskset -c {cores.client_list} wrk -t1 -c64 -d{plan.metadata_seconds:g}s --latency "
                "http://127.0.0.1:PORT/latest/meta-data/instance-id")
            return comparison(samples, "edge --workers 1", "req/s")

        def dns_peers() -> str:
            samples = []
            for _ in range(plan.rounds):
                samples += peers.dns_load_run(plan.dns_seconds, plan.dns_instances)
            extra = []
            for round_number in range(plan.rounds):
                round_dir = directory / f"dns-{round_number}"
                round_dir.mkdir()
                extra += peers.dns_extra(round_dir, cores, plan.dns_seconds, plan.dns_instances)
            report.raw["dns_load"] = [asdict(s) for s in samples]
            report.raw["dns_extra"] = [asdict(s) for s in extra]
            report.commands.append(f"EDGE_WORKERS=1 python bench/dns_load.py --seconds {plan.dns_seconds:g} "
                                   f"--instances {plan.dns_instances} --rounds 1 --json   (x{plan.rounds})")
            report.commands.append(
                f"Knot / edge serve --workers 1|2 / caching dnsmasq (bench/peers.py dns_extra): servers on cpu "
                f"{cores.server_list}; taskset -c 0 dnsperf -c 4 -q 200 -t 2 -l {plan.dns_seconds:g} "
                "(latency: -Q 20000 -v)")
            hits = [s for s in samples if s.workload == "all hits"]
            hits += [s for s in extra if s.server == "knot"]
            forwarded = [s for s in extra if s.workload == "forwarded, cache hits"]
            workers = [s for s in extra if s.server.startswith("edge --workers")]
            return ("**Local hits (A and PTR of 1,000 instances), edge vs NSD, Knot, dnsmasq**\n\n"
                    + comparison(hits, "edge", "qps")
                    + "\n\n**Forwarded names answered from cache, edge vs dnsmasq forwarding with its cache**\n\n"
                    + comparison(forwarded, "edge", "qps")
                    + "\n\n**Local hits, edge serve --workers 1 vs --workers 2**\n\n"
                    + comparison(workers, "edge --workers 1", "qps"))

        def open_loop_sweeps() -> str:
            from bench import metadata_load
            from bench.common import stop

            round_dir = directory / "open-loop"
            round_dir.mkdir()
            data = peers.dns_data(round_dir, plan.dns_instances)
            dns_sweeps = []
            for kind in peers.DNS_SERVERS:
                if kind == "knot" and "knotd" in missing:
                    continue
                server, port = peers.start_dns_server(kind, round_dir, cores, data)
                try:
                    dns_sweeps.append(open_loop.sweep(
                        kind, "dns", plan.dns_rates,
                        lambda rate: open_loop.dns_point(kind, port, data.hits, rate, plan.sweep_seconds,
                                                         cores.client, [server.pid]), log))
                finally:
                    stop(server)
            http_sweeps = []
            http_servers = [("edge", lambda: peers._start_script(cores, "metadata_server.py", "--state-dir",
                                                                 str(round_dir / "edge-state"))),
                            ("nginx return 200",
                             lambda: metadata_load.start_nginx(cores.server[0], round_dir, "return")),
                            ("nginx map $remote_addr",
                             lambda: metadata_load.start_nginx(cores.server[0], round_dir, "map"))]
            for name, start in http_servers:
                server, port = start()
                try:
                    http_sweeps.append(open_loop.sweep(
                        name, "http", plan.http_rates,
                        lambda rate: open_loop.http_sweep_point(name, port, metadata_load.PATH, rate,
                                                                plan.sweep_seconds, cores.client,
                                                                server_pids=[server.pid]), log))
                finally:
                    stop(server)
            report.raw["open_loop"] = open_loop.to_json(dns_sweeps + http_sweeps)
            report.commands.append(
                f"open loop, {plan.sweep_seconds:g} s per point, servers on cpu {cores.server_list}: DNS local hits "
                f"taskset -c {cores.client_list} dnsperf -Q RATE -q 20000 -t 2 -v, rates "
                f"{','.join(map(str, plan.dns_rates))}; metadata keep-alive: taskset -c {cores.client_list} python -m "
                f"bench.open_loop --rate RATE --connections 64, rates {','.join(map(str, plan.http_rates))}; "
                "each server's sweep stops after its first saturated point")
            text = ["Requests offered at a fixed rate (open loop), latency counted from each request's scheduled "
                    "send time. A point the generator itself could not offer is marked and left out of the plot.",
                    "", "**DNS local hits**", "", open_loop.markdown(dns_sweeps, "queries/s"), "",
                    "**DNS local hits at equal offered load: server CPU per answer, edge against each peer**", "",
                    open_loop.equal_load(dns_sweeps, "edge", "queries/s"), "",
                    "**Metadata, keep-alive**", "", open_loop.markdown(http_sweeps, "requests/s"), "",
                    "**Metadata keep-alive at equal offered load: server CPU per answer, edge against each peer**", "",
                    open_loop.equal_load(http_sweeps, "edge", "requests/s")]
            if pictures.available():
                dns_png = pictures.latency_plot(dns_sweeps, plots / "dns-latency.png",
                                                "DNS local hits, open loop", "queries/s", drawn_by())
                http_png = pictures.latency_plot(http_sweeps, plots / "metadata-latency.png",
                                                 "Instance metadata keep-alive, open loop", "requests/s",
                                                 drawn_by())
                text += ["", picture(dns_png, "DNS latency percentiles against offered load"), "",
                         picture(http_png, "metadata latency percentiles against offered load")]
            else:
                text += ["", "**Plots not drawn: matplotlib is not installed (pip install -e '.[bench]').**"]
            return "\n".join(text)

        def storm() -> str:
            result = bootstorm.run_bootstorm(instances=plan.storm_instances, rounds=plan.storm_rounds, cores=cores,
                                             targets=plan.storm_targets, delay=classic_delay,
                                             upstream_workers=classic_workers, log=log)
            report.raw["bootstorm"] = result.to_json()
            report.commands.append(f"python -m bench.bootstorm --instances {plan.storm_instances} "
                                   f"--rounds {plan.storm_rounds} --targets {','.join(plan.storm_targets)} "
                                   f"--delay-ms {classic_delay * 1000:g} --upstream-workers {classic_workers}")
            report.commands.extend("  " + c for c in result.commands)
            return bootstorm.markdown(result)

        def scale() -> str:
            rows_file = directory / "view-scale.json"
            argv = [sys.executable, "-m", "bench.view_scale", "--sizes", plan.scale_sizes, "--repeat",
                    str(plan.scale_repeat), "--json", str(rows_file)]
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
            report.commands.append(f"python -m bench.view_scale --sizes {plan.scale_sizes} --repeat "
                                   f"{plan.scale_repeat}")
            if done.returncode != 0:
                raise RuntimeError(f"view_scale failed: {done.stderr.strip()[-500:]}")
            report.raw["view_scale"] = done.stdout.strip()
            rows = json.loads(rows_file.read_text())
            report.raw["view_scale_rows"] = rows
            if pictures.available():
                drawing = "\n\n" + picture(pictures.scale_plot(rows, plots / "view-scale.png", drawn_by()),
                                            "view build time and memory against instance count")
            else:
                drawing = "\n\n**Plot not drawn: matplotlib is not installed (pip install -e '.[bench]').**"
            return ("Targets: 100k instances built in <= 2 s, <= 8 KB resident per instance, p99 latency under "
                    "steady load during a swap <= 20 ms (measured by `python -m bench.swap_latency`, not in this "
                    "run; the loop stall columns are the longest pause of the serving loop).\n\n"
                    + done.stdout.strip() + drawing)

        def timed() -> str:
            output = directory / "pytest-benchmark.json"
            argv = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:randomly", "--benchmark-enable",
                    "--benchmark-max-time=0.2", "--benchmark-min-rounds=5", f"--benchmark-json={output}"]
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
            report.commands.append("python -m pytest bench --benchmark-enable --benchmark-max-time=0.2 "
                                   "--benchmark-min-rounds=5")
            if not output.exists():
                raise RuntimeError(f"pytest-benchmark wrote nothing: {done.stdout.strip()[-500:]}")
            document = json.loads(output.read_text())
            report.raw["pytest_benchmark"] = [{"name": b["fullname"], "median_s": b["stats"]["median"]}
                                              for b in document.get("benchmarks", [])]
            status = "" if done.returncode == 0 else f"\n\n**pytest exited with {done.returncode}**"
            return benchmark_table(document) + status

        sections = {
            "calibration": ("Calibration: each peer in its expected range", calibrate),
            "metadata": ("Instance metadata: edge vs nginx (return 200, map)", metadata_vs_nginx),
            "workers": ("Instance metadata: edge --workers 1 vs --workers 2", metadata_workers),
            "dns": ("DNS: edge vs NSD, Knot, dnsmasq", dns_peers),
            "openloop": ("Latency against offered load (open loop)", open_loop_sweeps),
            "bootstorm": ("Boot storm: edge vs the classic design", storm),
            "scale": ("View pipeline at scale", scale),
            "hotpaths": ("Hot paths (pytest-benchmark)", timed),
        }
        for key, (title, body) in sections.items():
            if key in only and (key != "hotpaths" or plan.timed_benchmarks):
                report.run(title, body)

    total = time.monotonic() - started
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"# Benchmark report, {stamp}{' (quick)' if plan is QUICK else ''}",
        "",
        key_values("Machine", machine()),
        "",
        f"Pinning: servers on cpu {cores.server_list}, load generators on cpu {cores.client_list} (`taskset`). "
        f"Rates are medians over the runs with (min-max); server CPU per request is utime+stime of the server's "
        f"processes over the run (/proc/PID/stat) divided by the requests completed. Ratios are edge / peer: "
        f"above 1 for rate and below 1 for CPU favour edge. Total time {total / 60:.1f} min.",
        "",
        key_values("Versions", peers.versions()),
    ]
    if "knotd" in missing:
        header += ["", "Knot DNS is not installed: no Knot figures."]
    header += ["", validity(report.sections)]
    body = [f"## {title}\n\n{text}" for title, text in report.sections]
    body.append("## Peer configuration\n\nEvery peer at its documented best for the workload "
                "(bench/peer_configs.py):\n\n" + settings_table())
    timings = ", ".join(f"{title.split(':')[0]} {seconds:.0f} s" for title, seconds in report.timings)
    footer = ["## Commands", "", *("    " + command for command in report.commands), "", f"Section times: {timings}."]
    markdown = "\n".join(header) + "\n\n" + "\n\n".join(body) + "\n\n" + "\n".join(footer) + "\n"
    return markdown, report.raw


def validity(sections: list[tuple[str, str]]) -> str:
    """One line saying whether every comparison of the run can be trusted, and if not, which and why."""
    invalid = [title for title, text in sections if "**INVALID" in text]
    flagged = [title for title, text in sections if "**CALIBRATION FLAGGED" in text]
    unmeasured = [title for title, text in sections if text.startswith("**Not measured")]
    if not (invalid or flagged or unmeasured):
        return ("Validity: every peer landed in its calibration range and every server was error-free in every "
                "counted run." if any(t.startswith("Calibration") for t, _ in sections)
                else "Validity: every server was error-free in every counted run (no calibration in this run).")
    parts = []
    if flagged:
        parts.append("calibration flagged (machine too noisy / peer misconfigured): do not trust this run's ratios")
    if invalid:
        parts.append("INVALID comparisons (a server showed errors, timeouts or drops): " + "; ".join(invalid))
    if unmeasured:
        parts.append("not measured: " + "; ".join(unmeasured))
    return "**Validity: " + ". ".join(parts) + ".**"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bootstorm"]:
        from bench.bootstorm import main as bootstorm_main
        return bootstorm_main(argv[1:])
    if argv[:1] == ["calibrate"]:
        from bench.calibration import main as calibrate_main
        return calibrate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    everything = commands.add_parser("all", help="every comparison, one report")
    everything.add_argument("--quick", action="store_true", help="shorter and fewer runs (about 4 minutes)")
    everything.add_argument("--no-install", action="store_true", help="do not apt-get install missing peers")
    everything.add_argument("--classic-delay-ms", type=float, default=10.0,
                            help="boot storm: the classic upstream's delay per request")
    everything.add_argument("--classic-workers", type=int, default=64,
                            help="boot storm: requests the classic upstream handles at a time")
    everything.add_argument("--only", default=",".join(SECTIONS),
                            help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    everything.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.md")
    everything.add_argument("--plots", type=Path, default=PLOTS,
                            help="where the pictures go (PNG; needs the bench extra: pip install -e '.[bench]')")
    everything.add_argument("--record", action="store_true",
                            help="also put the report in bench/RESULTS.md, replacing its latest one-command report")
    commands.add_parser("bootstorm", help="the boot storm alone (python -m bench bootstorm --help)")
    commands.add_parser("calibrate", help="the calibration step alone (python -m bench calibrate --help)")
    args = parser.parse_args(argv)
    only = tuple(part for part in args.only.split(",") if part)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    markdown, raw = run_all(QUICK if args.quick else FULL, not args.no_install, argv, args.classic_delay_ms / 1000,
                            max(1, args.classic_workers), only, args.plots)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown)
    args.output.with_suffix(".json").write_text(json.dumps(raw, indent=2))
    print(markdown)
    log(f"written to {args.output}")
    if args.record:
        record(markdown, RESULTS)
        log(f"recorded in {RESULTS}")
    return 0


RESULTS = ROOT / "bench" / "RESULTS.md"
LATEST_START = "<!-- latest-report:start -->"
LATEST_END = "<!-- latest-report:end -->"


def record(markdown: str, results: Path) -> None:
    """Replace the latest one-command report kept in ``results`` (between its markers) with ``markdown``.

    The report's headings move down two levels so they nest under the file's own; the
    subsystem sections and the history around the markers are kept as they are.
    """
    text = results.read_text()
    start, end = text.find(LATEST_START), text.find(LATEST_END)
    if start < 0 or end < start:
        raise SystemExit(f"{results} has no {LATEST_START} ... {LATEST_END} section to replace")
    nested = "\n".join("##" + line if line.startswith("#") else line for line in markdown.splitlines())
    nested = nested.replace("### Benchmark report", "## Latest one-command report", 1)
    results.write_text(text[:start + len(LATEST_START)] + "\n" + nested.strip() + "\n" + text[end:])


if __name__ == "__main__":
    raise SystemExit(main())
