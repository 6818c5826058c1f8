"""One element of a view's ``instances`` decoded by type, straight from its JSON bytes.

The shapes below mirror ``view-format.md``: ``msgspec`` checks every JSON type
while it decodes, in C, so :func:`instance_from_wire` is left with only the
checks JSON types cannot express (addresses, MACs, CIDR membership, base64).
At 100k instances this takes about 0.9 s where ``json`` plus the
dictionary-walking validator took 2.7 s.

Like :func:`edge.view.parse._fast_instance`, this is a fast path that gives up
at the first doubt: :data:`INSTANCE_DECODER` raises on any type mismatch, and
:func:`instance_from_wire` returns None on anything else unusual.  The caller
then decodes the element as plain JSON and hands it to the explaining parser,
which remains the reference for what is accepted.  The narrow types here
(canonical IPv4 text only, lower-case MACs, no ``null`` where the parser reads
null as missing) only decide which elements take the fast path; the rest are
accepted or refused exactly as before, just more slowly.
"""

from __future__ import annotations

import socket
from sys import intern
from typing import Annotated, Any

import msgspec

from edge.view.model import (
    DEFAULT_METADATA_OPTIONS,
    DEFAULT_NETWORK,
    IamProfile,
    Instance,
    Interface,
    MetadataOptions,
    PublicKey,
    SecurityGroup,
)
from edge.view.parse import _CidrTable, _ipv6, _shared_pairs


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPv4Text = Annotated[str, msgspec.Meta(pattern=rf"^{_OCTET}(?:\.{_OCTET}){{3}}\Z")]
"""A canonical dotted quad: exactly what the parser's ``inet_pton`` round trip accepts."""
MacText = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}\Z")]
"""Lower case only: anything else is normalised by the explaining parser."""


class _Wire(msgspec.Struct, gc=False):
    pass


class WireInterface(_Wire):
    id: str
    mac: MacText
    private_ips: Annotated[tuple[IPv4Text, ...], msgspec.Meta(min_length=1)]
    device_index: int = 0
    network: str = DEFAULT_NETWORK
    subnet: str | None = None
    public_ip: IPv4Text | None = None
    ipv6s: tuple[str, ...] = ()
    security_groups: tuple[SecurityGroup, ...] = ()
    """A group without a name (which defaults to its id) takes the explaining parser."""
    owner_id: str | None = None
    metadata_sources: tuple[IPv4Text, ...] = ()


class WireInstance(_Wire):
    id: Annotated[str, msgspec.Meta(min_length=1)]
    interfaces: Annotated[tuple[WireInterface, ...], msgspec.Meta(min_length=1)]
    reservation_id: str | None = None
    account_id: str | None = None
    image_id: str | None = None
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    instance_type: str | None = None
    architecture: str | None = None
    launch_index: int = 0
    launch_time: str | None = None
    availability_zone: str | None = None
    public_keys: tuple[PublicKey, ...] = ()
    user_data: bytes | None = None
    """msgspec decodes base64 itself, accepting a subset of what ``b64decode(validate=True)`` does."""
    iam: IamProfile | None = None
    tags: dict[str, str] = {}
    block_devices: dict[str, str] = {}
    metadata_options: MetadataOptions = DEFAULT_METADATA_OPTIONS
    product_codes: tuple[str, ...] = ()


INSTANCE_DECODER = msgspec.json.Decoder(WireInstance)
"""Raises ``msgspec.DecodeError`` (``ValidationError`` for a type mismatch)."""

PrefixTable = dict[str, "tuple[str, ...] | None"]
"""Network id -> the text prefixes its IPv4 addresses must start with (None: compare as integers)."""


def prefix_table(cidr_table: _CidrTable) -> PrefixTable:
    """Octet-aligned IPv4 CIDRs as text prefixes, so membership is one ``str.startswith``."""
    table: PrefixTable = {DEFAULT_NETWORK: ("",)}
    for network, cidrs in cidr_table.items():
        if not cidrs:
            table[network] = ("",)
            continue
        prefixes: list[str] | None = []
        for net, mask, version in cidrs:
            if version != 4:
                continue
            length = bin(mask).count("1")
            if length % 8 or length == 32:
                prefixes = None
                break
            octets = socket.inet_ntop(socket.AF_INET, net.to_bytes(4, "big")).split(".")[:length // 8]
            prefixes.append("".join(o + "." for o in octets))
        table[network] = None if prefixes is None else tuple(prefixes)
    return table


def instance_from_wire(wire: WireInstance, cidr_table: _CidrTable, prefixes: PrefixTable) -> Instance | None:
    """The :class:`Instance` for a typed element, or None when the explaining parser must decide."""
    if len(wire.interfaces) == 1:
        interface = _interface_from_wire(wire.interfaces[0], cidr_table, prefixes)
        if interface is None:
            return None
        interfaces: tuple[Interface, ...] = (interface,)
    else:
        found = [_interface_from_wire(raw, cidr_table, prefixes) for raw in wire.interfaces]
        if None in found:
            return None
        found.sort(key=lambda i: i.device_index)  # type: ignore[union-attr]
        if len({i.device_index for i in found}) != len(found):  # type: ignore[union-attr]
            return None
        interfaces = tuple(found)  # type: ignore[arg-type]
    shared = _SHARED_VALUES.get
    iam = wire.iam
    if iam is not None:
        known = _BY_ROLE.get(iam.role)
        if known is not None and known == iam:
            iam = known
        elif not iam.role or "/" in iam.role:
            return None
        else:
            _share_as(_BY_ROLE, iam.role, iam)
    options = wire.metadata_options
    if options is not DEFAULT_METADATA_OPTIONS:
        options = shared(options) or _share(options, (
            options.http_tokens in ("optional", "required") and 1 <= options.hop_limit <= 64
            and options.endpoint in ("enabled", "disabled")))
        if options is None:
            return None
    keys = wire.public_keys
    if keys:
        # Key pairs are shared by every instance launched with them.
        known = _BY_KEY_NAME.get(keys[0].name)
        if known is not None and known == keys:
            keys = known
        else:
            _share_as(_BY_KEY_NAME, keys[0].name, keys)
    tags = wire.tags
    devices = wire.block_devices
    # Fields most instances share a handful of values of: one string object per value.
    account, image, kernel, ramdisk, kind, architecture, zone = (
        wire.account_id, wire.image_id, wire.kernel_id, wire.ramdisk_id, wire.instance_type, wire.architecture,
        wire.availability_zone)
    # Positional: a Struct matches keyword arguments one by one, five times slower here.
    return Instance(
        wire.id, interfaces, wire.reservation_id,
        account and intern(account), image and intern(image), kernel and intern(kernel),
        ramdisk and intern(ramdisk), kind and intern(kind), architecture and intern(architecture),
        wire.launch_index, wire.launch_time, zone and intern(zone),
        keys, wire.user_data, iam,
        # msgspec already shares the text of short keys (tag keys, device names).
        tuple(tags.items()) if tags else (),
        _shared_pairs(tuple(devices.items())) if devices else (),
        options, wire.product_codes,
    )


_SHARED_VALUES: dict[Any, Any] = {}
_BY_ROLE: dict[str, IamProfile] = {}
_BY_KEY_NAME: dict[str, tuple[PublicKey, ...]] = {}
"""Looked up by a short name, then compared: cheaper than hashing long texts (ARNs, keys)."""
_SHARED_LIMIT = 65536


def _share_as(table: dict[str, Any], key: str, value: Any) -> None:
    if len(table) < _SHARED_LIMIT:
        table[key] = value


def _share(value: Any, valid: bool) -> Any:
    """Keep one object per distinct valid value (key lists, IAM profiles, options, security groups)."""
    if not valid:
        return None
    if len(_SHARED_VALUES) < _SHARED_LIMIT:
        _SHARED_VALUES[value] = value
    return value


def _interface_from_wire(raw: WireInterface, cidr_table: _CidrTable, prefixes: PrefixTable) -> Interface | None:
    network = raw.network
    allowed = prefixes.get(network, False)
    if allowed is False:
        return None  # an unknown network
    if allowed is None:
        if not _in_networks(raw.private_ips, cidr_table[network]):
            return None
    else:
        for address in raw.private_ips:
            if not address.startswith(allowed):
                return None
    ipv6s = raw.ipv6s
    if ipv6s and any(_ipv6(a) != a for a in ipv6s):
        return None
    groups = raw.security_groups
    if groups:
        groups = _SHARED_VALUES.get(groups) or _share(groups, True)
    subnet, owner_id = raw.subnet, raw.owner_id
    return Interface(
        raw.id, raw.mac, raw.device_index, intern(network), None if subnet is None else intern(subnet),
        raw.private_ips, raw.public_ip, ipv6s, groups, None if owner_id is None else intern(owner_id),
        raw.metadata_sources,
    )


def _in_networks(addresses: tuple[str, ...], cidrs: list[tuple[int, int, int]]) -> bool:
    for address in addresses:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        if not any(version == 4 and value & mask == net for net, mask, version in cidrs):
            return False
    return True
