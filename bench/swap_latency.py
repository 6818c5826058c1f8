"""Latency under steady load while a large view is swapped in, and time from new serial to serving.

Usage: ``python -m bench.swap_latency [--instances 100000] [--rate 1000] [--workers 1,2] [--change delta,full]``

For each worker count and kind of change: generate a view of N instances (flat
network on 127.x.y.z), start edge on it (pinned to cpu 1 on a machine with
several cores; the client runs on cpu 0), run a steady keep-alive client from
one instance address at a fixed request rate, publish a new serial that adds
one instance, and report p50/p99/max latency for the requests sent during the swap window
(publish -> every worker serving the new view), the longest gap between two
answers, and the time from the new serial at the source to the new instance
being answered.  Bounded: one swap per worker count, a few seconds each.

``delta``: the new serial only adds the instance, so every process builds it
as a delta of the served snapshot.  ``full``: the new serial also changes
``cloud`` (the DNS TTL), which forces a full build: with several workers and a
view of at least ``view.swap_by_restart_instances`` instances, replacement
workers build it while the old ones keep serving.
Traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import free_port


def _write_view(path: Path, document: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document))
    os.replace(temporary, path)


def _view_summary(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/view", timeout=5) as response:
        return json.loads(response.read())


async def _steady_client(port: int, source: str, rate: float, samples: list[tuple[float, float]],
                         stop: asyncio.Event, reconnects: list[float]) -> None:
    """Keep-alive requests at a fixed rate; a connection closed by a retiring worker is reopened."""
    request = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"
    interval = 1.0 / rate
    next_at = time.perf_counter()
    writer = None
    while not stop.is_set():
        sent = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError):
            reconnects.append(sent)
            writer = None
            continue
        samples.append((sent, time.perf_counter() - sent))
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    if writer is not None:
        writer.close()


async def _probe_new_instance(port: int, source: str) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 2)
        writer.write(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 2)
        writer.close()
        return data.startswith(b"HTTP/1.1 200")
    except (OSError, asyncio.TimeoutError):
        return False


def _pinning() -> tuple[list[str], int | None]:
    """(command prefix for the server, cpu for this client) when there are cores to separate."""
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return [], None
    return ["taskset", "-c", "1"], 0


def run_one(instances: int, workers: int, rate: float, workdir: Path, restart_threshold: int,
            change: str = "delta") -> dict:
    from bench.generate import generate_view

    view_path = workdir / "view.json"
    document = generate_view(instances=instances, networks=1, loopback=True, serial=1)
    _write_view(view_path, document)
    ports = {name: free_port() for name in ("metadata", "dns", "admin")}
    state = workdir / f"state-{workers}"
    shutil.rmtree(state, ignore_errors=True)
    server_prefix, client_cpu = _pinning()
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    process = subprocess.Popen(
        [*server_prefix, sys.executable, "-m", "edge", "serve", "--view", str(view_path), "--workers", str(workers),
         "--state-dir", str(state), "--metadata-listen", f"127.0.0.1:{ports['metadata']}",
         "--dns-listen", f"127.0.0.1:{ports['dns']}", "--admin-listen", f"127.0.0.1:{ports['admin']}",
         "--poll-interval", "0.5", "--log-level", "warning"],
        env={**os.environ, "EDGE_METADATA_RATE": "0",
             "EDGE_VIEW_SWAP_BY_RESTART_INSTANCES": str(restart_threshold)},
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if _view_summary(ports["admin"])["serial"] == 1:
                    with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/readyz", timeout=2):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("edge did not become ready")
            time.sleep(0.5)
        time.sleep(2.0)  # let workers settle (with several workers each has loaded the view)
        client_address = document["instances"][0]["interfaces"][0]["private_ips"][0]
        newcomer = dict(document["instances"][-1])
        new_address = "127.250.250.250"
        newcomer["id"] = "i-0000000000swap01"
        newcomer["interfaces"] = [dict(newcomer["interfaces"][0], id="eni-swap01", mac="d0:0d:ff:ff:ff:01",
                                       private_ips=[new_address], public_ip=None)]
        document["instances"].append(newcomer)
        document["serial"] = 2
        if change == "full":
            document["cloud"]["dns_ttl"] = int(document["cloud"].get("dns_ttl", 60)) + 1
        staged = workdir / "view-serial-2.json"
        staged.write_text(json.dumps(document))
        del document

        async def scenario() -> dict:
            samples: list[tuple[float, float]] = []
            reconnects: list[float] = []
            stop = asyncio.Event()
            client = asyncio.create_task(_steady_client(ports["metadata"], client_address, rate, samples, stop,
                                                        reconnects))
            await asyncio.sleep(2.0)
            baseline = [latency for _, latency in samples]
            published = time.perf_counter()
            os.replace(staged, view_path)  # a rename: the client's loop does no heavy work meanwhile
            served_at = None
            while time.perf_counter() - published < 120:
                if await _probe_new_instance(ports["metadata"], new_address):
                    served_at = time.perf_counter()
                    break
                await asyncio.sleep(0.05)
            # Keep measuring until every worker has the new view (or a few seconds at most).
            settle_until = time.perf_counter() + (8.0 if workers > 1 else 1.0)
            while time.perf_counter() < settle_until:
                summary = await asyncio.to_thread(_view_summary, ports["admin"])
                if summary["serial"] == 2 and workers == 1:
                    break
                await asyncio.sleep(0.2)
            window_end = time.perf_counter()
            stop.set()
            await client
            during = [latency for sent, latency in samples if published <= sent <= window_end]
            times = [sent for sent, _ in samples]
            gaps = [b - a for a, b in zip(times, times[1:]) if a >= published]
            return {
                "instances": instances, "workers": workers, "rate": rate, "change": change,
                "baseline_p99_ms": 1000 * _quantile(baseline, 0.99),
                "swap_p50_ms": 1000 * _quantile(during, 0.50),
                "swap_p99_ms": 1000 * _quantile(during, 0.99),
                "swap_max_ms": 1000 * max(during) if during else 0.0,
                "longest_gap_ms": 1000 * max(gaps) if gaps else 0.0,
                "serial_to_serving_s": (served_at - published) if served_at else None,
                "requests_in_window": len(during),
                "reconnects": len(reconnects),
            }

        import uvloop
        return uvloop.run(scenario())
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=100000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--change", default="delta,full",
                        help="kinds of new serial: delta (one instance added) and/or full (cloud changed too)")
    parser.add_argument("--restart-threshold", type=int, default=20000,
                        help="view.swap_by_restart_instances for the runs (0: always swap in place)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for change in args.change.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                rows.append(run_one(args.instances, workers, args.rate, Path(directory), args.restart_threshold,
                                    change))
    print(f"Steady keep-alive load at {args.rate:g} req/s from one instance while serial 2 of a "
          f"{args.instances:,}-instance view is swapped in (poll interval 0.5 s); server pinned to cpu 1, "
          f"client to cpu 0.\n")
    print("| new serial | workers | baseline p99 | swap p50 | swap p99 | swap max | longest gap | new serial -> served | reconnects |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        served = f"{r['serial_to_serving_s']:.2f} s" if r["serial_to_serving_s"] is not None else "not served"
        print(f"| {r['change']} | {r['workers']} | {r['baseline_p99_ms']:.2f} ms | {r['swap_p50_ms']:.2f} ms | "
              f"{r['swap_p99_ms']:.2f} ms | {r['swap_max_ms']:.1f} ms | {r['longest_gap_ms']:.1f} ms | {served} "
              f"| {r['reconnects']} |")
    print("\n```json\n" + json.dumps(rows, indent=1) + "\n```")


if __name__ == "__main__":
    main()
