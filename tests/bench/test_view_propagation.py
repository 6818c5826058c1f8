"""The view propagation bench at a tiny size: its report's shape, and every gateway serving every change.

Nothing here is timed: the bench's latencies and CPU figures are only checked for being there.
What is exact is checked: every (gateway, change) pair was served, and a keyspace change costs
a gateway less than the whole document does.
"""

from __future__ import annotations

import json
import os

import pytest

from bench import view_propagation
from tests.etcd.server import ETCD

pytestmark = pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="etcd is not installed (etcd-server)")

GATEWAY_COLUMNS = {"gateway", "served", "bytes_per_change", "window_bytes_max", "cpu_ms_per_change",
                   "window_cpu_ms_p50", "window_cpu_ms_max", "idle_bytes_per_second", "idle_cpu_ms_per_second",
                   "served_p50_ms", "served_p99_ms", "served_max_ms"}


def test_every_gateway_serves_every_change_from_each_source(tmp_path, capsys) -> None:
    report_path = tmp_path / "report.json"
    status = view_propagation.main([
        "--instances", "200", "--changes", "3", "--document-changes", "3", "--gateways", "2",
        "--interval", "0.5", "--settle", "0.5", "--start-timeout", "120", "--served-timeout", "60",
        "--json", str(report_path)])
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())

    assert status == 0, printed
    assert report["instances"] == 200 and report["gateways"] == 2
    assert [run["source"] for run in report["runs"]] == ["keyspace", "etcd-key", "http", "http-changes"]
    for run in report["runs"]:
        assert run["unserved"] == [], run
        assert run["served"] == run["expected"] == 3 * 2
        assert run["first_load_seconds"] > 0 and run["first_load_bytes"] > 0
        assert run["memory"]["rss_bytes"] > 0
        assert set(run["memory"]) == {"rss_bytes", "pss_bytes", "rss_per_instance", "pss_per_instance",
                                      "rss_after_changes_per_instance", "pss_after_changes_per_instance"}
        assert [g["gateway"] for g in run["per_gateway"]] == [0, 1]
        for gateway in run["per_gateway"]:
            assert set(gateway) == GATEWAY_COLUMNS
            assert gateway["served"] == 3
            assert gateway["window_bytes_max"] > 0  # every gateway received something for the changes
        assert run["served_p50_ms"] is not None and run["served_max_ms"] >= run["served_p50_ms"]
        assert f"| {run['source']} |" in printed
    keyspace, etcd_key, http, http_changes = report["runs"]
    assert "publish_seconds" in keyspace and "published serial 1" in keyspace["publish_output"]
    assert keyspace["etcd_max_request_bytes"] == "default"
    # A keyspace or changes-document change costs each gateway about one instance; a document change,
    # the whole document.
    for gateway in keyspace["per_gateway"] + http_changes["per_gateway"]:
        assert gateway["window_bytes_max"] < report["document_gzip_bytes"]
    for gateway in http["per_gateway"] + etcd_key["per_gateway"]:
        # At least one whole document reached it during the changes (less the idle polls' few bytes).
        assert gateway["bytes_per_change"] * 3 >= report["document_gzip_bytes"] * 0.9
