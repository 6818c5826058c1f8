"""The test setup reaches nothing outside the project: no machine service is stopped, killed or enabled."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Stopping or enabling the machine's services, or killing processes by name.
REACHING_OUT = re.compile(r"\b(systemctl|pkill|killall|update-rc\.d|invoke-rc\.d)\b|\bservice\s+\S+\s+(stop|start|restart)")


def scripts() -> list[Path]:
    found = [ROOT / "tests" / "run", ROOT / "tests" / "install-debian-packages", ROOT / ".ci" / "run",
             ROOT / "bench" / "run"]
    for tree in ("tests", "bench"):
        found += sorted((ROOT / tree).rglob("*.py"))
    return [path for path in found if path.exists() and path != Path(__file__).resolve()]


def test_no_script_stops_kills_by_name_or_enables_machine_services() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in scripts()
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if REACHING_OUT.search(line)]
    assert not offenders, "\n".join(offenders)


def test_tests_run_installs_no_client_or_init_system_on_the_machine() -> None:
    text = (ROOT / "tests" / "run").read_text()
    installed = re.search(r"^DEBIAN_PACKAGES=\((.*?)\)", text, re.S | re.M)
    assert installed is not None
    packages = installed.group(1).split()
    for package in ("cloud-init", "amazon-ec2-utils", "systemd"):
        assert package not in packages, package
    # Clients come from their packages, extracted into the venv; services are kept from starting.
    assert re.search(r"^EXTRACTED_PACKAGES=\(cloud-init amazon-ec2-utils\)", text, re.M)
    assert "dpkg-deb -x" in text and "bash tests/install-debian-packages" in text
    installer = (ROOT / "tests" / "install-debian-packages").read_text()
    assert "policy-rc.d" in installer and "disable *" in installer
    # bench installs its peers the same way.
    assert "install-debian-packages" in (ROOT / "bench" / "peers.py").read_text()
