"""Total gateway memory against the worker count: PSS summed over the supervisor and every worker.

Usage::

    python -m bench.view_workers [--instances 100000] [--workers 1,2,4] [--json FILE]

It generates a view (flat network on ``127.x.y.z``, so the bench can ask as any
instance from loopback) and writes it to a file that the gateways read as their
``view.source``.  For each worker count it starts ``edge serve`` with its own
configuration file, ports and state directory (``workers = 1`` is one process,
no supervisor), waits until it is ready (``/readyz`` answers 200, ``/view`` has
the view's serial, and every serving process holds its own metadata and DNS
listeners, read from ``/proc``), then asks every worker a little: keep-alive
metadata connections from many instance addresses (``SO_REUSEPORT`` spreads
them by address and port; the bench reads from ``/proc`` which process holds
each connection and opens more until every worker holds one) each GET
``instance-id``, ``local-ipv4`` and ``local-hostname``, and one DNS query per
connection for the instance's own name from that address.  Then it reads the
proportional set size (PSS) and RSS of every process of the gateway from
``/proc/PID/smaps_rollup``: the process it started and, with workers, that
process's children, found by their parent PID in ``/proc``.

Every configuration runs twice: on the generated view, and on the embedded demo
view (four instances) with the same worker count, whose memory is the
interpreter and code, not the view.  The report gives the total PSS, the PSS
above that demo baseline, and that divided by one copy of the view (one process
above its own baseline): the ratio issue 17's target is about (at most 1.5 at
any worker count).

With ``--sweep N``, N more instances spread over the view then each ask once
(instance id and name on a connection of their own, then the name in DNS) and
the memory is read again: what each worker keeps for the instances it was asked
about (answer caches, decoded entries) shows there.  The report also gives the
bytes of the state directory's files and how many of them the page cache holds
(``fincore``): a file every process maps is held once by the kernel, and its
pages that no process touched are in no process's PSS.

``--set KEY=VALUE`` gives every gateway another configuration key (answer cache
sizes, for one), to tell what the memory after a sweep is made of.

Then, with the generated view served, it changes one instance's ``Name`` tag
(as ``bench.view_propagation`` does; a new serial that the gateways build as a
delta) while keep-alive connections from that instance's address, held by every
worker, ask for the tag every ``--probe-every`` seconds.  A connection stays on
one worker, so each sequence of answers is one worker's: each answer must be
the old tag or the new one, never an error, and once new, never old again (the
swap is atomic for every worker).  After every connection answered the new tag
and ``--settle`` seconds for the replaced snapshot to be released, the PSS is
read again.

When the configuration has ``view.shared_view`` (``edge config keys`` lists it),
worker counts above one run with it true and false; without the key the bench
leaves it out.  Everything stays on loopback; every process is stopped by PID
(SIGTERM, then SIGKILL after a bounded wait), its children too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, DNSError, DNSRecord

from bench.common import free_port
from bench.view_propagation import Change, ViewParts, apply_change, load_average, plan_changes

SHARED_VIEW_KEY = "view.shared_view"
TAG_PATH = b"/latest/meta-data/tags/instance/Name"
METADATA_PATHS = (b"/latest/meta-data/instance-id", b"/latest/meta-data/local-ipv4",
                  b"/latest/meta-data/local-hostname")
DEMO_ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.4")
"""The demo view's flat-network instances that answer a GET without a token (127.0.0.3 requires one)."""
SMAPS_FIELDS = {"Rss": "rss_bytes", "Pss": "pss_bytes", "Pss_Anon": "pss_anon_bytes",
                "Pss_File": "pss_file_bytes", "Pss_Shmem": "pss_shmem_bytes"}
TCP_LISTEN = "0A"
ROLE_MARKS = {"supervisor": "s", "worker": "w", "single process": "p"}


# -- /proc: processes, memory, sockets ---------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from the fourth field of every ``/proc/PID/stat``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def process_memory(pid: int) -> dict[str, int]:
    """RSS, PSS and PSS by kind (anonymous, file-backed, shared memory) of one process, in bytes."""
    memory = dict.fromkeys(SMAPS_FIELDS.values(), 0)
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in SMAPS_FIELDS:
            memory[SMAPS_FIELDS[name]] = int(value.split()[0]) * 1024
    return memory


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _ipv4(hex_address: str) -> tuple[str, int]:
    address, port = hex_address.split(":")
    return socket.inet_ntoa(struct.pack("<I", int(address, 16))), int(port, 16)


@dataclass(frozen=True)
class SocketEntry:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str


def socket_table(kind: str) -> dict[int, SocketEntry]:
    """inode -> the socket's local and remote address and state, from ``/proc/net/tcp`` or ``udp`` (IPv4)."""
    table = {}
    for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
        fields = line.split()
        table[int(fields[9])] = SocketEntry(_ipv4(fields[1]), _ipv4(fields[2]), fields[3])
    return table


def holds_listeners(pid: int, metadata_port: int, dns_port: int) -> bool:
    """Whether the process holds its own metadata listener (TCP) and DNS socket (UDP)."""
    inodes = socket_inodes(pid)
    tcp, udp = socket_table("tcp"), socket_table("udp")
    return (any(tcp[i].local[1] == metadata_port and tcp[i].state == TCP_LISTEN for i in inodes if i in tcp)
            and any(udp[i].local[1] == dns_port for i in inodes if i in udp))


def connection_holders(pids: list[int], port: int) -> dict[tuple[str, int], int]:
    """Client (address, port) -> the PID holding the accepted end of that connection to ``port``."""
    tcp = socket_table("tcp")
    holders = {}
    for pid in pids:
        for inode in socket_inodes(pid):
            entry = tcp.get(inode)
            if entry is not None and entry.local[1] == port and entry.state != TCP_LISTEN:
                holders[entry.remote] = pid
    return holders


def state_dir_usage(directory: Path) -> dict[str, int | None]:
    """Bytes of the files in the state directory, and how many of them the page cache holds (``fincore``).

    A view the workers map from a file is held once by the kernel whoever maps it; the pages no
    process has touched are in no process's PSS, so they are reported here.
    """
    files = [path for path in directory.rglob("*") if path.is_file()]
    usage: dict[str, int | None] = {"bytes": sum(path.stat().st_size for path in files), "resident_bytes": None}
    if files and shutil.which("fincore"):
        listed = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                                 *map(str, files)], capture_output=True, text=True, timeout=60)
        if listed.returncode == 0:
            usage["resident_bytes"] = sum(int(line) for line in listed.stdout.split())
    return usage


# -- one gateway ----------------------------------------------------------------------------------------

@dataclass
class Gateway:
    label: str
    workers: int
    process: subprocess.Popen[bytes]
    metadata_port: int
    dns_port: int
    admin_port: int
    log_path: Path
    state_dir: Path
    started: float
    children: dict[int, int] = field(default_factory=dict)
    """Every worker seen: PID -> start time."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def serving_pids(self) -> list[int]:
        """The processes that answer instances: the workers, or the one process without them."""
        return self.remember_children() if self.workers > 1 else [self.pid]

    def all_pids(self) -> list[int]:
        return [self.pid, *self.serving_pids()] if self.workers > 1 else [self.pid]

    def admin(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=3) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, b""
        except OSError:
            return 0, b""

    def failure(self, what: str) -> RuntimeError:
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        return RuntimeError(f"gateway {self.label}: {what}\n{tail}")

    def wait_ready(self, serial: int, timeout: float) -> float:
        """Seconds from the start until ready, serving ``serial``, with every worker's listeners bound."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise self.failure(f"exited with {self.process.returncode}")
            if self._ready(serial):
                self.remember_children()
                return time.monotonic() - self.started
            if time.monotonic() > deadline:
                raise self.failure(f"not ready within {timeout:g}s")
            time.sleep(0.2)

    def _ready(self, serial: int) -> bool:
        if self.admin("/readyz")[0] != 200:
            return False
        status, body = self.admin("/view")
        if status != 200 or json.loads(body).get("serial") != serial:
            return False
        serving = self.serving_pids()
        return len(serving) == self.workers and all(
            holds_listeners(pid, self.metadata_port, self.dns_port) for pid in serving)

    def memory(self) -> dict[str, Any]:
        processes = []
        for pid in self.all_pids():
            try:
                memory = process_memory(pid)
            except OSError:
                continue  # gone meanwhile
            role = "supervisor" if self.workers > 1 and pid == self.pid else (
                "worker" if self.workers > 1 else "single process")
            processes.append({"role": role, "pid": pid, **memory})
        return {"processes": processes,
                "total_pss_bytes": sum(p["pss_bytes"] for p in processes),
                "total_rss_bytes": sum(p["rss_bytes"] for p in processes)}

    def remember_children(self) -> list[int]:
        """The supervisor's children now, each remembered with its start time (for stopping them by PID)."""
        found = children_of(self.pid) if self.workers > 1 else []
        for pid in found:
            started = _start_ticks(pid)
            if started is not None:
                self.children.setdefault(pid, started)
        return found

    def stop(self, timeout: float) -> None:
        """SIGTERM to the gateway (it stops its workers); SIGKILL to it, and to any worker of it still
        there, after ``timeout``."""
        if self.process.poll() is None:
            self.remember_children()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + timeout
        left = dict(self.children)
        while left:
            left = {pid: started for pid, started in left.items() if _start_ticks(pid) == started}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for pid in left:
            os.kill(pid, signal.SIGKILL)


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started (field 22 of its stat), or None when it is gone or a zombie: the same PID
    with the same start time is the same process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def write_config(path: Path, *, workers: int, source: str, state_dir: Path, metadata_port: int, dns_port: int,
                 admin_port: int, shared_view: bool | None) -> None:
    shared = "" if shared_view is None else f"shared_view = {'true' if shared_view else 'false'}\n"
    path.write_text(
        f"workers = {workers}\n\n"
        f"[view]\nsource = {json.dumps(source)}\nstate_dir = {json.dumps(str(state_dir))}\n"
        f"poll_interval = 0.5\n{shared}\n"
        f"[metadata]\nlisten = [\"127.0.0.1:{metadata_port}\"]\nrate = 0\n\n"
        f"[dns]\nlisten = [\"127.0.0.1:{dns_port}\"]\n\n"
        f"[admin]\nlisten = \"127.0.0.1:{admin_port}\"\nshutdown_delay = 0\nshutdown_grace = 2\n")


def start_gateway(label: str, workers: int, source: str, workdir: Path, shared_view: bool | None,
                  settings: dict[str, str] | None = None) -> Gateway:
    directory = workdir / label
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    metadata, dns, admin = free_port(), free_port(), free_port()
    config = directory / "edge.toml"
    write_config(config, workers=workers, source=source, state_dir=directory / "state", metadata_port=metadata,
                 dns_port=dns, admin_port=admin, shared_view=shared_view)
    log_path = directory / "edge.log"
    # The gateway's configuration is its file and ``--set`` alone: no EDGE_* variable of the caller's leaks in.
    env = {name: value for name, value in os.environ.items() if not name.startswith("EDGE_")}
    env.update({"EDGE_" + key.upper().replace(".", "_"): value for key, value in (settings or {}).items()})
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "edge", "serve", "--config", str(config),
                                    "--log-level", "warning"], env=env, stdout=log, stderr=log)
    return Gateway(label, workers, process, metadata, dns, admin, log_path, directory / "state", time.monotonic())


# -- asking it ------------------------------------------------------------------------------------------

class MetadataConnection:
    """One keep-alive metadata connection from an instance's address."""

    def __init__(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer
        self.local: tuple[str, int] = writer.get_extra_info("sockname")[:2]

    @classmethod
    async def open(cls, port: int, address: str) -> MetadataConnection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0)), 5)
        return cls(address, reader, writer)

    async def get(self, path: bytes) -> tuple[int, bytes]:
        """(status, body); status 0 when the connection failed or was closed."""
        try:
            self.writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await asyncio.wait_for(self.reader.readexactly(length), 5)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            return 0, b""
        try:
            return int(head.split(b" ", 2)[1]), body
        except (IndexError, ValueError):
            return 0, body

    def close(self) -> None:
        self.writer.close()


async def open_covering(gateway: Gateway, addresses: list[str], count: int, rounds: int = 4,
                        ) -> tuple[list[MetadataConnection], dict[tuple[str, int], int]]:
    """At least ``count`` connections (over ``addresses`` in turn) such that every serving process holds one.

    Returns the connections and which PID holds each; each has answered one request first, so its
    accepted end exists in the worker that took it.
    """
    connections: list[MetadataConnection] = []
    holders: dict[tuple[str, int], int] = {}
    serving = gateway.serving_pids()
    for round_ in range(rounds):
        batch = await asyncio.gather(*(MetadataConnection.open(gateway.metadata_port,
                                                               addresses[(len(connections) + n) % len(addresses)])
                                       for n in range(count)))
        answers = await asyncio.gather(*(connection.get(METADATA_PATHS[0]) for connection in batch))
        if any(status != 200 for status, _ in answers):
            raise gateway.failure(f"a metadata connection was not answered: {[s for s, _ in answers]}")
        connections += batch
        holders = connection_holders(serving, gateway.metadata_port)
        if {holders.get(c.local) for c in connections} >= set(serving):
            break
    return connections, holders


def _coverage(connections: list[MetadataConnection], holders: dict[tuple[str, int], int],
              serving: list[int]) -> dict[str, int]:
    per_process = {str(pid): 0 for pid in serving}
    for connection in connections:
        holder = holders.get(connection.local)
        if holder is not None:
            per_process[str(holder)] = per_process.get(str(holder), 0) + 1
    return per_process


def ask_dns(port: int, address: str, name: str) -> bool:
    """One A query for ``name`` from ``address``: whether it was answered NOERROR with ``address``."""
    query = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((address, 0))
        udp.settimeout(3)
        try:
            udp.sendto(query.pack(), ("127.0.0.1", port))
            reply = DNSRecord.parse(udp.recv(4096))
        except (OSError, DNSError):  # a timeout or an unparsable reply: not answered
            return False
    return (reply.header.id == query.header.id and reply.header.rcode == RCODE.NOERROR
            and any(rr.rtype == QTYPE.A and str(rr.rdata) == address for rr in reply.rr))


async def exercise(gateway: Gateway, addresses: list[str], connections: int) -> dict[str, Any]:
    """Ask every worker a little: metadata GETs on connections every worker holds, and DNS queries."""
    opened, holders = await open_covering(gateway, addresses, connections)
    metadata_answers = metadata_errors = 0
    names: list[tuple[str, str]] = []
    try:
        for path in METADATA_PATHS:
            answers = await asyncio.gather(*(c.get(path) for c in opened))
            for connection, (status, body) in zip(opened, answers):
                good = status == 200 and (path != b"/latest/meta-data/local-ipv4"
                                          or body.decode() == connection.address)
                metadata_answers += good
                metadata_errors += not good
                if good and path.endswith(b"local-hostname"):
                    names.append((connection.address, body.decode()))
        coverage = _coverage(opened, holders, gateway.serving_pids())
    finally:
        for connection in opened:
            connection.close()
    answered = await asyncio.gather(*(asyncio.to_thread(ask_dns, gateway.dns_port, address, name)
                                      for address, name in names))
    return {"connections": len(opened), "connections_by_process": coverage,
            "every_worker_held_a_connection": all(count > 0 for count in coverage.values()),
            "metadata_answers": metadata_answers, "metadata_errors": metadata_errors,
            "dns_answers": sum(answered), "dns_errors": len(answered) - sum(answered) + (len(opened) - len(names))}


async def sweep(gateway: Gateway, addresses: list[str], concurrency: int = 64) -> dict[str, Any]:
    """Each address asks once, on a connection of its own: its instance id and name, then the name in DNS.

    Many distinct instances, spread over the workers by ``SO_REUSEPORT``: what a worker keeps for
    the instances it was asked about shows in its memory.
    """
    limit = asyncio.Semaphore(concurrency)
    names: list[tuple[str, str]] = []
    errors = 0

    async def ask(address: str) -> None:
        nonlocal errors
        async with limit:
            try:
                connection = await MetadataConnection.open(gateway.metadata_port, address)
            except (OSError, asyncio.TimeoutError):
                errors += 1
                return
            try:
                answers = [await connection.get(path) for path in (METADATA_PATHS[0], METADATA_PATHS[2])]
            finally:
                connection.close()
            if all(status == 200 for status, _ in answers):
                names.append((address, answers[1][1].decode()))
            else:
                errors += 1

    began = time.monotonic()
    await asyncio.gather(*(ask(address) for address in addresses))
    answered = await asyncio.to_thread(lambda: sum(ask_dns(gateway.dns_port, a, n) for a, n in names))
    return {"addresses": len(addresses), "metadata_answers": 2 * len(names), "metadata_errors": errors,
            "dns_answers": answered, "dns_errors": len(names) - answered,
            "seconds": round(time.monotonic() - began, 1)}


async def swap_check(gateway: Gateway, change: Change, old_name: str, write: Any, connections: int,
                     probe_every: float, timeout: float) -> dict[str, Any]:
    """Change one instance while connections every worker holds ask for its tag; old or new, never else."""
    opened, holders = await open_covering(gateway, [change.address], connections)
    serving = gateway.serving_pids()
    old, new = old_name.encode(), change.name.encode()
    counts = {"old": 0, "new": 0, "error": 0}
    regressions = 0
    errors: list[str] = []
    seen_new = [False] * len(opened)
    first_new: list[float | None] = [None] * len(opened)
    written_at: float | None = None

    async def follow(index: int, connection: MetadataConnection, stop: asyncio.Event) -> None:
        nonlocal regressions
        while not stop.is_set():
            status, body = await connection.get(TAG_PATH)
            if status == 200 and body == new:
                counts["new"] += 1
                if not seen_new[index]:
                    seen_new[index] = True
                    if written_at is not None:
                        first_new[index] = time.monotonic() - written_at
            elif status == 200 and body == old:
                counts["old"] += 1
                if seen_new[index]:
                    regressions += 1
            else:
                counts["error"] += 1
                if len(errors) < 10:
                    errors.append(f"{connection.local}: status {status} body {body[:80]!r}")
                if status == 0:
                    return  # the connection is gone: nothing more to learn from it
            await asyncio.sleep(probe_every)

    stop = asyncio.Event()
    try:
        followers = [asyncio.create_task(follow(i, c, stop)) for i, c in enumerate(opened)]
        await asyncio.sleep(max(0.5, 5 * probe_every))  # every connection answers the old tag first
        before_new = counts["new"]
        await asyncio.to_thread(write)
        written_at = time.monotonic()
        deadline = written_at + timeout
        while not all(seen_new) and time.monotonic() < deadline and not all(f.done() for f in followers):
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.5, 5 * probe_every))  # and keeps answering the new one
        stop.set()
        await asyncio.gather(*followers)
        coverage = _coverage(opened, holders, serving)
    finally:
        for connection in opened:
            connection.close()
    served = [t for t in first_new if t is not None]
    return {"connections": len(opened), "connections_by_process": coverage,
            "every_worker_held_a_connection": all(count > 0 for count in coverage.values()),
            "old_answers": counts["old"], "new_answers": counts["new"], "errors": counts["error"],
            "new_before_the_write": before_new, "regressions": regressions,
            "connections_serving_new": sum(seen_new), "error_samples": errors,
            "atomic": counts["error"] == 0 and regressions == 0 and before_new == 0 and all(seen_new),
            "write_to_all_new_seconds": round(max(served), 2) if served and all(seen_new) else None,
            "serving_pids_unchanged": gateway.serving_pids() == serving}


# -- the whole run ----------------------------------------------------------------------------------

def shared_view_known() -> bool:
    """Whether this edge has ``view.shared_view`` (its own ``edge config keys`` lists every key)."""
    listed = subprocess.run([sys.executable, "-m", "edge", "config", "keys"], capture_output=True, text=True,
                            timeout=60, check=True)
    return f"`{SHARED_VIEW_KEY}`" in listed.stdout


def configurations(worker_counts: list[int], known: bool) -> list[tuple[int, bool | None]]:
    """(workers, view.shared_view or None for leaving it out): one process once; workers with it on and off."""
    runs: list[tuple[int, bool | None]] = []
    for workers in worker_counts:
        if workers == 1 or not known:
            runs.append((workers, None))
        else:
            runs += [(workers, True), (workers, False)]
    return runs


def measure_demo(workers: int, shared_view: bool | None, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    gateway = start_gateway(f"demo-{workers}-{shared_view}", workers, "demo", workdir, shared_view, args.settings)
    try:
        ready = gateway.wait_ready(1, args.start_timeout)
        probe = asyncio.run(exercise(gateway, list(DEMO_ADDRESSES), _connections(args, workers)))
        time.sleep(args.settle)
        return {"ready_seconds": round(ready, 2), "probe": probe, "memory": gateway.memory()}
    finally:
        gateway.stop(args.stop_timeout)


def measure_view(workers: int, shared_view: bool | None, parts: ViewParts, change: Change, view_path: Path,
                 workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    parts = parts.copy()
    old_name = parts.records[change.index]["tags"]["Name"]
    _write_atomically(view_path, parts.document(1))
    addresses = _probe_addresses(parts, _connections(args, workers))
    gateway = start_gateway(f"view-{workers}-{shared_view}", workers, str(view_path), workdir, shared_view,
                            args.settings)
    try:
        ready = gateway.wait_ready(1, args.start_timeout)
        probe = asyncio.run(exercise(gateway, addresses, _connections(args, workers)))
        time.sleep(args.settle)
        memory = gateway.memory()
        result: dict[str, Any] = {"ready_seconds": round(ready, 2), "probe": probe, "memory": memory,
                                  "state_dir": state_dir_usage(gateway.state_dir)}
        if args.sweep:
            result["sweep"] = asyncio.run(sweep(gateway, _probe_addresses(parts, args.sweep)))
            time.sleep(args.settle)
            result["memory_after_sweep"] = gateway.memory()

        def write() -> None:
            apply_change(parts, change)
            _write_atomically(view_path, parts.document(change.serial))

        swap = asyncio.run(swap_check(gateway, change, old_name, write, _connections(args, workers),
                                      args.probe_every, args.served_timeout))
        time.sleep(args.settle)
        after = gateway.memory()
        status, body = gateway.admin("/view")
        if gateway.process.poll() is not None:
            raise gateway.failure(f"exited with {gateway.process.returncode}")
        return {**result, "swap": swap, "memory_after_change": after,
                "serial_after_change": json.loads(body).get("serial") if status == 200 else None}
    finally:
        gateway.stop(args.stop_timeout)


def _connections(args: argparse.Namespace, workers: int) -> int:
    return max(args.connections, 8 * workers)


def _probe_addresses(parts: ViewParts, count: int) -> list[str]:
    step = max(1, len(parts.records) // max(1, count))
    return [parts.records[i]["interfaces"][0]["private_ips"][0] for i in range(0, len(parts.records), step)][:count]


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def summarize(runs: list[dict[str, Any]]) -> None:
    """Add to each run its PSS above the demo baseline and the ratio to one copy (one process, above its own)."""
    single = next((run for run in runs if run["workers"] == 1), None)
    one_copy = (single["view"]["memory"]["total_pss_bytes"] - single["demo"]["memory"]["total_pss_bytes"]
                if single else None)
    for run in runs:
        baseline = run["demo"]["memory"]["total_pss_bytes"]
        for key in ("", "_after_sweep", "_after_change"):
            memory = run["view"].get(f"memory{key}")
            if memory is None:
                continue
            above = memory["total_pss_bytes"] - baseline
            run[f"total_pss_bytes{key}"] = memory["total_pss_bytes"]
            run[f"pss_above_baseline_bytes{key}"] = above
            run[f"copies{key}"] = round(above / one_copy, 2) if one_copy and one_copy > 0 else None
        run["baseline_pss_bytes"] = baseline
        run["one_copy_pss_bytes"] = one_copy


def run(args: argparse.Namespace) -> dict[str, Any]:
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    known = shared_view_known()
    workdir = Path(tempfile.mkdtemp(prefix="edge-view-workers-"))
    began = time.monotonic()
    try:
        report: dict[str, Any] = {"instances": args.instances, "workers": worker_counts, "cpus": os.cpu_count(),
                                  "shared_view_key": known, "settings": args.settings,
                                  "load_average_start": load_average(), "runs": []}
        parts = ViewParts.generate(args.instances)
        report["document_bytes"] = len(parts.document(1))
        change = plan_changes(parts, 1)[0]
        view_path = workdir / "view.json"
        for workers, shared_view in configurations(worker_counts, known):
            demo = measure_demo(workers, shared_view, workdir, args)
            view = measure_view(workers, shared_view, parts, change, view_path, workdir, args)
            report["runs"].append({"workers": workers, "shared_view": shared_view, "demo": demo, "view": view})
        summarize(report["runs"])
        report["load_average_end"] = load_average()
        report["seconds"] = round(time.monotonic() - began, 1)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MB"


def _copies(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def render(report: dict[str, Any]) -> str:
    swept = any("sweep" in run_["view"] for run_ in report["runs"])
    lines = [f"gateway memory against the worker count: {report['instances']:,} instances "
             f"(document {_mb(report['document_bytes'])}), view.shared_view "
             f"{'known' if report['shared_view_key'] else 'not in this edge (left out)'}; "
             + "".join(f"{key} = {value}; " for key, value in report["settings"].items())
             + f"load average {report['load_average_start']} -> {report['load_average_end']} on {report['cpus']} cpus",
             "",
             "| workers | shared_view | total PSS | demo baseline | above baseline | copies of the view | "
             + ("after the sweep: total / copies | " if swept else "")
             + "after one change: total / copies | PSS per process (MB) | state dir: files / in page cache "
             "| swap: old / new / errors, atomic |",
             "|---:|---|---:|---:|---:|---:|" + ("---|" if swept else "") + "---|---|---|---|"]
    for run_ in report["runs"]:
        view, swap = run_["view"], run_["view"]["swap"]
        shared = "(absent)" if run_["shared_view"] is None else str(run_["shared_view"]).lower()
        processes = ", ".join(f"{ROLE_MARKS[p['role']]} {p['pss_bytes'] / 2**20:.0f}"
                              for p in view["memory"]["processes"])
        sweep_cell = (f"{_mb(run_.get('total_pss_bytes_after_sweep'))} / {_copies(run_.get('copies_after_sweep'))} | "
                      if swept else "")
        lines.append(
            f"| {run_['workers']} | {shared} | {_mb(run_['total_pss_bytes'])} | {_mb(run_['baseline_pss_bytes'])} "
            f"| {_mb(run_['pss_above_baseline_bytes'])} | **{_copies(run_['copies'])}** | {sweep_cell}"
            f"{_mb(run_['total_pss_bytes_after_change'])} / {_copies(run_['copies_after_change'])} | {processes} "
            f"| {_mb(view['state_dir']['bytes'])} / {_mb(view['state_dir']['resident_bytes'])} "
            f"| {swap['old_answers']} / {swap['new_answers']} / {swap['errors']}, "
            f"{'yes' if swap['atomic'] else 'NO'} |")
    lines += ["", "Per process: s = supervisor, w = worker, p = the one process without workers. Copies = PSS above "
              "the demo baseline at the same worker count / that of one process."]
    for run_ in report["runs"]:
        view, swap = run_["view"], run_["view"]["swap"]
        notes = [f"ready in {view['ready_seconds']} s",
                 f"probe: {view['probe']['connections']} connections over {len(view['probe']['connections_by_process'])} "
                 f"serving processes {view['probe']['connections_by_process']}, "
                 f"{view['probe']['metadata_errors']} metadata and {view['probe']['dns_errors']} DNS errors"]
        if "sweep" in view:
            sweep_ = view["sweep"]
            notes.append(f"sweep: {sweep_['addresses']:,} instances in {sweep_['seconds']} s, "
                         f"{sweep_['metadata_errors']} metadata and {sweep_['dns_errors']} DNS errors")
        notes.append(f"swap: {swap['connections']} connections {swap['connections_by_process']}, all new after "
                     f"{swap['write_to_all_new_seconds']} s, {swap['regressions']} regressions")
        if swap["error_samples"]:
            notes.append(f"errors: {swap['error_samples']}")
        if not swap["serving_pids_unchanged"]:
            notes.append("the workers were replaced during the change")
        shared = "" if run_["shared_view"] is None else f", shared_view {str(run_['shared_view']).lower()}"
        lines.append(f"\n{run_['workers']} workers{shared}: " + "; ".join(notes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma separated (1: one process)")
    parser.add_argument("--connections", type=int, default=32,
                        help="metadata connections per probe (at least 8 per worker; more until every worker holds one)")
    parser.add_argument("--sweep", type=int, default=0,
                        help="after the first measure, this many more instances each ask once (metadata and DNS), "
                             "and the memory is read again")
    parser.add_argument("--probe-every", type=float, default=0.05, help="seconds between tag probes per connection")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds before reading memory (after the probe, and after the change is served)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--served-timeout", type=float, default=60.0,
                        help="seconds after the change for every connection to answer the new tag")
    parser.add_argument("--stop-timeout", type=float, default=20.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another configuration key for every gateway (dotted, as `edge config keys` lists "
                             "it; passed as its EDGE_* variable); repeatable")
    parser.add_argument("--json", type=Path, help="also write the raw report here")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.set):
        parser.error("--set: KEY=VALUE")
    args.settings = dict(item.split("=", 1) for item in args.set)
    counts = [w for w in args.workers.split(",") if w.strip()]
    if not counts or any(not w.strip().isdigit() or int(w) < 1 for w in counts) or "1" not in [w.strip() for w in counts]:
        parser.error("--workers: positive counts, comma separated, including 1 (one copy is measured there)")
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(render(report))
    return 0 if all(run_["view"]["swap"]["atomic"] for run_ in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
