"""Per-snapshot DNS data: which zones each network sees, empty non-terminals, and the answer memo.

Built by a preparer off the event loop before the snapshot is swapped in, and
kept in ``snapshot.extras["dns"]``.  Answers are rendered on first use and
memoized per network; the memo lives and dies with its snapshot, so a swap
invalidates every rendered answer without a purge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from edge.view.snapshot import LocalRecord, NameEntry, Snapshot

EXTRAS_KEY = "dns"

SOA_REFRESH = 3600
SOA_RETRY = 600
SOA_EXPIRE = 86400


@dataclass(frozen=True, slots=True)
class ZoneInfo:
    apex: str
    soa: tuple[str, str, int, int, int, int, int]
    """(mname, rname, serial, refresh, retry, expire, minimum)."""
    soa_ttl: int
    nameserver: str

    @property
    def negative_ttl(self) -> int:
        """RFC 2308: negative answers live min(SOA TTL, SOA minimum)."""
        return min(self.soa_ttl, self.soa[6])


@dataclass(slots=True)
class DnsData:
    """What answering needs from one snapshot, beyond ``snapshot.names``."""

    generation: int
    names: Mapping[str, NameEntry]
    zones: dict[str | None, dict[str, ZoneInfo]]
    """Network (None: every network) -> apex -> zone."""
    empty_non_terminals: dict[str, tuple[bool, frozenset[str]]]
    """Name -> (a descendant is visible to everyone, networks a descendant is visible to)."""
    extra_names: dict[str, tuple[LocalRecord, ...]] = field(default_factory=dict)
    """Names edge adds for everyone (``instance-data``), unless the view has them."""
    delegations: frozenset[str] = frozenset()
    """Names below an apex that own NS records in some horizon: candidate zone cuts."""
    memo: dict[str, dict[bytes, object]] = field(default_factory=dict)
    """Network -> question key -> rendered answer (or the not-local marker)."""
    memo_limit: int = 100_000
    memo_size: int = 0

    def zone_for(self, network: str, name: str) -> ZoneInfo | None:
        """The closest enclosing local zone visible to ``network``."""
        own = self.zones.get(network, {})
        shared = self.zones.get(None, {})
        candidate = name
        while True:
            zone = own.get(candidate) or shared.get(candidate)
            if zone is not None:
                return zone
            dot = candidate.find(".")
            if dot < 0:
                return None
            candidate = candidate[dot + 1:]

    def cut_for(self, network: str, name: str, apex: str) -> str | None:
        """The zone cut at or above ``name`` and below ``apex`` (an owner of NS records), if any.

        The one closest to the apex wins: everything below it is delegated, whatever it holds.
        """
        if not self.delegations:
            return None
        cut = None
        candidate = name
        while candidate != apex and candidate.endswith(apex):
            if candidate in self.delegations and any(r.type == "NS" for r in self.records(network, candidate)):
                cut = candidate
            dot = candidate.find(".")
            if dot < 0:
                break
            candidate = candidate[dot + 1:]
        return cut

    def records(self, network: str, name: str) -> tuple[LocalRecord, ...]:
        entry = self.names.get(name)
        if entry is None:
            return self.extra_names.get(name, ())
        return entry.records_for(network)

    def is_empty_non_terminal(self, network: str, name: str) -> bool:
        found = self.empty_non_terminals.get(name)
        return found is not None and (found[0] or network in found[1])

    def memo_for(self, network: str) -> dict[bytes, object]:
        table = self.memo.get(network)
        if table is None:
            table = self.memo[network] = {}
        return table

    def remember(self, table: dict[bytes, object], key: bytes, answer: object) -> None:
        # Bounded so a flood of random names cannot grow the memo without limit; when full it
        # starts over, so names still in use are rendered again once and stay fast.
        if self.memo_size >= self.memo_limit:
            for each in self.memo.values():
                each.clear()
            self.memo_size = 0
        table[key] = answer
        self.memo_size += 1


def make_preparer(nameserver: str = "", instance_data_address: str = "",
                  memo_limit: int = 100_000) -> Callable[[Snapshot], None]:
    """A preparer that fills ``snapshot.extras["dns"]``; ``nameserver`` names the NS of local zones."""

    def prepare(snapshot: Snapshot) -> None:
        snapshot.extras[EXTRAS_KEY] = build_dns_data(snapshot, nameserver, instance_data_address, memo_limit)

    return prepare


def build_dns_data(snapshot: Snapshot, nameserver: str = "", instance_data_address: str = "",
                   memo_limit: int = 100_000) -> DnsData:
    cloud = snapshot.view.cloud
    ns_name = (nameserver or f"ns.{cloud.internal_domain}").rstrip(".").lower()
    serial = snapshot.view.serial & 0xFFFFFFFF
    zones: dict[str | None, dict[str, ZoneInfo]] = {}
    for zone in snapshot.zones:
        soa = (ns_name, f"hostmaster.{cloud.internal_domain}", serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE,
               cloud.negative_ttl)
        zones.setdefault(zone.network, {})[zone.apex] = ZoneInfo(zone.apex, soa, cloud.dns_ttl, ns_name)
    apexes = {apex for by_apex in zones.values() for apex in by_apex}
    ents: dict[str, tuple[bool, set[str]]] = {}
    for name, entry in snapshot.names.items():
        everyone = bool(entry.everyone)
        networks = {network for network, records in entry.by_network if records}
        ancestor = name
        while "." in ancestor and ancestor not in apexes:
            ancestor = ancestor[ancestor.find(".") + 1:]
            if ancestor in apexes or ancestor in snapshot.names and not _needs_mark(ancestor, snapshot):
                break
            seen_everyone, seen_networks = ents.get(ancestor, (False, set()))
            seen_networks |= networks
            ents[ancestor] = (seen_everyone or everyone, seen_networks)
    frozen = {name: (everyone, frozenset(networks)) for name, (everyone, networks) in ents.items()}
    # Only the view's dns_records hold NS records (instances add addresses and PTRs).
    delegations = frozenset(record.name.lower().rstrip(".") for record in cloud.dns_records
                            if record.type == "NS") - apexes
    extra: dict[str, tuple[LocalRecord, ...]] = {}
    if instance_data_address:
        # Eucalyptus instances find the metadata service by this name, bare or under the internal domain.
        record = (LocalRecord("AAAA" if ":" in instance_data_address else "A", instance_data_address, cloud.dns_ttl),)
        extra[f"instance-data.{cloud.internal_domain}"] = record
        if "instance-data" not in apexes:
            soa = (ns_name, f"hostmaster.{cloud.internal_domain}", serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE,
                   cloud.negative_ttl)
            zones.setdefault(None, {})["instance-data"] = ZoneInfo("instance-data", soa, cloud.dns_ttl, ns_name)
            extra["instance-data"] = record
    return DnsData(snapshot.generation, snapshot.names, zones, frozen, extra, delegations=delegations,
                   memo_limit=memo_limit)


def _needs_mark(name: str, snapshot: Snapshot) -> bool:
    # A name with records only in some networks is still an empty non-terminal for the others.
    entry = snapshot.names[name]
    return not entry.everyone or any(not records for _, records in entry.by_network)


def dns_data(snapshot: Snapshot) -> DnsData:
    """The snapshot's DNS data, built now if no preparer ran (tests, tools)."""
    data = snapshot.extras.get(EXTRAS_KEY)
    if data is None:
        data = snapshot.extras[EXTRAS_KEY] = build_dns_data(snapshot)
    return cast(DnsData, data)
