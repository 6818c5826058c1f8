"""Load test: edge's metadata worker against nginx ``return 200`` in the same run.

Both servers run one process pinned to one core (``--server-cpu``), ``wrk`` (one
thread) to another (``--client-cpu``).  Each is measured with keep-alive and with
``Connection: close`` (a new connection per request, as real IMDS clients do).
Reported: requests/s, server CPU per request (utime+stime from /proc/PID/stat
over the run), p99 latency, and edge/nginx ratios.  Bounded: ``--duration``
seconds per measurement, ``--rounds`` rounds (medians are reported).

    python bench/metadata_load.py --duration 5 --rounds 3 [--bare]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds, free_port, start_helper_server, wait_tcp  # noqa: E402

PATH = "/latest/meta-data/instance-id"
BODY = "i-0de0000000000001"  # what edge answers 127.0.0.1 for PATH in the demo view


@dataclass
class Result:
    server: str
    mode: str
    requests_per_second: float
    cpu_us_per_request: float
    p99_ms: float
    errors: int


def start_python(cpu: int, script: str, *args: str) -> tuple[subprocess.Popen, int]:
    child, port = start_helper_server(script, *args, prefix=["taskset", "-c", str(cpu)])
    wait_tcp(port)
    return child, port


def start_nginx(cpu: int, directory: Path, mode: str = "return") -> tuple[subprocess.Popen, int]:
    """One nginx process on ``cpu`` answering BODY: ``return 200`` (the floor) or a ``map`` of the client's
    address to its answer over 1,000 addresses (the realistic static peer); see bench/peer_configs.py."""
    from bench.peer_configs import instance_addresses, nginx_conf

    port = free_port()
    conf = directory / f"nginx-{mode}.conf"
    conf.write_text(nginx_conf(directory, port, BODY, mode, instance_addresses(1000, BODY)))
    child = subprocess.Popen(["taskset", "-c", str(cpu), "nginx", "-p", str(directory), "-c", str(conf)],
                             stderr=subprocess.PIPE)
    wait_tcp(port)
    return child, port


def run_wrk(port: int, cpu: int, duration: float, connections: int, close: bool) -> tuple[int, float, float, int]:
    """(requests, requests/s, p99 ms, errors and timeouts) of one wrk run."""
    argv = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
            f"http://127.0.0.1:{port}{PATH}"]
    if close:
        argv[5:5] = ["-H", "Connection: close"]
    output = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    from bench.peers import parse_wrk

    requests, rate, _, p99, errors, timeouts = parse_wrk(output)
    return requests, rate, p99, errors + timeouts


def measure(name: str, pid: int, port: int, mode: str, args: argparse.Namespace) -> Result:
    close = mode == "close"
    connections = args.connections_close if close else args.connections
    before = cpu_seconds([pid])
    requests, rate, p99, errors = run_wrk(port, args.client_cpu, args.duration, connections, close)
    used = cpu_seconds([pid]) - before
    return Result(name, mode, rate, used / max(requests, 1) * 1e6, p99, errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (max 30)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (max 5)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections, keep-alive")
    parser.add_argument("--connections-close", type=int, default=32, help="wrk connections, Connection: close")
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--bare", action="store_true",
                        help="also measure bench/metadata_bare.py (uvloop + httptools, fixed answer): the floor")
    args = parser.parse_args()
    args.duration = min(args.duration, 30.0)
    args.rounds = max(1, min(args.rounds, 5))
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="edge-metadata-load-") as temporary:
        directory = Path(temporary)
        edge, edge_port = start_python(args.server_cpu, "metadata_server.py", "--state-dir",
                                       str(directory / "edge-state"))
        nginx, nginx_port = start_nginx(args.server_cpu, directory)
        servers = [("edge", edge, edge_port), ("nginx", nginx, nginx_port)]
        if args.bare:
            bare, bare_port = start_python(args.server_cpu, "metadata_bare.py")
            servers.append(("bare uvloop+httptools", bare, bare_port))
        try:
            check = subprocess.run(["curl", "-s", f"http://127.0.0.1:{edge_port}{PATH}"], capture_output=True,
                                   text=True).stdout
            assert check == BODY, check
            results: dict[tuple[str, str], list[Result]] = {}
            for _ in range(args.rounds):
                for mode in ("keep-alive", "close"):
                    for name, child, port in servers:
                        time.sleep(0.5)
                        results.setdefault((name, mode), []).append(measure(name, child.pid, port, mode, args))
        finally:
            for _, child, _ in servers:
                child.terminate()
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
    print(f"# {args.rounds} round(s) x {args.duration:g}s, wrk -t1 on cpu {args.client_cpu}, servers on cpu "
          f"{args.server_cpu}; keep-alive -c{args.connections}, close -c{args.connections_close}; "
          f"body {len(BODY)} bytes")
    print("| server | mode | req/s | server CPU us/req | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|")
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    for (name, mode), runs in results.items():
        rate = statistics.median(r.requests_per_second for r in runs)
        cpu = statistics.median(r.cpu_us_per_request for r in runs)
        p99 = statistics.median(r.p99_ms for r in runs)
        errors = sum(r.errors for r in runs)
        medians[(name, mode)] = (rate, cpu)
        print(f"| {name} | {mode} | {rate:,.0f} | {cpu:.1f} | {p99:.2f} | {errors} |")
    troubled = [f"{name} {mode}: {sum(r.errors for r in runs)} errors or timeouts"
                for (name, mode), runs in results.items() if any(r.errors for r in runs)]
    if troubled:
        print("INVALID, no ratios: a server was not error-free (" + "; ".join(troubled) + ")")
        return 1
    for mode in ("keep-alive", "close"):
        edge_rate, edge_cpu = medians[("edge", mode)]
        nginx_rate, nginx_cpu = medians[("nginx", mode)]
        print(f"{mode}: edge/nginx requests/s = {edge_rate / nginx_rate:.2f}, "
              f"CPU per request = {edge_cpu / nginx_cpu:.2f}x nginx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
