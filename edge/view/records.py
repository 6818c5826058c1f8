"""The DNS record types a view may hold: one entry per type, read by everything that handles one.

Each :class:`RecordType` says how a value of that type is checked (the view's
``dns_records``, :mod:`edge.view.wire`), packed as RDATA (the DNS answers,
:mod:`edge.dns.render`) and written in a zone file (:mod:`edge.dns.zonefile`).
The schema's accepted ``type`` values are the keys of :data:`RECORD_TYPES`, so
a type is supported everywhere or refused as a view problem: adding one is one
entry here (and its row in ``docs/view-format.md``), never a table in each of
four modules where a missed entry silently drops records.

Values are presentation text as the view holds them (an MX is ``"PREFERENCE
EXCHANGE"``); the instances' own records (A, AAAA, PTR) use the same entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dnslib import AAAA, CNAME, MX, NS, PTR, RD, SRV, TXT, A

from edge.view.addresses import canonical_ipv4, canonical_ipv6, is_hostname

TXT_MAX_BYTES = 4000
"""The longest TXT value a view may hold (split into strings of 255 bytes on the wire)."""
_STRING = 255


@dataclass(frozen=True, slots=True)
class RecordType:
    name: str
    code: int
    """The type's number on the wire (RFC 1035 3.2.2, RFC 3596, RFC 2782)."""
    value_form: str
    """What a value looks like, for people (the schema's description and the problems)."""
    problem: Callable[[str], str | None]
    """Why ``value`` is not one of this type's values, or None when it is."""
    rdata: Callable[[str], RD]
    """The RDATA of a checked value."""
    zone_value: Callable[[str], str]
    """The RDATA of a checked value in zone file syntax (RFC 1035 5.1), names fully qualified."""


def _fqdn(name: str) -> str:
    return name.rstrip(".") + "."


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) < 65536


def _address_problem(canonical: Callable[[object], str | None], what: str) -> Callable[[str], str | None]:
    return lambda value: None if canonical(value) else f"not an {what} address: {value!r}"


def _name_problem(value: str) -> str | None:
    return None if is_hostname(value) else f"not a domain name: {value!r}"


def _mx_problem(value: str) -> str | None:
    parts = value.split()
    if len(parts) == 2 and _number(parts[0]) and is_hostname(parts[1]):
        return None
    return f"MX value must be 'PREFERENCE EXCHANGE': {value!r}"


def _mx_rdata(value: str) -> RD:
    preference, exchange = value.split()
    return MX(exchange, int(preference))


def _mx_zone(value: str) -> str:
    preference, exchange = value.split()
    return f"{int(preference)} {_fqdn(exchange)}"


def _srv_problem(value: str) -> str | None:
    parts = value.split()
    if len(parts) == 4 and all(_number(part) for part in parts[:3]) and is_hostname(parts[3]):
        return None
    return f"SRV value must be 'PRIORITY WEIGHT PORT TARGET': {value!r}"


def _srv_rdata(value: str) -> RD:
    priority, weight, port, target = value.split()
    return SRV(int(priority), int(weight), int(port), target)


def _srv_zone(value: str) -> str:
    priority, weight, port, target = value.split()
    return f"{int(priority)} {int(weight)} {int(port)} {_fqdn(target)}"


def _txt_problem(value: str) -> str | None:
    return None if len(value.encode()) <= TXT_MAX_BYTES else f"TXT value longer than {TXT_MAX_BYTES} bytes"


def txt_strings(value: str) -> list[bytes]:
    """The character-strings a TXT value is sent as: its UTF-8 bytes, 255 at a time (one empty one for "")."""
    raw = value.encode()
    return [raw[i:i + _STRING] for i in range(0, len(raw), _STRING)] or [b""]


def _txt_zone(value: str) -> str:
    # The same strings as on the wire; quotes and backslashes escaped, other bytes outside
    # printable ASCII as \DDD, so a zone file reader gets back exactly those bytes.
    def quoted(chunk: bytes) -> str:
        text = "".join(f"\\{chr(b)}" if b in b'"\\' else chr(b) if 0x20 <= b < 0x7F else f"\\{b:03d}"
                       for b in chunk)
        return f'"{text}"'

    return " ".join(quoted(chunk) for chunk in txt_strings(value))


def _same(value: str) -> str:
    return value


_TYPES = (
    RecordType("A", 1, "an IPv4 address", _address_problem(canonical_ipv4, "IPv4"), A, _same),
    RecordType("AAAA", 28, "an IPv6 address", _address_problem(canonical_ipv6, "IPv6"), AAAA, _same),
    RecordType("CNAME", 5, "a domain name", _name_problem, CNAME, _fqdn),
    RecordType("TXT", 16, f"the text itself (at most {TXT_MAX_BYTES} bytes)", _txt_problem,
               lambda value: TXT(txt_strings(value)), _txt_zone),
    RecordType("SRV", 33, "'PRIORITY WEIGHT PORT TARGET' (numbers 0..65535)", _srv_problem, _srv_rdata, _srv_zone),
    RecordType("MX", 15, "'PREFERENCE EXCHANGE' (preference 0..65535)", _mx_problem, _mx_rdata, _mx_zone),
    RecordType("PTR", 12, "a domain name", _name_problem, PTR, _fqdn),
    RecordType("NS", 2, "a domain name", _name_problem, NS, _fqdn),
)

RECORD_TYPES: dict[str, RecordType] = {kind.name: kind for kind in _TYPES}
"""Upper-case mnemonic -> type: every type a view's ``dns_records`` may hold."""
BY_CODE: dict[int, RecordType] = {kind.code: kind for kind in _TYPES}


def type_pattern() -> str:
    """The schema's pattern for ``type``: one of :data:`RECORD_TYPES`, in any case.

    Spelled with a bracket per letter: ECMA-262 patterns (JSON Schema's) have no inline
    case-insensitive flag.
    """
    names = "|".join("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)
                     for name in RECORD_TYPES)
    return rf"^(?:{names})$(?!\n)"


def supported() -> str:
    """The supported types, for people: ``A, AAAA, ... or NS``."""
    names = list(RECORD_TYPES)
    return ", ".join(names[:-1]) + " or " + names[-1]
