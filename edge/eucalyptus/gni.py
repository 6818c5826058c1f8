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

import functools
import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from xml.etree.ElementTree import Element

from edge.config import Config
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
class GniOptions:
    """The cloud properties that shape names and answers (``eucalyptus.*`` configuration keys)."""

    version: str = "auto"
    """``4``, ``5``, or ``auto``: from the document (:meth:`resolved`)."""
    dns_domain: str = "localhost"
    """The cloud's ``system.dns.dnsdomain`` (public names live under it)."""
    region: str = "eucalyptus"
    instance_subdomain: str = ""
    """``cloud.vmstate.instance_subdomain``; empty: the version's default."""
    private_prefix: str = "ip-"
    public_prefix: str = "ec2-"
    mido_md_cidr: str = "255.0.0.0/8"
    """eucanetd's ``MIDO_MD_CIDR``: where the intip map's metadata addresses are."""

    @classmethod
    def of(cls, config: Config) -> GniOptions:
        euca = config.eucalyptus
        return cls(version=euca.version, dns_domain=euca.dns_domain, region=euca.region,
                   instance_subdomain=euca.instance_subdomain, private_prefix=euca.private_prefix,
                   public_prefix=euca.public_prefix, mido_md_cidr=configured_md_cidr(config))

    def resolved(self, instance_dns_domain: str) -> GniOptions:
        """Concrete options for a document whose ``instanceDNSDomain`` is given.

        The controller publishes ``instanceDNSDomain`` as ``INSTANCE_SUBDOMAIN + ".internal"``
        unless the network configuration sets one (``NetworkInfoBroadcaster.java``; 4.x
        ``NetworkInfoBroadcasts.groovy``): ``eucalyptus.internal`` is 4.x's default, anything
        else is taken as 5.x, and the subdomain, unless configured, is the document's.
        """
        version = self.version
        if version == "auto":
            version = "4" if instance_dns_domain == "eucalyptus.internal" else "5"
        subdomain = self.instance_subdomain
        if not subdomain and instance_dns_domain.endswith(".internal") and instance_dns_domain != "internal":
            subdomain = "." + instance_dns_domain[:-len(".internal")]
        return replace(self, version=version, instance_subdomain=subdomain)

    @property
    def subdomain(self) -> str:
        """The instance subdomain without its leading dot (``compute``; 4.x ``eucalyptus``)."""
        text = self.instance_subdomain or (".eucalyptus" if self.version == "4" else ".compute")
        return text.strip(".")

    @property
    def prefixes(self) -> tuple[str, str]:
        """(private, public) name prefixes: 4.x hard-codes ``euca-`` (``VmInstances.dnsName``)."""
        return ("euca-", "euca-") if self.version == "4" else (self.private_prefix, self.public_prefix)

    @property
    def internal_domain(self) -> str:
        """Where private names live: ``<subdomain>.internal`` (``DomainNames.internalSubdomain``)."""
        return f"{self.subdomain}.internal"

    @property
    def public_domain(self) -> str:
        """Where public names live: ``<subdomain>.<dns domain>`` (``DomainNames.externalSubdomain``)."""
        return f"{self.subdomain}.{self.dns_domain.strip('.')}"

    def private_name(self, address: str) -> str:
        return f"{self.prefixes[0]}{address.replace('.', '-')}.{self.internal_domain}"

    def public_name(self, address: str) -> str:
        """``VmInstances.generateDnsName``: empty for the unassigned address."""
        if address in _UNASSIGNED:
            return ""
        return f"{self.prefixes[1]}{address.replace('.', '-')}.{self.public_domain}"


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


def configured_md_cidr(config: Config) -> str:
    """``MIDO_MD_CIDR`` from eucanetd's own ``eucalyptus.conf`` when configured and set there
    (``net/eucanetd.c`` reads it with ``configFileValue``), else ``eucalyptus.mido_md_cidr``."""
    euca = config.eucalyptus
    if not euca.eucalyptus_conf:
        return euca.mido_md_cidr
    try:
        with open(euca.eucalyptus_conf, encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 20)
    except OSError as exc:
        event(log, logging.WARNING, "eucalyptus.conf unreadable; using eucalyptus.mido_md_cidr",
              path=euca.eucalyptus_conf, error=exc.strerror or str(exc), mido_md_cidr=euca.mido_md_cidr)
        return euca.mido_md_cidr
    value = None
    for line in text.splitlines():
        key, equals, raw = line.strip().partition("=")
        if equals and key.strip() == "MIDO_MD_CIDR":
            value = raw.split("#", 1)[0].strip().strip("\"'")  # the last assignment wins, as in a shell
    if not value:
        return euca.mido_md_cidr
    try:
        return str(ipaddress.IPv4Network(value, strict=False))
    except ValueError:
        event(log, logging.WARNING, "MIDO_MD_CIDR in eucalyptus.conf is not a CIDR; using eucalyptus.mido_md_cidr",
              path=euca.eucalyptus_conf, value=value[:80], mido_md_cidr=euca.mido_md_cidr)
        return euca.mido_md_cidr


def parse_intip_map(text: str, md_cidr: str = "255.0.0.0/8") -> tuple[list[MapEntry], list[str]]:
    """Entries of eucanetd's intip map, and a problem line for each line that is not one.

    Addresses are in ``MIDO_MD_CIDR`` (``net/eucanetd.c`` default ``255.0.0.0/8``; configurable).
    """
    entries: list[MapEntry] = []
    problems: list[str] = []
    network = ipaddress.IPv4Network(md_cidr, strict=False)
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        address = canonical_ipv4(fields[0]) if fields else None
        if len(fields) not in (4, 5) or address is None or ipaddress.IPv4Address(address) not in network:
            problems.append(f"intip map line {number}: not '<address in {md_cidr}> <instance or eni id> <vpc> <subnet> [new]': "
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
        map_entries, map_problems = parse_intip_map(match.group(1).decode("utf-8", "replace"), options.mido_md_cidr)
        # eucanetd rewrites the map in place: a torn line costs that line, not the view.
        for problem in map_problems[:20]:
            event(log, logging.WARNING, "intip map line ignored", problem=problem)
    problems, warnings = gni_problems(root)
    if problems:
        raise ViewInvalid(problems)
    document, widened = gni_document(root, options, map_entries)
    warnings += widened
    for warning in warnings[:20]:
        event(log, logging.WARNING, "GNI accepted with a warning", warning=warning)
    if len(warnings) > 20:
        event(log, logging.WARNING, "GNI accepted with more warnings", more=len(warnings) - 20)
    view = parse_view(document)
    version = root.get("version") or hashlib.sha256(data).hexdigest()[:16]
    if match:
        # The map changes without the GNI changing: both make the version.
        version += "+" + hashlib.sha256(match.group(1)).hexdigest()[:8]
    return replace(view, version=version, ordered=False,
                   extensions={"eucalyptus": {"mode": _properties(root).get("mode", ["EDGE"])[0],
                                              "version": root.get("version"),
                                              "applied_version": root.get("applied-version"),
                                              "clc": next(iter(_properties(root).get("enabledCLCIp", [])), None),
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


def gni_problems(root: Element) -> tuple[list[str], list[str]]:
    """What eucanetd's ``gni_validate`` rejects the whole document for, and what it only warns about.

    ``net/euca_gni.c``: a mode other than EDGE or VPCMIDO, no enabled CLC, no instance DNS domain,
    no (or a 0.0.0.0) instance DNS server, VPC elements in EDGE mode; an instance without name,
    owner, private address or security groups (``gni_instance_validate``); an interface without
    name, owner or private address, or with an empty group name (``gni_interface_validate``).
    A missing MAC is a warning only, and addresses are not checked against the subnets.
    """
    problems: list[str] = []
    warnings: list[str] = []
    props = _properties(root)
    mode = (props.get("mode") or [""])[0]
    if mode not in ("EDGE", "VPCMIDO"):
        problems.append(f"GNI mode must be EDGE or VPCMIDO, got {mode!r}")
    clc = (props.get("enabledCLCIp") or [""])[0]
    if clc in _UNASSIGNED or canonical_ipv4(clc) is None:
        problems.append(f"GNI has no enabled CLC address (enabledCLCIp {clc!r})")
    if not (props.get("instanceDNSDomain") or [""])[0]:
        problems.append("GNI has no instanceDNSDomain")
    servers = props.get("instanceDNSServers") or []
    if not servers or any(server in _UNASSIGNED for server in servers):
        problems.append(f"GNI instanceDNSServers missing or 0.0.0.0: {servers!r}")
    if mode == "EDGE":
        for tag, child in (("vpcs", "vpc"), ("dhcpOptionSets", "dhcpOptionSet"), ("internetGateways", "internetGateway")):
            holder = root.find(tag)
            if holder is not None and holder.findall(child):
                problems.append(f"GNI in EDGE mode has VPC elements (<{tag}>)")
    holder = root.find("instances")
    for element in holder.findall("instance") if holder is not None else ():
        name = element.get("name", "")
        _check_element(element, name, "instance", problems, warnings, groups_required=True)
        nics = element.find("networkInterfaces")
        for nic in nics.findall("networkInterface") if nics is not None else ():
            _check_element(nic, f"{name}/{nic.get('name', '')}", "interface", problems, warnings,
                           groups_required=False)
    return problems, warnings


def _check_element(element: Element, where: str, kind: str, problems: list[str], warnings: list[str],
                   groups_required: bool) -> None:
    if not element.get("name", ""):
        problems.append(f"{kind} without a name")
    if not _text(element, "ownerId"):
        problems.append(f"{kind} {where}: no ownerId")
    if _text(element, "privateIp") in _UNASSIGNED:
        problems.append(f"{kind} {where}: no privateIp")
    groups = _values(element, "securityGroups")
    if groups_required and not groups:
        problems.append(f"{kind} {where}: no securityGroups")
    if any(not group for group in groups):
        problems.append(f"{kind} {where}: an empty security group name")
    if _text(element, "macAddress") in ("", "00:00:00:00:00:00"):
        warnings.append(f"{kind} {where}: no macAddress; served without MAC paths")


def gni_document(root: Element, options: GniOptions, map_entries: list[MapEntry]) -> tuple[dict[str, Any], list[str]]:
    """The edge-view/1 document equivalent to a parsed GNI that :func:`gni_problems` accepted.

    Returns the document and warnings: a private address outside its network's subnets (which
    eucanetd never checks) is accepted with a warning, the network widened by that one address.
    """
    problems: list[str] = []
    props = _properties(root)
    options = options.resolved((props.get("instanceDNSDomain") or [""])[0])
    internal_domain = options.internal_domain
    public_domain = options.public_domain
    mode = (props.get("mode") or ["EDGE"])[0]
    private_prefix, public_prefix = options.prefixes
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
        subnet_id = _text(element, "subnet")
        zone = zones.get(instance_id) or subnet_zone.get(subnet_id) or (cluster_names[0] if cluster_names else None)
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
            # An instance id in the map is its primary interface (device index 0), wherever it is listed.
            nics = by_id[entry.owner]["interfaces"]
            owner = (entry.owner, next((n for n, nic in enumerate(nics) if nic["device_index"] == 0), 0))
        if owner is None:
            continue  # an interface that is not in this GNI yet (or any more)
        map_addresses.append((entry, *owner))
    for entry, instance_id, position in map_addresses:
        # Metadata traffic of this interface arrives from the map's 255.x.y.z address on the
        # default listener: index it as an extra address of the interface in the flat network.
        interface = by_id[instance_id]["interfaces"][position]
        interface.setdefault("metadata_sources", []).append(entry.address)

    for instance in instances:
        for interface in instance["interfaces"]:
            if mode == "EDGE" and interface["public_ip"]:
                # EDGE: a node's eucanetd DNATs metadata to port 8773 and, by default
                # (METADATA_USE_VM_PRIVATE=N), SNATs the instance to its public address on the way.
                interface.setdefault("metadata_sources", []).append(interface["public_ip"])
            _widen_for(networks, interface, instance["id"], problems)

    # The controller is authoritative for all of internal. (DomainNames.java, SystemSubdomain.INTERNAL):
    # a name under it that it does not know is NXDOMAIN, never recursed.  First, so that the names
    # below are in this zone rather than zones of their own.
    records: list[dict[str, Any]] = [{"name": "internal", "type": "NS", "value": f"ns.{internal_domain}"}]
    # InstanceDataDnsResolver.java: instance-data, under internal. and under eucalyptus.internal, only
    # to system-managed sources (instances); its PTR to everyone.
    records += [{"name": name, "type": "A", "value": INSTANCE_DATA_ADDRESS, "ttl": 3600, "audience": "instances"}
                for name in ("instance-data", "instance-data.internal", "instance-data.eucalyptus.internal")]
    records.append({"name": "254.169.254.169.in-addr.arpa", "type": "PTR", "value": "instance-data", "ttl": 3600})
    document = {
        "format": "edge-view/1",
        "serial": 0,
        "cloud": {
            "region": options.region,
            # services/domain in the view's own answers too (VmInstanceMetadata: the DNS domain).
            "services_domain": options.dns_domain.strip("."),
            "internal_domain": internal_domain,
            "public_domain": public_domain,
            "private_name_template": private_prefix + "{ip}",
            "public_name_template": public_prefix + "{ip}",
            "dns_records": records,
            # SplitHorizonResolver.java: in EDGE mode a public name answers the private address only to
            # instances of the same cluster subnet (the flat network's CIDRs); every other asker, and
            # VPCs, by network.  Its reverse lookup gives private PTRs only for RFC 1918 addresses.
            "public_name_horizon": "cidr" if mode == "EDGE" else "network",
            "private_ptrs": "rfc1918",
        },
        "networks": networks,
        "instances": instances,
    }
    return document, problems


def _widen_for(networks: list[dict[str, Any]], interface: dict[str, Any], instance_id: str,
               warnings: list[str]) -> None:
    """Accept a private address outside its network's subnets (eucanetd does not check) as a host route."""
    address = interface["private_ips"][0]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return  # the view's validation reports it
    network = next((n for n in networks if n["id"] == interface["network"]), None)
    if network is None:
        network = {"id": interface["network"], "cidrs": [], "subnets": []}
        networks.append(network)
    inside = False
    for cidr in network["cidrs"]:
        try:
            inside = ip in ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if inside:
            return
    warnings.append(f"instance {instance_id}: private address {address} is outside the subnets of network "
                    f"{interface['network'] or '(flat)'}; accepted as {address}/32")
    network["cidrs"].append(f"{address}/32")


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


def gni_decoder(config: Config) -> Callable[[bytes], View]:
    """The GNI's decoder for the ``eucalyptus-gni`` view format (registered by the composition root)."""
    return functools.partial(decode_gni, options=GniOptions.of(config))
