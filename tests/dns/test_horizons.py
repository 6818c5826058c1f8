"""Horizons narrowed by the view: the answer is a pure function of (snapshot, listener network, source, question).

A plain ``edge-view/1`` document (no adapter) with ``cloud.public_name_horizon``,
``cloud.private_ptrs``, ``dns_records[].audience`` and ``metadata_sources``, asked through
:meth:`Engine.answer` with query bytes, as the listeners ask it.
"""

from __future__ import annotations

from typing import Any

import dns.message
import dns.rcode
import dns.reversename
import pytest

from edge.config import DnsConfig
from edge.dns.acl import RecursionPolicy
from edge.dns.engine import Engine, Forward
from edge.dns.forwarder import Forwarder
from edge.dns.zonedata import make_preparer
from edge.errors import ViewInvalid
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot


def _interface(number: int, private: str, public: str | None = None, network: str = "",
               sources: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"id": f"eni-{number}", "mac": f"02:00:00:00:00:{number:02x}", "private_ips": [private],
            "public_ip": public, "network": network, "metadata_sources": list(sources)}


def _document(**cloud: Any) -> dict[str, Any]:
    return {
        "format": "edge-view/1", "serial": 1,
        "cloud": {"internal_domain": "in.test", "public_domain": "pub.test", "upstream_resolvers": ["192.0.2.53"],
                  "dns_records": [{"name": "meta.in.test", "type": "A", "value": "169.254.169.254",
                                   "audience": "instances"},
                                  {"name": "only-instances.test", "type": "A", "value": "192.0.2.1",
                                   "audience": "instances"},
                                  {"name": "open.in.test", "type": "TXT", "value": "everyone"}],
                  **cloud},
        "networks": [{"id": "", "cidrs": ["10.1.0.0/24", "10.2.0.0/24", "100.64.0.0/24"]},
                     {"id": "vpc-a", "cidrs": ["10.9.0.0/16"]}],
        "instances": [
            {"id": "i-1", "interfaces": [_interface(1, "10.1.0.1", "198.51.100.1")]},
            {"id": "i-2", "interfaces": [_interface(2, "10.1.0.2", "198.51.100.2")]},
            {"id": "i-3", "interfaces": [_interface(3, "10.2.0.3", "198.51.100.3")]},
            {"id": "i-4", "interfaces": [_interface(4, "100.64.0.4")]},
            {"id": "i-9", "interfaces": [_interface(9, "10.9.0.9", "198.51.100.9", "vpc-a", ("203.0.113.9",))]},
        ],
    }


def _ask(cloud: dict[str, Any], source: str, name: str, rdtype: str = "A",
         network: str = "") -> tuple[str, list[str]] | str:
    snapshot = build_snapshot(parse_view(_document(**cloud)), [make_preparer()])
    config = DnsConfig()
    engine = Engine(config, Forwarder(config), RecursionPolicy())
    reply = engine.answer(dns.message.make_query(name, rdtype).to_wire(), snapshot, network, source, 0.0)
    if isinstance(reply, Forward):
        return "forwarded"
    assert reply is not None
    message = dns.message.from_wire(reply)
    return dns.rcode.to_text(message.rcode()), [r.to_text() for rrset in message.answer for r in rrset]


CIDR = {"public_name_horizon": "cidr"}


@pytest.mark.parametrize("cloud, source, expected", [
    ({}, "10.1.0.1", ["10.1.0.2"]),              # by network: every asker in the flat network
    ({}, "10.2.0.3", ["10.1.0.2"]),
    ({}, "192.0.2.7", ["10.1.0.2"]),
    (CIDR, "10.1.0.1", ["10.1.0.2"]),            # by CIDR: an instance of the same CIDR
    (CIDR, "198.51.100.1", ["198.51.100.2"]),    # a public address is not a metadata source here
    (CIDR, "10.2.0.3", ["198.51.100.2"]),        # another CIDR
    (CIDR, "10.1.0.77", ["198.51.100.2"]),       # in the CIDR, but not an instance
])
def test_public_name_horizon(cloud: dict[str, Any], source: str, expected: list[str]) -> None:
    assert _ask(cloud, source, "ec2-198-51-100-2.pub.test") == ("NOERROR", expected)


@pytest.mark.parametrize("cloud, address, expected", [
    ({}, "100.64.0.4", ("NOERROR", ["ip-100-64-0-4.in.test."])),
    ({"private_ptrs": "rfc1918"}, "100.64.0.4", "forwarded"),   # not local: the instance may recurse
    ({"private_ptrs": "rfc1918"}, "10.1.0.2", ("NOERROR", ["ip-10-1-0-2.in.test."])),
    ({"private_ptrs": "rfc1918"}, "198.51.100.2", ("NOERROR", ["ec2-198-51-100-2.pub.test."])),
])
def test_private_ptrs(cloud: dict[str, Any], address: str, expected: object) -> None:
    name = dns.reversename.from_address(address).to_text()
    assert _ask(cloud, "10.1.0.1", name, "PTR") == expected


@pytest.mark.parametrize("source, name, expected", [
    ("10.1.0.1", "meta.in.test", ("NOERROR", ["169.254.169.254"])),
    ("192.0.2.7", "meta.in.test", ("NXDOMAIN", [])),              # under a zone everyone sees
    ("10.1.0.1", "only-instances.test", ("NOERROR", ["192.0.2.1"])),
    ("192.0.2.7", "only-instances.test", ("REFUSED", [])),        # a zone only instances see
    ("192.0.2.7", "open.in.test", ("NOERROR", ['"everyone"'])),
])
def test_records_for_instances_only(source: str, name: str, expected: tuple[str, list[str]]) -> None:
    assert _ask({}, source, name, "TXT" if name.startswith("open") else "A") == expected


@pytest.mark.parametrize("source, name, expected", [
    ("203.0.113.9", "ip-10-9-0-9.in.test", ("NOERROR", ["10.9.0.9"])),
    ("203.0.113.9", "ec2-198-51-100-9.pub.test", ("NOERROR", ["10.9.0.9"])),
    ("203.0.113.9", "ec2-198-51-100-2.pub.test", ("NOERROR", ["198.51.100.2"])),
    ("203.0.113.9", "ip-10-1-0-2.in.test", ("NXDOMAIN", [])),
    ("10.1.0.1", "ip-10-9-0-9.in.test", ("NXDOMAIN", [])),
])
def test_a_metadata_source_asks_in_its_interfaces_network(source: str, name: str,
                                                          expected: tuple[str, list[str]]) -> None:
    """On a flat-network listener, a proxy's address for an interface (``metadata_sources``) asks as that
    interface, in its network: the same answers as from a listener bound to that network."""
    assert _ask({}, source, name) == expected
    if expected[0] == "NOERROR" and source == "203.0.113.9":
        assert _ask({}, "10.9.0.9", name, network="vpc-a") == expected


@pytest.mark.parametrize("cloud", [{"public_name_horizon": "subnet"}, {"private_ptrs": "none"}])
def test_unknown_option_values_reject_the_view(cloud: dict[str, Any]) -> None:
    with pytest.raises(ViewInvalid):
        parse_view(_document(**cloud))
    with pytest.raises(ViewInvalid):
        parse_view({**_document(), "cloud": {"dns_records": [{"name": "a.test", "type": "A", "value": "192.0.2.1",
                                                                 "audience": "some"}]}})
