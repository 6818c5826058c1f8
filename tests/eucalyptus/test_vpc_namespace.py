"""VPC mode as on a node: metadata at 169.254.169.254:80, requests arriving from eucanetd's 255.x.y.z addresses.

Runs edge and its clients inside a network namespace the test creates (the
addresses exist only there), with the VPC fixture and eucanetd's intip map.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.eucalyptus.conftest import FIXTURES

ADDRESSES = ["255.0.0.10", "255.0.0.11", "255.0.0.20", "255.0.0.30", "255.0.0.99", "169.254.169.254"]


@pytest.fixture
def namespace():
    name = f"edge-euca-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for address in ADDRESSES:
            subprocess.run(["ip", "-n", name, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _in_namespace(namespace: str, code: str) -> str:
    result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_interfaces_are_identified_by_their_intip_address(namespace, tmp_path) -> None:
    gni = tmp_path / "global_network_info.xml"
    gni.write_bytes((FIXTURES / "gni-vpc.xml").read_bytes())
    intip = tmp_path / "eucanetd_intip_eni_map"
    intip.write_bytes((FIXTURES / "eucanetd_intip_eni_map").read_bytes())
    config = tmp_path / "edge.toml"
    config.write_text(f"""
workers = 1
[view]
source = "{gni}"
state_dir = "{tmp_path / 'state'}"
[metadata]
listen = ["169.254.169.254:80"]
[dns]
listen = ["169.254.169.254:53@vpc-00000001"]
[admin]
listen = "169.254.169.254:9169"
[eucalyptus]
dns_domain = "cloud.example"
intip_map_file = "{intip}"
""")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-m", "edge", "serve",
                               "--config", str(config)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        output = _in_namespace(namespace, """
            import socket, time
            def get(source, path):
                with socket.create_connection(("169.254.169.254", 80), timeout=3,
                                              source_address=(source, 0)) as c:
                    c.sendall(f"GET {path} HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nConnection: close\\r\\n\\r\\n".encode())
                    data = b""
                    while chunk := c.recv(65536):
                        data += chunk
                head, _, body = data.partition(b"\\r\\n\\r\\n")
                status = head.split()[1].decode()
                return status + " " + (body.decode() if status == "200" else "-")
            deadline = time.time() + 20
            while True:
                try:
                    get("255.0.0.10", "/latest/meta-data/instance-id")
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)
            for source in ("255.0.0.10", "255.0.0.11", "255.0.0.20", "255.0.0.30", "255.0.0.99"):
                print(source, get(source, "/latest/meta-data/instance-id"), get(source, "/latest/meta-data/mac"))
        """)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    lines = dict(line.split(" ", 1) for line in output.strip().splitlines())
    assert lines["255.0.0.10"] == "200 i-00000001 200 d0:0d:00:00:00:01"
    # The second interface of the same instance: its own MAC is the one it arrived through.
    assert lines["255.0.0.11"].startswith("200 i-00000001 ")
    assert lines["255.0.0.20"] == "200 i-00000002 200 d0:0d:00:00:00:02"  # mapped by instance id
    assert lines["255.0.0.30"] == "200 i-00000003 200 d0:0d:00:00:00:03"  # the other VPC, same private IP
    assert lines["255.0.0.99"].startswith("404")  # not in the map: not an instance
