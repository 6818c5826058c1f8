"""View pipeline at scale: build time, resident memory, and event-loop stall during a swap.

Usage: ``python -m bench.view_scale [--sizes 1000,10000,100000] [--repeat 3]``

Each size runs in a fresh interpreter so memory figures are not polluted by
earlier sizes.  For every size it measures, with the document already in memory
as bytes (as the source hands it over):

* build: decode + validate + index (``Poller._build``), median of ``--repeat`` runs;
* resident memory of the serving process once the snapshot is swapped in and the
  document dropped, per instance;
* stall: the longest gap seen by a 1 ms ticker on the event loop while a real
  ``Poller`` decodes and builds the new view in its thread and swaps it in.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(size: int, repeat: int) -> dict[str, float]:
    import uvloop

    from edge.config import ViewConfig
    from edge.testing.generate import generate_view
    from edge.view.poller import Poller, _building
    from edge.view.store import ViewStore

    data = json.dumps(generate_view(instances=size, networks=8, serial=1)).encode()
    newer = json.dumps(generate_view(instances=size, networks=8, serial=2)).encode()
    gc.collect()
    baseline = _rss_bytes()

    class OneShot:
        description = "bench"

        def __init__(self) -> None:
            self.pending: bytes | None = None

        async def fetch(self) -> bytes | None:
            pending, self.pending = self.pending, None
            return pending

    source = OneShot()
    store = ViewStore("bench")
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None)

    builds = []
    for _ in range(repeat):
        with _building():
            started = time.perf_counter()
            snapshot = poller._build(data, None)
            builds.append(time.perf_counter() - started)
            del snapshot
        gc.collect()

    async def swap_under_ticks(document: bytes) -> float:
        worst = 0.0
        running = True

        async def ticker() -> None:
            nonlocal worst
            last = time.perf_counter()
            while running:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                worst = max(worst, now - last - 0.001)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        source.pending = document
        outcome = await poller.poll_once()
        assert outcome.result == "accepted", outcome
        await asyncio.sleep(0.05)
        running = False
        await task
        return worst

    stall_first = uvloop.run(swap_under_ticks(data))
    del data
    gc.collect()
    resident = _rss_bytes() - baseline - len(newer)
    stall_swap = uvloop.run(swap_under_ticks(newer))
    return {
        "instances": size,
        "build_median_s": statistics.median(builds),
        "build_min_s": min(builds),
        "build_max_s": max(builds),
        "resident_mb": resident / 2**20,
        "resident_per_instance_kb": resident / size / 1024,
        "stall_first_load_ms": stall_first * 1000,
        "stall_swap_ms": stall_swap * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeat)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, "-m", "bench.view_scale", "--one", str(size),
                              "--repeat", str(args.repeat)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout))
    print("| instances | build median (min-max) | resident | per instance | loop stall, first load | loop stall, swap |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['instances']:,} | {r['build_median_s']:.2f} s ({r['build_min_s']:.2f}-{r['build_max_s']:.2f}) "
              f"| {r['resident_mb']:.0f} MB | {r['resident_per_instance_kb']:.1f} KB "
              f"| {r['stall_first_load_ms']:.1f} ms | {r['stall_swap_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
