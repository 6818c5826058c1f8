"""Eucalyptus' DNS rules, asked of a real edge serving a GNI, over UDP, from sources in and out of the cloud.

Each answer is compared with what the controller's resolvers give (``tests/eucalyptus/dns_model.py``,
written from ``SplitHorizonResolver.java``, ``InstanceDataDnsResolver.java``,
``RecursiveDnsResolver.java`` and ``DnsResolvers.java`` in Corymbia/eucalyptus; 4.x's
``cluster-manager/.../vm/dns/SplitHorizonResolver.java`` in eucalyptus/eucalyptus has the same rules).  Askers are loopback
addresses: instances by their public address (as EDGE nodes SNAT them) or, in cluster "two" of the
fixture, by their private one; VPC instances by their intip address, with ``MIDO_MD_CIDR`` moved
onto loopback.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.reversename
import pytest

from tests.dns.conftest import Dnsmasq
from tests.eucalyptus.conftest import fixture_bytes, stop_edge
from tests.eucalyptus.dns_model import ControllerDns, Vm
from tests.support import free_port, wait_until

TWO_CLUSTERS = fixture_bytes("gni-edge-two-clusters.xml")

# i-a1 and i-a2 in cluster "one" (172.16.0.0/24, RFC 1918), i-b1 and i-b2 in cluster "two" (127.17.0.0/24).
EDGE_CONTROLLER = ControllerDns(
    vms=[Vm("172.16.0.11", "127.111.200.1"), Vm("172.16.0.12", "127.111.200.2"),
         Vm("127.17.0.21", "127.111.200.3"), Vm("127.17.0.22")],
    cluster_subnets=["172.16.0.0/24", "127.17.0.0/24"])

A1, A2, B1 = "127.111.200.1", "127.111.200.2", "127.111.200.3"
"""Instances asking from their public addresses."""
B2 = "127.17.0.22"
"""An instance without a public address, asking from its private address."""
OUTSIDER = "127.0.0.1"
"""Not an instance, not in any cluster subnet."""


class Server:
    def __init__(self, tmp_path: Path, document: bytes, *, intip: bytes | None = None, upstream: str = "",
                 extra: str = "") -> None:
        gni = tmp_path / "global_network_info.xml"
        gni.write_bytes(document)
        self.port, admin = free_port(), free_port()
        lines = ['dns_domain = "cloud.example"', "prefetch = false", extra]
        if intip is not None:
            (tmp_path / "intip").write_bytes(intip)
            lines.append(f'intip_map_file = "{tmp_path / "intip"}"')
        upstreams = f'upstreams = ["{upstream}"]' if upstream else ""
        config = tmp_path / "edge.toml"
        config.write_text(f"""
workers = 1
[view]
source = "{gni}"
state_dir = "{tmp_path / 'state'}"
[metadata]
listen = ["127.0.0.1:{free_port()}"]
[dns]
listen = ["127.0.0.1:{self.port}"]
{upstreams}
[admin]
listen = "127.0.0.1:{admin}"
[eucalyptus]
""" + "\n".join(lines) + "\n")
        self.log = open(tmp_path / "edge.log", "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "edge", "serve", "--config", str(config)],
                                        stderr=self.log)
        wait_until(self._ready, timeout=30)

    def _ready(self) -> bool:
        assert self.process.poll() is None, Path(self.log.name).read_text()
        try:
            return self.ask(OUTSIDER, "254.169.254.169.in-addr.arpa", "PTR").rcode() == dns.rcode.NOERROR
        except (OSError, dns.exception.Timeout):
            return False

    def ask(self, source: str, name: str, rdtype: str = "A") -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=self.port, timeout=3,
                             source=source)

    def close(self) -> None:
        try:
            stop_edge(self.process)
        finally:
            self.log.close()


def _answer(message: dns.message.Message) -> tuple[str, list[str]]:
    values = [r.to_text().rstrip(".") for rrset in message.answer for r in rrset]
    return dns.rcode.to_text(message.rcode()), values


@pytest.fixture
def upstream() -> Iterator[Dnsmasq]:
    # What the recursive side answers for the non-RFC 1918 cluster's reverse space.
    server = Dnsmasq("--ptr-record=21.0.17.127.in-addr.arpa,owner.upstream.test",
                     "--ptr-record=22.0.17.127.in-addr.arpa,owner.upstream.test")
    yield server
    server.stop()


@pytest.fixture
def edge_cloud(tmp_path, upstream) -> Iterator[Server]:
    server = Server(tmp_path, TWO_CLUSTERS, upstream=upstream.address)
    yield server
    server.close()


def _public_name(address: str) -> str:
    return f"ec2-{address.replace('.', '-')}.compute.cloud.example"


@pytest.mark.parametrize("source, target, expected", [
    (A1, A2, "172.16.0.12"),     # same cluster subnet: the private address
    (A1, A1, "172.16.0.11"),     # its own name
    (A1, B1, B1),                # another cluster's instance: the public address
    (B2, B1, "127.17.0.21"),     # asking from its private address, same subnet
    (B2, A1, A1),
    (B1, A2, A2),
    (OUTSIDER, A1, A1),          # not an instance
    ("127.17.0.99", B1, B1),     # inside cluster two's subnet, but no instance there
])
def test_public_names_are_split_by_the_askers_cluster_subnet(edge_cloud: Server, source: str, target: str,
                                                             expected: str) -> None:
    """SplitHorizonResolver.java (HorizonARecordResolver, ExternalARecordResolver, lookupNetwork): in EDGE
    mode the private address goes only to instances whose cluster subnet holds the named instance."""
    name = _public_name(target)
    reply = edge_cloud.ask(source, name)
    assert _answer(reply) == ("NOERROR", [expected]) == EDGE_CONTROLLER.a(source, name)
    assert reply.flags & dns.flags.AA


@pytest.mark.parametrize("source", [A1, B2, OUTSIDER])
@pytest.mark.parametrize("address", ["172.16.0.12", "127.17.0.21", "127.111.200.3"])
def test_private_ptrs_only_for_rfc1918_addresses(edge_cloud: Server, source: str, address: str) -> None:
    """SplitHorizonResolver.java (lookupRecords, PTR): a private address gets its PTR only when it is
    RFC 1918 (``isSiteLocalAddress``); a public address always does."""
    name = dns.reversename.from_address(address).to_text()
    rcode, values = _answer(edge_cloud.ask(source, name, "PTR"))
    controller = EDGE_CONTROLLER.ptr(source, address)
    if controller[0] == "NOERROR":
        # InstanceDomainNames.fromInetAddress writes "euca-" names whatever the version: edge answers
        # the instance's own name, the one that resolves forward (ip- / ec2- in 5.x).
        assert (rcode, [v.replace("ip-", "euca-", 1).replace("ec2-", "euca-", 1) for v in values]) == controller
    elif source == OUTSIDER:
        assert (rcode, values) == ("REFUSED", [])  # not local, and no recursion for this asker
    else:
        # 127.17.0.21 is a private address outside RFC 1918: not a local name.  The controller's
        # resolvers take it and none answers (SERVFAIL); edge asks the upstream that owns the space.
        assert controller == ("SERVFAIL", [])
        assert (rcode, values) == ("NOERROR", ["owner.upstream.test"])


@pytest.mark.parametrize("name", ["instance-data", "instance-data.internal", "instance-data.eucalyptus.internal",
                                  "instance-data.compute.internal", "www.upstream.test.internal"])
@pytest.mark.parametrize("source", [A1, B2, OUTSIDER])
def test_instance_data_only_to_instances(edge_cloud: Server, name: str, source: str) -> None:
    """InstanceDataDnsResolver.java: only system-managed sources (here: instances) get instance-data;
    others are refused the bare name (RecursiveDnsResolver.java refuses them) and get NXDOMAIN under
    internal., for which the controller is authoritative (DomainNames.java)."""
    reply = edge_cloud.ask(source, name)
    assert _answer(reply) == EDGE_CONTROLLER.a(source, name)


@pytest.mark.parametrize("source", [A1, OUTSIDER])
def test_the_metadata_address_ptr_is_for_everyone(edge_cloud: Server, source: str) -> None:
    """InstanceDataDnsResolver.java: the PTR of 169.254.169.254 has no source check."""
    reply = edge_cloud.ask(source, "254.169.254.169.in-addr.arpa", "PTR")
    assert _answer(reply) == ("NOERROR", ["instance-data"]) == EDGE_CONTROLLER.ptr(source, "169.254.169.254")


# -- VPCMIDO: DNS at 169.254.169.253 sees VPC instances by their intip address ---------------------

VPC_MAP = fixture_bytes("eucanetd_intip_eni_map").replace(b"255.0.0.", b"127.254.0.")
IN_VPC_1, ALSO_VPC_1, IN_VPC_2 = "127.254.0.10", "127.254.0.20", "127.254.0.30"
"""eni-00000001 and i-00000002 (vpc-00000001), eni-00000003 (vpc-00000002, same 10.0.0.10 address)."""


@pytest.fixture
def vpc_cloud(tmp_path) -> Iterator[Server]:
    server = Server(tmp_path, fixture_bytes("gni-vpc.xml"), intip=VPC_MAP,
                    extra='mido_md_cidr = "127.254.0.0/16"')
    yield server
    server.close()


@pytest.mark.parametrize("source, name, rdtype, expected", [
    # A VPC's private names and PTRs resolve inside it, and only there (overlapping addresses kept apart).
    (IN_VPC_1, "euca-10-0-0-20.eucalyptus.internal", "A", ("NOERROR", ["10.0.0.20"])),
    (ALSO_VPC_1, "euca-10-0-0-11.eucalyptus.internal", "A", ("NOERROR", ["10.0.0.11"])),
    (IN_VPC_2, "euca-10-0-0-20.eucalyptus.internal", "A", ("NXDOMAIN", [])),
    (IN_VPC_1, "20.0.0.10.in-addr.arpa", "PTR", ("NOERROR", ["euca-10-0-0-20.eucalyptus.internal"])),
    (IN_VPC_2, "20.0.0.10.in-addr.arpa", "PTR", ("NXDOMAIN", [])),
    # A public name: the private address inside its own VPC, the public one elsewhere.
    (IN_VPC_1, "euca-2-0-0-1.eucalyptus.cloud.example", "A", ("NOERROR", ["10.0.0.10"])),
    (IN_VPC_2, "euca-2-0-0-1.eucalyptus.cloud.example", "A", ("NOERROR", ["2.0.0.1"])),
    (IN_VPC_2, "euca-2-0-0-3.eucalyptus.cloud.example", "A", ("NOERROR", ["10.0.0.10"])),
    (OUTSIDER, "euca-2-0-0-1.eucalyptus.cloud.example", "A", ("NOERROR", ["2.0.0.1"])),
    # Instances get instance-data; the host itself is no instance.
    (IN_VPC_2, "instance-data.eucalyptus.internal", "A", ("NOERROR", ["169.254.169.254"])),
    (OUTSIDER, "instance-data.eucalyptus.internal", "A", ("NXDOMAIN", [])),
    (OUTSIDER, "euca-10-0-0-20.eucalyptus.internal", "A", ("NXDOMAIN", [])),
])
def test_vpc_questions_from_intip_addresses_get_their_vpcs_horizon(vpc_cloud: Server, source: str, name: str,
                                                                   rdtype: str, expected: tuple[str, list[str]]) -> None:
    """eucanetd sends a VPC instance's traffic to 169.254.169.253 from its intip address (``MIDO_MD_CIDR``,
    ``eucanetd_intip_eni_map``), on a listener of no network: the answer is that of its VPC, as the
    controller's SplitHorizonResolver.java answers by the instance's VPC CIDR."""
    assert _answer(vpc_cloud.ask(source, name, rdtype)) == expected
