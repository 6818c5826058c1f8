"""Validation of edge-view/1 documents: every rule, every problem reported at once."""

from __future__ import annotations

import copy
import json

import pytest

from bench.generate import generate_view
from edge.errors import ViewInvalid
from edge.view.demo import demo_document
from edge.view.formats import decode_view
from edge.view.parse import parse_view


def _problems(document: object) -> list[str]:
    with pytest.raises(ViewInvalid) as caught:
        parse_view(document)
    return caught.value.problems


def test_demo_view_is_valid_and_typed() -> None:
    view = parse_view(demo_document())
    assert view.serial == 1
    first = view.instances[0]
    assert first.id == "i-0de0000000000001"
    assert first.user_data == b"#cloud-config\nhostname: demo-1\n"
    assert first.primary_interface.private_ips == ("127.0.0.1",)
    assert first.iam is not None and first.iam.role == "demo-role"
    assert view.instances[2].metadata_options.tokens_required


def test_reference_example_from_the_contract_is_valid() -> None:
    document = {
        "format": "edge-view/1", "serial": 1042, "generated": "2026-11-23T22:10:00Z",
        "cloud": {"region": "eucalyptus", "internal_domain": "eucalyptus.internal",
                  "public_domain": "cloud.example.com", "upstream_resolvers": ["192.0.2.53"],
                  "dns_records": [{"name": "ec2.cloud.example.com", "type": "A", "value": "10.111.5.10", "ttl": 300}]},
        "networks": [{"id": "vpc-0a1b2c3d", "cidrs": ["10.0.0.0/16"],
                      "subnets": [{"id": "subnet-11aa22bb", "cidr": "10.0.1.0/24", "availability_zone": "one"}]}],
        "instances": [{"id": "i-0123456789abcdef0", "interfaces": [
            {"id": "eni-1a2b3c4d", "mac": "D0:0D:12:34:56:78", "device_index": 0, "network": "vpc-0a1b2c3d",
             "subnet": "subnet-11aa22bb", "private_ips": ["10.0.1.5"], "public_ip": "203.0.113.25"}],
            "unknown_future_field": {"ignored": True}}],
        "unknown_top_level": 1,
    }
    view = parse_view(document)
    assert view.instances[0].interfaces[0].mac == "d0:0d:12:34:56:78"
    assert view.cloud.dns_records[0].ttl == 300


def test_wrong_format_is_rejected_alone() -> None:
    document = demo_document()
    document["format"] = "edge-view/2"
    assert _problems(document) == ["$.format: expected 'edge-view/1', got 'edge-view/2'"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.pop("serial"), "$.serial: required field is missing"),
    (lambda d: d.update(serial="7"), "$.serial: expected integer, got string"),
    (lambda d: d.update(serial=True), "$.serial: expected integer, got boolean"),
    (lambda d: d.pop("instances"), "$.instances: required field is missing"),
    (lambda d: d["instances"][0].pop("id"), "$.instances[0].id: required field is missing"),
    (lambda d: d["instances"][0].update(interfaces=[]), "$.instances[0].interfaces: at least one interface is required"),
    (lambda d: d["instances"][0]["interfaces"][0].update(mac="zz:zz"), "not a MAC address"),
    (lambda d: d["instances"][0]["interfaces"][0].update(private_ips=["10.0.0.256"]), "not a valid IP address"),
    (lambda d: d["instances"][0]["interfaces"][0].update(private_ips=[]), "at least one private IP is required"),
    (lambda d: d["instances"][0]["interfaces"][0].update(private_ips=["10.9.9.9"]), "outside network '' CIDRs"),
    (lambda d: d["instances"][0]["interfaces"][0].update(network="vpc-nope"), "unknown network 'vpc-nope'"),
    (lambda d: d["instances"][0]["interfaces"][0].update(public_ip="300.1.1.1"), "not a valid IP address"),
    (lambda d: d["instances"][0]["interfaces"][0].update(ipv6s=["10.0.0.1"]), "not a valid IPv6 address"),
    (lambda d: d["instances"][0].update(user_data="***"), "not valid base64"),
    (lambda d: d["instances"][0]["metadata_options"].update(hop_limit=65), "must be 1..64"),
    (lambda d: d["instances"][0]["metadata_options"].update(http_tokens="maybe"), "must be 'optional' or 'required'"),
    (lambda d: d["instances"][0].update(tags={"a": 1}), "$.instances[0].tags.a: expected string, got integer"),
    (lambda d: d["networks"][0].update(cidrs=["10.0.0.1/8"]), "invalid CIDR"),
    (lambda d: d["networks"][1]["subnets"][0].update(ipv6_cidrs=["127.0.0.0/24"]), "not an IPv6 CIDR"),
    (lambda d: d["networks"][1]["subnets"][0].update(ipv6_cidrs=["2001:db8::/64"]),
     "$.networks[1].subnets[0].ipv6_cidrs[0]: 2001:db8::/64 is not inside network 'vpc-demo' CIDRs"),
    (lambda d: d["cloud"]["dns_records"].append({"name": "x.demo.internal", "type": "SPF", "value": "v"}),
     "unsupported record type 'SPF'"),
    (lambda d: d["cloud"]["dns_records"].append({"name": "x.demo.internal", "type": "MX", "value": "mail"}),
     "MX value must be"),
    (lambda d: d["cloud"].update(upstream_resolvers=["resolver.example"]), "not an address or address:port"),
])
def test_each_rule_is_enforced(mutate, expected: str) -> None:
    document = demo_document()
    mutate(document)
    problems = _problems(document)
    assert any(expected in problem for problem in problems), problems


def test_duplicates_are_rejected() -> None:
    document = demo_document()
    clone = copy.deepcopy(document["instances"][0])
    document["instances"].append(clone)
    problems = _problems(document)
    assert any("duplicate instance id 'i-0de0000000000001'" in p for p in problems), problems

    document = demo_document()
    clone = copy.deepcopy(document["instances"][1])
    clone["id"] = "i-other"
    clone["interfaces"][0].update(mac="d0:0d:00:00:00:99", public_ip=None)
    document["instances"].append(clone)
    assert any("private address 127.0.0.2 in network '' is also used by" in p for p in _problems(document))

    document = demo_document()
    document["instances"][1]["interfaces"][0]["public_ip"] = "198.51.100.1"
    assert any("public address 198.51.100.1 is also used by i-0de0000000000001" in p for p in _problems(document))


def test_subnet_ipv6_ranges() -> None:
    document = demo_document()
    document["networks"][1]["cidrs"].append("2001:db8:1::/56")
    document["networks"][1]["subnets"][0]["ipv6_cidrs"] = ["2001:db8:1:1::/64"]
    subnet = parse_view(document).networks[1].subnets[0]
    assert (subnet.cidr, subnet.ipv6_cidrs) == ("127.0.0.0/24", ("2001:db8:1:1::/64",))
    # Before ipv6_cidrs, an IPv6 range could only be given as cidr: it is read as one.
    document["networks"][1]["subnets"][0].update(cidr="2001:db8:1:2::/64", ipv6_cidrs=None)
    subnet = parse_view(document).networks[1].subnets[0]
    assert (subnet.cidr, subnet.ipv6_cidrs) == ("", ("2001:db8:1:2::/64",))


def test_same_private_address_in_two_networks_is_fine() -> None:
    view = parse_view(demo_document())
    assert {i.interfaces[0].private_ips[0] for i in view.instances if i.interfaces[0].network == "vpc-demo"} \
        <= {"127.0.0.1", "127.0.0.2"}


def test_every_problem_is_listed_together() -> None:
    document = demo_document()
    document["serial"] = "x"
    document["instances"][0]["interfaces"][0]["mac"] = "bad"
    document["instances"][3]["user_data"] = "!"
    assert len(_problems(document)) == 3


def test_corrupt_and_non_object_json() -> None:
    with pytest.raises(ViewInvalid, match="not valid JSON"):
        decode_view(b'{"format": "edge-view/1", "serial": 1, ')
    with pytest.raises(ViewInvalid, match="expected a JSON object"):
        decode_view(b"[1, 2]")
    with pytest.raises(ViewInvalid, match="not valid UTF-8"):
        decode_view(b'{"format": "\xff"}')


def test_incremental_decoder_matches_json_loads() -> None:
    document = generate_view(instances=900, networks=3, user_data_bytes=1200)
    data = json.dumps(document, indent=1).encode()
    assert len(data) > 1 << 20  # large enough to take the incremental path
    view = decode_view(data)
    assert view == parse_view(json.loads(data))
    with pytest.raises(ViewInvalid, match="not valid JSON"):
        decode_view(data[: len(data) // 2])
    with pytest.raises(ViewInvalid, match="not valid JSON"):
        decode_view(data + b"garbage")


def test_fast_path_rejects_what_the_explaining_parser_rejects() -> None:
    document = generate_view(instances=40, networks=2)
    document["instances"][5]["interfaces"][0]["private_ips"] = ["10.0.0.05"]
    document["instances"][6]["launch_index"] = 1.5
    document["instances"][7]["interfaces"][0]["security_groups"] = [{"name": "no-id"}]
    problems = _problems(document)
    assert len(problems) == 3, problems


def test_streaming_decoder_across_tiny_chunks(monkeypatch) -> None:
    from edge.view import formats
    monkeypatch.setattr(formats, "_INCREMENTAL_THRESHOLD", 0)
    monkeypatch.setattr(formats._StreamingObject, "CHUNK", 37)
    document = generate_view(instances=30, networks=2)
    document["cloud"]["dns_records"].append({"name": "x.gen.example", "type": "TXT", "value": "caf\u00e9 \u2603", "ttl": 12345})
    data = json.dumps(document, indent=2, ensure_ascii=False).encode()
    assert decode_view(data) == parse_view(json.loads(data))
    for broken in (data[:-1], data[: len(data) // 3], data + b",", data.replace(b'"serial": 1', b'"serial" 1')):
        with pytest.raises(ViewInvalid, match="not valid JSON"):
            decode_view(broken)
    with pytest.raises(ViewInvalid, match="expected a JSON object"):
        decode_view(b"[" + b"1," * 40 + b"1]")


@pytest.mark.parametrize("networks_first", [True, False])
def test_streaming_decoder_validates_as_it_decodes_and_explains_the_rest(monkeypatch, networks_first: bool) -> None:
    # Large documents are validated instance by instance while they are decoded; the
    # answer (and every problem reported) must not depend on that, nor on member order.
    from edge.view import formats
    monkeypatch.setattr(formats, "_INCREMENTAL_THRESHOLD", 0)
    monkeypatch.setattr(formats._StreamingObject, "CHUNK", 4096)
    document = generate_view(instances=60, networks=3)
    if not networks_first:
        document = {"instances": document.pop("instances"), **document}
    data = json.dumps(document).encode()
    assert decode_view(data) == parse_view(json.loads(data))

    document["instances"][5]["interfaces"][0]["private_ips"] = ["10.0.0.05"]
    document["instances"][6]["launch_index"] = 1.5
    document["instances"][9]["id"] = document["instances"][8]["id"]
    with pytest.raises(ViewInvalid) as caught:
        decode_view(json.dumps(document).encode())
    assert caught.value.problems == _problems(json.loads(json.dumps(document)))
    assert len(caught.value.problems) == 3, caught.value.problems
    assert "$.instances[9].id" in " ".join(caught.value.problems)


def test_streaming_decoder_checks_instances_against_the_documents_own_networks(monkeypatch) -> None:
    from edge.view import formats
    monkeypatch.setattr(formats, "_INCREMENTAL_THRESHOLD", 0)
    document = generate_view(instances=20, networks=2)
    vpc = next(i for i in document["instances"] if i["interfaces"][0].get("network"))
    network = next(n for n in document["networks"] if n["id"] == vpc["interfaces"][0]["network"])
    network["cidrs"] = ["198.51.100.0/24"]
    network["subnets"] = []
    with pytest.raises(ViewInvalid) as caught:
        decode_view(json.dumps(document).encode())
    assert f"is outside network {network['id']!r} CIDRs" in caught.value.problems[0]
    assert caught.value.problems == _problems(json.loads(json.dumps(document)))


@pytest.mark.parametrize("key", ["ipv6s", "metadata_sources"])
def test_null_addresses_in_a_list_are_refused_not_indexed(key) -> None:
    # The fast validator used to take [null] for a valid list (None == canonical(None)),
    # and the build then failed on it instead of the view being refused.
    document = generate_view(instances=3, networks=1)
    document["instances"][1]["interfaces"][0][key] = [None]
    problems = _problems(document)
    assert len(problems) == 1 and f"$.instances[1].interfaces[0].{key}[0]: not a valid" in problems[0], problems


def test_a_model_field_missing_from_the_schema_fails_at_import() -> None:
    # Instances are built with positional arguments generated from the model's own field
    # list: a field the wire schema lacks is an error when the module loads, never a shift.
    import msgspec

    from edge.view.wire import WireInstance, _positional_builder

    class Grown(msgspec.Struct):
        id: str
        interfaces: tuple
        not_in_the_schema: str = ""

    with pytest.raises(TypeError, match=r"Grown.not_in_the_schema is not in the schema \(WireInstance\)"):
        _positional_builder(Grown, WireInstance, ("interfaces",))


def test_every_field_reaches_the_model_by_name() -> None:
    # Each model field holds the value of the wire field of the same name, whatever the order.
    document = demo_document()
    raw = document["instances"][0]
    raw.update(kernel_id="eki-1", ramdisk_id="eri-2", product_codes=["pc-1"], launch_index=7)
    instance = parse_view(document).instances[0]
    for name in ("id", "reservation_id", "account_id", "image_id", "kernel_id", "ramdisk_id", "instance_type",
                 "architecture", "launch_index", "launch_time", "availability_zone"):
        assert getattr(instance, name) == raw[name], name
    assert instance.product_codes == ("pc-1",)
    interface = instance.interfaces[0]
    for name in ("id", "mac", "device_index", "network", "subnet", "public_ip"):
        assert getattr(interface, name) == raw["interfaces"][0][name], name


def test_a_new_member_needs_only_the_model_and_the_schema() -> None:
    # What adding instance data takes: a field on the model and on the wire type; the build
    # picks it up by name (the tree and the docs then serve and describe it).
    import msgspec

    from edge.view.model import Instance
    from edge.view.wire import WireInstance, _positional_builder

    class GrownInstance(Instance, frozen=True, gc=False):
        hibernation: bool = False

    class GrownWire(WireInstance, frozen=True, gc=False):
        hibernation: bool | None = None

    build = _positional_builder(GrownInstance, GrownWire, ("interfaces", "public_keys", "iam", "tags",
                                                           "block_devices", "metadata_options"))
    text = b'{"id": "i-1", "launch_index": 3, "hibernation": true, "interfaces": [{"id": "e", "mac": "d0:0d:00:00:00:01", "private_ips": ["10.0.0.1"]}]}'
    wire = msgspec.json.decode(text, type=GrownWire)
    grown = build(wire, (), (), None, (), (), None)
    assert (grown.id, grown.launch_index, grown.hibernation) == ("i-1", 3, True)
    absent = build(msgspec.json.decode(text.replace(b'"hibernation": true, ', b""), type=GrownWire),
                   (), (), None, (), (), None)
    assert absent.hibernation is False  # the model's default
