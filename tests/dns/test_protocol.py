"""Protocol correctness over real sockets: EDNS, truncation, error RCODEs, flags, TCP framing."""

from __future__ import annotations

import copy
import socket
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import pytest

from tests.dns.conftest import dig

STRANGER = "127.0.0.9"


def raw_udp(port: int, payload: bytes, source: str = "127.0.0.1", timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def query_bytes(name: str = "ip-127-0-0-1.demo.internal", rtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rtype, **kwargs).to_wire()  # type: ignore[arg-type]


def test_edns_opt_is_echoed_with_our_payload_cap(edge):
    result = dig(edge.port, "ip-127-0-0-1.demo.internal", "A", "+bufsize=4096")
    assert "udp: 1232" in result.opt
    assert "version: 0" in result.opt


def test_no_opt_without_edns(edge):
    result = dig(edge.port, "ip-127-0-0-1.demo.internal", "A", "+noedns")
    assert result.status == "NOERROR"
    assert result.opt == ""


def test_do_bit_is_echoed(edge):
    result = dig(edge.port, "ip-127-0-0-1.demo.internal", "A", "+dnssec")
    assert "flags: do" in result.opt


def test_edns_version_above_zero_is_badvers(edge):
    reply = dns.query.udp(dns.message.make_query("ip-127-0-0-1.demo.internal", "A", use_edns=1),
                          "127.0.0.1", port=edge.port, timeout=3)
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0


def test_unknown_edns_options_are_ignored(edge):
    result = dig(edge.port, "ip-127-0-0-1.demo.internal", "A", "+ednsopt=65001:abcdef")
    assert result.status == "NOERROR"
    assert result.answer == ["ip-127-0-0-1.demo.internal. 60 IN A 127.0.0.1"]


def test_two_opt_records_are_formerr(edge):
    wire = bytearray(query_bytes(use_edns=0))
    opt = bytes(wire[-11:])
    wire[10:12] = b"\x00\x02"
    reply = raw_udp(edge.port, bytes(wire) + opt)
    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR


def test_qdcount_not_one_is_formerr(edge):
    wire = bytearray(query_bytes())
    wire[4:6] = b"\x00\x02"
    reply = raw_udp(edge.port, bytes(wire))
    assert reply is not None and reply[:2] == bytes(wire[:2])
    assert reply[3] & 0xF == dns.rcode.FORMERR
    empty = bytearray(wire[:12])
    empty[4:6] = b"\x00\x00"
    reply = raw_udp(edge.port, bytes(empty))
    assert reply is not None and reply[3] & 0xF == dns.rcode.FORMERR


def test_truncated_question_is_formerr(edge):
    wire = query_bytes()
    reply = raw_udp(edge.port, wire[:20])
    assert reply is not None and reply[:2] == wire[:2]
    assert reply[3] & 0xF == dns.rcode.FORMERR


def test_unreadable_header_and_responses_are_dropped(edge):
    assert raw_udp(edge.port, b"\x12\x34\x01", timeout=0.3) is None
    response = bytearray(query_bytes())
    response[2] |= 0x80
    assert raw_udp(edge.port, bytes(response), timeout=0.3) is None
    # and the server keeps serving
    assert raw_udp(edge.port, query_bytes()) is not None


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.STATUS])
def test_other_opcodes_are_notimp(edge, opcode):
    message = dns.message.make_query("demo.internal", "SOA")
    message.set_opcode(opcode)
    reply = raw_udp(edge.port, message.to_wire())
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.rcode() == dns.rcode.NOTIMP
    assert parsed.opcode() == opcode


def test_rd_is_copied(edge):
    assert "rd" in dig(edge.port, "ip-127-0-0-1.demo.internal").flags
    assert "rd" not in dig(edge.port, "ip-127-0-0-1.demo.internal", "A", "+nordflag").flags


def test_ra_only_for_clients_offered_recursion(edge):
    assert "ra" in dig(edge.port, "ip-127-0-0-1.demo.internal", source="127.0.0.1").flags
    assert "ra" not in dig(edge.port, "ip-127-0-0-1.demo.internal", source=STRANGER).flags


def test_recursion_refused_to_strangers(edge):
    result = dig(edge.port, "example.com", "A", source=STRANGER)
    assert result.status == "REFUSED"
    assert "ra" not in result.flags and result.answer == []


def test_recursion_cidrs_extend_who_may_recurse(edge_factory):
    server = edge_factory(recursion_cidrs=("127.0.0.8/29",), upstreams=())
    # Allowed to recurse, but there is no upstream: SERVFAIL rather than REFUSED.
    result = dig(server.port, "example.com", "A", source=STRANGER)
    assert result.status == "SERVFAIL" and "ra" in result.flags
    assert dig(server.port, "example.com", "A", source="127.0.0.17").status == "REFUSED"


def big_view(demo: dict, size: int = 3000) -> dict:
    document = copy.deepcopy(demo)
    document["cloud"]["dns_records"].append({"name": "big.demo.internal", "type": "TXT", "value": "y" * size})
    return document


def test_answer_too_big_for_udp_sets_tc_and_tcp_gets_it(edge_factory, demo):
    server = edge_factory(big_view(demo))
    truncated = dig(server.port, "big.demo.internal", "TXT", "+ignore", "+bufsize=4096")
    assert "tc" in truncated.flags and truncated.answer == []
    plain = dig(server.port, "big.demo.internal", "TXT", "+ignore", "+noedns")
    assert "tc" in plain.flags
    full = dig(server.port, "big.demo.internal", "TXT")  # dig retries over TCP by itself
    assert "tc" not in full.flags and len(full.answer) == 1
    assert full.answer[0].count("y") == 3000


def test_answer_fits_a_small_client_payload_or_truncates(edge_factory, demo):
    server = edge_factory(big_view(demo, size=800))
    assert "tc" in dig(server.port, "big.demo.internal", "TXT", "+ignore", "+bufsize=512").flags
    assert "tc" not in dig(server.port, "big.demo.internal", "TXT", "+ignore", "+bufsize=1232").flags


def test_tcp_pipelined_queries_on_one_connection(edge):
    names = ["ip-127-0-0-1.demo.internal", "nope.demo.internal", "demo.example", "ip-127-0-0-2.demo.internal"]
    messages = [dns.message.make_query(name, "A") for name in names]
    payload = b"".join(struct.pack("!H", len(w)) + w for w in (m.to_wire() for m in messages))
    with socket.create_connection(("127.0.0.1", edge.port), timeout=3) as sock:
        sock.sendall(payload[:7])  # split mid-message: framing must not care
        sock.sendall(payload[7:])
        replies = {}
        buffer = b""
        while len(replies) < len(messages):
            chunk = sock.recv(65535)
            assert chunk, "connection closed early"
            buffer += chunk
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]:
                size = struct.unpack("!H", buffer[:2])[0]
                reply = dns.message.from_wire(buffer[2:2 + size])
                replies[reply.id] = reply
                buffer = buffer[2 + size:]
    for message in messages:
        assert replies[message.id].question == message.question
    assert replies[messages[1].id].rcode() == dns.rcode.NXDOMAIN
    assert replies[messages[0].id].answer[0][0].address == "127.0.0.1"


def test_tcp_idle_connections_are_closed(edge_factory):
    server = edge_factory(tcp_idle_timeout=0.3)
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < 2.5


def test_tcp_connection_cap(edge_factory):
    server = edge_factory(tcp_max_connections=2)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=3) for _ in range(2)]
    try:
        wire = query_bytes()
        for sock in held:
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            assert len(sock.recv(65535)) > 2
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as extra:
            try:
                extra.sendall(struct.pack("!H", len(wire)) + wire)
                assert extra.recv(65535) == b""
            except ConnectionResetError:
                pass  # closed by the server before or after our query arrived: either way, no answer
    finally:
        for sock in held:
            sock.close()


def test_tcp_garbage_closes_only_that_connection(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=3) as sock:
        sock.sendall(b"\x00\x03abc")
        assert sock.recv(100) == b""
    assert dig(edge.port, "ip-127-0-0-1.demo.internal", "A", "+tcp").status == "NOERROR"


def test_ipv6_listener(edge_factory):
    try:
        server = edge_factory(listen=("[::1]:0",))
    except OSError:
        pytest.skip("no IPv6 loopback")
    result = dig(server.port, "ip-127-0-0-1.demo.internal", "A", server="::1")
    assert result.status == "NOERROR"
    assert result.answer == ["ip-127-0-0-1.demo.internal. 60 IN A 127.0.0.1"]
    # ::1 is no instance: no recursion
    assert "ra" not in result.flags


def test_other_classes_and_zone_transfers_are_refused(edge):
    assert dig(edge.port, "version.bind", "TXT", "-c", "CH", source="127.0.0.1").status == "REFUSED"
    for name, rtype in [("demo.internal", "AXFR"), ("example.com", "AXFR"), ("demo.internal", "IXFR")]:
        message = dns.message.make_query(name, rtype)
        for reply in (dns.query.udp(message, "127.0.0.1", port=edge.port, timeout=3, source="127.0.0.1"),
                      dns.query.tcp(message, "127.0.0.1", port=edge.port, timeout=3, source="127.0.0.1")):
            assert reply.rcode() == dns.rcode.REFUSED


def test_tcp_client_that_never_reads_is_paused_not_buffered_forever(edge):
    wire = query_bytes()
    frame = struct.pack("!H", len(wire)) + wire
    with socket.create_connection(("127.0.0.1", edge.port), timeout=3) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        pending = b""
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            pending = pending or frame * 64
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                time.sleep(0.001)
        buffered = edge.run(lambda: max(c.transport.get_write_buffer_size() for c in edge.service.connections))
        assert buffered < 512 * 1024
        assert edge.service.stats.dropped == 0
    # and it still serves everyone else
    assert dig(edge.port, "ip-127-0-0-1.demo.internal", "A", "+tcp").status == "NOERROR"
