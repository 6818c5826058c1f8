"""Eucalyptus' global network information document (GNI) as an edge view.

The cloud controller writes ``global_network_info.xml`` (atomic rename) and
broadcasts it to the nodes.  It carries identity and network facts only:
instances with their addresses, MACs, owners, security groups and network
interfaces; VPCs and subnets; clusters (used as availability zones) and the
instance DNS domain.  Everything else (image, type, keys, user-data, IAM, the
identity document) is fetched from the controller's metadata service by the
metadata server's controller fallback.

The document is converted to an ``edge-view/1`` document and validated by the
same rules as any view.  It has no serial: its ``version`` attribute is a
content hash, so a different version is a new view (the view is *unordered*).

In VPC mode, eucanetd's ``eucanetd_intip_eni_map`` tells which internal
``255.x.y.z`` address carries each interface's metadata traffic.  A source
that follows both files prepends the map to the XML as a comment
(:data:`MAP_COMMENT`), so one document (and one last-good file) holds both.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from dataclasses import dataclass, replace
from typing import Any
from xml.etree.ElementTree import Element

from edge.errors import ViewInvalid
from edge.logs import event
from edge.view.model import DEFAULT_NETWORK, View
from edge.view.parse import canonical_ipv4, parse_view

log = logging.getLogger("edge.eucalyptus")

MAP_COMMENT = "edge-eucalyptus-intip-map"
INSTANCE_DATA_ADDRESS = "169.254.169.254"
_UNASSIGNED = {"", "0.0.0.0"}
_MAP_BLOCK = re.compile(rb"<!--\s*" + MAP_COMMENT.encode() + rb"\n(.*?)-->", re.S)


@dataclass(frozen=True, slots=True)
class NameStyle:
    """How a Eucalyptus generation names instances."""

    private_template: str
    public_template: str
    private_domain: str | None
    """None: the document's ``instanceDNSDomain``."""
    public_domain_prefix: str


NAME_STYLES = {
    # Eucalyptus 5.0: euca-A-B-C-D.eucalyptus.internal / euca-A-B-C-D.eucalyptus.<dns domain>
    "euca": NameStyle("euca-{ip}", "euca-{ip}", None, "eucalyptus."),
    # Later generations: ip-A-B-C-D.compute.internal / ec2-A-B-C-D.<dns domain>
    "ec2": NameStyle("ip-{ip}", "ec2-{ip}", "compute.internal", ""),
}


@dataclass(frozen=True, slots=True)
class GniOptions:
    name_style: str = "euca"
    dns_domain: str = "localhost"
    """The cloud's ``system.dns.dnsdomain`` (public names live under it)."""
    region: str = "eucalyptus"


@dataclass(frozen=True, slots=True)
class MapEntry:
    address: str
    owner: str
    """An instance id or an ENI id."""
    vpc: str
    subnet: str


def is_gni(data: bytes) -> bool:
    head = data[:4096]
    return b"<network-data" in head or (head.lstrip().startswith(b"<") and MAP_COMMENT.encode() in head)


def parse_intip_map(text: str) -> tuple[list[MapEntry], list[str]]:
    """Entries of eucanetd's intip map, and a problem line for each line that is not one."""
    entries: list[MapEntry] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (4, 5) or canonical_ipv4(fields[0]) is None or not fields[0].startswith("255."):
            problems.append(f"intip map line {number}: not '<255.x.y.z> <instance or eni id> <vpc> <subnet> [new]': "
                            f"{line.strip()[:80]!r}")
            continue
        entries.append(MapEntry(fields[0], fields[1], fields[2], fields[3]))
    return entries, problems


def bundle(gni: bytes, intip_map: bytes | None) -> bytes:
    """One document holding the GNI and the intip map (the map as a leading XML comment)."""
    if intip_map is None:
        return gni
    safe = intip_map.replace(b"--", b"- -")
    body = gni
    if body.lstrip().startswith(b"<?xml"):
        declaration_end = body.index(b"?>") + 2
        return body[:declaration_end] + b"\n<!-- " + MAP_COMMENT.encode() + b"\n" + safe + b"-->\n" + body[declaration_end:]
    return b"<!-- " + MAP_COMMENT.encode() + b"\n" + safe + b"-->\n" + body


def decode_gni(data: bytes, options: GniOptions) -> View:
    """Validate a GNI (optionally bundled with an intip map) into an unordered view."""
    import defusedxml.ElementTree as SafeTree
    from defusedxml import DefusedXmlException

    try:
        root = SafeTree.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise ViewInvalid([f"GNI refused by the hardened XML parser: {exc}"]) from None
    except SafeTree.ParseError as exc:
        raise ViewInvalid([f"GNI is not well-formed XML: {exc}"]) from None
    if root.tag != "network-data":
        raise ViewInvalid([f"GNI root element must be <network-data>, got <{root.tag}>"])
    map_entries: list[MapEntry] = []
    match = _MAP_BLOCK.search(data)
    if match:
        map_entries, map_problems = parse_intip_map(match.group(1).decode("utf-8", "replace"))
        # eucanetd rewrites the map in place: a torn line costs that line, not the view.
        for problem in map_problems[:20]:
            event(log, logging.WARNING, "intip map line ignored", problem=problem)
    document, problems = gni_document(root, options, map_entries)
    if problems:
        raise ViewInvalid(problems)
    view = parse_view(document)
    version = root.get("version") or hashlib.sha256(data).hexdigest()[:16]
    if match:
        # The map changes without the GNI changing: both make the version.
        version += "+" + hashlib.sha256(match.group(1)).hexdigest()[:8]
    return replace(view, version=version, ordered=False,
                   extensions={"eucalyptus": {"mode": _properties(root).get("mode", ["EDGE"])[0],
                                              "version": root.get("version"),
                                              "applied_version": root.get("applied-version"),
                                              "clc": (_properties(root).get("enabledCLCIp") or [None])[0],
                                              "intip_entries": len(map_entries)}})


def _text(element: Element | None, tag: str) -> str:
    if element is None:
        return ""
    child = element.find(tag)
    return (child.text or "").strip() if child is not None else ""


def _values(element: Element | None, tag: str) -> list[str]:
    if element is None:
        return []
    child = element.find(tag)
    if child is None:
        return []
    return [(v.text or "").strip() for v in child.findall("value")]


def _properties(element: Element) -> dict[str, list[str]]:
    configuration = element.find("configuration") if element.tag == "network-data" else element
    out: dict[str, list[str]] = {}
    if configuration is None:
        return out
    for prop in configuration.findall("property"):
        out[prop.get("name", "")] = [(v.text or "").strip() for v in prop.findall("value")]
    return out


def _configuration_property(root: Element, name: str) -> Element | None:
    configuration = root.find("configuration")
    if configuration is None:
        return None
    for prop in configuration.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def _edge_subnet_cidrs(root: Element) -> list[str]:
    cidrs = []
    holders = [_configuration_property(root, "subnets")]
    clusters = _configuration_property(root, "clusters")
    if clusters is not None:
        holders.extend(clusters.findall("cluster"))
    for holder in holders:
        if holder is None:
            continue
        for subnet in holder.findall("subnet"):
            props = _properties(subnet)
            try:
                network = ipaddress.ip_network(f"{props['subnet'][0]}/{props['netmask'][0]}", strict=False)
            except (KeyError, IndexError, ValueError):
                continue
            if str(network) not in cidrs:
                cidrs.append(str(network))
    return cidrs


def _cluster_of_instances(root: Element) -> tuple[dict[str, str], list[str]]:
    zones: dict[str, str] = {}
    names: list[str] = []
    clusters = _configuration_property(root, "clusters")
    for cluster in clusters.findall("cluster") if clusters is not None else ():
        name = cluster.get("name", "")
        names.append(name)
        for prop in cluster.findall("property"):
            if prop.get("name") != "nodes":
                continue
            for node in prop.findall("node"):
                for instance_id in _values(node, "instanceIds"):
                    zones[instance_id] = name
    return zones, names


def gni_document(root: Element, options: GniOptions, map_entries: list[MapEntry]) -> tuple[dict[str, Any], list[str]]:
    """The edge-view/1 document equivalent to a parsed GNI (not yet validated)."""
    problems: list[str] = []
    props = _properties(root)
    style = NAME_STYLES.get(options.name_style)
    if style is None:
        raise ViewInvalid([f"unknown Eucalyptus name style {options.name_style!r} (use euca or ec2)"])
    dns_domain = (props.get("instanceDNSDomain") or ["eucalyptus.internal"])[0] or "eucalyptus.internal"
    internal_domain = style.private_domain or dns_domain
    public_domain = style.public_domain_prefix + options.dns_domain
    zones, cluster_names = _cluster_of_instances(root)

    networks: list[dict[str, Any]] = []
    subnet_zone: dict[str, str] = {}
    vpcs = root.find("vpcs")
    for vpc in vpcs.findall("vpc") if vpcs is not None else ():
        subnets = []
        holder = vpc.find("subnets")
        for subnet in holder.findall("subnet") if holder is not None else ():
            cluster = _text(subnet, "cluster")
            subnet_zone[subnet.get("name", "")] = cluster
            subnets.append({"id": subnet.get("name", ""), "cidr": _text(subnet, "cidr"),
                            "availability_zone": cluster or None})
        cidr = _text(vpc, "cidr")
        networks.append({"id": vpc.get("name", ""), "cidrs": [cidr] if cidr else [], "subnets": subnets})
    flat_cidrs = _edge_subnet_cidrs(root)
    if flat_cidrs:
        networks.append({"id": DEFAULT_NETWORK, "cidrs": flat_cidrs, "subnets": []})

    group_owner: dict[str, str] = {}
    groups = root.find("securityGroups")
    for group in groups.findall("securityGroup") if groups is not None else ():
        group_owner[group.get("name", "")] = _text(group, "ownerId")

    instances: list[dict[str, Any]] = []
    eni_owner: dict[str, tuple[str, int]] = {}
    holder = root.find("instances")
    for element in holder.findall("instance") if holder is not None else ():
        instance_id = element.get("name", "")
        interfaces = []
        nics = element.find("networkInterfaces")
        for nic in nics.findall("networkInterface") if nics is not None else ():
            interfaces.append(_interface(nic, nic.get("name", ""), problems, f"instance {instance_id}"))
        if not interfaces:
            # EDGE mode: the instance's own fields are its one interface.
            interfaces.append(_interface(element, "eni-" + instance_id.partition("-")[2].lower(), problems,
                                         f"instance {instance_id}"))
        for position, interface in enumerate(interfaces):
            eni_owner[interface["id"]] = (instance_id, position)
        subnet = _text(element, "subnet")
        zone = zones.get(instance_id) or subnet_zone.get(subnet) or (cluster_names[0] if cluster_names else None)
        instances.append({
            "id": instance_id,
            "account_id": _text(element, "ownerId") or None,
            "availability_zone": zone,
            "interfaces": interfaces,
        })
    by_id = {i["id"]: i for i in instances}
    map_addresses: list[tuple[MapEntry, str, int]] = []
    for entry in map_entries:
        owner = eni_owner.get(entry.owner)
        if owner is None and entry.owner in by_id:
            owner = (entry.owner, 0)
        if owner is None:
            continue  # an interface that is not in this GNI yet (or any more)
        map_addresses.append((entry, *owner))
    for entry, instance_id, position in map_addresses:
        # Metadata traffic of this interface arrives from the map's 255.x.y.z address on the
        # default listener: index it as an extra address of the interface in the flat network.
        interface = by_id[instance_id]["interfaces"][position]
        interface.setdefault("metadata_sources", []).append(entry.address)

    records = [{"name": "instance-data", "type": "A", "value": INSTANCE_DATA_ADDRESS, "ttl": 3600},
               {"name": f"instance-data.{internal_domain}", "type": "A", "value": INSTANCE_DATA_ADDRESS, "ttl": 3600}]
    document = {
        "format": "edge-view/1",
        "serial": 0,
        "cloud": {
            "region": options.region,
            "internal_domain": internal_domain,
            "public_domain": public_domain,
            "private_name_template": style.private_template,
            "public_name_template": style.public_template,
            "dns_records": records,
        },
        "networks": networks,
        "instances": instances,
    }
    return document, problems


def _interface(element: Element, interface_id: str, problems: list[str], where: str) -> dict[str, Any]:
    public = _text(element, "publicIp")
    vpc = _text(element, "vpc")
    device_index = _text(element, "deviceIndex")
    groups = _values(element, "securityGroups")
    interface: dict[str, Any] = {
        "id": interface_id,
        "mac": _text(element, "macAddress"),
        "device_index": int(device_index) if device_index.isdigit() else 0,
        "network": vpc or DEFAULT_NETWORK,
        "subnet": _text(element, "subnet") or None,
        "private_ips": [_text(element, "privateIp")],
        "public_ip": None if public in _UNASSIGNED else public,
        "security_groups": [{"id": group, "name": group} for group in groups],
    }
    owner = _text(element, "ownerId")
    if owner:
        interface["owner_id"] = owner
    return interface
