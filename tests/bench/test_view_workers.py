"""The worker-memory bench at a tiny size: its report's shape, every worker asked, the swap atomic.

Nothing here is a memory target: the figures are checked for being there and adding up.  What is
exact is checked: every process of each gateway is in the report (the supervisor and its N
workers, or the one process), every worker held a probe connection and answered it, every
connection went from the old tag to the new one without an error or a step back, and every
process the bench started is gone when it returns.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench import view_workers
from tests.support import process_gone

SWAP_FIELDS = {"connections", "connections_by_process", "every_worker_held_a_connection", "old_answers",
               "new_answers", "errors", "new_before_the_write", "regressions", "connections_serving_new",
               "error_samples", "atomic", "write_to_all_new_seconds", "serving_pids_unchanged"}
PROCESS_FIELDS = {"role", "pid", "rss_bytes", "pss_bytes", "pss_anon_bytes", "pss_file_bytes", "pss_shmem_bytes"}


def _shared_view_listed() -> bool:
    keys = subprocess.run([sys.executable, "-m", "edge", "config", "keys"], capture_output=True, text=True,
                          check=True).stdout
    return "`view.shared_view`" in keys


def _check_memory(memory: dict, workers: int) -> list[int]:
    processes = memory["processes"]
    roles = sorted(p["role"] for p in processes)
    assert roles == (["single process"] if workers == 1 else ["supervisor"] + ["worker"] * workers)
    for process in processes:
        assert set(process) == PROCESS_FIELDS
        assert 0 < process["pss_bytes"] <= process["rss_bytes"]
    assert memory["total_pss_bytes"] == sum(p["pss_bytes"] for p in processes)
    assert memory["total_rss_bytes"] == sum(p["rss_bytes"] for p in processes)
    assert len({p["pid"] for p in processes}) == len(processes)
    return [p["pid"] for p in processes]


def _check_probe(probe: dict, workers: int) -> None:
    assert len(probe["connections_by_process"]) == workers
    assert probe["every_worker_held_a_connection"]
    assert all(count > 0 for count in probe["connections_by_process"].values())
    assert probe["metadata_errors"] == 0 and probe["metadata_answers"] == 3 * probe["connections"]
    assert probe["dns_errors"] == 0 and probe["dns_answers"] == probe["connections"]


def test_every_process_measured_every_worker_asked_and_the_swap_atomic(tmp_path, capsys) -> None:
    report_path = tmp_path / "report.json"
    status = view_workers.main(["--instances", "200", "--workers", "1,2", "--settle", "0.2", "--sweep", "100",
                                "--set", "dns.answer_memo_size=5000",
                                "--start-timeout", "120", "--served-timeout", "30", "--json", str(report_path)])
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())

    assert status == 0, printed
    assert report["instances"] == 200 and report["workers"] == [1, 2]
    assert report["settings"] == {"dns.answer_memo_size": "5000"}
    known = _shared_view_listed()
    assert report["shared_view_key"] is known
    expected = [(1, None), (2, True), (2, False)] if known else [(1, None), (2, None)]
    assert [(run["workers"], run["shared_view"]) for run in report["runs"]] == expected

    one_copy = report["runs"][0]["pss_above_baseline_bytes"]
    started: list[int] = []
    for run in report["runs"]:
        workers = run["workers"]
        started += _check_memory(run["demo"]["memory"], workers)
        started += _check_memory(run["view"]["memory"], workers)
        started += _check_memory(run["view"]["memory_after_change"], workers)
        _check_probe(run["demo"]["probe"], workers)
        _check_probe(run["view"]["probe"], workers)
        sweep = run["view"]["sweep"]
        assert sweep["addresses"] == 100 and sweep["metadata_answers"] == 200 and sweep["dns_answers"] == 100
        assert sweep["metadata_errors"] == 0 and sweep["dns_errors"] == 0
        started += _check_memory(run["view"]["memory_after_sweep"], workers)
        assert run["total_pss_bytes_after_sweep"] == run["view"]["memory_after_sweep"]["total_pss_bytes"]
        state = run["view"]["state_dir"]
        assert state["bytes"] > 0 and (state["resident_bytes"] is None or state["resident_bytes"] > 0)  # whole pages

        swap = run["view"]["swap"]
        assert set(swap) == SWAP_FIELDS
        assert swap["atomic"] and swap["errors"] == 0 and swap["regressions"] == 0, swap
        assert swap["new_before_the_write"] == 0 and swap["old_answers"] >= swap["connections"]
        assert swap["connections_serving_new"] == swap["connections"] and swap["every_worker_held_a_connection"]
        assert len(swap["connections_by_process"]) == workers
        assert swap["write_to_all_new_seconds"] is not None and swap["serving_pids_unchanged"]
        assert run["view"]["serial_after_change"] == 2

        assert run["baseline_pss_bytes"] == run["demo"]["memory"]["total_pss_bytes"]
        assert run["total_pss_bytes"] == run["view"]["memory"]["total_pss_bytes"]
        assert run["pss_above_baseline_bytes"] == run["total_pss_bytes"] - run["baseline_pss_bytes"]
        assert run["one_copy_pss_bytes"] == one_copy
        assert run["copies"] == (round(run["pss_above_baseline_bytes"] / one_copy, 2) if one_copy > 0 else None)
        assert f"| {workers} |" in printed
    # Every process the bench started (gateways and their workers) is gone.
    assert all(process_gone(pid) for pid in started), [pid for pid in started if not process_gone(pid)]
