"""The test setup reaches nothing outside the project: no machine service is stopped, killed or enabled."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Stopping, starting or enabling the machine's services, or killing processes by name. The by-name
# killers are spelled in two pieces, here and in the samples below, so that a plain repository-wide
# search for such calls (a reviewer's grep) finds the scripts that make them, not this test.
KILL_BY_NAME = ("p" + "kill", "kill" + "all")
FORBIDDEN = {"systemctl", "service", *KILL_BY_NAME, "update-rc.d", "invoke-rc.d", "deb-systemd-invoke"}
SHELL_SCRIPTS = ("tests/run", "tests/install-debian-packages", ".ci/run", "bench/run")
SHELL_COMMAND = re.compile(r"(?:^|[;&|(`]|\$\(|\b(?:then|do|else|exec|sudo)\s)\s*(" +
                           "|".join(re.escape(name) for name in sorted(FORBIDDEN)) + r")\b")


def _command_name(node: ast.expr) -> str | None:
    """The program a call's first argument runs: ``["systemctl", ...]`` or a shell string such as ``"service nsd stop"``."""
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        node = node.elts[0]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value.rsplit("/", 1)[-1]
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split():
        return node.value.split()[0].rsplit("/", 1)[-1]
    return None


def python_offenders(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and node.args and _command_name(node.args[0]) in FORBIDDEN:
            found.append(f"{path.relative_to(root)}:{node.lineno}: runs {_command_name(node.args[0])}")
    return found


def shell_offenders(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        if SHELL_COMMAND.search(code):
            found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_script_stops_kills_by_name_or_enables_machine_services() -> None:
    offenders = [offender for name in SHELL_SCRIPTS if (ROOT / name).exists()
                 for offender in shell_offenders(ROOT / name)]
    for tree in ("tests", "bench"):
        for path in sorted((ROOT / tree).rglob("*.py")):
            offenders += python_offenders(path)
    assert not offenders, "\n".join(offenders)


def test_the_check_finds_what_it_looks_for(tmp_path) -> None:
    """The scan above would see the calls tests/run used to make."""
    script = tmp_path / "run"
    stop, kill_one, kill_all = "systemctl" + " stop", *KILL_BY_NAME
    script.write_text(f'for unit in nsd; do\n  ({stop} "$unit" || service "$unit" stop) || true\ndone\n'
                      f"{kill_one} -x nsd 2>/dev/null || true\n# systemctl in a comment is fine\necho 'use systemctl'\n")
    module = tmp_path / "helper.py"
    module.write_text('import subprocess\nsubprocess.run(["systemctl", "stop", "nginx"])\n'
                      f'subprocess.run("{kill_all} -q etcd", shell=True)\nassert "systemctl start x" in "output"\n')
    assert [line.split(":")[1] for line in shell_offenders(script, tmp_path)] == ["2", "4"]
    assert [line.split(":")[1] for line in python_offenders(module, tmp_path)] == ["2", "3"]


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
