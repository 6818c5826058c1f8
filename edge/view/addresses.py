"""Address and name syntax shared by the view, the configuration and the DNS forwarder.

Checks use ``socket.inet_pton`` round trips rather than ``ipaddress`` objects:
a 100k-instance view carries several hundred thousand addresses, and these
checks are on the hot path of a rebuild.
"""

from __future__ import annotations

import re
import socket

_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
HOSTNAME_PATTERN = rf"^(?=.{{1,253}}\.?$(?!\n))(?:{_LABEL}\.)*{_LABEL}\.?$(?!\n)"
"""A domain name: labels of letters, digits, ``-`` and ``_`` (no ``-`` at either end), at most
253 characters, one trailing dot allowed.  Also the pattern of the view schema's domain names."""
_HOSTNAME = re.compile(HOSTNAME_PATTERN)


def canonical_ipv4(text: object) -> str | None:
    """The address if ``text`` is a canonical dotted-quad IPv4 address, else None."""
    if type(text) is not str:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return None
    return text if socket.inet_ntop(socket.AF_INET, packed) == text else None


def canonical_ipv6(text: object) -> str | None:
    """The canonical (RFC 5952) form of an IPv6 address, or None if ``text`` is not one."""
    if type(text) is not str or ":" not in text:
        return None
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        return None


def canonical_ip(text: object) -> str | None:
    """The canonical form of an IPv4 (dotted quad, as written) or IPv6 address, or None."""
    return canonical_ipv4(text) or canonical_ipv6(text)


def is_hostname(name: str) -> bool:
    """Whether ``name`` matches :data:`HOSTNAME_PATTERN`."""
    return _HOSTNAME.match(name) is not None


def parse_resolver_address(text: str) -> tuple[str, int] | None:
    """``"192.0.2.53"``, ``"192.0.2.53:5353"``, ``"2001:db8::1"`` or ``"[2001:db8::1]:53"``."""
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            return None
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    address = canonical_ip(host)
    if address is None or not 0 < port < 65536:
        return None
    return address, port
