"""Instructions per DNS local hit and per metadata request under callgrind, for edge, its floors and its peers.

    python bench/profile_hot_paths.py [--instances 1000] [--requests 2000] [--only "edge,NSD"]

Each server (edge ``serve --workers 1`` answering DNS from a generated view and metadata from the demo view,
NSD, nginx ``return 200``, the bare uvloop UDP floor below and bench/metadata_bare.py) runs under
``valgrind --tool=callgrind``; after a warm-up its counters are zeroed (``callgrind_control -z PID``), a fixed
workload is sent from a client outside valgrind (every question of the view once with ``dnsperf -n 1``, a
Python HTTP loop with keep-alive, then one with a new connection per request), the counters are dumped
(``callgrind_control -d PID``) and the instructions are divided by the answers counted, split by the object
they run in (the interpreter, uvloop/libuv, httptools, libc, ...).  Edge's DNS is also counted on answers
from its forwarding cache (1,000 names of an upstream dnsmasq outside valgrind, each forwarded once in the
warm-up, then asked once), and on a hundred local and a hundred cached names asked ten times over (each asked
again within the second, as popular names are).  Instruction counts do not depend on how
busy the shared machine is; kernel time is not in them (bench/RESULTS.md, "Where the time goes", has the
strace and /proc commands for that).  Prints a Markdown report; takes a few minutes.

    python bench/profile_hot_paths.py --python-split

splits edge's DNS local hit by Python function instead (cProfile, no valgrind, seconds), and

    python bench/profile_hot_paths.py --python-split-metadata

splits edge's metadata request the same way, on a kept-alive connection and with a new connection per request
(self time includes the socket calls uvloop makes inside ``transport.write``; cProfile does not list them apart),
with the Python bytecodes each function runs per request (counted by a trace function: deterministic).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, start_dnsmasq, stop, wait_tcp  # noqa: E402

TICK = 100  # clock ticks per second in /proc/PID/stat
CATEGORIES = (  # (pattern in the object's path, category); the first match wins
    ("loop.cpython", "uvloop + libuv"),
    ("httptools", "httptools (llhttp)"),
    ("libpython", "Python interpreter"),
    ("/python3", "Python interpreter"),
    ("_ctypes", "ctypes + libffi"), ("libffi", "ctypes + libffi"),
    ("libc.so", "libc (syscall wrappers, memcpy, malloc)"),
    ("ld-linux", "dynamic loader"),
    ("nsd", "NSD"), ("nginx", "nginx"),
)


def bare_dns(port_file: str) -> None:
    """The DNS floor: uvloop answering every datagram with one pre-rendered answer, only its ID copied."""
    import struct

    import uvloop

    header = b"\x84\x00\x00\x01\x00\x01\x00\x00\x00\x00"  # QR AA, one question, one answer
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes((10, 0, 0, 1))  # the question's name, A

    class Floor(asyncio.DatagramProtocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.transport = transport

        def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
            end = data.index(0, 12) + 5  # the question as asked, any EDNS record dropped
            self.transport.sendto(data[:2] + header + data[12:end] + answer, addr)

    async def main() -> None:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Floor, ("127.0.0.1", 0))
        Path(port_file).write_text(str(transport.get_extra_info("sockname")[1]))
        await asyncio.Event().wait()

    uvloop.run(main())


def python_split(rounds: int = 300) -> None:
    """Which Python functions a DNS local hit runs through, with cProfile: edge's batch listener on a real
    loopback socket, ``rounds`` wake-ups of 64 queries for demo names (self time includes the ctypes
    recvmmsg/sendmmsg calls, which cProfile does not list apart)."""
    import cProfile
    import pstats
    import socket

    import dns.message

    from edge.config import Config, DnsConfig
    from edge.dns.datagrams import BATCH
    from edge.dns.protocol import DnsDatagramProtocol
    from edge.dns.service import DnsService
    from edge.view.demo import demo_document
    from edge.view.parse import parse_view
    from edge.view.snapshot import build_snapshot
    from edge.view.store import ViewStore

    store = ViewStore()
    service = DnsService(Config(dns=DnsConfig(rate_limit=0.0)), store)
    store.swap(build_snapshot(parse_view(demo_document()), service.preparers), "source")
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    client.setblocking(False)
    protocol = DnsDatagramProtocol(service, "", listener)
    wires = [dns.message.make_query(f"ip-127-0-0-{n}.demo.internal", "A").to_wire() for n in range(1, 5)]
    target = listener.getsockname()

    def fill() -> None:
        try:
            while True:
                client.recv(4096)
        except BlockingIOError:
            pass
        for index in range(BATCH):
            client.sendto(wires[index % len(wires)], target)

    for _ in range(50):  # warm-up: memoize the answers
        fill()
        protocol.readable()
    profile = cProfile.Profile()
    for _ in range(rounds):
        fill()
        profile.enable()
        protocol.readable()
        profile.disable()
    stats = pstats.Stats(profile)
    queries = rounds * BATCH
    print(f"{type(protocol.datagrams).__name__}, {queries} queries in batches of {BATCH}\n")
    print("| function | share of self time | calls per query |\n|---|---:|---:|")
    for (file, line, function), (_, calls, self_time, _, _) in sorted(
            stats.stats.items(), key=lambda item: -item[1][2])[:15]:  # type: ignore[attr-defined]
        where = f"{Path(file).relative_to(ROOT)}:{line}" if file.startswith(str(ROOT)) else file
        print(f"| `{where}({function})` | {self_time / stats.total_tt * 100:.1f}% | "  # type: ignore[attr-defined]
              f"{calls / queries:.2f} |")


_METADATA_CLIENT = """
import socket, sys
port, requests, keep_alive = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
sys.stdin.read()  # the go: the profile is on
request = b"GET %s HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\nAccept-Encoding: identity\\r\\n\\r\\n" % (sys.argv[4].encode(), port)
body = sys.argv[5].encode()
connection = None
for _ in range(requests):
    if connection is None:
        connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(request)
    answer = b""
    while not answer.endswith(body):
        piece = connection.recv(65536)
        assert piece, answer
        answer += piece
    if not keep_alive:
        connection.close()
        connection = None
"""
"""The client of --python-split-metadata: the request ``http.client`` sends (as in the callgrind runs), one at a
time, each answer read whole before the next request; run as its own process, so it is not in the profile."""


def python_split_metadata(requests: int = 4000) -> None:
    """Which Python functions a metadata request runs through, with cProfile: edge's metadata service
    (rate limit off, as in the callgrind runs) on a real loopback listener, the demo view, ``requests``
    GETs of bench/metadata_load.py's path on one kept-alive connection, then a quarter as many with a new
    connection each, from a client process outside the profile."""
    import cProfile
    import pstats

    import uvloop

    from bench import metadata_load
    from edge.config import Config, Listen, MetadataConfig, ViewConfig
    from edge.metadata.service import MetadataService
    from edge.view.demo import demo_document
    from edge.view.parse import parse_view
    from edge.view.snapshot import build_snapshot
    from edge.view.store import ViewStore

    async def refresh() -> None:
        return None

    bytecodes: collections.Counter = collections.Counter()

    def count_bytecodes(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            code = frame.f_code
            bytecodes[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        return count_bytecodes

    async def run(directory: str) -> list[tuple[str, int, pstats.Stats, int, dict]]:
        config = Config(view=ViewConfig(state_dir=directory),
                        metadata=MetadataConfig(listen=(Listen("127.0.0.1", 0),), rate=0.0,
                                                max_connections_per_source=100_000))
        store = ViewStore("profile")
        store.swap(build_snapshot(parse_view(demo_document())), "source")
        service = MetadataService(config, store, refresh)
        await service.start()
        port = service.addresses[0][1]
        loop = asyncio.get_running_loop()
        results = []
        try:
            for label, count, keep_alive in (("keep-alive", requests, True),
                                             ("new connection", requests // 4, False)):
                def client(count: int, keep_alive: bool) -> subprocess.Popen:
                    """The client process, started and waiting for a line on its standard input."""
                    return subprocess.Popen([sys.executable, "-c", _METADATA_CLIENT, str(port), str(count),
                                             "1" if keep_alive else "0", metadata_load.PATH, metadata_load.BODY],
                                            stdin=subprocess.PIPE)

                async def finished(process: subprocess.Popen) -> None:
                    assert process.stdin is not None
                    process.stdin.close()
                    # Waited on in a thread: cProfile follows only this one.
                    if await loop.run_in_executor(None, process.wait):
                        raise RuntimeError(f"metadata client failed ({label})")

                await finished(client(200, keep_alive))  # warm-up: the answer rendered and memoized
                process = client(count, keep_alive)
                profile = cProfile.Profile()
                profile.enable()
                await finished(process)
                profile.disable()
                # Then bytecodes per function, counted by a trace function (deterministic, unlike time; slow,
                # so on a quarter of the requests).
                traced = count // 4
                process = client(traced, keep_alive)
                bytecodes.clear()
                sys.settrace(count_bytecodes)
                await finished(process)
                sys.settrace(None)
                results.append((label, count, pstats.Stats(profile), traced, dict(bytecodes)))
        finally:
            await service.stop(1.0)
        return results

    with tempfile.TemporaryDirectory(prefix="edge-split-") as directory:
        results = uvloop.run(run(directory))
    for label, count, stats, traced, counted in results:
        print(f"### metadata {label}: {count} requests ({traced} for bytecodes), "
              f"{sum(counted.values()) / traced:.0f} Python bytecodes per request\n")
        print("| function | share of self time | calls per request | bytecodes per request |\n|---|---:|---:|---:|")
        # Ordered by bytecodes, then self time: the time of send() is mostly the socket write inside it.
        for key, (_, calls, self_time, _, _) in sorted(
                stats.stats.items(), key=lambda item: (-counted.get(item[0], 0), -item[1][2]))[:20]:  # type: ignore[attr-defined]
            file, line, function = key
            where = f"{Path(file).relative_to(ROOT)}:{line}" if file.startswith(str(ROOT)) else file
            print(f"| `{where}({function})` | {self_time / stats.total_tt * 100:.1f}% | "  # type: ignore[attr-defined]
                  f"{calls / count:.2f} | {counted.get(key, 0) / traced:.0f} |")
        print()


def descendants(pid: int) -> list[int]:
    children = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def self_costs(path: Path) -> tuple[collections.Counter, collections.Counter]:
    """Self instructions by object and by (object, function) in one callgrind output file."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    by_object: collections.Counter = collections.Counter()
    by_function: collections.Counter = collections.Counter()
    obj = function = "?"
    skip_next = False
    for line in path.read_text(errors="replace").splitlines():
        if not line:
            continue
        head = line[0]
        if head.isdigit() or head in "+-*":
            if skip_next:
                skip_next = False
                continue
            fields = line.split()
            cost = int(fields[1]) if len(fields) > 1 else 0
            by_object[obj] += cost
            by_function[(obj, function)] += cost
            continue
        key, _, value = line.partition("=")
        if key in ("ob", "fn", "cob", "cfn", "cfi", "cfl", "fl", "fi", "fe"):
            match = re.match(r"\((\d+)\)(?: (.*))?", value)
            if match and key in ("ob", "fn", "cob", "cfn"):
                table = names["ob" if key in ("ob", "cob") else "fn"]
                if match.group(2):
                    table[match.group(1)] = match.group(2)
                value = table.get(match.group(1), value)
            if key == "ob":
                obj = value
            elif key == "fn":
                function = value
        elif key == "calls":
            skip_next = True
    return by_object, by_function


def category(obj: str) -> str:
    for pattern, name in CATEGORIES:
        if pattern in obj:
            return name
    return "other: " + Path(obj).name


class Profiled:
    """A server under callgrind: zero its counters after warm-up, dump them after the counted workload."""

    def __init__(self, name: str, argv: list[str], directory: Path) -> None:
        self.name, self.directory = name, directory / name.replace(" ", "_")
        self.directory.mkdir()
        self.process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes", "--dump-instr=no",
             f"--callgrind-out-file={self.directory}/out.%p", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)

    def control(self, flag: str) -> None:
        for pid in descendants(self.process.pid):
            subprocess.run(["callgrind_control", flag, str(pid)], capture_output=True, timeout=60)

    def counted(self, workload) -> tuple[int, dict[str, int], collections.Counter]:  # type: ignore[no-untyped-def]
        """(answers, self instructions by category, by function) of one counted ``workload()`` run."""
        for old in self.directory.glob("out.*.*"):
            old.unlink()
        self.control("-z")
        answers = workload()
        self.control("-d")
        by_category: collections.Counter = collections.Counter()
        by_function: collections.Counter = collections.Counter()
        for dump in self.directory.glob("out.*.*"):
            objects, functions = self_costs(dump)
            for obj, cost in objects.items():
                by_category[category(obj)] += cost
            by_function.update(functions)
        return answers, dict(by_category), by_function


def dnsperf(port: int, queries: Path, runs: int, extra: tuple[str, ...] = ()) -> int:
    output = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-n", str(runs),
                             "-c", "1", "-q", "8", "-t", "20", *extra], capture_output=True, text=True).stdout
    return int(re.search(r"Queries completed:\s+(\d+)", output).group(1))


def http_loop(port: int, requests: int, keep_alive: bool, path: str, body: str) -> int:
    answered = 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(requests):
        if not keep_alive:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", path)
        answered += connection.getresponse().read().decode() == body
        if not keep_alive:
            connection.close()
    return answered


def wait_dns(port: int, question: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(["dig", "+short", "+time=2", "+tries=1", "-p", str(port), "@127.0.0.1",
                                 *question.split()], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            return
        time.sleep(0.5)
    raise RuntimeError(f"no DNS answer on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=1000, help="view size (A and PTR of each are asked)")
    parser.add_argument("--requests", type=int, default=2000, help="HTTP requests per counted run")
    parser.add_argument("--only", default="", help="comma-separated server names to profile (default: all)")
    parser.add_argument("--metadata-rate", type=float, default=0.0,
                        help="edge's metadata.rate: 0 (default) is off, as for the peers; a rate no client reaches "
                             "(1e9) puts the check every request of the default configuration pays, refusing none")
    args = parser.parse_args()
    from bench import metadata_load
    from bench.peer_configs import instance_addresses, nginx_conf, write_nsd
    from bench.peers import dns_data

    directory = Path(tempfile.mkdtemp(prefix="edge-profile-"))
    data = dns_data(directory, args.instances)
    questions = len(data.hits.read_text().splitlines())
    path, body = metadata_load.PATH, metadata_load.BODY
    python = sys.executable

    def servers() -> list[tuple[str, str, list[str], int]]:
        """(name, protocol, argv, port); ports chosen now, files written now."""
        edge_dns, edge_http, admin = free_port(), free_port(), free_port()
        config = directory / "edge.toml"
        # Forwarded questions go to the dnsmasq started below; local hits are answered alike with or without it.
        config.write_text(f'[dns]\nrate_limit = 0.0\nupstreams = ["127.0.0.1:{upstream_port}"]\n'
                          'recursion_cidrs = ["127.0.0.0/8"]\n'
                          f"[metadata]\nrate = {args.metadata_rate!r}\nmax_connections_per_source = 100000\n")
        edge = [python, "-m", "edge", "serve", "--config", str(config), "--view", str(data.view_path),
                "--state-dir", str(directory / f"state-{edge_dns}"), "--workers", "1", "--log-level", "warning",
                "--metadata-listen", f"127.0.0.1:{edge_http}", "--dns-listen", f"127.0.0.1:{edge_dns}",
                "--admin-listen", f"127.0.0.1:{admin}"]
        nsd_port = free_port()
        nsd = ["nsd", "-d", "-c", str(write_nsd(directory / f"nsd-{nsd_port}", nsd_port, data.zone_texts))]
        nginx_port = free_port()
        conf = directory / f"nginx-{nginx_port}.conf"
        conf.write_text(nginx_conf(directory, nginx_port, body, "return", instance_addresses(1000, body)))
        # The metadata answers come from the demo view, as in bench/metadata_load.py (127.0.0.1 is an instance).
        edge_metadata = [*edge[:7], "demo", edge[8], str(directory / f"state-{edge_http}"), *edge[10:]]
        return [("edge", "dns", edge, edge_dns),
                ("edge metadata", "http", edge_metadata, edge_http),
                ("NSD", "dns", nsd, nsd_port),
                ("bare uvloop UDP", "dns", [python, __file__, "--bare-dns", str(directory / "bare-dns.port")], 0),
                ("nginx return 200", "http", ["nginx", "-p", str(directory), "-c", str(conf)], nginx_port),
                ("bare uvloop+httptools", "http", [python, "bench/metadata_bare.py"], 0)]

    def ready(name: str, protocol: str, process: subprocess.Popen, port: int) -> tuple[int, int]:
        """(DNS port, HTTP port) once the server answers."""
        if name == "bare uvloop UDP":
            deadline = time.monotonic() + 120
            port_file = directory / "bare-dns.port"
            while not port_file.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            return int(port_file.read_text()), 0
        if name == "bare uvloop+httptools":
            line = process.stdout.readline()  # type: ignore[union-attr]
            return 0, int(line.strip().split("=")[1])
        return (port, 0) if protocol == "dns" else (0, port)

    only = set(filter(None, args.only.split(",")))
    # The upstream of edge's forwarded questions, outside valgrind: 1,000 names with an hour's TTL, so a
    # counted run finds every one in edge's cache.
    upstream_port = free_port()
    upstream = start_dnsmasq([f"host-record=host{n}.upstream.test,192.0.2.{n % 250 + 1}" for n in range(1000)],
                             directory, upstream_port, (), ("--local-ttl=3600", "--local=/upstream.test/"))
    # A hundred names asked ten times over: each is asked again within the same second, as popular names are.
    hot_hits, hot_forwarded = directory / "hot-hits.txt", directory / "hot-forwarded.txt"
    hot_hits.write_text("".join(data.hits.read_text().splitlines(keepends=True)[:100]))
    hot_forwarded.write_text("".join(data.forwarded.read_text().splitlines(keepends=True)[:100]))
    results: dict[tuple[str, str], tuple[int, dict[str, int], collections.Counter]] = {}
    for name, protocol, argv, port in servers():
        if only and name not in only:
            continue
        profiled = Profiled(name, argv, directory)
        try:
            dns_port, http_port = ready(name, protocol, profiled.process, port)
            if dns_port:
                wait_dns(dns_port, data.hits.read_text().splitlines()[0], 180)
                dnsperf(dns_port, data.hits, 1)  # warm-up: edge renders and memoizes each answer on first use
                results[(name, "DNS local hit")] = profiled.counted(lambda: dnsperf(dns_port, data.hits, 1))
                if name == "edge":
                    dnsperf(dns_port, data.forwarded, 1)  # warm-up: each question forwarded once, then cached
                    results[(name, "DNS forwarded, cache hit")] = profiled.counted(
                        lambda: dnsperf(dns_port, data.forwarded, 1))
                    results[(name, "DNS local hit, 100 names x 10")] = profiled.counted(
                        lambda: dnsperf(dns_port, hot_hits, 10))
                    results[(name, "DNS forwarded, cache hit, 100 names x 10")] = profiled.counted(
                        lambda: dnsperf(dns_port, hot_forwarded, 10))
            if http_port:
                wait_tcp(http_port, timeout=180)
                http_loop(http_port, 200, True, path, body)
                results[(name, "HTTP keep-alive")] = profiled.counted(
                    lambda: http_loop(http_port, args.requests, True, path, body))
                results[(name, "HTTP new connection")] = profiled.counted(
                    lambda: http_loop(http_port, args.requests // 4, False, path, body))
        finally:
            stop(profiled.process, timeout=60)
    stop(upstream)
    shutil.rmtree(directory, ignore_errors=True)

    print(f"## Instructions per answer (callgrind; {questions} DNS questions, 1,000 forwarded ones, "
          f"{args.requests} keep-alive and {args.requests // 4} new-connection HTTP requests per counted run)\n")
    for workload in ("DNS local hit", "DNS forwarded, cache hit", "DNS local hit, 100 names x 10",
                     "DNS forwarded, cache hit, 100 names x 10", "HTTP keep-alive", "HTTP new connection"):
        rows = [(name, *results[(name, w)]) for (name, w) in results if w == workload]
        if not rows:
            continue
        print(f"### {workload}\n\n| server | answers | instructions per answer | split (self, per answer) |")
        print("|---|---:|---:|---|")
        for name, answers, by_category, _ in rows:
            total = sum(by_category.values())
            split = "; ".join(f"{cat} {cost / answers:,.0f}" for cat, cost in
                              sorted(by_category.items(), key=lambda item: -item[1]) if cost / answers >= 50)
            print(f"| {name} | {answers} | {total / answers:,.0f} | {split} |")
        print()
        for name, answers, _, by_function in rows:
            top = ", ".join(f"`{function}` {cost / answers:,.0f}" for (obj, function), cost in
                            by_function.most_common(8))
            print(f"* {name}, top functions (self, per answer): {top}")
        print()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bare-dns":
        bare_dns(sys.argv[2])
    elif sys.argv[1:] == ["--python-split"]:
        python_split()
    elif sys.argv[1:] == ["--python-split-metadata"]:
        python_split_metadata()
    else:
        main()
