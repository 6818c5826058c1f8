"""The ``edge`` command line as operators use it: real subprocesses, real files, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request


from edge.view.demo import demo_document
from tests.support import free_port, wait_until


def edge(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_view_check_accepts_and_summarises(tmp_path) -> None:
    path = tmp_path / "view.json"
    path.write_text(json.dumps(demo_document()))
    result = edge("view", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "serial      1" in result.stdout and "instances   6" in result.stdout
    assert "networks    2" in result.stdout and "interfaces  6" in result.stdout
    assert "problems    none" in result.stdout


def test_view_check_rejects_with_every_problem(tmp_path) -> None:
    document = demo_document()
    document["serial"] = "7"
    document["instances"][0]["interfaces"][0]["mac"] = "nope"
    document["instances"][1]["interfaces"][0]["private_ips"] = ["10.1.2.3"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    result = edge("view", "check", str(path))
    assert result.returncode == 1
    assert "REJECTED, 3 problem(s)" in result.stdout
    assert "$.serial: expected integer, got string" in result.stdout
    assert "not a MAC address: 'nope'" in result.stdout
    assert "10.1.2.3 is outside network '' CIDRs" in result.stdout


def test_view_check_over_http(control_plane) -> None:
    control_plane.publish(demo_document())
    result = edge("view", "check", control_plane.url)
    assert result.returncode == 0 and "OK" in result.stdout
    control_plane.status = 500
    result = edge("view", "check", control_plane.url)
    assert result.returncode == 1 and "HTTP 500" in result.stdout


def test_unknown_configuration_keys_are_named(tmp_path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[view]\npoll_intervall = 3\n')
    result = edge("serve", "--config", str(config))
    assert result.returncode == 2
    assert "unknown configuration key 'view.poll_intervall'" in result.stderr
    result = edge("serve", env={"EDGE_VIEW_POLLINTERVAL": "3"})
    assert result.returncode == 2 and "EDGE_VIEW_POLLINTERVAL" in result.stderr
    config.write_text('[view]\npoll_interval = "soon"\n')
    result = edge("serve", "--config", str(config))
    assert result.returncode == 2 and "view.poll_interval" in result.stderr


def test_config_precedence_file_env_cli(tmp_path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('workers = 1\n[view]\npoll_interval = 3.0\nsource = "/from/file"\n[log]\nlevel = "error"\n')
    result = edge("config", "show", "--config", str(config), env={"EDGE_VIEW_POLL_INTERVAL": "7"})
    assert result.returncode == 0, result.stderr
    assert "poll_interval=7.0" in result.stdout and "source='/from/file'" in result.stdout
    assert "level='error'" in result.stdout


def test_config_keys_table_lists_every_key() -> None:
    result = edge("config", "keys")
    assert result.returncode == 0
    for key in ("view.source", "view.state_dir", "view.poll_interval", "metadata.listen", "dns.listen", "admin.listen"):
        assert f"`{key}`" in result.stdout


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_serve_restart_without_control_plane_uses_last_good_view(tmp_path, control_plane) -> None:
    """The availability core: restarted while the control plane is down, a gateway still answers."""
    document = demo_document()
    document["serial"] = 77
    control_plane.publish(document)
    ports = {name: free_port() for name in ("metadata", "dns", "admin")}
    args = ["serve", "--view", control_plane.url, "--state-dir", str(tmp_path / "state"),
            "--metadata-listen", f"127.0.0.1:{ports['metadata']}", "--dns-listen", f"127.0.0.1:{ports['dns']}",
            "--admin-listen", f"127.0.0.1:{ports['admin']}", "--poll-interval", "0.2"]
    admin = f"http://127.0.0.1:{ports['admin']}"

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "edge", *args], stderr=subprocess.PIPE, text=True)

    first = start()
    try:
        wait_until(lambda: _get(f"{admin}/readyz")[0] == 200, timeout=15)
        assert json.loads(_get(f"{admin}/view")[1])["serial"] == 77
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
    control_plane.status = 503  # the control plane goes down
    second = start()
    try:
        started = time.monotonic()
        wait_until(lambda: _get(f"{admin}/readyz")[0] == 200, timeout=15)
        summary = json.loads(_get(f"{admin}/view")[1])
        assert summary["serial"] == 77 and summary["loaded_from"] == "state"
        status, body = _get(f"http://127.0.0.1:{ports['metadata']}/latest/meta-data/instance-id")
        assert (status, body) == (200, b"i-0de0000000000001")
        assert time.monotonic() - started < 10
        wait_until(lambda: json.loads(_get(f"{admin}/view")[1])["last_poll_result"] == "error", timeout=10)
        assert _get(f"{admin}/readyz")[0] == 200
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=15) == 0
        stderr = second.stderr.read()
    assert "last good view loaded" in stderr and "serial=77" in stderr
    assert "view source error" in stderr and "HTTP 503" in stderr
