"""The Eucalyptus packaging: the example configuration loads and the unit replaces eucanetd-nginx."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.config import load_config

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "eucalyptus"


def test_example_configuration_loads() -> None:
    config = load_config(str(PACKAGING / "eucalyptus.toml"), env={})
    assert config.view.format == "eucalyptus-gni"
    assert config.view.source.endswith("global_network_info.xml")
    assert str(config.metadata.listen[0]) == "169.254.169.254:80"
    assert config.eucalyptus.intip_map_file.endswith("eucanetd_intip_eni_map")
    assert config.eucalyptus.controller_url.startswith("http://")


def test_unit_replaces_eucanetd_nginx() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment]
    unit.read(PACKAGING / "edge-eucalyptus.service")
    assert unit["Unit"]["Conflicts"] == "eucanetd-nginx.service"
    service = unit["Service"]
    assert service["ExecStart"].endswith("--config /etc/edge/eucalyptus.toml")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["Restart"] == "always" and service["StateDirectory"] == "edge"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze(tmp_path) -> None:
    text = (PACKAGING / "edge-eucalyptus.service").read_text()
    # verify needs the ExecStart binary to exist: point it at one that does.
    unit = tmp_path / "edge-eucalyptus.service"
    unit.write_text(text.replace("/usr/bin/edge", shutil.which("true") or "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines()
                if "edge-eucalyptus.service" in line and "eucanetd" not in line and "network-online" not in line]
    assert not problems, result.stderr  # it exits 0 on unknown keys: the warnings are the verdict
