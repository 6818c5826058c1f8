"""The keyspace mirror keeps instances as values, not texts: what it encodes again parses back the same."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest

from bench.generate import generate_view
from edge.view.demo import demo_document
from edge.view.example import example_document
from edge.view.formats import decode_view
from edge.view.keyspace import Keyspace, instance_json


def items_of(document: dict[str, Any], revision: int = 1) -> list[tuple[str, bytes, int]]:
    return ([("networks/" + n["id"], json.dumps(n).encode(), revision) for n in document.get("networks", ())]
            + [("instances/" + i["id"], json.dumps(i).encode(), revision) for i in document["instances"]]
            + [("cloud", json.dumps(document.get("cloud", {})).encode(), revision),
               ("serial", str(document["serial"]).encode(), revision)])


@pytest.mark.parametrize("document", [
    example_document(), demo_document(), generate_view(instances=300, networks=3, user_data_bytes=700),
], ids=["example", "demo", "generated"])
def test_an_instance_encoded_again_parses_back_to_the_same_value(document: dict[str, Any]) -> None:
    keyspace = Keyspace("test")
    keyspace.reset(items_of(document))
    view, make_document = keyspace.view()
    assert keyspace.problems == 0 and view.instances
    # Each instance, on its own, through the keyspace's own checks.
    again = Keyspace("again")
    again.reset([item for item in items_of(document) if not item[0].startswith("instances/")]
                + [("instances/" + i.id, instance_json(i), 1) for i in view.instances])
    assert again.problems == 0 and again.view()[0].instances == view.instances
    # The whole document (what the last-good file and a compaction write), through the document parser.
    decoded = decode_view(make_document())
    assert decoded.serial == view.serial and decoded.cloud == view.cloud and decoded.networks == view.networks
    assert sorted(decoded.instances, key=lambda i: i.id) == list(view.instances)


def _reachable(root: object) -> list[object]:
    seen: set[int] = set()
    found: list[object] = []
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, type) or type(item).__name__ in ("module", "function"):
            continue
        seen.add(id(item))
        found.append(item)
        stack.extend(gc.get_referents(item))
    return found


def test_the_mirror_keeps_no_instance_text_beyond_the_changes_not_yet_handed_on() -> None:
    document = generate_view(instances=50, networks=2, serial=1)
    items = items_of(document)
    texts = {text for name, text, _ in items if name.startswith("instances/")}
    keyspace = Keyspace("test")
    keyspace.reset(items)
    first = keyspace.prepared(incremental=False)
    held = _reachable(keyspace)
    assert not [o for o in held if isinstance(o, bytes) and o in texts]
    assert any(isinstance(o, bytes) and o == items[0][1] for o in held), "the networks' texts are kept"
    # Each instance's id is one string, whether it names the instance's key, value or place in the order.
    assert keyspace.key_count == len(items)
    assert {id(k) for k in keyspace.instance_keys} == {id(i.id) for i in first.view.instances} \
        == {id(k) for k in keyspace.order}
    # A change: its text is kept until the view with it is handed on (a journal record is made of it),
    # exactly as it arrived; then it is dropped too.
    changed = dict(document["instances"][4], instance_type="m9.huge")
    text = json.dumps(changed, indent=1).encode()
    keyspace.put("instances/" + changed["id"], text, 2)
    keyspace.put("serial", b"2", 2)
    second = keyspace.prepared(incremental=True)
    assert second.changes is not None and second.changes.base is first.view
    assert second.changes.texts == (text,) and second.changes.upserted[0].instance_type == "m9.huge"
    assert not [o for o in _reachable(keyspace) if isinstance(o, bytes) and (o in texts or o == text)]
    # Instances put before any view was handed on keep no text either (nothing reports them).
    fresh = Keyspace("fresh")
    for name, value, revision in items:
        fresh.put(name, value, revision)
    assert not [o for o in _reachable(fresh) if isinstance(o, bytes) and o in texts]


def test_a_network_change_checks_every_instance_again_from_its_value() -> None:
    document = generate_view(instances=40, networks=2, serial=1)
    keyspace = Keyspace("test")
    keyspace.reset(items_of(document))
    before = keyspace.view()[0].instances
    # The first network narrowed to a CIDR that leaves out its instances: each is refused, logged and counted.
    network = dict(document["networks"][0], cidrs=["192.0.2.0/24"],
                   subnets=[dict(document["networks"][0]["subnets"][0], cidr="192.0.2.0/24")])
    keyspace.put("networks/" + network["id"], json.dumps(network).encode(), 2)
    left_out = [i.id for i in before if i.interfaces[0].network == network["id"]]
    view = keyspace.view()[0]
    assert left_out and keyspace.problems == len(left_out)
    assert [i.id for i in view.instances] == [i.id for i in before if i.id not in left_out]
    # Back as it was: the refused instances are taken again, equal to what they were.
    keyspace.put("networks/" + network["id"], json.dumps(document["networks"][0]).encode(), 3)
    assert keyspace.view()[0].instances == before
