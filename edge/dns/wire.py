"""DNS wire format without a codec: read a query's header, question and OPT, assemble replies.

Replies are built from the query's own bytes: its ID, its question exactly as
sent (so a client using 0x20 case randomisation gets its own case back) and
stored section bytes whose names point at the question with compression
pointers.  That works for any spelling of a name because a question's layout
depends only on its label lengths, never on letter case.

Only the name bytes of a question are lower-cased to form lookup keys: type
and class bytes can be ASCII letters (type 65 is ``A``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from edge.dns.errors import NOTIMP, BadVers, FormErr, NotImp, Unanswerable

HEADER = 12
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010

TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_HINFO = 13
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_OPT = 41
TYPE_AXFR = 252
TYPE_IXFR = 251
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255

PLAIN_UDP_PAYLOAD = 512
DO_BIT = 0x8000

_COUNTS = struct.Struct("!HHHH")
_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_OPT = struct.Struct("!BHHBBHH")


@dataclass(slots=True)
class Query:
    """What a reply needs from a query; ``data[:qend]`` is its header and question."""

    data: bytes
    flags: int
    qend: int
    """Offset just past the question's type and class."""
    name: bytes
    """The question name in wire form, lower-cased."""
    qtype: int
    qclass: int
    edns: bool = False
    payload: int = PLAIN_UDP_PAYLOAD
    """The client's advertised UDP payload size (512 without EDNS)."""
    do: bool = False

    @property
    def key(self) -> bytes:
        """Lower-case name plus the raw type and class bytes: the lookup key for answers."""
        return self.name + self.data[self.qend - 4:self.qend]

    @property
    def question(self) -> bytes:
        return self.data[HEADER:self.qend]

    @property
    def rd(self) -> int:
        return self.flags & RD


def name_end(data: bytes, offset: int) -> int:
    """Offset just past the uncompressed name at ``offset``; FormErr if it is malformed."""
    pos = offset
    size = 0
    length = len(data)
    while True:
        if pos >= length:
            raise FormErr("name runs past the end of the message")
        label = data[pos]
        if label == 0:
            return pos + 1
        if label & 0xC0:
            raise FormErr("compression or extended label in a question name")
        size += label + 1
        if size > 254:
            raise FormErr("name longer than 255 bytes")
        pos += label + 1


def skip_name(data: bytes, offset: int) -> int:
    """Offset just past a possibly compressed name (the pointer target is not followed)."""
    pos = offset
    length = len(data)
    while True:
        if pos >= length:
            raise FormErr("name runs past the end of the message")
        label = data[pos]
        if label == 0:
            return pos + 1
        if label & 0xC0 == 0xC0:
            if pos + 2 > length:
                raise FormErr("truncated compression pointer")
            return pos + 2
        if label & 0xC0:
            raise FormErr("extended label type")
        pos += label + 1


def parse_query(data: bytes) -> Query:
    """Read a query.  Raises Unanswerable (drop), NotImp, FormErr or BadVers."""
    if len(data) < HEADER:
        raise Unanswerable("shorter than a DNS header")
    flags = (data[2] << 8) | data[3]
    if flags & QR:
        raise Unanswerable("a response, not a query")
    if (flags >> 11) & 0xF:
        raise NotImp("opcode is not QUERY")
    qdcount, ancount, nscount, arcount = _COUNTS.unpack_from(data, 4)
    if qdcount != 1:
        raise FormErr("QDCOUNT is not 1")
    end = name_end(data, HEADER)
    qend = end + 4
    if qend > len(data):
        raise FormErr("question truncated")
    qtype = (data[end] << 8) | data[end + 1]
    qclass = (data[end + 2] << 8) | data[end + 3]
    query = Query(data, flags, qend, data[HEADER:end].lower(), qtype, qclass)
    if ancount or nscount or arcount:
        _read_additional(query, ancount + nscount, arcount)
    return query


def _read_additional(query: Query, skipped: int, arcount: int) -> None:
    data = query.data
    pos = query.qend
    opt_at = -1
    for index in range(skipped + arcount):
        start = pos
        pos = skip_name(data, pos)
        if pos + 10 > len(data):
            raise FormErr("record truncated")
        rtype, _, _, rdlength = _RR_FIXED.unpack_from(data, pos)
        pos += 10 + rdlength
        if pos > len(data):
            raise FormErr("record data truncated")
        if rtype == TYPE_OPT:
            if index < skipped or opt_at >= 0 or data[start] != 0:
                raise FormErr("OPT outside the additional section, repeated, or not at the root")
            _check_options(data, pos - rdlength, pos)
            opt_at = start
    if opt_at >= 0:
        _, _, payload, _, version, eflags, _ = _OPT.unpack_from(data, opt_at)
        query.edns = True
        query.payload = max(payload, PLAIN_UDP_PAYLOAD)
        query.do = bool(eflags & DO_BIT)
        if version:
            raise BadVers("EDNS version above 0")


def _check_options(data: bytes, start: int, end: int) -> None:
    """FormErr unless the OPT RDATA from ``start`` to ``end`` is a whole number of options (RFC 6891 6.1.2)."""
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise FormErr("EDNS option header cut short")
        pos += 4 + ((data[pos + 2] << 8) | data[pos + 3])
        if pos > end:
            raise FormErr("EDNS option runs past the OPT record")


OPTION_EDE = 15


def opt_record(payload: int, do: bool, ext_rcode: int = 0, ede: int | None = None) -> bytes:
    """Our OPT pseudo-record: root owner, version 0, DO echoed; an Extended DNS Error if given (RFC 8914)."""
    options = b"" if ede is None else struct.pack("!HHH", OPTION_EDE, 2, ede)
    return _OPT.pack(0, TYPE_OPT, payload, ext_rcode, 0, DO_BIT if do else 0, len(options)) + options


def header(query_id: bytes, flags: int, qdcount: int, ancount: int, nscount: int, arcount: int) -> bytes:
    return query_id + _HEADER.pack(0, flags, qdcount, ancount, nscount, arcount)[2:]


def reply_flags(query_flags: int, rcode: int, authoritative: bool, recursion: bool) -> int:
    """QR set, RD and CD copied, AA and RA as given, the low four bits of the RCODE."""
    return (QR | (query_flags & (RD | CD)) | (AA if authoritative else 0) | (RA if recursion else 0)
            | (rcode & 0xF))


def udp_limit(query: Query, cap: int) -> int:
    """The largest UDP reply this client accepts (RFC 6891: its payload size, bounded by ours)."""
    if not query.edns:
        return PLAIN_UDP_PAYLOAD
    return min(query.payload, cap)


def truncated(reply: bytes, query: Query, opt: bytes) -> bytes:
    """The reply cut to its header and question with TC set (the client retries over TCP)."""
    flags = ((reply[2] << 8) | reply[3]) | TC
    return (reply[:2] + _HEADER.pack(0, flags, 1, 0, 0, 1 if opt else 0)[2:] + query.question + opt)


def error_reply(data: bytes, rcode: int, recursion: bool, edns_payload: int, ede: int | None = None) -> bytes | None:
    """The reply to a query that failed with ``rcode``: header, the question if readable, OPT if any."""
    if len(data) < HEADER:
        return None
    flags = (data[2] << 8) | data[3]
    if flags & QR:
        return None
    question = b""
    opt = b""
    qdcount = (data[4] << 8) | data[5]
    if qdcount == 1:
        try:
            qend = name_end(data, HEADER) + 4
            if qend <= len(data):
                question = data[HEADER:qend]
                query = Query(data, flags, qend, b"", 0, 0)
                arcount = (data[10] << 8) | data[11]
                try:
                    _read_additional(query, ((data[6] << 8) | data[7]) + ((data[8] << 8) | data[9]), arcount)
                except BadVers:
                    pass
                if query.edns:
                    opt = opt_record(edns_payload, query.do, rcode >> 4, ede)
        except FormErr:
            pass
    if rcode == NOTIMP:
        # RFC 8906 8: RD, RA and CD mean something only for QUERY; the opcode is echoed.
        out_flags = QR | (flags & 0x7800) | NOTIMP
    else:
        out_flags = QR | (flags & (RD | CD | 0x7800)) | (RA if recursion else 0) | (rcode & 0xF)
    return header(data[:2], out_flags, 1 if question else 0, 0, 0, 1 if opt else 0) + question + opt


@dataclass(frozen=True, slots=True)
class RecordSpan:
    """Where one resource record of a message lies."""

    start: int
    rtype: int
    ttl_at: int
    ttl: int
    end: int
    rdata_at: int


def walk_records(data: bytes, offset: int, count: int) -> tuple[list[RecordSpan], int]:
    """The spans of ``count`` records from ``offset``, and the offset after them; FormErr if malformed."""
    spans = []
    pos = offset
    for _ in range(count):
        start = pos
        pos = skip_name(data, pos)
        if pos + 10 > len(data):
            raise FormErr("record truncated")
        rtype, _, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
        end = pos + 10 + rdlength
        if end > len(data):
            raise FormErr("record data truncated")
        spans.append(RecordSpan(start, rtype, pos + 4, ttl & 0x7FFFFFFF, end, pos + 10))
        pos = end
    return spans, pos


def encode_name(name: str) -> bytes:
    """``example.com`` -> wire form (no compression)."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out.append(len(raw))
            out += raw
    out.append(0)
    return bytes(out)


def decode_name(wire: bytes) -> str:
    """Wire form of an uncompressed name -> dotted text without the trailing dot ("" is the root)."""
    labels = []
    pos = 0
    while pos < len(wire) and wire[pos]:
        length = wire[pos]
        labels.append(wire[pos + 1:pos + 1 + length].decode("latin-1"))
        pos += length + 1
    return ".".join(labels)
