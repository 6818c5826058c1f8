"""Boot storm: N instances booting at once, each doing what cloud-init does, against edge and the classic design.

Every simulated instance speaks from its own loopback address (the view puts
the instances on ``127.x.y.z``), opens a new connection for every request as
real clients do, and runs the sequence of a first boot:

1. ``PUT /latest/api/token`` (IMDSv2), then every request carries the token;
2. ``GET /`` (version probe);
3. a crawl of ``/latest/meta-data/`` following every listing to every leaf
   (``public-keys/N=name`` is followed as ``public-keys/N/``), which includes
   ``iam/security-credentials/<role>`` for instances with a role;
4. ``/latest/user-data`` and ``/latest/dynamic/instance-identity/document``;
5. an SDK picking up credentials: ``iam/security-credentials/`` then ``.../<role>``;
6. DNS over UDP from its own address: its private name, a neighbour's name,
   its PTR and one name that must be forwarded (to a local dnsmasq on loopback).

Answers are checked (instance id, addresses, user-data, identity document,
credentials, DNS answers); anything else is an error, counted and shown.
Reported per run: instances fully booted per second (N / time until the last
instance finished), p50/p99/max per HTTP request and per DNS query, errors,
server CPU per request (utime+stime of the server process trees, including
reaped helper processes such as the credential ``process`` source), and the
load generator's CPU use, as a share of its core(s) (near 100% means the
generator, not the server, set the pace) and per request.  Two ceilings put
the rates in proportion: the classic design cannot answer more than its
upstream's concurrency / delay requests per second, and no server answers
more requests on new connections than nginx ``return 200`` does under
``wrk`` on the same cores (measured first, ``--ceiling-seconds``).

    python -m bench.bootstorm [--instances 1000] [--rounds 3] [--targets edge-w1,edge-w2,classic]

Targets: ``edge-wN`` is ``edge serve --workers N`` with IAM credentials from a
``process`` source (a shell script); ``edge-wN-http`` takes them over HTTP
from the same slow central service the classic design uses; ``classic`` is
described in :mod:`bench.classic`.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import multiprocessing
import os
import random
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import (
    CorePlan,
    core_plan,
    cpu_seconds,
    free_port,
    median_range,
    percentile,
    raise_open_files_limit,
    self_cpu_seconds,
    start_dnsmasq,
    stop,
)

ROOT = Path(__file__).resolve().parent.parent
FORWARD_ZONE = "upstream.test"
FORWARDED_NAMES = 20
TOKEN_TTL = b"21600"
REQUEST_TIMEOUT = 30.0
STORM_TIMEOUT = 300.0
DNS_TIMEOUT = 1.0
DNS_ATTEMPTS = 3
REQUEST_HEADERS = b"Host: 169.254.169.254\r\nUser-Agent: Cloud-Init/bootstorm\r\nAccept: */*\r\nConnection: close\r\n"


@dataclass(frozen=True, slots=True)
class DnsQuestion:
    """One DNS question of an instance: its query as sent, and the one answer record it must get."""

    name: str
    qtype: str
    expected: str
    query: bytes
    answer_type_class: bytes
    """TYPE and CLASS the answer record must have."""
    answer_tail: bytes
    """RDLENGTH and RDATA the answer record must end the reply with."""


_QTYPES = {"A": 1, "PTR": 12}
_ONE_ANSWER_ONLY = b"\x00\x01\x00\x01\x00\x00\x00\x00"  # QDCOUNT 1, ANCOUNT 1, NSCOUNT 0, ARCOUNT 0


def wire_name(name: str) -> bytes:
    """``name`` in DNS wire format, uncompressed."""
    return b"".join(bytes((len(label),)) + label for label in name.encode().split(b".") if label) + b"\0"


def dns_question(name: str, qtype: str, expected: str, query_id: int) -> DnsQuestion:
    """The query (recursion desired, like a stub resolver's) and the answer ``expected`` would be on the wire."""
    kind = _QTYPES[qtype].to_bytes(2, "big")
    query = query_id.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + wire_name(name) + kind + b"\0\1"
    rdata = socket.inet_aton(expected) if qtype == "A" else wire_name(expected)
    return DnsQuestion(name, qtype, expected, query, kind + b"\0\1", len(rdata).to_bytes(2, "big") + rdata)


def dns_problem(question: DnsQuestion, reply: bytes) -> tuple[str, str] | None:
    """None if ``reply`` answers ``question`` with exactly the expected record, else (error kind, detail).

    Byte comparisons first: a reply with one answer record that ends in the
    expected data is right whatever its TTL and name compression; only
    anything else is parsed, to say what is wrong (or that it is right after
    all, e.g. with extra records of other types).
    """
    tail = question.answer_tail
    if (reply[4:12] == _ONE_ANSWER_ONLY and reply[3] & 0x0F == 0 and reply.endswith(tail)
            and reply[-len(tail) - 8:-len(tail) - 4] == question.answer_type_class):
        return None
    from dnslib import QTYPE, RCODE, DNSRecord

    try:
        parsed = DNSRecord.parse(reply)
    except Exception as exc:  # dnslib raises several kinds on malformed input
        return "bad answer " + type(exc).__name__, f"{question.name} {question.qtype}: {exc!r}"
    if parsed.header.rcode != RCODE.NOERROR:
        return f"dns {RCODE.get(parsed.header.rcode)}", f"{question.name} {question.qtype}"
    wanted = getattr(QTYPE, question.qtype)
    answers = [str(rr.rdata).rstrip(".") for rr in parsed.rr if rr.rtype == wanted]
    if answers == [question.expected]:
        return None
    return "wrong answer", f"{question.name} {question.qtype}: {answers} != [{question.expected}]"


@dataclass(frozen=True, slots=True)
class Machine:
    """One booting instance and what its answers must be."""

    address: str
    instance_id: str
    private_name: str
    ptr_name: str
    neighbour_name: str
    neighbour_address: str
    forwarded_name: str
    forwarded_address: str
    user_data: bytes | None
    role: str | None
    questions: tuple[DnsQuestion, ...] = ()
    """Own name, a neighbour's, the PTR of the own address, a forwarded name; built once, before any storm."""


def forwarded_address(number: int) -> str:
    return f"192.0.2.{number + 1}"


def machines_of(document: dict) -> list[Machine]:
    """The booting instances: every instance of the flat (loopback) network."""
    cloud = document["cloud"]
    template, domain = cloud["private_name_template"], cloud["internal_domain"]

    def name(address: str) -> str:
        return template.replace("{ip}", address.replace(".", "-")) + "." + domain

    flat = [i for i in document["instances"] if i["interfaces"][0]["network"] == ""]
    query_ids = random.Random(len(flat))
    out = []
    for index, instance in enumerate(flat):
        address = instance["interfaces"][0]["private_ips"][0]
        neighbour = flat[(index + 1) % len(flat)]["interfaces"][0]["private_ips"][0]
        a, b, c, d = address.split(".")
        forwarded = index % FORWARDED_NAMES
        private_name, ptr_name = name(address), f"{d}.{c}.{b}.{a}.in-addr.arpa"
        forwarded_name = f"mirror-{forwarded}.{FORWARD_ZONE}"
        questions = tuple(dns_question(n, t, e, query_ids.getrandbits(16)) for n, t, e in (
            (private_name, "A", address), (name(neighbour), "A", neighbour), (ptr_name, "PTR", private_name),
            (forwarded_name, "A", forwarded_address(forwarded))))
        out.append(Machine(
            address=address, instance_id=instance["id"], private_name=private_name, ptr_name=ptr_name,
            neighbour_name=name(neighbour), neighbour_address=neighbour, forwarded_name=forwarded_name,
            forwarded_address=forwarded_address(forwarded),
            user_data=base64.b64decode(instance["user_data"]) if instance.get("user_data") else None,
            role=(instance.get("iam") or {}).get("role"), questions=questions))
    return out


# -- the load generator ------------------------------------------------------------------------
#
# Plain non-blocking sockets on one epoll, and each boot sequence a generator
# that yields the exchange it waits for.  With asyncio's create_connection
# (a transport, a protocol, futures and task wake-ups per request) the
# generator spent about 110 us of CPU per request, more than edge spends
# answering it, so it set the pace of the storm; this path costs about half,
# most of it the kernel's own work for a TCP connection on loopback.


def response_length(buffer: bytes) -> int:
    """Length of the HTTP response at the start of ``buffer``: -1 while its head is incomplete, 0 when the head
    gives no Content-Length (the body ends with the connection)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return -1
    at = buffer.find(b"\r\nContent-Length:", 0, end)
    if at < 0:
        at = buffer[:end].lower().find(b"\r\ncontent-length:")
        if at < 0:
            return 0
    return end + 4 + int(buffer[at + 17:buffer.find(b"\r\n", at + 17)])


class Exchange:
    """One request of one instance, from its own address; ``response`` or ``error`` is set once it is over."""

    __slots__ = ("source", "program", "sock", "started", "deadline", "response", "error")

    def __init__(self, source: str) -> None:
        self.source = source
        self.program: Program | None = None
        self.sock: socket.socket | None = None
        self.started = 0.0
        self.deadline = 0.0
        self.response = b""
        self.error: Exception | None = None

    def end(self, storm: Storm, error: Exception | None = None) -> None:
        if self.sock is not None:
            storm.waiting.pop(self.sock.fileno(), None)
            self.sock.close()  # which also takes it off the epoll
            self.sock = None
        self.error = error
        storm.finished.append(self)


class HttpExchange(Exchange):
    """A request on a new connection (``Connection: close``), as cloud-init and the SDKs send them."""

    __slots__ = ("request", "unsent")

    def __init__(self, source: str, request: bytes) -> None:
        super().__init__(source)
        self.request = request
        self.unsent = b""

    def start(self, storm: Storm) -> None:
        self.sock = sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.started = time.perf_counter()
        self.deadline = self.started + REQUEST_TIMEOUT
        try:
            sock.bind((self.source, 0))
            code = sock.connect_ex(storm.metadata)
            if code and code != errno.EINPROGRESS:
                raise OSError(code, os.strerror(code))
            # On loopback the handshake is over when connect returns: send at once, wait only if it is not.
            try:
                sent = sock.send(self.request)
            except BlockingIOError:
                sent = 0
            self.unsent = self.request[sent:]
            storm.epoll.register(sock.fileno(), select.EPOLLOUT if self.unsent else select.EPOLLIN)
        except OSError as exc:
            self.end(storm, exc)
            return
        storm.waiting[sock.fileno()] = self
        storm.http_deadlines.append((self.deadline, self))

    def ready(self, storm: Storm) -> None:
        sock = self.sock
        try:
            if self.unsent:
                self.unsent = self.unsent[sock.send(self.unsent):]  # type: ignore[union-attr]
                if not self.unsent:
                    storm.epoll.modify(sock.fileno(), select.EPOLLIN)  # type: ignore[union-attr]
                return
            data = sock.recv(65536)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(storm, exc)
            return
        self.response += data
        length = response_length(self.response)
        if length > 0 and len(self.response) >= length:
            self.response = self.response[:length]
        elif data:
            return
        elif length != 0:  # closed before the whole head, or before Content-Length bytes of body
            self.end(storm, ConnectionError(
                f"connection closed after {len(self.response)} bytes of an incomplete response"))
            return
        storm.tally.http_seconds.append(time.perf_counter() - self.started)
        self.end(storm)

    def expire(self, storm: Storm) -> None:
        self.end(storm, TimeoutError(f"no complete answer within {REQUEST_TIMEOUT:g} s"))


class DnsExchange(Exchange):
    """A query over UDP from a new socket, sent again after ``DNS_TIMEOUT`` (up to ``DNS_ATTEMPTS`` times)."""

    __slots__ = ("question", "attempts")

    def __init__(self, source: str, question: DnsQuestion) -> None:
        super().__init__(source)
        self.question = question
        self.attempts = 0

    def start(self, storm: Storm) -> None:
        self.sock = sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        now = time.perf_counter()
        if not self.attempts:
            self.started = now  # a retried query's latency includes the wait before the retry
        self.attempts += 1
        self.deadline = now + DNS_TIMEOUT
        try:
            sock.bind((self.source, 0))
            sock.connect(storm.dns)
            sock.send(self.question.query)
            storm.epoll.register(sock.fileno(), select.EPOLLIN)
        except OSError as exc:
            self.end(storm, exc)
            return
        storm.waiting[sock.fileno()] = self
        storm.dns_deadlines.append((self.deadline, self))

    def ready(self, storm: Storm) -> None:
        try:
            data = self.sock.recv(4096)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(storm, exc)
            return
        if data[:2] != self.question.query[:2]:
            return  # not the answer to this query: keep waiting for it
        storm.tally.dns_seconds.append(time.perf_counter() - self.started)
        self.response = data
        self.end(storm)

    def expire(self, storm: Storm) -> None:
        storm.tally.dns_retries += 1
        storm.waiting.pop(self.sock.fileno(), None)  # type: ignore[union-attr]
        self.sock.close()  # type: ignore[union-attr]
        self.sock = None
        if self.attempts < DNS_ATTEMPTS:
            self.start(storm)
        else:
            self.end(storm, TimeoutError(f"no answer in {DNS_ATTEMPTS} tries"))


Program = Generator[Exchange, None, None]
"""A boot sequence: yields each exchange it needs, resumed once that exchange is over."""


@dataclass(slots=True)
class Tally:
    """What one load generator process saw."""

    booted: int = 0
    http_seconds: list[float] = field(default_factory=list)
    dns_seconds: list[float] = field(default_factory=list)
    dns_retries: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    finished_at: float = 0.0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(detail)


class Storm:
    """Runs programs to their end on one epoll: their exchanges in flight, and their time-outs."""

    def __init__(self, host: str, metadata_port: int, dns_port: int, tally: Tally) -> None:
        self.metadata = (host, metadata_port)
        self.dns = (host, dns_port)
        self.tally = tally
        self.epoll = select.epoll()
        self.waiting: dict[int, HttpExchange | DnsExchange] = {}
        # Every exchange of a kind has the same time-out, so its deadlines come in order: a queue, no heap.
        self.http_deadlines: deque[tuple[float, HttpExchange]] = deque()
        self.dns_deadlines: deque[tuple[float, DnsExchange]] = deque()
        self.finished: list[Exchange] = []
        self.running = 0

    def run(self, programs: Sequence[Program], timeout: float) -> int:
        """Until every program has ended or ``timeout`` seconds have passed; returns how many had not ended."""
        give_up = time.perf_counter() + timeout
        self.running = len(programs)
        for program in programs:
            self._resume(program)
        poll, waiting = self.epoll.poll, self.waiting
        try:
            while self.running:
                now = time.perf_counter()
                if now >= give_up:
                    break
                wake = min(give_up, self._expire(self.http_deadlines, now), self._expire(self.dns_deadlines, now))
                for fd, _ in poll(0 if self.finished else wake - now):
                    exchange = waiting.get(fd)
                    if exchange is not None:
                        exchange.ready(self)
                # Programs resume after the batch: a socket they open may reuse a descriptor closed in it.
                finished, self.finished = self.finished, []
                for exchange in finished:
                    self._resume(exchange.program)  # type: ignore[arg-type]
        finally:
            for exchange in list(waiting.values()):
                exchange.sock.close()  # type: ignore[union-attr]
            waiting.clear()
            self.epoll.close()
        return self.running

    def _resume(self, program: Program) -> None:
        try:
            exchange = program.send(None)
        except StopIteration:
            self.running -= 1
            self.tally.finished_at = time.time()
            return
        exchange.program = program
        exchange.start(self)  # type: ignore[attr-defined]

    def _expire(self, deadlines: deque, now: float) -> float:
        """Ends the exchanges whose time is up; returns the next deadline."""
        while deadlines:
            deadline, exchange = deadlines[0]
            if exchange.sock is not None and exchange.deadline == deadline:
                if deadline > now:
                    return deadline
                exchange.expire(self)
            deadlines.popleft()
        return now + 3600.0


class Boot:
    """The first-boot sequence of one instance."""

    __slots__ = ("machine", "tally", "token_headers", "failed")

    def __init__(self, machine: Machine, tally: Tally) -> None:
        self.machine = machine
        self.tally = tally
        self.token_headers = b""
        self.failed = False

    def http(self, method: bytes, path: bytes, tail: bytes) -> Generator[Exchange, None, bytes | None]:
        """The body of a 200 answer, or None after recording an error; ``tail`` ends the request line and
        holds the headers."""
        exchange = HttpExchange(self.machine.address, method + b" " + path + tail)
        yield exchange
        if exchange.error is not None:
            return self._fail("http " + type(exchange.error).__name__,
                              f"{self.machine.address} {method.decode()} {path.decode()}: {exchange.error!r}")
        head, _, body = exchange.response.partition(b"\r\n\r\n")
        status = head[9:12]
        if status != b"200":
            return self._fail(f"http {status.decode(errors='replace')}",
                              f"{self.machine.address} {method.decode()} {path.decode()}: {head.splitlines()[0]!r} "
                              f"{body[:80]!r}")
        return body

    def _fail(self, kind: str, detail: str) -> None:
        self.failed = True
        self.tally.error(kind, detail)
        return None

    def check(self, condition: bool, kind: str, detail: str) -> None:
        if not condition:
            self._fail(kind, f"{self.machine.address}: {detail}")

    def token(self, ttl: bytes) -> Generator[Exchange, None, bool]:
        """IMDSv2: a token, which every later request carries."""
        token = yield from self.http(b"PUT", b"/latest/api/token", b" HTTP/1.1\r\n" + REQUEST_HEADERS
                                     + b"X-aws-ec2-metadata-token-ttl-seconds: " + ttl + b"\r\n\r\n")
        if token is None:
            return False
        self.token_headers = b" HTTP/1.1\r\n" + REQUEST_HEADERS + b"X-aws-ec2-metadata-token: " + token + b"\r\n\r\n"
        return True

    def get(self, path: bytes) -> Generator[Exchange, None, bytes | None]:
        return (yield from self.http(b"GET", path, self.token_headers))

    def crawl(self, path: bytes, leaves: dict[bytes, bytes]) -> Program:
        listing = yield from self.get(path)
        if listing is None:
            return
        for line in listing.splitlines():
            if not line:
                continue
            if path.endswith(b"/public-keys/") and b"=" in line:
                line = line.split(b"=", 1)[0] + b"/"
            if line.endswith(b"/"):
                yield from self.crawl(path + line, leaves)
            else:
                body = yield from self.get(path + line)
                if body is not None:
                    leaves[path + line] = body

    def resolve(self, question: DnsQuestion) -> Program:
        exchange = DnsExchange(self.machine.address, question)
        yield exchange
        if isinstance(exchange.error, TimeoutError):
            self._fail("dns timeout", f"{self.machine.address} {question.name} {question.qtype}: {exchange.error}")
        elif exchange.error is not None:
            self._fail("dns " + type(exchange.error).__name__,
                       f"{self.machine.address} {question.name} {question.qtype}: {exchange.error!r}")
        else:
            problem = dns_problem(question, exchange.response)
            if problem is not None:
                self._fail(problem[0], f"{self.machine.address}: {problem[1]}")

    def run(self) -> Program:
        try:
            yield from self._first_boot()
        except Exception as exc:  # a malformed answer must show up as an error, not end the storm
            self._fail("bad answer " + type(exc).__name__, f"{self.machine.address}: {exc!r}")
        if not self.failed:
            self.tally.booted += 1

    def _first_boot(self) -> Program:
        m = self.machine
        if not (yield from self.token(TOKEN_TTL)):
            return
        versions = yield from self.get(b"/")
        if versions is not None:
            self.check(b"latest" in versions.split(b"\n"), "wrong answer", "version listing lacks latest")
        leaves: dict[bytes, bytes] = {}
        meta = b"/latest/meta-data/"
        yield from self.crawl(meta, leaves)
        self.check(leaves.get(meta + b"instance-id") == m.instance_id.encode(), "wrong answer", "instance-id")
        self.check(leaves.get(meta + b"local-ipv4") == m.address.encode(), "wrong answer", "local-ipv4")
        role = m.role.encode() if m.role else b""
        credentials_path = meta + b"iam/security-credentials/" + role
        if role:
            crawled = leaves.get(credentials_path, b"{}")
            self.check(json.loads(crawled).get("Code") == "Success", "wrong answer", "credentials in the crawl")
        if m.user_data is not None:
            user_data = yield from self.get(b"/latest/user-data")
            if user_data is not None:
                self.check(user_data == m.user_data, "wrong answer", "user-data")
        document = yield from self.get(b"/latest/dynamic/instance-identity/document")
        if document is not None:
            identity = json.loads(document)
            self.check(identity.get("instanceId") == m.instance_id and identity.get("privateIp") == m.address,
                       "wrong answer", "identity document")
        if role:
            roles = yield from self.get(meta + b"iam/security-credentials/")
            if roles is not None:
                self.check(roles.split() == [role], "wrong answer", f"role listing {roles!r}")
                credentials = yield from self.get(credentials_path)
                if credentials is not None:
                    self.check(json.loads(credentials).get("AccessKeyId", "") != "", "wrong answer", "credentials")
        for question in m.questions:
            yield from self.resolve(question)

    def probe(self) -> Program:
        """A token, the instance id and the own name: counts as booted when all three are right."""
        if (yield from self.token(b"60")):
            body = yield from self.get(b"/latest/meta-data/instance-id")
            self.check(body == self.machine.instance_id.encode(), "wrong answer", "instance-id")
            yield from self.resolve(self.machine.questions[0])
            if not self.failed:
                self.tally.booted += 1


def storm(machines: Sequence[Machine], host: str, metadata_port: int, dns_port: int) -> Tally:
    """All ``machines`` boot at once; returns when the last one is done."""
    tally = Tally()
    unfinished = Storm(host, metadata_port, dns_port, tally).run([Boot(m, tally).run() for m in machines],
                                                                 STORM_TIMEOUT)
    for _ in range(unfinished):
        tally.error("not finished", f"an instance was still booting after {STORM_TIMEOUT:g} s")
    if unfinished:
        tally.finished_at = time.time()
    return tally


def _storm_process(machines: Sequence[Machine], host: str, metadata_port: int, dns_port: int, start_at: float,
                   results: multiprocessing.Queue) -> None:
    raise_open_files_limit()
    time.sleep(max(0.0, start_at - time.time()))
    results.put(storm(machines, host, metadata_port, dns_port))


def run_storm(machines: Sequence[Machine], host: str, metadata_port: int, dns_port: int,
              processes: int = 1) -> tuple[Tally, float]:
    """(merged tally, seconds from the common start to the last instance booted)."""
    if processes <= 1:
        started = time.time()
        tally = storm(machines, host, metadata_port, dns_port)
        return tally, tally.finished_at - started
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = context.Queue()
    start_at = time.time() + 0.5
    shards = [machines[n::processes] for n in range(processes)]
    children = [context.Process(target=_storm_process, args=(shard, host, metadata_port, dns_port, start_at, results))
                for shard in shards]
    for child in children:
        child.start()
    tallies = [results.get(timeout=600) for _ in children]
    for child in children:
        child.join()
    merged = Tally()
    for tally in tallies:
        merged.booted += tally.booted
        merged.http_seconds += tally.http_seconds
        merged.dns_seconds += tally.dns_seconds
        merged.dns_retries += tally.dns_retries
        merged.errors.update(tally.errors)
        merged.examples += tally.examples[: max(0, 10 - len(merged.examples))]
        merged.finished_at = max(merged.finished_at, tally.finished_at)
    return merged, merged.finished_at - start_at


# -- targets -----------------------------------------------------------------------------------

@dataclass(slots=True)
class Running:
    name: str
    metadata_port: int
    dns_port: int
    processes: list[subprocess.Popen]
    server_pids: list[int]
    commands: list[str]


CREDENTIALS_SCRIPT = """#!/bin/sh
# credential_process output for the role edge asks about (fixed, far-off expiry)
printf '{"Version": 1, "AccessKeyId": "ASIA%s", "SecretAccessKey": "bootstorm-secret", \
"SessionToken": "bootstorm-token", "Expiration": "2099-01-01T00:00:00Z"}' "$EDGE_ROLE"
"""


def start_edge(workers: int, view_path: Path, directory: Path, cores: CorePlan, forward_port: int,
               credentials_url: str = "") -> Running:
    """edge serving the view; credentials from a ``process`` script, or from ``credentials_url`` when given."""
    if credentials_url:
        credentials = f'kind = "http"\nurl = "{credentials_url}"\n'
    else:
        script = directory / "credentials.sh"
        script.write_text(CREDENTIALS_SCRIPT)
        script.chmod(0o755)
        credentials = f'kind = "process"\ncommand = ["{script}"]\n'
    config = directory / f"edge-w{workers}.toml"
    config.write_text(f'[dns]\nupstreams = ["127.0.0.1:{forward_port}"]\n\n[metadata.credentials]\n{credentials}')
    metadata_port, dns_port = free_port(), free_port()
    argv = cores.pin_server([
        sys.executable, "-m", "edge", "serve", "--config", str(config), "--view", str(view_path),
        "--state-dir", str(directory / f"edge-state-w{workers}"), "--workers", str(workers), "--log-level", "warning",
        "--metadata-listen", f"127.0.0.1:{metadata_port}", "--dns-listen", f"127.0.0.1:{dns_port}",
        "--admin-listen", f"127.0.0.1:{free_port()}"])
    process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL)
    kind = "http" if credentials_url else "process"
    command = " ".join(argv) + f"   # {config.name}: dns.upstreams, metadata.credentials kind={kind}"
    return Running(f"edge --workers {workers}", metadata_port, dns_port, [process], [process.pid], [command])


def start_target(target: str, document: dict, view_path: Path, directory: Path, cores: CorePlan, forward_port: int,
                 delay: float, upstream_workers: int) -> Running:
    if target.startswith("edge-w") and target.endswith("-http"):
        # Credentials from the central service over HTTP (once per instance and role) instead of a process.
        from bench.classic import start_upstream
        upstream, port, command = start_upstream(view_path, cores, delay, upstream_workers)
        try:
            running = start_edge(int(target[6:-5]), view_path, directory, cores, forward_port,
                                 f"http://127.0.0.1:{port}/latest/meta-data/iam/security-credentials/")
        except BaseException:
            stop(upstream)
            raise
        running.name += f" (credentials over HTTP from the {delay * 1000:g} ms service)"
        running.processes.append(upstream)
        running.server_pids.append(upstream.pid)
        running.commands.append(command)
        return running
    if target.startswith("edge-w"):
        return start_edge(int(target[6:]), view_path, directory, cores, forward_port)
    if target == "classic":
        from bench.classic import start_classic
        stack = start_classic(document, view_path, directory, cores, FORWARD_ZONE, forward_port, delay,
                              upstream_workers)
        return Running(f"classic (nginx -> {delay * 1000:g} ms upstream, {upstream_workers} at a time; dnsmasq)",
                       stack.metadata_port, stack.dns_port, stack.processes, stack.server_pids, stack.commands)
    raise ValueError(f"unknown target {target!r}")


def wait_ready(running: Running, probe: Machine, timeout: float = 60.0) -> None:
    """Until the target answers the probe instance's metadata and its DNS name correctly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in running.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{running.name} exited with {process.returncode} before it was ready")
        tally = Tally()
        Storm("127.0.0.1", running.metadata_port, running.dns_port, tally).run([Boot(probe, tally).probe()], 5.0)
        if tally.booted:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{running.name} not ready within {timeout:g}s")


# -- measurement -------------------------------------------------------------------------------

@dataclass(slots=True)
class StormResult:
    target: str
    instances: int
    booted: int
    seconds: float
    boots_per_second: float
    http_requests: int
    dns_queries: int
    dns_retries: int
    http_p50_ms: float
    http_p99_ms: float
    http_max_ms: float
    dns_p50_ms: float
    dns_p99_ms: float
    dns_max_ms: float
    errors: int
    error_kinds: dict[str, int]
    error_examples: list[str]
    server_cpu_seconds: float
    server_cpu_us_per_request: float
    client_cpu_share: float
    """Load generator CPU seconds per second of storm, per generator core (1.0: saturated)."""
    client_cpu_us_per_request: float = 0.0
    """Load generator CPU (user + system, all its processes) per HTTP request and DNS query."""


def measure(running: Running, machines: Sequence[Machine], client_processes: int, client_cores: int) -> StormResult:
    server_before = cpu_seconds(running.server_pids, children=True)
    client_before = self_cpu_seconds()
    tally, seconds = run_storm(machines, "127.0.0.1", running.metadata_port, running.dns_port, client_processes)
    client_used = self_cpu_seconds() - client_before
    server_used = cpu_seconds(running.server_pids, children=True) - server_before
    http = sorted(tally.http_seconds)
    dns = sorted(tally.dns_seconds)
    requests = len(http) + len(dns)
    return StormResult(
        target=running.name, instances=len(machines), booted=tally.booted, seconds=seconds,
        boots_per_second=tally.booted / seconds if seconds > 0 else 0.0,
        http_requests=len(http), dns_queries=len(dns), dns_retries=tally.dns_retries,
        http_p50_ms=percentile(http, 0.5) * 1000, http_p99_ms=percentile(http, 0.99) * 1000,
        http_max_ms=(http[-1] if http else 0.0) * 1000,
        dns_p50_ms=percentile(dns, 0.5) * 1000, dns_p99_ms=percentile(dns, 0.99) * 1000,
        dns_max_ms=(dns[-1] if dns else 0.0) * 1000,
        errors=sum(tally.errors.values()), error_kinds=dict(tally.errors), error_examples=list(tally.examples),
        server_cpu_seconds=server_used, server_cpu_us_per_request=server_used / max(requests, 1) * 1e6,
        client_cpu_share=client_used / seconds / max(1, min(client_processes, client_cores)) if seconds > 0 else 0.0,
        client_cpu_us_per_request=client_used / max(requests, 1) * 1e6)


CEILING_CONNECTIONS = 32


def connection_ceiling(directory: Path, cores: CorePlan, seconds: float) -> float | None:
    """Requests/s of nginx ``return 200`` (one worker, on the server cores) under ``wrk`` with a new connection
    per request (on the client cores): what any server answering each request on its own connection can hope
    for on this machine. None without nginx or wrk."""
    import shutil

    from bench import metadata_load, peers

    if not (shutil.which("nginx") and shutil.which("wrk")):
        return None
    directory.mkdir(exist_ok=True)
    nginx, port = metadata_load.start_nginx(cores.server[0], directory)
    try:
        time.sleep(0.3)
        return peers.wrk(port, metadata_load.PATH, cores, seconds, CEILING_CONNECTIONS, close=True)[1]
    finally:
        stop(nginx)


@dataclass(slots=True)
class BootstormReport:
    instances: int
    rounds: int
    delay_ms: float
    upstream_workers: int
    client_processes: int
    cores: CorePlan
    results: dict[str, list[StormResult]]
    commands: list[str]
    connection_ceiling_rps: float | None = None
    """nginx ``return 200`` with a new connection per request, in the same run (see :func:`connection_ceiling`)."""

    def to_json(self) -> dict:
        return {"instances": self.instances, "rounds": self.rounds, "delay_ms": self.delay_ms,
                "upstream_workers": self.upstream_workers, "client_processes": self.client_processes,
                "server_cores": self.cores.server_list, "client_cores": self.cores.client_list,
                "connection_ceiling_rps": self.connection_ceiling_rps,
                "results": {k: [asdict(r) for r in v] for k, v in self.results.items()}, "commands": self.commands}


def run_bootstorm(instances: int = 1000, rounds: int = 3, targets: Sequence[str] = ("edge-w1", "edge-w2", "classic"),
                  delay: float = 0.010, upstream_workers: int = 64, client_processes: int | None = None,
                  cores: CorePlan | None = None, log=print, ceiling_seconds: float = 3.0) -> BootstormReport:
    """Every target ``rounds`` times (interleaved), each round on a freshly started server; first, for
    ``ceiling_seconds`` (0: not at all), the connection-per-request ceiling of the machine.

    ``client_processes`` defaults to one load generator process per client core.
    """
    from bench.generate import generate_view

    cores = cores or core_plan()
    client_processes = client_processes or len(cores.client)
    raise_open_files_limit()
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores.client)
    try:
        return _run_pinned(generate_view(instances=instances, networks=1, loopback=True), rounds, targets, delay,
                           upstream_workers, client_processes, cores, log, ceiling_seconds)
    finally:
        os.sched_setaffinity(0, affinity)


def _run_pinned(document: dict, rounds: int, targets: Sequence[str], delay: float, upstream_workers: int,
                client_processes: int, cores: CorePlan, log, ceiling_seconds: float) -> BootstormReport:
    machines = machines_of(document)
    results: dict[str, list[StormResult]] = {}
    commands: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edge-bootstorm-") as temporary:
        directory = Path(temporary)
        ceiling = None
        if ceiling_seconds > 0:
            ceiling = connection_ceiling(directory / "ceiling", cores, ceiling_seconds)
            if ceiling is not None:
                log(f"bootstorm ceiling: nginx return 200, connection per request: {ceiling:,.0f} requests/s")
                commands.append(f"taskset -c {cores.client_list} wrk -t1 -c{CEILING_CONNECTIONS} "
                                f"-d{ceiling_seconds:g}s -H 'Connection: close' against taskset -c {cores.server[0]} "
                                "nginx return 200 (config of bench/metadata_load.py)")
        view_path = directory / "view.json"
        view_path.write_text(json.dumps(document))
        forward_port = free_port()
        forwarder = start_dnsmasq(
            [f"host-record=mirror-{n}.{FORWARD_ZONE},{forwarded_address(n)}" for n in range(FORWARDED_NAMES)],
            directory, forward_port, cores.pin_client([]), ("--local-ttl=3600", f"--local=/{FORWARD_ZONE}/"))
        try:
            for round_number in range(rounds):
                for target in targets:
                    running = start_target(target, document, view_path, directory, cores, forward_port, delay,
                                           upstream_workers)
                    try:
                        wait_ready(running, machines[-1])
                        if round_number == 0:
                            commands.extend(running.commands)
                        time.sleep(0.3)
                        result = measure(running, machines, client_processes, len(cores.client))
                    finally:
                        for process in running.processes:
                            stop(process)
                    results.setdefault(target, []).append(result)
                    log(f"bootstorm round {round_number + 1}/{rounds} {running.name}: "
                        f"{result.boots_per_second:,.0f} boots/s, {result.booted}/{result.instances} booted, "
                        f"http p99 {result.http_p99_ms:.1f} ms, errors {result.errors}")
        finally:
            stop(forwarder)
    commands.append(f"taskset -c {cores.client_list} dnsmasq --port=PORT --local=/{FORWARD_ZONE}/ "
                    f"(forwarded names mirror-0..{FORWARDED_NAMES - 1}.{FORWARD_ZONE}; not measured)")
    return BootstormReport(len(machines), rounds, delay * 1000, upstream_workers, client_processes, cores, results,
                           commands, ceiling)


def ceilings(report: BootstormReport, classic_rate: float) -> list[str]:
    """What this machine allows at all: the classic design's cap, the connection-per-request ceiling, and whether
    5x the classic design (``classic_rate`` boots/s as measured; 0 if not) fits under the latter."""
    runs = [r for target_runs in report.results.values() for r in target_runs]
    complete = [r for r in runs if r.booted == r.instances and r.errors == 0] or runs
    if not runs or report.delay_ms <= 0:
        return []
    # Only HTTP requests cross the classic upstream (DNS goes to dnsmasq) or need a connection each.
    http_per_boot = statistics.median(r.http_requests / max(r.instances, 1) for r in complete)
    if http_per_boot <= 0:
        return []
    classic_cap_rps = report.upstream_workers / (report.delay_ms / 1000)
    classic_cap = classic_cap_rps / http_per_boot
    text = (f"\nCeiling, classic design: its upstream answers at most {report.upstream_workers} / "
            f"{report.delay_ms:g} ms = {classic_cap_rps:,.0f} requests/s, {classic_cap:,.1f} boots/s at "
            f"{http_per_boot:.1f} HTTP requests per boot")
    text += f" (measured: {classic_rate:,.1f})." if classic_rate else "."
    lines = [text]
    if report.connection_ceiling_rps:
        ceiling = report.connection_ceiling_rps / http_per_boot
        text = (f"\nCeiling, this machine: nginx `return 200` with a new connection per request (wrk, "
                f"{CEILING_CONNECTIONS} at a time) reached {report.connection_ceiling_rps:,.0f} requests/s in this "
                f"run, {ceiling:,.1f} boots/s (DNS queries taken as free): no server that answers each request on "
                "its own connection boots more here.")
        if classic_rate:
            wanted = 5 * classic_rate
            text += (f" 5x the classic design is {wanted:,.1f} boots/s, {wanted / ceiling:.1f}x that ceiling: "
                     + ("out of reach on this machine." if wanted > ceiling else "within reach."))
        lines.append(text)
    return lines


def storm_problems(report: BootstormReport) -> list[str]:
    """``target: problems`` for each target that was not error-free: wrong or missing answers, instances
    that did not finish booting, DNS queries that had to be sent again after a timeout."""
    found = []
    for runs in report.results.values():
        parts = []
        errors = sum(r.errors for r in runs)
        if errors:
            parts.append(f"{errors} errors")
        unbooted = sum(r.instances - r.booted for r in runs)
        if unbooted:
            parts.append(f"{unbooted} boots not completed")
        retries = sum(r.dns_retries for r in runs)
        if retries:
            parts.append(f"{retries} DNS timeouts")
        if parts:
            found.append(f"{runs[0].target}: {', '.join(parts)}")
    return found


def markdown(report: BootstormReport) -> str:
    """A table of medians (min-max) per target, with ratios to the classic design."""
    lines = [
        f"{report.instances} instances booting at once, {report.rounds} round(s) per target (fresh server each "
        f"round); servers on cpu {report.cores.server_list}, load generator ({report.client_processes} process(es)) "
        f"on cpu {report.cores.client_list}. Classic upstream: {report.delay_ms:g} ms per request, "
        f"{report.upstream_workers} requests at a time. Server CPU includes helper processes and services "
        "(credential source). Generator CPU: share of its core(s) (near 100%: the generator, not the server, set "
        "the pace) and user+system time per request.",
        "",
        "| target | booted/s median (min-max) | booted | HTTP p50 / p99 / max ms | DNS p50 / p99 / max ms "
        "| requests per boot | server CPU us/request | errors | generator CPU (us/request) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, tuple[float, float]] = {}
    for target, runs in report.results.items():
        rate, low, high = median_range([r.boots_per_second for r in runs])
        cpu = statistics.median(r.server_cpu_us_per_request for r in runs)
        medians[target] = (rate, cpu)
        per_boot = statistics.median((r.http_requests + r.dns_queries) / max(r.instances, 1) for r in runs)
        lines.append(
            f"| {runs[0].target} | {rate:,.1f} ({low:,.1f}-{high:,.1f}) | "
            f"{min(r.booted for r in runs)}/{runs[0].instances} | "
            f"{statistics.median(r.http_p50_ms for r in runs):.1f} / "
            f"{statistics.median(r.http_p99_ms for r in runs):.1f}"
            f" / {max(r.http_max_ms for r in runs):.0f} | "
            f"{statistics.median(r.dns_p50_ms for r in runs):.2f} / {statistics.median(r.dns_p99_ms for r in runs):.1f}"
            f" / {max(r.dns_max_ms for r in runs):.0f} | {per_boot:.1f} | {cpu:,.0f} | "
            f"{sum(r.errors for r in runs)} | {statistics.median(r.client_cpu_share for r in runs):.0%} "
            f"({statistics.median(r.client_cpu_us_per_request for r in runs):,.0f}) |")
    troubled = storm_problems(report)
    if troubled:
        lines.append(f"\n**INVALID: no ratio, a server was not error-free** ({'; '.join(troubled)}).")
    elif "classic" in medians:
        classic_rate, classic_cpu = medians["classic"]
        for target, (rate, cpu) in medians.items():
            if target != "classic" and classic_rate > 0 and cpu > 0:
                lines.append(f"\n{target} vs classic: {rate / classic_rate:.1f}x instances booted per second, "
                             f"{classic_cpu / cpu:.1f}x less server CPU per request.")
    lines.extend(ceilings(report, medians.get("classic", (0.0, 0.0))[0]))
    retries = [(r.target, r.dns_retries) for runs in report.results.values() for r in runs if r.dns_retries]
    if retries:
        lines.append("\nDNS queries sent again after a 1 s timeout: "
                     + "; ".join(f"{t}: {n}" for t, n in retries))
    errors = [(r.target, kind, count) for runs in report.results.values() for r in runs
              for kind, count in r.error_kinds.items()]
    if errors:
        lines.append("\nErrors: " + "; ".join(f"{t}: {k} x{c}" for t, k, c in errors))
        examples = [e for runs in report.results.values() for r in runs for e in r.error_examples][:5]
        lines.extend(f"    {example}" for example in examples)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000, help="instances booting at once (max 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per target (max 10)")
    parser.add_argument("--targets", default="edge-w1,edge-w2,classic",
                        help="edge-wN (credentials from a process), edge-wN-http (from the slow service), classic")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="classic upstream: delay per request")
    parser.add_argument("--upstream-workers", type=int, default=64,
                        help="classic upstream: requests handled at a time")
    parser.add_argument("--client-processes", type=int, help="load generator processes (default: one per core "
                        "of the load generator's half of the machine)")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0,
                        help="first measure nginx return 200 with a connection per request for this long (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    report = run_bootstorm(
        instances=max(2, min(args.instances, 5000)), rounds=max(1, min(args.rounds, 10)),
        targets=[t for t in args.targets.split(",") if t], delay=args.delay_ms / 1000,
        upstream_workers=args.upstream_workers,
        client_processes=max(1, args.client_processes) if args.client_processes else None,
        log=lambda text: print(text, file=sys.stderr, flush=True),
        ceiling_seconds=min(max(0.0, args.ceiling_seconds), 30.0))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    print(markdown(report))
    return 0 if all(r.errors == 0 for runs in report.results.values() for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
