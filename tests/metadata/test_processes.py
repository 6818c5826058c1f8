"""Tokens across processes: one gateway's token verifies on another sharing the key file, and after a restart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from imds_harness import parse, request, token

from edge.metadata.tokens import generate_token_key_file

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


class Process:
    def __init__(self, state_dir: Path, key_file: Path | None = None, view: Path | None = None) -> None:
        argv = [sys.executable, str(ROOT / "bench" / "metadata_server.py"), "--limits", "default",
                "--state-dir", str(state_dir)]
        if key_file is not None:
            argv += ["--token-key-file", str(key_file)]
        if view is not None:
            argv += ["--view", str(view)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.child.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("port="):
            self.child.kill()
            errors = self.child.stderr.read()  # type: ignore[union-attr]
            pytest.fail(f"metadata process did not start: {line!r} {errors}")
        self.port = int(line.strip().split("=")[1])

    def stop(self) -> None:
        self.child.terminate()
        try:
            self.child.wait(5)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


@pytest.fixture
def processes():
    started: list[Process] = []

    def start(*args, **kwargs) -> Process:
        process = Process(*args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def read_with(port: int, value: str, source: str = "127.0.0.3") -> int:
    return parse(request(port, "GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": value},
                         source))[0]


def test_token_from_one_gateway_verifies_on_another_and_after_restart(processes, tmp_path):
    keys = generate_token_key_file(tmp_path / "fleet-keys")
    first = processes(tmp_path / "a", keys)
    second = processes(tmp_path / "b", keys)
    value = token(first.port, source="127.0.0.3")
    assert read_with(second.port, value) == 200
    assert read_with(second.port, value, source="127.0.0.4") == 401  # bound to the instance
    first.stop()
    restarted = processes(tmp_path / "a", keys)
    assert read_with(restarted.port, value) == 200
    # A gateway with other keys does not accept it.
    stranger = processes(tmp_path / "c", generate_token_key_file(tmp_path / "other-keys"))
    assert read_with(stranger.port, value) == 401


def test_rotation_across_gateways(processes, tmp_path):
    keys = generate_token_key_file(tmp_path / "keys")
    old = processes(tmp_path / "a", keys)
    old_token = token(old.port, source="127.0.0.3")
    rotated_file = tmp_path / "rotated"
    rotated_file.write_bytes(keys.read_bytes())
    generate_token_key_file(rotated_file, add=True)
    rotated = processes(tmp_path / "b", rotated_file)
    assert read_with(rotated.port, old_token) == 200
    new_token = token(rotated.port, source="127.0.0.3")
    assert read_with(old.port, new_token) == 401


def test_zero_configuration_keys_survive_restart(processes, tmp_path):
    first = processes(tmp_path / "state")
    value = token(first.port, source="127.0.0.3")
    assert (tmp_path / "state" / "token-keys").stat().st_mode & 0o777 == 0o600
    first.stop()
    again = processes(tmp_path / "state")
    assert read_with(again.port, value) == 200
