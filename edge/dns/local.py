"""Authoritative answers from the view, by the horizon of the asking network.

A question under a local zone visible to the client's network is answered
here (AA set): records, CNAME chains inside local data, SOA and NS at each
apex, NXDOMAIN/NODATA with the zone's SOA (RFC 2308), one RRset for ANY
(RFC 8482).  Anything else is :data:`NOT_LOCAL` and goes to the forwarder.
"""

from __future__ import annotations

import dataclasses

from edge.dns.errors import NOERROR, NXDOMAIN, REFUSED
from edge.dns.render import Answer, Onward, Record, render
from edge.dns.wire import (
    CLASS_ANY,
    CLASS_IN,
    TYPE_ANY,
    TYPE_AXFR,
    TYPE_CNAME,
    TYPE_HINFO,
    TYPE_IXFR,
    TYPE_NS,
    TYPE_SOA,
    encode_name,
)
from edge.dns.zonedata import DnsData, Horizon, ZoneInfo
from edge.view.records import RECORD_TYPES

NOT_LOCAL = object()
"""Marker: the name is outside every local zone this network sees."""

MAX_CHAIN = 8
ANY_SIZE_LIMIT = 400
"""Bytes (roughly) above which ANY gets a synthesized HINFO instead of a real RRset."""


def question_text(name_wire: bytes) -> tuple[str, bool]:
    """The lower-case dotted name of a wire name, and whether that is the whole name.

    A label holding a dot or a non-ASCII byte has no text form that could name local data; the
    text is then that of the labels after the last such label (so the name is still known to be
    under a local zone, where it cannot exist), and the second value is False.
    """
    labels: list[str] = []
    whole = True
    pos = 0
    while name_wire[pos]:
        length = name_wire[pos]
        label = name_wire[pos + 1:pos + 1 + length]
        if b"." in label or not label.isascii():
            labels.clear()
            whole = False
        else:
            labels.append(label.decode("ascii"))
        pos += length + 1
    return ".".join(labels), whole


def answer_local(data: DnsData, network: Horizon | str, name_wire: bytes, qtype: int, qclass: int) -> Answer | object:
    """The authoritative answer for this question as the asker's horizon sees it (a network id stands
    for every asker in that network), or :data:`NOT_LOCAL`."""
    if qclass not in (CLASS_IN, CLASS_ANY) or qtype in (TYPE_AXFR, TYPE_IXFR):
        # Other classes (CHAOS version probes) and zone transfers are neither served nor forwarded.
        return render(name_wire, qtype, qclass, REFUSED, False, ())
    name, whole = question_text(name_wire)
    zone = data.zone_for(network, name)
    if zone is None:
        return NOT_LOCAL
    cut = data.cut_for(network, name, zone.apex)
    if cut is not None:
        return _referral(data, network, name_wire, qtype, qclass, cut)
    if not whole:
        return _negative(name_wire, qtype, qclass, NXDOMAIN, zone)
    records = _records(data, network, name, zone)
    if not records:
        if data.is_empty_non_terminal(network, name):
            return _negative(name_wire, qtype, qclass, NOERROR, zone)
        return _negative(name_wire, qtype, qclass, NXDOMAIN, zone)
    if qtype == TYPE_ANY:
        return render(name_wire, qtype, qclass, NOERROR, True, _minimal_any(records, zone))
    matching = [r for r in records if r.rtype == qtype]
    if matching:
        return render(name_wire, qtype, qclass, NOERROR, True, matching)
    cname = next((r for r in records if r.rtype == TYPE_CNAME), None)
    if cname is None:
        return _negative(name_wire, qtype, qclass, NOERROR, zone)
    return _chase(data, network, name_wire, qtype, qclass, cname)


def _minimal_any(records: list[Record], zone: ZoneInfo) -> list[Record]:
    """RFC 8482: the smallest RRset, or a synthesized HINFO when even that is large."""
    by_type: dict[int, list[Record]] = {}
    for record in records:
        by_type.setdefault(record.rtype, []).append(record)
    smallest = min(by_type.values(), key=lambda rrset: sum(len(str(r.value)) + 12 for r in rrset))
    if sum(len(str(r.value)) + 12 for r in smallest) > ANY_SIZE_LIMIT:
        return [Record(None, TYPE_HINFO, zone.soa_ttl, ("RFC8482", ""))]
    return smallest


def _records(data: DnsData, network: Horizon | str, name: str, zone: ZoneInfo | None, owner: str | None = None) -> list[Record]:
    # Every type a view may hold has its entry in RECORD_TYPES (the schema admits no other), so
    # nothing is filtered out here: a record is answered or the view was refused.
    out = [Record(owner, RECORD_TYPES[r.type].code, r.ttl, r.value) for r in data.records(network, name)]
    if zone is not None and zone.apex == name:
        out.append(Record(owner, TYPE_SOA, zone.soa_ttl, zone.soa))
        if not any(r.rtype == TYPE_NS for r in out):
            out.append(Record(owner, TYPE_NS, zone.soa_ttl, zone.nameserver))
    return out


def _negative(name_wire: bytes, qtype: int, qclass: int, rcode: int, zone: ZoneInfo) -> Answer:
    soa = Record(zone.apex, TYPE_SOA, zone.negative_ttl, zone.soa)
    return render(name_wire, qtype, qclass, rcode, True, (), (soa,))


def _referral(data: DnsData, network: Horizon | str, name_wire: bytes, qtype: int, qclass: int, cut: str) -> Answer:
    """A name at or below a zone cut (an NS record below a local apex) is not ours to answer.

    A client that does not recurse gets a referral (no AA, the cut's NS records in the authority
    section, addresses of name servers we hold as glue); one that does gets the upstream answer.
    """
    servers = [Record(cut, TYPE_NS, r.ttl, r.value) for r in data.records(network, cut) if r.type == "NS"]
    glue = []
    for server in servers:
        host = str(server.value).lower().rstrip(".")
        glue += [Record(host, RECORD_TYPES[r.type].code, r.ttl, r.value) for r in data.records(network, host)
                 if r.type in ("A", "AAAA")]
    answer = render(name_wire, qtype, qclass, NOERROR, False, (), servers, glue)
    return dataclasses.replace(answer, onward=Onward(name_wire, b"", 0))


def _chase(data: DnsData, network: Horizon | str, name_wire: bytes, qtype: int, qclass: int, first: Record) -> Answer:
    """Follow a CNAME chain through local data (RFC 1034 4.3.2); the RCODE is that of the last name.

    A chain that leaves the local zones (or enters a zone cut) ends with its last CNAME; a
    client that may recurse gets the rest from upstream (:class:`Onward`).
    """
    answer = [first]
    seen = {str(first.value).lower()}
    target = str(first.value).lower().rstrip(".")
    for _ in range(MAX_CHAIN):
        zone = data.zone_for(network, target)
        if zone is None or data.cut_for(network, target, zone.apex) is not None:
            rendered = render(name_wire, qtype, qclass, NOERROR, True, answer)
            return dataclasses.replace(rendered, onward=Onward(encode_name(target), rendered.body, len(answer)))
        records = _records(data, network, target, zone, owner=target)
        matching = [r for r in records if r.rtype == qtype]
        if matching:
            answer.extend(matching)
            break
        cname = next((r for r in records if r.rtype == TYPE_CNAME), None)
        if cname is None:
            rcode = NOERROR if records or data.is_empty_non_terminal(network, target) else NXDOMAIN
            soa = Record(zone.apex, TYPE_SOA, zone.negative_ttl, zone.soa)
            return render(name_wire, qtype, qclass, rcode, True, answer, (soa,))
        answer.append(cname)
        target = str(cname.value).lower().rstrip(".")
        if target in seen:
            break
        seen.add(target)
    return render(name_wire, qtype, qclass, NOERROR, True, answer)


