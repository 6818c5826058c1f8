"""Deployment per Eucalyptus network mode: configurations, units, and what eucanetd's start command runs.

``eucanetd-nginx.service`` is Eucalyptus's own unit (``systemd/units/eucanetd-nginx.service`` in
Corymbia/eucalyptus, kept as a fixture); eucanetd runs ``systemctl start eucanetd-nginx.service``
itself (``do_md_nginx_maintain`` in ``net/euca-to-mido.c``).  In EDGE mode every node DNATs
``169.254.169.254:80`` to ``METADATA_IP:8773`` (``net/eucanetd_edge.c``).
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.config import load_config
from tests.eucalyptus.conftest import FIXTURES
from tests.installed import InstalledRoot

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "eucalyptus"
SWITCH = PACKAGING / "switch"
EUCALYPTUS_UNIT = "/usr/lib/systemd/system/eucanetd-nginx.service"
EDGE = "/opt/edge/bin/edge"


def test_edge_mode_configuration_listens_where_nodes_dnat_and_asks_from_the_instance() -> None:
    config = load_config(str(PACKAGING / "eucalyptus-edge.toml"), env={})
    assert config.view.format == "eucalyptus-gni" and config.view.source.endswith("global_network_info.xml")
    assert [listen.port for listen in config.metadata.listen] == [8773]
    assert config.eucalyptus.controller_identity == "source-address"
    assert not config.eucalyptus.intip_map_file


def test_vpcmido_configuration_answers_where_eucanetd_nginx_did() -> None:
    config = load_config(str(PACKAGING / "eucalyptus-vpcmido.toml"), env={})
    assert [str(listen) for listen in config.metadata.listen] == ["169.254.169.254:80"]
    assert [str(listen) for listen in config.dns.listen] == ["169.254.169.253:53"]
    assert config.eucalyptus.controller_identity == "instance-id"
    assert config.eucalyptus.controller_url == "http://127.0.0.1:8773/"
    assert config.eucalyptus.intip_map_file.endswith("eucanetd_intip_eni_map")
    assert config.eucalyptus.mido_md_cidr == "255.0.0.0/8"
    assert config.eucalyptus.eucalyptus_conf == "/etc/eucalyptus/eucalyptus.conf"  # MIDO_MD_CIDR from eucanetd's


def _unit(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment]
    unit.read_string(text)
    return unit


def test_units_run_the_installed_edge_and_conflict_with_nothing() -> None:
    service = _unit((PACKAGING / "edge-eucalyptus.service").read_text())
    assert "Conflicts" not in service["Unit"]
    assert service["Service"]["ExecStart"] == f"{EDGE} serve --config /etc/edge/eucalyptus-edge.toml"
    assert "CAP_NET_ADMIN" in service["Service"]["AmbientCapabilities"]  # IP_TRANSPARENT
    assert "Conflicts" not in (PACKAGING / "eucanetd-nginx.service.d" / "edge.conf").read_text()


def resolved(root: Path, unit: str) -> dict[str, list[str]]:
    """The unit as systemd loads it from ``root``: ``systemd-analyze cat-config`` lists the unit file
    and its drop-ins in order, and an empty assignment clears what came before (systemd.unit(5))."""
    result = subprocess.run(["systemd-analyze", f"--root={root}", "cat-config", f"systemd/system/{unit}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    settings: dict[str, list[str]] = {}
    section = ""
    for line in result.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        name = f"{section}.{key}"
        if value == "":
            settings[name] = []
        else:
            settings.setdefault(name, []).append(value)
    return settings


def _switch(root: Path, mode: str) -> str:
    result = subprocess.run([str(SWITCH), mode, "--root", str(root)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _eucalyptus_installed(root: Path) -> None:
    target = root / EUCALYPTUS_UNIT.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "eucanetd-nginx.service", target)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_eucanetds_own_unit_runs_edge_after_switching_and_nginx_after_switching_back(tmp_path) -> None:
    root = tmp_path / "root"
    _eucalyptus_installed(root)
    before = resolved(root, "eucanetd-nginx.service")
    assert before["Service.ExecStart"] == ["/usr/sbin/nginx -c /usr/share/eucalyptus/nginx_md.conf"]

    out = _switch(root, "vpcmido")
    assert "systemctl restart eucanetd-nginx.service" in out
    after = resolved(root, "eucanetd-nginx.service")
    assert after["Service.ExecStart"] == [f"{EDGE} serve --config /etc/edge/eucalyptus-vpcmido.toml"]
    assert after["Service.ExecStartPre"] == [] and after["Service.PIDFile"] == []
    assert after["Service.Type"][-1] == "exec" and after["Service.KillMode"][-1] == "mixed"
    assert after["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert (root / "etc/edge/eucalyptus-vpcmido.toml").read_text() == (PACKAGING / "eucalyptus-vpcmido.toml").read_text()

    # A configuration the operator edited is never overwritten.
    (root / "etc/edge/eucalyptus-vpcmido.toml").write_text("# edited\n")
    _switch(root, "vpcmido")
    assert (root / "etc/edge/eucalyptus-vpcmido.toml").read_text() == "# edited\n"

    _switch(root, "back")
    assert resolved(root, "eucanetd-nginx.service") == before
    assert not (root / "etc/systemd/system/eucanetd-nginx.service.d").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_edge_mode_unit_switched_in_and_out(tmp_path) -> None:
    root = tmp_path / "root"
    _switch(root, "edge")
    unit = resolved(root, "edge-eucalyptus.service")
    assert unit["Service.ExecStart"] == [f"{EDGE} serve --config /etc/edge/eucalyptus-edge.toml"]
    assert (root / "etc/edge/eucalyptus-edge.toml").exists()
    _switch(root, "back")
    assert not (root / "etc/systemd/system/edge-eucalyptus.service").exists()


def _verify(installed: InstalledRoot, unit: str) -> subprocess.CompletedProcess[str]:
    return installed.run(["systemd-analyze", "verify", unit], timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify_on_the_installed_paths(installed_edge: InstalledRoot) -> None:
    """Where packaging/install put edge at /opt/edge/bin/edge, both units verify as installed."""
    unit_dir = installed_edge.path("/etc/systemd/system")
    result = installed_edge.run([str(SWITCH), "edge"])
    assert result.returncode == 0, result.stderr
    result = installed_edge.run([str(SWITCH), "vpcmido"])
    assert result.returncode == 0, result.stderr
    shutil.copy(FIXTURES / "eucanetd-nginx.service", unit_dir / "eucanetd-nginx.service")
    try:
        for unit in ("/etc/systemd/system/edge-eucalyptus.service", "/etc/systemd/system/eucanetd-nginx.service"):
            result = _verify(installed_edge, unit)
            problems = [line for line in result.stderr.splitlines()
                        if ("edge-eucalyptus" in line or "eucanetd-nginx" in line) and "network-online" not in line]
            assert result.returncode == 0 and not problems, result.stderr
        # The drop-in reset nginx's commands: what verify checked is edge, and edge runs.
        result = installed_edge.run([EDGE, "config", "show", "--config", "/etc/edge/eucalyptus-vpcmido.toml"])
        assert result.returncode == 0 and "169.254.169.253:53" in result.stdout, result.stderr
    finally:
        installed_edge.run([str(SWITCH), "back"])
        (unit_dir / "eucanetd-nginx.service").unlink()


START_SCRIPT = r"""
set -eu
ip link set lo up
for address in 169.254.169.254 169.254.169.253 10.111.5.11 255.0.0.10; do ip addr add "$address/32" dev lo; done
mount -t tmpfs tmpfs /run
mkdir -p /run/eucalyptus
cp "$GNI" /run/eucalyptus/global_network_info.xml
cp "$MAP" /run/eucalyptus/eucanetd_intip_eni_map
[ -e /etc/edge/token-keys ] || /opt/edge/bin/edge keys generate /etc/edge/token-keys
export STATE_DIRECTORY=/run/edge-state
mkdir -p "$STATE_DIRECTORY"
# exec: the background job becomes edge itself, so $! is edge's PID and the TERM below reaches it.
eval "exec $EXEC_START" >/run/edge.log 2>&1 &
pid=$!
answered=""
for _ in $(seq 150); do
  if answered=$(curl -sf --max-time 2 --interface 255.0.0.10 http://169.254.169.254/latest/meta-data/instance-id); then
    break
  fi
  sleep 0.2
done
echo "instance-id=$answered"
dig +short +time=2 +tries=1 -b 255.0.0.10 @169.254.169.253 instance-data.eucalyptus.internal A | sed 's/^/dns=/' || true
kill -TERM "$pid"
wait "$pid" || true
# Nothing of edge may outlive the TERM: no supervisor or worker left in this network namespace.
own_net=$(readlink /proc/$$/ns/net)
for proc in /proc/[0-9]*; do
  [ "$(readlink "$proc/ns/net" 2>/dev/null)" = "$own_net" ] || continue
  case "$(tr '\0' '\n' < "$proc/cmdline" 2>/dev/null | head -n 1)" in /opt/edge/bin/*) echo "leftover=${proc#/proc/}";; esac
done
tail -n 5 /run/edge.log
"""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("dig") is None,
                    reason="systemd-analyze or dig is not installed")
def test_what_eucanetd_starts_is_edge_answering_where_nginx_did(installed_edge: InstalledRoot, tmp_path) -> None:
    """The command eucanetd's ``systemctl start eucanetd-nginx.service`` runs, resolved from the unit
    and its drop-ins as installed, run in a network namespace holding the metadata veth addresses:
    edge answers an instance's request from its MIDO_MD_CIDR address, and VPC DNS at .253."""
    unit_dir = installed_edge.path("/etc/systemd/system")
    assert installed_edge.run([str(SWITCH), "vpcmido"]).returncode == 0
    shutil.copy(FIXTURES / "eucanetd-nginx.service", unit_dir / "eucanetd-nginx.service")
    try:
        listed = installed_edge.run(["systemd-analyze", "cat-config", "systemd/system/eucanetd-nginx.service"])
        assert listed.returncode == 0, listed.stderr
        scratch = tmp_path / "root"
        target = scratch / "etc/systemd/system"
        target.mkdir(parents=True)
        # The same resolution as above, on the files the installed root holds.
        shutil.copy(unit_dir / "eucanetd-nginx.service", target / "eucanetd-nginx.service")
        shutil.copytree(unit_dir / "eucanetd-nginx.service.d", target / "eucanetd-nginx.service.d")
        exec_start = resolved(scratch, "eucanetd-nginx.service")["Service.ExecStart"]
        assert len(exec_start) == 1 and exec_start[0].startswith(EDGE), exec_start
        assert "edge.conf" in listed.stdout
        result = installed_edge.run(
            ["unshare", "--net", "sh", "-c", START_SCRIPT], timeout=120,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "EXEC_START": exec_start[0],
                 "GNI": str(FIXTURES / "gni-vpc.xml"), "MAP": str(FIXTURES / "eucanetd_intip_eni_map")})
        assert "instance-id=i-00000001" in result.stdout, result.stdout + result.stderr
        assert "dns=169.254.169.254" in result.stdout, result.stdout + result.stderr
        assert "leftover=" not in result.stdout, result.stdout
    finally:
        installed_edge.run([str(SWITCH), "back"])
        (unit_dir / "eucanetd-nginx.service").unlink()
