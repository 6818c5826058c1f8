"""What operators install: example configuration, wheel and sdist, systemd unit, BIRD and its health check."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest

from edge.config import Listen, load_config
from edge.etcd import EtcdAddress
from edge.view.etcd_source import EtcdSource
from edge.view.sources import open_source
from tests.fleet.gateway import Gateway
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"


def test_example_config_loads_with_the_addresses_it_promises() -> None:
    config = load_config(str(PACKAGING / "edge.toml"), env={})
    assert config.metadata.listen == (Listen("169.254.169.254", 80),)
    assert [str(x) for x in config.dns.listen] == ["10.0.0.53:53", "10.10.0.53:53@vpc-0a1b2c3d",
                                                  "10.20.0.53:53@vpc-4e5f6a7b"]
    assert config.admin.listen is not None
    instance_facing = {x.host for x in config.metadata.listen + config.dns.listen}
    assert config.admin.listen.host not in instance_facing
    assert isinstance(open_source(config.view.source, config.view), EtcdSource)
    assert len(EtcdAddress.parse(config.fleet.token_key_source).endpoints) == 3


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_and_sdist_build_install_and_run(tmp_path) -> None:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (pip install build)")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)], cwd=tmp_path)
    wheels, sdists = list(dist.glob("edge-*.whl")), list(dist.glob("edge-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "edge/etcd.py" in names and "edge/view/etcd_source.py" in names and "edge/cli.py" in names
    assert not any(name.startswith("tests/") for name in names)
    assert any(name.endswith("entry_points.txt") for name in names)

    for artifact in (wheels[0], sdists[0]):
        # Runtime dependencies come from this interpreter's site-packages; an sdist is built
        # in an isolated environment like `python -m build` did (setuptools and wheel from the index).
        target = tmp_path / f"venv-{artifact.suffix.strip('.')}"
        venv.EnvBuilder(system_site_packages=True, with_pip=False).create(target)
        python = target / "bin" / "python"
        _run([str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
              str(artifact)], cwd=tmp_path)
        edge = target / "bin" / "edge"
        assert "serve" in _run([str(edge), "--help"], cwd=tmp_path).stdout
        assert "--token-key-source" in _run([str(edge), "serve", "--help"], cwd=tmp_path).stdout
        # The installed copy is the one that runs, not the source tree.
        where = _run([str(python), "-c", "import edge; print(edge.__file__)"], cwd=tmp_path).stdout
        assert str(target) in where
        keys = tmp_path / f"keys-{artifact.suffix.strip('.')}"
        _run([str(edge), "keys", "generate", str(keys)], cwd=tmp_path)
        assert keys.read_text().count("\n") >= 2


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (PACKAGING / "systemd" / "edge.service").read_text()
    directives = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in text.splitlines()
                  if "=" in line and not line.startswith("#")}
    for key, value in {"User": "edge", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
                       "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "Restart": "always",
                       "ProtectSystem": "strict", "StateDirectory": "edge", "NoNewPrivileges": "yes",
                       "ExecReload": "/bin/kill -HUP $MAINPID"}.items():
        assert directives.get(key) == value, key
    # verify insists that ExecStart exists: point it at this machine's edge.
    unit = tmp_path / "edge.service"
    unit.write_text(text.replace("/usr/local/bin/edge", f"{sys.executable} -m edge"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "edge.service" not in result.stderr, result.stderr
    health = tmp_path / "edge-route-health.service"
    health.write_text((PACKAGING / "bird" / "edge-route-health.service").read_text().replace(
        "/usr/local/lib/edge/edge-route-health", str(PACKAGING / "bird" / "edge-route-health")))
    result = subprocess.run([analyze, "verify", str(health)], capture_output=True, text=True, timeout=60)
    assert "edge-route-health.service:" not in result.stderr, result.stderr


def test_sysusers_entry_creates_the_dedicated_user() -> None:
    entries = [line.split() for line in (PACKAGING / "systemd" / "edge.sysusers.conf").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries[0][:2] == ["u", "edge"]


def test_containerfile_builds_the_wheel_and_runs_unprivileged() -> None:
    lines = [line.strip() for line in (PACKAGING / "Containerfile").read_text().splitlines()]
    instructions = [line.split(None, 1) for line in lines if line and not line.startswith("#")
                    and line.split(None, 1)[0].isupper()]
    for kind, argument in instructions:
        if kind == "COPY" and not argument.startswith("--from"):
            for source in argument.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert ["USER", "edge"] in instructions
    assert ["ENTRYPOINT", '["edge"]'] in instructions
    assert any(kind == "HEALTHCHECK" and "READYZ_URL" in argument for kind, argument in instructions)
    assert any(kind == "VOLUME" and "/var/lib/edge" in argument for kind, argument in instructions)


def _bird_tools() -> tuple[str, str]:
    bird, birdc = shutil.which("bird"), shutil.which("birdc")
    if not bird or not birdc:
        pytest.skip("BIRD 2 is not installed (Debian package bird2)")
    return bird, birdc


def test_bird_example_parses(tmp_path) -> None:
    bird, _ = _bird_tools()
    shutil.copy(PACKAGING / "bird" / "edge-service.conf", tmp_path)
    config = tmp_path / "bird.conf"
    config.write_text((PACKAGING / "bird" / "bird.conf").read_text().replace(
        "/etc/bird/edge-service.conf", str(tmp_path / "edge-service.conf")))
    result = subprocess.run([bird, "-p", "-c", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_routes_follow_readiness(tmp_path) -> None:
    """A real BIRD (no BGP peers, no kernel export) and a real edge: routes come and go with /readyz."""
    bird, birdc = _bird_tools()
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    socket_path = tmp_path / "bird.ctl"
    config = tmp_path / "bird.conf"
    config.write_text(f'router id 127.0.0.1;\nprotocol device {{}}\n'
                      f'include "{PACKAGING / "bird" / "edge-service.conf"}";\n')
    daemon = subprocess.Popen([bird, "-f", "-c", str(config), "-s", str(socket_path), "-P", str(tmp_path / "pid")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    gateway = Gateway("edge", "127.0.1.1", "demo", tmp_path / "edge")
    checker: subprocess.Popen[str] | None = None

    def routes() -> str:
        return subprocess.run([birdc, "-s", str(socket_path), "show", "route", "protocol", "edge_service"],
                              capture_output=True, text=True, timeout=10).stdout

    try:
        wait_until(lambda: socket_path.exists() and "BIRD" in routes(), timeout=10)
        assert "169.254.169.254/32" not in routes()  # starts withdrawn
        gateway.start()
        checker = subprocess.Popen(
            [str(PACKAGING / "bird" / "edge-route-health")], text=True, stderr=subprocess.PIPE,
            env={**os.environ, "EDGE_READYZ_URL": f"http://127.0.1.1:{gateway.admin_port}/readyz",
                 "BIRDC": f"{birdc} -s {socket_path}", "EDGE_HEALTH_INTERVAL": "0.1"})
        wait_until(lambda: "169.254.169.254/32" in routes() and "10.0.0.53/32" in routes(), timeout=10)
        stopping = time.monotonic()
        gateway.stop()
        wait_until(lambda: "169.254.169.254/32" not in routes(), timeout=10)
        print(f"\nroutes withdrawn {time.monotonic() - stopping:.2f}s after SIGTERM to edge")
        gateway.start()
        wait_until(lambda: "169.254.169.254/32" in routes(), timeout=10)
        # Stopping the checker withdraws too: no health check, no traffic.
        checker.send_signal(signal.SIGTERM)
        checker.wait(10)
        assert "169.254.169.254/32" not in routes()
    finally:
        if checker is not None and checker.poll() is None:
            checker.kill()
        gateway.stop()
        daemon.terminate()
        daemon.wait(10)
