"""Replies kept whole for a repeated UDP question (edge.dns.engine.ReplyMemos): each reply is still the reply
to its own query, its ID, the question as spelt, RD, EDNS, DO and payload size, its asker's recursion, the
current view and, for a cached upstream answer, TTLs that count down and an entry that is still fresh."""

from __future__ import annotations

import socket
import time

import dns.flags
import dns.message
import dns.rcode
import pytest

from tests.dns.conftest import UPSTREAM_RECORDS
from tests.dns.test_protocol import STRANGER, big_view, raw_udp
from tests.support import wait_until

NAME = "ip-127-0-0-1.demo.internal"


def ask(port: int, query: dns.message.Message, source: str = "127.0.0.1") -> tuple[bytes, dns.message.Message]:
    reply = raw_udp(port, query.to_wire(), source=source, timeout=3)
    assert reply is not None
    return reply, dns.message.from_wire(reply)


def query_for(name: str = NAME, rtype: str = "A", query_id: int = 1, **kwargs: object) -> dns.message.Message:
    query = dns.message.make_query(name, rtype, **kwargs)  # type: ignore[arg-type]
    query.id = query_id
    return query


def test_a_repeated_question_gets_its_own_id_and_the_same_reply(edge_factory):
    server = edge_factory()
    replies = [ask(server.port, query_for(query_id=query_id))[0] for query_id in (1, 0xBEEF, 0, 0xFFFF, 7)]
    assert [int.from_bytes(reply[:2], "big") for reply in replies] == [1, 0xBEEF, 0, 0xFFFF, 7]
    assert len({reply[2:] for reply in replies}) == 1
    assert dns.message.from_wire(replies[-1]).answer[0][0].address == "127.0.0.1"
    assert server.service.stats.udp_queries == 5


def test_each_spelling_of_a_name_is_echoed_as_asked(edge_factory):
    server = edge_factory()
    for name in (NAME, NAME.upper(), "Ip-127-0-0-1.Demo.Internal", NAME, NAME.upper()):
        query = query_for(name)
        raw, reply = ask(server.port, query)
        question = query.to_wire()[12:]
        assert raw[12:12 + len(question)] == question  # the question exactly as the client spelt it
        assert reply.question[0].name.to_text() == name + "."
        assert reply.answer[0][0].address == "127.0.0.1"


@pytest.mark.parametrize("order", ["plain first", "edns first"])
def test_edns_do_and_rd_of_each_query_are_answered_in_kind(edge_factory, order):
    server = edge_factory()
    variants = [dict(use_edns=False), dict(use_edns=0), dict(use_edns=0, want_dnssec=True),
                dict(use_edns=0, payload=4096), dict(use_edns=False, flags=0)]
    if order == "edns first":
        variants.reverse()
    for _ in range(2):  # the second round is answered from what the first kept
        for variant in variants:
            _, reply = ask(server.port, query_for(**variant))
            assert (reply.edns >= 0) == (variant["use_edns"] is not False)
            assert bool(reply.ednsflags & dns.flags.DO) == bool(variant.get("want_dnssec"))
            assert bool(reply.flags & dns.flags.RD) == (variant.get("flags", dns.flags.RD) != 0)
            if reply.edns >= 0:
                assert reply.payload == 1232  # ours, whatever the client offered
            assert reply.answer[0][0].address == "127.0.0.1"


def test_a_truncated_reply_follows_each_querys_payload(edge_factory, demo):
    server = edge_factory(big_view(demo, size=800))
    for _ in range(2):
        for payload, truncated in ((512, True), (4096, False), (None, True), (1232, False)):
            extra = dict(use_edns=False) if payload is None else dict(use_edns=0, payload=payload)
            raw, reply = ask(server.port, query_for("big.demo.internal", "TXT", **extra))
            assert bool(reply.flags & dns.flags.TC) == truncated
            assert (len(reply.answer) == 0) == truncated
            assert len(raw) <= (payload or 512) or not truncated


def test_recursion_is_offered_per_asker_not_per_question(edge_factory):
    server = edge_factory()
    for source, recursion in (("127.0.0.1", True), (STRANGER, False), ("127.0.0.1", True), (STRANGER, False)):
        _, reply = ask(server.port, query_for(), source=source)
        assert bool(reply.flags & dns.flags.RA) == recursion
        assert reply.answer[0][0].address == "127.0.0.1"


def test_a_new_view_replaces_the_kept_replies(edge_factory, demo):
    server = edge_factory(demo)
    for _ in range(2):
        assert ask(server.port, query_for("mail.demo.example"))[1].answer[0][0].address == "198.51.100.25"
    changed = dict(demo, serial=demo["serial"] + 1)
    changed["cloud"] = dict(demo["cloud"], dns_records=[
        dict(record, value="198.51.100.99") if record["name"] == "mail.demo.example" else record
        for record in demo["cloud"]["dns_records"]])
    server.load(changed)
    assert ask(server.port, query_for("mail.demo.example"))[1].answer[0][0].address == "198.51.100.99"


def test_a_reload_replaces_the_kept_replies(edge_factory):
    from edge.config import Config, DnsConfig

    server = edge_factory()
    assert ask(server.port, query_for(use_edns=0))[1].payload == 1232
    ask(server.port, query_for(use_edns=0))
    server.run(lambda: server.service.reload(Config(dns=DnsConfig(listen=server.config.dns.listen,
                                                                   edns_payload=1400))))
    assert ask(server.port, query_for(use_edns=0))[1].payload == 1400


def test_cached_upstream_answers_count_their_ttl_down_and_count_as_cache_hits(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=60)
    server = edge_factory(upstreams=(upstream.address,))
    first = ask(server.port, query_for("www.upstream.test", query_id=1))[1]
    assert first.answer[0][0].address == "192.0.2.10"
    stats = server.service.forwarder.stats
    hits = stats.cache_hits
    for query_id in range(2, 12):
        raw, reply = ask(server.port, query_for("www.upstream.test", query_id=query_id))
        assert reply.id == query_id and reply.answer[0][0].address == "192.0.2.10"
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.RA
    assert stats.cache_hits == hits + 10
    assert stats.upstream_queries == 1

    def ttl() -> int:
        return ask(server.port, query_for("www.upstream.test", query_id=99))[1].answer[0].ttl

    wait_until(lambda: ttl() < first.answer[0].ttl, timeout=5)
    # spelt otherwise, with EDNS: the same cached entry, echoed as asked
    _, mixed = ask(server.port, query_for("WWW.Upstream.TEST", use_edns=0))
    assert mixed.question[0].name.to_text() == "WWW.Upstream.TEST." and mixed.edns == 0
    assert stats.upstream_queries == 1


def test_an_expired_upstream_answer_is_not_replayed(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=1)
    server = edge_factory(upstreams=(upstream.address,), cache_min_ttl=0)
    stats = server.service.forwarder.stats
    for _ in range(3):
        assert ask(server.port, query_for("www.upstream.test"))[1].answer[0][0].address == "192.0.2.10"
    asked = stats.upstream_queries
    deadline = time.monotonic() + 5

    def asked_again() -> bool:
        ask(server.port, query_for("www.upstream.test"))
        return stats.upstream_queries > asked

    wait_until(asked_again, timeout=max(0.1, deadline - time.monotonic()))


def test_a_burst_of_one_question_from_many_ports_is_answered_to_each(edge_factory):
    server = edge_factory()
    sockets = []
    try:
        for _ in range(16):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(3)
            sockets.append(sock)
        for round_ in range(8):
            for number, sock in enumerate(sockets):
                sock.sendto(query_for(query_id=round_ * 16 + number).to_wire(), ("127.0.0.1", server.port))
        for number, sock in enumerate(sockets):
            ids = sorted(dns.message.from_wire(sock.recv(4096)).id for _ in range(8))
            assert ids == [round_ * 16 + number for round_ in range(8)]
    finally:
        for sock in sockets:
            sock.close()
