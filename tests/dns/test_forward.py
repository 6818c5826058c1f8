"""Forwarding to real upstream resolvers on loopback: cache, TTLs, TCP on TC, failover, serve-stale, poisoning."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import dns.message
import dns.query
import dns.rcode
import dns.rrset
import pytest

from tests.dns.conftest import UPSTREAM_RECORDS, big_txt_record, dig, free_port

INSTANCE = "127.0.0.1"


def ask(port: int, name: str, rtype: str = "A", tcp: bool = False, timeout: float = 5) -> dns.message.Message:
    query = dns.message.make_query(name, rtype)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=timeout, source=INSTANCE)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=timeout, source=INSTANCE)


def test_forwards_names_outside_local_zones(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=60)
    server = edge_factory(upstreams=(upstream.address,))
    result = dig(server.port, "www.upstream.test", "A", source=INSTANCE)
    assert result.status == "NOERROR"
    assert "ra" in result.flags and "aa" not in result.flags
    assert result.answer == ["www.upstream.test. 60 IN A 192.0.2.10"]
    assert dig(server.port, "host.upstream.test", "AAAA", source=INSTANCE).answer == [
        "host.upstream.test. 60 IN AAAA 2001:db8::11"]
    alias = dig(server.port, "ALIAS.upstream.TEST", "A", source=INSTANCE)
    assert alias.answer[-1] == "host.upstream.test. 60 IN A 192.0.2.11"
    assert "ALIAS.upstream.TEST." in alias.raw  # question case kept


def test_view_upstream_resolvers_are_used(edge_factory, dnsmasq_factory, demo):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS)
    demo["cloud"]["upstream_resolvers"] = [upstream.address]
    server = edge_factory(demo)
    assert dig(server.port, "www.upstream.test", source=INSTANCE).answer[0].endswith("192.0.2.10")


def test_cache_answers_when_upstream_is_gone_and_ttl_counts_down(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=60)
    server = edge_factory(upstreams=(upstream.address,))
    first = ask(server.port, "www.upstream.test")
    assert first.answer[0].ttl == 60
    upstream.stop()
    time.sleep(1.1)
    cached = ask(server.port, "www.upstream.test")
    assert [r.address for r in cached.answer[0]] == ["192.0.2.10"]
    assert 57 <= cached.answer[0].ttl <= 59
    assert server.service.forwarder.stats.upstream_queries == 1


def test_cache_key_includes_type_and_do_bit(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=60)
    server = edge_factory(upstreams=(upstream.address,))
    ask(server.port, "host.upstream.test", "A")
    ask(server.port, "host.upstream.test", "AAAA")
    dns.query.udp(dns.message.make_query("host.upstream.test", "A", want_dnssec=True), "127.0.0.1",
                  port=server.port, timeout=3, source=INSTANCE)
    assert server.service.forwarder.stats.upstream_queries == 3


def test_ttl_clamps(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=5)
    server = edge_factory(upstreams=(upstream.address,), cache_min_ttl=120, cache_max_ttl=300)
    assert ask(server.port, "www.upstream.test").answer[0].ttl == 120
    upstream2 = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=3600)
    server2 = edge_factory(upstreams=(upstream2.address,), cache_max_ttl=300)
    assert ask(server2.port, "www.upstream.test").answer[0].ttl == 300


def test_negative_answers_are_cached(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS)
    server = edge_factory(upstreams=(upstream.address,))
    assert ask(server.port, "missing.upstream.test").rcode() == dns.rcode.NXDOMAIN
    upstream.stop()
    assert ask(server.port, "missing.upstream.test").rcode() == dns.rcode.NXDOMAIN
    assert server.service.forwarder.stats.upstream_queries == 1


def test_truncated_upstream_answer_is_retried_over_tcp(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(big_txt_record("big.upstream.test"), ttl=60)
    server = edge_factory(upstreams=(upstream.address,))
    over_tcp = ask(server.port, "big.upstream.test", "TXT", tcp=True)
    assert over_tcp.rcode() == dns.rcode.NOERROR
    assert sum(len(s) for s in over_tcp.answer[0][0].strings) == 1600
    assert server.service.forwarder.stats.tcp_retries == 1
    # Over UDP the client gets TC from the cache and retries over TCP itself.
    result = dig(server.port, "big.upstream.test", "TXT", "+ignore", source=INSTANCE)
    assert "tc" in result.flags


def test_failover_past_a_dead_and_a_silent_upstream(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    dead_port = free_port()
    try:
        server = edge_factory(upstreams=(f"127.0.0.1:{dead_port}", f"127.0.0.1:{silent.getsockname()[1]}",
                                         upstream.address), upstream_timeout=0.5)
        reply = ask(server.port, "www.upstream.test")
        assert [r.address for r in reply.answer[0]] == ["192.0.2.10"]
        stats = server.service.forwarder.stats
        assert stats.upstream_failures == 2
        # Failed upstreams are tried last for a while: the next miss goes straight to the good one.
        ask(server.port, "host.upstream.test")
        assert stats.upstream_failures == 2
    finally:
        silent.close()


def test_serve_stale_when_every_upstream_fails_then_servfail(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=1)
    server = edge_factory(upstreams=(upstream.address,), serve_stale=2.0, stale_ttl=30)
    assert ask(server.port, "www.upstream.test").answer[0].ttl == 1
    upstream.stop()
    time.sleep(1.2)
    stale = ask(server.port, "www.upstream.test")
    assert stale.rcode() == dns.rcode.NOERROR
    assert [r.address for r in stale.answer[0]] == ["192.0.2.10"]
    assert stale.answer[0].ttl == 30
    assert server.service.forwarder.stats.served_stale == 1
    time.sleep(2.0)
    assert ask(server.port, "www.upstream.test").rcode() == dns.rcode.SERVFAIL


def test_upstream_death_and_return(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=1)
    server = edge_factory(upstreams=(upstream.address,), serve_stale=0.0)
    assert ask(server.port, "host.upstream.test").rcode() == dns.rcode.NOERROR
    upstream.stop()
    time.sleep(1.1)
    assert ask(server.port, "host.upstream.test").rcode() == dns.rcode.SERVFAIL
    upstream.start()
    assert ask(server.port, "host.upstream.test").rcode() == dns.rcode.NOERROR


@dataclasses.dataclass
class ScriptedUpstream:
    """A UDP 'resolver' in a thread: counts queries, waits, and answers with forged replies first."""

    delay: float = 0.0
    forge: bool = False
    queries: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.sources: list[int] = []
        self.ids: list[int] = []
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.queries += 1
            query = dns.message.from_wire(data)
            self.sources.append(addr[1])
            self.ids.append(query.id)
            time.sleep(self.delay)
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.99"))
            if self.forge:
                wrong_id = dns.message.make_response(query)
                wrong_id.id = (query.id + 1) % 65536
                wrong_id.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "6.6.6.6"))
                self.sock.sendto(wrong_id.to_wire(), addr)
                other = dns.message.make_query("evil.example", "A")
                other.id = query.id
                forged = dns.message.make_response(other)
                forged.answer.append(dns.rrset.from_text("evil.example.", 60, "IN", "A", "6.6.6.6"))
                self.sock.sendto(forged.to_wire(), addr)
            self.sock.sendto(reply.to_wire(), addr)

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def scripted():
    made: list[ScriptedUpstream] = []

    def make(**kwargs):
        upstream = ScriptedUpstream(**kwargs)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


def test_single_flight_sends_one_upstream_query_for_a_burst(edge_factory, scripted):
    upstream = scripted(delay=0.4)
    server = edge_factory(upstreams=(f"127.0.0.1:{upstream.port}",))
    socks = []
    try:
        for index in range(20):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((INSTANCE, 0))
            sock.settimeout(3)
            message = dns.message.make_query("burst.example", "A")
            sock.sendto(message.to_wire(), ("127.0.0.1", server.port))
            socks.append((sock, message))
        for sock, message in socks:
            reply = dns.message.from_wire(sock.recv(4096))
            assert reply.id == message.id
            assert [r.address for r in reply.answer[0]] == ["192.0.2.99"]
    finally:
        for sock, _ in socks:
            sock.close()
    assert upstream.queries == 1
    assert server.service.forwarder.stats.coalesced == 19


def test_forged_upstream_replies_are_ignored(edge_factory, scripted):
    upstream = scripted(forge=True)
    server = edge_factory(upstreams=(f"127.0.0.1:{upstream.port}",))
    reply = ask(server.port, "victim.example")
    assert [r.address for r in reply.answer[0]] == ["192.0.2.99"]
    assert server.service.forwarder.stats.mismatched >= 2


def test_upstream_queries_use_random_ids_and_ports(edge_factory, scripted):
    upstream = scripted()
    server = edge_factory(upstreams=(f"127.0.0.1:{upstream.port}",))
    for index in range(8):
        ask(server.port, f"name{index}.example")
    assert len(set(upstream.sources)) >= 7
    assert len(set(upstream.ids)) >= 7


def test_reload_changes_upstreams_and_keeps_the_cache(edge_factory, dnsmasq_factory, scripted):
    first = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=60)
    second = scripted()
    server = edge_factory(upstreams=(first.address,))
    ask(server.port, "www.upstream.test")
    config = dataclasses.replace(server.config, dns=dataclasses.replace(
        server.config.dns, upstreams=(f"127.0.0.1:{second.port}",)))
    server.run(lambda: server.service.reload(config))
    assert [r.address for r in ask(server.port, "www.upstream.test").answer[0]] == ["192.0.2.10"]  # cached
    assert [r.address for r in ask(server.port, "fresh.example").answer[0]] == ["192.0.2.99"]
    assert second.queries == 1


def test_stop_lets_forwarded_queries_in_flight_finish(edge_factory, scripted):
    upstream = scripted(delay=0.5)
    server = edge_factory(upstreams=(f"127.0.0.1:{upstream.port}",))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((INSTANCE, 0))
        sock.settimeout(3)
        message = dns.message.make_query("slow.example", "A")
        sock.sendto(message.to_wire(), ("127.0.0.1", server.port))
        time.sleep(0.1)
        started = time.monotonic()
        server.call(server.service.stop(2.0))
        assert time.monotonic() - started < 1.5
        reply = dns.message.from_wire(sock.recv(4096))
    assert reply.id == message.id and [r.address for r in reply.answer[0]] == ["192.0.2.99"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # listeners are closed now
        sock.settimeout(0.3)
        sock.sendto(message.to_wire(), ("127.0.0.1", server.port))
        with pytest.raises(OSError):
            sock.recv(4096)


def test_extended_dns_errors_for_edns_clients(edge_factory, dnsmasq_factory):
    upstream = dnsmasq_factory(*UPSTREAM_RECORDS, ttl=1)
    server = edge_factory(upstreams=(upstream.address,), serve_stale=30.0)
    refused = dig(server.port, "example.com", "A", source="127.0.0.9")
    assert refused.status == "REFUSED" and "EDE: 18" in refused.raw
    dig(server.port, "www.upstream.test", source=INSTANCE)
    upstream.stop()
    time.sleep(1.2)
    stale = dig(server.port, "www.upstream.test", source=INSTANCE)
    assert stale.status == "NOERROR" and "EDE: 3" in stale.raw and stale.answer[0].split()[1] == "30"
    failed = dig(server.port, "never-seen.upstream.test", source=INSTANCE)
    assert failed.status == "SERVFAIL" and "EDE: 22" in failed.raw
    assert "EDE" not in dig(server.port, "example.com", "A", "+noedns", source="127.0.0.9").raw
