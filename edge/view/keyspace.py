"""The view as a keyspace: one key per part, so a change costs what it changes.

A control plane that keeps the view in a key-value store (etcd) writes it as
keys under one prefix rather than as one document:

=========================  ===============================================
``PREFIX/serial``          the view's ``serial``, a decimal integer
``PREFIX/cloud``           the view's ``cloud`` object (JSON)
``PREFIX/networks/<id>``   one element of ``networks`` (JSON, its ``id`` is ``<id>``; the flat network ``""`` is ``PREFIX/networks/``)
``PREFIX/instances/<id>``  one element of ``instances`` (JSON, its ``id`` is ``<id>``)
=========================  ===============================================

:class:`Keyspace` mirrors those keys and turns them into a :class:`View`.  It
is pure (no I/O): a source feeds it the keys it reads and the changes it is
told about, in revision order.  Each value is checked on its own as it
arrives; a value that does not parse is a problem of that one part (logged,
counted, and the previous value of that part kept), so one bad instance never
holds back the others.  Unchanged instances stay the very same objects from
one view to the next, which lets the poller build each new serial as a delta of
the served snapshot (:mod:`edge.view.delta`) in time proportional to the
change.  Instances come in key order (their ids sorted), which is the order in
which records of a name shared by several instances are served.

The mirror keeps each instance as its checked value only, not the JSON text it
came as (that text is most of an instance's size): the texts of the instances
changed since the view last handed on are kept until the next one is (a
journal record is made of them), and a whole document is encoded again from
the values (:func:`instance_json`), which parse back to the very same values.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from edge.errors import ViewInvalid
from edge.logs import event
from edge.view.model import FORMAT, Cloud, Instance, Network, View
from edge.view.parse import cidr_table_of, parse_view
from edge.view.wire import INSTANCE_DECODER, Cidrs, Problems, instance_from_wire

log = logging.getLogger("edge.view")

SERIAL = "serial"
CLOUD = "cloud"
NETWORKS = "networks/"
INSTANCES = "instances/"


@dataclass(frozen=True, slots=True)
class InstanceChanges:
    """What changed in the instances between two views a source delivered, one after the other."""

    base: View
    """The view these changes apply to (the poller uses them only when it serves that very view)."""
    upserted: tuple[Instance, ...]
    """Instances added or replaced since ``base``, in id order."""
    texts: tuple[bytes, ...]
    """The JSON text of each of ``upserted``, as it arrived (what the last-good journal records)."""
    removed: tuple[str, ...]
    """Ids of the instances of ``base`` that are gone."""


@dataclass(frozen=True, slots=True)
class PreparedView:
    """A view a source has decoded and validated itself, instead of document bytes."""

    view: View
    document: Callable[[], bytes]
    """The same view as an ``edge-view/1`` document (for the last-good-view file); costs O(view), its
    instances encoded again from their values."""
    incremental: bool
    """Instances also in the previously delivered view are the very same objects (build it as a delta)."""
    changes: InstanceChanges | None = None
    """What changed since the previously delivered view; None when unknown (compare every instance)."""


@dataclass(frozen=True, slots=True)
class _Part:
    """The cloud or a network: the last good text (what a document is made of) and its checked value."""

    text: bytes
    value: Any


_ENCODER = msgspec.json.Encoder()


def instance_json(instance: Instance) -> bytes:
    """``instance`` as an element of an ``edge-view/1`` document; it parses back to an equal Instance.

    The model's fields are the schema's, under the same names (the model's builder is generated
    from them and fails at import when one is missing), except the two mappings the model keeps
    as pairs.
    """
    return _ENCODER.encode(_as_wire(instance))


def _as_wire(instance: Instance) -> Instance:
    return msgspec.structs.replace(instance, tags=dict(instance.tags), block_devices=dict(instance.block_devices))


class Keyspace:
    """The keys under one prefix, each checked as it arrives, and the view they make."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.keys: dict[str, int] = {}
        """Every key name present but the instances' (good, bad or unknown) -> its mod revision."""
        self.instance_keys: dict[str, int] = {}
        """Instance id -> the mod revision of its key ``instances/ID`` (good or bad); kept by id, under the
        instance's own string once it is held, rather than one more string per instance."""
        self.serial: int | None = None
        self.cloud: _Part | None = None
        self.networks: dict[str, _Part] = {}
        self.instances: dict[str, Instance] = {}
        self.order: list[str] = []
        """Instance ids, sorted; ``values`` holds their instances in the same order, so a view's tuple
        of instances is one C-level copy rather than a loop over every instance."""
        self.values: list[Instance] = []
        self.refused_instances: dict[str, bytes] = {}
        """Instance id -> its latest text, refused: tried again when the networks change (an instance written
        before the network it is in is refused until the network arrives)."""
        self.problems = 0
        """Values refused so far (each logged)."""
        self.rejected: dict[str, str] = {}
        """Key name -> why its current value is refused (until a good value or a deletion)."""
        self._cidrs: Cidrs | None = None
        """The networks' CIDRs, which instances are checked against (None: to be computed)."""
        self._network_list: list[Any] = []
        self._deferred_networks = False
        """Within :meth:`reset`: network changes are applied to the instances once, after the last network."""
        self._networks_dirty = False
        self._bulk = False
        """Within :meth:`reset`: instances are placed in ``instances`` only, ordered at the end."""
        self.changed = False
        """Something changed since :meth:`view` last ran."""
        self._view: tuple[View, Callable[[], bytes]] | None = None
        self._delivered: View | None = None
        """The view last handed on by :meth:`prepared` (what the tracked changes are relative to)."""
        self._touched: set[str] | None = set()
        """Ids of the instances placed or removed since :meth:`prepared` last delivered a view; None when
        every instance may have changed (the networks changed, which checks each one again)."""
        self._texts: dict[str, bytes] = {}
        """The texts of the instances of ``_touched`` still present (once a view has been delivered:
        they are what :class:`InstanceChanges` reports)."""

    @property
    def key_count(self) -> int:
        """Keys present (good, bad or unknown): compared with the store's count."""
        return len(self.keys) + len(self.instance_keys)

    def revision_of(self, name: str) -> int | None:
        """The mod revision of the key ``name`` held (None: not held)."""
        if name.startswith(INSTANCES) and len(name) > len(INSTANCES):
            return self.instance_keys.get(name[len(INSTANCES):])
        return self.keys.get(name)

    # -- changes ------------------------------------------------------------------------------

    def put(self, name: str, text: bytes, revision: int) -> None:
        if name.startswith(INSTANCES) and len(name) > len(INSTANCES):
            self.instance_keys[name[len(INSTANCES):]] = revision
        else:
            self.keys[name] = revision
        self.changed = True
        try:
            if name == SERIAL:
                self._put_serial(text)
            elif name == CLOUD:
                self._put_cloud(text)
            elif name.startswith(NETWORKS):  # the flat network's id is "" (key ``networks/``)
                self._put_network(name[len(NETWORKS):], text)
            elif name.startswith(INSTANCES) and len(name) > len(INSTANCES):
                self._put_instance(name[len(INSTANCES):], text)
            else:
                raise _Refused("not a key of the view layout (serial, cloud, networks/ID, instances/ID)")
        except _Refused as refused:
            if name.startswith(INSTANCES):
                self.refused_instances[name[len(INSTANCES):]] = text
            self._refuse(name, str(refused))
            return
        except Exception as exc:  # noqa: BLE001 - a fault checking one value must not stop the source
            event(log, logging.ERROR, "view key could not be checked", exc_info=True, source=self.where, key=name)
            self._refuse(name, f"could not be checked: {exc!r}")
            return
        self.rejected.pop(name, None)
        if name.startswith(INSTANCES):
            self.refused_instances.pop(name[len(INSTANCES):], None)

    def delete(self, name: str) -> None:
        if name.startswith(INSTANCES) and len(name) > len(INSTANCES):
            if self.instance_keys.pop(name[len(INSTANCES):], None) is None:
                return
        elif self.keys.pop(name, None) is None:
            return
        self.changed = True
        self.rejected.pop(name, None)
        if name == SERIAL:
            self.serial = None
        elif name == CLOUD:
            self.cloud = None
        elif name.startswith(NETWORKS):
            if self.networks.pop(name[len(NETWORKS):], None) is not None:
                self._networks_changed()
        elif name.startswith(INSTANCES):
            instance_id = name[len(INSTANCES):]
            self.refused_instances.pop(instance_id, None)
            if instance_id in self.instances:
                self._remove(instance_id)

    def reset(self, items: Iterable[tuple[str, bytes, int]],
              instances: Iterable[tuple[str, bytes, int]] = ()) -> None:
        """Make the mirror hold exactly ``items`` and ``instances`` (a fresh read of every key), keeping
        unchanged parts as they are.

        ``items`` may hold any keys, in any order.  ``instances`` holds only ``instances/`` keys and is
        consumed once, after every network in ``items`` is applied: a source streams the instances
        through it as it reads them, without holding them all.
        """
        seen: set[str] = set()
        items = list(items)
        # Networks first, applied to the instances once (instances are checked against them).
        self._deferred_networks, self._networks_dirty = True, False
        try:
            for name, text, revision in items:
                if name.startswith(NETWORKS):
                    seen.add(name)
                    if self.keys.get(name) != revision:
                        self.put(name, text, revision)
        finally:
            self._deferred_networks = False
        gone = [name for name in self.keys if name.startswith(NETWORKS) and name not in seen]
        for name in gone:
            self.networks.pop(name[len(NETWORKS):], None)
            del self.keys[name]
            self.rejected.pop(name, None)
        if self._networks_dirty or gone:
            self.changed = True
            self._networks_changed()
        # Instances go into the dict alone and are put in id order once at the end: inserting each
        # into the sorted lists would move O(view) entries per key when they arrive unsorted.
        self._bulk = True
        try:
            for name, text, revision in items:
                if not name.startswith(NETWORKS):
                    seen.add(name)
                    if self.revision_of(name) != revision:
                        self.put(name, text, revision)
            revision_of = self.revision_of
            for name, text, revision in instances:
                seen.add(name)
                if revision_of(name) != revision:
                    self.put(name, text, revision)
            gone = [name for name in self.keys if name not in seen]
            gone += [name for name in map(INSTANCES.__add__, self.instance_keys) if name not in seen]
            for name in gone:
                self.delete(name)
        finally:
            self._bulk = False
            self.order = sorted(self.instances)
            held = self.instances
            self.values = [held[instance_id] for instance_id in self.order]

    # -- the view -----------------------------------------------------------------------------

    def view(self) -> tuple[View, Callable[[], bytes]]:
        """The view the keys make now, and a function giving it as an ``edge-view/1`` document.

        The document is made when the function is called (O(view), in another thread if need
        be), of the cloud's and networks' last good texts and the view's instances encoded
        again: later changes to the keys do not alter it.  Raises ViewInvalid when a part
        every view needs is missing.
        """
        if not self.changed and self._view is not None:
            return self._view
        if self.serial is None:
            raise ViewInvalid([f"{self.where}: no valid {SERIAL} key"])
        serial = self.serial
        cloud = self.cloud
        networks = [self.networks[key] for key in sorted(self.networks)]
        instances = tuple(self.values)
        view = View(serial=serial, generated=None, cloud=cloud.value if cloud is not None else Cloud(),
                    networks=tuple([part.value for part in networks]), instances=instances)

        def document() -> bytes:
            return b"".join((b'{"format":', json.dumps(FORMAT).encode(), b',"serial":', str(serial).encode(),
                             b',"cloud":', cloud.text if cloud is not None else b"{}",
                             b',"networks":[', b",".join([part.text for part in networks]),
                             # One array in one call: no small text per instance left to fragment the heap.
                             b'],"instances":', _ENCODER.encode([_as_wire(i) for i in instances]), b"}"))

        self._view = (view, document)
        self.changed = False
        return self._view

    def prepared(self, incremental: bool) -> PreparedView:
        """The view now, with what changed in its instances since the view this last returned.

        Call it only for a view that is handed on: the changes it reports are relative to the
        previous view it returned.  Raises ViewInvalid like :meth:`view`.
        """
        view, document = self.view()
        changes = None
        touched, base = self._touched, self._delivered
        if touched is not None and base is not None:
            present, texts = self.instances, self._texts
            upserted = [i for i in sorted(touched) if i in present]
            removed = tuple(sorted(i for i in touched if i not in present))
            changes = InstanceChanges(base, tuple([present[i] for i in upserted]),
                                      tuple([texts.get(i) or instance_json(present[i]) for i in upserted]), removed)
        self._delivered = view
        self._touched = set()
        self._texts = {}
        return PreparedView(view, document, incremental, changes)

    # -- each part ----------------------------------------------------------------------------

    def _refuse(self, name: str, reason: str) -> None:
        self.problems += 1
        self.rejected[name] = reason
        event(log, logging.ERROR, "view key refused; keeping its previous value", source=self.where, key=name,
              reason=reason)

    def _put_serial(self, text: bytes) -> None:
        try:
            serial = int(text.strip())
        except ValueError:
            raise _Refused(f"not an integer: {text[:40]!r}") from None
        if serial < 0:
            raise _Refused("must not be negative")
        self.serial = serial

    def _put_cloud(self, text: bytes) -> None:
        obj = _json_object(text)
        view = _check({"cloud": obj, "networks": self._network_list})
        self.cloud = _Part(text, view.cloud)

    def _put_network(self, network_id: str, text: bytes) -> None:
        obj = _json_object(text)
        if obj.get("id") != network_id:
            raise _Refused(f"its id {obj.get('id')!r} is not the key's {network_id!r}")
        network: Network = _check({"networks": [obj]}).networks[0]
        self.networks[network_id] = _Part(text, network)
        if self._deferred_networks:
            self._networks_dirty = True
        else:
            self._networks_changed()

    def _put_instance(self, instance_id: str, text: bytes) -> None:
        self._place(self._instance(instance_id, text), text)

    def _place(self, instance: Instance, text: bytes | None) -> None:
        """Hold ``instance`` (its id: the key's, checked) from now on; ``text`` is what it arrived as."""
        instance_id = instance.id  # the instance's own string: no second copy of each id
        revisions = self.instance_keys
        revision = revisions.pop(instance_id, None)
        if revision is not None:
            revisions[instance_id] = revision  # now under the instance's string (a dict keeps a key's first)
        touched = self._touched
        if touched is not None:
            touched.add(instance_id)
            if self._delivered is not None and text is not None:
                self._texts[instance_id] = text
        if self._bulk:
            self.instances[instance_id] = instance  # ordered once, at the end of the fresh read
            return
        index = bisect.bisect_left(self.order, instance_id)
        if instance_id in self.instances:
            self.values[index] = instance
        else:
            self.order.insert(index, instance_id)
            self.values.insert(index, instance)
        self.instances[instance_id] = instance

    def _remove(self, instance_id: str) -> None:
        if self._touched is not None:
            self._touched.add(instance_id)
            self._texts.pop(instance_id, None)
        if self._bulk:
            del self.instances[instance_id]
            return
        index = bisect.bisect_left(self.order, instance_id)
        del self.order[index], self.values[index], self.instances[instance_id]

    def _instance(self, instance_id: str, text: bytes) -> Instance:
        cidrs = self._cidrs
        if cidrs is None:
            cidrs = self._cidrs = cidr_table_of({"networks": self._network_list})
        if cidrs is not None:
            # The typed decoder and checks the document decoder uses, straight from the bytes.
            try:
                instance = instance_from_wire(INSTANCE_DECODER.decode(text), cidrs, Problems())
            except msgspec.DecodeError:
                instance = None
            if instance is not None and instance.id == instance_id:
                return instance
        obj = _json_object(text)
        if obj.get("id") != instance_id:
            raise _Refused(f"its id {obj.get('id')!r} is not the key's {instance_id!r}")
        # The explaining parser words every problem (or, rarely, accepts what the fast check doubted).
        return _check({"networks": self._network_list, "instances": [obj]}).instances[0]

    def _networks_changed(self) -> None:
        """Instances are checked against the networks' CIDRs: check every one again."""
        self._network_list = [json.loads(self.networks[key].text) for key in sorted(self.networks)]
        self._cidrs = None
        self._touched = None  # every instance is checked (and placed) again
        for instance_id in list(self.order):
            # Checked again from its text, encoded anew from the value (which it parses back to).
            text = instance_json(self.instances[instance_id])
            try:
                self._place(self._instance(instance_id, text), None)
            except _Refused as refused:
                name = INSTANCES + instance_id
                self._remove(instance_id)
                self.refused_instances[instance_id] = text
                self._refuse(name, f"no longer valid with the networks now in the view: {refused}")
        for instance_id, text in list(self.refused_instances.items()):
            try:
                instance = self._instance(instance_id, text)
            except _Refused:
                continue  # still refused, as logged when it arrived
            del self.refused_instances[instance_id]
            self.rejected.pop(INSTANCES + instance_id, None)
            self._place(instance, text)


class _Refused(Exception):
    """One key's value is not a valid part of the view (the message says why)."""


def _json_object(text: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Refused(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise _Refused("not valid JSON: nested too deeply") from None
    if type(obj) is not dict:
        raise _Refused("not a JSON object")
    return obj


def _check(parts: dict[str, Any]) -> View:
    """``parts`` checked by the one view parser, as members of an otherwise empty document."""
    document = {"format": FORMAT, "serial": 0, "cloud": {}, "networks": [], "instances": [], **parts}
    try:
        return parse_view(document)
    except ViewInvalid as exc:
        raise _Refused("; ".join(exc.problems[:5])) from None
