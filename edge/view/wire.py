"""The ``edge-view/1`` schema: msgspec types for every part of the document, and the checks after them.

This module is the one statement of what a view document may contain
(``docs/view-format.md`` explains it; ``edge view schema`` prints the JSON
Schema generated from it).  A rule lives in exactly one place:

* the types below say what msgspec checks while it decodes, in C: JSON types,
  required fields, ``null`` (the same as absent for every optional field),
  ranges, enumerations, lengths and the syntax patterns of addresses and
  names.  ``msgspec.json.schema`` turns the same annotations into the JSON
  Schema, so the two cannot drift;
* the ``*_from_wire`` functions make the checks a JSON type cannot express
  (canonical IPv6 text, CIDRs, an address inside its network's CIDRs, DNS
  record values by type, duplicates inside one instance or network) and
  build the immutable model values (:mod:`edge.view.model`), which hold the
  defaults of absent fields.

The explaining parser (:func:`edge.view.parse.explain`) only words what a
type refused, reading these same types; it decides nothing.

Adding a member (say, a metadata path that needs new instance data) touches
the model (the field and its default), the type here (its schema, then
``python -m edge.view.wire > edge/view/schema.json`` and the copy in
``docs/``), the metadata tree that serves it and ``docs/view-format.md``:
instances and interfaces are built from the model's own field list
(:func:`_positional_builder`), which reads a field the wire type has under the
same name.

At 100k instances, cutting the document, decoding each instance by type and
checking it takes about 1.2 s where ``json`` plus a dictionary-walking
validator took 2.7 s (``python -m bench.view_scale``, "decode + validate").
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from sys import intern
from typing import Annotated, Any, Literal, cast

import msgspec

from edge.view.addresses import (
    HOSTNAME_PATTERN,
    canonical_ip,
    canonical_ipv6,
    parse_resolver_address,
)
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
)
from edge.view.records import RECORD_TYPES, supported, type_pattern


def _text(description: str, pattern: str | None = None, problem: str | None = None,
          schema: dict[str, Any] | None = None, min_length: int | None = None) -> msgspec.Meta:
    """The constraints of a string type; ``problem`` words a pattern mismatch (``{value}`` is the value's repr)."""
    extra = {"problem": problem} if problem else None
    return msgspec.Meta(pattern=pattern, min_length=min_length, description=description,
                        extra_json_schema=schema, extra=extra)


_END = r"$(?!\n)"
r"""The end of the text, in both Python's and ECMA-262's regular expressions (a bare ``$`` also
matches before a final newline in Python, and ``\Z`` is unknown to ECMA-262)."""
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV6_CHARS = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"
"""Text that may be an IPv6 address: the check after decoding parses it (``inet_pton``)."""

IPv4Address = Annotated[str, _text(
    "An IPv4 address in dotted-quad form, without leading zeros.", rf"^{_IPV4}{_END}",
    "not a valid IPv4 address: {value}", {"format": "ipv4"})]
IPv6Address = Annotated[str, _text(
    "An IPv6 address, in any form RFC 4291 allows; served in its RFC 5952 form.",
    rf"^{_IPV6_CHARS}{_END}", "not a valid IPv6 address: {value}", {"format": "ipv6"})]
IPAddress = Annotated[str, _text(
    "An IPv4 address (dotted quad, no leading zeros) or an IPv6 address.",
    rf"^(?:{_IPV4}|{_IPV6_CHARS}){_END}", "not a valid IP address: {value}",
    {"anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]})]
MacAddress = Annotated[str, _text(
    "A MAC address, six colon-separated pairs of hex digits (any case; served in lower case); "
    "empty when the control plane does not know it (the interface is served without MAC paths).",
    rf"^(?:[0-9A-Fa-f]{{2}}(?::[0-9A-Fa-f]{{2}}){{5}})?{_END}", "not a MAC address: {value}")]
CidrText = Annotated[str, _text(
    "An IPv4 or IPv6 network in CIDR notation (ADDRESS/PREFIX), with no host bits set.",
    rf"^[0-9A-Fa-f:.]+(?:/[0-9.]+)?{_END}", "invalid CIDR {value}")]
DomainName = Annotated[str, _text(
    "A domain name: labels of letters, digits, '-' and '_' (no leading or trailing '-'), "
    "at most 253 characters, one trailing dot allowed.", HOSTNAME_PATTERN,
    "not a valid domain name: {value}")]
NameTemplate = Annotated[str, _text(
    "A name label template; {ip} is replaced by the address with '.' and ':' as '-'.",
    r"\{ip\}", "must contain {{ip}}")]
RoleName = Annotated[str, _text("An IAM role name (no '/').", rf"^[^/]+{_END}", "not a valid role name: {value}")]
RecordTypeName = Annotated[str, _text(
    f"A record type: {supported()} (any case).", type_pattern(),
    f"unsupported record type {{value}} (supported: {supported()})")]
NonEmpty = Annotated[str, _text("A non-empty string.", min_length=1)]
Ttl = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1, description="Seconds (0 .. 2^31-1).")]
Serial = Annotated[int, msgspec.Meta(ge=0, description="The view's version: a larger serial replaces a smaller one.")]
HopLimit = Annotated[int, msgspec.Meta(ge=1, le=64, description="IP TTL / hop limit of token answers (1..64).")]


def _at_least_one(what: str) -> msgspec.Meta:
    """The constraint of a tuple that may not be empty."""
    return msgspec.Meta(min_length=1, extra={"problem": f"at least one {what} is required"})


Base64 = Annotated[bytes, msgspec.Meta(
    description="Base64 (RFC 4648, with '=' padding, no line breaks) of the raw bytes.",
    # msgspec decodes base64 in C; JSON Schema's contentEncoding is only an annotation, so the
    # schema also states the same alphabet and padding as a pattern.
    extra_json_schema={"pattern": rf"^(?:[A-Za-z0-9+/]{{4}})*(?:[A-Za-z0-9+/]{{2}}==|[A-Za-z0-9+/]{{3}}=)?{_END}"})]
PrivateIps = Annotated[tuple[IPAddress, ...], _at_least_one("private IP")]


class _Wire(msgspec.Struct, frozen=True, gc=False):
    """Frozen (hashable, so equal parts are shared) and outside the cyclic GC, like the model."""


class WireDnsRecord(_Wire, frozen=True):
    """A record served in the local zones, besides the instances' own names."""

    name: DomainName
    type: RecordTypeName
    value: Annotated[str, msgspec.Meta(description="Presentation text by type: " + "; ".join(
        f"{kind.name} {kind.value_form}" for kind in RECORD_TYPES.values()) + ".")]
    ttl: Ttl | None = None
    """Defaults to the cloud's dns_ttl."""
    audience: Literal["everyone", "instances"] | None = None
    """Who is answered this record: everyone, or only askers the view knows as instances (by listener
    network and source address); the others are answered as if it did not exist."""


class WireCloud(_Wire, frozen=True):
    """Cloud-wide settings: naming, DNS and what instances are told about their region."""

    region: str | None = None
    partition: str | None = None
    services_domain: str | None = None
    internal_domain: DomainName | None = None
    public_domain: DomainName | None = None
    private_name_template: NameTemplate | None = None
    public_name_template: NameTemplate | None = None
    dns_ttl: Ttl | None = None
    negative_ttl: Ttl | None = None
    upstream_resolvers: tuple[Annotated[str, msgspec.Meta(
        description="ADDRESS, ADDRESS:PORT (IPv4) or [ADDRESS]:PORT (IPv6).")], ...] | None = None
    dns_records: tuple[WireDnsRecord, ...] | None = None
    public_name_horizon: Literal["network", "cidr"] | None = None
    """Who is answered an instance's private address for its public name: every asker in the
    instance's network ("network"), or only instances of that network whose own private address lies
    in the same one of the network's cidrs as the instance's ("cidr"); everyone else gets the public
    address."""
    private_ptrs: Literal["all", "rfc1918"] | None = None
    """Which private addresses get PTR records: all, or only RFC 1918 ones ("rfc1918": the reverse
    zones of private ranges outside RFC 1918 are then not local, and their questions are forwarded)."""


class WireSubnet(_Wire, frozen=True):
    """A subnet; cidr and ipv6_cidrs lie inside the network's CIDRs."""

    id: str
    cidr: CidrText | None = None
    """The subnet's IPv4 range (an IPv6 range here is read as the first of ipv6_cidrs)."""
    availability_zone: str | None = None
    ipv6_cidrs: tuple[CidrText, ...] | None = None


class WireNetwork(_Wire, frozen=True):
    """An address space (a VPC, or the flat network "") and its subnets."""

    id: str
    cidrs: tuple[CidrText, ...] | None = None
    subnets: tuple[WireSubnet, ...] | None = None


class WireSecurityGroup(_Wire, frozen=True):
    """A security group the interface is in; name defaults to the id."""

    id: str
    name: str | None = None
    """Defaults to the id."""


class WireIamProfile(_Wire, frozen=True):
    """The instance profile; its credentials come from the gateway's credential source, never the view."""

    instance_profile_arn: str
    instance_profile_id: str
    role: RoleName


class WireMetadataOptions(_Wire, frozen=True):
    """Defaults: http_tokens optional, hop_limit 1, tags false, endpoint enabled."""

    http_tokens: Literal["optional", "required"] | None = None
    hop_limit: HopLimit | None = None
    tags: bool | None = None
    endpoint: Literal["enabled", "disabled"] | None = None


class WireInterface(_Wire, frozen=True):
    """A network interface. The one with the lowest device_index is the instance's primary interface.

    (network, private IP), public IPs and MACs are unique in the document; private IPs lie inside
    the network's CIDRs.
    """

    id: str
    mac: MacAddress
    private_ips: PrivateIps
    device_index: int | None = None
    network: str | None = None
    """The id of a network of the document; absent: the flat network ""."""
    subnet: str | None = None
    public_ip: IPAddress | None = None
    ipv6s: tuple[IPv6Address, ...] | None = None
    security_groups: tuple[WireSecurityGroup, ...] | None = None
    owner_id: str | None = None
    metadata_sources: tuple[IPv4Address, ...] | None = None
    """Addresses a proxy rewrites this interface's metadata requests to (Eucalyptus VPC 255.x.y.z)."""


Interfaces = Annotated[tuple[WireInterface, ...], _at_least_one("interface")]


class WireInstance(_Wire, frozen=True):
    """One instance; everything but id and interfaces is optional. Ids are unique in the document."""

    id: NonEmpty
    interfaces: Interfaces
    reservation_id: str | None = None
    account_id: str | None = None
    image_id: str | None = None
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    instance_type: str | None = None
    architecture: str | None = None
    launch_index: int | None = None
    launch_time: str | None = None
    availability_zone: str | None = None
    public_keys: tuple[PublicKey, ...] | None = None
    user_data: Base64 | None = None
    iam: WireIamProfile | None = None
    tags: dict[str, str] | None = None
    block_devices: dict[str, str] | None = None
    metadata_options: WireMetadataOptions | None = None
    product_codes: tuple[str, ...] | None = None


class WireDocument(_Wire, frozen=True):
    """A network view: what a control plane publishes and every edge gateway polls (format edge-view/1).

    Every optional member may be null, which means the same as absent. Unknown members are ignored.
    """

    # The one constant names the format here and in the model; type checkers accept only a literal
    # inside Literal[], msgspec takes the constant's value.
    format: Literal[FORMAT]  # type: ignore[valid-type]
    serial: Serial
    instances: tuple[WireInstance, ...]
    generated: str | None = None
    """When the producer wrote the document (informational, shown by /view)."""
    cloud: WireCloud | None = None
    networks: tuple[WireNetwork, ...] | None = None


INSTANCE_DECODER = msgspec.json.Decoder(WireInstance)
"""Raises ``msgspec.DecodeError`` (``ValidationError`` when the element breaks the schema)."""

class Problems:
    """Where each problem was found (a JSON-path-like location) and what it is."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def __bool__(self) -> bool:
        return bool(self.items)


# -- cloud and networks -----------------------------------------------------------------------------

_DEFAULT_CLOUD = Cloud()


def cloud_from_wire(wire: WireCloud | None, problems: Problems) -> Cloud:
    if wire is None:
        return Cloud()
    values: dict[str, Any] = {name: getattr(wire, name) for name in WireCloud.__struct_fields__
                              if getattr(wire, name) is not None}
    for key in ("internal_domain", "public_domain"):
        if key in values:
            values[key] = values[key].rstrip(".").lower()
    resolvers = []
    for index, text in enumerate(wire.upstream_resolvers or ()):
        if parse_resolver_address(text) is None:
            problems.add(f"$.cloud.upstream_resolvers[{index}]", f"not an address or address:port: {text!r}")
        else:
            resolvers.append(text)
    values["upstream_resolvers"] = tuple(resolvers)
    default_ttl = values.get("dns_ttl", _DEFAULT_CLOUD.dns_ttl)
    records = []
    for index, record in enumerate(wire.dns_records or ()):
        # The schema's pattern admits only the table's types: a lookup that failed here would be a
        # defect, never a record to drop.
        kind = RECORD_TYPES[record.type.upper()]
        message = kind.problem(record.value)
        if message:
            problems.add(f"$.cloud.dns_records[{index}].value", message)
            continue
        records.append(DnsRecord(name=record.name.rstrip(".").lower(), type=kind.name, value=record.value,
                                 ttl=default_ttl if record.ttl is None else record.ttl,
                                 audience=record.audience or "everyone"))
    values["dns_records"] = tuple(records)
    return Cloud(**values)


DEFAULT_DEVICE_INDEX = 0
"""An interface's ``device_index`` when the view gives none (its network's default is ``DEFAULT_NETWORK``)."""

PrefixTable = dict[str, "tuple[str, ...] | None"]
"""Network id -> the text prefixes its IPv4 addresses must start with (None: compare as integers)."""


class Cidrs:
    """Each network's CIDRs, as integers and (octet-aligned IPv4) as text prefixes.

    Membership of an IPv4 address is then one ``str.startswith``; other CIDRs take two
    integer operations per CIDR.
    """

    __slots__ = ("table", "prefixes")

    def __init__(self, table: dict[str, list[tuple[int, int, int]]]) -> None:
        self.table = table
        """Network id -> [(network int, mask int, IP version)]."""
        self.prefixes: PrefixTable = {DEFAULT_NETWORK: ("",)}
        for network, cidrs in table.items():
            self.prefixes[network] = _prefixes(cidrs)

    def contains(self, network: str, address: str) -> bool:
        cidrs = self.table.get(network)
        if not cidrs:
            return True
        if ":" in address:
            value, version = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big"), 6
        else:
            value, version = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big"), 4
        return any(v == version and value & mask == net for net, mask, v in cidrs)


def _prefixes(cidrs: list[tuple[int, int, int]]) -> tuple[str, ...] | None:
    if not cidrs:
        return ("",)
    prefixes = []
    for net, mask, version in cidrs:
        if version != 4:
            continue
        length = bin(mask).count("1")
        if length % 8 or length == 32:
            return None
        octets = socket.inet_ntop(socket.AF_INET, net.to_bytes(4, "big")).split(".")[:length // 8]
        prefixes.append("".join(o + "." for o in octets))
    return tuple(prefixes)


def _network_of(text: str, where: str, problems: Problems) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        problems.add(where, f"invalid CIDR {text!r}: {exc}")
        return None


def networks_from_wire(items: list[tuple[str, WireNetwork]], problems: Problems) -> tuple[tuple[Network, ...], Cidrs]:
    """The networks (each given with its location) and their CIDRs; problems go to ``problems``."""
    networks: list[Network] = []
    table: dict[str, list[tuple[int, int, int]]] = {}
    for where, wire in items:
        if wire.id in table:
            problems.add(f"{where}.id", f"duplicate network id {wire.id!r}")
            continue
        parsed = [net for index, text in enumerate(wire.cidrs or ())
                  if (net := _network_of(text, f"{where}.cidrs[{index}]", problems)) is not None]
        table[wire.id] = [(int(n.network_address), int(n.netmask), n.version) for n in parsed]
        subnets: list[Subnet] = []
        seen: set[str] = set()
        for sindex, subnet in enumerate(wire.subnets or ()):
            swhere = f"{where}.subnets[{sindex}]"
            ranges = []
            if subnet.cidr is not None:
                net = _network_of(subnet.cidr, f"{swhere}.cidr", problems)
                if net is not None:
                    ranges.append((f"{swhere}.cidr", net))
            for index, text in enumerate(subnet.ipv6_cidrs or ()):
                net = _network_of(text, f"{swhere}.ipv6_cidrs[{index}]", problems)
                if net is not None and net.version != 6:
                    problems.add(f"{swhere}.ipv6_cidrs[{index}]", f"not an IPv6 CIDR: {text!r}")
                elif net is not None:
                    ranges.append((f"{swhere}.ipv6_cidrs[{index}]", net))
            if subnet.id in seen:
                problems.add(f"{swhere}.id", f"duplicate subnet id {subnet.id!r}")
            seen.add(subnet.id)
            for rwhere, inner in ranges:
                # subnet_of is typed for one address family; the version test before it ensures that.
                if parsed and not any(inner.version == p.version and inner.subnet_of(p)  # type: ignore[arg-type]
                                      for p in parsed):
                    problems.add(rwhere, f"{inner} is not inside network {wire.id!r} CIDRs")
            # An IPv6 range in cidr (views written before ipv6_cidrs existed) is the first IPv6 range.
            subnets.append(Subnet(id=subnet.id, cidr=next((str(r) for _, r in ranges if r.version == 4), ""),
                                  availability_zone=subnet.availability_zone,
                                  ipv6_cidrs=tuple(str(r) for _, r in ranges if r.version == 6)))
        networks.append(Network(id=wire.id, cidrs=tuple(str(n) for n in parsed), subnets=tuple(subnets)))
    return tuple(networks), Cidrs(table)


# -- instances --------------------------------------------------------------------------------------

def _positional_builder(model: type[msgspec.Struct], wire: type[msgspec.Struct], computed: tuple[str, ...],
                        shared: frozenset[str] = frozenset()) -> Callable[..., Any]:
    """``build(wire_value, *computed)`` -> ``model(...)`` with positional arguments in the model's field order.

    A Struct matches keyword arguments one by one, five times slower than positional ones at
    a million values per build; positions written by hand shift silently when a field is
    added.  The call is therefore generated from ``model.__struct_fields__``: a field named in
    ``computed`` is a parameter (the check made it), any other is read from the wire value
    of the same name (interned when in ``shared``, the model's default when null).  A model
    field the wire type lacks fails here, at import.
    """
    fields = model.__struct_fields__
    defaults = dict(zip(fields[len(fields) - len(model.__struct_defaults__):], model.__struct_defaults__))
    namespace: dict[str, Any] = {"_model": model, "_intern": intern}
    arguments = []
    for name in fields:
        if name in computed:
            arguments.append(name)
            continue
        if name not in wire.__struct_fields__:
            raise TypeError(f"{model.__name__}.{name} is not in the schema ({wire.__name__}): add it there")
        value = f"w.{name}"
        if name in shared:
            value = f"({value} and _intern({value}))"
        default = defaults.get(name)
        if default is not None:
            namespace[f"_default_{name}"] = default
            value = f"(_default_{name} if w.{name} is None else {value})"
        arguments.append(value)
    missing = set(computed) - set(fields)
    if missing:
        raise TypeError(f"{model.__name__} has no field {sorted(missing)}")
    source = f"def build(w, {', '.join(computed)}):\n    return _model({', '.join(arguments)})\n"
    exec(source, namespace)  # noqa: S102 - generated from the model's own field names
    return namespace["build"]


_build_instance = _positional_builder(
    Instance, WireInstance, ("interfaces", "public_keys", "iam", "tags", "block_devices", "metadata_options"),
    # Fields most instances share a handful of values of: one string object per value.
    shared=frozenset({"account_id", "image_id", "kernel_id", "ramdisk_id", "instance_type", "architecture",
                      "launch_time", "availability_zone"}))
_build_interface = _positional_builder(
    Interface, WireInterface,
    ("mac", "device_index", "network", "subnet", "private_ips", "public_ip", "ipv6s", "security_groups"),
    shared=frozenset({"owner_id"}))


def instance_from_wire(wire: WireInstance, cidrs: Cidrs, problems: Problems, where: str = "$") -> Instance | None:
    """The :class:`Instance` for a typed element, or None with its problems in ``problems``."""
    before = len(problems.items)
    raws = wire.interfaces
    if len(raws) == 1:
        checked: tuple[Interface | None, ...] | list[Interface | None] = (
            _interface_from_wire(raws[0], 0, cidrs, problems, where),)
    else:
        checked = [_interface_from_wire(raw, index, cidrs, problems, where) for index, raw in enumerate(raws)]
    iam: IamProfile | None = None
    if wire.iam is not None:
        role = _BY_ROLE.get(wire.iam.role)
        if role is None or role[0] != wire.iam:
            given = wire.iam
            role = (given, IamProfile(intern(given.instance_profile_arn), given.instance_profile_id, intern(given.role)))
            _share_as(_BY_ROLE, given.role, role)
        iam = role[1]
    wire_options = wire.metadata_options
    if wire_options is None:
        options = DEFAULT_METADATA_OPTIONS
    else:
        known_options = _OPTIONS.get(wire_options)
        if known_options is None:
            d = DEFAULT_METADATA_OPTIONS
            known_options = MetadataOptions(
                wire_options.http_tokens or d.http_tokens, wire_options.hop_limit or d.hop_limit,
                d.tags if wire_options.tags is None else wire_options.tags, wire_options.endpoint or d.endpoint)
            _share_as(_OPTIONS, wire_options, known_options)
        options = known_options
    keys = wire.public_keys or ()
    if keys:
        # Key pairs are shared by every instance launched with them.
        known_keys = _BY_KEY_NAME.get(keys[0].name)
        if known_keys is not None and known_keys == keys:
            keys = known_keys
        else:
            _share_as(_BY_KEY_NAME, keys[0].name, keys)
    if len(problems.items) != before:
        return None
    # An interface that could not be built added a problem: past the check above, none is None.
    interfaces = cast("tuple[Interface, ...] | list[Interface]", checked)
    if len(interfaces) > 1:
        ordered = sorted(interfaces, key=lambda i: i.device_index)
        for first, second in zip(ordered, ordered[1:]):
            if first.device_index == second.device_index:
                problems.add(f"{where}.interfaces", f"two interfaces with device_index {first.device_index}")
                return None
        interfaces = tuple(ordered)
    tags, devices = wire.tags, wire.block_devices
    # msgspec already shares the text of short keys (tag keys, device names).
    return _build_instance(
        wire, interfaces, keys, iam, tuple(tags.items()) if tags else (),
        _shared_pairs(tuple(devices.items())) if devices else (), options)


def _interface_from_wire(raw: WireInterface, index: int, cidrs: Cidrs, problems: Problems,
                         where: str) -> Interface | None:
    before = len(problems.items)
    network = raw.network
    network = DEFAULT_NETWORK if network is None else intern(network)
    allowed: tuple[str, ...] | None | Literal[False] = cidrs.prefixes.get(network, False)
    if allowed is False:
        problems.add(f"{where}.interfaces[{index}].network", f"unknown network {network!r} (not in $.networks)")
    addresses = raw.private_ips
    if allowed is not False:
        for position, address in enumerate(addresses):
            if ":" in address:
                canonical_address = canonical_ipv6(address)
                if canonical_address is None:
                    problems.add(f"{where}.interfaces[{index}].private_ips[{position}]",
                                 f"not a valid IP address: {address!r}")
                    continue
                if canonical_address != address:
                    addresses = tuple(canonical_ip(a) or a for a in addresses)
                address = canonical_address
                inside = cidrs.contains(network, address)
            elif allowed is None:
                inside = cidrs.contains(network, address)
            else:
                inside = address.startswith(allowed)
            if not inside:
                problems.add(f"{where}.interfaces[{index}].private_ips",
                             f"{address} is outside network {network!r} CIDRs")
    public_ip = raw.public_ip
    if public_ip is not None and ":" in public_ip:
        public_ip = canonical_ipv6(public_ip)
        if public_ip is None:
            problems.add(f"{where}.interfaces[{index}].public_ip", f"not a valid IP address: {raw.public_ip!r}")
    # A None among them (not an address) adds a problem, and then no interface is built.
    ipv6s: tuple[str | None, ...] = raw.ipv6s or ()
    if ipv6s:
        canonical = tuple(canonical_ipv6(a) for a in ipv6s)
        if canonical != ipv6s:
            for position, text in enumerate(canonical):
                if text is None:
                    problems.add(f"{where}.interfaces[{index}].ipv6s[{position}]",
                                 f"not a valid IPv6 address: {ipv6s[position]!r}")
            ipv6s = canonical
    groups: tuple[SecurityGroup, ...] = ()
    if raw.security_groups:
        wire_groups = raw.security_groups
        known = _GROUPS.get(wire_groups)
        if known is None:
            known = tuple(SecurityGroup(g.id, g.id if g.name is None else g.name) for g in wire_groups)
            _share_as(_GROUPS, wire_groups, known)
        groups = known
    if len(problems.items) != before:
        return None
    subnet = raw.subnet
    device_index = raw.device_index
    return _build_interface(raw, raw.mac.lower(), DEFAULT_DEVICE_INDEX if device_index is None else device_index,
                            network,
                            None if subnet is None else intern(subnet), addresses, public_ip, ipv6s, groups)


_BY_ROLE: dict[str, tuple[WireIamProfile, IamProfile]] = {}
_BY_KEY_NAME: dict[str, tuple[PublicKey, ...]] = {}
"""Looked up by a short name, then compared: cheaper than hashing long texts (ARNs, keys)."""
_OPTIONS: dict[WireMetadataOptions, MetadataOptions] = {}
_GROUPS: dict[tuple[WireSecurityGroup, ...], tuple[SecurityGroup, ...]] = {}
_PAIRS: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
_SHARED_LIMIT = 65536
"""Most distinct values kept per table: beyond that, values are simply not shared."""


def _share_as(table: dict[Any, Any], key: Any, value: Any) -> None:
    if len(table) < _SHARED_LIMIT:
        table[key] = value


def _shared_pairs(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """One tuple per distinct mapping (block device mappings repeat across instances of an image)."""
    shared = _PAIRS.get(pairs)
    if shared is None:
        _share_as(_PAIRS, pairs, pairs)
        return pairs
    return shared


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``edge-view/1``, generated from the types above."""
    generated = msgspec.json.schema(WireDocument)
    definitions = {name.removeprefix("Wire"): _renamed(body) for name, body in generated["$defs"].items()}
    for name, body in definitions.items():
        body["title"] = name
        _model_defaults(body, _MODELS.get(name))
    document = definitions.pop("Document")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:edge:schema:edge-view-1",
        **document,
        "title": "edge-view/1",
        "$comment": ("Generated from edge/view/wire.py (`edge view schema`). Rules no JSON Schema can state are "
                     "listed in docs/view-format.md: addresses inside their network's CIDRs, CIDRs without "
                     "host bits, DNS record values by type, and uniqueness (instance ids, addresses, MACs, "
                     "network, subnet and device indexes)."),
        "$defs": definitions,
    }


_MODELS: dict[str, type[msgspec.Struct]] = {
    "Cloud": Cloud, "Subnet": Subnet, "Network": Network, "MetadataOptions": MetadataOptions,
    "Interface": Interface, "Instance": Instance,
}
"""Schema definitions whose absent members take the defaults of a model type."""


def _model_defaults(body: dict[str, Any], model: type[msgspec.Struct] | None) -> None:
    """State each optional member's real default: the wire types default to null, the model holds the value."""
    defaults: dict[str, Any] = {}
    if model is not None:
        fields = model.__struct_fields__
        defaults = dict(zip(fields[len(fields) - len(model.__struct_defaults__):], model.__struct_defaults__))
        if model is Interface:
            defaults.update(device_index=DEFAULT_DEVICE_INDEX, network=DEFAULT_NETWORK)
    for name, schema in body.get("properties", {}).items():
        if "default" not in schema:
            continue
        default = defaults.get(name)
        if isinstance(default, (str, int, bool)):
            schema["default"] = default
        elif default == ():
            kinds = [branch.get("type") for branch in schema.get("anyOf", ())]
            schema["default"] = {} if "object" in kinds else []  # tags and block devices are pairs in the model
        else:
            del schema["default"]  # none, or one that depends on other members (see the description)


def _renamed(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: (item.replace("#/$defs/Wire", "#/$defs/") if key == "$ref" else _renamed(item))
                for key, item in value.items()}
    if isinstance(value, list):
        return [_renamed(item) for item in value]
    return value


def schema_text() -> str:
    """:func:`json_schema` as the files ``edge/view/schema.json`` and ``docs/edge-view-1.schema.json`` hold it."""
    import json

    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    # Regenerate the shipped schema after changing a type above:
    #   python -m edge.view.wire > edge/view/schema.json && cp edge/view/schema.json docs/edge-view-1.schema.json
    print(schema_text(), end="")
