"""Fuzz the real listeners of a running edge: DNS over UDP and TCP, the metadata and admin HTTP listeners.

    python -m bench.fuzz_listeners [--seconds 60] [--seed 1] [--targets dns-udp,dns-tcp,metadata,admin]

One ``edge serve --workers 1`` process is started on the demo view with its own free loopback ports
and state directory.  For each target, bursts of inputs made by a seeded mutator from valid
messages (bit flips, cut tails, inserted and overwritten bytes, repeated and spliced ranges, lying
length prefixes, TCP streams cut into random pieces, requests pipelined and abandoned half way) are
sent for the time budget.  After every burst the server must still answer a valid query correctly,
over the same transport, and the resident memory of its process must stay within a bound of where
it started.  Every reply read during a burst is checked too: a DNS reply must be a response
carrying the ID of a query that was sent, a TCP stream must stay correctly framed, an HTTP answer
must start with a status line and never be a 500.  Rate limits are off in the fuzzed server so that every input
reaches the parsers.  The same code runs for a few seconds per target in the test suite
(``tests/test_listener_fuzz.py``); this script gives it a longer budget.  Traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import free_port

ROOT = Path(__file__).resolve().parent.parent

INSTANCE = "127.0.0.1"
INSTANCE_ID = b"i-0de0000000000001"
LOCAL_NAME = "ip-127-0-0-1.demo.internal"
FUZZ_SOURCES = ("127.0.0.2", "127.0.0.4", "127.0.0.9")
"""Sources the inputs come from: two instances of the demo view and a stranger."""
MEMORY_GROWTH_LIMIT = 64 * 1024 * 1024
"""Resident memory a burst may leave behind (bytes): bounded caches, not the inputs, should explain it."""
TARGETS = ("dns-udp", "dns-tcp", "metadata", "admin")


class Server:
    """One ``edge serve`` process with its own ports, state directory and log."""

    def __init__(self, directory: Path) -> None:
        self.dns, self.metadata, self.admin = free_port(), free_port(), free_port()
        self.log_path = directory / "edge.log"
        self.log = open(self.log_path, "w+")
        env = {**os.environ, "EDGE_DNS_RATE_LIMIT": "0", "EDGE_METADATA_RATE": "0",
               "EDGE_METADATA_UNKNOWN_SOURCE_WAIT": "0.05", "EDGE_LOG_LEVEL": "warning"}
        args = [sys.executable, "-m", "edge", "serve", "--view", "demo", "--workers", "1",
                "--state-dir", str(directory / "state"),
                "--dns-listen", f"127.0.0.1:{self.dns}", "--metadata-listen", f"127.0.0.1:{self.metadata}",
                "--admin-listen", f"127.0.0.1:{self.admin}"]
        self.process = subprocess.Popen(args, stderr=self.log, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"edge exited at start:\n{self.logs()}")
            try:
                if check_admin(self) is None and check_dns_udp(self) is None:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"edge did not start:\n{self.logs()}")

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


# -- inputs --------------------------------------------------------------------------------------

def _name(text: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in text.split(".") if label) + b"\x00"


def _dns_query(name: str, qtype: int, flags: int = 0x0100, opt: bytes | None = None, qid: int = 0x1234) -> bytes:
    message = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if opt is not None else 0)
    message += _name(name) + struct.pack("!HH", qtype, 1)
    if opt is not None:
        message += opt
    return message


def _opt(payload: int = 1232, flags: int = 0, options: bytes = b"", version: int = 0) -> bytes:
    return b"\x00" + struct.pack("!HHIH", 41, payload, (version << 16) | flags, len(options)) + options


DNS_SEEDS = [
    _dns_query(LOCAL_NAME, 1),
    _dns_query(LOCAL_NAME, 28, opt=_opt()),
    _dns_query("www.demo.example", 1, opt=_opt(4096, 0x8000)),
    _dns_query("demo.example", 255, opt=_opt(512)),
    _dns_query("1.0.0.127.in-addr.arpa", 12),
    _dns_query("nope.demo.internal", 16, opt=_opt(options=b"\x00\x0a\x00\x08abcdefgh")),
    _dns_query("demo.internal", 6, flags=0, opt=_opt(options=b"\x00\x03\x00\x00\x00\x08\x00\x04\x00\x01\x00\x00")),
    _dns_query("_ldap._tcp.demo.internal", 33, flags=0x0110),
    _dns_query("example.com", 1, opt=_opt(version=1)),
    _dns_query("instance-data", 1),
    struct.pack("!HHHHHH", 0x4242, 0x7800, 0, 0, 0, 0),  # opcode 15, a bare header
]

METADATA_SEEDS = [
    b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
    b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: keep-alive\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n",
    b"GET /latest/meta-data/local-hostname HTTP/1.1\r\nX-aws-ec2-metadata-token: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    b"AAAAAAAAAAAAAAAAAAAAAAAAA\r\n\r\n",
    b"GET /latest/dynamic/instance-identity/document HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 127.0.0.4\r\n\r\n",
    b"HEAD /2009-04-04/meta-data/network/interfaces/macs/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /latest/user-data HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\n\r\n",
    b"PUT /latest/api/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-aws-ec2-metadata-token-ttl-seconds: 5"
    b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
]

ADMIN_SEEDS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /view HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n",
    b"HEAD /metrics HTTP/1.0\r\n\r\n",
    b"POST /view HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
]


def mutate(rng: random.Random, seed: bytes, seeds: list[bytes]) -> bytes:
    """One to eight random edits of ``seed``: the inputs that get past a first glance."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        action = rng.randrange(8)
        position = rng.randrange(len(data) + 1)
        if action == 0 and data:
            data[min(position, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif action == 1:
            del data[position:]
        elif action == 2:
            data[position:position] = rng.randbytes(rng.randint(1, 16))
        elif action == 3 and data:
            data[min(position, len(data) - 1)] = rng.choice((0, 0xFF, 0x7F, 0x80, 0xC0, 0x2E, 0x0A, 0x0D, 0x3A))
        elif action == 4 and data:
            end = min(len(data), position + rng.randint(1, 32))
            data[position:position] = data[position:end] * rng.randint(1, 64)
        elif action == 5:
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            data[position:] = other[cut:]
        elif action == 6:
            data[position:position] = b"\xc0" + bytes([rng.randrange(256)])  # a compression pointer anywhere
        else:
            data[position:position] = rng.choice((b"\r\n", b"\r\n\r\n", b": ", b"%00", b"/..", b" HTTP/1.1"))
    return bytes(data[:65535])


# -- checks of a healthy server ------------------------------------------------------------------

def check_dns_udp(server: Server) -> str | None:
    """None if a valid UDP query gets the right answer, else what went wrong."""
    query = _dns_query(LOCAL_NAME, 1, opt=_opt(), qid=0x5151)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((INSTANCE, 0))
        sock.connect(("127.0.0.1", server.dns))  # connected: a closed port is reported at once
        sock.settimeout(1.0)
        for _ in range(5):  # UDP: a reply may be lost under load
            try:
                sock.send(query)
                reply = sock.recv(65535)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                return "nothing listens on the DNS port"
            return _check_local_answer(reply, 0x5151)
    return "no UDP answer"


def check_dns_tcp(server: Server) -> str | None:
    query = _dns_query(LOCAL_NAME, 1, qid=0x6161)
    with socket.create_connection(("127.0.0.1", server.dns), timeout=3, source_address=(INSTANCE, 0)) as stream:
        stream.sendall(struct.pack("!H", len(query)) + query)
        size = struct.unpack("!H", _read_exactly(stream, 2))[0]
        return _check_local_answer(_read_exactly(stream, size), 0x6161)


def _check_local_answer(reply: bytes, qid: int) -> str | None:
    if len(reply) < 12 or struct.unpack("!H", reply[:2])[0] != qid or not reply[2] & 0x80:
        return f"not a reply to the query: {reply[:16]!r}"
    if reply[3] & 0xF != 0 or struct.unpack("!H", reply[6:8])[0] != 1 or b"\x00\x04\x7f\x00\x00\x01" not in reply:
        return f"wrong answer: {reply!r}"  # NOERROR, one answer, an A record of 127.0.0.1
    return None


def check_metadata(server: Server) -> str | None:
    status, body = http_exchange(server.metadata, b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n"
                                 b"Connection: close\r\n\r\n", INSTANCE)
    return None if (status, body) == (200, INSTANCE_ID) else f"metadata answered {status} {body[:80]!r}"


def check_admin(server: Server) -> str | None:
    status, body = http_exchange(server.admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                 "127.0.0.1")
    return None if status == 200 else f"admin answered {status} {body[:80]!r}"


def http_exchange(port: int, request: bytes, source: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=3, source_address=(source, 0)) as connection:
        connection.sendall(request)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _read_exactly(stream: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed before the whole reply")
        data += chunk
    return data


# -- bursts ----------------------------------------------------------------------------------------

@dataclass
class Tally:
    target: str
    inputs: int = 0
    replies: int = 0
    bursts: int = 0
    anomalies: list[str] = field(default_factory=list)
    rss_start: int = 0
    rss_peak: int = 0

    def anomaly(self, text: str) -> None:
        if len(self.anomalies) < 20:
            self.anomalies.append(text)


def burst_dns_udp(server: Server, rng: random.Random, tally: Tally, budget: float) -> None:
    deadline = time.monotonic() + budget
    sockets = []
    for source in FUZZ_SOURCES:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        sockets.append(sock)
    sent_ids: set[bytes] = set()
    try:
        while time.monotonic() < deadline:
            for _ in range(64):
                data = mutate(rng, rng.choice(DNS_SEEDS), DNS_SEEDS)
                if len(data) >= 2:
                    sent_ids.add(data[:2])
                try:
                    rng.choice(sockets).sendto(data, ("127.0.0.1", server.dns))
                    tally.inputs += 1
                except OSError:
                    pass  # a full send buffer: the next round drains it
            time.sleep(0.002)
            _drain_udp(sockets, sent_ids, tally)
        time.sleep(0.05)
        _drain_udp(sockets, sent_ids, tally)
    finally:
        for sock in sockets:
            sock.close()


def _drain_udp(sockets: list[socket.socket], sent_ids: set[bytes], tally: Tally) -> None:
    for sock in sockets:
        while True:
            try:
                reply = sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                break
            tally.replies += 1
            if len(reply) < 12 or not reply[2] & 0x80 or reply[:2] not in sent_ids:
                tally.anomaly(f"udp reply that answers nothing sent: {reply[:24]!r}")
            elif len(reply) > 1232 and not reply[2] & 0x02:
                tally.anomaly(f"udp reply of {len(reply)} bytes")


def burst_dns_tcp(server: Server, rng: random.Random, tally: Tally, budget: float) -> None:
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        messages = []
        for _ in range(rng.randint(1, 12)):
            data = mutate(rng, rng.choice(DNS_SEEDS), DNS_SEEDS)
            length = len(data) if rng.random() < 0.85 else rng.randrange(65536)  # sometimes a lying prefix
            messages.append(struct.pack("!H", length) + data)
        stream = b"".join(messages)
        if rng.random() < 0.2:
            stream = stream[:rng.randrange(len(stream) + 1)]  # abandoned half way
        try:
            with socket.create_connection(("127.0.0.1", server.dns), timeout=2,
                                          source_address=(rng.choice(FUZZ_SOURCES), 0)) as connection:
                send_in_pieces(connection, stream, rng, 200)
                tally.inputs += len(messages)
                connection.shutdown(socket.SHUT_WR)
                connection.settimeout(0.3)
                _read_tcp_replies(connection, tally)
        except OSError:
            pass  # closed by the server (a stream it could not trust): allowed


def send_in_pieces(connection: socket.socket, stream: bytes, rng: random.Random, largest: int) -> None:
    """Send ``stream`` in pieces of 1 to ``largest`` bytes, as a slow or fragmenting client would."""
    position = 0
    while position < len(stream):
        step = rng.randint(1, largest)
        connection.sendall(stream[position:position + step])
        position += step


def _read_tcp_replies(connection: socket.socket, tally: Tally) -> None:
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    position = 0
    while position + 2 <= len(received):
        size = struct.unpack("!H", received[position:position + 2])[0]
        reply = received[position + 2:position + 2 + size]
        if len(reply) < size:
            tally.anomaly(f"tcp reply cut short: {size} announced, {len(reply)} sent")
            return
        if size < 12 or not reply[2] & 0x80:
            tally.anomaly(f"tcp frame that is not a DNS reply: {reply[:24]!r}")
            return
        tally.replies += 1
        position += 2 + size
    if position != len(received):
        tally.anomaly(f"tcp stream ends inside a length prefix ({len(received) - position} bytes)")


def burst_http(port: int, seeds: list[bytes], rng: random.Random, tally: Tally, budget: float) -> None:
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        requests = [mutate(rng, rng.choice(seeds), seeds) if rng.random() < 0.9 else rng.choice(seeds)
                    for _ in range(rng.randint(1, 4))]
        stream = b"".join(requests)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2,
                                          source_address=(rng.choice(FUZZ_SOURCES), 0)) as connection:
                send_in_pieces(connection, stream, rng, 600)
                tally.inputs += len(requests)
                if rng.random() < 0.7:
                    connection.shutdown(socket.SHUT_WR)
                connection.settimeout(0.2)
                received = b""
                try:
                    while chunk := connection.recv(65536):
                        received += chunk
                except (TimeoutError, ConnectionResetError):
                    pass
                if received:
                    tally.replies += 1
                    if not received.startswith(b"HTTP/1."):
                        tally.anomaly(f"an answer without a status line: {received[:40]!r}")
                    elif b"HTTP/1.1 500 " in received or b"HTTP/1.0 500 " in received:
                        # Bad input gets a 4xx; a 500 is the server failing on it.
                        tally.anomaly(f"500 for {stream[:200]!r}")
        except OSError:
            pass  # refused or reset by the server: allowed


BURSTS: dict[str, tuple[Callable[[Server, random.Random, Tally, float], None], Callable[[Server], str | None]]] = {
    "dns-udp": (burst_dns_udp, check_dns_udp),
    "dns-tcp": (burst_dns_tcp, check_dns_tcp),
    "metadata": (lambda s, r, t, b: burst_http(s.metadata, METADATA_SEEDS, r, t, b), check_metadata),
    "admin": (lambda s, r, t, b: burst_http(s.admin, ADMIN_SEEDS, r, t, b), check_admin),
}


def fuzz(server: Server, target: str, seconds: float, seed: int, burst_seconds: float = 1.0) -> Tally:
    """Bursts of fuzz against one target for ``seconds``; after each, the checks. Returns what was seen."""
    burst, check = BURSTS[target]
    rng = random.Random(f"{seed}:{target}")
    tally = Tally(target, rss_start=server.rss())
    tally.rss_peak = tally.rss_start
    deadline = time.monotonic() + seconds
    while True:
        burst(server, rng, tally, min(burst_seconds, max(deadline - time.monotonic(), 0.1)))
        tally.bursts += 1
        if server.process.poll() is not None:
            tally.anomaly(f"the server exited with {server.process.returncode}")
            return tally
        problem = check(server)
        if problem is not None:
            tally.anomaly(f"after burst {tally.bursts}: {problem}")
        rss = server.rss()
        tally.rss_peak = max(tally.rss_peak, rss)
        if rss - tally.rss_start > MEMORY_GROWTH_LIMIT:
            tally.anomaly(f"resident memory grew from {tally.rss_start >> 20} MiB to {rss >> 20} MiB")
        if time.monotonic() >= deadline or tally.anomalies:
            return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="budget per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory(prefix="edge-fuzz-") as directory:
        server = Server(Path(directory))
        try:
            for target in args.targets.split(","):
                tally = fuzz(server, target, args.seconds, args.seed)
                print(f"{target:9} inputs={tally.inputs} replies={tally.replies} bursts={tally.bursts} "
                      f"rss={tally.rss_start >> 20}->{tally.rss_peak >> 20} MiB "
                      f"{'OK' if not tally.anomalies else 'FAILED'}")
                for anomaly in tally.anomalies:
                    print(f"    {anomaly}")
                failed |= bool(tally.anomalies)
            tracebacks = server.logs().count("Traceback")
            if tracebacks:
                print(f"server log holds {tracebacks} tracebacks:\n{server.logs()[-4000:]}")
                failed = True
        finally:
            server.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
