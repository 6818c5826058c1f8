"""edge against an emulated Eucalyptus controller: path by path, through an outage, while it starts.

The controller is :mod:`tests.eucalyptus.emulator`, written from ``MetadataPipeline.java``,
``VmMetadata.java`` and ``VmInstanceMetadata.java`` (Corymbia/eucalyptus); the documents are the
EDGE and VPCMIDO fixtures (``gni-edge.xml``, ``gni-vpc.xml``) and the NetworkInfoTest document.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.eucalyptus.conftest import fixture_bytes, stop_edge
from tests.eucalyptus.emulator import ERROR_PAGE, STARTING, Cloud, Controller, get, records_from_gni, walk
from tests.support import free_port, wait_until

# The EDGE fixture on loopback: private 127.16.0.x, public 127.111.200.x, so that a test (and edge,
# asking the controller from the instance's own address) can speak as each instance.
# instanceDNSDomain as a 5.x controller publishes it (INSTANCE_SUBDOMAIN ".compute" + ".internal").
EDGE_GNI = (fixture_bytes("gni-edge.xml").replace(b"172.16.", b"127.16.").replace(b"10.111.200.", b"127.111.200.")
            .replace(b"<value>eucalyptus.internal</value>", b"<value>compute.internal</value>"))
EDGE_GNI_4X = EDGE_GNI.replace(b"<value>compute.internal</value>", b"<value>eucalyptus.internal</value>")
VPC_GNI = fixture_bytes("gni-vpc.xml").replace(b"<value>eucalyptus.internal</value>", b"<value>compute.internal</value>")
GROUP_NAMES = {"sg-c4d8e62e": "default", "sg-00000001": "web", "sg-00000009": "db"}
EXTRA_URIS = ("/", "/latest/meta-data/hostname/", "/latest/meta-data", "/latest/dynamic", "/2009-04-04/meta-data/mac",
              "/1.0/meta-data/local-ipv4", "/latest//meta-data//placement/availability-zone",
              "/latest/meta-data/nothing-here", "/latest/meta-data/public-keys", "/latest/user-data/")


def _controller(document: bytes, vpc: bool, cloud: Cloud | None = None) -> Controller:
    records = records_from_gni(document, GROUP_NAMES)
    for number, record in enumerate(records):
        record.launch_index = number
        record.reservation_id = f"r-0000000{number}"
        if number != 1:  # one instance was started without a key pair and without user-data
            record.key_name = f"key-{number}"
            record.public_key = f"ssh-rsa AAAAB3Nza{number} user@{record.id}"
            record.user_data = f"#cloud-config\nhostname: {record.id}\n".encode()
        if number == 2:
            record.kernel_id, record.ramdisk_id, record.monitoring = "eki-00000001", "eri-00000001", True
    controller = Controller(cloud or Cloud(vpc=vpc), records)
    controller.start()
    return controller


def _edge(tmp_path: Path, document: bytes, controller: Controller, identity: str, ttl: float = 60.0,
          version: str | None = None):
    cloud = controller.cloud
    gni = tmp_path / "global_network_info.xml"
    gni.write_bytes(document)
    ports = {"metadata": free_port(), "admin": free_port()}
    config = tmp_path / "edge.toml"
    config.write_text(f"""
workers = 1
[view]
source = "{gni}"
state_dir = "{tmp_path / 'state'}"
poll_interval = 0.2
[metadata]
listen = ["127.0.0.1:{ports['metadata']}"]
trusted_proxies = ["127.0.0.1/32"]
rate = 0.0
[dns]
listen = []
[admin]
listen = "127.0.0.1:{ports['admin']}"
[eucalyptus]
version = "{version or cloud.version}"
use_instance_dns = {str(cloud.use_instance_dns).lower()}
dns_domain = "{cloud.dns_domain}"
controller_url = "{controller.url}"
controller_identity = "{identity}"
controller_ttl = {ttl}
controller_timeout = 2.0
""")
    log = open(tmp_path / "edge.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "edge", "serve", "--config", str(config)], stderr=log)
    try:
        wait_until(lambda: get(ports["admin"], "/readyz")[0] == 200, timeout=30)
    except Exception:
        process.kill()
        raise
    return process, ports


def _metric(port: int, name: str, label: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name) and f'result="{label}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def edge_mode(tmp_path):
    controller = _controller(EDGE_GNI, vpc=False)
    process, ports = _edge(tmp_path, EDGE_GNI, controller, "source-address")
    yield controller, ports
    stop_edge(process)
    controller.kill()


@pytest.fixture
def vpc_mode(tmp_path):
    controller = _controller(VPC_GNI, vpc=True)
    process, ports = _edge(tmp_path, VPC_GNI, controller, "instance-id")
    yield controller, ports
    stop_edge(process)
    controller.kill()


def _compare(ask_controller, ask_edge) -> int:
    """Every URI the controller serves, walked from its listings, answered the same by edge."""
    served = walk(ask_controller)
    for uri in EXTRA_URIS:
        served[uri] = ask_controller(uri)
    differences = {}
    for uri, (status, body) in served.items():
        got = ask_edge(uri)
        # A 404 is a 404: the controller's page is its own XHTML, edge's is its own.
        if got[0] != status or (status == 200 and got[1] != body):
            differences[uri] = ((status, body[:120]), (got[0], got[1][:120]))
    assert differences == {}
    return len([s for s, _ in served.values() if s == 200])


def test_edge_mode_every_path_the_controller_serves_is_answered_identically(edge_mode) -> None:
    """EDGE: the controller identifies instances by source address (public first, then private); edge
    asks it from the instance's own address and answers the GNI's paths in its format itself."""
    controller, ports = edge_mode
    for record in controller.records.values():
        instance = record.private_ip
        served = _compare(lambda uri: get(controller.port, uri, source=instance),
                          lambda uri: get(ports["metadata"], uri, source=instance))
        assert served > 25
        # Nodes SNAT metadata traffic to the public address by default: the same answers from there.
        if record.public_ip != "0.0.0.0":
            public = record.public_ip
            assert get(ports["metadata"], "/latest/meta-data/instance-id", source=public) == (200, record.id.encode())
            assert get(ports["metadata"], "/latest/user-data", source=public) == \
                get(controller.port, "/latest/user-data", source=instance)
    assert get(ports["metadata"], "/latest/meta-data/public-ipv4", source="127.16.0.13") == (200, b"0.0.0.0")
    assert get(ports["metadata"], "/latest/meta-data/mac", source="127.16.0.11") == (200, b"D0:0D:AB:6B:40:9C")
    # Paths edge adds stay (the controller has no tokens).
    assert get(ports["metadata"], "/latest/meta-data/instance-id", source="127.16.0.11",
               headers={"X-aws-ec2-metadata-token": "bogus"})[0] == 401
    assert all(who != "127.0.0.1" for who, _ in controller.asked)  # never asked as itself


@pytest.mark.parametrize("version", ["4", "5"])
def test_with_instance_dns_hostnames_are_the_versions_names(tmp_path, version: str) -> None:
    """``use_instance_dns``: hostnames are VmInstances.dnsName names, 4.x ``euca-...eucalyptus``,
    5.x ``ip-``/``ec2-...compute``; every path still answered as the controller does."""
    cloud = Cloud(vpc=False, use_instance_dns=True, version=version)
    document = EDGE_GNI_4X if version == "4" else EDGE_GNI
    controller = _controller(document, vpc=False, cloud=cloud)
    process, ports = _edge(tmp_path, document, controller, "source-address", version="auto")
    try:
        for record in controller.records.values():
            _compare(lambda uri: get(controller.port, uri, source=record.private_ip),
                     lambda uri: get(ports["metadata"], uri, source=record.private_ip))
        expected = b"euca-127-16-0-11.eucalyptus.internal" if version == "4" else b"ip-127-16-0-11.compute.internal"
        assert get(ports["metadata"], "/latest/meta-data/hostname", source="127.16.0.11") == (200, expected)
        public = get(ports["metadata"], "/latest/meta-data/public-hostname", source="127.16.0.11")[1]
        assert public == (b"euca-127-111-200-1.eucalyptus.cloud.example" if version == "4"
                          else b"ec2-127-111-200-1.compute.cloud.example")
        assert get(ports["metadata"], "/latest/meta-data/public-hostname", source="127.16.0.13") == (200, b"")
    finally:
        stop_edge(process)
        controller.kill()


def test_vpcmido_every_path_the_controller_serves_is_answered_identically(vpc_mode) -> None:
    """VPCMIDO: from 127.0.0.1 with Euca-Instance-Id; the instance reaches edge through its VPC
    (here: a trusted proxy names the address and the VPC)."""
    controller, ports = vpc_mode
    for record in controller.records.values():
        nic = next(n for n in record.nics if n.device_index == 0)
        headers = {"X-Forwarded-For": nic.private_ip, "X-Edge-Network-Id": nic.vpc}
        served = _compare(lambda uri: get(controller.port, uri, headers={"Euca-Instance-Id": record.id}),
                          lambda uri: get(ports["metadata"], uri, headers=headers))
        assert served > 25
    secondary = "/latest/meta-data/network/interfaces/macs/d0:0d:00:00:00:11/device-number"
    assert get(ports["metadata"], secondary, headers={"X-Forwarded-For": "10.0.0.10",
                                                      "X-Edge-Network-Id": "vpc-00000001"}) == (200, b"1")


def test_the_controller_identifies_only_as_its_source_says(edge_mode, vpc_mode) -> None:
    """MetadataPipeline/VmMetadata: an instance id counts only from 127.0.0.1 and only in VPC mode; an
    address only in EDGE mode; X-Forwarded-For never."""
    edge_controller, _ = edge_mode
    vpc_controller, _ = vpc_mode
    assert get(edge_controller.port, "/latest/meta-data/instance-id", headers={"Euca-Instance-Id": "i-ab6b409c"}) \
        == (404, ERROR_PAGE)
    assert get(edge_controller.port, "/latest/meta-data/instance-id",
               headers={"X-Forwarded-For": "127.16.0.11"})[0] == 404
    assert get(edge_controller.port, "/latest/meta-data/instance-id", source="127.16.0.11") == (200, b"i-ab6b409c")
    assert get(vpc_controller.port, "/latest/meta-data/instance-id", source="127.0.0.2",
               headers={"Euca-Instance-Id": "i-00000001"})[0] == 404
    assert get(vpc_controller.port, "/latest/meta-data/instance-id",
               headers={"Euca-Instance-Id": "i-00000001"}) == (200, b"i-00000001")


def test_every_instance_keeps_its_user_data_and_keys_when_the_controller_dies(tmp_path) -> None:
    """Prefetch: instances that never asked get user-data and keys after the controller is gone, and
    well past the freshness of what was prefetched (served stale while the controller fails)."""
    controller = _controller(EDGE_GNI, vpc=False)
    process, ports = _edge(tmp_path, EDGE_GNI, controller, "source-address", ttl=0.5)
    try:
        _outage(controller, ports)
    finally:
        stop_edge(process)
        controller.kill()


def _outage(controller: Controller, ports: dict[str, int]) -> None:
    expected = {}
    for record in controller.records.values():
        for uri in ("/latest/user-data", "/latest/meta-data/public-keys/0/openssh-key", "/latest/meta-data/ami-id",
                    "/latest/dynamic/instance-identity/document", "/latest/meta-data/"):
            expected[(record.private_ip, uri)] = get(controller.port, uri, source=record.private_ip)
    wait_until(lambda: _metric(ports["admin"], "edge_metadata_fallback_total", "prefetched") >= len(controller.records),
               timeout=30)
    asked_before = {uri for _, uri in controller.asked}
    controller.kill()
    time.sleep(0.6)  # past controller_ttl: every cached answer is stale now
    for (address, uri), answer in expected.items():
        got = get(ports["metadata"], uri, source=address)
        if answer[0] == 200:
            assert got == answer, (address, uri)
        else:
            assert got[0] == 404, (address, uri)
    assert "/latest/user-data" in asked_before
    wait_until(lambda: _metric(ports["admin"], "edge_metadata_fallback_total", "failed") >= 1
               and _metric(ports["admin"], "edge_metadata_fallback_total", "stale") >= 1)


def test_still_starting_is_never_cached_or_served(tmp_path) -> None:
    """MetadataPipeline answers 200 "System is still starting up" for every path before bootstrap ends:
    edge neither caches nor serves it (the GNI's paths answer meanwhile), and asks again later."""
    controller = _controller(EDGE_GNI, vpc=False)
    controller.starting = True
    process, ports = _edge(tmp_path, EDGE_GNI, controller, "source-address")
    try:
        source = "127.16.0.11"
        assert get(controller.port, "/latest/meta-data/ami-id", source=source) == (200, STARTING)
        wait_until(lambda: _metric(ports["admin"], "edge_metadata_fallback_total", "starting") >= 1, timeout=30)
        for uri in ("/latest/meta-data/instance-id", "/latest/meta-data/instance-type", "/latest/user-data",
                    "/latest/meta-data/local-ipv4", "/latest/meta-data/"):
            assert get(ports["metadata"], uri, source=source)[1] != STARTING, uri
        assert get(ports["metadata"], "/latest/meta-data/instance-id", source=source) == (200, b"i-ab6b409c")
        controller.starting = False
        wait_until(lambda: get(ports["metadata"], "/latest/meta-data/instance-type", source=source)
                   == (200, b"m1.small"), timeout=60)
        assert get(ports["metadata"], "/latest/user-data", source=source) == \
            get(controller.port, "/latest/user-data", source=source)
    finally:
        stop_edge(process)
        controller.kill()


def test_a_gateway_restarted_during_the_outage_still_answers_what_the_controller_said(tmp_path) -> None:
    """Prefetched answers are kept in the state directory: edge restarted while the controller is
    gone still gives every instance its user-data and keys (IAM credentials are never kept)."""
    controller = _controller(EDGE_GNI, vpc=False)
    process, ports = _edge(tmp_path, EDGE_GNI, controller, "source-address")
    expected = {(r.private_ip, uri): get(controller.port, uri, source=r.private_ip)
                for r in controller.records.values()
                for uri in ("/latest/user-data", "/latest/meta-data/public-keys/0/openssh-key",
                            "/latest/meta-data/instance-type")}
    saved = tmp_path / "state" / "eucalyptus-controller-cache.json"
    try:
        wait_until(lambda: _metric(ports["admin"], "edge_metadata_fallback_total", "prefetched")
                   >= len(controller.records), timeout=30)
        wait_until(saved.exists, timeout=10)
        assert oct(saved.stat().st_mode & 0o777) == "0o600"
        controller.kill()
    finally:
        stop_edge(process)
    process, ports = _edge(tmp_path, EDGE_GNI, controller, "source-address")
    try:
        for (address, uri), answer in expected.items():
            got = get(ports["metadata"], uri, source=address)
            assert got == answer if answer[0] == 200 else got[0] == 404, (address, uri, got)
    finally:
        stop_edge(process)
