"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import free_port

__all__ = ["DEBROOT", "cloud_init_pythonpath", "extracted_client", "free_port", "serve_argv", "stop_session",
           "wait_until"]

ROOT = Path(__file__).resolve().parents[1]
DEBROOT = ROOT / ".venv" / "debroot"
"""Where tests/run extracts the Debian packages of clients the tests drive (cloud-init,
amazon-ec2-utils) with ``dpkg-deb -x``, instead of installing them on the machine."""


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception as exc:  # the server may not be listening yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_error!r})")


def process_gone(pid: int) -> bool:
    """Has ``pid`` exited? A zombie has: the session adopts orphans (tests/leaks.py) and reaps them
    only at the end, so an exited grandchild stays visible as a zombie until then."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def serve_argv(state_dir: Path, *, metadata_port: int, dns_port: int, admin_port: int, view: str = "demo",
               workers: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    """``edge serve`` as operators run it, on loopback ports and a state directory of the test's own."""
    return [sys.executable, "-m", "edge", "serve", "--view", view, "--workers", str(workers),
            "--state-dir", str(state_dir), "--metadata-listen", f"127.0.0.1:{metadata_port}",
            "--dns-listen", f"127.0.0.1:{dns_port}", "--admin-listen", f"127.0.0.1:{admin_port}", *extra]


def stop_session(process: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM and up to 20 s for a clean
    exit, then SIGKILL to its whole session, so no worker it forked outlives the test."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def extracted_client(name: str) -> Path | None:
    """The executable ``name`` from a Debian package extracted into ``.venv/debroot``, or None."""
    for directory in ("usr/bin", "usr/sbin", "bin", "sbin"):
        path = DEBROOT / directory / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def cloud_init_pythonpath() -> str | None:
    """``PYTHONPATH`` under which this venv's Python imports the extracted cloud-init, or None.

    cloud-init's own dependencies (PyYAML, requests, configobj) come from the
    ``test`` extra; run it as ``sys.executable`` with this in the environment.
    """
    packages = DEBROOT / "usr" / "lib" / "python3" / "dist-packages"
    return str(packages) if (packages / "cloudinit").is_dir() else None
