"""Incremental views over HTTP: ``GET URL?since=SERIAL`` and its ``edge-view-changes/1`` answer.

A gateway that holds serial S of a view asks its HTTP control plane for
``URL?since=S``.  The control plane answers with any of:

* ``304 Not Modified`` (its ``ETag`` matched) or a changes document whose
  ``serial`` is S: nothing changed;
* a **changes document** listing the instances added or changed (whole) and
  the ids of those removed since S, with the new serial::

      {"format": "edge-view-changes/1", "since": 41, "serial": 42,
       "changed": [{"id": "i-...", ...}], "removed": ["i-..."]}

* ``{"format": "edge-view-changes/1", "since": 3, "too_old": true}`` when it
  no longer knows what changed since S (or the ``cloud`` or ``networks``
  changed, which a changes document cannot carry): the gateway takes the full
  document (``GET URL``) in the same poll;
* the full ``edge-view/1`` document, always allowed (a control plane that
  ignores ``since`` is one).

The gateway keeps the view it was sent as a :class:`~edge.view.keyspace.Keyspace`
(one part per instance), applies each changes document to it, and hands the
poller a :class:`~edge.view.keyspace.PreparedView` whose unchanged instances
are the very objects being served, so the poller builds a delta of the served
snapshot.  As in an etcd keyspace, each changed instance is checked on its
own: one that does not parse is logged and counted, and its previous value
stays.  :func:`changes_between` computes the answer for a control plane that
keeps its previous documents.
"""

from __future__ import annotations

from typing import Any

import msgspec

from edge.errors import ViewInvalid
from edge.view.keyspace import CLOUD, INSTANCES, NETWORKS, SERIAL, Keyspace
from edge.view.model import FORMAT

CHANGES_FORMAT = "edge-view-changes/1"


class Changes(msgspec.Struct, frozen=True):
    """A decoded changes document (instances kept as their raw JSON text)."""

    format: str
    since: int
    serial: int | None = None
    too_old: bool = False
    changed: list[msgspec.Raw] = []
    removed: list[str] = []


class _Identified(msgspec.Struct):
    id: Any = None


class _Document(msgspec.Struct):
    """An ``edge-view/1`` document cut into its parts' raw texts."""

    format: Any = None
    serial: Any = None
    cloud: msgspec.Raw = msgspec.Raw(b"{}")
    networks: list[msgspec.Raw] = []
    instances: list[msgspec.Raw] = []


_CHANGES = msgspec.json.Decoder(Changes)
_IDENTIFIED = msgspec.json.Decoder(_Identified)
_DOCUMENT = msgspec.json.Decoder(_Document)


def decode_changes(data: bytes) -> Changes | None:
    """The changes document in ``data``; None when ``data`` is something else (a full document)."""
    try:
        changes = _CHANGES.decode(data)
    except msgspec.DecodeError:
        return None
    return changes if changes.format == CHANGES_FORMAT else None


class _Serial(msgspec.Struct):
    format: Any = None
    serial: Any = None


_SERIAL = msgspec.json.Decoder(_Serial)


def serial_of(data: bytes) -> int | None:
    """The serial of an ``edge-view/1`` JSON document (None for anything else: XML, garbage)."""
    try:
        document = _SERIAL.decode(data)
    except msgspec.DecodeError:
        return None
    return document.serial if document.format == FORMAT and type(document.serial) is int else None


def load_document(keyspace: Keyspace, data: bytes) -> bool:
    """Make ``keyspace`` hold the full document ``data`` (unchanged instances keep their objects).

    False when the document cannot be taken part by part (not ``edge-view/1`` JSON, or two
    instances or networks with one id): the caller hands the bytes to the poller, which
    rejects the document with every problem.
    """
    try:
        document = _DOCUMENT.decode(data)
    except msgspec.DecodeError:
        return False
    if document.format != FORMAT or type(document.serial) is not int:
        return False
    items: list[tuple[str, bytes, int]] = [(SERIAL, str(document.serial).encode(), document.serial)]
    cloud = bytes(document.cloud)
    items.append((CLOUD, cloud, hash(cloud)))
    for prefix, elements in ((NETWORKS, document.networks), (INSTANCES, document.instances)):
        seen: set[str] = set()
        for raw in elements:
            text = bytes(raw)
            try:
                element_id = _IDENTIFIED.decode(text).id
            except msgspec.DecodeError:
                return False
            if type(element_id) is not str or element_id in seen:
                return False
            seen.add(element_id)
            # The "revision" of a part fetched over HTTP is the hash of its text: reset keeps
            # the parts whose text is unchanged as they are.
            items.append((prefix + element_id, text, hash(text)))
    keyspace.reset(items)
    return True


def apply_changes(keyspace: Keyspace, changes: Changes) -> None:
    """Apply a changes document (its ``since`` checked by the caller) to ``keyspace``."""
    for instance_id in changes.removed:
        keyspace.delete(INSTANCES + instance_id)
    for raw in changes.changed:
        text = bytes(raw)
        try:
            found: Any = _IDENTIFIED.decode(text).id
        except msgspec.DecodeError:
            found = None
        # An element without a usable id is refused by the keyspace (logged and counted) like any bad part.
        keyspace.put(INSTANCES + (found if type(found) is str else ""), text, hash(text))
    if changes.serial is not None:
        keyspace.put(SERIAL, str(changes.serial).encode(), changes.serial)


def changes_between(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The answer to ``since=old["serial"]`` when the view is now ``new`` (for control planes).

    ``too_old`` when ``cloud`` or ``networks`` differ: only a full document carries those.
    Raises ViewInvalid when either document has no integer serial.
    """
    since, serial = old.get("serial"), new.get("serial")
    if type(since) is not int or type(serial) is not int:
        raise ViewInvalid(["$.serial: both documents need an integer serial"])
    if old.get("cloud") != new.get("cloud") or old.get("networks") != new.get("networks"):
        return {"format": CHANGES_FORMAT, "since": since, "too_old": True}
    before = {instance["id"]: instance for instance in old.get("instances", ())}
    after = {instance["id"]: instance for instance in new.get("instances", ())}
    changed = [instance for key, instance in after.items() if before.get(key) != instance]
    removed = [key for key in before if key not in after]
    return {"format": CHANGES_FORMAT, "since": since, "serial": serial, "changed": changed, "removed": removed}

