"""A Eucalyptus node run by edge: the GNI as the view, the controller behind a cache, names for instances."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.eucalyptus.conftest import fixture_bytes, stop_edge
from tests.support import free_port, wait_until

# The EDGE fixture with its instances moved onto loopback, so tests can speak as each of them.
LOOPBACK_GNI = (fixture_bytes("gni-edge.xml").replace(b"172.16.", b"127.16.")
                .replace(b'version="3f2a9c1b"', b'version="1oopback"'))


def _get(port: int, path: str, source: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as connection:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
def node(tmp_path, controller):
    gni = tmp_path / "global_network_info.xml"
    gni.write_bytes(LOOPBACK_GNI)
    controller.add("i-ab6b409c", "127.16.0.11")
    controller.add("i-0c1d2e3f", "127.16.0.12")
    ports = {name: free_port() for name in ("metadata", "dns", "admin")}
    config = tmp_path / "edge.toml"
    config.write_text(f"""
workers = 1
[view]
source = "{gni}"
state_dir = "{tmp_path / 'state'}"
poll_interval = 0.2
[metadata]
listen = ["127.0.0.1:{ports['metadata']}"]
[dns]
listen = ["127.0.0.1:{ports['dns']}"]
[admin]
listen = "127.0.0.1:{ports['admin']}"
[eucalyptus]
version = "4"
dns_domain = "cloud.example"
# These tests count the controller's requests: prefetching has its own (tests/eucalyptus/test_emulated.py).
prefetch = false
controller_url = "{controller.url}"
controller_ttl = 0.5
controller_stale_if_error = 3600.0
controller_timeout = 1.0
""")
    log = open(tmp_path / "edge.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "edge", "serve", "--config", str(config)], stderr=log)
    state = {"process": process, "ports": ports, "gni": gni, "log": log, "controller": controller}
    wait_until(lambda: _get(ports["admin"], "/readyz", "127.0.0.1")[0] == 200, timeout=20)
    yield state
    stop_edge(process)


def _query(port: int, name: str, rdtype: str, source: str = "127.16.0.11") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=3, source=source)


def test_every_instance_answers_metadata_from_the_view(node) -> None:
    port = node["ports"]["metadata"]
    for address, instance_id in (("127.16.0.11", "i-ab6b409c"), ("127.16.0.12", "i-0c1d2e3f"),
                                 ("127.16.0.13", "i-77aa88bb")):
        status, body = _get(port, "/latest/meta-data/local-ipv4", address)
        assert (status, body) == (200, address.encode())
        # The controller's own view of instance-id agrees with the GNI (or the view answers when it lacks one).
        assert _get(port, "/latest/meta-data/instance-id", address) == (200, instance_id.encode())


def test_instance_names_and_instance_data_in_dns(node) -> None:
    port = node["ports"]["dns"]
    answer = _query(port, "euca-127-16-0-12.eucalyptus.internal", "A")
    assert [r.to_text() for r in answer.answer[0]] == ["127.16.0.12"]
    answer = _query(port, "instance-data", "A")
    assert [r.to_text() for r in answer.answer[0]] == ["169.254.169.254"]
    answer = _query(port, "instance-data.eucalyptus.internal", "A")
    assert [r.to_text() for r in answer.answer[0]] == ["169.254.169.254"]
    # Split horizon: inside the flat network the public name answers the private address.
    answer = _query(port, "euca-10-111-200-1.eucalyptus.cloud.example", "A")
    assert [r.to_text() for r in answer.answer[0]] == ["127.16.0.11"]
    # InstanceDataDnsResolver.java: the metadata address's PTR is instance-data.
    answer = _query(port, "254.169.254.169.in-addr.arpa", "PTR")
    assert [r.to_text() for r in answer.answer[0]] == ["instance-data."]
    answer = _query(port, "instance-data.internal", "A")
    assert [r.to_text() for r in answer.answer[0]] == ["169.254.169.254"]
    # SplitHorizonResolver.java: private PTRs only for RFC 1918 addresses, which 127.16.0.12 is not
    # (tests/eucalyptus/test_dns_rules.py has the RFC 1918 side): not a local name, never answered.
    answer = _query(port, "12.0.16.127.in-addr.arpa", "PTR")
    assert answer.answer == [] and not answer.flags & dns.flags.AA


def test_a_changed_gni_version_is_picked_up(node) -> None:
    gni: Path = node["gni"]
    changed = LOOPBACK_GNI.replace(b'version="1oopback"', b'version="2changed"').replace(
        b"<privateIp>127.16.0.13</privateIp>", b"<privateIp>127.16.0.14</privateIp>")
    temporary = gni.with_suffix(".tmp")
    temporary.write_bytes(changed)
    os.replace(temporary, gni)
    port = node["ports"]["metadata"]
    wait_until(lambda: _get(port, "/latest/meta-data/local-ipv4", "127.16.0.14") == (200, b"127.16.0.14"),
               timeout=10)
    import json
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{node['ports']['admin']}/view", timeout=3) as response:
        assert json.loads(response.read())["version"] == "2changed"


def test_controller_only_paths_are_cached_and_served_through_an_outage(node) -> None:
    port, controller = node["ports"]["metadata"], node["controller"]
    source = "127.16.0.11"
    assert _get(port, "/latest/meta-data/ami-id", source) == (200, b"emi-409c0000")
    assert _get(port, "/latest/meta-data/instance-type", source) == (200, b"m1.small")
    assert _get(port, "/latest/meta-data/public-keys/0/openssh-key", source) == (200, b"ssh-rsa AAAA409c admin")
    status, body = _get(port, "/latest/user-data", source)
    assert (status, body) == (200, b"#!/bin/sh\necho i-ab6b409c\n")
    # The controller saw each path once, on the instance's behalf.
    assert ("i-ab6b409c", "latest/meta-data/ami-id") in controller.requests
    asked = len(controller.requests)
    for _ in range(5):
        assert _get(port, "/latest/meta-data/ami-id", source)[0] == 200
    assert len(controller.requests) <= asked + 1  # cached (ttl 0.5 s): at most one refresh meanwhile

    controller.down = True  # the controller fails (503)...
    time.sleep(0.6)  # past the ttl: every answer is now stale
    assert _get(port, "/latest/meta-data/ami-id", source) == (200, b"emi-409c0000")
    controller.down, controller.delay = False, 3.0  # ...then hangs past the timeout
    time.sleep(0.6)
    started = time.monotonic()
    assert _get(port, "/latest/user-data", source) == (200, b"#!/bin/sh\necho i-ab6b409c\n")
    assert _get(port, "/latest/meta-data/public-keys/0/openssh-key", source) == (200, b"ssh-rsa AAAA409c admin")
    assert time.monotonic() - started < 5
    # Never asked before the outage: what the view knows still answers, the rest is 404.
    assert _get(port, "/latest/meta-data/local-ipv4", "127.16.0.12") == (200, b"127.16.0.12")
    assert _get(port, "/latest/meta-data/instance-type", "127.16.0.12")[0] == 404


def test_imdsv2_tokens_stay_edges_own_with_a_controller(node) -> None:
    port = node["ports"]["metadata"]
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.16.0.11", 0)) as connection:
        connection.sendall(b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n"
                           b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    token = data.partition(b"\r\n\r\n")[2].decode()
    assert data.startswith(b"HTTP/1.1 200") and len(token) > 20
    status, body = _get(port, "/latest/meta-data/ami-id", "127.16.0.11", {"X-aws-ec2-metadata-token": token})
    assert (status, body) == (200, b"emi-409c0000")
    assert _get(port, "/latest/meta-data/ami-id", "127.16.0.11", {"X-aws-ec2-metadata-token": "bogus"})[0] == 401
    assert not any("api/token" in path for _, path in node["controller"].requests)
