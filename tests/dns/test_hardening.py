"""Issue 12 hardening: answers before the first view, OPT checks on both paths, NOTIMP flags, junk metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from edge.config import DnsConfig
from edge.dns.acl import RecursionPolicy
from edge.dns.engine import Engine
from edge.dns.forwarder import Forwarder
from edge.dns.zonedata import make_preparer
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from tests.dns.conftest import UPSTREAM_RECORDS, delegating_document
from tests.dns.test_protocol import query_bytes, raw_udp
from tests.support import free_port, serve_argv, wait_until

NAME = "ip-127-0-0-1.demo.internal"


def engine() -> Engine:
    config = DnsConfig()
    return Engine(config, Forwarder(config), RecursionPolicy())


SNAPSHOT = build_snapshot(parse_view(demo_document()), [make_preparer()])


# -- item 8: no view, no answer ---------------------------------------------------------------------

def test_engine_without_any_view_answers_servfail_with_ede_not_ready(caplog):
    pure = engine()
    for _ in range(3):
        reply = pure.answer(query_bytes(NAME, use_edns=0), None, "", "127.0.0.1", 1.0)
        message = dns.message.from_wire(reply)
        assert message.rcode() == dns.rcode.SERVFAIL
        assert [(o.otype, o.code) for o in message.options] == [(dns.edns.OptionType.EDE, 14)]
    plain = dns.message.from_wire(pure.answer(query_bytes(NAME), None, "", "127.0.0.1", 1.0))
    assert plain.rcode() == dns.rcode.SERVFAIL and plain.edns < 0
    assert pure.not_ready == 4
    assert sum("no view loaded yet" in r.getMessage() for r in caplog.records) == 1
    # Once a view arrives, it is answered from.
    answered = dns.message.from_wire(pure.answer(query_bytes(NAME), SNAPSHOT, "", "127.0.0.1", 2.0))
    assert answered.answer[0][0].address == "127.0.0.1"


class Server:
    """``edge serve`` in one process, with its own ports, state directory and log."""

    def __init__(self, tmp_path, view: str) -> None:
        self.dns, self.metadata, self.admin = free_port(), free_port(), free_port()
        self.log = open(tmp_path / "edge.log", "w+")
        args = serve_argv(tmp_path / "state", view=view, metadata_port=self.metadata, dns_port=self.dns,
                          admin_port=self.admin, extra=("--poll-interval", "0.2"))
        self.process = subprocess.Popen(args, stderr=self.log, start_new_session=True)

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> str:
        with socket.create_connection(("127.0.0.1", self.admin), timeout=3) as connection:
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
        return data.partition(b"\r\n\r\n")[2].decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.log.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def test_a_gateway_whose_first_view_is_rejected_answers_servfail_not_ready(tmp_path, servers):
    view = tmp_path / "view.json"
    broken = demo_document()
    broken["instances"][0]["interfaces"][0]["private_ips"] = ["not an address"]
    view.write_text(json.dumps(broken))
    server = Server(tmp_path, str(view))
    servers.append(server)
    query = dns.message.make_query(NAME, "A", use_edns=0)

    def servfail() -> bool:
        reply = dns.query.udp(query, "127.0.0.1", port=server.dns, timeout=1)
        return reply.rcode() == dns.rcode.SERVFAIL

    wait_until(servfail, timeout=20)
    for use_tcp in (False, True):
        ask = dns.query.tcp if use_tcp else dns.query.udp
        reply = ask(query, "127.0.0.1", port=server.dns, timeout=3)
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert [(o.otype, o.code) for o in reply.options] == [(dns.edns.OptionType.EDE, 14)]
        assert not reply.flags & dns.flags.RA
    wait_until(lambda: 'edge_dns_not_ready_total{protocol="dns"}' in server.metrics(), timeout=10)
    assert server.logs().count("no view loaded yet") == 1
    # The control plane publishes a good view: the same gateway answers.
    good = demo_document()
    good["serial"] = broken["serial"] + 1
    view.write_text(json.dumps(good))

    def answered() -> bool:
        reply = dns.query.udp(query, "127.0.0.1", port=server.dns, timeout=1)
        return reply.rcode() == dns.rcode.NOERROR and reply.answer[0][0].address == "127.0.0.1"

    wait_until(answered, timeout=20)


# -- item 13: the OPT RDLEN on the fast path -------------------------------------------------------

def _opt_claiming(rdlen: int, options: bytes = b"") -> bytes:
    wire = bytearray(query_bytes(NAME, use_edns=0))
    assert wire[-11:-6] == b"\x00\x00\x29\x04\xd0"  # root, OPT, payload 1232
    wire[-2:] = rdlen.to_bytes(2, "big")
    return bytes(wire) + options


@pytest.mark.parametrize("packet", [
    _opt_claiming(8),  # eight bytes of options claimed, none present
    _opt_claiming(4, b"\x00\x0a\x00\x08"),  # one option header whose length runs past the RDATA
    _opt_claiming(6, b"\x00\x0a\x00\x08\x01\x02"),
    _opt_claiming(3, b"\x00\x0a\x00"),  # an option header cut short
], ids=["rdlen-without-data", "option-past-rdata", "option-partly-past-rdata", "option-header-cut"])
def test_a_bad_opt_rdata_is_formerr_on_both_paths(edge, packet):
    for source in ("127.0.0.1", "127.0.0.9"):  # a memoized local name, and the same from a stranger
        for _ in range(2):  # the second time the answer is in the memo: the fast path's turn
            reply = raw_udp(edge.port, packet, source=source)
            assert reply is not None
            assert reply[3] & 0xF == dns.rcode.FORMERR, (source, reply)
    # the pure engine agrees with the listener
    pure = engine()
    assert pure.answer(packet, SNAPSHOT, "", "127.0.0.1", 1.0)[3] & 0xF == dns.rcode.FORMERR


def test_well_formed_options_still_pass(edge):
    packet = _opt_claiming(8, b"\xfd\xe9\x00\x04abcd")
    reply = dns.message.from_wire(raw_udp(edge.port, packet))
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0][0].address == "127.0.0.1"


# -- item 14: NOTIMP clears RD and CD --------------------------------------------------------------

@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.9"])
def test_notimp_clears_rd_cd_and_ra(edge, source):
    query = dns.message.make_query(NAME, "A")
    query.set_opcode(dns.opcode.STATUS)
    query.flags |= dns.flags.RD | dns.flags.CD
    reply = dns.message.from_wire(raw_udp(edge.port, query.to_wire(), source=source))
    assert reply.rcode() == dns.rcode.NOTIMP
    assert reply.opcode() == dns.opcode.STATUS
    assert not reply.flags & (dns.flags.RD | dns.flags.CD | dns.flags.RA | dns.flags.AA)
    header_only = bytearray(query.to_wire()[:12])
    header_only[2] = 0x78 | 0x01  # opcode 15, RD
    header_only[3] = 0x10  # CD
    header_only[4:6] = b"\x00\x00"
    reply = raw_udp(edge.port, bytes(header_only), source=source)
    assert reply[2] == 0x80 | 0x78 and reply[3] == dns.rcode.NOTIMP


# -- item 15: answers to junk are their own family -------------------------------------------------

def test_formerr_and_notimp_are_counted_as_invalid(tmp_path, servers):
    server = Server(tmp_path, "demo")
    servers.append(server)
    wait_until(lambda: dns.query.udp(dns.message.make_query(NAME, "A"), "127.0.0.1", port=server.dns,
                                     timeout=1).rcode() == dns.rcode.NOERROR, timeout=20)
    two_questions = bytearray(query_bytes(NAME))
    two_questions[4:6] = b"\x00\x02"
    update = dns.message.make_query(NAME, "A")
    update.set_opcode(dns.opcode.STATUS)
    for _ in range(3):
        assert raw_udp(server.dns, bytes(two_questions))[3] & 0xF == dns.rcode.FORMERR
        assert raw_udp(server.dns, update.to_wire())[3] & 0xF == dns.rcode.NOTIMP
    expected = ('edge_requests_total{family="invalid",protocol="dns",status="FORMERR"} 3.0',
                'edge_requests_total{family="invalid",protocol="dns",status="NOTIMP"} 3.0')
    wait_until(lambda: all(line in server.metrics() for line in expected), timeout=10)
    assert 'family="recursive",protocol="dns",status="FORMERR"' not in server.metrics()
    assert 'edge_requests_total{family="local",protocol="dns",status="NOERROR"} 1.0' in server.metrics()


# -- item 9: one source cannot take every TCP slot, and trickled bytes do not hold one ----------------

def _tcp_query(port: int, source: str) -> dns.message.Message:
    query = dns.message.make_query(NAME, "A")
    return dns.query.tcp(query, "127.0.0.1", port=port, timeout=3, source=source)


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_an_attacker_holding_tcp_slots_does_not_lock_others_out(edge_factory):
    server = edge_factory(tcp_max_connections=8, tcp_max_connections_per_source=3, tcp_message_timeout=1.0,
                          tcp_idle_timeout=60.0)
    attacker: list[socket.socket] = []
    try:
        for _ in range(8):
            sock = socket.socket()
            sock.bind(("127.0.0.5", 0))
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"\x00")  # the first byte of a length prefix, and then nothing whole
            attacker.append(sock)
        # Only three of the attacker's connections are kept; the others are closed on accept.
        wait_until(lambda: sum(_closed_by_server(s) for s in attacker) >= 5, timeout=10)
        assert server.run(lambda: server.service.tcp_per_source.get("127.0.0.5")) == 3
        # Everyone else still gets answers over TCP while the attacker holds its slots.
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.9"):
            assert _tcp_query(server.port, source).rcode() == dns.rcode.NOERROR
        # Trickling a byte at a time does not extend the message deadline: the slots come back.
        held = [s for s in attacker if not _closed_by_server(s)]
        assert len(held) == 3

        sent = {sock: 1 for sock in held}

        def trickle_until_closed() -> bool:
            for sock in held:
                try:
                    # The second length byte announces 64 bytes; then one byte of them per round.
                    sock.send(b"\x40" if sent[sock] == 1 else b"\x00", socket.MSG_DONTWAIT)
                    sent[sock] += 1
                except OSError:
                    pass
            return all(_closed_by_server(sock) for sock in held)

        wait_until(trickle_until_closed, timeout=15, interval=0.2)
        assert server.service.stats.tcp_message_timeouts >= 3
        assert all(count < 64 for count in sent.values())  # closed before the message could be finished
        wait_until(lambda: server.run(lambda: "127.0.0.5" not in server.service.tcp_per_source), timeout=5)
    finally:
        for sock in attacker:
            sock.close()


# -- item 16: the accept backlog --------------------------------------------------------------------

def _listen_backlog(port: int) -> int:
    """The accept queue size of the TCP listener on ``port`` (``ss`` shows it as Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def test_dns_tcp_listener_backlog_defaults_to_the_metadata_one_and_is_configurable(tmp_path, servers, edge_factory):
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    assert _listen_backlog(edge_factory().port) == min(2048, somaxconn)
    assert _listen_backlog(edge_factory(listen_backlog=700).port) == min(700, somaxconn)
    os.environ["EDGE_METADATA_LISTEN_BACKLOG"] = "333"
    os.environ["EDGE_DNS_LISTEN_BACKLOG"] = "444"
    try:
        server = Server(tmp_path, "demo")
    finally:
        del os.environ["EDGE_METADATA_LISTEN_BACKLOG"], os.environ["EDGE_DNS_LISTEN_BACKLOG"]
    servers.append(server)
    wait_until(lambda: _listen_backlog(server.dns) == 444 and _listen_backlog(server.metadata) == 333, timeout=20)


# -- item 12: odd labels under a local zone are still local ----------------------------------------

ODD_NAMES = [dns.name.Name([b"a.b", b"demo", b"internal", b""]),
             dns.name.Name([b"caf\xc3\xa9", b"demo", b"internal", b""]),
             dns.name.Name([b"x", b"\xff", b"ip-127-0-0-1", b"demo", b"internal", b""])]


@pytest.mark.parametrize("name", ODD_NAMES, ids=["dot", "utf8", "byte-ff-inside"])
def test_a_label_with_a_dot_or_non_ascii_byte_under_a_local_zone_is_nxdomain(edge_factory, name):
    server = edge_factory(upstreams=("127.0.0.1:9",))  # any upstream query would be noticed (and fail)
    for source in ("127.0.0.1", "127.0.0.9"):  # an instance (may recurse) and a stranger
        for _ in range(2):
            reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=server.port, timeout=3,
                                  source=source)
            assert reply.rcode() == dns.rcode.NXDOMAIN, source
            assert reply.flags & dns.flags.AA
            assert [(r.name.to_text(), r.rdtype) for r in reply.authority] == [("demo.internal.", dns.rdatatype.SOA)]
    assert server.service.forwarder.stats.upstream_queries == 0


def test_odd_labels_outside_local_zones_are_still_not_local():
    pure = engine()
    name = dns.name.Name([b"a.b", b"example", b"com", b""])
    wire = dns.message.make_query(name, "A").to_wire()
    reply = dns.message.from_wire(pure.answer(wire, SNAPSHOT, "", "127.0.0.9", 1.0))
    assert reply.rcode() == dns.rcode.REFUSED  # not local, and a stranger may not recurse
    forward = pure.answer(wire, SNAPSHOT, "", "127.0.0.1", 1.0)
    assert forward.query.name == b"\x03a.b\x07example\x03com\x00"  # an instance's goes upstream


# -- item 11: an NS record below an apex is a zone cut ----------------------------------------------

@pytest.mark.parametrize("name,rtype", [("host.sub.demo.example", "A"), ("sub.demo.example", "NS"),
                                        ("www.sub.demo.example", "A"), ("a.b.sub.demo.example", "TXT")])
def test_names_at_or_below_a_zone_cut_get_a_referral_without_aa(edge_factory, name, rtype):
    server = edge_factory(delegating_document())
    for _ in range(2):
        reply = dns.query.udp(dns.message.make_query(name, rtype), "127.0.0.1", port=server.port, timeout=3,
                              source="127.0.0.9")
        assert reply.rcode() == dns.rcode.NOERROR
        assert not reply.flags & dns.flags.AA
        assert reply.answer == []
        assert [(r.name.to_text(), r.rdtype) for r in reply.authority] == [("sub.demo.example.", dns.rdatatype.NS)]
        assert sorted(r.target.to_text() for r in reply.authority[0]) == ["ns.elsewhere.test.", "ns1.sub.demo.example."]
        assert [(r.name.to_text(), [a.address for a in r]) for r in reply.additional] == [
            ("ns1.sub.demo.example.", ["192.0.2.53"])]
    # The parent zone itself is still answered authoritatively.
    apex = dns.query.udp(dns.message.make_query("demo.example", "SOA"), "127.0.0.1", port=server.port, timeout=3,
                         source="127.0.0.9")
    assert apex.flags & dns.flags.AA and apex.answer[0].rdtype == dns.rdatatype.SOA


def test_names_below_a_zone_cut_are_forwarded_for_clients_that_recurse(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory("--address=/host.sub.demo.example/192.0.2.77")
    server = edge_factory(delegating_document(), upstreams=(upstream.address,))
    for _ in range(2):
        reply = dns.query.udp(dns.message.make_query("host.sub.demo.example", "A"), "127.0.0.1", port=server.port,
                              timeout=3, source="127.0.0.1")
        assert reply.rcode() == dns.rcode.NOERROR
        assert not reply.flags & dns.flags.AA and reply.flags & dns.flags.RA
        assert [a.address for a in reply.answer[0]] == ["192.0.2.77"]
    assert server.service.forwarder.stats.cache_hits >= 1  # the second came from the cache
    # An instance that does not ask for recursion gets the referral.
    norec = dns.message.make_query("host.sub.demo.example", "A")
    norec.flags &= ~dns.flags.RD
    reply = dns.query.udp(norec, "127.0.0.1", port=server.port, timeout=3, source="127.0.0.1")
    assert reply.answer == [] and reply.authority[0].rdtype == dns.rdatatype.NS


# -- item 10: a local CNAME to a name outside the local zones is chased -----------------------------

def _with_outside_aliases(document: dict) -> dict:
    document["cloud"]["dns_records"] += [
        {"name": "alias.demo.example", "type": "CNAME", "value": "host.upstream.test", "ttl": 300},
        {"name": "twice.demo.internal", "type": "CNAME", "value": "alias.demo.example", "ttl": 300},
        {"name": "gone.demo.example", "type": "CNAME", "value": "missing.upstream.test", "ttl": 300},
    ]
    return document


def test_a_local_cname_to_an_outside_name_is_chased_and_cached(edge_factory, dnsmasq_factory, demo):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=300)
    server = edge_factory(_with_outside_aliases(demo), upstreams=(upstream.address,))
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    resolver.lifetime = 5
    answer = resolver.resolve("alias.demo.example", "A", source="127.0.0.1")  # a stub: NoAnswer before the fix
    assert [r.address for r in answer] == ["192.0.2.11"]
    assert answer.canonical_name.to_text() == "host.upstream.test."
    for use_tcp in (False, True):
        reply = (dns.query.tcp if use_tcp else dns.query.udp)(
            dns.message.make_query("twice.demo.internal", "AAAA", use_edns=0), "127.0.0.1", port=server.port,
            timeout=3, source="127.0.0.1")
        assert reply.rcode() == dns.rcode.NOERROR
        assert [(r.name.to_text(), r.rdtype) for r in reply.answer] == [
            ("twice.demo.internal.", dns.rdatatype.CNAME), ("alias.demo.example.", dns.rdatatype.CNAME),
            ("host.upstream.test.", dns.rdatatype.AAAA)]
        assert [r.address for r in reply.answer[2]] == ["2001:db8::11"]
        assert reply.flags & dns.flags.RA and not reply.flags & dns.flags.AA
    # The target's answer is cached: with the upstream gone the chain is still answered.
    upstream.stop()
    reply = dns.query.udp(dns.message.make_query("alias.demo.example", "A"), "127.0.0.1", port=server.port,
                          timeout=3, source="127.0.0.1")
    assert [r.address for r in reply.answer[-1]] == ["192.0.2.11"]


def test_a_chased_cname_keeps_the_rcode_of_the_last_name(edge_factory, dnsmasq_factory, demo):
    upstream = dnsmasq_factory()  # authoritative for upstream.test, where missing.upstream.test does not exist
    server = edge_factory(_with_outside_aliases(demo), upstreams=(upstream.address,))
    reply = dns.query.udp(dns.message.make_query("gone.demo.example", "A"), "127.0.0.1", port=server.port,
                          timeout=3, source="127.0.0.1")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert [(r.name.to_text(), r.rdtype) for r in reply.answer] == [("gone.demo.example.", dns.rdatatype.CNAME)]


def test_a_cname_to_an_outside_name_alone_for_strangers_and_without_rd(edge_factory, dnsmasq_factory, demo):
    upstream = dnsmasq_factory("--host-record=host.upstream.test,192.0.2.11")
    server = edge_factory(_with_outside_aliases(demo), upstreams=(upstream.address,))
    stranger = dns.query.udp(dns.message.make_query("alias.demo.example", "A"), "127.0.0.1", port=server.port,
                             timeout=3, source="127.0.0.9")
    norec = dns.message.make_query("alias.demo.example", "A")
    norec.flags &= ~dns.flags.RD
    instance = dns.query.udp(norec, "127.0.0.1", port=server.port, timeout=3, source="127.0.0.1")
    for reply in (stranger, instance):
        assert reply.flags & dns.flags.AA
        assert [(r.name.to_text(), r.rdtype) for r in reply.answer] == [("alias.demo.example.", dns.rdatatype.CNAME)]
    assert not stranger.flags & dns.flags.RA
    assert server.service.forwarder.stats.upstream_queries == 0


def test_a_chased_answer_from_the_cache_counts_its_ttl_down():
    from edge.dns.engine import Forward

    document = _with_outside_aliases(demo_document())
    snapshot = build_snapshot(parse_view(document), [make_preparer()])
    config = DnsConfig()
    pure = Engine(config, Forwarder(config, clock=lambda: 1000.0), RecursionPolicy())  # answer stored at 1000
    wire = dns.message.make_query("twice.demo.internal", "A").to_wire()
    forward = pure.answer(wire, snapshot, "", "127.0.0.1", 1000.0)
    assert isinstance(forward, Forward) and forward.query.name == b"\x04host\x08upstream\x04test\x00"
    upstream = dns.message.make_response(dns.message.make_query("host.upstream.test", "A"))
    upstream.answer.append(dns.rrset.from_text("host.upstream.test.", 300, "IN", "A", "192.0.2.11"))
    pure.forwarder.cache[forward.query.key + b"\x00"] = pure.forwarder._entry(
        upstream.to_wire(), len(forward.query.question), pure.forwarder.settings)
    ttls = []
    for now in (1000.2, 1000.7, 1010.0):
        reply = dns.message.from_wire(pure.answer(wire, snapshot, "", "127.0.0.1", now))
        assert [r.rdtype for r in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.CNAME, dns.rdatatype.A]
        ttls.append(reply.answer[2].ttl)
    assert ttls == [300, 300, 290]


def test_a_reload_keeps_the_backlog_and_says_so(edge_factory, caplog):
    server = edge_factory(listen_backlog=300)
    config = server.config
    server.run(lambda: server.service.reload(dataclasses.replace(
        config, dns=dataclasses.replace(config.dns, listen_backlog=900, tcp_max_connections_per_source=5))))
    assert _listen_backlog(server.port) == min(300, int(open("/proc/sys/net/core/somaxconn").read()))
    assert "new listen_backlog applies at the next restart" in caplog.text
    assert server.service.config.dns.tcp_max_connections_per_source == 5  # the other limits apply at once


def test_a_burst_of_new_connections_waits_in_the_accept_queue(edge_factory):
    """400 connections arrive while the server is busy: all complete their handshake and wait to be accepted."""
    server = edge_factory(tcp_max_connections=4096, tcp_max_connections_per_source=4096)
    busy = threading.Event()
    release = threading.Event()

    def hold_the_loop() -> None:
        busy.set()
        release.wait(20)

    server.loop.call_soon_threadsafe(hold_the_loop)
    assert busy.wait(5)
    burst = []
    try:
        for _ in range(400):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", server.port))
            burst.append(sock)

        def connected() -> int:
            _, writable, _ = select.select([], burst, [], 0)
            return sum(1 for sock in writable if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)

        # With asyncio's default backlog (100) the rest stay unanswered (their SYNs dropped) until edge accepts.
        wait_until(lambda: connected() == len(burst), timeout=5)
    finally:
        release.set()
        for sock in burst:
            sock.close()
    assert _tcp_query(server.port, "127.0.0.1").rcode() == dns.rcode.NOERROR
