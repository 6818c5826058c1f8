"""Who may use recursion: the view's instances (by listener network and source address) and configured CIDRs.

edge is never an open resolver: everyone else gets REFUSED for names outside
the local zones, and RA is set only for clients that may recurse.
"""

from __future__ import annotations

import ipaddress

from edge.view.snapshot import Snapshot

_MEMO_LIMIT = 65536


class RecursionPolicy:
    def __init__(self, cidrs: tuple[str, ...] = ()) -> None:
        self.configure(cidrs)

    def configure(self, cidrs: tuple[str, ...]) -> None:
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._generation = -1
        self._memo: dict[tuple[str, str], bool] = {}

    def allowed(self, snapshot: Snapshot, network: str, address: str) -> bool:
        if snapshot.generation != self._generation:
            self._generation = snapshot.generation
            self._memo = {}
        key = (network, address)
        found = self._memo.get(key)
        if found is None:
            found = key in snapshot.by_private or self._in_cidrs(address)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = found
        return found

    def _in_cidrs(self, address: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)
