"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEBROOT = ROOT / ".venv" / "debroot"
"""Where tests/run extracts the Debian packages of clients the tests drive (cloud-init,
amazon-ec2-utils) with ``dpkg-deb -x``, instead of installing them on the machine."""


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on ``host`` at the time of the call."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, other) as check:
            try:
                check.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


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
