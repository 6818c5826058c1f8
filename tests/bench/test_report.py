"""The runner's pure parts: core plans, CPU accounting, percentiles, and the report tables."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.common import core_plan, cpu_seconds, percentile, tool_version
from bench.peers import Sample, _latency_ms
from bench.report import benchmark_table, comparison


def test_core_plan_keeps_servers_and_load_generators_apart() -> None:
    two = core_plan([0, 1])
    assert (two.server, two.client) == ((1,), (0,))
    eight = core_plan(range(8))
    assert set(eight.server).isdisjoint(eight.client) and len(eight.server) == 4
    assert eight.pin_server(["nginx"]) == ["taskset", "-c", "4,5,6,7", "nginx"]
    alone = core_plan([3])
    assert alone.server == alone.client == (3,)


def test_cpu_seconds_counts_a_busy_child_and_its_reaped_children() -> None:
    busy = ("import subprocess, sys, time\n"
            "subprocess.run([sys.executable, '-c', 'import time\\nt=time.process_time()\\n"
            "while time.process_time()-t<0.3: pass'])\n"
            "print('reaped', flush=True)\n"
            "time.sleep(10)\n")
    child = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "reaped\n"
        with_children = cpu_seconds([child.pid], children=True)
        without = cpu_seconds([child.pid])
    finally:
        child.kill()
        child.wait()
    assert with_children >= 0.3
    assert without < with_children - 0.2  # the grandchild's time shows up only as reaped children's time


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) == 0.0


def test_comparison_table_gives_medians_ranges_and_ratios_to_edge() -> None:
    samples = [Sample("edge", "hits", rate, cpu, 0.1, 1.0) for rate, cpu in ((90, 10), (100, 9), (110, 11))]
    samples += [Sample("nsd", "hits", rate, 5.0, 0.05, 0.5) for rate in (190, 200, 210)]
    table = comparison(samples, "edge", "qps").splitlines()

    assert table[0].startswith("| server | runs | qps median (min-max)")
    assert table[2] == "| edge | 3 | 100 (90-110) | 10.0 (9.0-11.0) | 0.100 | 1.000 | 0 / 0 / 0 | - | - |"
    assert table[3] == "| nsd | 3 | 200 (190-210) | 5.0 (5.0-5.0) | 0.050 | 0.500 | 0 / 0 / 0 | 0.50x | 2.00x |"
    assert "INVALID" not in "\n".join(table)


def test_comparison_without_the_reference_leaves_ratios_out() -> None:
    table = comparison([Sample("nsd", "hits", 5, 1, 0, 0)], "edge", "qps")
    assert table.splitlines()[-1].endswith("| - | - |")
    assert comparison([], "edge", "qps") == "_no measurements_"


def test_benchmark_table_formats_times() -> None:
    document = {"benchmarks": [{"fullname": "bench/bench_dns.py::test_local_hit",
                                "stats": {"median": 4.2e-6, "min": 4.0e-6, "max": 2.5e-3, "rounds": 1000}}]}
    assert benchmark_table(document).splitlines()[-1] == \
        "| bench/bench_dns.py::test_local_hit | 4.20 us | 4.00 us | 2.50 ms | 1000 |"


def test_wrk_latency_units() -> None:
    assert _latency_ms("250.00us") == 0.25
    assert _latency_ms("1.50ms") == 1.5
    assert _latency_ms("2.00s") == 2000.0


def test_tool_version_reads_the_version_or_says_missing() -> None:
    assert tool_version([sys.executable, "--version"]) == ".".join(map(str, sys.version_info[:3]))
    assert tool_version(["no-such-tool-" + str(os.getpid())]) == "missing"


def test_a_rate_the_generator_set_is_marked_as_such() -> None:
    samples = [Sample("edge", "hits", 150, 6.0, 0.1, 1.0, generator_busy=0.99),
               Sample("nsd", "hits", 140, 6.5, 0.1, 1.0, generator_busy=0.98)]
    table = comparison(samples, "edge", "qps")
    assert table.splitlines()[3].endswith("| 1.07x (generator-limited) | 0.92x |")
    assert "_generator-limited_" in table
    quiet = [Sample("edge", "hits", 150, 6.0, 0.1, 1.0, generator_busy=0.5),
             Sample("nsd", "hits", 140, 6.5, 0.1, 1.0, generator_busy=0.6)]
    assert "generator-limited" not in comparison(quiet, "edge", "qps")
