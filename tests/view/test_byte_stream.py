"""The fast decoding path of large views (bytes cut into batches, instances decoded by type).

Whatever path a document takes, the view (or the problems reported) must be exactly
what the reference gives: ``parse_view(json.loads(data))``.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.generate import generate_view
from edge.errors import ViewInvalid
from edge.view import formats
from edge.view.formats import decode_view, decode_view_reusing
from edge.view.parse import parse_view
from edge.view.scan import elements_end, value_end


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(formats, "_INCREMENTAL_THRESHOLD", 0)
    monkeypatch.setattr(formats._ByteStream, "BATCH", 600)


def _fast(data: bytes) -> formats._ByteStream:
    stream = formats._ByteStream(data, None, record=True)
    assert stream.decode(), "the fast path gave up"
    return stream


def _reference(data: bytes):
    return parse_view(json.loads(data))


def _varied_document(instances: int = 40) -> dict:
    document = generate_view(instances=instances, networks=3)
    items = document["instances"]
    items[0]["interfaces"][0]["metadata_sources"] = ["255.0.0.9"]
    items[1]["interfaces"][0]["ipv6s"] = ["2001:db8::5"]
    items[2]["interfaces"][0]["mac"] = items[2]["interfaces"][0]["mac"].upper()  # typed path doubts it
    items[3]["tags"] = {"Name": "caf\u00e9 \u2603", "brackets": "[[{ unbalanced", "quote": 'say "}]"'}
    items[4]["interfaces"].append({**items[4]["interfaces"][0], "id": "eni-second", "device_index": 1,
                                   "mac": "d0:0d:ff:ff:ff:01", "public_ip": None,
                                   "private_ips": [items[4]["interfaces"][0]["private_ips"][0].rsplit(".", 1)[0] + ".250"]})
    items[4]["interfaces"].reverse()
    items[5]["interfaces"][0]["device_index"] = None
    items[6]["metadata_options"] = {"http_tokens": "required", "hop_limit": 2}
    items[7]["user_data"] = None
    items[8]["product_codes"] = ["abc123"]
    items[9]["interfaces"][0]["ipv6s"] = None
    return document


@pytest.mark.parametrize("indent", [None, 2])
def test_fast_path_gives_the_reference_view(small_batches, indent) -> None:
    data = json.dumps(_varied_document(), indent=indent, ensure_ascii=False).encode()
    stream = _fast(data)
    assert parse_view(stream.result) == _reference(data)
    assert decode_view(data) == _reference(data)
    assert len(stream.spans) == 40
    first = decode_view_reusing(data, None)
    assert first.view == _reference(data)
    assert decode_view_reusing(data, first.memo).reused == 40


def test_fast_path_takes_the_instances_by_type() -> None:
    # Without this, every test here could pass through the reference path alone.
    data = json.dumps(generate_view(instances=30, networks=2)).encode()
    stream = _fast(data)
    assert all(type(item) is formats.Reused for item in stream.result["instances"])


@pytest.mark.parametrize("breakage", ["wrong types", "duplicate id", "bad address", "trailing comma",
                                      "truncated", "invalid utf-8"])
def test_fast_path_reports_what_the_reference_reports(small_batches, breakage) -> None:
    document = generate_view(instances=30, networks=2)
    items = document["instances"]
    if breakage == "wrong types":
        items[4]["interfaces"][0]["device_index"] = True
        items[6]["launch_index"] = 1.5
        items[7]["tags"] = {"Name": 5}
    elif breakage == "duplicate id":
        items[9]["id"] = items[8]["id"]
    elif breakage == "bad address":
        items[5]["interfaces"][0]["private_ips"] = ["10.0.0.05"]
    data = json.dumps(document).encode()
    if breakage == "trailing comma":
        data = data.replace(b"}]}", b"},]}") if data.endswith(b"}]}") else data.replace(b"}], ", b"},], ", 1)
    elif breakage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif breakage == "invalid utf-8":
        data = data.replace(b'"Name": "', b'"Name": "\xff', 1)
    with pytest.raises(ViewInvalid) as fast:
        decode_view(data)
    try:
        json.loads(data)
    except ValueError:
        assert fast.value.problems[0].startswith(("not valid JSON", "not valid UTF-8")), fast.value.problems
    else:
        with pytest.raises(ViewInvalid) as reference:
            _reference(data)
        assert fast.value.problems == reference.value.problems


@pytest.mark.parametrize("strings", ["plain", "unbalanced brackets"])
def test_instances_before_networks_take_the_fast_path_too(small_batches, strings) -> None:
    # Keys in alphabetical order (Go's encoding/json on a map, json.dumps(sort_keys=True))
    # put instances before networks, which the instances are checked against.
    document = generate_view(instances=20, networks=2)
    if strings != "plain":
        document["instances"][4]["tags"] = {"note": "}}] ["}
    data = json.dumps(document, sort_keys=True).encode()
    assert data.index(b'"instances"') < data.index(b'"networks"')
    assert _fast(data).result["instances"]
    assert decode_view(data) == _reference(data)
    first = decode_view_reusing(data, None)
    assert first.view == _reference(data)
    assert decode_view_reusing(data, first.memo).reused == 20


def test_other_shapes_fall_back() -> None:
    assert not formats._ByteStream(b'\xef\xbb\xbf{"format": 1}', None, record=False).decode()
    assert not formats._ByteStream(b'{"instances": [], "instances": []}', None, record=False).decode()
    assert not formats._ByteStream(b'{"instances": [{}]}', None, record=False).decode()  # no networks


def test_unchanged_instances_are_recognised_by_their_bytes(small_batches) -> None:
    document = generate_view(instances=50, networks=2)
    first = decode_view_reusing(json.dumps(document).encode(), None)
    document["serial"] = 2
    document["instances"][7]["tags"] = {"Name": "changed"}
    changed = document["instances"][7]["id"]
    moved = document["instances"].pop(20)
    document["instances"].insert(3, moved)
    data = json.dumps(document).encode()
    second = decode_view_reusing(data, first.memo)
    assert second.reused == 49
    by_id = {i.id: i for i in first.view.instances}
    assert all(i is by_id[i.id] for i in second.view.instances if i.id != changed)
    assert second.view == parse_view(json.loads(data))


def test_cutting_helpers() -> None:
    assert value_end(b'{"x": [1, 2]} tail', 0) == len(b'{"x": [1, 2]}')
    assert value_end(b'"a\\"b" tail', 0) == 6
    assert value_end(b"-1.5e3,", 0) == 6
    assert value_end(b"nope", 0) is None
    data = b'[{"b": [1, {"c": 2}]}, {"d": 1}] tail'
    first_end = data.index(b"}, {") + 1
    assert elements_end(data, 1, 1) == first_end
    assert elements_end(data, 1, 5) == first_end
    assert elements_end(data, 1, first_end + 2) == data.index(b"] tail")  # the array ends first
    assert elements_end(data, 1, len(data) - 2) == first_end  # past the end: element by element
    assert elements_end(b'[{"a": 1', 1, 1) is None


@pytest.mark.parametrize("duplicate", ["id", "private address", "public address", "mac", "metadata source", "none"])
def test_the_build_enforces_the_rules_across_instances_it_was_left(duplicate) -> None:
    # The poller parses without the rules across instances and lets the indexes find duplicates.
    from edge.view.snapshot import build_snapshot_tracked

    document = generate_view(instances=30, networks=2)
    first, second = document["instances"][3], document["instances"][11]
    second["interfaces"][0]["network"] = first["interfaces"][0]["network"]
    second["interfaces"][0]["subnet"] = first["interfaces"][0]["subnet"]
    if duplicate == "id":
        second["id"] = first["id"]
    elif duplicate == "private address":
        second["interfaces"][0]["private_ips"] = first["interfaces"][0]["private_ips"]
    elif duplicate == "public address":
        first["interfaces"][0]["public_ip"] = second["interfaces"][0]["public_ip"] = "198.51.100.7"
    elif duplicate == "mac":
        second["interfaces"][0]["mac"] = first["interfaces"][0]["mac"]
    elif duplicate == "metadata source":
        first["interfaces"][0]["metadata_sources"] = second["interfaces"][0]["metadata_sources"] = ["255.0.0.1"]
    view = parse_view(document, cross_check=False)
    if duplicate == "none":
        snapshot, _ = build_snapshot_tracked(view, check_unique=True)
        assert len(snapshot.instances) == 30
        return
    with pytest.raises(ViewInvalid) as caught:
        build_snapshot_tracked(view, check_unique=True)
    assert caught.value.problems == _problems_of(document)
    data = json.dumps(document).encode()
    with pytest.raises(ViewInvalid) as deferred:
        decoded = decode_view_reusing(data, None, defer_cross_check=True)
        build_snapshot_tracked(decoded.view, check_unique=not decoded.cross_checked)
    assert deferred.value.problems == _problems_of(document)


def test_deferring_the_rules_across_instances_still_reports_every_problem_at_once() -> None:
    document = generate_view(instances=30, networks=2)
    document["instances"][4]["id"] = document["instances"][3]["id"]
    document["instances"][9]["launch_index"] = "zero"
    with pytest.raises(ViewInvalid) as caught:
        decode_view_reusing(json.dumps(document).encode(), None, defer_cross_check=True)
    assert caught.value.problems == _problems_of(document)
    assert len(caught.value.problems) == 2


def _problems_of(document: dict) -> list[str]:
    with pytest.raises(ViewInvalid) as caught:
        parse_view(json.loads(json.dumps(document)))
    return caught.value.problems


def test_instances_shifted_by_an_insertion_are_recognised_without_decoding_them(monkeypatch) -> None:
    document = generate_view(instances=50, networks=2)
    first = decode_view_reusing(json.dumps(document).encode(), None)
    extra = generate_view(instances=51, networks=2)["instances"][50]
    document["serial"] = 2
    document["instances"].insert(0, extra)
    decoded = []
    real = formats.INSTANCE_DECODER

    class Counting:
        @staticmethod
        def decode(text):
            decoded.append(text)
            return real.decode(text)

    monkeypatch.setattr(formats, "INSTANCE_DECODER", Counting)
    second = decode_view_reusing(json.dumps(document).encode(), first.memo)
    assert second.reused == 50
    assert len(decoded) == 1  # the new one


# -- the fast path against the reference, on mutated documents -----------------------------------

_ODD_VALUES = [None, "", "x", 0, -1, 1.5, True, [], {}, "[{", '}]"\\', "10.0.0.5", "10.0.0.05", "AA:BB:CC:DD:EE:FF",
               "2001:db8::1", "2001:DB8::1", "aGk=", "aGk", "a===", ["10.0.0.5"], [None], [{}], {"k": 1},
               {"http_tokens": "required", "hop_limit": 65}, "vpc-unknown", "\u00e9\u2603", [{"id": 5}],
               [{"id": "sg-1", "name": None}], {"a": None}, [{"name": "k", "openssh": None}],
               {"instance_profile_arn": "arn", "instance_profile_id": "id", "role": "a/b"}, ["2001:db8::1", None]]
MUTATED_EXAMPLES = 400
_INSTANCE_KEYS = ["id", "interfaces", "user_data", "tags", "block_devices", "iam", "public_keys", "launch_index",
                  "metadata_options", "product_codes", "account_id", "kernel_id", "unknown"]
_INTERFACE_KEYS = ["id", "mac", "private_ips", "public_ip", "ipv6s", "network", "subnet", "device_index",
                   "security_groups", "metadata_sources", "owner_id"]


@settings(max_examples=MUTATED_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 11), st.booleans(), st.integers(0, 12), st.integers(0, 10),
                          st.integers(0, len(_ODD_VALUES) - 1)), max_size=6),
       st.booleans(), st.sampled_from([None, 1]))
def test_fast_path_matches_the_reference_on_mutated_documents(mutations, sort_keys, indent) -> None:
    document = generate_view(instances=12, networks=2)
    for instance_index, on_interface, instance_key, interface_key, value_index in mutations:
        instance = document["instances"][instance_index]
        target = instance["interfaces"][0] if on_interface and type(instance.get("interfaces")) is list \
            and instance["interfaces"] and type(instance["interfaces"][0]) is dict else instance
        key = _INTERFACE_KEYS[interface_key] if target is not instance else _INSTANCE_KEYS[instance_key]
        target[key] = copy.deepcopy(_ODD_VALUES[value_index])
    data = json.dumps(document, sort_keys=sort_keys, indent=indent, ensure_ascii=False).encode()
    formats_batch, formats._ByteStream.BATCH = formats._ByteStream.BATCH, 700
    threshold, formats._INCREMENTAL_THRESHOLD = formats._INCREMENTAL_THRESHOLD, 0
    try:
        outcomes = []
        for decode in (lambda: decode_view(data), lambda: _reusing_then_built(data), lambda: _reference(data)):
            try:
                outcomes.append(decode())
            except ViewInvalid as exc:
                outcomes.append(exc.problems)
    finally:
        formats._ByteStream.BATCH, formats._INCREMENTAL_THRESHOLD = formats_batch, threshold
    assert outcomes[0] == outcomes[2]
    assert outcomes[1] == outcomes[2]


def _reusing_then_built(data: bytes):
    # The poller's way: rules across instances left to the build.
    from edge.view.snapshot import build_snapshot_tracked

    decoded = decode_view_reusing(data, None, defer_cross_check=True)
    build_snapshot_tracked(decoded.view, check_unique=not decoded.cross_checked)
    return decoded.view
