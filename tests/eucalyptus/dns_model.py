"""What a Eucalyptus controller's DNS answers about instances, written from its source, for edge to be compared against.

Read in ``Corymbia/eucalyptus`` (``clc/modules/...``):

* ``compute-backend/.../vm/dns/SplitHorizonResolver.java``: ``lookupNetwork`` finds the asker's
  instance by its address (private or public in EDGE mode, public only when private networks are
  managed, VPCMIDO) and takes its VPC's CIDR, or the cluster subnet holding its private address.
  ``HorizonARecordResolver`` answers an instance's public name with its private address when that
  network holds it, else the public address; ``ExternalARecordResolver`` answers everyone else
  the public address.  The reverse lookup answers a private address only when it is RFC 1918
  (``isSiteLocalAddress``), a public one always, and leaves other addresses to later resolvers.
* ``compute-backend/.../compute/metadata/InstanceDataDnsResolver.java``: ``instance-data``,
  ``instance-data.internal`` and ``instance-data.eucalyptus.internal`` only for system-managed
  sources (``Subnets.isSystemManagedAddress``); ``254.169.254.169.in-addr.arpa`` for everyone.
* ``compute-backend/.../vm/dns/RecursiveDnsResolver.java``: takes A/AAAA/MX questions outside the
  system's domains (and PTRs of addresses that are not system-managed), and refuses sources that
  are not system-managed.
* ``core/.../util/dns/DnsResolvers.java``: a question no resolver takes is NXDOMAIN; one that
  resolvers take but none answers ends as SERVFAIL (``ConnectionHandler.java``).

4.x (``eucalyptus/eucalyptus``) has the same rules: ``clc/modules/cluster-manager/.../vm/dns/
SplitHorizonResolver.java`` (cluster subnets, ``isSiteLocalAddress``) and its
``InstanceDataDnsResolver.java`` (``isSystemManagedAddress``).

This is written independently of edge's DNS code so that it can disagree with it.  Answers are
given as (rcode, addresses or names); ``forwarded`` marks what only the recursive resolver answers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

METADATA_ADDRESS = "169.254.169.254"


@dataclass(frozen=True)
class Vm:
    private_ip: str
    public_ip: str | None = None
    vpc: str | None = None


@dataclass
class ControllerDns:
    vms: list[Vm]
    cluster_subnets: list[str]
    vpc_cidrs: dict[str, str] = field(default_factory=dict)
    vpc_mode: bool = False
    """``NetworkingFeature.SiteLocalManaged``: VPCMIDO."""
    dns_domain: str = "cloud.example"
    subdomain: str = "compute"
    prefixes: tuple[str, str] = ("ip-", "ec2-")

    # -- the lookups SplitHorizonResolver caches ------------------------------------------------

    def _private(self, address: str) -> Vm | None:
        return next((vm for vm in self.vms if vm.private_ip == address), None)

    def _public(self, address: str) -> Vm | None:
        return next((vm for vm in self.vms if vm.public_ip == address), None)

    def lookup_network(self, source: str) -> ipaddress.IPv4Network | None:
        vm = self._public(source) if self.vpc_mode else (self._private(source) or self._public(source))
        if vm is None:
            return None
        if vm.vpc is not None:
            return ipaddress.IPv4Network(self.vpc_cidrs[vm.vpc])
        private = ipaddress.IPv4Address(vm.private_ip)
        return next((net for net in map(ipaddress.IPv4Network, self.cluster_subnets) if private in net), None)

    def system_managed(self, source: str) -> bool:
        """``SystemInternalSubnet``: an instance's public address, or (EDGE) an address in a cluster subnet."""
        if self._public(source) is not None:
            return True
        address = ipaddress.IPv4Address(source)
        return not self.vpc_mode and any(address in ipaddress.IPv4Network(n) for n in self.cluster_subnets)

    # -- questions ----------------------------------------------------------------------------------

    @property
    def external(self) -> str:
        return f"{self.subdomain}.{self.dns_domain}"

    def _address_in(self, name: str, prefix: str, domain: str) -> str | None:
        if not (name.startswith(prefix) and name.endswith("." + domain)):
            return None
        return name[len(prefix):-len(domain) - 1].replace("-", ".")

    def a(self, source: str, name: str) -> tuple[str, list[str]]:
        name = name.rstrip(".").lower()
        if name in ("instance-data", "instance-data.internal", "instance-data.eucalyptus.internal"):
            if self.system_managed(source):
                return "NOERROR", [METADATA_ADDRESS]
            # Not taken by InstanceDataDnsResolver: a name outside the system's domains goes to the
            # recursive resolver, which refuses the source; one under internal. is taken by no one.
            return ("REFUSED", []) if name == "instance-data" else ("NXDOMAIN", [])
        public = self._address_in(name, self.prefixes[1], self.external)
        if public is not None:
            vm = self._public(public)
            if vm is None:
                return "NXDOMAIN", []
            network = self.lookup_network(source)
            if network is not None and ipaddress.IPv4Address(vm.private_ip) in network:
                return "NOERROR", [vm.private_ip]
            return "NOERROR", [public]
        private = self._address_in(name, self.prefixes[0], f"{self.subdomain}.internal")
        if private is not None:
            if (self.vpc_mode and ipaddress.IPv4Address(private).is_private) or self._private(private):
                return "NOERROR", [private]
            return "NXDOMAIN", []
        if name.endswith(".internal") or name.endswith("." + self.dns_domain):
            return "NXDOMAIN", []
        return ("forwarded", []) if self.system_managed(source) else ("REFUSED", [])

    def ptr(self, source: str, address: str) -> tuple[str, list[str]]:
        if address == METADATA_ADDRESS:
            return "NOERROR", ["instance-data"]
        ip = ipaddress.IPv4Address(address)
        vm = self._private(address) or self._public(address)
        if vm is not None:
            # InstanceDomainNames.fromInetAddress writes "euca-" whatever the prefixes are.
            if vm.private_ip == address and _site_local(ip):
                return "NOERROR", [f"euca-{address.replace('.', '-')}.{self.subdomain}.internal"]
            if vm.public_ip == address:
                return "NOERROR", [f"euca-{address.replace('.', '-')}.{self.external}"]
        if self.system_managed(address):
            return "SERVFAIL", []  # taken by SplitHorizonResolver, answered by no resolver
        return ("forwarded", []) if self.system_managed(source) else ("REFUSED", [])


def _site_local(ip: ipaddress.IPv4Address) -> bool:
    """Java's ``InetAddress.isSiteLocalAddress`` for IPv4: exactly RFC 1918."""
    return any(ip in ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
