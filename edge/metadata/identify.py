"""Who is asking: the listener's network and the source address, or a trusted proxy's word.

Identifying headers (``X-Forwarded-For`` and the network headers) count only
when the connection comes from a configured proxy; from anyone else they never
change who is asking.  Whether a peer is a proxy is decided once per
connection; what a peer asking as itself is attached to, once per snapshot
(the handler remembers it on the :class:`Peer`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from edge.metadata.responses import Response
from edge.view.snapshot import Attachment, Snapshot

NETWORK_HEADERS = (b"x-edge-network-id", b"x-neutron-network-id")


@dataclass(slots=True)
class Peer:
    """One connection's view of its client."""

    address: str
    network: str
    """The network of the listener the connection arrived on."""
    trusted: bool
    """The peer is a configured proxy, so its identifying headers count."""
    generation: int = -1
    """Snapshot generation ``attachment`` and ``answers`` belong to (untrusted peers ask as themselves every
    time, so the handler looks them up once per snapshot; -1: not looked up)."""
    attachment: Attachment | None = None
    answers: dict[bytes, Response] | None = None
    """The rendered answers of the peer's instance by raw request target, when a plain GET from it (no
    token or identifying header) needs no other check; else None.  Set by the handler with ``attachment``,
    read by the connection protocol to answer such a GET with one lookup."""
    limited: str | None = None
    """With ``answers``: the instance id whose rate limit such a GET counts against, None when the limit is off."""

    def forget(self) -> None:
        """Look the attachment and answers up again on the next request (the handler's configuration changed)."""
        self.generation = -1
        self.attachment = None
        self.answers = None
        self.limited = None


class TrustedProxies:
    def __init__(self, cidrs: tuple[str, ...] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def __contains__(self, address: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


def canonical_peer(address: str) -> str:
    """Socket peer names as view addresses: IPv4-mapped IPv6 becomes IPv4, scope ids are dropped."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    if "%" in address:
        return address.split("%", 1)[0]
    return address


def forwarded_address(value: bytes) -> str | None:
    """The address the proxy saw: the last entry of ``X-Forwarded-For``, canonical, or None."""
    last = value.rsplit(b",", 1)[-1].strip()
    try:
        return str(ipaddress.ip_address(last.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return None


def attachment_for(snapshot: Snapshot, peer: Peer, forwarded_for: bytes | None,
                   network_header: bytes | None) -> tuple[str, str, Attachment | None]:
    """(network, address, attachment or None) of the instance asking."""
    network = peer.network
    address = peer.address
    if not peer.trusted:
        return network, address, snapshot.by_private.get((network, address))
    if forwarded_for is not None:
        named = forwarded_address(forwarded_for)
        if named is None:
            return network, "", None
        address = named
    if network_header is not None:
        network = network_header.decode("utf-8", "replace").strip()
    return network, address, snapshot.by_private.get((network, address))
