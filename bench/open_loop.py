"""Open-loop load: requests offered at a fixed rate whatever the server does, latency per offered rate.

A closed-loop generator (wrk, dnsperf without ``-Q``) sends the next request
when an answer comes back, so a slow server is offered less load and its worst
latencies are never seen.  Here the n-th request is due at ``start + n / rate``
and its latency is counted from that moment, so a server that falls behind
shows it in its percentiles (no coordinated omission).

* HTTP: ``python -m bench.open_loop --port P --rate R --seconds S`` keeps
  ``--connections`` keep-alive connections (one request at a time on each, as
  IMDS clients do); a request due while every connection is busy waits, and
  its wait counts.  One Python process on one core can offer some tens of
  thousands of requests/s: a point it could not offer is reported as
  generator-limited, never as the server's latency.
* DNS: ``dnsperf -Q RATE`` with per-query output (``dns_point``), with enough
  queries in flight allowed that the rate, not a window, sets the pace.

``sweep`` runs one server through increasing offered rates and stops after the
first point where it saturates (answers below 95% of the offered rate, or any
timeout).  Given the server's process ids, each point also records the
server's CPU per answered request, and ``equal_load`` compares servers by it at
the rates every one of them handled cleanly: on a machine where one generator
core cannot saturate the fastest servers, CPU per request at the same offered
rate is the comparison that still separates them.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import cpu_seconds, percentile

TIMEOUT = 2.0
"""Seconds after which an unanswered request counts as a timeout (dnsperf's ``-t`` too)."""


@dataclass(slots=True)
class Point:
    """One server at one offered rate."""

    server: str
    offered: float
    """Requests per second asked for."""
    sent_rate: float
    """Requests per second the generator managed to send on schedule."""
    answered_rate: float
    completed: int
    errors: int = 0
    timeouts: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    generator_limited: bool = False
    """The generator could not offer the rate (sent below 95% of it, or its own core over 90% busy): the
    point says nothing about the server."""
    server_cpu_us: float = 0.0
    """The server's CPU (utime + stime of its process tree) per answered request over the point; 0 when not
    measured."""

    @property
    def saturated(self) -> bool:
        return self.timeouts > 0 or self.errors > 0 or self.answered_rate < 0.95 * self.offered


def latency_point(server: str, offered: float, seconds: float, sent: int, latencies: list[float], errors: int,
                  timeouts: int, generator_busy: float = 0.0) -> Point:
    """A Point from raw counts; ``latencies`` in seconds (sorted here), ``generator_busy`` the share of its
    core the generator used while sending."""
    latencies.sort()
    sent_rate = sent / seconds if seconds else 0.0
    return Point(server, offered, sent_rate, len(latencies) / seconds if seconds else 0.0, len(latencies), errors,
                 timeouts, percentile(latencies, 0.50) * 1000, percentile(latencies, 0.90) * 1000,
                 percentile(latencies, 0.99) * 1000, sent_rate < 0.95 * offered or generator_busy > 0.9)


# -- HTTP ----------------------------------------------------------------------------------------------

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)

def _response_end(buffer: bytes | bytearray) -> tuple[int, int]:
    """(length of the first complete response in ``buffer`` or -1, its status code)."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return -1, 0
    found = CONTENT_LENGTH.search(buffer, 0, head_end)
    total = head_end + 4 + (int(found.group(1)) if found else 0)
    if len(buffer) < total:
        return -1, 0
    return total, int(buffer[9:12])


def http_point(port: int, path: str, rate: float, seconds: float, connections: int = 64,
               host: str = "127.0.0.1") -> tuple[int, list[float], int, int, float]:
    """Offer ``rate`` requests/s for ``seconds``: (sent within the time, latencies in s, errors, timeouts,
    share of its core this process used while sending)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    epoll = select.epoll()
    idle: list[socket.socket] = []
    busy: dict[int, tuple[socket.socket, float, bytearray]] = {}
    for _ in range(connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((host, port))
        sock.setblocking(False)
        epoll.register(sock.fileno(), select.EPOLLIN)
        idle.append(sock)
    by_fd = {sock.fileno(): sock for sock in idle}
    latencies: list[float] = []
    errors = timeouts = sent = 0
    total = int(rate * seconds)
    interval = 1.0 / rate
    start = time.perf_counter() + 0.01
    cpu_start = time.process_time()
    sent_in_time = 0
    deadline = start + seconds + TIMEOUT
    try:
        while (sent < total or busy) and time.perf_counter() < deadline:
            now = time.perf_counter()
            # Send everything that is due, on whatever connection is free.
            while sent < total and idle:
                due = start + sent * interval
                if due > now:
                    break
                sock = idle.pop()
                try:
                    sock.send(request)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN,):
                        errors += 1
                        sent += 1
                        continue
                busy[sock.fileno()] = (sock, due, bytearray())
                sent += 1
                if now <= start + seconds:
                    sent_in_time = sent
            wait = 0.0 if (sent < total and idle and start + sent * interval <= now) else \
                max(0.0, min((start + sent * interval - now) if sent < total else 0.05, 0.05))
            for fd, _ in epoll.poll(wait):
                sock = by_fd[fd]
                entry = busy.get(fd)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if entry is None:  # data or close on an idle connection: the server misbehaved
                    errors += 1
                    continue
                if not data:
                    errors += 1
                    busy.pop(fd)
                    epoll.unregister(fd)
                    continue
                buffer = entry[2]
                buffer += data
                length, status = _response_end(buffer)
                if length < 0:
                    continue
                latencies.append(time.perf_counter() - entry[1])
                if status != 200:
                    errors += 1
                busy.pop(fd)
                idle.append(sock)
        timeouts = len(busy) + (total - sent)
        busy_share = (time.process_time() - cpu_start) / max(time.perf_counter() - start, 1e-9)
    finally:
        for sock in by_fd.values():
            sock.close()
        epoll.close()
    return sent_in_time, latencies, errors, timeouts, busy_share


def http_sweep_point(server: str, port: int, path: str, rate: float, seconds: float, cores: Sequence[int],
                     connections: int = 64, server_pids: Sequence[int] = ()) -> Point:
    """One HTTP point measured by this module in its own process on the generator's cores."""
    before = cpu_seconds(server_pids)
    argv = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "bench.open_loop", "--port", str(port),
            "--path", path, "--rate", f"{rate:g}", "--seconds", f"{seconds:g}", "--connections", str(connections),
            "--server", server]
    done = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          timeout=seconds + TIMEOUT + 30)
    if done.returncode != 0:
        raise RuntimeError(f"open-loop generator failed: {done.stderr.strip()[-500:]}")
    point = Point(**json.loads(done.stdout))
    point.server_cpu_us = (cpu_seconds(server_pids) - before) / max(point.completed, 1) * 1e6 if server_pids else 0.0
    return point


# -- DNS -----------------------------------------------------------------------------------------------

def parse_dnsperf_verbose(output: str) -> tuple[int, list[float], int, int]:
    """(sent, latencies in s, non-NOERROR answers, lost) from ``dnsperf -v`` output."""
    latencies = []
    errors = 0
    for match in re.finditer(r"^> (\w+) .* ([\d.]+)$", output, re.MULTILINE):
        latencies.append(float(match.group(2)))
        errors += match.group(1) != "NOERROR"
    sent_match = re.search(r"Queries sent:\s+(\d+)", output)
    lost_match = re.search(r"Queries lost:\s+(\d+)", output)
    return (int(sent_match.group(1)) if sent_match else len(latencies), latencies, errors,
            int(lost_match.group(1)) if lost_match else 0)


def dns_point(server: str, port: int, queries: Path, rate: float, seconds: float, cores: Sequence[int],
              server_pids: Sequence[int] = ()) -> Point:
    before = cpu_seconds(server_pids)
    argv = ["taskset", "-c", ",".join(map(str, cores)), "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d",
            str(queries), "-l", f"{seconds:g}", "-c", "4", "-q", "20000", "-t", f"{TIMEOUT:g}", "-Q",
            f"{int(rate)}", "-v"]
    output = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + TIMEOUT + 30).stdout
    used = cpu_seconds(server_pids) - before
    sent, latencies, errors, lost = parse_dnsperf_verbose(output)
    point = latency_point(server, rate, seconds, sent, latencies, errors, lost)
    point.server_cpu_us = used / max(point.completed, 1) * 1e6 if server_pids else 0.0
    return point


# -- sweeps --------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Sweep:
    server: str
    protocol: str
    points: list[Point] = field(default_factory=list)


def sweep(server: str, protocol: str, rates: Sequence[float], measure: Callable[[float], Point],
          log: Callable[[str], None] = print) -> Sweep:
    """``measure`` at each rate in order; stops after the first saturated or generator-limited point."""
    result = Sweep(server, protocol)
    for rate in rates:
        point = measure(rate)
        result.points.append(point)
        log(f"open loop: {server} {rate:,.0f}/s -> answered {point.answered_rate:,.0f}/s, p99 {point.p99_ms:.2f} ms"
            f"{' (generator-limited)' if point.generator_limited else ''}{' (saturated)' if point.saturated else ''}")
        if point.saturated or point.generator_limited:
            break
    return result


def markdown(sweeps: Sequence[Sweep], unit: str) -> str:
    lines = [f"| server | offered {unit} | answered {unit} | p50 ms | p90 ms | p99 ms | errors / timeouts "
             "| server CPU µs per answer | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for item in sweeps:
        for p in item.points:
            note = ("generator could not offer this rate" if p.generator_limited
                    else "saturated" if p.saturated else "")
            cpu = f"{p.server_cpu_us:.1f}" if p.server_cpu_us else "-"
            lines.append(f"| {p.server} | {p.offered:,.0f} | {p.answered_rate:,.0f} | {p.p50_ms:.3f} | {p.p90_ms:.3f} "
                         f"| {p.p99_ms:.3f} | {p.errors} / {p.timeouts} | {cpu} | {note} |")
    return "\n".join(lines)


def _clean(point: Point) -> bool:
    return not point.saturated and not point.generator_limited and point.server_cpu_us > 0


def equal_load(sweeps: Sequence[Sweep], reference: str, unit: str) -> str:
    """Server CPU per answer at each offered rate that ``reference`` and the other server both handled
    cleanly (no saturation, no generator limit), with the ratio reference / this (below 1: the reference
    spends less)."""
    by_server = {s.server: {p.offered: p for p in s.points if _clean(p)} for s in sweeps}
    base = by_server.get(reference, {})
    lines = [f"| offered {unit} | server | server CPU µs per answer | {reference} µs | {reference} / this |",
             "|---:|---|---:|---:|---:|"]
    for server, points in by_server.items():
        if server == reference:
            continue
        for offered in sorted(set(points) & set(base)):
            mine, theirs = base[offered].server_cpu_us, points[offered].server_cpu_us
            lines.append(f"| {offered:,.0f} | {server} | {theirs:.1f} | {mine:.1f} | {mine / theirs:.2f}x |")
    if len(lines) == 2:
        return "_no offered rate that every server handled cleanly with its CPU measured_"
    return "\n".join(lines)


def to_json(sweeps: Sequence[Sweep]) -> list[dict]:
    return [{"server": s.server, "protocol": s.protocol, "points": [asdict(p) for p in s.points]} for s in sweeps]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one open-loop HTTP point; prints it as JSON")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/latest/meta-data/instance-id")
    parser.add_argument("--rate", type=float, required=True, help="requests per second offered")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--server", default="server", help="name to report")
    args = parser.parse_args(argv)
    seconds = min(max(args.seconds, 0.2), 30.0)
    sent, latencies, errors, timeouts, busy = http_point(args.port, args.path, args.rate, seconds, args.connections)
    print(json.dumps(asdict(latency_point(args.server, args.rate, seconds, sent, latencies, errors, timeouts, busy))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
