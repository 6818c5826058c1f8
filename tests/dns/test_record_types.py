"""Every record type a view may hold goes the whole way: view -> DNS answer -> zone file -> NSD.

The types are those of :data:`edge.view.records.RECORD_TYPES`; each has samples here (the
test of the samples fails when a type is added without them).  A sample is checked three
ways against the same expected RDATA (dnspython's reading of the value's zone-file form):
edge's answer over a real socket, the exported zone file read by dnspython, and NSD's
answer from that exported zone file.  An unknown type is a view problem, worded.
"""

from __future__ import annotations

import shutil

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.zone
import pytest

from edge.dns.zonefile import zone_texts
from edge.errors import ViewInvalid
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.records import RECORD_TYPES
from edge.view.snapshot import build_snapshot
from tests.dns.test_reference import run_nsd

ZONE = "types.example"
_LONG_TXT = ('v=1; "quoted" \\ back' * 20)[:254] + '"\\' + "x" * 300
"""Over 255 bytes, with a quote and a backslash across the first string boundary."""

SAMPLES: dict[str, list[tuple[str, str]]] = {
    "A": [("a", "192.0.2.1")],
    "AAAA": [("aaaa", "2001:db8::1"), ("aaaa-long", "2001:0DB8:0000:0000:0000:0000:0000:0002")],
    "CNAME": [("cname", "target.elsewhere.test"), ("cname-dot", "target.elsewhere.test.")],
    "TXT": [("txt", "hello world"), ("txt-empty", ""), ("txt-quotes", 'say "hi" \\ there'),
            ("txt-utf8", "caf\u00e9 \u2603"), ("txt-long", _LONG_TXT)],
    "SRV": [("_ldap._tcp", "0 5 389 ldap.types.example"), ("_kerberos._udp", "10 0 88 kdc.elsewhere.test.")],
    "MX": [("mx", "10 mail.types.example"), ("mx-dot", "65535 mail.elsewhere.test.")],
    "PTR": [("ptr", "host.types.example")],
    "NS": [("sub", "ns1.elsewhere.test")],
}
"""Type -> (owner label under ZONE, value as the view holds it)."""


def _document(rtype: str, case: str = "") -> dict:
    document = demo_document()
    document["cloud"]["dns_records"] += [
        {"name": f"{label}.{ZONE}", "type": case or rtype, "value": value, "ttl": 300}
        for label, value in SAMPLES[rtype]]
    # The zone needs a record at its apex: it is created by the first record under it.
    document["cloud"]["dns_records"].insert(0, {"name": ZONE, "type": "A", "value": "192.0.2.100"})
    return document


def _expected(rtype: str, value: str) -> dns.rdata.Rdata:
    text = RECORD_TYPES[rtype].zone_value(value)
    return dns.rdata.from_text(dns.rdataclass.IN, rtype, text, origin=dns.name.root, relativize=False)


def test_every_type_has_samples() -> None:
    assert set(SAMPLES) == set(RECORD_TYPES), "give every type of edge.view.records samples here"


@pytest.mark.parametrize("rtype", sorted(RECORD_TYPES))
def test_edge_answers_what_the_view_holds(edge_factory, rtype: str) -> None:
    server = edge_factory(_document(rtype, case=rtype.lower()))
    for label, value in SAMPLES[rtype]:
        name = f"{label}.{ZONE}"
        query = dns.message.make_query(name, rtype, use_edns=0, payload=4096)
        query.flags &= ~dns.flags.RD  # NS below the apex is a zone cut: a referral, not forwarded
        reply = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3, source="127.0.0.9")
        rrsets = reply.answer if rtype != "NS" else reply.authority
        found = [rdata for rrset in rrsets if rrset.rdtype == dns.rdatatype.from_text(rtype) for rdata in rrset]
        assert found == [_expected(rtype, value)], (name, reply.to_text())


@pytest.mark.parametrize("rtype", sorted(RECORD_TYPES))
def test_the_zone_file_export_holds_the_same_records(rtype: str) -> None:
    texts = zone_texts(build_snapshot(parse_view(_document(rtype))))
    zone = dns.zone.from_text(texts[ZONE], origin=ZONE, relativize=False, check_origin=False)
    for label, value in SAMPLES[rtype]:
        rdataset = zone.find_rdataset(f"{label}.{ZONE}.", rtype)
        assert list(rdataset) == [_expected(rtype, value)]
        assert rdataset.ttl == 300


@pytest.mark.skipif(shutil.which("nsd") is None, reason="nsd not installed")
def test_nsd_serves_the_exported_zones_as_edge_does(edge_factory, tmp_path) -> None:
    document = demo_document()
    for rtype in sorted(RECORD_TYPES):
        document["cloud"]["dns_records"] += _document(rtype)["cloud"]["dns_records"][-len(SAMPLES[rtype]):]
    document["cloud"]["dns_records"].insert(0, {"name": ZONE, "type": "A", "value": "192.0.2.100"})
    server = edge_factory(document)
    nsd = run_nsd(tmp_path, document)
    nsd_port = next(nsd)
    try:
        for rtype, samples in SAMPLES.items():
            for label, _ in samples:
                query = dns.message.make_query(f"{label}.{ZONE}", rtype, use_edns=0, payload=4096)
                query.flags &= ~dns.flags.RD
                ours = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3, source="127.0.0.9")
                theirs = dns.query.udp(query, "127.0.0.1", port=nsd_port, timeout=3)
                assert ours.rcode() == theirs.rcode()
                assert sorted(map(str, ours.answer)) == sorted(map(str, theirs.answer)), (label, rtype)
                assert sorted(map(str, ours.authority)) == sorted(map(str, theirs.authority)), (label, rtype)
    finally:
        nsd.close()


def test_an_unknown_type_is_a_view_problem() -> None:
    document = demo_document()
    document["cloud"]["dns_records"].append({"name": f"x.{ZONE}", "type": "SPF", "value": "v=spf1 -all"})
    with pytest.raises(ViewInvalid) as refused:
        parse_view(document)
    index = len(document["cloud"]["dns_records"]) - 1
    assert refused.value.problems == [
        f"$.cloud.dns_records[{index}].type: unsupported record type 'SPF' "
        "(supported: A, AAAA, CNAME, TXT, SRV, MX, PTR or NS)"]


def test_a_bad_value_names_its_type_s_form() -> None:
    document = demo_document()
    document["cloud"]["dns_records"].append({"name": f"x.{ZONE}", "type": "srv", "value": "0 5 70000 x.test"})
    with pytest.raises(ViewInvalid) as refused:
        parse_view(document)
    assert "SRV value must be 'PRIORITY WEIGHT PORT TARGET'" in str(refused.value)
