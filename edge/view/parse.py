"""Parse and validate an ``edge-view/1`` document into a :class:`View`.

A view is accepted whole or rejected whole: every problem found is collected
(with a JSON-path-like location) and reported together in :class:`ViewInvalid`,
so an operator fixes a bad producer in one round trip.

Address checks use ``socket.inet_pton`` round trips rather than ``ipaddress``
objects: a 100k-instance view carries several hundred thousand addresses and
this is the hot spot of a rebuild.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Iterable
from sys import intern
from typing import Any

from edge.errors import ViewInvalid
from edge.view.model import (
    DEFAULT_METADATA_OPTIONS,
    DEFAULT_NETWORK,
    FORMAT,
    Cloud,
    DnsRecord,
    IamProfile,
    Instance,
    Interface,
    MetadataOptions,
    Network,
    PublicKey,
    SecurityGroup,
    Subnet,
    View,
)

DNS_RECORD_TYPES = frozenset({"A", "AAAA", "CNAME", "TXT", "SRV", "MX", "PTR", "NS"})
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$", re.IGNORECASE)


def canonical_ipv4(text: object) -> str | None:
    """The address if ``text`` is a canonical dotted-quad IPv4 address, else None."""
    if type(text) is not str:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return None
    return text if socket.inet_ntop(socket.AF_INET, packed) == text else None


def canonical_ip(text: object) -> str | None:
    """The canonical form of an IPv4 or IPv6 address, or None if it is not one."""
    if type(text) is not str:
        return None
    if canonical_ipv4(text):
        return text
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        return None


def is_hostname(name: str) -> bool:
    name = name.rstrip(".")
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


class _Problems:
    """Collects problems; ``at`` names where in the document they were found."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


class _Reader:
    """Typed field access on one JSON object, reporting problems instead of raising."""

    __slots__ = ("obj", "where", "problems")

    def __init__(self, obj: dict[str, Any], where: str, problems: _Problems) -> None:
        self.obj = obj
        self.where = where
        self.problems = problems

    def _get(self, key: str, kinds: tuple[type, ...], kind_name: str, required: bool) -> Any:
        value = self.obj.get(key)
        if value is None:
            if required:
                self.problems.add(f"{self.where}.{key}", "required field is missing")
            return None
        if type(value) not in kinds:
            self.problems.add(f"{self.where}.{key}", f"expected {kind_name}, got {_type_name(value)}")
            return None
        return value

    def str(self, key: str, required: bool = False) -> str | None:
        return self._get(key, (str,), "string", required)

    def int(self, key: str, required: bool = False) -> int | None:
        return self._get(key, (int,), "integer", required)

    def bool(self, key: str) -> bool | None:
        return self._get(key, (bool,), "boolean", False)

    def list(self, key: str, required: bool = False) -> list[Any] | None:
        return self._get(key, (list,), "array", required)

    def dict(self, key: str, required: bool = False) -> dict[str, Any] | None:
        return self._get(key, (dict,), "object", required)

    def objects(self, key: str, required: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """The elements of an array of objects, each with its location."""
        items = self.list(key, required)
        out: list[tuple[str, dict[str, Any]]] = []
        for index, item in enumerate(items or ()):
            where = f"{self.where}.{key}[{index}]"
            if type(item) is dict:
                out.append((where, item))
            else:
                self.problems.add(where, f"expected object, got {_type_name(item)}")
        return out

    def strings(self, key: str, required: bool = False) -> list[str]:
        items = self.list(key, required)
        out: list[str] = []
        for index, item in enumerate(items or ()):
            if type(item) is str:
                out.append(item)
            else:
                self.problems.add(f"{self.where}.{key}[{index}]", f"expected string, got {_type_name(item)}")
        return out

    def string_map(self, key: str) -> tuple[tuple[str, str], ...]:
        mapping = self.dict(key)
        out: list[tuple[str, str]] = []
        for name, value in (mapping or {}).items():
            if type(value) is str:
                out.append((name, value))
            else:
                self.problems.add(f"{self.where}.{key}.{name}", f"expected string, got {_type_name(value)}")
        return tuple(out)


# Each network's CIDRs as (network int, mask int, version) so membership is two integer ops.
_CidrTable = dict[str, list[tuple[int, int, int]]]


def _ip_int(address: str) -> tuple[int, int]:
    if ":" in address:
        return int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big"), 6
    return int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big"), 4


def _in_cidrs(address: str, cidrs: list[tuple[int, int, int]]) -> bool:
    value, version = _ip_int(address)
    for net, mask, v in cidrs:
        if v == version and value & mask == net:
            return True
    return False


def _parse_cidr(text: object, where: str, problems: _Problems) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if type(text) is not str:
        problems.add(where, f"expected CIDR string, got {_type_name(text)}")
        return None
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        problems.add(where, f"invalid CIDR {text!r}: {exc}")
        return None


def parse_view_bytes(data: bytes) -> View:
    """Decode JSON bytes and validate them; raises :class:`ViewInvalid`."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ViewInvalid([f"not valid JSON: {exc}"]) from None
    except RecursionError:
        raise ViewInvalid(["not valid JSON: nested too deeply"]) from None
    return parse_view(document)


class Reused:
    """An element of ``instances`` that is already a validated :class:`Instance`.

    The decoder puts these in place of decoded objects when it recognises unchanged text
    (so neither decoding nor validating is repeated for it) or when it validated the
    element as soon as it was decoded (see :func:`instance_validator`).
    """

    __slots__ = ("instance",)

    def __init__(self, instance: Instance) -> None:
        self.instance = instance


def cidr_table_of(document_so_far: dict[str, Any]) -> _CidrTable | None:
    """The CIDRs of each network in ``networks``; None when it is missing or has problems."""
    networks = document_so_far.get("networks")
    if networks is None or type(networks) is not list:
        return None
    problems = _Problems()
    _, cidr_table = _parse_networks(_Reader({"networks": networks}, "$", problems), problems)
    return None if problems.items else cidr_table


def instance_validator(document_so_far: dict[str, Any]) -> Callable[[Any], Any] | None:
    """A function that validates one decoded element of ``instances`` on its own, or None.

    A streaming decoder calls it on each element as soon as the element is decoded, so the
    decoded objects of one instance are freed before the next one is decoded: peak memory
    stays near one instance's worth, and the long-lived objects of the snapshot are not left
    scattered among freed ones (a fragmented heap the allocator cannot give back).  Elements
    the fast validator does not accept are returned unchanged for :func:`parse_view` to
    explain.  None when ``networks`` has not been decoded yet or has problems (instances
    are validated against its CIDRs).
    """
    cidr_table = cidr_table_of(document_so_far)
    if cidr_table is None:
        return None

    def validate(item: Any) -> Any:
        if type(item) is not dict:
            return item
        instance = _fast_instance(item, cidr_table)
        return item if instance is None else Reused(instance)

    return validate


def parse_view(document: object, cross_check: bool = True) -> View:
    """Validate a decoded document; raises :class:`ViewInvalid` listing every problem.

    ``cross_check=False`` skips the rules that span instances (unique ids, addresses,
    MACs): only for a caller that enforces them itself (see :mod:`edge.view.delta`).
    """
    problems = _Problems()
    if type(document) is not dict:
        raise ViewInvalid([f"$: expected a JSON object, got {_type_name(document)}"])
    top = _Reader(document, "$", problems)
    fmt = top.str("format", required=True)
    if fmt is not None and fmt != FORMAT:
        # Nothing else can be trusted in a document of another format.
        raise ViewInvalid([f"$.format: expected {FORMAT!r}, got {fmt!r}"])
    serial = top.int("serial", required=True)
    if serial is not None and serial < 0:
        problems.add("$.serial", "must not be negative")
    generated = top.str("generated")
    cloud = _parse_cloud(top.dict("cloud") or {}, problems)
    networks, cidr_table = _parse_networks(top, problems)
    instances = _parse_instances(top, cidr_table, problems, cross_check)
    if problems.items:
        raise ViewInvalid(problems.items)
    assert serial is not None
    return View(serial=serial, generated=generated, cloud=cloud, networks=networks, instances=instances)


def _parse_cloud(obj: dict[str, Any], problems: _Problems) -> Cloud:
    r = _Reader(obj, "$.cloud", problems)
    defaults = Cloud()
    values: dict[str, Any] = {}
    for key in ("region", "partition", "services_domain", "internal_domain", "public_domain",
                "private_name_template", "public_name_template"):
        value = r.str(key)
        if value is not None:
            values[key] = value.rstrip(".").lower() if key.endswith("_domain") else value
    for key in ("internal_domain", "public_domain"):
        if key in values and not is_hostname(values[key]):
            problems.add(f"$.cloud.{key}", f"not a valid domain name: {values[key]!r}")
    for key in ("private_name_template", "public_name_template"):
        if key in values and "{ip}" not in values[key]:
            problems.add(f"$.cloud.{key}", "must contain {ip}")
    for key in ("dns_ttl", "negative_ttl"):
        value = r.int(key)
        if value is not None:
            if not 0 <= value <= 2**31 - 1:
                problems.add(f"$.cloud.{key}", f"out of range: {value}")
            values[key] = value
    resolvers = []
    for index, text in enumerate(r.strings("upstream_resolvers")):
        if parse_resolver_address(text) is None:
            problems.add(f"$.cloud.upstream_resolvers[{index}]", f"not an address or address:port: {text!r}")
        else:
            resolvers.append(text)
    values["upstream_resolvers"] = tuple(resolvers)
    default_ttl = values.get("dns_ttl", defaults.dns_ttl)
    records = []
    for where, item in r.objects("dns_records"):
        record = _parse_dns_record(item, where, default_ttl, problems)
        if record is not None:
            records.append(record)
    values["dns_records"] = tuple(records)
    return Cloud(**values)


def parse_resolver_address(text: str) -> tuple[str, int] | None:
    """``"192.0.2.53"``, ``"192.0.2.53:5353"``, ``"2001:db8::1"`` or ``"[2001:db8::1]:53"``."""
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            return None
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    address = canonical_ip(host)
    if address is None or not 0 < port < 65536:
        return None
    return address, port


def _parse_dns_record(item: dict[str, Any], where: str, default_ttl: int, problems: _Problems) -> DnsRecord | None:
    r = _Reader(item, where, problems)
    before = len(problems.items)
    name = r.str("name", required=True)
    rtype = r.str("type", required=True)
    value = r.str("value", required=True)
    ttl = r.int("ttl")
    if name is not None and not is_hostname(name):
        problems.add(f"{where}.name", f"not a valid domain name: {name!r}")
    if rtype is not None:
        rtype = rtype.upper()
        if rtype not in DNS_RECORD_TYPES:
            problems.add(f"{where}.type", f"unsupported record type {rtype!r} (supported: {', '.join(sorted(DNS_RECORD_TYPES))})")
    if ttl is not None and not 0 <= ttl <= 2**31 - 1:
        problems.add(f"{where}.ttl", f"out of range: {ttl}")
    if len(problems.items) != before or name is None or rtype is None or value is None:
        return None
    message = _check_record_value(rtype, value)
    if message:
        problems.add(f"{where}.value", message)
        return None
    return DnsRecord(name=name.rstrip(".").lower(), type=rtype, value=value, ttl=default_ttl if ttl is None else ttl)


def _check_record_value(rtype: str, value: str) -> str | None:
    if rtype == "A":
        return None if canonical_ipv4(value) else f"not an IPv4 address: {value!r}"
    if rtype == "AAAA":
        return None if canonical_ip(value) and ":" in value else f"not an IPv6 address: {value!r}"
    if rtype in ("CNAME", "PTR", "NS"):
        return None if is_hostname(value) else f"not a domain name: {value!r}"
    if rtype == "MX":
        parts = value.split()
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) < 65536 and is_hostname(parts[1]):
            return None
        return f"MX value must be 'PREFERENCE EXCHANGE': {value!r}"
    if rtype == "SRV":
        parts = value.split()
        if (len(parts) == 4 and all(p.isdigit() and int(p) < 65536 for p in parts[:3])
                and is_hostname(parts[3])):
            return None
        return f"SRV value must be 'PRIORITY WEIGHT PORT TARGET': {value!r}"
    if rtype == "TXT":
        return None if len(value.encode()) <= 4000 else "TXT value longer than 4000 bytes"
    return None


def _parse_networks(top: _Reader, problems: _Problems) -> tuple[tuple[Network, ...], _CidrTable]:
    networks: list[Network] = []
    table: _CidrTable = {}
    for where, item in top.objects("networks"):
        r = _Reader(item, where, problems)
        network_id = r.str("id", required=True)
        if network_id is None:
            continue
        if network_id in table:
            problems.add(f"{where}.id", f"duplicate network id {network_id!r}")
            continue
        cidrs: list[str] = []
        parsed = []
        for index, text in enumerate(r.list("cidrs") or ()):
            net = _parse_cidr(text, f"{where}.cidrs[{index}]", problems)
            if net is not None:
                cidrs.append(str(net))
                parsed.append(net)
        table[network_id] = [(int(n.network_address), int(n.netmask), n.version) for n in parsed]
        subnets: list[Subnet] = []
        seen_subnets: set[str] = set()
        for swhere, sitem in r.objects("subnets"):
            sr = _Reader(sitem, swhere, problems)
            subnet_id = sr.str("id", required=True)
            cidr_text = sitem.get("cidr")
            net = _parse_cidr(cidr_text, f"{swhere}.cidr", problems) if cidr_text is not None else None
            zone = sr.str("availability_zone")
            ranges = [(f"{swhere}.cidr", net)] if net is not None else []
            for index, text in enumerate(sr.list("ipv6_cidrs") or ()):
                v6 = _parse_cidr(text, f"{swhere}.ipv6_cidrs[{index}]", problems)
                if v6 is not None and v6.version != 6:
                    problems.add(f"{swhere}.ipv6_cidrs[{index}]", f"not an IPv6 CIDR: {text!r}")
                elif v6 is not None:
                    ranges.append((f"{swhere}.ipv6_cidrs[{index}]", v6))
            if subnet_id is None:
                continue
            if subnet_id in seen_subnets:
                problems.add(f"{swhere}.id", f"duplicate subnet id {subnet_id!r}")
            seen_subnets.add(subnet_id)
            for rwhere, inner in ranges:
                if parsed and not any(inner.version == p.version and inner.subnet_of(p)  # type: ignore[arg-type]
                                      for p in parsed):
                    problems.add(rwhere, f"{inner} is not inside network {network_id!r} CIDRs")
            # An IPv6 range in cidr (views written before ipv6_cidrs existed) is the first IPv6 range.
            subnets.append(Subnet(id=subnet_id, cidr=next((str(r) for _, r in ranges if r.version == 4), ""),
                                  availability_zone=zone,
                                  ipv6_cidrs=tuple(str(r) for _, r in ranges if r.version == 6)))
        networks.append(Network(id=network_id, cidrs=tuple(cidrs), subnets=tuple(subnets)))
    return tuple(networks), table


def _parse_instances(top: _Reader, cidr_table: _CidrTable, problems: _Problems,
                     cross_check: bool = True) -> tuple[Instance, ...]:
    instances: list[Instance] = []
    uniqueness = _Uniqueness()
    for index, item in enumerate(top.list("instances", required=True) or ()):
        if type(item) is Reused:
            instance = item.instance
        elif type(item) is not dict:
            problems.add(f"$.instances[{index}]", f"expected object, got {_type_name(item)}")
            continue
        else:
            instance = _fast_instance(item, cidr_table)
            if instance is None:
                instance = _parse_instance(item, f"$.instances[{index}]", cidr_table, problems)
            if instance is None:
                continue
        if not cross_check or uniqueness.check(instance, f"$.instances[{index}]", problems):
            instances.append(instance)
    return tuple(instances)


class _Uniqueness:
    """The rules that span instances: unique ids, (network, private address), public addresses, MACs."""

    __slots__ = ("ids", "private", "public", "macs")

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.private: dict[tuple[str, str], str] = {}
        self.public: dict[str, str] = {}
        self.macs: dict[str, str] = {}

    def check(self, instance: Instance, where: str, problems: _Problems) -> bool:
        """Record ``instance``; False when its id was seen before (it is then left out)."""
        previous = self.ids.get(instance.id)
        if previous is not None:
            problems.add(f"{where}.id", f"duplicate instance id {instance.id!r} (also at {previous})")
            return False
        self.ids[instance.id] = where
        seen_private, seen_public, seen_macs = self.private, self.public, self.macs
        for interface in instance.interfaces:
            keys = [(interface.network, a) for a in interface.private_ips + interface.ipv6s]
            keys += [(DEFAULT_NETWORK, a) for a in interface.metadata_sources]
            for key in keys:
                address = key[1]
                owner = seen_private.get(key)
                if owner is not None:
                    problems.add(where, f"private address {address} in network {key[0]!r} "
                                        f"is also used by {owner}")
                else:
                    seen_private[key] = instance.id
            if interface.public_ip is not None:
                owner = seen_public.get(interface.public_ip)
                if owner is not None:
                    problems.add(where, f"public address {interface.public_ip} is also used by {owner}")
                else:
                    seen_public[interface.public_ip] = instance.id
            owner = seen_macs.get(interface.mac) if interface.mac else None
            if owner is not None:
                problems.add(where, f"MAC {interface.mac} is also used by {owner}")
            elif interface.mac:
                seen_macs[interface.mac] = instance.id
        return True


def cross_instance_problems(instances: Iterable[Instance]) -> list[str]:
    """What :func:`parse_view` reports about the rules across ``instances``, taken in document order."""
    problems = _Problems()
    uniqueness = _Uniqueness()
    for index, instance in enumerate(instances):
        uniqueness.check(instance, f"$.instances[{index}]", problems)
    return problems.items


def _parse_instance(item: dict[str, Any], where: str, cidr_table: _CidrTable, problems: _Problems) -> Instance | None:
    r = _Reader(item, where, problems)
    before = len(problems.items)
    instance_id = r.str("id", required=True)
    if instance_id is not None and not instance_id:
        problems.add(f"{where}.id", "must not be empty")
    interfaces = [_parse_interface(i, iwhere, cidr_table, problems)
                  for iwhere, i in r.objects("interfaces", required=True)]
    if not interfaces and "interfaces" in item and type(item["interfaces"]) is list:
        problems.add(f"{where}.interfaces", "at least one interface is required")
    optional: dict[str, Any] = {}
    for key in ("reservation_id", "account_id", "image_id", "kernel_id", "ramdisk_id", "instance_type",
                "architecture", "launch_time", "availability_zone"):
        value = r.str(key)
        if value is not None:
            optional[key] = value
    launch_index = r.int("launch_index")
    if launch_index is not None:
        optional["launch_index"] = launch_index
    keys = []
    for kwhere, key_obj in r.objects("public_keys"):
        kr = _Reader(key_obj, kwhere, problems)
        name, openssh = kr.str("name", required=True), kr.str("openssh", required=True)
        if name is not None and openssh is not None:
            keys.append(PublicKey(name=name, openssh=openssh))
    optional["public_keys"] = tuple(keys)
    user_data = r.str("user_data")
    if user_data is not None:
        try:
            optional["user_data"] = base64.b64decode(user_data, validate=True)
        except (binascii.Error, ValueError):
            problems.add(f"{where}.user_data", "not valid base64")
    iam = r.dict("iam")
    if iam is not None:
        ir = _Reader(iam, f"{where}.iam", problems)
        arn = ir.str("instance_profile_arn", required=True)
        profile_id = ir.str("instance_profile_id", required=True)
        role = ir.str("role", required=True)
        if role is not None and (not role or "/" in role):
            problems.add(f"{where}.iam.role", f"not a valid role name: {role!r}")
        if arn is not None and profile_id is not None and role:
            optional["iam"] = IamProfile(instance_profile_arn=arn, instance_profile_id=profile_id, role=role)
    optional["tags"] = r.string_map("tags")
    optional["block_devices"] = r.string_map("block_devices")
    optional["product_codes"] = tuple(r.strings("product_codes"))
    options = r.dict("metadata_options")
    if options is not None:
        optional["metadata_options"] = _parse_metadata_options(options, f"{where}.metadata_options", problems)
    if len(problems.items) != before or instance_id is None:
        return None
    ordered = sorted((i for i in interfaces if i is not None), key=lambda i: i.device_index)
    for first, second in zip(ordered, ordered[1:]):
        if first.device_index == second.device_index:
            problems.add(f"{where}.interfaces", f"two interfaces with device_index {first.device_index}")
            return None
    return Instance(id=instance_id, interfaces=tuple(ordered), **optional)


def _parse_metadata_options(obj: dict[str, Any], where: str, problems: _Problems) -> MetadataOptions:
    r = _Reader(obj, where, problems)
    d = DEFAULT_METADATA_OPTIONS
    tokens = r.str("http_tokens")
    if tokens is not None and tokens not in ("optional", "required"):
        problems.add(f"{where}.http_tokens", f"must be 'optional' or 'required', got {tokens!r}")
    hop_limit = r.int("hop_limit")
    if hop_limit is not None and not 1 <= hop_limit <= 64:
        problems.add(f"{where}.hop_limit", f"must be 1..64, got {hop_limit}")
    tags = r.bool("tags")
    endpoint = r.str("endpoint")
    if endpoint is not None and endpoint not in ("enabled", "disabled"):
        problems.add(f"{where}.endpoint", f"must be 'enabled' or 'disabled', got {endpoint!r}")
    return MetadataOptions(
        http_tokens=tokens or d.http_tokens,
        hop_limit=hop_limit or d.hop_limit,
        tags=d.tags if tags is None else tags,
        endpoint=endpoint or d.endpoint,
    )


def _address_list(r: _Reader, key: str, where: str, check: Callable[[object], str | None],
                  kind: str, problems: _Problems, required: bool = False) -> tuple[str, ...]:
    out = []
    for index, text in enumerate(r.list(key, required) or ()):
        address = check(text)
        if address is None:
            problems.add(f"{where}.{key}[{index}]", f"not a valid {kind}: {text!r}")
        else:
            out.append(address)
    return tuple(out)


def _ipv6(text: object) -> str | None:
    address = canonical_ip(text)
    return address if address is not None and ":" in address else None


def _parse_interface(item: dict[str, Any], where: str, cidr_table: _CidrTable, problems: _Problems) -> Interface | None:
    r = _Reader(item, where, problems)
    before = len(problems.items)
    interface_id = r.str("id", required=True)
    mac = r.str("mac", required=True)
    if mac is not None:
        mac = mac.lower()
        # "" is an interface whose MAC the control plane does not know (served without MAC paths).
        if mac and not _MAC.match(mac):
            problems.add(f"{where}.mac", f"not a MAC address: {mac!r}")
    device_index = r.int("device_index")
    network = r.str("network")
    if network is None:
        network = DEFAULT_NETWORK
    cidrs = cidr_table.get(network)
    if cidrs is None and network != DEFAULT_NETWORK:
        problems.add(f"{where}.network", f"unknown network {network!r} (not in $.networks)")
    subnet = r.str("subnet")
    private_ips = _address_list(r, "private_ips", where, canonical_ip, "IP address", problems, required=True)
    if "private_ips" in item and type(item["private_ips"]) is list and not item["private_ips"]:
        problems.add(f"{where}.private_ips", "at least one private IP is required")
    if cidrs:
        for address in private_ips:
            if not _in_cidrs(address, cidrs):
                problems.add(f"{where}.private_ips", f"{address} is outside network {network!r} CIDRs")
    public_ip = r.str("public_ip")
    if public_ip is not None and canonical_ip(public_ip) is None:
        problems.add(f"{where}.public_ip", f"not a valid IP address: {public_ip!r}")
    ipv6s = _address_list(r, "ipv6s", where, _ipv6, "IPv6 address", problems)
    groups = []
    for gwhere, gitem in r.objects("security_groups"):
        gr = _Reader(gitem, gwhere, problems)
        group_id, name = gr.str("id", required=True), gr.str("name")
        if group_id is not None:
            groups.append(SecurityGroup(id=group_id, name=name if name is not None else group_id))
    owner_id = r.str("owner_id")
    metadata_sources = _address_list(r, "metadata_sources", where, canonical_ipv4, "IPv4 address", problems)
    if len(problems.items) != before or interface_id is None or mac is None:
        return None
    return Interface(
        id=interface_id, mac=mac, device_index=device_index or 0, network=network, subnet=subnet,
        private_ips=private_ips, public_ip=canonical_ip(public_ip) if public_ip else None, ipv6s=ipv6s,
        security_groups=tuple(groups), owner_id=owner_id, metadata_sources=metadata_sources,
    )


# -- fast path -----------------------------------------------------------------------------------
# Nearly every instance of a real view is valid, and checking field by field through
# _Reader (which explains problems) dominates a large rebuild.  _fast_instance makes the
# same checks inline and returns None at the first doubt; the caller then runs the
# explaining parser, which is the reference for what is accepted.

_OPTIONAL_STR_FIELDS = ("reservation_id", "account_id", "image_id", "kernel_id", "ramdisk_id",
                        "instance_type", "architecture", "launch_time", "availability_zone")
_SHARED_STR_FIELDS = frozenset({"account_id", "image_id", "kernel_id", "ramdisk_id", "instance_type",
                                "architecture", "launch_time", "availability_zone"})
"""Fields most instances share a handful of values of: one string object per value (``sys.intern``)
instead of one per instance saves about 0.9 KB per instance with the other shared fields below."""
_PAIRS_CACHE: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
_PAIRS_CACHE_LIMIT = 4096
_OPTIONS_CACHE: dict[tuple[object, object, object, object], MetadataOptions] = {}
_GROUP_CACHE: dict[tuple[str, str], SecurityGroup] = {}


def _shared_pairs(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """One tuple per distinct mapping (block device mappings repeat across instances of an image)."""
    shared = _PAIRS_CACHE.get(pairs)
    if shared is None:
        if len(_PAIRS_CACHE) >= _PAIRS_CACHE_LIMIT:
            return pairs
        shared = _PAIRS_CACHE[pairs] = pairs
    return shared


def _fast_str_pairs(value: object) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return ()
    if type(value) is not dict:
        return None
    for v in value.values():
        if type(v) is not str:
            return None
    # Keys (tag keys, device names) repeat across instances: one string object per key.
    return tuple(zip(map(intern, value), value.values()))


def _fast_instance(item: dict[str, Any], cidr_table: _CidrTable) -> Instance | None:
    get = item.get
    instance_id = get("id")
    if type(instance_id) is not str or not instance_id:
        return None
    raw_interfaces = get("interfaces")
    if type(raw_interfaces) is not list or not raw_interfaces:
        return None
    interfaces = []
    for raw in raw_interfaces:
        if type(raw) is not dict:
            return None
        interface = _fast_interface(raw, cidr_table)
        if interface is None:
            return None
        interfaces.append(interface)
    if len(interfaces) > 1:
        interfaces.sort(key=lambda i: i.device_index)
        indexes = [i.device_index for i in interfaces]
        if len(set(indexes)) != len(indexes):
            return None
    optional: dict[str, Any] = {}
    for key in _OPTIONAL_STR_FIELDS:
        value = get(key)
        if value is not None:
            if type(value) is not str:
                return None
            optional[key] = intern(value) if key in _SHARED_STR_FIELDS else value
    launch_index = get("launch_index")
    if launch_index is not None:
        if type(launch_index) is not int:
            return None
        optional["launch_index"] = launch_index
    raw_keys = get("public_keys")
    if raw_keys is not None:
        if type(raw_keys) is not list:
            return None
        keys = []
        for key in raw_keys:
            if type(key) is not dict:
                return None
            name, openssh = key.get("name"), key.get("openssh")
            if type(name) is not str or type(openssh) is not str:
                return None
            # Key pairs are shared by every instance launched with them.
            keys.append(PublicKey(intern(name), intern(openssh)))
        optional["public_keys"] = tuple(keys)
    user_data = get("user_data")
    if user_data is not None:
        if type(user_data) is not str:
            return None
        try:
            # Stricter than b64decode(validate=True) (padding rules): anything it refuses
            # goes to the explaining parser, which decides as b64decode does.
            optional["user_data"] = binascii.a2b_base64(user_data, strict_mode=True)
        except (binascii.Error, ValueError):
            return None
    iam = get("iam")
    if iam is not None:
        if type(iam) is not dict:
            return None
        arn, profile_id, role = iam.get("instance_profile_arn"), iam.get("instance_profile_id"), iam.get("role")
        if type(arn) is not str or type(profile_id) is not str or type(role) is not str or not role or "/" in role:
            return None
        optional["iam"] = IamProfile(intern(arn), profile_id, intern(role))
    for key in ("tags", "block_devices"):
        pairs = _fast_str_pairs(get(key))
        if pairs is None:
            return None
        if pairs:
            optional[key] = _shared_pairs(pairs) if key == "block_devices" else pairs
    codes = get("product_codes")
    if codes is not None:
        if type(codes) is not list or any(type(c) is not str for c in codes):
            return None
        optional["product_codes"] = tuple(codes)
    options = get("metadata_options")
    if options is not None:
        if type(options) is not dict:
            return None
        key4 = (options.get("http_tokens"), options.get("hop_limit"), options.get("tags"), options.get("endpoint"))
        parsed = _OPTIONS_CACHE.get(key4)  # type: ignore[arg-type]
        if parsed is None:
            problems = _Problems()
            parsed = _parse_metadata_options(options, "", problems)
            if problems.items:
                return None
            if type(key4[1]) in (int, type(None)) and type(key4[2]) in (bool, type(None)):
                _OPTIONS_CACHE[key4] = parsed  # type: ignore[index]
        optional["metadata_options"] = parsed
    return Instance(instance_id, tuple(interfaces), **optional)


def _fast_interface(raw: dict[str, Any], cidr_table: _CidrTable) -> Interface | None:
    get = raw.get
    interface_id, mac = get("id"), get("mac")
    if type(interface_id) is not str or type(mac) is not str:
        return None
    mac = mac.lower()
    if not _MAC.match(mac):
        return None
    device_index = get("device_index")
    if device_index is None:
        device_index = 0
    elif type(device_index) is not int:
        return None
    network = get("network")
    if network is None:
        network = DEFAULT_NETWORK
    elif type(network) is not str:
        return None
    else:
        network = intern(network)
    cidrs = cidr_table.get(network)
    if cidrs is None and network != DEFAULT_NETWORK:
        return None
    subnet = get("subnet")
    if subnet is not None:
        if type(subnet) is not str:
            return None
        subnet = intern(subnet)
    raw_ips = get("private_ips")
    if type(raw_ips) is not list or not raw_ips:
        return None
    for address in raw_ips:
        if type(address) is not str:
            return None
        try:
            packed = socket.inet_pton(socket.AF_INET, address)
        except OSError:
            return None  # IPv6 or invalid: the explaining parser decides
        if socket.inet_ntop(socket.AF_INET, packed) != address:
            return None
        if cidrs:
            value = int.from_bytes(packed, "big")
            for net, mask, version in cidrs:
                if version == 4 and value & mask == net:
                    break
            else:
                return None
    public_ip = get("public_ip")
    if public_ip is not None and canonical_ip(public_ip) != public_ip:
        return None
    ipv6s = get("ipv6s")
    if ipv6s:
        if type(ipv6s) is not list or any(type(a) is not str or _ipv6(a) != a for a in ipv6s):
            return None
        ipv6s = tuple(ipv6s)
    elif ipv6s is None or ipv6s == []:
        ipv6s = ()
    else:
        return None
    groups: list[SecurityGroup] = []
    raw_groups = get("security_groups")
    if raw_groups is not None:
        if type(raw_groups) is not list:
            return None
        for group in raw_groups:
            if type(group) is not dict:
                return None
            group_id, name = group.get("id"), group.get("name")
            if type(group_id) is not str or (name is not None and type(name) is not str):
                return None
            key = (group_id, name if name is not None else group_id)
            cached = _GROUP_CACHE.get(key)
            if cached is None:
                cached = _GROUP_CACHE.setdefault(key, SecurityGroup(*key)) if len(_GROUP_CACHE) < 65536 else SecurityGroup(*key)
            groups.append(cached)
    owner_id = get("owner_id")
    if owner_id is not None:
        if type(owner_id) is not str:
            return None
        owner_id = intern(owner_id)
    sources = get("metadata_sources")
    if sources is not None:
        if type(sources) is not list or any(type(a) is not str or canonical_ipv4(a) != a for a in sources):
            return None
        sources = tuple(sources)
    return Interface(interface_id, mac, device_index, network, subnet, tuple(raw_ips), public_ip, ipv6s,
                     tuple(groups), owner_id, sources or ())
