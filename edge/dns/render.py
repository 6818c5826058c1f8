"""Pre-rendered replies: section bytes stored once, assembled with each query's own header and question.

Rendering uses dnslib (it runs once per name, type and horizon, not per query).
The question is laid out exactly as the client's, lower-cased, and the
compressor is seeded with its suffixes, so record owners become pointers into
the question and the stored bytes fit every spelling of the name.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from dnslib import RD, RR, SOA, DNSBuffer, DNSLabel

from edge.dns.wire import AA, HEADER, QR, RA, TYPE_HINFO, TYPE_SOA
from edge.dns.wire import RD as RD_FLAG
from edge.view.records import BY_CODE

_PREFIX = struct.Struct("!HHHHH")


@dataclass(frozen=True, slots=True)
class Record:
    """One record to render; ``owner`` None means the question name."""

    owner: str | None
    rtype: int
    ttl: int
    value: object
    """Presentation text, or for SOA a tuple (mname, rname, serial, refresh, retry, expire, minimum)."""


@dataclass(frozen=True, slots=True)
class Onward:
    """Where local data stops short of an answer a recursive server would give."""

    name: bytes
    """Lower-case wire name to resolve upstream: a CNAME target outside the local zones, or the
    question itself when it lies at or below a zone cut."""
    records: bytes
    """Local answer records (the CNAME chain) that come before the upstream answer."""
    count: int
    """How many records ``records`` holds."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A reply minus its ID, question and OPT: pick a prefix, append the body."""

    rcode: int
    prefixes: tuple[bytes, ...]
    """Flags and counts (10 bytes), indexed by ``variant(rd, ra, opt)``."""
    body: bytes
    """Answer, authority and additional records, names pointing into the question."""
    onward: Onward | None = None
    """For a client that may recurse and asked to (RD): what to resolve upstream instead of
    answering this alone (RFC 1034 3.6.2, 4.3.2 step 3b)."""

    def assemble(self, data: bytes, qend: int, rd: int, ra: bool, opt: bytes) -> bytes:
        index = (4 if rd else 0) | (2 if ra else 0) | (1 if opt else 0)
        return data[:2] + self.prefixes[index] + data[HEADER:qend] + self.body + opt


@functools.lru_cache(maxsize=1024)
def prefixes(base_flags: int, ancount: int, nscount: int, arcount: int) -> tuple[bytes, ...]:
    """The eight header variants; shared by every answer with the same flags and counts."""
    out = []
    for index in range(8):
        flags = base_flags | QR | (RD_FLAG if index & 4 else 0) | (RA if index & 2 else 0)
        out.append(_PREFIX.pack(flags, 1, ancount, nscount, arcount + (index & 1)))
    return tuple(out)


def question_labels(name_wire: bytes) -> tuple[bytes, ...]:
    labels = []
    pos = 0
    while name_wire[pos]:
        length = name_wire[pos]
        labels.append(name_wire[pos + 1:pos + 1 + length])
        pos += length + 1
    return tuple(labels)


def _question_buffer(name_wire: bytes, qtype: int, qclass: int) -> tuple[DNSBuffer, tuple[bytes, ...]]:
    """A buffer holding the header and the question, positioned after it, with every suffix of the
    question's name registered so that records packed next compress against it; and its labels."""
    buffer = DNSBuffer(bytes(HEADER) + name_wire + struct.pack("!HH", qtype, qclass))
    buffer.offset = len(buffer.data)
    labels = question_labels(name_wire)
    offset = HEADER
    for index in range(len(labels)):
        buffer.names[labels[index:]] = offset
        offset += len(labels[index]) + 1
    return buffer, labels


def render(name_wire: bytes, qtype: int, qclass: int, rcode: int, authoritative: bool,
           answer: Sequence[Record], authority: Sequence[Record] = (),
           additional: Sequence[Record] = ()) -> Answer:
    """Render the sections for a question whose lower-case wire name is ``name_wire``."""
    buffer, labels = _question_buffer(name_wire, qtype, qclass)
    owner_label = DNSLabel(list(labels))
    start = buffer.offset
    for record in (*answer, *authority, *additional):
        owner = owner_label if record.owner is None else DNSLabel(record.owner)
        RR(owner, record.rtype, ttl=record.ttl, rdata=_rdata(record)).pack(buffer)
    body = bytes(buffer.data[start:])
    flags = (AA if authoritative else 0) | (rcode & 0xF)
    return Answer(rcode, prefixes(flags, len(answer), len(authority), len(additional)), body)


def spliced_body(name_wire: bytes, qtype: int, qclass: int, local_records: bytes, upstream_question: bytes,
                 upstream: bytes, ancount: int, nscount: int) -> bytes:
    """Local answer records followed by an upstream answer's, for a question laid out as ``name_wire``.

    ``upstream`` holds the answer and authority records of a reply to ``upstream_question``, their
    names compressed against that question; they are decoded and packed again against ours.
    """
    from dnslib import DNSRecord

    message = DNSRecord.parse(_PREFIX_ID + _PREFIX.pack(QR, 1, ancount, nscount, 0) + upstream_question + upstream)
    buffer, _ = _question_buffer(name_wire, qtype, qclass)
    start = buffer.offset
    buffer.append(local_records)
    for record in (*message.rr, *message.auth):
        record.pack(buffer)
    return bytes(buffer.data[start:])


_PREFIX_ID = b"\x00\x00"


def _rdata(record: Record) -> object:
    rtype = record.rtype
    value = record.value
    if rtype == TYPE_HINFO:
        cpu, os_name = (part.encode() for part in cast(tuple[str, str], value))
        return RD(bytes([len(cpu)]) + cpu + bytes([len(os_name)]) + os_name)
    if rtype == TYPE_SOA:
        mname, rname, *timers = cast(tuple[str, str, int, int, int, int, int], value)
        return SOA(mname, rname, tuple(timers))
    # Every other record comes from the view (or the instances) as presentation text, of a type
    # the view's schema admitted: a type missing from the table is a defect, raised, not dropped.
    return BY_CODE[rtype].rdata(str(value))
