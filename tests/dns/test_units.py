"""Pure logic: wire reading, cache entries and TTLs, recursion policy, CNAME loops."""

from __future__ import annotations

import copy
import struct

import dns.message
import dns.rrset
import pytest

from edge.config import DnsConfig
from edge.dns.acl import RecursionPolicy
from edge.dns.errors import BadVers, FormErr, NotImp, Unanswerable
from edge.dns.forwarder import Forwarder, UpstreamFailed
from edge.dns.local import NOT_LOCAL, answer_local
from edge.dns.wire import encode_name, error_reply, parse_query, walk_records
from edge.dns.zonedata import build_dns_data
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot


def test_key_lowercases_name_bytes_only():
    # Type 65 is the byte 'A': lower-casing the whole question would turn it into type 97.
    wire = dns.message.make_query("WWW.Example.COM", 65).to_wire()
    query = parse_query(wire)
    assert query.name == encode_name("www.example.com")
    assert query.key.endswith(b"\x00\x41\x00\x01")
    assert query.question == wire[12:query.qend]


@pytest.mark.parametrize("data,error", [
    (b"\x00" * 11, Unanswerable),
    (b"\x00\x00\x80\x00" + b"\x00" * 8, Unanswerable),
    (b"\x00\x00\x28\x00\x00\x01" + b"\x00" * 6 + b"\x00\x00\x06\x00\x01", NotImp),
    (b"\x00\x00\x01\x00\x00\x00" + b"\x00" * 6, FormErr),
    (b"\x00\x00\x01\x00\x00\x01" + b"\x00" * 6 + b"\x05ab", FormErr),
    (b"\x00\x00\x01\x00\x00\x01" + b"\x00" * 6 + b"\xc0\x0c\x00\x01\x00\x01", FormErr),
])
def test_parse_errors(data, error):
    with pytest.raises(error):
        parse_query(data)


def test_edns_is_read_and_version_checked():
    query = parse_query(dns.message.make_query("a.example", "A", use_edns=0, payload=4000, want_dnssec=True).to_wire())
    assert query.edns and query.payload == 4000 and query.do
    tiny = parse_query(dns.message.make_query("a.example", "A", use_edns=0, payload=100).to_wire())
    assert tiny.payload == 512
    with pytest.raises(BadVers):
        parse_query(dns.message.make_query("a.example", "A", use_edns=1).to_wire())


def test_badvers_reply_puts_the_high_rcode_bits_in_opt():
    wire = dns.message.make_query("a.example", "A", use_edns=1).to_wire()
    reply = dns.message.from_wire(error_reply(wire, 16, False, 1232))
    assert reply.rcode() == 16 and reply.edns == 0


def upstream_reply(answer_ttls=(), soa=None, rcode=0):
    query = dns.message.make_query("x.example", "A", use_edns=0)
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    for index, ttl in enumerate(answer_ttls):
        response.answer.append(dns.rrset.from_text("x.example.", ttl, "IN", "A", f"192.0.2.{index + 1}"))
    if soa is not None:
        ttl, minimum = soa
        response.authority.append(dns.rrset.from_text(
            "example.", ttl, "IN", "SOA", f"ns.example. host.example. 1 2 3 4 {minimum}"))
    return response.to_wire(), len(parse_query(query.to_wire()).question)


def test_cache_entry_lifetime_and_ttl_countdown():
    clock = [100.0]
    forwarder = Forwarder(DnsConfig(serve_stale=50.0), clock=lambda: clock[0])
    wire, size = upstream_reply(answer_ttls=(300, 60))
    entry = forwarder._entry(wire, size, forwarder.settings)
    assert entry.expires == 160.0 and entry.stale_until == 210.0
    body = entry.body_at(110.5)
    spans, end = walk_records(body, 0, 2)
    assert end == len(body) and [s.rtype for s in spans] == [1, 1]
    ttls = [struct.unpack_from("!I", body, offset)[0] for offset in entry.ttl_offsets]
    assert ttls == [290, 50]
    assert [struct.unpack_from("!I", entry.as_stale(30).body, o)[0] for o in entry.ttl_offsets] == [30, 30]


def test_negative_cache_lifetime_from_soa_and_clamps():
    forwarder = Forwarder(DnsConfig(negative_max_ttl=100), clock=lambda: 0.0)
    wire, size = upstream_reply(soa=(600, 45), rcode=3)
    assert forwarder._entry(wire, size, forwarder.settings).expires == 45.0
    wire, size = upstream_reply(soa=(600, 900), rcode=3)
    assert forwarder._entry(wire, size, forwarder.settings).expires == 100.0
    clamped = Forwarder(DnsConfig(cache_min_ttl=30, cache_max_ttl=40), clock=lambda: 0.0)
    wire, size = upstream_reply(answer_ttls=(5,))
    assert clamped._entry(wire, size, clamped.settings).expires == 30.0
    wire, size = upstream_reply(answer_ttls=(5000,))
    assert clamped._entry(wire, size, clamped.settings).expires == 40.0


def test_upstream_servfail_is_a_failure_not_an_answer():
    forwarder = Forwarder(DnsConfig())
    wire, size = upstream_reply(rcode=2)
    with pytest.raises(UpstreamFailed):
        forwarder._entry(wire, size, forwarder.settings)


def test_recursion_policy():
    snapshot = build_snapshot(parse_view(demo_document()))
    policy = RecursionPolicy(("192.0.2.0/24", "2001:db8::/32"))
    assert policy.allowed(snapshot, "", "127.0.0.1")
    assert policy.allowed(snapshot, "vpc-demo", "127.0.0.2")
    assert not policy.allowed(snapshot, "vpc-demo", "127.0.0.3")  # .3 is only in the flat network
    assert not policy.allowed(snapshot, "", "127.0.0.9")
    assert policy.allowed(snapshot, "", "192.0.2.7")
    assert policy.allowed(snapshot, "", "::ffff:192.0.2.7")
    assert policy.allowed(snapshot, "", "2001:db8::1")
    assert not policy.allowed(snapshot, "", "not an address")


def test_cname_loop_in_local_data_terminates():
    document = copy.deepcopy(demo_document())
    document["cloud"]["dns_records"] += [
        {"name": "loop1.demo.example", "type": "CNAME", "value": "loop2.demo.example"},
        {"name": "loop2.demo.example", "type": "CNAME", "value": "loop1.demo.example"},
    ]
    data = build_dns_data(build_snapshot(parse_view(document)))
    answer = answer_local(data, "", encode_name("loop1.demo.example"), 1, 1)
    assert answer is not NOT_LOCAL
    assert answer.rcode == 0  # type: ignore[attr-defined]


def test_names_outside_local_zones_are_not_local():
    data = build_dns_data(build_snapshot(parse_view(demo_document())))
    assert answer_local(data, "", encode_name("example.com"), 1, 1) is NOT_LOCAL
    assert answer_local(data, "", encode_name("5.0.0.10.in-addr.arpa"), 12, 1) is NOT_LOCAL
    assert answer_local(data, "", b"\x05a.b\x00c\x07example\x00", 1, 1) is NOT_LOCAL


def test_a_label_no_text_can_name_is_still_under_its_local_zone():
    data = build_dns_data(build_snapshot(parse_view(demo_document())))
    for odd in (b"\x05a.b\x00c", b"\x02\xc3\xa9", b"\x01x\x01\xff\x0cip-127-0-0-1"):
        answer = answer_local(data, "", odd + b"\x04demo\x08internal\x00", 1, 1)
        assert answer is not NOT_LOCAL
        assert answer.rcode == 3 and answer.prefixes[0][0] & 0x04  # type: ignore[attr-defined]  # NXDOMAIN, AA


def test_answer_memo_is_bounded_and_starts_over():
    from edge.dns.zonedata import make_preparer
    snapshot = build_snapshot(parse_view(demo_document()), [make_preparer(memo_limit=10)])
    data = snapshot.extras["dns"]
    table = data.memo_for("")
    for index in range(25):
        data.remember(table, b"key%d" % index, NOT_LOCAL)
        assert data.memo_size <= 10
    assert b"key24" in table and b"key0" not in table
