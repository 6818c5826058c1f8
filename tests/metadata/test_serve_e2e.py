"""``edge serve`` as a subprocess: a view file, an unknown instance found by refresh, SIGHUP, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from imds_harness import add_instance, demo, parse, request, token

from edge.metadata.tokens import generate_token_key_file
from tests.support import free_port

ROOT = Path(__file__).parent.parent.parent


def wait_for(port: int, child: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            pytest.fail(f"edge serve exited with {child.returncode}: {child.stderr.read()}")  # type: ignore[union-attr]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail("edge serve did not start listening")


@pytest.fixture
def edge_serve(tmp_path):
    children: list[subprocess.Popen] = []

    def run(view: Path, config: str = "", key_file: Path | None = None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        config_path = tmp_path / "edge.toml"
        config_path.write_text(config)
        argv = [sys.executable, "-m", "edge", "serve", "--config", str(config_path), "--view", str(view),
                "--metadata-listen", f"127.0.0.1:{port}", "--dns-listen", f"127.0.0.1:{free_port()}",
                "--admin-listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
                "--poll-interval", "60", "--workers", "1"]
        if key_file is not None:
            argv += ["--token-key-file", str(key_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        children.append(child)
        wait_for(port, child)
        return child, port

    yield run
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_edge_serve_end_to_end(edge_serve, tmp_path):
    document = demo()
    view = tmp_path / "view.json"
    view.write_text(json.dumps(document))
    script = tmp_path / "creds.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        print(json.dumps({"Version": 1, "AccessKeyId": "AKIA" + sys.argv[1][-4:], "SecretAccessKey": "s",
                          "SessionToken": "t", "Expiration": "2999-01-01T00:00:00Z"}))
    """))
    keys = generate_token_key_file(tmp_path / "keys")
    config = f"""
[metadata]
unknown_source_wait = 5.0

[metadata.credentials]
kind = "process"
command = [{json.dumps(sys.executable)}, {json.dumps(str(script))}, "{{instance_id}}"]
"""
    child, port = edge_serve(view, config, keys)

    status, _, body = parse(request(port, "GET", "/latest/meta-data/iam/security-credentials/demo-role"))
    assert status == 200 and json.loads(body)["AccessKeyId"] == "AKIA0001"
    value = token(port, source="127.0.0.3")
    assert parse(request(port, "GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": value},
                         "127.0.0.3"))[2] == b"i-0de0000000000003"

    # An instance that booted after the last poll: the request makes edge poll the view file now.
    view.write_text(json.dumps(add_instance(document, 9, "127.0.0.9")))
    begun = time.monotonic()
    status, _, body = parse(request(port, "GET", "/latest/meta-data/instance-id", source="127.0.0.9"))
    assert (status, body) == (200, b"i-0ad0000000000009")
    assert time.monotonic() - begun < 5

    # SIGHUP with a rotated key file: old tokens still verify, new ones come from the new key.
    generate_token_key_file(keys, add=True)
    child.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and token(port, source="127.0.0.3")[:6] == value[:6]:
        time.sleep(0.1)
    assert token(port, source="127.0.0.3")[:6] != value[:6]
    assert parse(request(port, "GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": value},
                         "127.0.0.3"))[0] == 200

    child.send_signal(signal.SIGTERM)
    assert child.wait(15) == 0
