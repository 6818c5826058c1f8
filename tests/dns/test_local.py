"""Authoritative answers over real sockets: names, reverse, split horizon, zone apex, negative answers."""

from __future__ import annotations

import copy

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from tests.dns.conftest import dig

INSTANCE = "127.0.0.1"
STRANGER = "127.0.0.9"


def ask(port: int, name: str, rtype: str = "A", source: str = INSTANCE, tcp: bool = False,
        **kwargs: object) -> dns.message.Message:
    query = dns.message.make_query(name, rtype, **kwargs)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=3, source=source)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=3, source=source)


def test_private_name_answers_private_address_authoritatively(edge):
    result = dig(edge.port, "ip-127-0-0-2.demo.internal", "A", source=INSTANCE)
    assert result.status == "NOERROR"
    assert {"qr", "aa", "rd", "ra"} <= result.flags
    assert result.answer == ["ip-127-0-0-2.demo.internal. 60 IN A 127.0.0.2"]


def test_question_case_is_echoed_for_0x20_clients(edge):
    name = "iP-127-0-0-1.DeMo.InTeRnAl."
    reply = ask(edge.port, name)
    assert reply.question[0].name.to_text() == name
    assert reply.answer[0].name.to_text() == name
    assert [r.address for r in reply.answer[0]] == ["127.0.0.1"]


def test_same_answer_over_tcp(edge):
    reply = ask(edge.port, "ip-127-0-0-4.demo.internal", tcp=True)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [r.address for r in reply.answer[0]] == ["127.0.0.4"]


def test_public_name_is_split_horizon(edge):
    name = "ec2-198-51-100-11.demo.example"  # instance 1 of vpc-demo
    inside = dig(edge.port_for("vpc-demo"), name, source=INSTANCE)
    outside = dig(edge.port_for(""), name, source=INSTANCE)
    stranger = dig(edge.port_for(""), name, source=STRANGER)
    assert inside.answer == [f"{name}. 60 IN A 127.0.0.1"]
    assert outside.answer == [f"{name}. 60 IN A 198.51.100.11"]
    assert stranger.answer == outside.answer


def test_private_names_and_ptrs_stay_in_their_network(edge):
    # 127.0.0.3 exists only in the flat network; vpc-demo reuses 127.0.0.0/8 but has no .3.
    vpc = edge.port_for("vpc-demo")
    assert dig(edge.port, "ip-127-0-0-3.demo.internal").answer == ["ip-127-0-0-3.demo.internal. 60 IN A 127.0.0.3"]
    hidden = dig(vpc, "ip-127-0-0-3.demo.internal")
    assert hidden.status == "NXDOMAIN" and hidden.answer == []
    assert dig(edge.port, "3.0.0.127.in-addr.arpa", "PTR").answer == [
        "3.0.0.127.in-addr.arpa. 60 IN PTR ip-127-0-0-3.demo.internal."]
    hidden_ptr = dig(vpc, "3.0.0.127.in-addr.arpa", "PTR")
    assert hidden_ptr.status == "NXDOMAIN" and "aa" in hidden_ptr.flags


def test_overlapping_networks_do_not_leak(edge_factory, demo):
    document = copy.deepcopy(demo)
    document["networks"].append({"id": "vpc-b", "cidrs": ["10.0.0.0/16"]})
    document["networks"].append({"id": "vpc-c", "cidrs": ["10.0.0.0/16"]})
    for number, (network, address) in enumerate([("vpc-b", "10.0.0.5"), ("vpc-c", "10.0.0.5"),
                                                  ("vpc-c", "10.0.0.6")], start=10):
        instance = copy.deepcopy(document["instances"][0])
        instance["id"] = f"i-{number:017x}"
        instance["interfaces"][0].update(network=network, private_ips=[address], public_ip=None,
                                         mac=f"d0:0d:00:00:00:{number:02x}", id=f"eni-{number}")
        document["instances"].append(instance)
    server = edge_factory(document, listen=("127.0.0.1:0@vpc-b", "127.0.0.1:0@vpc-c"))
    vpc_b, vpc_c = server.port_for("vpc-b"), server.port_for("vpc-c")
    assert dig(vpc_c, "ip-10-0-0-6.demo.internal").answer == ["ip-10-0-0-6.demo.internal. 60 IN A 10.0.0.6"]
    assert dig(vpc_b, "ip-10-0-0-6.demo.internal").status == "NXDOMAIN"
    assert dig(vpc_b, "6.0.0.10.in-addr.arpa", "PTR").status == "NXDOMAIN"
    assert dig(vpc_c, "6.0.0.10.in-addr.arpa", "PTR").answer == [
        "6.0.0.10.in-addr.arpa. 60 IN PTR ip-10-0-0-6.demo.internal."]
    # Names of the flat network do not exist for vpc-b either.
    assert dig(vpc_b, "ip-127-0-0-3.demo.internal").status == "NXDOMAIN"


def test_ipv6_addresses_get_aaaa_and_ip6_arpa_ptr(edge_factory, demo):
    document = copy.deepcopy(demo)
    document["instances"][1]["interfaces"][0]["ipv6s"] = ["2001:db8::2"]
    document["networks"][0]["cidrs"].append("2001:db8::/64")
    server = edge_factory(document)
    result = dig(server.port, "ip-127-0-0-2.demo.internal", "AAAA")
    assert result.answer == ["ip-127-0-0-2.demo.internal. 60 IN AAAA 2001:db8::2"]
    reverse = dns.reversename.from_address("2001:db8::2").to_text()
    ptr = dig(server.port, reverse, "PTR")
    assert ptr.status == "NOERROR" and "aa" in ptr.flags
    assert ptr.answer == [f"{reverse} 60 IN PTR ip-127-0-0-2.demo.internal."]


def test_public_address_reverse_lookup(edge):
    result = dig(edge.port, "1.100.51.198.in-addr.arpa", "PTR", source=STRANGER)
    assert result.status == "NOERROR" and "aa" in result.flags
    assert result.answer == ["1.100.51.198.in-addr.arpa. 60 IN PTR ec2-198-51-100-1.demo.example."]


@pytest.mark.parametrize("name,rtype,expected", [
    ("gateway.demo.internal", "A", ["gateway.demo.internal. 300 IN A 127.0.0.254"]),
    ("demo.example", "MX", ["demo.example. 300 IN MX 10 mail.demo.example."]),
    ("demo.example", "TXT", ['demo.example. 300 IN TXT "v=spf1 -all"']),
    ("_ldap._tcp.demo.internal", "SRV", ["_ldap._tcp.demo.internal. 300 IN SRV 0 5 389 gateway.demo.internal."]),
    ("www.demo.example", "A", ["www.demo.example. 300 IN CNAME ec2-198-51-100-1.demo.example.",
                               "ec2-198-51-100-1.demo.example. 60 IN A 127.0.0.1"]),
    ("www.demo.example", "CNAME", ["www.demo.example. 300 IN CNAME ec2-198-51-100-1.demo.example."]),
])
def test_view_records(edge, name, rtype, expected):
    result = dig(edge.port, name, rtype, source=STRANGER)
    assert result.status == "NOERROR" and "aa" in result.flags
    assert result.answer == expected


def test_cname_chain_follows_the_clients_horizon(edge):
    # From inside the flat network the public name behind the CNAME is the private address.
    result = dig(edge.port, "www.demo.example", "A", source=INSTANCE)
    assert result.answer[-1] == "ec2-198-51-100-1.demo.example. 60 IN A 127.0.0.1"


def test_cname_chain_across_several_names(edge_factory, demo):
    document = copy.deepcopy(demo)
    document["cloud"]["dns_records"] += [
        {"name": "a.demo.example", "type": "CNAME", "value": "b.demo.example"},
        {"name": "b.demo.example", "type": "CNAME", "value": "gateway.demo.internal"},
        {"name": "dangling.demo.example", "type": "CNAME", "value": "missing.demo.example"},
    ]
    server = edge_factory(document)
    result = dig(server.port, "a.demo.example", "A", source=STRANGER)
    assert result.answer == ["a.demo.example. 60 IN CNAME b.demo.example.",
                             "b.demo.example. 60 IN CNAME gateway.demo.internal.",
                             "gateway.demo.internal. 300 IN A 127.0.0.254"]
    dangling = dig(server.port, "dangling.demo.example", "A", source=STRANGER)
    assert dangling.status == "NXDOMAIN"
    assert dangling.answer == ["dangling.demo.example. 60 IN CNAME missing.demo.example."]
    assert dangling.authority[0].startswith("demo.example. 30 IN SOA")


@pytest.mark.parametrize("apex", ["demo.internal", "demo.example", "127.in-addr.arpa", "100.51.198.in-addr.arpa"])
def test_soa_and_ns_at_every_apex(edge, apex):
    soa = dig(edge.port, apex, "SOA")
    assert soa.status == "NOERROR" and "aa" in soa.flags
    assert soa.answer == [f"{apex}. 60 IN SOA ns.demo.internal. hostmaster.demo.internal. 1 3600 600 86400 30"]
    ns = dig(edge.port, apex, "NS")
    assert ns.answer == [f"{apex}. 60 IN NS ns.demo.internal."]


def test_nxdomain_carries_soa_with_negative_ttl(edge):
    result = dig(edge.port, "nope.demo.internal", "A")
    assert result.status == "NXDOMAIN" and "aa" in result.flags
    assert result.answer == []
    assert result.authority == ["demo.internal. 30 IN SOA ns.demo.internal. hostmaster.demo.internal. 1 3600 600 86400 30"]


def test_negative_ttl_is_min_of_soa_ttl_and_minimum(edge_factory, demo):
    document = copy.deepcopy(demo)
    document["cloud"]["dns_ttl"] = 10
    document["cloud"]["negative_ttl"] = 120
    server = edge_factory(document)
    result = dig(server.port, "nope.demo.internal", "A")
    assert result.authority == ["demo.internal. 10 IN SOA ns.demo.internal. hostmaster.demo.internal. 1 3600 600 86400 120"]


def test_nodata_carries_soa(edge):
    result = dig(edge.port, "ip-127-0-0-1.demo.internal", "AAAA")
    assert result.status == "NOERROR" and "aa" in result.flags
    assert result.answer == []
    assert result.authority[0].startswith("demo.internal. 30 IN SOA")


def test_empty_non_terminal_is_nodata_not_nxdomain(edge):
    result = dig(edge.port, "_tcp.demo.internal", "SRV")
    assert result.status == "NOERROR" and result.answer == []
    assert result.authority[0].startswith("demo.internal. 30 IN SOA")


def test_any_is_answered_minimally(edge):
    reply = ask(edge.port, "demo.example", "ANY", source=STRANGER)
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(reply.answer) == 1  # one RRset (RFC 8482), though MX, TXT, SOA and NS exist


def test_nameserver_name_is_configurable(edge_factory):
    server = edge_factory(nameserver="resolver.example.net")
    assert dig(server.port, "demo.internal", "NS").answer == ["demo.internal. 60 IN NS resolver.example.net."]


def test_view_swap_changes_answers(edge, demo):
    document = copy.deepcopy(demo)
    document["serial"] = 2
    document["cloud"]["dns_records"].append({"name": "new.demo.internal", "type": "A", "value": "127.0.0.77"})
    assert dig(edge.port, "new.demo.internal").status == "NXDOMAIN"
    edge.load(document)
    assert dig(edge.port, "new.demo.internal").answer == ["new.demo.internal. 60 IN A 127.0.0.77"]


def test_instance_data_name(edge, edge_factory):
    assert dig(edge.port, "instance-data.demo.internal").answer == ["instance-data.demo.internal. 60 IN A 169.254.169.254"]
    assert dig(edge.port, "instance-data").answer == ["instance-data. 60 IN A 169.254.169.254"]
    assert dig(edge.port, "instance-data", "AAAA").status == "NOERROR"
    disabled = edge_factory(instance_data_address="")
    assert dig(disabled.port, "instance-data.demo.internal").status == "NXDOMAIN"


def test_reload_applies_nameserver_to_the_next_snapshot(edge, demo):
    import dataclasses
    config = dataclasses.replace(edge.config, dns=dataclasses.replace(edge.config.dns, nameserver="ns9.example.net"))
    edge.run(lambda: edge.service.reload(config))
    assert dig(edge.port, "demo.internal", "NS").answer == ["demo.internal. 60 IN NS ns.demo.internal."]
    demo["serial"] = 5
    edge.load(demo)
    assert dig(edge.port, "demo.internal", "NS").answer == ["demo.internal. 60 IN NS ns9.example.net."]
