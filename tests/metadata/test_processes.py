"""Tokens across processes: one gateway's token verifies on another sharing the key file, and after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from imds_harness import parse, request, token

from bench.common import start_metadata_server, stop
from edge.metadata.tokens import generate_token_key_file


class Process:
    def __init__(self, state_dir: Path, key_file: Path | None = None, view: Path | None = None) -> None:
        args = ["--limits", "default", "--state-dir", str(state_dir)]
        if key_file is not None:
            args += ["--token-key-file", str(key_file)]
        if view is not None:
            args += ["--view", str(view)]
        log = state_dir.parent / f"{state_dir.name}.log"
        with open(log, "w") as output:
            try:
                self.child, self.port = start_metadata_server(*args, stderr=output)
            except RuntimeError as exc:
                pytest.fail(f"{exc}: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        stop(self.child, timeout=5)


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
