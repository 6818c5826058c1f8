"""The network view as typed, immutable values (format ``edge-view/1``).

These are the parsed form of the document control planes publish (see
``docs/view-format.md``; the schema is :mod:`edge.view.wire`).  Everything here is frozen: a snapshot built from a view
is shared by every request handler and never changes after it is swapped in.
Addresses are kept as canonical strings (``ipaddress`` ``str()``), which is the
form sockets report peers in, so handlers can look them up without parsing.

The per-instance values are ``msgspec.Struct`` types rather than frozen
dataclasses: a 100k-instance view creates about a million of them per build,
and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field)
costs seven times as much as a Struct's C constructor.  They are left out of
the cyclic garbage collector (``gc=False``): they only ever hold strings,
numbers, bytes and tuples of other such values, so they cannot form cycles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

FORMAT = "edge-view/1"

DEFAULT_NETWORK = ""
"""Interfaces that name no network belong to the flat network ``""``."""


class Value(msgspec.Struct, frozen=True, gc=False):
    """Base of the immutable values a snapshot is made of (hashable, compared field by field).

    msgspec passes ``frozen`` on to subclasses; each subclass still says ``frozen=True``
    because type checkers read a dataclass transform's options per class.
    """


class DnsRecord(Value, frozen=True):
    """One record of the view's ``dns_records``; ``value`` is presentation text.

    MX values are ``"PREFERENCE EXCHANGE"``, SRV ``"PRIORITY WEIGHT PORT TARGET"``,
    TXT the text itself, CNAME/PTR/NS a name, A/AAAA an address.
    """

    name: str
    type: str
    value: str
    ttl: int
    audience: str = "everyone"
    """``everyone``, or ``instances``: only askers the view knows as instances get it."""


class Cloud(Value, frozen=True):
    region: str = "eucalyptus"
    partition: str = "aws"
    services_domain: str = "amazonaws.com"
    internal_domain: str = "eucalyptus.internal"
    public_domain: str = "cloud.internal"
    private_name_template: str = "ip-{ip}"
    public_name_template: str = "ec2-{ip}"
    dns_ttl: int = 60
    negative_ttl: int = 30
    upstream_resolvers: tuple[str, ...] = ()
    dns_records: tuple[DnsRecord, ...] = ()
    public_name_horizon: str = "network"
    """Who gets an instance's private address for its public name: ``network`` (every asker in the
    instance's network) or ``cidr`` (instances whose own address is in the same CIDR of that network)."""
    private_ptrs: str = "all"
    """``all``, or ``rfc1918``: only RFC 1918 private addresses get PTRs and local reverse zones."""

    def private_name(self, address: str) -> str:
        return _render_name(self.private_name_template, address, self.internal_domain)

    def public_name(self, address: str) -> str:
        return _render_name(self.public_name_template, address, self.public_domain)

    def private_namer(self) -> Callable[[str], str]:
        return name_renderer(self.private_name_template, self.internal_domain)

    def public_namer(self) -> Callable[[str], str]:
        return name_renderer(self.public_name_template, self.public_domain)


def _render_name(template: str, address: str, domain: str) -> str:
    label = template.replace("{ip}", address.replace(".", "-").replace(":", "-"))
    return f"{label}.{domain}" if domain else label


def name_renderer(template: str, domain: str) -> Callable[[str], str]:
    """``_render_name`` for one template and domain, split once: a build renders a name per address."""
    head, found, tail = template.partition("{ip}")
    if not found or "{ip}" in tail:
        return lambda address: _render_name(template, address, domain)
    suffix = f"{tail}.{domain}" if domain else tail

    def render(address: str) -> str:
        return head + address.replace(".", "-").replace(":", "-") + suffix

    return render


class Subnet(Value, frozen=True):
    id: str
    cidr: str
    """The subnet's IPv4 range ("" when the view gives none)."""
    availability_zone: str | None = None
    ipv6_cidrs: tuple[str, ...] = ()
    """The subnet's IPv6 ranges (inside its network's IPv6 CIDRs)."""


class Network(Value, frozen=True):
    id: str
    cidrs: tuple[str, ...] = ()
    subnets: tuple[Subnet, ...] = ()


class SecurityGroup(Value, frozen=True):
    id: str
    name: str


class Interface(Value, frozen=True):
    id: str
    mac: str
    """Lower-case, colon separated."""
    device_index: int
    network: str
    subnet: str | None
    private_ips: tuple[str, ...]
    """The first one is the primary address."""
    public_ip: str | None = None
    ipv6s: tuple[str, ...] = ()
    security_groups: tuple[SecurityGroup, ...] = ()
    owner_id: str | None = None
    metadata_sources: tuple[str, ...] = ()
    """Extra addresses this interface's metadata requests arrive from on default-network
    listeners, when a proxy in the path rewrites them (Eucalyptus VPC ``255.x.y.z`` addresses)."""

    @property
    def primary_ip(self) -> str:
        return self.private_ips[0]


class PublicKey(Value, frozen=True):
    """A key pair's public key: ``openssh`` is its authorized_keys line."""

    name: str
    openssh: str


class IamProfile(Value, frozen=True):
    instance_profile_arn: str
    instance_profile_id: str
    role: str


class MetadataOptions(Value, frozen=True):
    http_tokens: str = "optional"
    """``optional`` or ``required``."""
    hop_limit: int = 1
    tags: bool = False
    endpoint: str = "enabled"
    """``enabled`` or ``disabled``."""

    @property
    def tokens_required(self) -> bool:
        return self.http_tokens == "required"

    @property
    def endpoint_enabled(self) -> bool:
        return self.endpoint == "enabled"


DEFAULT_METADATA_OPTIONS = MetadataOptions()


class Instance(Value, frozen=True):
    id: str
    interfaces: tuple[Interface, ...]
    """Sorted by ``device_index``; the first one is the primary interface."""
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
    iam: IamProfile | None = None
    tags: tuple[tuple[str, str], ...] = ()
    block_devices: tuple[tuple[str, str], ...] = ()
    metadata_options: MetadataOptions = DEFAULT_METADATA_OPTIONS
    product_codes: tuple[str, ...] = ()

    @property
    def primary_interface(self) -> Interface:
        return self.interfaces[0]


@dataclass(frozen=True, slots=True)
class View:
    serial: int
    generated: str | None
    cloud: Cloud
    networks: tuple[Network, ...]
    instances: tuple[Instance, ...]
    format: str = FORMAT
    version: str = ""
    """A content identifier for formats without a serial (a different version is a new view)."""
    ordered: bool = True
    """True when ``serial`` orders views; False when only ``version`` tells them apart."""
    extensions: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    """Source-specific facts a source format carries beyond ``edge-view/1``."""
