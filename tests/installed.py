"""edge built and installed the way operators install it, without touching this machine.

``build_dist`` builds the wheel and the sdist once; ``InstalledRoot`` runs
``packaging/install`` in a private mount namespace where ``/etc`` and ``/opt``
are overlays whose changes land in a scratch directory. Inside that namespace
``/opt/edge/bin/edge`` is the really installed edge (its venv, its pinned
dependencies), so unit files are verified and run on their real paths; outside
it the machine's ``/etc`` and ``/opt`` are untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERLAID = ("/etc", "/opt")


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


def build_dist(outdir: Path) -> Dist:
    """``python -m build`` of this tree: the sdist, then the wheel built from that sdist (so it is complete)."""
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(outdir), str(ROOT)],
                            cwd=outdir.parent, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"python -m build failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    wheels, sdists = list(outdir.glob("edge-*.whl")), list(outdir.glob("edge-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, (wheels, sdists)
    return Dist(wheels[0], sdists[0])


def namespaces_unavailable() -> str | None:
    """Why ``InstalledRoot`` cannot work here, or None."""
    if os.geteuid() != 0:
        return "installing into an overlaid /opt needs root (a private mount namespace)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create a mount namespace: {probe.stderr.decode().strip()}"
    return None


class InstalledRoot:
    """A scratch directory holding what ``packaging/install`` wrote to /etc and /opt."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        for top in OVERLAID:
            for part in ("upper", "work"):
                (scratch / part / top.strip("/")).mkdir(parents=True, exist_ok=True)

    def path(self, absolute: str) -> Path:
        """Where a file the installation wrote under /etc or /opt is kept outside the namespace."""
        return self.scratch / "upper" / absolute.lstrip("/")

    def _inside(self, argv: list[str]) -> list[str]:
        """``argv`` run in a new mount namespace with this root's overlays on /etc and /opt.

        One namespace at a time: an overlay's upper directory cannot be mounted twice at once.
        """
        mounts = " && ".join(
            f"mount -t overlay overlay -o lowerdir={top},upperdir={self.scratch / 'upper' / top.strip('/')},"
            f"workdir={self.scratch / 'work' / top.strip('/')} {top}" for top in OVERLAID)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *argv]

    def run(self, argv: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("cwd", "/")  # not the source tree, whose edge/ would shadow the installed one
        return subprocess.run(self._inside(argv), capture_output=True, text=True, timeout=timeout, **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside; the process ``exec``s in place of the shell, so its PID is the Popen's."""
        kwargs.setdefault("cwd", "/")
        return subprocess.Popen(self._inside(argv), **kwargs)

    def verify_unit(self, unit: Path) -> subprocess.CompletedProcess[str]:
        """``systemd-analyze verify`` of ``unit`` installed in this root's /etc/systemd/system.

        Inside the namespace /opt/edge/bin/edge is the installed edge, so a unit is checked
        on its real ExecStart path; verify exits 0 on some findings, so read its stderr too.
        """
        target = self.path("/etc/systemd/system") / unit.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if unit.resolve() != target.resolve():
            shutil.copyfile(unit, target)
        return self.run(["systemd-analyze", "verify", f"/etc/systemd/system/{unit.name}"], timeout=60)

    def install(self, wheel: Path) -> subprocess.CompletedProcess[str]:
        result = self.run([str(ROOT / "packaging" / "install"), "--wheel", str(wheel)], timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"packaging/install failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return result
