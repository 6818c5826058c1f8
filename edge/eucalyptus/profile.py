"""What the Eucalyptus controller answers for the paths its network document decides.

The controller builds each answer from a map of paths per metadata group
(``clc/modules/compute-backend/src/main/java/com/eucalyptus/vm/VmInstanceMetadata.java``):
the core group (``hostname``, ``mac``, ``public-ipv4``...), the network group
(``network/interfaces/macs/...``), and others edge cannot know from the GNI
(block devices, keys, IAM, the identity document).  Listings are derived from
the same map (``addListingEntries``), and a path is looked up as asked, then
without its trailing slash.  This module rebuilds, from the view, the entries
the GNI fully decides, in the controller's own format (addresses for hostnames
unless ``use_instance_dns``, upper-case ``mac``, ``0.0.0.0`` for no public
address, the version's names), so they are answered without the controller and
stay right when the GNI changes.  Everything else is the controller's (asked,
cached and prefetched by :mod:`edge.eucalyptus.fallback`).

4.x and 5.x serve the same map; they differ in names
(``VmInstances.dnsName``: ``euca-A-B-C-D.eucalyptus.<domain>`` in 4.x,
``<prefix>A-B-C-D.compute.<domain>`` in 5.x), which the view was built with
(:class:`~edge.eucalyptus.gni.GniOptions`), so the profile takes them from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edge.eucalyptus.gni import GniOptions
from edge.view.model import DEFAULT_NETWORK, Instance, Interface
from edge.view.snapshot import Snapshot

CONTROLLER_VERSIONS = ("1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15", "2008-02-01",
                       "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12", "2014-02-25", "latest")
"""``MetadataPipeline.VERSION``, in its order: the controller's answer to ``/``."""
UNASSIGNED = "0.0.0.0"
"""``VmNetworkConfig.DEFAULT_IP``: what the controller reports for no public address."""

_CORE_FROM_VIEW = frozenset({"hostname", "instance-id", "local-hostname", "local-ipv4", "mac", "public-hostname",
                             "public-ipv4", "placement", "placement/availability-zone", "services",
                             "services/domain"})
"""Core paths the GNI decides.  The rest of the core group (image, type, reservation, kernel,
security group *names*, the ``meta-data/`` listing itself) is the controller's."""


class _Unknown:
    """A value the GNI does not carry: the controller must be asked."""


UNKNOWN = _Unknown()
"""Placed in a map where the controller has a value edge cannot rebuild."""


@dataclass(frozen=True, slots=True)
class ProfileOptions:
    names: GniOptions
    use_instance_dns: bool = False


def listed(entries: Mapping[str, str | _Unknown]) -> dict[str, str | _Unknown]:
    """The map with its listings added, as ``MetadataGroup.addListingEntries`` does (without roots).

    Each directory lists its children sorted, sub-directories with a trailing ``/`` (a name that is
    both a leaf and a directory is listed once, as the directory); a listing is stored under the
    directory's path, or under ``path/`` when a value already has that path.
    """
    children: dict[str, set[str]] = {}
    for path in entries:
        segments = path.split("/")
        for depth, segment in enumerate(segments):
            parent = "/".join(segments[:depth])
            children.setdefault(parent, set()).add(segment + ("/" if depth < len(segments) - 1 else ""))
    out = dict(entries)
    for parent, names in children.items():
        shown = sorted(name for name in names if name + "/" not in names)
        text = "\n".join(shown)
        if parent not in out:
            out[parent] = text
        elif parent + "/" not in out:
            out[parent + "/"] = text
    return out


def look_up(entries: Mapping[str, str | _Unknown], path: str) -> str | _Unknown | None:
    """``getByKeyInternal``: the path as asked, then without its trailing slash."""
    value = entries.get(path)
    if value is None and path.endswith("/"):
        value = entries.get(path[:-1])
    return value


class EucalyptusProfile:
    """The controller's answers rebuilt from the view, for the paths the GNI decides."""

    def __init__(self, options: ProfileOptions) -> None:
        self.options = options

    def answer(self, snapshot: Snapshot, instance: Instance, path: str) -> bytes | None:
        """The controller's body for ``path`` (``latest/meta-data/mac``, ``""`` for ``/``), or None
        when only the controller can say (or the path is not one it serves)."""
        if path == "":
            return "\n".join(CONTROLLER_VERSIONS).encode()
        parts = path.split("/", 2)
        if len(parts) < 3 or parts[1] != "meta-data":
            return None
        local = parts[2]
        if local.startswith("network"):
            value = look_up(listed(self.network_entries(snapshot, instance)), local)
        elif local.rstrip("/") in _CORE_FROM_VIEW:
            value = look_up(listed(self.core_entries(snapshot, instance)), local)
        else:
            return None
        if value is None or isinstance(value, _Unknown):
            return None
        return value.encode()

    # -- the groups ------------------------------------------------------------------------------

    def core_entries(self, snapshot: Snapshot, instance: Instance) -> dict[str, str | _Unknown]:
        """``getCoreMetadataMap``, the entries the GNI decides."""
        names = _Names(snapshot, self.options.names.dns_domain)
        primary = _primary(instance)
        private = primary.primary_ip
        public = primary.public_ip or UNASSIGNED
        dns = self.options.use_instance_dns
        return {
            "hostname": names.private_name(private) if dns else private,
            "instance-id": instance.id,
            "local-hostname": names.private_name(private) if dns else private,
            "local-ipv4": private,
            "mac": primary.mac.upper(),
            "public-hostname": names.public_name(public) if dns else public,
            "public-ipv4": public,
            # DomainNames.externalSubdomain().relativize(Name.root): the DNS domain, no trailing dot.
            "services/domain": names.dns_domain.strip("."),
            "placement/availability-zone": instance.availability_zone or "",
        }

    def network_entries(self, snapshot: Snapshot, instance: Instance) -> dict[str, str | _Unknown]:
        """``getNetworkMetadataMap``: a VPC instance's interfaces, or an EC2-Classic (EDGE) one's."""
        names = _Names(snapshot, self.options.names.dns_domain)
        entries: dict[str, str | _Unknown] = {}
        vpc_interfaces = [i for i in instance.interfaces if i.network != DEFAULT_NETWORK]
        if vpc_interfaces:
            for interface in vpc_interfaces:
                if not interface.mac:
                    continue
                prefix = f"network/interfaces/macs/{interface.mac}/"
                private = interface.primary_ip
                entries[prefix + "device-number"] = str(interface.device_index)
                entries[prefix + "interface-id"] = interface.id
                if interface.public_ip:
                    entries[prefix + f"ipv4-associations/{interface.public_ip}"] = private
                    # The association's name exists only when the VPC has DNS hostnames on.
                    entries[prefix + "public-hostname"] = UNKNOWN
                    entries[prefix + "public-ipv4s"] = interface.public_ip
                else:
                    entries[prefix + "public-hostname"] = ""
                    entries[prefix + "public-ipv4s"] = ""
                entries[prefix + "local-hostname"] = names.private_name(private)
                entries[prefix + "local-ipv4s"] = private
                entries[prefix + "mac"] = interface.mac
                entries[prefix + "owner-id"] = interface.owner_id or instance.account_id or ""
                # Group names are not in the GNI (it carries ids): the controller's.
                entries[prefix + "security-groups"] = UNKNOWN
                entries[prefix + "security-group-ids"] = "\n".join(g.id for g in interface.security_groups)
                entries[prefix + "subnet-id"] = interface.subnet or ""
                entries[prefix + "subnet-ipv4-cidr-block"] = _subnet_cidr(snapshot, interface)
                entries[prefix + "vpc-id"] = interface.network
                entries[prefix + "vpc-ipv4-cidr-block"] = _network_cidr(snapshot, interface)
            return entries
        primary = _primary(instance)
        if not primary.mac:
            return entries
        dns = self.options.use_instance_dns
        private = primary.primary_ip
        public = primary.public_ip or UNASSIGNED
        prefix = f"network/interfaces/macs/{primary.mac}/"
        entries[prefix + "device-number"] = "0"
        entries[prefix + "local-hostname"] = names.private_name(private) if dns else private
        entries[prefix + "local-ipv4s"] = private
        entries[prefix + "mac"] = primary.mac
        entries[prefix + "owner-id"] = instance.account_id or primary.owner_id or ""
        entries[prefix + "public-hostname"] = names.public_name(public) if dns else public
        entries[prefix + "public-ipv4s"] = public
        return entries


class _Names:
    """The version's names, as the view was built with them (its cloud's templates and domains)."""

    __slots__ = ("cloud", "dns_domain")

    def __init__(self, snapshot: Snapshot, dns_domain: str) -> None:
        self.cloud = snapshot.view.cloud
        self.dns_domain = dns_domain

    def private_name(self, address: str) -> str:
        return self.cloud.private_name(address)

    def public_name(self, address: str) -> str:
        """``VmInstances.generateDnsName``: empty for the unassigned address."""
        return "" if address == UNASSIGNED else self.cloud.public_name(address)


def _primary(instance: Instance) -> Interface:
    """The interface the controller's core entries describe: device index 0, else the first."""
    return next((i for i in instance.interfaces if i.device_index == 0), instance.interfaces[0])


def _network_cidr(snapshot: Snapshot, interface: Interface) -> str | _Unknown:
    for network in snapshot.view.networks:
        if network.id == interface.network and network.cidrs:
            return network.cidrs[0]
    return UNKNOWN


def _subnet_cidr(snapshot: Snapshot, interface: Interface) -> str | _Unknown:
    for network in snapshot.view.networks:
        if network.id == interface.network:
            for subnet in network.subnets:
                if subnet.id == interface.subnet:
                    return subnet.cidr
    return UNKNOWN
