"""Markdown for the one-command benchmark report: comparison tables of repeated runs, machine, versions."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.common import GENERATOR_LIMITED, median_range
from bench.peers import Sample


def _spread(values: Sequence[float], digits: int = 0) -> str:
    middle, low, high = median_range(values)
    return f"{middle:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def problems(runs: Sequence[Sample]) -> list[str]:
    """Why the runs of one server cannot stand in a comparison: it was not at its best and error-free.

    Errors (wrong answers, socket errors), timeouts (requests never answered),
    queries the kernel dropped at the server's sockets, or a run that completed
    nothing: each means the rate measured is not the server's rate.
    """
    found = []
    for label, count in (("errors", sum(s.errors for s in runs)), ("timeouts", sum(s.timeouts for s in runs)),
                         ("dropped at the server's socket", sum(s.drops for s in runs))):
        if count:
            found.append(f"{count:,} {label}")
    idle = sum(1 for s in runs if s.rate <= 0)
    if idle:
        found.append(f"{idle} run(s) with no answers")
    return found


def invalid_reasons(samples: Sequence[Sample]) -> list[str]:
    """``server: problems`` for every server whose runs have problems; empty when the comparison is valid."""
    servers: dict[str, list[Sample]] = {}
    for sample in samples:
        servers.setdefault(sample.server, []).append(sample)
    return [f"{server}: {', '.join(found)}" for server, runs in servers.items() if (found := problems(runs))]


def comparison(samples: Sequence[Sample], reference: str, unit: str) -> str:
    """One table: per server the median (min-max) rate over runs, CPU per request, p50/p99, and ratios to ``reference``.

    Ratios read "reference / this server": above 1 in the rate column and below 1
    in the CPU column mean the reference (edge) does better.  When any server in
    the table shows errors, timeouts or drops, no ratio is printed: the ratio
    cells say INVALID and a line under the table gives the reasons.  A rate
    ratio where the load generator saturated its own core in either server's
    runs (median share over ``GENERATOR_LIMITED``) is marked: it compares the
    generator with itself, and only the CPU column compares the servers.
    """
    servers: dict[str, list[Sample]] = {}
    for sample in samples:
        servers.setdefault(sample.server, []).append(sample)
    if not servers:
        return "_no measurements_"
    invalid = invalid_reasons(samples)
    base = servers.get(reference)
    base_rate = statistics.median(s.rate for s in base) if base else 0.0
    base_cpu = statistics.median(s.cpu_us for s in base) if base else 0.0
    base_limited = bool(base) and _generator_limited(base)
    any_limited = False
    lines = [f"| server | runs | {unit} median (min-max) | server CPU us/request median (min-max) | p50 ms | p99 ms "
             f"| errors / timeouts / drops | {reference} / this, rate | {reference} / this, CPU per request |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for server, runs in servers.items():
        rate = statistics.median(s.rate for s in runs)
        cpu = statistics.median(s.cpu_us for s in runs)
        if server == reference or not base:
            rate_ratio = cpu_ratio = "-"
        elif invalid:
            rate_ratio = cpu_ratio = "INVALID"
        else:
            rate_ratio = f"{base_rate / rate:.2f}x" if rate else "-"
            cpu_ratio = f"{base_cpu / cpu:.2f}x" if cpu else "-"
            if rate and (base_limited or _generator_limited(runs)):
                rate_ratio += " (generator-limited)"
                any_limited = True
        lines.append(
            f"| {server} | {len(runs)} | {_spread([s.rate for s in runs])} | {_spread([s.cpu_us for s in runs], 1)} "
            f"| {statistics.median(s.p50_ms for s in runs):.3f} | {statistics.median(s.p99_ms for s in runs):.3f} "
            f"| {sum(s.errors for s in runs)} / {sum(s.timeouts for s in runs)} / {sum(s.drops for s in runs)} "
            f"| {rate_ratio} | {cpu_ratio} |")
    if invalid:
        lines += ["", f"**INVALID: no ratio, a server was not error-free** ({'; '.join(invalid)})."]
    elif any_limited:
        lines += ["", "_generator-limited_: the load generator used more than "
                      f"{GENERATOR_LIMITED:.0%} of its core in those runs, so that rate is the generator's, not the "
                      "server's maximum; compare CPU per request (and the equal-load table) instead."]
    return "\n".join(lines)


def _generator_limited(runs: Sequence[Sample]) -> bool:
    return statistics.median(s.generator_busy for s in runs) > GENERATOR_LIMITED


def key_values(title: str, values: dict[str, str]) -> str:
    return f"{title}: " + ", ".join(f"{key} {value}" for key, value in values.items())


def benchmark_table(document: dict) -> str:
    """pytest-benchmark's JSON as a table of per-call times."""
    lines = ["| benchmark | median | min | max | rounds |", "|---|---:|---:|---:|---:|"]
    for bench in document.get("benchmarks", []):
        stats = bench["stats"]
        lines.append(f"| {bench['fullname']} | {_time(stats['median'])} | {_time(stats['min'])} "
                     f"| {_time(stats['max'])} | {stats['rounds']} |")
    return "\n".join(lines)


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.2f} us"
