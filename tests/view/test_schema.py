"""The JSON Schema of edge-view/1 agrees with the validator.

The schema is generated from the msgspec types of :mod:`edge.view.wire`, which are
also what the validator decodes with, so agreement is by construction; these tests
check it from the outside, with an independent JSON Schema implementation
(``jsonschema``, formats asserted).  Rules a JSON Schema cannot state (addresses
inside their network's CIDRs, CIDRs without host bits, record values by type,
uniqueness across instances, networks, subnets and interfaces) are the
validator's alone: documents breaking only those pass the schema, which
``docs/view-format.md`` says, and the last test here shows.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from bench.generate import generate_view
from edge.errors import ViewInvalid
from edge.view.demo import demo_document
from edge.view.example import example_document, example_text
from edge.view.parse import parse_view
from edge.view.wire import schema_text

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = ROOT / "edge" / "view" / "schema.json"
DOCS = ROOT / "docs" / "edge-view-1.schema.json"
SPEC = ROOT / "docs" / "view-format.md"

VALIDATOR = Draft202012Validator(json.loads(PACKAGED.read_text()), format_checker=FormatChecker())


def schema_accepts(document: object) -> bool:
    return VALIDATOR.is_valid(document)


def validator_accepts(document: object) -> bool:
    try:
        parse_view(copy.deepcopy(document))
    except ViewInvalid:
        return False
    return True


def test_the_shipped_schema_is_the_one_the_types_give() -> None:
    assert PACKAGED.read_text() == schema_text(), \
        "regenerate: python -m edge.view.wire > edge/view/schema.json"
    assert DOCS.read_text() == PACKAGED.read_text(), "cp edge/view/schema.json docs/edge-view-1.schema.json"
    Draft202012Validator.check_schema(json.loads(PACKAGED.read_text()))


def test_edge_view_schema_and_example_commands() -> None:
    schema = subprocess.run([sys.executable, "-m", "edge", "view", "schema"], capture_output=True, text=True,
                            check=True).stdout
    assert schema == PACKAGED.read_text()
    example = subprocess.run([sys.executable, "-m", "edge", "view", "example"], capture_output=True, text=True,
                             check=True).stdout
    assert example == example_text()
    assert schema_accepts(json.loads(example)) and validator_accepts(json.loads(example))


def test_the_wheel_ships_the_schema(dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        assert wheel.read("edge/view/schema.json").decode() == PACKAGED.read_text()


def test_the_specification_shows_the_example() -> None:
    text = SPEC.read_text()
    start = text.index("<!-- example:start -->")
    block = text[start:text.index("<!-- example:end -->")]
    shown = block[block.index("```json") + len("```json"):block.rindex("```")]
    assert json.loads(shown) == example_document()


@pytest.mark.parametrize("document", [demo_document(), example_document(),
                                      generate_view(instances=60, networks=3),
                                      generate_view(instances=20, networks=1, seed=7)],
                         ids=["demo", "example", "generated", "generated-flat"])
def test_valid_views_pass_both(document) -> None:
    assert validator_accepts(document)
    errors = [error.message for error in VALIDATOR.iter_errors(document)]
    assert errors == []


def _instance(d):
    return d["instances"][0]


def _interface(d):
    return d["instances"][0]["interfaces"][0]


INVALID = {
    "wrong format": lambda d: d.update(format="edge-view/2"),
    "no serial": lambda d: d.pop("serial"),
    "serial as text": lambda d: d.update(serial="7"),
    "negative serial": lambda d: d.update(serial=-1),
    "boolean serial": lambda d: d.update(serial=True),
    "no instances": lambda d: d.pop("instances"),
    "instances not an array": lambda d: d.update(instances={}),
    "instance without id": lambda d: _instance(d).pop("id"),
    "empty instance id": lambda d: _instance(d).update(id=""),
    "no interfaces": lambda d: _instance(d).update(interfaces=[]),
    "bad MAC": lambda d: _interface(d).update(mac="zz:zz"),
    "no private IPs": lambda d: _interface(d).update(private_ips=[]),
    "leading zero": lambda d: _interface(d).update(private_ips=["127.0.0.01"]),
    "not an address": lambda d: _interface(d).update(private_ips=["localhost"]),
    "bad public IP": lambda d: _interface(d).update(public_ip="300.1.1.1"),
    "IPv4 in ipv6s": lambda d: _interface(d).update(ipv6s=["10.0.0.1"]),
    "bad IPv6": lambda d: _interface(d).update(ipv6s=["2001:db8:::1"]),
    "null in ipv6s": lambda d: _interface(d).update(ipv6s=[None]),
    "IPv6 metadata source": lambda d: _interface(d).update(metadata_sources=["2001:db8::1"]),
    "device index as text": lambda d: _interface(d).update(device_index="0"),
    "group without id": lambda d: _interface(d).update(security_groups=[{"name": "x"}]),
    "bad base64": lambda d: _instance(d).update(user_data="***"),
    "hop limit 65": lambda d: _instance(d)["metadata_options"].update(hop_limit=65),
    "hop limit 0": lambda d: _instance(d)["metadata_options"].update(hop_limit=0),
    "http_tokens maybe": lambda d: _instance(d)["metadata_options"].update(http_tokens="maybe"),
    "endpoint off": lambda d: _instance(d)["metadata_options"].update(endpoint="off"),
    "tags flag as text": lambda d: _instance(d)["metadata_options"].update(tags="yes"),
    "tag value number": lambda d: _instance(d).update(tags={"a": 1}),
    "role with slash": lambda d: _instance(d)["iam"].update(role="a/b"),
    "iam without arn": lambda d: _instance(d)["iam"].pop("instance_profile_arn"),
    "key without openssh": lambda d: _instance(d).update(public_keys=[{"name": "k"}]),
    "launch index float": lambda d: _instance(d).update(launch_index=1.5),
    "bad CIDR text": lambda d: d["networks"][0].update(cidrs=["10.0.0.0/8/8"]),
    "network without id": lambda d: d["networks"][0].pop("id"),
    "bad domain": lambda d: d["cloud"].update(internal_domain="bad domain"),
    "template without {ip}": lambda d: d["cloud"].update(private_name_template="host"),
    "negative TTL": lambda d: d["cloud"].update(dns_ttl=-1),
    "record without value": lambda d: d["cloud"]["dns_records"][0].pop("value"),
    "record name invalid": lambda d: d["cloud"]["dns_records"][0].update(name="-bad-.example"),
    "unknown record type": lambda d: d["cloud"]["dns_records"].append(
        {"name": "x.demo.example", "type": "SPF", "value": "v=spf1"}),
    "cloud not an object": lambda d: d.update(cloud=[]),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_views_fail_both(name) -> None:
    document = demo_document()
    INVALID[name](document)
    assert not validator_accepts(document), name
    assert not schema_accepts(document), name


BEYOND_THE_SCHEMA = {
    "duplicate instance id": lambda d: d["instances"][1].update(id=d["instances"][0]["id"]),
    "duplicate MAC": lambda d: d["instances"][1]["interfaces"][0].update(mac=_interface(d)["mac"]),
    "duplicate public IP": lambda d: d["instances"][1]["interfaces"][0].update(public_ip=_interface(d)["public_ip"]),
    "address outside its network": lambda d: _interface(d).update(private_ips=["10.9.9.9"]),
    "unknown network": lambda d: _interface(d).update(network="vpc-none"),
    "host bits in a CIDR": lambda d: d["networks"][0].update(cidrs=["127.0.0.1/8"]),
    "subnet outside its network": lambda d: d["networks"][1]["subnets"][0].update(cidr="10.0.0.0/24"),
    "duplicate network id": lambda d: d["networks"].append(copy.deepcopy(d["networks"][0])),
    "two interfaces at device_index 0": lambda d: _instance(d)["interfaces"].append(
        {**_interface(d), "id": "eni-2", "mac": "d0:0d:00:00:00:99", "public_ip": None,
         "private_ips": ["127.0.9.9"]}),
    "MX without preference": lambda d: d["cloud"]["dns_records"].append(
        {"name": "x.demo.example", "type": "MX", "value": "mail.demo.example"}),
    "resolver not an address": lambda d: d["cloud"].update(upstream_resolvers=["resolver.example"]),
    "IPv4 range as a subnet's IPv6 range": lambda d: d["networks"][1]["subnets"][0].update(
        ipv6_cidrs=["127.0.0.0/24"]),
}


@pytest.mark.parametrize("name", sorted(BEYOND_THE_SCHEMA))
def test_rules_no_json_schema_states_are_the_validators_alone(name) -> None:
    # docs/view-format.md lists these under "Beyond the JSON Schema".
    document = demo_document()
    BEYOND_THE_SCHEMA[name](document)
    assert not validator_accepts(document), name
    assert schema_accepts(document), name


_ODD = [None, "", "x", 0, -1, 1.5, True, [], {}, "10.0.0.5", "10.0.0.05", "AA:BB:CC:DD:EE:FF", "2001:DB8::1",
        "aGk=", "aGk", ["10.0.0.5"], [None], [{}], {"k": 1}, {"http_tokens": "required", "hop_limit": 65},
        [{"id": 5}], [{"id": "sg-1", "name": None}], {"instance_profile_arn": "a", "instance_profile_id": "i",
                                                     "role": "a/b"}, ["2001:db8::1", None], "\u00e9"]
_KEYS = ["id", "interfaces", "user_data", "tags", "block_devices", "iam", "public_keys", "launch_index",
         "metadata_options", "product_codes", "account_id", "mac", "private_ips", "public_ip", "ipv6s", "network",
         "device_index", "security_groups", "metadata_sources", "owner_id"]


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, len(_KEYS) - 1), st.integers(0, len(_ODD) - 1)),
                min_size=1, max_size=4))
def test_whatever_the_schema_refuses_the_validator_refuses(mutations) -> None:
    document = generate_view(instances=10, networks=2)
    for index, key, value in mutations:
        instance = document["instances"][index]
        interface = instance["interfaces"][0] if type(instance.get("interfaces")) is list and \
            instance["interfaces"] and type(instance["interfaces"][0]) is dict else None
        target = interface if key >= _KEYS.index("mac") and interface is not None else instance
        target[_KEYS[key]] = copy.deepcopy(_ODD[value])
    if not schema_accepts(document):
        assert not validator_accepts(document)


def test_the_defaults_the_schema_states_are_the_ones_served() -> None:
    schema = json.loads(PACKAGED.read_text())
    minimal = {"format": "edge-view/1", "serial": 0, "cloud": {}, "networks": [{"id": "vpc-1", "subnets": [{"id": "s"}]}],
               "instances": [{"id": "i-1", "interfaces": [{"id": "eni-1", "mac": "d0:0d:00:00:00:01",
                                                            "private_ips": ["10.0.0.1"]}],
                              "metadata_options": {}}]}
    view = parse_view(minimal)
    instance = view.instances[0]
    served = {"Cloud": view.cloud, "Instance": instance, "Interface": instance.interfaces[0],
              "MetadataOptions": instance.metadata_options, "Subnet": view.networks[0].subnets[0]}
    stated = 0
    for name, value in served.items():
        for member, rule in schema["$defs"][name]["properties"].items():
            if "default" in rule:
                default = rule["default"]
                expected = () if default in ([], {}) else default
                assert getattr(value, member) == expected, (name, member)
                stated += 1
    assert stated >= 25


def test_the_specification_documents_every_member() -> None:
    # A member added to the schema without a row in docs/view-format.md fails here.
    from edge.view import wire

    text = SPEC.read_text()
    sections = {"### Top level": wire.WireDocument, "### `cloud`": wire.WireCloud,
                "#### `cloud.dns_records[]`": wire.WireDnsRecord, "### `networks[]`": wire.WireNetwork,
                "#### `networks[].subnets[]`": wire.WireSubnet, "### `instances[]`": wire.WireInstance,
                "`metadata_options`:": wire.WireMetadataOptions,
                "#### `instances[].interfaces[]`": wire.WireInterface}
    for heading, struct in sections.items():
        start = text.index(heading)
        rows = []
        for line in text[start:].splitlines()[1:]:
            if line.startswith("#") or (rows and not line.startswith("|")):
                break
            if line.startswith("| `"):
                rows.append(line)
        documented = {name.strip().strip("`") for row in rows for name in row.split("|")[1].split(",")}
        assert set(struct.__struct_fields__) <= documented, (heading, set(struct.__struct_fields__) - documented)
