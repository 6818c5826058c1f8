"""What operators install: example configuration, wheel and sdist, systemd unit, BIRD and its health check."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from edge.config import Listen, load_config
from edge.etcd.client import EtcdAddress
from edge.etcd.view_source import EtcdKeyspaceSource
from edge.server import adapters
from edge.view.sources import open_source
from tests.fleet.gateway import Gateway
from tests.installed import Dist, InstalledRoot, namespaces_unavailable
from tests.support import free_port, wait_until

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
    assert isinstance(open_source(config.view.source, config.view, adapters().sources), EtcdKeyspaceSource)
    assert config.view.cert_file and config.view.etcd_username and config.view.etcd_password_file
    assert len(EtcdAddress.parse(config.fleet.token_key_source).endpoints) == 3


EVERY_MODULE = """
import importlib, pkgutil, edge
names = [m.name for m in pkgutil.walk_packages(edge.__path__, "edge.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def _run(args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_holds_the_server_and_nothing_else(dist: Dist) -> None:
    names = zipfile.ZipFile(dist.wheel).namelist()
    assert "edge/etcd/client.py" in names and "edge/etcd/view_source.py" in names and "edge/cli.py" in names
    assert not any(name.startswith(("tests/", "bench/")) for name in names)
    assert not any(name.startswith("edge/testing") for name in names), "test helpers are not installed"
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    headers = zipfile.ZipFile(dist.wheel).read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers, headers
    assert not any(line.startswith("License:") for line in headers), "the SPDX expression, not the old table"
    license_file = next(name for name in names if name.endswith(".dist-info/licenses/LICENSE"))
    assert "Apache License" in zipfile.ZipFile(dist.wheel).read(license_file).decode()
    assert any(name.endswith("entry_points.txt") for name in names)


def test_sdist_tests_run_from_the_unpacked_tree(dist: Dist, tmp_path) -> None:
    """The sdist carries its tests, the view generator and the packaging files; its tests pass against its edge."""
    with tarfile.open(dist.sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    tree = next(tmp_path.glob("edge-*"))
    for needed in ("LICENSE", "tests/run", "tests/support.py", "tests/conftest.py", "bench/generate.py",
                   "packaging/install", "packaging/requirements.txt", "tests/eucalyptus/fixtures",
                   "docs/view-format.md"):
        assert (tree / needed).exists(), needed
    assert not list(tree.rglob("__pycache__"))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = _run([sys.executable, "-c", "import edge; print(edge.__file__)"], cwd=tree, env=env).stdout
    assert where.startswith(str(tree)), where  # the sdist's edge, not this checkout's
    result = _run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/view/test_parse.py",
                   "tests/test_cli.py", "tests/packaging/test_test_setup.py"], cwd=tree, env=env, timeout=300)
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_installed_venv_serves_from_its_own_dependencies(installed_edge: InstalledRoot, tmp_path) -> None:
    """packaging/install's /opt/edge: a clean venv, the pinned set, and `edge serve` answering from it."""
    config = installed_edge.path("/opt/edge/pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config
    pinned = dict(line.split("==") for line in (PACKAGING / "requirements.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    frozen = installed_edge.run(["/opt/edge/bin/python", "-m", "pip", "freeze", "--all"])
    assert frozen.returncode == 0, frozen.stderr
    installed = dict(line.split("==") for line in frozen.stdout.splitlines() if "==" in line)
    for name, version in pinned.items():
        assert installed.get(name) == version, (name, installed)
    imported = installed_edge.run(["/opt/edge/bin/python", "-c", "import edge, uvloop; print(edge.__file__, uvloop.__file__)"])
    assert imported.stdout.split() and all(p.startswith("/opt/edge/lib/") for p in imported.stdout.split()), imported
    # Every module imports with the pinned set alone: no dependency is missing from it.
    every = installed_edge.run(["/opt/edge/bin/python", "-c", EVERY_MODULE])
    assert every.returncode == 0 and int(every.stdout) > 30, every.stderr[-3000:]

    metadata_port, dns_port, admin_port = free_port(), free_port(), free_port()
    log = tmp_path / "edge.log"
    with open(log, "wb") as output:
        server = installed_edge.popen(
            ["/opt/edge/bin/edge", "serve", "--view", "demo", "--state-dir", str(tmp_path / "state"), "--workers", "1",
             "--metadata-listen", f"127.0.0.1:{metadata_port}", "--dns-listen", f"127.0.0.1:{dns_port}",
             "--admin-listen", f"127.0.0.1:{admin_port}"], stdout=output, stderr=output)
    try:
        def answers() -> bool:
            assert server.poll() is None, log.read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{metadata_port}/latest/meta-data/instance-id",
                                        timeout=2) as reply:
                return reply.read() == b"i-0de0000000000001"
        wait_until(answers, timeout=30)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0, log.read_text()


def test_systemd_unit_verifies_on_the_installed_path(installed_edge: InstalledRoot) -> None:
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
    assert directives["ExecStart"].split()[0] == "/opt/edge/bin/edge"
    assert installed_edge.path("/etc/systemd/system/edge.service").read_text() == text
    assert installed_edge.path("/etc/sysusers.d/edge.conf").exists()
    assert installed_edge.path("/etc/edge/edge.toml").read_text() == (PACKAGING / "edge.toml").read_text()
    # Where packaging/install ran, /opt/edge/bin/edge is the installed edge and the unit verifies as it is.
    result = installed_edge.verify_unit(installed_edge.path("/etc/systemd/system/edge.service"))
    assert result.returncode == 0, result.stderr
    assert "edge.service" not in result.stderr, result.stderr
    # The same unit where nothing is installed at /opt/edge fails: verify does check the path.
    if not Path("/opt/edge/bin/edge").exists():
        result = subprocess.run([analyze, "verify", str(PACKAGING / "systemd" / "edge.service")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "/opt/edge/bin/edge" in result.stderr, result.stderr


def test_route_health_unit_verifies_on_the_installed_path(installed_edge: InstalledRoot) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = PACKAGING / "bird" / "edge-route-health.service"
    assert "ExecStart=/opt/edge/libexec/edge-route-health\n" in unit.read_text()
    installed = installed_edge.path("/opt/edge/libexec/edge-route-health")
    assert installed.read_bytes() == (PACKAGING / "bird" / "edge-route-health").read_bytes()
    assert os.access(installed, os.X_OK)
    result = installed_edge.verify_unit(unit)
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
    assert ["ENTRYPOINT", '["/opt/edge/bin/edge"]'] in instructions
    assert any(kind == "RUN" and "/tmp/packaging/install --wheel" in argument for kind, argument in instructions)
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


@pytest.mark.slow
def test_installing_again_upgrades_in_place_and_keeps_the_configuration(dist: Dist, tmp_path) -> None:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    root = InstalledRoot(tmp_path)
    root.install(dist.wheel)
    edited = "# this gateway's own settings\nworkers = 1\n"
    root.path("/etc/edge/edge.toml").write_text(edited)
    root.path("/opt/edge/kept").write_text("")
    output = root.install(dist.wheel).stdout
    assert "kept as it was" in output
    assert root.path("/etc/edge/edge.toml").read_text() == edited
    assert root.path("/opt/edge/kept").exists()  # the same venv, upgraded, not a new one
    assert root.run(["/opt/edge/bin/edge", "config", "show", "--config", "/etc/edge/edge.toml"]).stdout.startswith(
        "workers = 1\n")


def test_servers_get_the_dependency_versions_the_tests_run() -> None:
    """packaging/requirements.txt pins every runtime dependency, at the version this test run uses."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    pinned = dict(line.split("==") for line in (PACKAGING / "requirements.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    normal = {name.lower().replace("_", "-"): wanted for name, wanted in pinned.items()}
    declared = [Requirement(text) for text in requires("edge") or [] if "extra ==" not in text]
    for requirement in declared:
        name = requirement.name.lower().replace("_", "-")
        assert name in normal, f"{requirement.name} is not pinned in packaging/requirements.txt"
        assert requirement.specifier.contains(normal[name]), (requirement, normal[name])
    for name, wanted in pinned.items():
        try:
            assert version(name) == wanted, f"tests run {name} {version(name)}, servers get {wanted}"
        except PackageNotFoundError:
            pytest.fail(f"{name} is pinned but not installed here")
