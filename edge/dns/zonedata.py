"""Per-snapshot DNS data: which zones each network sees, empty non-terminals, and the answer memo.

Built by a preparer off the event loop before the snapshot is swapped in, and
kept in ``snapshot.extras["dns"]``.  Answers are rendered on first use and
memoized per network; the memo lives and dies with its snapshot, so a swap
invalidates every rendered answer without a purge.

Finding empty non-terminals walks up from every name.  When a snapshot is a
delta of the one the preparer last served (``NameChanges``), only the changed
names are walked again: each ancestor keeps a count of the names below it that
make it an empty non-terminal, so a name that goes away takes its part back.
A change to a name that is itself on some other name's walk (an empty
non-terminal, or an existing name a walk stops at) means a full walk.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from edge.view.model import DEFAULT_NETWORK, DnsRecord
from edge.view.shared import shared_index
from edge.view.sharded import ShardedIndex
from edge.view.snapshot import CHANGED_NAMES_KEY, LocalRecord, NameChanges, NameEntry, Snapshot

EXTRAS_KEY = "dns"
WALKS_INDEX = "dns.walks"
"""The empty non-terminal counts, as a gateway's supervisor publishes them with the shared view."""
WalkCount = tuple[int, int, tuple[tuple[str, int], ...]]

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
    instances_only: bool = False
    """Every record in the zone is for instances only: to other askers the zone does not exist."""

    @property
    def negative_ttl(self) -> int:
        """RFC 2308: negative answers live min(SOA TTL, SOA minimum)."""
        return min(self.soa_ttl, self.soa[6])


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RFC1918 = (ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("172.16.0.0/12"),
           ipaddress.IPv4Network("192.168.0.0/16"))


@dataclass(frozen=True, slots=True)
class Horizon:
    """What one asker sees: the names and zones of a network, narrowed by who the asker is.

    Askers with equal ``key`` get equal answers, so answers are memoized per key.
    """

    network: str
    key: str
    instance: bool = True
    """The view knows the asker as an instance (records for instances only are answered)."""
    subnet: IpNetwork | None = None
    """With ``public_name_horizon = "cidr"``: the CIDR of its network the asking instance is in."""


@dataclass(slots=True)
class DnsData:
    """What answering needs from one snapshot, beyond ``snapshot.names``."""

    generation: int
    names: Mapping[str, NameEntry]
    zones: dict[str | None, dict[str, ZoneInfo]]
    """Network (None: every network) -> apex -> zone."""
    walks: NameWalks
    """The empty non-terminals, as counts of the names below each (``is_empty_non_terminal`` reads them);
    kept for the next snapshot's update."""
    extra_names: dict[str, tuple[LocalRecord, ...]] = field(default_factory=dict)
    """Names edge adds for everyone (``instance-data``), unless the view has them."""
    delegations: frozenset[str] = frozenset()
    """Names below an apex that own NS records in some horizon: candidate zone cuts."""
    memo: dict[str, dict[bytes, object]] = field(default_factory=dict)
    """Network -> question key -> rendered answer (or the not-local marker)."""
    memo_limit: int = 100_000
    memo_size: int = 0
    split_by_cidr: bool = False
    """The view's ``public_name_horizon`` is ``cidr``."""
    rfc1918_ptrs: bool = False
    """The view's ``private_ptrs`` is ``rfc1918``."""
    for_instances: dict[str, frozenset[tuple[str, str]]] = field(default_factory=dict)
    """Name -> (type, value) of its records answered to instances only."""
    network_cidrs: dict[str, tuple[IpNetwork, ...]] = field(default_factory=dict)
    horizons: dict[str, Horizon] = field(default_factory=dict)

    @property
    def narrowed(self) -> bool:
        """Whether answers depend on who asks within a network, not just on the network."""
        return self.split_by_cidr or bool(self.for_instances)

    def horizon_for(self, snapshot: Snapshot, network: str, address: str) -> Horizon:
        """The horizon of an asker: listener network and source address.

        On a listener of the flat network, an address the view gives as a metadata source of an
        interface in another network (a proxy's address for it, Eucalyptus VPC intip addresses)
        asks as that interface, in that interface's network.
        """
        attachment = snapshot.by_private.get((network, address))
        seen = network
        if attachment is not None and network == DEFAULT_NETWORK:
            seen = attachment.interface.network
        if not self.narrowed:
            key = seen
            instance, subnet = True, None
        else:
            instance = attachment is not None or not self.for_instances
            subnet = None
            if self.split_by_cidr and attachment is not None:
                subnet = self._cidr_of(attachment.interface.network, attachment.interface.primary_ip)
            key = f"{seen}\x00{'i' if instance else ''}\x00{subnet or ''}"
        found = self.horizons.get(key)
        if found is None:
            found = self.horizons[key] = Horizon(seen, key, instance, subnet)
        return found

    def _cidr_of(self, network: str, address: str) -> IpNetwork | None:
        ip = ipaddress.ip_address(address)
        return next((cidr for cidr in self.network_cidrs.get(network, ()) if ip.version == cidr.version and ip in cidr),
                    None)

    def zone_for(self, horizon: Horizon | str, name: str) -> ZoneInfo | None:
        """The closest enclosing local zone visible to the asker."""
        horizon = as_horizon(horizon)
        own = self.zones.get(horizon.network, {})
        shared = self.zones.get(None, {})
        candidate = name
        while True:
            zone = own.get(candidate) or shared.get(candidate)
            if zone is not None and (horizon.instance or not zone.instances_only):
                return zone
            dot = candidate.find(".")
            if dot < 0:
                return None
            candidate = candidate[dot + 1:]

    def cut_for(self, network: Horizon | str, name: str, apex: str) -> str | None:
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

    def records(self, horizon: Horizon | str, name: str) -> tuple[LocalRecord, ...]:
        horizon = as_horizon(horizon)
        entry = self.names.get(name)
        if entry is None:
            return self.extra_names.get(name, ())
        records = entry.records_for(horizon.network)
        if self.split_by_cidr or self.rfc1918_ptrs or self.for_instances:
            records = self._narrowed(horizon, name, entry, records)
        return records

    def _narrowed(self, horizon: Horizon, name: str, entry: NameEntry,
                  records: tuple[LocalRecord, ...]) -> tuple[LocalRecord, ...]:
        everyone = entry.everyone
        if self.split_by_cidr and everyone and records is not everyone:
            # A public name: the private address inside its network only to instances of its CIDR.
            inside = [r for r in records if r.type in ("A", "AAAA") and r not in everyone]
            subnet = horizon.subnet
            if inside and not (subnet is not None and all(ipaddress.ip_address(r.value) in subnet for r in inside)):
                kept = [r for r in records if r not in inside]
                records = tuple(kept + [r for r in everyone if r.type in ("A", "AAAA") and r not in kept])
        if self.rfc1918_ptrs and records is not everyone and name.endswith((".in-addr.arpa", ".ip6.arpa")):
            if not _rfc1918_reverse_name(name):
                records = tuple(r for r in records if r.type != "PTR" or r in everyone)
        hidden = self.for_instances.get(name)
        if hidden and not horizon.instance:
            records = tuple(r for r in records if (r.type, r.value) not in hidden)
        return records

    def is_empty_non_terminal(self, horizon: Horizon | str, name: str) -> bool:
        found = self.walks.counts.get(name)
        if found is None:
            return False
        network = as_horizon(horizon).network
        return found[1] > 0 or any(seen == network for seen, _ in found[2])

    def memo_for(self, horizon: Horizon | str) -> dict[bytes, object]:
        key = horizon if isinstance(horizon, str) else horizon.key
        table = self.memo.get(key)
        if table is None:
            table = self.memo[key] = {}
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


def as_horizon(horizon: Horizon | str) -> Horizon:
    """A network id stands for the horizon of every asker in it (tools, zone files, tests)."""
    return horizon if isinstance(horizon, Horizon) else Horizon(horizon, horizon)


def _rfc1918_reverse_name(name: str) -> bool:
    """Whether an ``in-addr.arpa`` name (or zone apex) names or covers RFC 1918 addresses."""
    if not name.endswith(".in-addr.arpa"):
        return False
    octets = name[:-len(".in-addr.arpa")].split(".")[::-1]
    if len(octets) > 4 or not all(o.isdigit() and int(o) < 256 for o in octets):
        return False
    block = ipaddress.IPv4Network((".".join(octets + ["0"] * (4 - len(octets))), 8 * len(octets)))
    return any(block.overlaps(private) for private in RFC1918)


@dataclass(frozen=True, slots=True)
class NameWalks:
    """The counts behind one snapshot's empty non-terminals."""

    apexes: frozenset[str]
    counts: Mapping[str, WalkCount]
    """Ancestor -> (names below it whose walk passed it, of them visible to everyone, network -> of them
    visible there).  Sharded when built here; in a worker of a gateway, the supervisor's, read from the
    shared view."""
    stops: frozenset[str]
    """Existing names some walk stopped at."""


def make_preparer(nameserver: str = "", instance_data_address: str = "",
                  memo_limit: int = 100_000) -> Callable[[Snapshot], None]:
    """A preparer that fills ``snapshot.extras["dns"]``; ``nameserver`` names the NS of local zones."""
    last: list[DnsData] = []  # the data this preparer built last: a delta's update starts from it

    def prepare(snapshot: Snapshot) -> None:
        data = build_dns_data(snapshot, nameserver, instance_data_address, memo_limit, last[0] if last else None)
        snapshot.extras[EXTRAS_KEY] = data
        last[:] = [data]

    return prepare


def build_dns_data(snapshot: Snapshot, nameserver: str = "", instance_data_address: str = "",
                   memo_limit: int = 100_000, previous: DnsData | None = None) -> DnsData:
    """``previous``: the data of an earlier snapshot; used when ``snapshot`` is a delta of exactly that one."""
    cloud = snapshot.view.cloud
    ns_name = (nameserver or f"ns.{cloud.internal_domain}").rstrip(".").lower()
    serial = snapshot.view.serial & 0xFFFFFFFF
    rfc1918_ptrs = cloud.private_ptrs == "rfc1918"
    for_instances: dict[str, set[tuple[str, str]]] = {}
    for dns_record in cloud.dns_records:
        if dns_record.audience == "instances":
            for_instances.setdefault(dns_record.name, set()).add((dns_record.type, dns_record.value))
    zones: dict[str | None, dict[str, ZoneInfo]] = {}
    for zone in snapshot.zones:
        if rfc1918_ptrs and zone.reverse and zone.network is not None and not _rfc1918_reverse_name(zone.apex):
            continue  # private addresses outside RFC 1918 have no PTRs here: their reverse space is not ours
        soa = (ns_name, f"hostmaster.{cloud.internal_domain}", serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE,
               cloud.negative_ttl)
        zones.setdefault(zone.network, {})[zone.apex] = ZoneInfo(zone.apex, soa, cloud.dns_ttl, ns_name)
    if for_instances:
        _mark_instance_zones(zones, cloud.dns_records, {cloud.internal_domain, cloud.public_domain})
    apexes = frozenset(apex for by_apex in zones.values() for apex in by_apex)
    changes = snapshot.extras.get(CHANGED_NAMES_KEY)
    updated = None
    published = shared_index(snapshot, WALKS_INDEX)
    if published is not None:
        # A worker reading the shared view: its supervisor walked the names (same snapshot, same apexes).
        updated = NameWalks(apexes, published, frozenset())
    elif (previous is not None and isinstance(changes, NameChanges) and changes.since == previous.generation
            and changes.same_zones and previous.walks.apexes == apexes):
        updated = _update_walks(previous.walks, changes, snapshot.names)
    walks = updated if updated is not None else _walk_all(snapshot.names, apexes)
    # Only the view's dns_records hold NS records (instances add addresses and PTRs).
    delegations = frozenset(record.name.lower().rstrip(".") for record in cloud.dns_records
                            if record.type == "NS") - apexes
    extra: dict[str, tuple[LocalRecord, ...]] = {}
    # A view that holds instance-data itself (the Eucalyptus adapter's) decides who gets which names.
    if instance_data_address and "instance-data" not in snapshot.names:
        # Eucalyptus instances find the metadata service by this name, bare or under the internal domain.
        record = (LocalRecord("AAAA" if ":" in instance_data_address else "A", instance_data_address, cloud.dns_ttl),)
        extra[f"instance-data.{cloud.internal_domain}"] = record
        if "instance-data" not in apexes:
            soa = (ns_name, f"hostmaster.{cloud.internal_domain}", serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE,
                   cloud.negative_ttl)
            zones.setdefault(None, {})["instance-data"] = ZoneInfo("instance-data", soa, cloud.dns_ttl, ns_name)
            extra["instance-data"] = record
    network_cidrs: dict[str, tuple[IpNetwork, ...]] = {}
    if cloud.public_name_horizon == "cidr":
        network_cidrs = {n.id: tuple(ipaddress.ip_network(c) for c in n.cidrs) for n in snapshot.view.networks}
    return DnsData(snapshot.generation, snapshot.names, zones, walks, extra, delegations=delegations,
                   memo_limit=memo_limit, split_by_cidr=cloud.public_name_horizon == "cidr",
                   rfc1918_ptrs=rfc1918_ptrs,
                   for_instances={name: frozenset(pairs) for name, pairs in for_instances.items()},
                   network_cidrs=network_cidrs)


_Count = WalkCount


def _walk(name: str, names: Mapping[str, NameEntry], apexes: frozenset[str]) -> tuple[list[str], str | None]:
    """The ancestors of ``name`` that its records make empty non-terminals, up to its apex or the first
    existing name that needs no mark; and that name (None: the walk reached an apex or the root)."""
    passed: list[str] = []
    ancestor = name
    while "." in ancestor and ancestor not in apexes:
        ancestor = ancestor[ancestor.find(".") + 1:]
        if ancestor in apexes:
            break
        entry = names.get(ancestor)
        if entry is not None and not _entry_needs_mark(entry):
            return passed, ancestor
        passed.append(ancestor)
    return passed, None


def _contribution(entry: NameEntry) -> tuple[bool, tuple[str, ...]]:
    return bool(entry.everyone), tuple({network for network, records in entry.by_network if records})


def _counted(count: _Count | None, everyone: bool, networks: tuple[str, ...], sign: int) -> _Count:
    names, visible, by_network = count if count is not None else (0, 0, ())
    tally = dict(by_network)
    for network in networks:
        tally[network] = tally.get(network, 0) + sign
    return (names + sign, visible + sign * everyone,
            tuple(sorted((network, n) for network, n in tally.items() if n)))


def _walk_all(names: Mapping[str, NameEntry], apexes: frozenset[str]) -> NameWalks:
    counts: dict[str, _Count] = {}
    stops: set[str] = set()
    for name, entry in names.items():
        passed, stop = _walk(name, names, apexes)
        if stop is not None:
            stops.add(stop)
        if passed:
            everyone, networks = _contribution(entry)
            for ancestor in passed:
                counts[ancestor] = _counted(counts.get(ancestor), everyone, networks, 1)
    return NameWalks(apexes, ShardedIndex.of(counts), frozenset(stops))


def _update_walks(walks: NameWalks, changes: NameChanges, names: Mapping[str, NameEntry]) -> NameWalks | None:
    """The previous counts with the changed names' walks taken back and walked again; None when a changed
    name lies on some walk, so that other names' walks may change too."""
    if not isinstance(walks.counts, ShardedIndex):
        return None
    if any(name in walks.counts or name in walks.stops for name in changes.names):
        return None
    counts = walks.counts.edit()
    stops = set()
    for name in changes.names:
        # The walk is the same before and after: no name on it changed (checked above).
        passed, stop = _walk(name, names, walks.apexes)
        if stop is not None:
            stops.add(stop)
        for entry, sign in ((changes.previous_names.get(name), -1), (names.get(name), 1)):
            if entry is None:
                continue
            everyone, networks = _contribution(entry)
            for ancestor in passed:
                count = _counted(counts.get(ancestor), everyone, networks, sign)
                if count[0]:
                    counts[ancestor] = count
                else:
                    del counts[ancestor]
    # A new frozenset only when a walk stopped somewhere new (copying it costs O(stops)).
    return NameWalks(walks.apexes, counts.freeze(), walks.stops if stops <= walks.stops else walks.stops | stops)


def _mark_instance_zones(zones: dict[str | None, dict[str, ZoneInfo]], records: Iterable[DnsRecord],
                         own_apexes: set[str]) -> None:
    """A zone that only ``dns_records`` fill, all of them for instances only, is for instances only."""
    shared = zones.get(None, {})
    everyone: set[str] = set()
    restricted: set[str] = set()
    for record in records:
        apex = _closest_apex(shared, record.name)
        if apex is None or apex in own_apexes:
            continue
        (restricted if record.audience == "instances" else everyone).add(apex)
    for apex in restricted - everyone:
        shared[apex] = dataclasses.replace(shared[apex], instances_only=True)


def _closest_apex(zones: dict[str, ZoneInfo], name: str) -> str | None:
    candidate = name
    while candidate not in zones:
        dot = candidate.find(".")
        if dot < 0:
            return None
        candidate = candidate[dot + 1:]
    return candidate


def _entry_needs_mark(entry: NameEntry) -> bool:
    # A name with records only in some networks is still an empty non-terminal for the others.
    return not entry.everyone or any(not records for _, records in entry.by_network)


def dns_data(snapshot: Snapshot) -> DnsData:
    """The snapshot's DNS data, built now if no preparer ran (tests, tools)."""
    data = snapshot.extras.get(EXTRAS_KEY)
    if data is None:
        data = snapshot.extras[EXTRAS_KEY] = build_dns_data(snapshot)
    return cast(DnsData, data)
