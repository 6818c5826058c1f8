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
    for number, message in enumerate(messages):
        message.id = number  # unique: replies are matched by id
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


# UDP listeners read a batch of waiting datagrams per wake-up (recvmmsg where the platform has it,
# recvfrom otherwise) and send the replies together: each reply must still reach its own client.

@pytest.fixture(params=["batch", "socket"])
def datagrams(request, monkeypatch):
    """Run the test with both ways of moving datagrams."""
    from edge.dns import datagrams, protocol
    if request.param == "socket":
        monkeypatch.setattr(protocol, "datagrams_for", datagrams.SocketDatagrams)
    elif datagrams._CALLS is None:
        pytest.skip("no recvmmsg/sendmmsg here")
    return request.param


def expected_rcode(query: dns.message.Message) -> int:
    name = query.question[0].name.to_text()
    return dns.rcode.NXDOMAIN if name.startswith("nope") else dns.rcode.NOERROR


def test_a_burst_from_many_clients_is_answered_to_each(edge_factory, datagrams):
    server = edge_factory()
    clients = []
    try:
        for number in range(8):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.0.0.{number % 4 + 1}", 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(3)
            clients.append((sock, {}))
        # More than one batch's worth, sent before anything is read, interleaved across clients.
        for round_ in range(40):
            for number, (sock, sent) in enumerate(clients):
                kind = (round_ + number) % 4
                if kind == 0:
                    query = dns.message.make_query(f"ip-127-0-0-{number % 4 + 1}.demo.internal", "A")
                elif kind == 1:
                    query = dns.message.make_query(f"nope{round_}.demo.internal", "A", use_edns=0)
                elif kind == 2:
                    query = dns.message.make_query("1.0.0.127.in-addr.arpa", "PTR")
                else:
                    query = dns.message.make_query("IP-127-0-0-2.demo.internal", "A", want_dnssec=True)
                query.id = round_ * 8 + number  # unique per client: replies are matched by id
                sent[query.id] = query
                sock.sendto(query.to_wire(), ("127.0.0.1", server.port))
        for sock, sent in clients:
            for _ in range(len(sent)):
                reply = dns.message.from_wire(sock.recv(4096))
                query = sent.pop(reply.id)  # an answer to this client's own question, once
                assert reply.question == query.question
                assert reply.rcode() == expected_rcode(query)
                assert (reply.edns >= 0) == (query.edns >= 0)
            assert not sent
    finally:
        for sock, _ in clients:
            sock.close()
    assert server.service.stats.udp_queries == 8 * 40


def test_a_burst_mixing_good_malformed_and_refused_queries(edge_factory, datagrams):
    server = edge_factory()
    good = dns.message.make_query("ip-127-0-0-1.demo.internal", "A")
    two_questions = bytearray(dns.message.make_query("ip-127-0-0-1.demo.internal", "A").to_wire())
    two_questions[4:6] = b"\x00\x02"
    unreadable = b"\x12\x34\x01"
    stranger = dns.message.make_query("example.com", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as outsider:
        sock.bind(("127.0.0.1", 0))
        outsider.bind((STRANGER, 0))
        for sock_ in (sock, outsider):
            sock_.settimeout(3)
        for _ in range(30):
            sock.sendto(unreadable, ("127.0.0.1", server.port))
            sock.sendto(bytes(two_questions), ("127.0.0.1", server.port))
            outsider.sendto(stranger.to_wire(), ("127.0.0.1", server.port))
            sock.sendto(good.to_wire(), ("127.0.0.1", server.port))
        rcodes = [dns.message.from_wire(sock.recv(4096)).rcode() if index % 2 == 0 else sock.recv(4096)[3] & 0xF
                  for index in range(60)]
        assert rcodes.count(dns.rcode.FORMERR) == 30 and rcodes.count(dns.rcode.NOERROR) == 30
        refused = [dns.message.from_wire(outsider.recv(4096)) for _ in range(30)]
        assert all(r.rcode() == dns.rcode.REFUSED and r.id == stranger.id for r in refused)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)  # the unreadable ones were dropped
    assert server.service.stats.dropped == 30


def test_a_large_query_is_read_whole(edge_factory, datagrams):
    server = edge_factory()
    option = dns.edns.GenericOption(65001, b"x" * 9000)
    query = dns.message.make_query("ip-127-0-0-1.demo.internal", "A", use_edns=0, options=[option])
    reply = raw_udp(server.port, query.to_wire(max_size=65535))
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.rcode() == dns.rcode.NOERROR and parsed.id == query.id
    assert parsed.answer[0][0].address == "127.0.0.1"


def test_forwarded_and_local_answers_in_one_burst(edge_factory, dnsmasq_factory, datagrams):
    from tests.dns.conftest import UPSTREAM_RECORDS
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=60)
    server = edge_factory(upstreams=(upstream.address,))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3)
        sent = {}
        for index in range(24):
            name = "www.upstream.test" if index % 3 == 0 else f"ip-127-0-0-{index % 4 + 1}.demo.internal"
            query = dns.message.make_query(name, "A")
            query.id = index  # unique: replies are matched by id
            sent[query.id] = query
            sock.sendto(query.to_wire(), ("127.0.0.1", server.port))
        for _ in range(24):
            reply = dns.message.from_wire(sock.recv(4096))
            query = sent.pop(reply.id)
            name = query.question[0].name.to_text()
            expected = "192.0.2.10" if name == "www.upstream.test." else "127.0.0." + name.split(".")[0][-1]
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0][0].address == expected


def test_ipv6_burst_from_several_clients(edge_factory, datagrams):
    try:
        server = edge_factory(listen=("[::1]:0",))
    except OSError:
        pytest.skip("no IPv6 loopback")
    clients = []
    try:
        for _ in range(4):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.bind(("::1", 0))
            sock.settimeout(3)
            clients.append((sock, {}))
        for round_ in range(20):
            for sock, sent in clients:
                query = dns.message.make_query("ip-127-0-0-1.demo.internal", "A")
                query.id = round_  # unique per client: replies are matched by id
                sent[query.id] = query
                sock.sendto(query.to_wire(), ("::1", server.port))
        for sock, sent in clients:
            for _ in range(len(sent)):
                reply = dns.message.from_wire(sock.recv(4096))
                sent.pop(reply.id)
                assert reply.answer[0][0].address == "127.0.0.1"
    finally:
        for sock, _ in clients:
            sock.close()


def test_stopping_listener_reads_and_ignores_queries(edge_factory, datagrams):
    server = edge_factory()
    server.service.closing = True  # as stop() sets it before waiting for forwarded queries
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.3)
        for _ in range(100):
            sock.sendto(query_bytes(), ("127.0.0.1", server.port))
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        # drained, so the loop is not woken again and again for the same queries
        deadline = time.monotonic() + 3
        while receive_queue(server.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receive_queue(server.port) == 0
    assert server.service.stats.udp_queries == 0


def receive_queue(port: int) -> int:
    """Bytes waiting in the receive queue of the UDP socket bound to 127.0.0.1:``port`` (/proc/net/udp)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as table:
        for line in table:
            fields = line.split()
            if fields[1] == local:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no UDP socket on port {port}")


def test_replies_after_a_batch_with_unanswered_datagrams_reach_their_own_clients(edge_factory, datagrams):
    # A batch with datagrams left unanswered packs its replies ahead of their slots; the next batch, all
    # answered, must send each reply to its own source again.
    server = edge_factory()
    clients = []
    try:
        for _ in range(6):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(3)
            clients.append(sock)
        for round_ in range(3):
            for number, sock in enumerate(clients):
                if number % 2 == 0:
                    sock.sendto(b"\x12\x34\x01", ("127.0.0.1", server.port))  # unreadable: dropped
                else:
                    sock.sendto(query_bytes(), ("127.0.0.1", server.port))
            for number, sock in enumerate(clients):
                if number % 2:
                    assert dns.message.from_wire(sock.recv(4096)).rcode() == dns.rcode.NOERROR
            for number, sock in enumerate(clients):
                query = dns.message.make_query(f"ip-127-0-0-{number % 4 + 1}.demo.internal", "A")
                query.id = round_ * 100 + number
                sock.sendto(query.to_wire(), ("127.0.0.1", server.port))
            for number, sock in enumerate(clients):
                reply = dns.message.from_wire(sock.recv(4096))
                assert reply.id == round_ * 100 + number
                assert reply.answer[0][0].address == f"127.0.0.{number % 4 + 1}"
    finally:
        for sock in clients:
            sock.close()
