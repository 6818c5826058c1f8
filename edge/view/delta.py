"""Build a snapshot from the previous one by applying what changed.

A new serial of a large view usually changes a few instances.  Instead of
indexing every instance again, :func:`apply_delta` copies the previous
snapshot's indexes shard by shard (:mod:`edge.view.sharded`: only the shards
the changed keys fall in are copied), removes what the removed or changed instances contributed, adds
what the new or changed ones contribute, and recomputes only the DNS names those
instances touch.  The result is equal, index by index, to a full build of the
same view (``tests/view/test_delta.py`` checks this on random mutations).

It applies only when the view's ``cloud`` and ``networks`` are those of the
previous snapshot: they shape every name and zone, so any change there means a
full build.  Instances count as unchanged when they are the very objects of
the previous snapshot (the decoder reuses them for unchanged document text).

Cross-instance rules hold for the whole new view: a changed instance whose id,
address or MAC is already taken makes :func:`apply_delta` return None, and the
caller then runs the full parser, which explains the problem.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, cast

from edge.view.keyspace import InstanceChanges
from edge.view.model import DEFAULT_NETWORK, Instance, View
from edge.view.sharded import ShardedEditor, ShardedIndex
from edge.view.snapshot import (
    CHANGED_NAMES_KEY,
    COUNTS_KEY,
    IndexState,
    LocalRecord,
    NameChanges,
    Preparer,
    Snapshot,
    ViewCounts,
    _Indexer,
    _NameTable,
    _zones,
    add_contributor,
    contributor_ids,
    drop_contributor,
    next_generation,
    run_preparers,
)

K = TypeVar("K")
V = TypeVar("V")


def applies(previous: Snapshot, view: View) -> bool:
    """True when ``view`` can be built as a delta of ``previous``."""
    old = previous.view
    return old.cloud == view.cloud and old.networks == view.networks and old.format == view.format


def apply_delta(previous: Snapshot, state: IndexState, view: View,
                preparers: Iterable[Preparer] = (),
                changes: InstanceChanges | None = None) -> tuple[Snapshot, IndexState] | None:
    """The snapshot of ``view`` built from ``previous``; None when the view breaks a uniqueness rule.

    ``changes``, when given, says which instances differ from ``previous.view`` (a keyspace's
    view, whose instances are in id order and unique by construction): only those are looked at.
    Without it every instance of ``view`` is compared with the served one.
    """
    old_instances = previous.instances
    old_get = old_instances.get
    if changes is not None:
        added = [instance for instance in changes.upserted if old_get(instance.id) is not instance]
        removed = [old_instances[key] for key in changes.removed if key in old_instances]
        removed += [old_instances[i.id] for i in added if i.id in old_instances]
        reordered = False  # id order before and after
    else:
        # Python-level loops rather than one C-level set operation over 100k ids: the build
        # thread must hand the interpreter lock back to the event loop every few milliseconds.
        added = [instance for instance in view.instances if old_get(instance.id) is not instance]
        new_ids: set[str] = set()
        remember = new_ids.add
        for instance in view.instances:
            remember(instance.id)
        if len(new_ids) != len(view.instances):
            return None  # duplicate instance ids
        removed = [instance for key, instance in old_instances.items() if key not in new_ids]
        removed += [old_instances[i.id] for i in added if i.id in old_instances]
        reordered = bool(state.shared) and _reordered(previous.view, view, new_ids, old_instances)
        # Emptied here rather than freed at return: one free of 100k entries is one long C call.
        pop = new_ids.pop
        while new_ids:
            pop()

    # Each index's next version copies only the shards the changed keys fall in.
    instances = _editor(old_instances)
    by_private = _editor(previous.by_private)
    by_public = _editor(previous.by_public)
    by_mac = _editor(previous.by_mac)
    contributors = _editor(state.contributors)
    shared = set(state.shared)
    flat_prefixes = dict(state.flat_prefixes)
    public_zones = dict(state.public_zones)
    cloud = view.cloud
    affected: set[str] = set()

    for instance in removed:
        del instances[instance.id]
        for interface in instance.interfaces:
            for address in interface.private_ips + interface.ipv6s:
                del by_private[(interface.network, address)]
            for address in interface.metadata_sources:
                del by_private[(DEFAULT_NETWORK, address)]
            if interface.public_ip is not None:
                del by_public[interface.public_ip]
            if interface.mac:
                del by_mac[interface.mac]
        contribution = _contribution(view, instance)
        for name in contribution.names.touched():
            drop_contributor(contributors, name, instance.id, shared)
        affected |= contribution.names.touched()
        _subtract(flat_prefixes, contribution.flat_prefixes)
        _subtract(public_zones, contribution.public_zones)

    for instance in added:
        instances[instance.id] = instance
        contribution = _contribution(view, instance)
        if not (_claim(by_private, contribution.by_private) and _claim(by_public, contribution.by_public)
                and _claim(by_mac, contribution.by_mac)):
            return None  # address or MAC already used by another instance
        if _self_conflict(instance, contribution):
            return None
        for name in contribution.names.touched():
            add_contributor(contributors, name, instance.id)
        affected |= contribution.names.touched()
        _add(flat_prefixes, contribution.flat_prefixes)
        _add(public_zones, contribution.public_zones)

    if reordered:
        affected |= shared
    names = _editor(previous.names)
    if affected:
        # Every instance that adds to an affected name contributes again, in document order,
        # so records within a name come out in the order a full build gives them.
        needed = {i for name in affected for i in contributor_ids(contributors, name)}
        table = _NameTable({}, set(), only=affected)
        indexer = _Indexer(cloud.dns_ttl, cloud.private_namer(), cloud.public_namer(), _DISCARD, _DISCARD, _DISCARD,
                           table, {}, {})
        if changes is not None:
            # A keyspace's document order is id order: no need to walk the view to find it.
            for instance_id in sorted(needed):
                indexer.index(instances[instance_id])
        else:
            for instance in view.instances:
                if instance.id in needed:
                    indexer.index(instance)
        for record in cloud.dns_records:
            if record.name in affected:
                table.add(record.name, LocalRecord(record.type, record.value, record.ttl))
        fresh = table.freeze()
        # The scratch table saw every contributor of the affected names, in document order.
        shared -= affected
        shared |= table.shared & affected
        for name in affected:
            entry = fresh.get(name)
            if entry is None:
                names.pop(name, None)
            else:
                names[name] = entry

    zones = previous.zones
    if flat_prefixes.keys() != state.flat_prefixes.keys() or public_zones.keys() != state.public_zones.keys():
        zones = _zones(view, flat_prefixes.keys(), public_zones.keys())
    snapshot = Snapshot(
        view=view, generation=next_generation(), built_at=time.time(), instances=instances.freeze(),
        by_private=by_private.freeze(), by_public=by_public.freeze(), by_mac=by_mac.freeze(), names=names.freeze(),
        zones=zones, network_ids=previous.network_ids,
    )
    counted = previous.extras.get(COUNTS_KEY)
    if counted is not None:
        # Counted from the previous counts: counting interfaces afresh walks every instance.
        interfaces = cast(ViewCounts, counted)["interfaces"]
        interfaces += sum(len(i.interfaces) for i in added) - sum(len(i.interfaces) for i in removed)
        snapshot.extras[COUNTS_KEY] = ViewCounts(networks=len(view.networks), instances=len(snapshot.instances),
                                                 interfaces=interfaces, names=len(snapshot.names))
    snapshot.extras[CHANGED_NAMES_KEY] = NameChanges(previous.generation, previous.names, frozenset(affected),
                                                     zones is previous.zones)
    if preparers:
        run_preparers(snapshot, preparers)
    # Without preparers here, the caller runs them with run_preparers, which drops the changes.
    return snapshot, IndexState(contributors.freeze(), shared, flat_prefixes, public_zones)


def _reordered(old: View, new: View, new_ids: set[str], old_instances: Mapping[str, Instance]) -> bool:
    """Whether instances in both views appear in another order (names shared by several move)."""
    return ([i.id for i in old.instances if i.id in new_ids]
            != [i.id for i in new.instances if i.id in old_instances])


def _editor(index: Mapping[K, V]) -> ShardedEditor[K, V]:
    """The next version of a snapshot index (a plain mapping is sharded first: an index built elsewhere)."""
    if not isinstance(index, ShardedIndex):
        index = ShardedIndex.of(index)
    return index.edit()


def _claim(index: ShardedEditor[K, V], own: Mapping[K, V]) -> bool:
    """Add ``own`` to ``index``; False as soon as one of its keys is already there."""
    for key, value in own.items():
        if key in index:
            return False
        index[key] = value
    return True


class _Discard(dict[Any, Any]):
    """An index that keeps nothing: recomputing names needs none of the attachments."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


_DISCARD = _Discard()


def _scratch(view: View, table: _NameTable) -> _Indexer:
    cloud = view.cloud
    return _Indexer(cloud.dns_ttl, cloud.private_namer(), cloud.public_namer(), {}, {}, {}, table, {}, {})


def _contribution(view: View, instance: Instance) -> _Indexer:
    """What ``instance`` alone adds to every index."""
    indexer = _scratch(view, _NameTable())
    indexer.index(instance)
    return indexer


def _self_conflict(instance: Instance, contribution: _Indexer) -> bool:
    """True when the instance repeats one of its own addresses or MACs (the scratch dicts merged them)."""
    private = public = 0
    for interface in instance.interfaces:
        private += len(interface.private_ips) + len(interface.ipv6s) + len(interface.metadata_sources)
        public += interface.public_ip is not None
    return (private != len(contribution.by_private) or public != len(contribution.by_public)
            or len(instance.interfaces) - contribution.without_mac != len(contribution.by_mac))


def _subtract(counts: dict[str, int], by: dict[str, int]) -> None:
    for key, count in by.items():
        left = counts[key] - count
        if left:
            counts[key] = left
        else:
            del counts[key]


def _add(counts: dict[str, int], by: dict[str, int]) -> None:
    for key, count in by.items():
        counts[key] = counts.get(key, 0) + count

