"""How a one-instance change reaches a fleet: etcd keyspace (watched) against the whole document.

Usage::

    python -m bench.view_propagation [--instances 100000] [--gateways 3] [--changes 20]
                                     [--sources keyspace,etcd-key,http] [--json FILE]

For each source kind it starts what the gateways read from (a throwaway etcd
member on loopback with its own data directory, or a static document server),
puts a generated view there (flat network on ``127.x.y.z`` so the bench can
ask as each instance), starts ``--gateways`` gateways (``edge serve --workers
1``, one process each, distinct loopback ports), then changes one instance
every ``--interval`` seconds (its ``Name`` tag, which the metadata service
answers at ``/latest/meta-data/tags/instance/Name``) and asks every gateway,
from that instance's address, until it answers the new value.  Per change and
per gateway it reports:

* **bytes received**, counted exactly by a TCP proxy in front of the source
  (one proxy per gateway), minus the idle traffic measured over the same
  length of time without changes (the safety-net or document polls);
* **gateway CPU** (utime + stime of the process from ``/proc``, 10 ms ticks)
  over the change phase, minus the idle CPU measured with the same probing
  and no changes, divided by the number of changes;
* **write-to-served**: from the write returning (etcd committed it, or the
  document server holds the new document) to the gateway's first answer with
  the new value (one probe per gateway every ``--probe-every`` seconds, for its oldest
  change not yet shown: a gateway serves serials in order; the idle baseline probes the
  same way).

Source kinds: ``keyspace`` (``edge view publish`` into ``PREFIX/``, then each
change is one transaction putting the instance's key and the serial, as the
publisher does), ``etcd-key`` (the whole document gzip-compressed under one
key, rewritten on every change; etcd's ``--max-request-bytes`` is raised to
fit it and the report says by how much) and ``http`` (the whole document
gzip-compressed from a static server with an ETag, answering 304 while
unchanged and ignoring ``?since=``) and ``http-changes`` (an incremental HTTP
control plane: ``?since=S`` answered with an ``edge-view-changes/1`` document
listing the instances changed after S; one change is made before the measured
ones, since a gateway turns incremental at its first changes answer and takes
the full document once more then).  The HTTP sources are polled every
``--document-poll`` seconds (default 1: the most that can still meet a 1 s
write-to-served target), and so is the one etcd key; the keyspace at the
gateway's default interval (its poll is only a safety net, the watch tells).

Also measured, on the first gateway alone before the others start: the time
from its start to serving the source's view (first load) and its resident
memory (RSS and PSS) after the load, less that of a gateway serving the demo
view, per instance.  The load average is recorded at the start and the end:
bytes are exact whatever the load, CPU and latency are not.
Everything stays on loopback; every process the bench starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench.common import cpu_seconds, free_port, percentile, stop

SOURCES = ("keyspace", "etcd-key", "http", "http-changes")
PREFIX = "bench/view/"
DOCUMENT_KEY = "bench/document"
TAG_PATH = b"/latest/meta-data/tags/instance/Name"
ETCD_DEFAULT_REQUEST_BYTES = 1_572_864 + 2048
"""etcd's default ``--max-request-bytes`` (1.5 MiB) plus its gRPC overhead allowance."""


# -- counting what each gateway receives ----------------------------------------------------------

class CountingProxy:
    """A TCP proxy in front of a source that counts the bytes each way (exactly what one gateway moved)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.received = 0
        """Bytes from the source to the gateway."""
        self.sent = 0
        """Bytes from the gateway to the source."""
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.received, self.sent

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_gateway: bool) -> None:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        try:
            while length := source.recv_into(buffer):
                sink.sendall(view[:length])
                with self._lock:
                    if to_gateway:
                        self.received += length
                    else:
                        self.sent += length
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()


class DocumentServer:
    """An HTTP control plane: the whole view as gzip with an ETag (304 while unchanged).

    Without ``parts`` it ignores ``?since=`` (a static file server).  With ``parts`` it is an
    incremental control plane: ``?since=S`` is answered with an ``edge-view-changes/1``
    document listing the instances changed after S (whole), and the full document is made
    from ``parts`` at the current serial when asked for.
    """

    def __init__(self, parts: ViewParts | None = None) -> None:
        self._document = (b"", "")
        self.parts = parts
        self.serial = 1
        self._changed: dict[int, tuple[str, bytes]] = {}
        """serial -> (instance id, its text): the one instance each serial changed."""
        self._full: tuple[int, bytes] | None = None
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                since = server.since_of(self.path)
                body, etag, encoded = server.answer(since)
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
                payload = gzip.decompress(body) if encoded and not gzipped else body
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("ETag", etag)
                if encoded and gzipped:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def since_of(self, path: str) -> int | None:
        if self.parts is None:
            return None
        query = parse_qs(urlsplit(path).query)
        try:
            return int(query["since"][0])
        except (KeyError, ValueError):
            return None

    def answer(self, since: int | None) -> tuple[bytes, str, bool]:
        """(body, ETag, whether the body is gzip) for a request with or without ``since``."""
        with self._lock:
            serial, etag = self.serial, f'"serial-{self.serial}"'
            if self.parts is None:
                return self._document[0], self._document[1], True
            if since is None or since < 1 or since > serial:
                if self._full is None or self._full[0] != serial:
                    self._full = (serial, gzip.compress(self.parts.document(serial), 6))
                return self._full[1], etag, True
            latest = dict(self._changed[number] for number in range(since + 1, serial + 1))
        body = b"".join((b'{"format":"edge-view-changes/1","since":%d,"serial":%d,"changed":[' % (since, serial),
                         b",".join(latest.values()), b'],"removed":[]}'))
        return body, etag, False

    def publish(self, gzipped: bytes, serial: int) -> None:
        """The whole document at ``serial`` (the static server)."""
        with self._lock:
            self._document = (gzipped, f'"serial-{serial}"')
            self.serial = serial

    def change(self, serial: int, instance_id: str, text: bytes) -> None:
        """The incremental control plane: ``serial`` changed this one instance (already changed in ``parts``)."""
        with self._lock:
            self._changed[serial] = (instance_id, text)
            self.serial = serial

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class EtcdWriter:
    """Transactions through etcd's JSON gateway, as a control plane would write (independent of edge's client)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def txn(self, puts: list[tuple[bytes, bytes]], deletes: list[bytes]) -> int:
        operations: list[dict[str, Any]] = [
            {"request_put": {"key": _b64(key), "value": _b64(value)}} for key, value in puts]
        operations += [{"request_delete_range": {"key": _b64(key)}} for key in deletes]
        request = urllib.request.Request(f"http://{self.endpoint}/v3/kv/txn", method="POST",
                                         data=json.dumps({"success": operations}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return int(json.loads(answer.read())["header"]["revision"])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- the view and its changes ----------------------------------------------------------------------

def _compact(value: Any) -> bytes:
    # The publisher's encoding of one part (edge.etcd.publish), so a change is the bytes it would write.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class ViewParts:
    """The generated view kept as one encoded instance per element, so a changed document is a join away."""

    head: bytes
    instances: list[bytes]
    records: list[dict[str, Any]]

    @classmethod
    def generate(cls, instances: int) -> ViewParts:
        from bench.generate import generate_view

        document = generate_view(instances=instances, networks=1, loopback=True, serial=1)
        records = document.pop("instances")
        head = _compact({**document, "instances": []})
        assert head.endswith(b'"instances":[]}')
        return cls(head[:-len(b"[]}")], [_compact(item) for item in records], records)

    def copy(self) -> ViewParts:
        return ViewParts(self.head, list(self.instances), list(self.records))

    def document(self, serial: int) -> bytes:
        head = self.head.replace(b'"serial":1,', b'"serial":%d,' % serial, 1)
        return b"".join((head, b"[", b",".join(self.instances), b"]}"))


@dataclass(frozen=True)
class Change:
    number: int
    serial: int
    index: int
    address: str
    name: str
    """The instance's new ``Name`` tag."""


def plan_changes(parts: ViewParts, count: int) -> list[Change]:
    """``count`` distinct instances, spread over the view, whose tags the metadata service shows."""
    shown = [i for i, record in enumerate(parts.records) if record["metadata_options"]["tags"]]
    step = max(1, len(shown) // max(1, count))
    chosen = [shown[(n * step + step // 2) % len(shown)] for n in range(count)]
    return [Change(n, 2 + n, index, parts.records[index]["interfaces"][0]["private_ips"][0],
                   f"changed-{n}-{parts.records[index]['tags']['Name']}") for n, index in enumerate(chosen)]


def apply_change(parts: ViewParts, change: Change) -> bytes:
    """Change the instance in ``parts`` (its records are replaced, never modified); its new encoded value."""
    record = parts.records[change.index]
    parts.records[change.index] = {**record, "tags": {**record["tags"], "Name": change.name}}
    parts.instances[change.index] = _compact(parts.records[change.index])
    return parts.instances[change.index]


def _unchanged_instance(parts: ViewParts, changes: list[Change]) -> tuple[int, str]:
    """(index, address) of an instance with tags shown that none of ``changes`` touches."""
    taken = {change.index for change in changes}
    index = next(i for i, record in enumerate(parts.records)
                 if record["metadata_options"]["tags"] and i not in taken)
    return index, parts.records[index]["interfaces"][0]["private_ips"][0]


def whole_documents(parts: ViewParts, changes: list[Change]) -> dict[int, bytes]:
    """The gzip-compressed document after each change (serial -> bytes), made before anything is timed."""
    scratch = parts.copy()
    documents = {}
    for change in changes:
        apply_change(scratch, change)
        documents[change.serial] = gzip.compress(scratch.document(change.serial), 6)
    return documents


# -- gateways ----------------------------------------------------------------------------------------

@dataclass
class Gateway:
    number: int
    process: subprocess.Popen
    metadata_port: int
    admin_port: int
    proxy: CountingProxy | None
    started: float
    log_path: Path
    ready_after: float = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds([self.pid])

    def received(self) -> int:
        return self.proxy.counts()[0] if self.proxy else 0

    def serial(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/view", timeout=2) as answer:
                return json.loads(answer.read()).get("serial")
        except (OSError, ValueError):
            return None

    def memory(self) -> dict[str, int]:
        """Resident bytes (RSS) and proportional set size (PSS) of the process."""
        result = {"rss": 0, "pss": 0}
        try:
            for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("Rss", "Pss"):
                    result[name.lower()] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return result


def start_gateway(number: int, source: str, workdir: Path, poll_interval: float,
                  proxy: CountingProxy | None) -> Gateway:
    metadata, dns, admin = free_port(), free_port(), free_port()
    state = workdir / f"state-{number}"
    shutil.rmtree(state, ignore_errors=True)
    log_path = workdir / f"gateway-{number}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "edge", "serve", "--view", source, "--workers", "1", "--state-dir", str(state),
             "--metadata-listen", f"127.0.0.1:{metadata}", "--dns-listen", f"127.0.0.1:{dns}",
             "--admin-listen", f"127.0.0.1:{admin}", "--poll-interval", f"{poll_interval:g}",
             "--log-level", "warning"],
            env={**os.environ, "EDGE_METADATA_RATE": "0"}, stdout=log, stderr=log)
    return Gateway(number, process, metadata, admin, proxy, time.monotonic(), log_path)


def wait_serial(gateways: list[Gateway], serial: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(gateways)
    while waiting:
        for gateway in list(waiting):
            if gateway.process.poll() is not None:
                raise RuntimeError(f"gateway {gateway.number} exited: {gateway.log_path.read_text()[-2000:]}")
            current = gateway.serial()
            if current is not None and current >= serial:
                gateway.ready_after = time.monotonic() - gateway.started
                waiting.remove(gateway)
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"gateways {[g.number for g in waiting]} not serving serial {serial} "
                               f"within {timeout:g}s")
        time.sleep(0.05)


async def ask_tag(gateway: Gateway, address: str) -> bytes | None:
    """The ``Name`` tag the gateway answers to ``address`` (None when it does not answer 200)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", gateway.metadata_port, local_addr=(address, 0)), 2)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(b"GET " + TAG_PATH + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 2)
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.1 200") else None


# -- one source kind ---------------------------------------------------------------------------------

@dataclass
class Run:
    kind: str
    gateways: list[Gateway] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def etcd_server(directory: Path, request_bytes: int | None):  # noqa: ANN201 - tests.etcd.server.EtcdServer
    from tests.etcd.server import EtcdServer

    extra = ("--max-request-bytes", str(request_bytes)) if request_bytes else ()
    server = EtcdServer(directory / "data", extra_args=extra)
    server.start()
    return server


def measure_kind(kind: str, parts: ViewParts, changes: list[Change], documents: dict[int, bytes], args: argparse.Namespace,
                 workdir: Path, demo_memory: dict[str, int]) -> dict[str, Any]:
    directory = workdir / kind
    directory.mkdir()
    cleanups: list[Any] = []
    gateways: list[Gateway] = []
    result: dict[str, Any] = {"source": kind, "instances": len(parts.instances), "gateways": args.gateways,
                              "changes": len(changes), "load_average_start": load_average()}
    try:
        initial = parts.document(1)
        if kind == "http":
            server = DocumentServer()
            cleanups.append(server.close)
            server.publish(gzip.compress(initial, 6), 1)
            target_port = server.port
            spec = "http://127.0.0.1:{port}/view.json"
            poll = args.document_poll

            def write(change: Change, value: bytes) -> None:
                server.publish(documents[change.serial], change.serial)
        elif kind == "http-changes":
            server = DocumentServer(parts)
            cleanups.append(server.close)
            target_port = server.port
            spec = "http://127.0.0.1:{port}/view.json"
            poll = args.document_poll
            # A gateway turns incremental at its first changes answer (taking the full document
            # once more then): one change before the measured ones, which come one serial later.
            warm_up = Change(-1, 2, *_unchanged_instance(parts, changes), "warm-up")
            changes = [replace(change, serial=change.serial + 1) for change in changes]

            def write(change: Change, value: bytes) -> None:
                server.change(change.serial, parts.records[change.index]["id"], value)
        else:
            request_bytes = None
            if kind == "etcd-key":
                largest = max(len(gzip.compress(initial, 6)), *(len(d) for d in documents.values()))
                needed = largest * 4 // 3 + 65536  # the JSON gateway's base64, and room for the request around it
                if needed > ETCD_DEFAULT_REQUEST_BYTES:
                    request_bytes = needed
            etcd = etcd_server(directory, request_bytes)
            cleanups.append(etcd.stop)
            result["etcd_max_request_bytes"] = request_bytes or "default"
            target_port = etcd.client_port
            client = EtcdWriter(etcd.endpoint)
            if kind == "keyspace":
                view_file = directory / "view.json"
                view_file.write_bytes(initial)
                began = time.monotonic()
                published = subprocess.run(
                    [sys.executable, "-m", "edge", "view", "publish", str(view_file), "--etcd",
                     f"etcd://{etcd.endpoint}/{PREFIX}"], capture_output=True, text=True, timeout=600)
                if published.returncode != 0:
                    raise RuntimeError(f"edge view publish failed: {published.stderr[-2000:]}")
                result["publish_seconds"] = round(time.monotonic() - began, 2)
                result["publish_output"] = published.stdout.strip()
                view_file.unlink()
                spec = "etcd://127.0.0.1:{port}/" + PREFIX
                poll = args.keyspace_poll

                def write(change: Change, value: bytes) -> None:
                    # One transaction: the instance's key, then the serial (what the publisher writes).
                    client.txn([(PREFIX.encode() + b"instances/" + parts.records[change.index]["id"].encode(), value),
                                (PREFIX.encode() + b"serial", str(change.serial).encode())], [])
            else:
                client.txn([(DOCUMENT_KEY.encode(), gzip.compress(initial, 6))], [])
                spec = "etcd://127.0.0.1:{port}/" + DOCUMENT_KEY
                poll = args.document_poll

                def write(change: Change, value: bytes) -> None:
                    client.txn([(DOCUMENT_KEY.encode(), documents[change.serial])], [])
        del initial
        result["poll_interval"] = poll

        def proxied_gateway(number: int) -> Gateway:
            proxy = CountingProxy(target_port)
            cleanups.append(proxy.close)
            gateway = start_gateway(number, spec.format(port=proxy.port), directory, poll, proxy)
            gateways.append(gateway)
            return gateway

        # The first gateway alone: its first load and its memory once loaded.
        first = proxied_gateway(0)
        wait_serial([first], 1, args.start_timeout)
        memory = first.memory()
        result["first_load_seconds"] = round(first.ready_after, 2)
        result["first_load_bytes"] = first.received()
        result["memory"] = {
            "rss_bytes": memory["rss"], "pss_bytes": memory["pss"],
            "rss_per_instance": round((memory["rss"] - demo_memory["rss"]) / len(parts.instances)),
            "pss_per_instance": round((memory["pss"] - demo_memory["pss"]) / len(parts.instances))}
        rest = [proxied_gateway(number) for number in range(1, args.gateways)]
        wait_serial(rest, 1, args.start_timeout)
        if kind == "http-changes":
            write(warm_up, apply_change(parts, warm_up))
            wait_serial(gateways, warm_up.serial, args.start_timeout)
        time.sleep(args.settle)
        result.update(asyncio.run(_propagate(kind, parts, changes, gateways, write, args)))
        # Once the changes are in (an incremental gateway keeps its mirror of the parts by then).
        after = first.memory()
        result["memory"].update({
            "rss_after_changes_per_instance": round((after["rss"] - demo_memory["rss"]) / len(parts.instances)),
            "pss_after_changes_per_instance": round((after["pss"] - demo_memory["pss"]) / len(parts.instances))})
        result["load_average_end"] = load_average()
        for gateway in gateways:
            if gateway.process.poll() is not None:
                raise RuntimeError(f"gateway {gateway.number} exited: {gateway.log_path.read_text()[-2000:]}")
        return result
    finally:
        for gateway in gateways:
            stop(gateway.process, 30)
        for cleanup in reversed(cleanups):
            cleanup()


async def _propagate(kind: str, parts: ViewParts, changes: list[Change], gateways: list[Gateway], write: Any,
                     args: argparse.Namespace) -> dict[str, Any]:
    """The idle baseline, then the changes, probed on every gateway until each shows each."""
    loop = asyncio.get_running_loop()
    probe_address = changes[0].address if changes else "127.0.0.1"

    async def probe_loop(stop_event: asyncio.Event, pending: dict[tuple[int, int], float],
                         served: dict[tuple[int, int], float]) -> None:
        # One probe per gateway per round, changes or not, so the probing costs the gateways the
        # same in the idle baseline as during the changes.  A gateway serves serials in order, so
        # only its oldest unserved change is asked; once it shows, the next ones are asked at once.
        async def _follow(gateway: Gateway) -> None:
            while True:
                waiting = sorted(key for key in pending if key[0] == gateway.number)
                if not waiting:
                    await ask_tag(gateway, probe_address)
                    return
                if not await _check(gateway, changes[waiting[0][1]], waiting[0], pending, served):
                    return

        while not stop_event.is_set():
            await asyncio.gather(*(_follow(gateway) for gateway in gateways))
            await asyncio.sleep(args.probe_every)

    # Idle: the same probing, no changes, for as long as the changes will take.
    idle_seconds = max(2.0, min(20.0, args.interval * len(changes)))
    before = [(g.cpu(), g.received()) for g in gateways]
    stop_event = asyncio.Event()
    began = time.monotonic()
    prober = asyncio.create_task(probe_loop(stop_event, {}, {}))
    await asyncio.sleep(idle_seconds)
    stop_event.set()
    await prober
    idle_elapsed = time.monotonic() - began
    idle = [((g.cpu() - cpu) / idle_elapsed, (g.received() - received) / idle_elapsed)
            for g, (cpu, received) in zip(gateways, before)]

    pending: dict[tuple[int, int], float] = {}
    served: dict[tuple[int, int], float] = {}
    windows: list[list[tuple[float, int]]] = []
    stop_event = asyncio.Event()
    prober = asyncio.create_task(probe_loop(stop_event, pending, served))
    phase_began = time.monotonic()
    phase_before = [(g.cpu(), g.received()) for g in gateways]
    for change in changes:
        due = phase_began + change.number * args.interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        windows.append([(g.cpu(), g.received()) for g in gateways])
        value = apply_change(parts, change)
        await loop.run_in_executor(None, write, change, value)
        written = time.monotonic()
        for gateway in gateways:
            pending[(gateway.number, change.number)] = written
    deadline = time.monotonic() + args.served_timeout
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # The last window ends one interval after the last write, or when the last gateway served it.
    await asyncio.sleep(max(0.0, phase_began + len(changes) * args.interval - time.monotonic()))
    windows.append([(g.cpu(), g.received()) for g in gateways])
    stop_event.set()
    await prober
    phase_elapsed = time.monotonic() - phase_began
    after = [(g.cpu(), g.received()) for g in gateways]

    latencies = sorted(served.values())
    per_gateway = []
    cpu_per_change, bytes_per_change = [], []
    for g, gateway in enumerate(gateways):
        cpu_used = after[g][0] - phase_before[g][0] - idle[g][0] * phase_elapsed
        received = after[g][1] - phase_before[g][1] - idle[g][1] * phase_elapsed
        mine = sorted(t for (number, _), t in served.items() if number == gateway.number)
        window_bytes = [windows[w + 1][g][1] - windows[w][g][1] for w in range(len(windows) - 1)]
        window_cpu = [windows[w + 1][g][0] - windows[w][g][0] - idle[g][0] * args.interval
                      for w in range(len(windows) - 1)]
        per_gateway.append({
            "gateway": gateway.number,
            "served": len(mine),
            "bytes_per_change": round(received / max(1, len(changes))),
            "window_bytes_max": max(window_bytes, default=0),
            "cpu_ms_per_change": round(1000 * cpu_used / max(1, len(changes)), 2),
            "window_cpu_ms_p50": round(1000 * _median(window_cpu), 1),
            "window_cpu_ms_max": round(1000 * max(window_cpu, default=0.0), 1),
            "idle_bytes_per_second": round(idle[g][1]),
            "idle_cpu_ms_per_second": round(1000 * idle[g][0], 2),
            "served_p50_ms": round(1000 * percentile(mine, 0.50), 1) if mine else None,
            "served_p99_ms": round(1000 * percentile(mine, 0.99), 1) if mine else None,
            "served_max_ms": round(1000 * mine[-1], 1) if mine else None,
        })
        cpu_per_change.append(cpu_used / max(1, len(changes)))
        bytes_per_change.append(received / max(1, len(changes)))
    return {
        "served": len(served),
        "expected": len(changes) * len(gateways),
        "unserved": sorted(f"gateway {g} change {c}" for g, c in pending),
        "bytes_per_change_per_gateway": round(statistics.mean(bytes_per_change)) if bytes_per_change else 0,
        "cpu_ms_per_change_per_gateway": round(1000 * statistics.mean(cpu_per_change), 2) if cpu_per_change else 0,
        "served_p50_ms": round(1000 * percentile(latencies, 0.50), 1) if latencies else None,
        "served_p99_ms": round(1000 * percentile(latencies, 0.99), 1) if latencies else None,
        "served_max_ms": round(1000 * latencies[-1], 1) if latencies else None,
        "change_value_bytes": round(statistics.mean(len(parts.instances[c.index]) for c in changes)) if changes else 0,
        "idle_seconds": round(idle_elapsed, 1),
        "phase_seconds": round(phase_elapsed, 1),
        "per_gateway": per_gateway,
    }


async def _check(gateway: Gateway, change: Change, key: tuple[int, int], pending: dict[tuple[int, int], float],
                 served: dict[tuple[int, int], float]) -> bool:
    """Whether ``gateway`` now answers ``change`` (its write-to-served time is then recorded)."""
    answer = await ask_tag(gateway, change.address)
    if answer == change.name.encode() and key in pending:
        served[key] = time.monotonic() - pending.pop(key)
        return True
    return False


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# -- the whole run -----------------------------------------------------------------------------------

def demo_gateway_memory(workdir: Path, timeout: float) -> dict[str, int]:
    """A gateway's memory with the embedded demo view: what a gateway costs before any instance."""
    gateway = start_gateway(99, "demo", workdir, 5.0, None)
    try:
        wait_serial([gateway], 1, timeout)
        time.sleep(0.5)
        return gateway.memory()
    finally:
        stop(gateway.process, 30)


def run(args: argparse.Namespace) -> dict[str, Any]:
    kinds = [kind.strip() for kind in args.sources.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in SOURCES]
    if unknown:
        raise SystemExit(f"unknown source kinds {unknown}; known: {', '.join(SOURCES)}")
    workdir = Path(tempfile.mkdtemp(prefix="edge-propagation-"))
    try:
        report: dict[str, Any] = {"instances": args.instances, "gateways": args.gateways,
                                  "interval_seconds": args.interval, "cpus": os.cpu_count(),
                                  "load_average_start": load_average(), "runs": []}
        began = time.monotonic()
        parts = ViewParts.generate(args.instances)
        report["document_bytes"] = len(parts.document(1))
        report["instance_bytes_mean"] = round(statistics.mean(map(len, parts.instances)))
        keyspace_changes = plan_changes(parts, args.changes)
        document_changes = keyspace_changes[:args.document_changes]
        documents = whole_documents(parts, document_changes) if set(kinds) & {"etcd-key", "http"} else {}
        report["document_gzip_bytes"] = (statistics.mean(map(len, documents.values())) if documents
                                         else len(gzip.compress(parts.document(1), 6)))
        report["document_gzip_bytes"] = round(report["document_gzip_bytes"])
        report["prepare_seconds"] = round(time.monotonic() - began, 1)
        demo_memory = demo_gateway_memory(workdir, args.start_timeout)
        report["demo_gateway_memory"] = demo_memory
        for kind in kinds:
            changes = document_changes if kind in ("etcd-key", "http") else keyspace_changes
            report["runs"].append(measure_kind(kind, parts.copy(), changes, documents, args, workdir, demo_memory))
        report["load_average_end"] = load_average()
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kb(value: float) -> str:
    return f"{value / 1024:,.1f} KB" if value < 1024 * 1024 else f"{value / 1024 / 1024:,.2f} MB"


def render(report: dict[str, Any]) -> str:
    lines = [f"view propagation: {report['instances']:,} instances, {report['gateways']} gateways, "
             f"one change every {report['interval_seconds']:g} s; document {_kb(report['document_bytes'])} "
             f"({_kb(report['document_gzip_bytes'])} gzip), {report['instance_bytes_mean']} bytes per instance; "
             f"load average {report['load_average_start']} -> {report['load_average_end']} on {report['cpus']} cpus",
             "",
             "| source | poll s | changes | served | bytes/change/gateway | CPU ms/change/gateway | "
             "write-to-served p50 / p99 / max ms | first load s | RSS/PSS per instance | idle bytes/s/gateway |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run_ in report["runs"]:
        idle = statistics.mean(g["idle_bytes_per_second"] for g in run_["per_gateway"])
        memory = run_["memory"]
        lines.append(
            f"| {run_['source']} | {run_['poll_interval']:g} | {run_['changes']} | {run_['served']}/{run_['expected']} "
            f"| {run_['bytes_per_change_per_gateway']:,} | {run_['cpu_ms_per_change_per_gateway']:.1f} "
            f"| {run_['served_p50_ms']} / {run_['served_p99_ms']} / {run_['served_max_ms']} "
            f"| {run_['first_load_seconds']} | {memory['rss_per_instance']:,} / {memory['pss_per_instance']:,} B "
            f"(after the changes {memory['rss_after_changes_per_instance']:,} / "
            f"{memory['pss_after_changes_per_instance']:,} B) "
            f"| {idle:,.0f} |")
    lines += ["", "per gateway:", "",
              "| source | gateway | served | bytes/change | largest window bytes | CPU ms/change | window CPU ms p50 / max "
              "| p50 / p99 / max ms | idle CPU ms/s |", "|---|---|---|---|---|---|---|---|---|"]
    for run_ in report["runs"]:
        for g in run_["per_gateway"]:
            lines.append(f"| {run_['source']} | {g['gateway']} | {g['served']} | {g['bytes_per_change']:,} "
                         f"| {g['window_bytes_max']:,} | {g['cpu_ms_per_change']:.1f} "
                         f"| {g['window_cpu_ms_p50']} / {g['window_cpu_ms_max']} "
                         f"| {g['served_p50_ms']} / {g['served_p99_ms']} / {g['served_max_ms']} "
                         f"| {g['idle_cpu_ms_per_second']} |")
    for run_ in report["runs"]:
        notes = []
        if "publish_seconds" in run_:
            notes.append(f"published in {run_['publish_seconds']} s ({run_['publish_output']})")
        if run_.get("etcd_max_request_bytes") not in (None, "default"):
            notes.append(f"etcd started with --max-request-bytes {run_['etcd_max_request_bytes']:,} "
                         "(the document is over the default 1.5 MiB)")
        if run_["unserved"]:
            notes.append(f"NOT SERVED within the timeout: {', '.join(run_['unserved'])}")
        notes.append(f"load average {run_['load_average_start']} -> {run_['load_average_end']}")
        lines.append(f"\n{run_['source']}: " + "; ".join(notes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--changes", type=int, default=20, help="changes to the keyspace")
    parser.add_argument("--document-changes", type=int, default=10,
                        help="changes to the whole-document sources (each costs every gateway the document)")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between changes")
    parser.add_argument("--document-poll", type=float, default=1.0, help="poll interval of the document sources")
    parser.add_argument("--keyspace-poll", type=float, default=5.0, help="poll interval (safety net) of the keyspace")
    parser.add_argument("--probe-every", type=float, default=0.02, help="seconds between probes of a gateway")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after every gateway is serving")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--served-timeout", type=float, default=30.0,
                        help="seconds after the last change to wait for every gateway to serve every change")
    parser.add_argument("--json", type=Path, help="also write the raw report here")
    args = parser.parse_args(argv)
    if args.gateways < 1 or args.changes < 1:
        parser.error("at least one gateway and one change")
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(render(report))
    return 0 if all(not run_["unserved"] for run_ in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
