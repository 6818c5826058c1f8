"""``python -m bench all`` end to end on its cheapest section, and how a failing section is reported."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import Report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not all(shutil.which(t) for t in ("nginx", "nsd", "dnsmasq", "wrk", "dnsperf", "taskset")),
                    reason="the runner refuses to start without its peers")
@pytest.mark.timeout(90)
def test_one_command_writes_the_report(tmp_path: Path) -> None:
    output = tmp_path / "latest.md"
    plots = tmp_path / "plots"
    done = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--only", "scale", "--no-install",
                           "--output", str(output), "--plots", str(plots)], cwd=ROOT, capture_output=True, text=True,
                          timeout=85)
    assert done.returncode == 0, done.stderr[-2000:]
    report = output.read_text()
    assert report.startswith("# Benchmark report, ") and "(quick)" in report.splitlines()[0]
    assert "Machine: cores " in report and "cpu model " in report
    assert "Versions: edge " in report and "nginx 1." in report
    assert "## View pipeline at scale" in report and "| 1,000 |" in report and "| 10,000 |" in report
    assert "    python -m bench.view_scale --sizes 1000,10000 --repeat 1" in report
    assert done.stdout.strip() == report.strip()
    assert "| 10,000 |" in json.loads(output.with_suffix(".json").read_text())["view_scale"]
    assert "## Boot storm" not in report
    assert "## Peer configuration" in report and "`rrl-ratelimit` | 0 |" in report
    if importlib.util.find_spec("matplotlib"):
        assert (plots / "view-scale.png").read_bytes()[:4] == b"\x89PNG"
        assert "view build time and memory against instance count](" in report
    else:
        assert "Plot not drawn: matplotlib is not installed" in report


def test_a_failing_section_is_reported_and_the_run_goes_on() -> None:
    report = Report()

    def broken() -> str:
        raise RuntimeError("nginx did not start")

    report.run("Broken", broken)
    report.run("Fine", lambda: "table")
    assert report.sections == [("Broken", "**Not measured: RuntimeError: nginx did not start**"), ("Fine", "table")]


def test_record_replaces_only_the_latest_report(tmp_path) -> None:
    from bench.__main__ import LATEST_END, LATEST_START, record

    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Benchmark results\n\nintro\n\n{LATEST_START}\n## Latest one-command report, old\n\nold "
                       f"figures\n{LATEST_END}\n\n## View pipeline\n\nkept\n")
    record("# Benchmark report, 2026-11-25 17:00 UTC\n\nMachine: x\n\n## Boot storm\n\n| a |\n", results)
    text = results.read_text()
    assert "old figures" not in text and "intro" in text and "## View pipeline\n\nkept" in text
    inside = text[text.index(LATEST_START):text.index(LATEST_END)]
    assert "## Latest one-command report, 2026-11-25 17:00 UTC" in inside and "#### Boot storm" in inside

    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("# no markers\n")
    with pytest.raises(SystemExit):
        record("# Benchmark report", unmarked)
    assert unmarked.read_text() == "# no markers\n"
