"""edge agrees with NSD serving the same data (one horizon): RCODE, flags and every section.

The zone files are generated from the snapshot as the flat network sees it,
NSD runs on a free loopback port, and the same questions go to both servers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from edge.dns.zonefile import zone_texts
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from tests.dns.conftest import delegating_document, free_port

pytestmark = pytest.mark.skipif(shutil.which("nsd") is None, reason="nsd not installed")

NETWORK = ""
QUESTIONS = [
    ("ip-127-0-0-1.demo.internal", "A"),
    ("IP-127-0-0-2.Demo.Internal", "A"),
    ("ip-127-0-0-1.demo.internal", "AAAA"),
    ("ip-127-0-0-1.demo.internal", "MX"),
    ("nope.demo.internal", "A"),
    ("deeper.nope.demo.internal", "TXT"),
    ("demo.internal", "SOA"),
    ("demo.internal", "NS"),
    ("demo.internal", "A"),
    ("demo.example", "SOA"),
    ("demo.example", "NS"),
    ("demo.example", "MX"),
    ("demo.example", "TXT"),
    ("demo.example", "AAAA"),
    ("mail.demo.example", "A"),
    ("ec2-198-51-100-1.demo.example", "A"),
    ("ec2-198-51-100-2.demo.example", "A"),
    ("ec2-198-51-100-11.demo.example", "A"),
    ("ec2-198-51-100-99.demo.example", "A"),
    ("www.demo.example", "A"),
    ("www.demo.example", "CNAME"),
    ("www.demo.example", "TXT"),
    ("gateway.demo.internal", "A"),
    ("_ldap._tcp.demo.internal", "SRV"),
    ("_tcp.demo.internal", "SRV"),
    ("1.0.0.127.in-addr.arpa", "PTR"),
    ("4.0.0.127.in-addr.arpa", "PTR"),
    ("9.0.0.127.in-addr.arpa", "PTR"),
    ("0.0.127.in-addr.arpa", "PTR"),
    ("127.in-addr.arpa", "SOA"),
    ("127.in-addr.arpa", "NS"),
    ("1.100.51.198.in-addr.arpa", "PTR"),
    ("11.100.51.198.in-addr.arpa", "PTR"),
    ("77.100.51.198.in-addr.arpa", "PTR"),
    ("100.51.198.in-addr.arpa", "SOA"),
]


def zone_files(directory: Path, document: dict | None = None) -> list[str]:
    texts = zone_texts(build_snapshot(parse_view(document or demo_document())), NETWORK)
    for apex, text in texts.items():
        (directory / f"{apex}.zone").write_text(text)
    return list(texts)


@pytest.fixture(scope="module")
def nsd_port(tmp_path_factory):
    yield from run_nsd(tmp_path_factory.mktemp("nsd"), demo_document())


@pytest.fixture(scope="module")
def nsd_delegating_port(tmp_path_factory):
    yield from run_nsd(tmp_path_factory.mktemp("nsd-cut"), delegating_document())


def run_nsd(directory: Path, document: dict):
    apexes = zone_files(directory, document)
    port = free_port()
    config = directory / "nsd.conf"
    config.write_text(f"""server:
  ip-address: 127.0.0.1@{port}
  port: {port}
  do-ip6: no
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "{directory}"
  database: ""
  zonelistfile: "{directory}/zone.list"
  xfrdfile: "{directory}/xfrd.state"
  pidfile: "{directory}/nsd.pid"
  logfile: "{directory}/nsd.log"
  minimal-responses: yes
  refuse-any: no
  verbosity: 1
remote-control:
  control-enable: no
""" + "".join(f"zone:\n  name: {apex}\n  zonefile: {apex}.zone\n" for apex in apexes))
    process = subprocess.Popen(["nsd", "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            dns.query.udp(dns.message.make_query("demo.internal", "SOA"), "127.0.0.1", port=port, timeout=0.2)
            break
        except (dns.exception.Timeout, OSError):
            if process.poll() is not None:
                pytest.fail(f"nsd exited: {process.stderr.read().decode()} {(directory / 'nsd.log').read_text()}")
    try:
        yield port
    finally:  # also when the caller close()s the generator instead of running it to its end
        process.terminate()
        process.wait(5)


def summary(reply: dns.message.Message) -> tuple:
    def section(rrsets):
        return sorted(line for rrset in rrsets for line in rrset.to_text().splitlines())
    flags = reply.flags & (dns.flags.QR | dns.flags.AA | dns.flags.TC | dns.flags.RD)
    return (dns.rcode.to_text(reply.rcode()), dns.flags.to_text(flags), section(reply.answer),
            section(reply.authority), section(reply.additional), reply.edns, reply.payload if reply.edns >= 0 else 0)


@pytest.mark.parametrize("name,rtype", QUESTIONS)
@pytest.mark.parametrize("edns", [False, True])
def test_same_answer_as_nsd(edge, nsd_port, name, rtype, edns):
    kwargs = {"use_edns": 0, "payload": 1232} if edns else {"use_edns": False}
    query = dns.message.make_query(name, rtype, **kwargs)
    ours = dns.query.udp(query, "127.0.0.1", port=edge.port, timeout=3, source="127.0.0.9")
    theirs = dns.query.udp(query, "127.0.0.1", port=nsd_port, timeout=3)
    assert summary(ours) == summary(theirs)


def test_same_answer_as_nsd_over_tcp(edge, nsd_port):
    for name, rtype in QUESTIONS[:8]:
        query = dns.message.make_query(name, rtype)
        ours = dns.query.tcp(query, "127.0.0.1", port=edge.port, timeout=3, source="127.0.0.9")
        theirs = dns.query.tcp(query, "127.0.0.1", port=nsd_port, timeout=3)
        assert summary(ours) == summary(theirs)


@pytest.mark.parametrize("name,rtype", [("host.sub.demo.example", "A"), ("sub.demo.example", "NS"),
                                        ("sub.demo.example", "A"), ("ns1.sub.demo.example", "A"),
                                        ("www.sub.demo.example", "A"), ("a.b.sub.demo.example", "TXT"),
                                        ("demo.example", "SOA"), ("other.demo.example", "A")])
def test_same_referral_as_nsd_at_a_zone_cut(edge_factory, nsd_delegating_port, name, rtype):
    server = edge_factory(delegating_document())
    query = dns.message.make_query(name, rtype, use_edns=0, payload=1232)
    query.flags &= ~dns.flags.RD  # an iterative question, as a resolver asks
    ours = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3, source="127.0.0.9")
    theirs = dns.query.udp(query, "127.0.0.1", port=nsd_delegating_port, timeout=3)
    assert summary(ours) == summary(theirs)


def test_kdig_sees_the_same(edge, nsd_port):
    if shutil.which("kdig") is None:
        pytest.skip("kdig not installed")

    def kdig(port: int, name: str, rtype: str) -> list[str]:
        output = subprocess.run(["kdig", "@127.0.0.1", "-p", str(port), name, rtype, "+noall", "+answer",
                                 "+authority", "+time=2", "+retry=0"], capture_output=True, text=True, timeout=10)
        return sorted(output.stdout.split("\n"))

    for name, rtype in [("www.demo.example", "A"), ("nope.demo.internal", "A"), ("1.0.0.127.in-addr.arpa", "PTR")]:
        assert kdig(edge.port, name, rtype) == kdig(nsd_port, name, rtype)



