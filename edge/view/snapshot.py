"""An immutable, indexed snapshot of a view: what every request handler reads.

The snapshot is built aside (off the event loop), then swapped in with one
assignment (see :mod:`edge.view.store`).  Handlers look instances and names up
in these dictionaries; they never scan or parse the view on a request.

DNS data is indexed by lower-case owner name (no trailing dot).  Each name
carries the records everyone sees plus per-network overrides, which is how
split horizon works: a private name exists only inside its own network, and a
public name answers the private address to clients in the instance's network.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

from edge.errors import ViewInvalid
from edge.view.model import DEFAULT_NETWORK, Instance, Interface, Value, View
from edge.view.parse import cross_instance_problems
from edge.view.sharded import ShardedIndex

_generations = itertools.count(1)


class Attachment(Value, frozen=True):
    """An instance as seen through one of its interfaces (who is asking)."""

    instance: Instance
    interface: Interface


class LocalRecord(Value, frozen=True):
    type: str
    """``A``, ``AAAA``, ``PTR``, ``CNAME``, ``TXT``, ``SRV``, ``MX`` or ``NS``."""
    value: str
    ttl: int


class NameEntry(Value, frozen=True):
    """The records of one owner name, by horizon."""

    everyone: tuple[LocalRecord, ...] = ()
    """What clients in any network see (empty: the name does not exist for them)."""
    by_network: tuple[tuple[str, tuple[LocalRecord, ...]], ...] = ()
    """Complete record sets that replace ``everyone`` for clients in that network."""

    def records_for(self, network: str) -> tuple[LocalRecord, ...]:
        for network_id, records in self.by_network:
            if network_id == network:
                return records
        return self.everyone


class Zone(Value, frozen=True):
    """A local zone apex; ``network`` None means it is served to every network."""

    apex: str
    network: str | None = None
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    view: View
    generation: int
    """Process-local, increasing with every build; keys per-snapshot render caches."""
    built_at: float
    instances: Mapping[str, Instance]
    by_private: Mapping[tuple[str, str], Attachment]
    """(network, address) -> attachment; IPv4 and IPv6 private addresses."""
    by_public: Mapping[str, Attachment]
    by_mac: Mapping[str, Attachment]
    names: Mapping[str, NameEntry]
    zones: tuple[Zone, ...]
    network_ids: frozenset[str]
    extras: dict[str, object] = field(default_factory=dict, compare=False)
    """Protocol-prepared data, filled by preparers before the swap, read-only afterwards."""

    @property
    def serial(self) -> int:
        return self.view.serial

    def attachment_for(self, network: str, address: str) -> Attachment | None:
        return self.by_private.get((network, address))

    def counts(self) -> ViewCounts:
        """Sizes for logs and ``/view``; counted once, in the build thread, by :func:`remember_counts`."""
        cached = self.extras.get(COUNTS_KEY)
        if cached is not None:
            return cast(ViewCounts, cached).copy()
        return {
            "networks": len(self.view.networks),
            "instances": len(self.instances),
            "interfaces": sum(len(i.interfaces) for i in self.view.instances),
            "names": len(self.names),
        }


class ViewCounts(TypedDict):
    """A snapshot's sizes, as logged with each accepted view and shown by ``/view``."""

    networks: int
    instances: int
    interfaces: int
    names: int


COUNTS_KEY = "view.counts"


def remember_counts(snapshot: Snapshot) -> None:
    """Count once, off the event loop: counting interfaces walks every instance."""
    snapshot.extras[COUNTS_KEY] = snapshot.counts()


Preparer = Callable[[Snapshot], None]
"""Fills ``snapshot.extras`` with a protocol's derived data; runs off the loop."""

CHANGED_NAMES_KEY = "view.changed_names"


@dataclass(frozen=True, slots=True)
class NameChanges:
    """What a delta build changed in ``names``, in ``snapshot.extras[CHANGED_NAMES_KEY]`` while its
    preparers run (and only then): a preparer that kept its data for the snapshot of generation ``since``
    can update that data for these names instead of rebuilding it from every name."""

    since: int
    """Generation of the snapshot the delta started from."""
    previous_names: Mapping[str, NameEntry]
    """That snapshot's ``names``."""
    names: frozenset[str]
    """Names added, removed or changed."""
    same_zones: bool
    """The zones are those of that snapshot."""


def run_preparers(snapshot: Snapshot, preparers: Iterable[Preparer]) -> None:
    """Each preparer on ``snapshot``, then the delta's ``NameChanges`` dropped: kept, they would hold the
    previous snapshot's names alive."""
    try:
        for prepare in preparers:
            prepare(snapshot)
    finally:
        snapshot.extras.pop(CHANGED_NAMES_KEY, None)


def reverse_name(address: str) -> str:
    """``10.0.1.5`` -> ``5.1.0.10.in-addr.arpa``; IPv6 -> nibble ``ip6.arpa`` name."""
    if ":" not in address:
        a, b, c, d = address.split(".")
        return f"{d}.{c}.{b}.{a}.in-addr.arpa"
    return ipaddress.ip_address(address).reverse_pointer


def reverse_zone_of(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """The octet (IPv4) or nibble (IPv6) aligned reverse zone that covers ``network``."""
    if network.version == 4:
        octets = max(1, network.prefixlen // 8)
        parts = str(network.network_address).split(".")[:octets]
        return ".".join(reversed(parts)) + ".in-addr.arpa"
    nibbles = max(1, network.prefixlen // 4)
    digits = network.network_address.exploded.replace(":", "")[:nibbles]
    return ".".join(reversed(digits)) + ".ip6.arpa"


def _public_reverse_zone(address: str) -> str:
    if ":" not in address:
        a, b, c, _ = address.split(".")
        return f"{c}.{b}.{a}.in-addr.arpa"
    return reverse_zone_of(ipaddress.ip_network(f"{address}/64", strict=False))


class _NameTable:
    """Accumulates records per name and horizon while a snapshot is built.

    With ``contributors`` set, it also notes which instance (``owner``) added
    each name, so a later build can recompute just the names a change touches.
    """

    __slots__ = ("everyone", "scoped", "public_override", "contributors", "shared", "owner", "only")

    def __init__(self, contributors: dict[str, str | tuple[str, ...]] | None = None,
                 shared: set[str] | None = None, only: set[str] | None = None) -> None:
        self.everyone: dict[str, list[LocalRecord]] = {}
        self.scoped: dict[str, dict[str, list[LocalRecord]]] = {}
        self.public_override: dict[str, dict[str, list[LocalRecord]]] = {}
        self.contributors = contributors
        self.shared = shared if shared is not None else set()
        self.owner: str | None = None
        self.only = only
        """When set, names outside it are ignored (a delta build recomputing a few names)."""

    def add(self, name: str, record: LocalRecord, network: str | None = None) -> None:
        if self.only is not None and name not in self.only:
            return
        contributors = self.contributors
        adding = self.owner
        if contributors is not None and adding is not None:
            owner = contributors.setdefault(name, adding)
            if owner is not adding:
                # Another instance already added to this name; if to this very horizon, the
                # order of the two instances in the document shows in the records.
                if name in self.everyone if network is None else network in self.scoped.get(name, ()):
                    self.shared.add(name)
                # add_contributor, inline: overlapping networks make this the common case.
                if isinstance(owner, str):
                    if owner != adding:
                        contributors[name] = (owner, adding)
                elif adding not in owner:
                    contributors[name] = owner + (adding,)
        if network is None:
            bucket = self.everyone.get(name)
            if bucket is None:
                self.everyone[name] = [record]
            else:
                bucket.append(record)
            return
        by_network = self.scoped.get(name)
        if by_network is None:
            self.scoped[name] = {network: [record]}
            return
        bucket = by_network.get(network)
        if bucket is None:
            by_network[network] = [record]
        else:
            bucket.append(record)

    def override(self, name: str, network: str, record: LocalRecord) -> None:
        """Within ``network``, ``record`` replaces the public address records of ``name``."""
        if self.only is not None and name not in self.only:
            return
        bucket = self.public_override.setdefault(name, {}).setdefault(network, [])
        if bucket and self.contributors is not None and type(self.contributors.get(name)) is tuple:
            self.shared.add(name)
        bucket.append(record)

    def touched(self) -> set[str]:
        return self.everyone.keys() | self.scoped.keys() | self.public_override.keys()

    def freeze(self, only: set[str] | None = None) -> dict[str, NameEntry]:
        out: dict[str, NameEntry] = {}
        everyone, scoped, overrides = self.everyone, self.scoped, self.public_override
        for name, by_network in scoped.items():
            if name in everyone or name in overrides or (only is not None and name not in only):
                continue
            # The common case: a private name or PTR that exists only inside networks.
            if len(by_network) == 1:
                for network, records in by_network.items():
                    out[name] = NameEntry((), ((network, tuple(records)),))
            else:
                out[name] = NameEntry((), tuple([(network, tuple(records))
                                                 for network, records in sorted(by_network.items())]))
        for name in everyone.keys() | overrides.keys():
            if only is not None and name not in only:
                continue
            listed = everyone.get(name, ())
            common = (listed[0],) if len(listed) == 1 else tuple(dict.fromkeys(listed))
            replace = overrides.get(name)
            if name not in scoped:
                if replace is None:
                    out[name] = NameEntry(common, ())  # a public PTR
                    continue
                if len(replace) == 1 and all(r.type in ("A", "AAAA") for r in common):
                    # A public name: its private address replaces the public one inside its network.
                    for network, records in replace.items():
                        out[name] = NameEntry(common, ((network, tuple(dict.fromkeys(records))),))
                    continue
            own = scoped.get(name, {})
            replace = replace or {}
            horizons = []
            for network in sorted(set(own) | set(replace)):
                override = replace.get(network)
                base = [r for r in common if r.type not in ("A", "AAAA")] + override if override else list(common)
                horizons.append((network, tuple(dict.fromkeys(base + own.get(network, [])))))
            out[name] = NameEntry(common, tuple(horizons))
        return out


MutableContributors = Any
"""A dict while a full build runs, a :class:`ShardedEditor` while a delta does (``get``, item set and delete)."""


def add_contributor(contributors: MutableContributors, name: str, instance_id: str) -> None:
    """Note that ``instance_id`` adds records to ``name``."""
    owner = contributors.get(name)
    if owner is None:
        contributors[name] = instance_id
    elif isinstance(owner, str):
        if owner != instance_id:
            contributors[name] = (owner, instance_id)
    elif instance_id not in owner:
        contributors[name] = owner + (instance_id,)


def drop_contributor(contributors: MutableContributors, name: str, instance_id: str,
                     shared: set[str]) -> None:
    owner = contributors.get(name)
    if owner is None:
        return
    if isinstance(owner, str):
        if owner == instance_id:
            del contributors[name]
        return
    rest = tuple(i for i in owner if i != instance_id)
    if len(rest) == 1:
        contributors[name] = rest[0]
        shared.discard(name)
    else:
        contributors[name] = rest


def contributor_ids(contributors: MutableContributors, name: str) -> tuple[str, ...]:
    owner = contributors.get(name)
    if owner is None:
        return ()
    return (owner,) if isinstance(owner, str) else owner


@dataclass(slots=True)
class IndexState:
    """What a full build learns beyond the snapshot itself, so the next build can apply a delta.

    Counts (not sets) of flat-network /24 prefixes and public reverse zones, because a zone
    disappears only when the last address in it does.
    """

    contributors: Mapping[str, str | tuple[str, ...]]
    """Name -> id (or ids) of the instances that add records to it (``dns_records`` not included); a
    :class:`ShardedIndex` once the build is done, edited shard by shard by the next delta."""
    shared: set[str]
    """Names to which several instances add records in one horizon (say, two addresses rendering the
    same name): their records' order follows the instances' order in the document.  Overlapping
    networks reusing an address do not count: each network is its own horizon."""
    flat_prefixes: dict[str, int]
    public_zones: dict[str, int]


@dataclass(slots=True)
class _Indexer:
    """Adds one instance to the indexes: the one definition full and incremental builds share."""

    ttl: int
    private_name: Callable[[str], str]
    public_name: Callable[[str], str]
    by_private: dict[tuple[str, str], Attachment]
    by_public: dict[str, Attachment]
    by_mac: dict[str, Attachment]
    names: _NameTable
    flat_prefixes: dict[str, int]
    public_zones: dict[str, int]
    interfaces: int = 0
    private_keys: int = 0
    """Interfaces and (network, address) keys indexed: fewer entries in the indexes mean duplicates."""
    public_addresses: int = 0
    without_mac: int = 0
    """Interfaces whose MAC the control plane does not know (not in ``by_mac``)."""

    def index(self, instance: Instance) -> None:
        ttl = self.ttl
        private_name, public_name = self.private_name, self.public_name
        by_private, by_public, by_mac = self.by_private, self.by_public, self.by_mac
        names = self.names
        add = names.add
        names.owner = instance.id
        flat_prefixes = self.flat_prefixes
        self.interfaces += len(instance.interfaces)
        keys = 0
        for interface in instance.interfaces:
            attachment = Attachment(instance, interface)
            network = interface.network
            if interface.mac:
                by_mac[interface.mac] = attachment
            else:
                self.without_mac += 1
            primary_name = None
            for address in interface.private_ips:
                by_private[(network, address)] = attachment
                keys += 1
                name = private_name(address)
                if primary_name is None:
                    primary_name = name
                add(name, LocalRecord("AAAA" if ":" in address else "A", address, ttl), network)
                add(reverse_name(address), LocalRecord("PTR", name, ttl), network)
                if network == DEFAULT_NETWORK and ":" not in address:
                    prefix = address.rsplit(".", 1)[0]
                    flat_prefixes[prefix] = flat_prefixes.get(prefix, 0) + 1
            assert primary_name is not None
            for address in interface.metadata_sources:
                by_private[(DEFAULT_NETWORK, address)] = attachment
                keys += 1
            for address in interface.ipv6s:
                by_private[(network, address)] = attachment
                keys += 1
                add(primary_name, LocalRecord("AAAA", address, ttl), network)
                add(reverse_name(address), LocalRecord("PTR", primary_name, ttl), network)
            public = interface.public_ip
            if public is not None:
                by_public[public] = attachment
                self.public_addresses += 1
                name = public_name(public)
                add(name, LocalRecord("AAAA" if ":" in public else "A", public, ttl))
                names.override(name, network, LocalRecord("A", interface.primary_ip, ttl))
                add(reverse_name(public), LocalRecord("PTR", name, ttl))
                zone = _public_reverse_zone(public)
                self.public_zones[zone] = self.public_zones.get(zone, 0) + 1
        self.private_keys += keys
        names.owner = None

    def saw_duplicates(self, instances: Mapping[str, Instance], indexed: int) -> bool:
        """Whether two of the ``indexed`` instances share an id, private key, public address or MAC."""
        return (len(instances) != indexed or len(self.by_mac) != self.interfaces - self.without_mac
                or len(self.by_private) != self.private_keys or len(self.by_public) != self.public_addresses)


def _indexer(view: View, names: _NameTable) -> _Indexer:
    cloud = view.cloud
    return _Indexer(cloud.dns_ttl, cloud.private_namer(), cloud.public_namer(), {}, {}, {}, names, {}, {})


def build_snapshot(view: View, preparers: Iterable[Preparer] = ()) -> Snapshot:
    """Index ``view``; then run each preparer so protocols can add derived data."""
    return build_snapshot_tracked(view, preparers)[0]


def build_snapshot_tracked(view: View, preparers: Iterable[Preparer] = (),
                           check_unique: bool = False) -> tuple[Snapshot, IndexState]:
    """:func:`build_snapshot`, also returning what :mod:`edge.view.delta` needs for the next build.

    ``check_unique`` enforces the rules across instances (unique ids, addresses, MACs) for a
    view parsed without them: the indexes find duplicates for free, and only then is the
    view walked again to explain them.  Raises :class:`ViewInvalid`.
    """
    contributors: dict[str, str | tuple[str, ...]] = {}
    state = IndexState(contributors, set(), {}, {})
    names = _NameTable(contributors, state.shared)
    indexer = _indexer(view, names)
    indexer.flat_prefixes, indexer.public_zones = state.flat_prefixes, state.public_zones
    instances: dict[str, Instance] = {}
    index = indexer.index
    for instance in view.instances:
        instances[instance.id] = instance
        index(instance)
    if check_unique and indexer.saw_duplicates(instances, len(view.instances)):
        raise ViewInvalid(cross_instance_problems(view.instances))
    for record in view.cloud.dns_records:
        names.add(record.name, LocalRecord(record.type, record.value, record.ttl))
    # Sharded, so the next serial's delta copies only the shards its changes fall in.
    snapshot = Snapshot(
        view=view, generation=next(_generations), built_at=time.time(), instances=ShardedIndex.of(instances),
        by_private=ShardedIndex.of(indexer.by_private), by_public=ShardedIndex.of(indexer.by_public),
        by_mac=ShardedIndex.of(indexer.by_mac), names=ShardedIndex.of(names.freeze()),
        zones=_zones(view, state.flat_prefixes.keys(), state.public_zones.keys()),
        network_ids=network_ids_of(view),
    )
    state.contributors = ShardedIndex.of(state.contributors)
    # Counted while indexing, so remember_counts need not walk the instances again.
    counts: ViewCounts = {"networks": len(view.networks), "instances": len(instances),
                          "interfaces": indexer.interfaces, "names": len(snapshot.names)}
    snapshot.extras[COUNTS_KEY] = counts
    for prepare in preparers:
        prepare(snapshot)
    return snapshot, state


def network_ids_of(view: View) -> frozenset[str]:
    return frozenset({n.id for n in view.networks} | {DEFAULT_NETWORK})


def next_generation() -> int:
    return next(_generations)


def _zones(view: View, flat_prefixes: Iterable[str], public_zones: Iterable[str]) -> tuple[Zone, ...]:
    cloud = view.cloud
    zones = {Zone(cloud.internal_domain), Zone(cloud.public_domain)}
    declared_flat = False
    for network in view.networks:
        for cidr in network.cidrs:
            zones.add(Zone(reverse_zone_of(ipaddress.ip_network(cidr)), network.id, reverse=True))
            declared_flat = declared_flat or network.id == DEFAULT_NETWORK
    if not declared_flat:
        for prefix in flat_prefixes:
            zones.add(Zone(".".join(reversed(prefix.split("."))) + ".in-addr.arpa", DEFAULT_NETWORK, reverse=True))
    zones.update(Zone(apex, None, reverse=True) for apex in public_zones)
    apexes = {z.apex for z in zones}
    for record in cloud.dns_records:
        if not any(record.name == apex or record.name.endswith("." + apex) for apex in apexes):
            zones.add(Zone(record.name))
            apexes.add(record.name)
    return tuple(sorted(zones, key=lambda z: (-z.apex.count("."), z.apex, z.network or "")))
