"""The ``edge`` command line as operators use it: real subprocesses, real files, real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from edge.config import load_config
from edge.metadata.tokens import load_key_file
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
    assert result.returncode == 1 and "HTTP 500" in result.stderr and result.stdout == ""


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
    shown = tomllib.loads(result.stdout)
    assert shown["view"]["poll_interval"] == 7.0 and shown["view"]["source"] == "/from/file"
    assert shown["log"]["level"] == "error" and shown["workers"] == 1


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


def test_config_show_prints_toml_that_loads_back_to_the_same_configuration(tmp_path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('workers = 3\n[view]\nsource = "etcd://10.0.0.1:2379/edge/view"\npoll_interval = 2.5\n'
                      '[metadata]\nlisten = ["127.0.0.1:8169@vpc-1", "[::1]:8169"]\n'
                      '[metadata.credentials]\nkind = "process"\ncommand = ["/bin/creds", "{instance_id}"]\n'
                      '[dns]\nupstreams = ["10.0.0.2"]\n')
    result = edge("config", "show", "--config", str(config))
    assert result.returncode == 0, result.stderr
    shown = tmp_path / "shown.toml"
    shown.write_text(result.stdout)
    # What it prints is the configuration in force: loading it gives the same settings.
    assert load_config(str(shown), env={}) == load_config(str(config), env={})
    assert tomllib.loads(result.stdout)["metadata"]["credentials"]["command"] == ["/bin/creds", "{instance_id}"]


def _into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``edge ARGS | head`` where head is already gone: every write meets a closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "edge", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=30)
    finally:
        os.close(write_end)


def test_a_reader_that_goes_away_stops_a_command_quietly(tmp_path) -> None:
    view = tmp_path / "view.json"
    view.write_text(json.dumps(demo_document()))
    for args in (("config", "keys"), ("config", "show"), ("view", "check", str(view)),
                 ("keys", "generate", str(tmp_path / "keys"))):
        result = _into_a_closed_pipe(*args)
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, (args, result.stderr)
        assert result.returncode == 128 + signal.SIGPIPE, (args, result.returncode)


def test_serve_help_names_every_kind_of_view_source() -> None:
    result = edge("serve", "--help", env={"COLUMNS": "200"})
    line = next(line for line in result.stdout.splitlines() if "--view SOURCE" in line and "view source" in line)
    for kind in ("file path", "http(s)://", "etcd://", "demo"):
        assert kind in line, kind


def test_a_missing_view_file_is_one_message_on_stderr(tmp_path) -> None:
    missing = tmp_path / "nowhere.json"
    result = edge("view", "check", str(missing))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count(str(missing)) == 1, result.stderr
    assert result.stderr.startswith("edge: cannot read the view: ") and "no such file" in result.stderr


def test_keys_added_within_one_second_get_different_names(tmp_path, monkeypatch) -> None:
    from edge import cli
    from edge.metadata import tokens

    fixed = time.gmtime(1_800_000_000)
    monkeypatch.setattr(tokens.time, "gmtime", lambda *_: fixed)
    path = tmp_path / "keys"
    for _ in range(3):
        assert cli.main(["keys", "generate", "--add", str(path)]) == 0
    load_key_file(path)  # a valid key file
    names = [line.split()[0] for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert len(names) == 3 and len(set(names)) == 3, names


def test_the_first_log_line_says_what_the_quick_start_writes_and_where(tmp_path) -> None:
    """`edge serve` with no options keeps keys and the last good view in ~/.local/state/edge: it says so first."""
    ports = {name: free_port() for name in ("metadata", "dns", "admin")}
    env = {key: value for key, value in os.environ.items() if key != "STATE_DIRECTORY"}
    env.update(HOME=str(tmp_path), EDGE_WORKERS="1")
    state = tmp_path / ".local" / "state" / "edge"
    server = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--metadata-listen", f"127.0.0.1:{ports['metadata']}",
         "--dns-listen", f"127.0.0.1:{ports['dns']}", "--admin-listen", f"127.0.0.1:{ports['admin']}"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{ports['admin']}/readyz")[0] == 200, timeout=20)
        wait_until(lambda: _get(f"http://127.0.0.1:{ports['metadata']}/latest/meta-data/instance-id")[0] == 200)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
    first = server.stderr.read().splitlines()[0]
    assert 'event="edge starting"' in first and f"state_dir={state}" in first, first
    written = sorted(path.name for path in state.iterdir() if not path.name.startswith("."))
    assert written, "the quick start writes its state"
    for name in written:
        shown = name.split(".", 1)[0] + ".*" if name.startswith("last-good-view.") else name
        assert shown in first, (name, first)


def test_view_check_names_the_format_of_the_document_it_read() -> None:
    """A Eucalyptus GNI is read as an edge view, but it is reported as what it is."""
    gni = Path(__file__).parent / "eucalyptus" / "fixtures" / "gni-edge.xml"
    result = edge("view", "check", str(gni))
    assert result.returncode == 0, result.stderr
    assert "  format      eucalyptus-gni\n" in result.stdout
    result = edge("view", "check", "demo")
    assert result.returncode == 0 and "  format      edge-view/1\n" in result.stdout


def test_config_show_never_prints_a_secret() -> None:
    env = {"EDGE_VIEW_ETCD_USERNAME": "edge", "EDGE_VIEW_ETCD_PASSWORD": "hunter2-secret"}
    result = edge("config", "show", env=env)
    assert result.returncode == 0, result.stderr
    assert "hunter2-secret" not in result.stdout
    assert "# etcd_password is set (secret, not shown)" in result.stdout.splitlines()
    assert tomllib.loads(result.stdout)["view"]["etcd_username"] == "edge"


def test_the_first_log_line_names_what_workers_add_to_the_state_directory() -> None:
    from edge.config import Config, ViewConfig
    from edge.server import state_dir_contents

    one = " ".join(state_dir_contents(Config(workers=1)))
    assert "metrics/" not in one and "served-view/" not in one
    several = " ".join(state_dir_contents(Config(workers=2)))
    assert "metrics/" in several and "served-view/" in several
    assert "served-view/" not in " ".join(state_dir_contents(Config(workers=2, view=ViewConfig(shared_view=False))))
