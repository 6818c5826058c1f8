"""ISC's EDNS compliance tests (``genreport`` from DNS-Compliance-Testing), asked of a real edge.

Each test of genreport's EDNS, FULL and COMMON groups, and each query type of its TYPE group, is
sent as genreport builds it (header flags, OPT payload size, version, flags and options, UDP or
TCP) to an edge on loopback, and the reply is judged by the rules genreport applies: the
expected RCODE (NOERROR, NOTIMP for an unknown opcode, BADVERS for EDNS version 1), OPT present
exactly when the query had one (RFC 6891), version 0 and no reserved EDNS flags in our OPT, unknown
options never echoed, an SOA answer for the SOA tests, AA for our zone, RD/CD/AD only where they
were asked for, Z clear, nothing but a bare header for an unknown opcode (RFC 8906), a reply that
fits the advertised size when TC may not be ignored, and a well-formed message throughout.

A client cookie (RFC 7873) is accepted and ignored: edge sends no server cookie, which genreport
rates "ok" (a server without cookie support).  When ``genreport`` itself is on the PATH (or named by
``$GENREPORT``), the same zone is also run through it and every result must be ``ok``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.rcode
import pytest

ZONE = "demo.internal"
INSTANCE = "127.0.0.1"
STRANGER = "127.0.0.9"

SOA, DNSKEY = 6, 48
COOKIE = b"\x00\x0a\x00\x08\x01\x02\x03\x04\x05\x06\x07\x08"
CLIENT_COOKIE = COOKIE[4:]


@dataclass(frozen=True)
class Case:
    """One genreport test: how the query is built and what the reply is held to."""

    name: str
    qtype: int = SOA
    udpsize: int = 0
    """EDNS UDP payload size; 0 sends no OPT."""
    eflags: int = 0
    version: int = 0
    options: bytes = b""
    tcp: bool = False
    cookie: bool = False
    ignore_tc: bool = False
    tc: bool = False
    rd: bool = False
    ra: bool = False
    cd: bool = False
    ad: bool = False
    aa: bool = False
    z: bool = False
    opcode: int = 0


CASES = [
    Case("dns"),
    Case("aa", aa=True),
    Case("ad", ad=True),
    Case("cd", cd=True),
    Case("ra", ra=True),
    Case("rd", rd=True),
    Case("tc", tc=True),
    Case("zflag", z=True),
    Case("opcode", qtype=0, opcode=15),
    Case("opcodeflg", qtype=0, opcode=15, tc=True, rd=True, ra=True, cd=True, ad=True, aa=True, z=True),
    Case("type666", qtype=666),
    Case("tcp", tcp=True),
    Case("edns", udpsize=4096),
    Case("edns1", udpsize=4096, version=1),
    Case("edns@512", qtype=DNSKEY, udpsize=512, ignore_tc=True),
    Case("ednsopt", udpsize=4096, options=b"\x00\x64\x00\x00"),
    Case("edns1opt", udpsize=4096, version=1, options=b"\x00\x64\x00\x00"),
    Case("do", udpsize=4096, eflags=0x8000),
    Case("docd", udpsize=4096, eflags=0x8000, cd=True),
    Case("edns1do", udpsize=4096, eflags=0x8000, version=1),
    Case("ednsflags", udpsize=4096, eflags=0x0080),
    Case("optlist", udpsize=4096, cookie=True,
         options=b"\x00\x03\x00\x00" + b"\x00\x08\x00\x04\x00\x01\x00\x00" + b"\x00\x09\x00\x00" + COOKIE),
    Case("ednsnsid", udpsize=4096, options=b"\x00\x03\x00\x00"),
    Case("ednscookie", udpsize=4096, cookie=True, options=COOKIE),
    Case("ednsexpire", udpsize=4096, options=b"\x00\x09\x00\x00"),
    Case("ednssubnet", udpsize=4096, options=b"\x00\x08\x00\x04\x00\x01\x00\x00"),
    Case("edns1nsid", udpsize=4096, version=1, options=b"\x00\x03\x00\x00"),
    Case("edns1cookie", udpsize=4096, version=1, cookie=True, options=COOKIE),
    Case("edns1expire", udpsize=4096, version=1, options=b"\x00\x09\x00\x00"),
    Case("edns1subnet", udpsize=4096, version=1, options=b"\x00\x08\x00\x04\x00\x01\x00\x00"),
    Case("ednstcp", qtype=DNSKEY, udpsize=512, eflags=0x8000, tcp=True),
    Case("bind11", udpsize=4096, eflags=0x8000, cookie=True, options=COOKIE),
    Case("dig11", udpsize=4096, cookie=True, rd=True, ad=True, options=COOKIE),
]

TYPES = {"A": 1, "NS": 2, "MD": 3, "MF": 4, "CNAME": 5, "SOA": 6, "MB": 7, "MG": 8, "MR": 9, "NULL": 10,
         "WKS": 11, "PTR": 12, "HINFO": 13, "MINFO": 14, "MX": 15, "TXT": 16, "RP": 17, "AFSDB": 18, "X25": 19,
         "ISDN": 20, "RT": 21, "NSAP": 22, "NSAP-PTR": 23, "SIG": 24, "KEY": 25, "PX": 26, "GPOS": 27,
         "AAAA": 28, "LOC": 29, "NXT": 30, "SRV": 33, "NAPTR": 35, "KX": 36, "CERT": 37, "A6": 38, "DNAME": 39,
         "APL": 42, "DS": 43, "SSHFP": 44, "IPSECKEY": 45, "RRSIG": 46, "NSEC": 47, "DNSKEY": 48, "DHCID": 49,
         "NSEC3": 50, "NSEC3PARAM": 51, "TLSA": 52, "SMIMEA": 53, "HIP": 55, "CDS": 59, "CDNSKEY": 60,
         "OPENPGPKEY": 61, "SPF": 99, "NID": 104, "L32": 105, "L64": 106, "LP": 107, "EUI48": 108, "EUI64": 109,
         "URI": 256, "CAA": 257, "AVC": 258, "DOA": 259, "DLV": 32769, "TYPE1000": 1000}


def encode(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00"


def build(case: Case) -> bytes:
    """The query exactly as genreport sends it."""
    flags = (case.opcode << 11) | (0x0200 if case.tc else 0) | (0x0100 if case.rd else 0) \
        | (0x0080 if case.ra else 0) | (0x0040 if case.z else 0) | (0x0020 if case.ad else 0) \
        | (0x0010 if case.cd else 0) | (0x0400 if case.aa and case.opcode else 0)
    if case.opcode:
        return struct.pack("!HHHHHH", secrets.randbits(16), flags, 0, 0, 0, 0)  # a bare header
    if case.aa:
        flags |= 0x0400
    message = struct.pack("!HHHHHH", secrets.randbits(16), flags, 1, 0, 0, 1 if case.udpsize else 0)
    message += encode(ZONE) + struct.pack("!HH", case.qtype, 1)
    if case.udpsize:
        message += b"\x00" + struct.pack("!HHIH", 41, case.udpsize, (case.version << 16) | case.eflags,
                                         len(case.options)) + case.options
    return message


def exchange(port: int, query: bytes, tcp: bool, source: str) -> bytes:
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=3, source_address=(source, 0)) as stream:
            stream.sendall(struct.pack("!H", len(query)) + query)
            size = struct.unpack("!H", _read(stream, 2))[0]
            return _read(stream, size)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(3)
        sock.sendto(query, ("127.0.0.1", port))
        return sock.recv(65535)


def _read(stream: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.recv(size - len(data))
        assert chunk, "connection closed before the whole reply"
        data += chunk
    return data


def judge(case: Case, query: bytes, reply: bytes, over_tcp: bool) -> list[str]:
    """genreport's verdict on one reply: [] when it would say "ok", else its tags."""
    tags: list[str] = []
    if reply[:2] != query[:2]:
        return ["id-mismatch"]
    try:
        message = dns.message.from_wire(reply)
    except dns.exception.DNSException:
        return ["malformed"]
    flags = struct.unpack("!H", reply[2:4])[0]
    opcode = (flags >> 11) & 0xF
    aa, rd, ra, z, ad, cd = (bool(flags & bit) for bit in (0x0400, 0x0100, 0x0080, 0x0040, 0x0020, 0x0010))
    counts = struct.unpack("!HHHH", reply[4:12])
    seenopt = message.edns >= 0
    ednsttl = ((message.ednsflags & 0xFFFF) | (message.edns << 16) | ((message.rcode() >> 4) << 24)) if seenopt else 0
    rcode = message.rcode()
    if case.opcode:
        tags += [f"non-empty-{section}-section" for section, count in
                 zip(("question", "answer", "authority", "additional"), counts) if count]
    elif (len(message.question) != 1 or message.question[0].name.to_text().rstrip(".").lower() != ZONE
          or message.question[0].rdtype != case.qtype):
        return ["mismatch"]
    if opcode != case.opcode:
        tags.append(f"opcode{opcode}")
    if case.version == 0:
        if case.opcode == 0 and rcode != dns.rcode.NOERROR:
            tags.append(dns.rcode.to_text(rcode))
        if case.opcode and rcode != dns.rcode.NOTIMP:
            tags.append(dns.rcode.to_text(rcode))
    elif rcode != dns.rcode.BADVERS:
        tags.append(dns.rcode.to_text(rcode))
    version = (ednsttl >> 16) & 0xFF
    if seenopt and version != 0:
        tags.append("version-not-zero")
    if seenopt and ((version < case.version and rcode != dns.rcode.BADVERS)
                    or (version >= case.version and rcode == dns.rcode.BADVERS)):
        tags.append("badversion")
    if not seenopt and case.udpsize:
        tags.append("noopt")
    if seenopt and not case.udpsize:
        tags.append("opt")
    seensoa = any(rrset.rdtype == SOA and rrset.name.to_text().rstrip(".").lower() == ZONE for rrset in message.answer)
    if case.qtype == SOA and case.version == 0 and not case.ignore_tc and not seensoa and rcode == dns.rcode.NOERROR:
        tags.append("nosoa")
    if case.qtype == SOA and seensoa and (case.version != 0 or rcode != dns.rcode.NOERROR):
        tags.append("soa")
    for option in message.options:
        if option.otype == 100:
            tags.append("echoed")
        if option.otype == 10 and 16 <= len(option.to_wire()) <= 40:
            if case.cookie and option.to_wire()[:8] != CLIENT_COOKIE:
                tags.append("cookie-mismatch")
    if not aa and case.version == 0 and rcode == dns.rcode.NOERROR and case.opcode == 0:
        tags.append("noaa")
    if aa and case.opcode:
        tags.append("aa")
    if ra and case.opcode:
        tags.append("ra")
    if rd and (case.opcode or not case.rd):
        tags.append("rd")
    if not rd and case.rd and case.opcode == 0:
        tags.append("nord")
    if ad and (case.opcode or (not case.ad and not case.eflags & 0x8000)):
        tags.append("ad")
    if cd and (case.opcode or not case.cd):
        tags.append("cd")
    if z:
        tags.append("z")
    if ednsttl & 0x7FFF:
        tags.append("mbz")
    if case.ignore_tc and not over_tcp and len(reply) > (case.udpsize or 512):
        tags.append("toobig")
    return tags


@pytest.mark.parametrize("source", [STRANGER, INSTANCE], ids=["stranger", "instance"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_genreport_case(edge, case, source):
    query = build(case)
    reply = exchange(edge.port, query, case.tcp, source)
    over_tcp = case.tcp
    if not over_tcp and reply[2] & 0x02 and not case.ignore_tc:
        reply, over_tcp = exchange(edge.port, query, True, source), True  # genreport falls back to TCP
    assert judge(case, query, reply, over_tcp) == [], case.name


@pytest.mark.parametrize("qtype", list(TYPES.values()), ids=list(TYPES))
def test_genreport_type(edge, qtype):
    """The TYPE group: any type at the apex gets NOERROR or NXDOMAIN, never an error."""
    reply = exchange(edge.port, build(Case(f"type{qtype}", qtype=qtype)), False, STRANGER)
    assert reply[3] & 0xF in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    message = dns.message.from_wire(reply)
    assert message.question[0].rdtype == qtype


def test_the_judge_fails_replies_genreport_would_fail(edge):
    """The checks above bite: replies with the faults edge had or could have are not "ok"."""
    case = next(c for c in CASES if c.name == "opcodeflg")
    query = build(case)
    copied = bytearray(exchange(edge.port, query, False, INSTANCE))
    copied[2] |= 0x01  # RD copied into a NOTIMP reply
    assert "rd" in judge(case, query, bytes(copied), False)
    edns = next(c for c in CASES if c.name == "edns")
    query = build(edns)
    reply = bytearray(exchange(edge.port, query, False, STRANGER))
    reply[3] |= 0x40  # Z set
    assert "z" in judge(edns, query, bytes(reply), False)
    plain = build(CASES[0])  # the same question without OPT, judged as if it had asked with EDNS
    assert "noopt" in judge(edns, plain, exchange(edge.port, plain, False, STRANGER), False)


def _genreport() -> str | None:
    return os.environ.get("GENREPORT") or shutil.which("genreport")


@pytest.mark.skipif(_genreport() is None, reason="genreport is not installed (set $GENREPORT to run it)")
def test_genreport_itself_rates_every_test_ok(edge):
    for flags in (["-f", "-c"], ["-t"]):
        result = subprocess.run([_genreport(), "-P", str(edge.port), *flags],  # type: ignore[list-item]
                                input=f"{ZONE} ns.{ZONE} 127.0.0.1\n", capture_output=True, text=True, timeout=60)
        line = result.stdout.strip()
        assert line.startswith(f"{ZONE}. @127.0.0.1"), result.stdout + result.stderr
        results = dict(item.split("=", 1) for item in line.split(": ", 1)[1].split())
        assert results and all(value == "ok" for value in results.values()), line
