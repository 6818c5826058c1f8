"""The metadata tree of one instance, built from the snapshot (pure).

A :class:`Directory` holds its children and its listing bytes; a leaf is the
bytes served.  Items that do not apply to an instance are absent, so they
answer 404 like on EC2.  IAM role credentials are not in the view; their leaf
is a :class:`CredentialsLeaf` that the handler resolves through the credential
cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from edge.metadata.identity import identity_document
from edge.view.model import Instance, Interface
from edge.view.snapshot import Snapshot

VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15", "2008-02-01", "2008-09-01",
    "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12", "2014-02-25", "2014-11-05", "2015-10-20",
    "2016-04-19", "2016-06-30", "2016-09-02", "2018-03-28", "2018-08-17", "2018-09-24", "2019-10-01",
    "2020-10-27", "2021-01-03", "2021-03-23", "2021-07-15", "2022-09-24", "2024-04-11", "latest",
)
VERSION_SET = frozenset(VERSIONS)
VERSION_LISTING = "\n".join(VERSIONS).encode()


@dataclass(frozen=True, slots=True)
class Leaf:
    body: bytes
    binary: bool = False


@dataclass(frozen=True, slots=True)
class CredentialsLeaf:
    role: str


@dataclass(frozen=True, slots=True)
class SignedLeaf:
    """A signature of ``document`` (``signature``, ``pkcs7`` or ``rsa2048``), computed when first asked for."""

    kind: str
    document: bytes


@dataclass(frozen=True, slots=True)
class Directory:
    children: dict[str, Node]
    listing: bytes


Node = Leaf | CredentialsLeaf | SignedLeaf | Directory


def directory(entries: dict[str, Node | str | bytes | None], listed: dict[str, str] | None = None,
              sort: bool = True) -> Directory:
    """A directory of ``entries`` (None entries are absent); ``listed`` renames entries in the listing."""
    children: dict[str, Node] = {}
    for name, value in entries.items():
        if value is None:
            continue
        if isinstance(value, str):
            value = Leaf(value.encode())
        elif isinstance(value, bytes):
            value = Leaf(value)
        children[name] = value
    names = sorted(children) if sort else list(children)
    lines = []
    for name in names:
        shown = (listed or {}).get(name, name)
        lines.append(shown + "/" if isinstance(children[name], Directory) and shown == name else shown)
    return Directory(children, "\n".join(lines).encode())


def _lines(values: list[str] | tuple[str, ...]) -> str | None:
    return "\n".join(values) if values else None


def _json(value: object) -> str:
    return json.dumps(value, indent=2, separators=(",", " : "))


def version_root(instance: Instance, snapshot: Snapshot) -> Directory:
    """``/<version>/``: ``dynamic``, ``meta-data`` and ``user-data`` when the instance has some."""
    user_data = Leaf(instance.user_data, binary=True) if instance.user_data is not None else None
    root = directory({
        "dynamic": _dynamic(instance, snapshot),
        "meta-data": meta_data(instance, snapshot),
        "user-data": user_data,
    })
    # The version listing names its entries without a trailing slash, as EC2 does.
    return Directory(root.children, "\n".join(sorted(root.children)).encode())


def _dynamic(instance: Instance, snapshot: Snapshot) -> Directory:
    document = identity_document(instance, snapshot.view.cloud)
    identity = directory({
        "document": document, "pkcs7": SignedLeaf("pkcs7", document),
        "signature": SignedLeaf("signature", document), "rsa2048": SignedLeaf("rsa2048", document),
    }, sort=False)
    return directory({"instance-identity": identity})


def meta_data(instance: Instance, snapshot: Snapshot) -> Directory:
    cloud = snapshot.view.cloud
    primary = instance.primary_interface
    address = primary.primary_ip
    public = primary.public_ip
    entries: dict[str, Node | str | bytes | None] = {
        "ami-id": instance.image_id,
        "ami-launch-index": str(instance.launch_index),
        "ami-manifest-path": "(unknown)",
        "block-device-mapping": directory(dict(instance.block_devices)) if instance.block_devices else None,
        "events": directory({"maintenance": directory({"history": "[]", "scheduled": "[]"})}),
        "hostname": cloud.private_name(address),
        "iam": _iam(instance),
        "instance-action": "none",
        "instance-id": instance.id,
        "instance-life-cycle": "on-demand",
        "instance-type": instance.instance_type,
        "ipv6": primary.ipv6s[0] if primary.ipv6s else None,
        "kernel-id": instance.kernel_id,
        "local-hostname": cloud.private_name(address),
        "local-ipv4": address if ":" not in address else None,
        "mac": primary.mac or None,
        "network": directory({"interfaces": directory({"macs": directory({
            interface.mac: _interface(instance, interface, snapshot) for interface in instance.interfaces
            if interface.mac})})}),
        "placement": _placement(instance, snapshot),
        "product-codes": _lines(instance.product_codes),
        "public-hostname": cloud.public_name(public) if public else None,
        "public-ipv4": public,
        "public-keys": _public_keys(instance),
        "ramdisk-id": instance.ramdisk_id,
        "reservation-id": instance.reservation_id,
        "security-groups": _lines([g.name for g in primary.security_groups]),
        "services": directory({"domain": cloud.services_domain, "partition": cloud.partition}),
        "tags": _tags(instance),
    }
    return directory(entries)


def _iam(instance: Instance) -> Directory | None:
    profile = instance.iam
    if profile is None:
        return None
    info = _json({
        "Code": "Success",
        "LastUpdated": instance.launch_time or "1970-01-01T00:00:00Z",
        "InstanceProfileArn": profile.instance_profile_arn,
        "InstanceProfileId": profile.instance_profile_id,
    })
    return directory({
        "info": info,
        "security-credentials": directory({profile.role: CredentialsLeaf(profile.role)}),
    })


def _placement(instance: Instance, snapshot: Snapshot) -> Directory:
    zone = instance.availability_zone or _subnet_zone(instance.primary_interface, snapshot)
    return directory({"availability-zone": zone, "region": snapshot.view.cloud.region})


def _subnet_zone(interface: Interface, snapshot: Snapshot) -> str | None:
    for network in snapshot.view.networks:
        if network.id == interface.network:
            for subnet in network.subnets:
                if subnet.id == interface.subnet:
                    return subnet.availability_zone
    return None


def _public_keys(instance: Instance) -> Directory | None:
    if not instance.public_keys:
        return None
    entries: dict[str, Node | str | bytes | None] = {}
    listed = {}
    for index, key in enumerate(instance.public_keys):
        entries[str(index)] = directory({"openssh-key": key.openssh})
        listed[str(index)] = f"{index}={key.name}"
    return directory(entries, listed, sort=False)


def _tags(instance: Instance) -> Directory | None:
    if not instance.metadata_options.tags or not instance.tags:
        return None
    return directory({"instance": directory(dict(instance.tags))})


def _interface(instance: Instance, interface: Interface, snapshot: Snapshot) -> Directory:
    cloud = snapshot.view.cloud
    network = next((n for n in snapshot.view.networks if n.id == interface.network), None)
    subnet = next((s for s in network.subnets if s.id == interface.subnet), None) if network else None
    ipv4s = [a for a in interface.private_ips if ":" not in a]
    public = interface.public_ip
    vpc_id = interface.network or None
    # A network's cidrs may hold both families; each leaf names the one it serves.
    vpc_ipv4 = [c for c in network.cidrs if ":" not in c] if vpc_id and network else []
    vpc_ipv6 = [c for c in network.cidrs if ":" in c] if vpc_id and network else []
    return directory({
        "device-number": str(interface.device_index),
        "interface-id": interface.id,
        "ipv4-associations": directory({public: interface.primary_ip}) if public else None,
        "ipv6s": _lines(list(interface.ipv6s)),
        "local-hostname": cloud.private_name(interface.primary_ip),
        "local-ipv4s": _lines(ipv4s),
        "mac": interface.mac,
        "owner-id": interface.owner_id or instance.account_id,
        "public-hostname": cloud.public_name(public) if public else None,
        "public-ipv4s": public,
        "security-group-ids": _lines([g.id for g in interface.security_groups]),
        "security-groups": _lines([g.name for g in interface.security_groups]),
        "subnet-id": interface.subnet,
        "subnet-ipv4-cidr-block": subnet.cidr if subnet and subnet.cidr else None,
        "subnet-ipv6-cidr-blocks": _lines(subnet.ipv6_cidrs) if subnet else None,
        "vpc-id": vpc_id,
        "vpc-ipv4-cidr-block": vpc_ipv4[0] if vpc_ipv4 else None,
        "vpc-ipv4-cidr-blocks": _lines(vpc_ipv4),
        "vpc-ipv6-cidr-blocks": _lines(vpc_ipv6),
    })


def split_path(path: bytes) -> list[str] | None:
    """``/latest//meta-data/x/?q`` -> ``["latest", "meta-data", "x"]``; None for targets that are not paths."""
    path = path.split(b"?", 1)[0].split(b"#", 1)[0]
    if path[:7].lower() == b"http://":
        # Absolute form (a client that treats edge as its proxy): the path after the authority.
        path = b"/" + path[7:].partition(b"/")[2]
    if not path.startswith(b"/"):
        return None
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "%" in text:
        from urllib.parse import unquote
        text = unquote(text)
    parts = [part for part in text.split("/") if part]
    if any(part in (".", "..") for part in parts):
        return None
    return parts


def resolve(root: Directory, parts: list[str]) -> Node | None:
    node: Node = root
    for part in parts:
        if not isinstance(node, Directory):
            return None
        child = node.children.get(part)
        if child is None:
            return None
        node = child
    return node
