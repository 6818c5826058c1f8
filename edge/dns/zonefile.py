"""The local zones as one network sees them, as RFC 1035 zone file text.

Used to hand the same data to a reference server (tests compare answers with
NSD; benchmarks load NSD and dnsmasq with it) and to inspect a horizon.
"""

from __future__ import annotations

from edge.dns.zonedata import build_dns_data
from edge.view.records import RECORD_TYPES
from edge.view.snapshot import Snapshot


def zone_texts(snapshot: Snapshot, network: str = "") -> dict[str, str]:
    """Apex -> zone file text for every local zone visible to ``network``."""
    data = build_dns_data(snapshot)
    zones = {**data.zones.get(None, {}), **data.zones.get(network, {})}
    lines: dict[str, list[str]] = {}
    for apex, zone in zones.items():
        mname, rname, serial, refresh, retry, expire, minimum = zone.soa
        lines[apex] = [f"$ORIGIN {apex}.",
                       f"@ {zone.soa_ttl} IN SOA {mname}. {rname}. {serial} {refresh} {retry} {expire} {minimum}",
                       f"@ {zone.soa_ttl} IN NS {zone.nameserver}."]
    for name in sorted(snapshot.names):
        owner_zone = data.zone_for(network, name)
        if owner_zone is None:
            continue
        for record in data.records(network, name):
            value = RECORD_TYPES[record.type].zone_value(record.value)
            lines[owner_zone.apex].append(f"{name}. {record.ttl} IN {record.type} {value}")
    return {apex: "\n".join(text) + "\n" for apex, text in lines.items()}
