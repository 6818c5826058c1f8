"""What one instance change costs a gateway, step by step, in one process (no etcd, no network).

Usage: ``python -m bench.view_change [--instances 100000] [--changes 20] [--dns] [--state]``

The view of bench/view_propagation.py (generated, one network) is fed to a
:class:`~edge.view.keyspace.Keyspace` as an etcd fresh read would (one item
per key), built by a real :class:`~edge.view.poller.Poller`, then changed one
instance at a time (its ``Name`` tag, then the serial, as the publisher writes
them) and each change delivered to the poller as a prepared view, as the etcd
keyspace source does after a watch event.  Printed, per step:

* first load: ``Keyspace.reset`` and the full build (CPU seconds of this process);
* per change (median and max over ``--changes``): ``Keyspace.put`` of the two keys,
  ``Keyspace.prepared``, the build (``apply_delta`` and preparers, in the poller's
  thread) and the whole poll (build, swap, persisting: ``--state`` writes the
  last-good view in a temporary directory as a gateway does);
* resident memory per instance once the view is served (growth since before the
  keys were read, divided by the instance count).

``--dns`` adds the DNS service's preparer (a gateway answering DNS runs it on every build).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.view_propagation import ViewParts, apply_change, plan_changes  # noqa: E402
from edge.config import ViewConfig  # noqa: E402
from edge.view.keyspace import INSTANCES, SERIAL, Keyspace, PreparedView  # noqa: E402
from edge.view.poller import Poller  # noqa: E402
from edge.view.sources import ViewSource  # noqa: E402
from edge.view.statefile import StateFile  # noqa: E402
from edge.view.store import ViewStore  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class _Handed(ViewSource):
    description = "bench"

    def __init__(self) -> None:
        self.pending: PreparedView | None = None

    async def fetch(self) -> PreparedView | None:
        pending, self.pending = self.pending, None
        return pending


def _items(parts: ViewParts) -> list[tuple[str, bytes, int]]:
    head = json.loads(parts.head + b"[]}")
    items = [(SERIAL, b"1", 1), ("cloud", json.dumps(head.get("cloud", {})).encode(), 2)]
    items += [(f"networks/{n['id']}", json.dumps(n).encode(), 3) for n in head.get("networks", [])]
    items += [(INSTANCES + record["id"], text, 4 + n) for n, (record, text) in
              enumerate(zip(parts.records, parts.instances))]
    return sorted(items)  # as etcd returns a range: in key order


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--dns", action="store_true", help="run the DNS preparer on every build")
    parser.add_argument("--state", action="store_true", help="keep the last-good view in a temporary directory")
    args = parser.parse_args()

    parts = ViewParts.generate(args.instances)
    changes = plan_changes(parts, args.changes)
    items = _items(parts)
    preparers = []
    if args.dns:
        from edge.dns.zonedata import make_preparer
        preparers.append(make_preparer())
    build_cpu: list[float] = []
    real_build = Poller._build

    def timed_build(self: Poller, *rest: object) -> object:
        start = time.thread_time()
        try:
            return real_build(self, *rest)  # type: ignore[arg-type]
        finally:
            build_cpu.append(time.thread_time() - start)

    Poller._build = timed_build  # type: ignore[method-assign,assignment]
    directory = tempfile.TemporaryDirectory(prefix="edge-view-change-")
    gc.collect()
    rss_before = _rss_bytes()

    async def scenario() -> dict[str, object]:
        source = _Handed()
        store = ViewStore("bench")
        state = StateFile(directory.name, "bench") if args.state else None
        poller = Poller(ViewConfig(state_dir=directory.name), source, store, state, preparers)
        keyspace = Keyspace("bench")
        start = time.process_time()
        keyspace.reset(items)
        reset_cpu = time.process_time() - start
        items.clear()
        start = time.process_time()
        source.pending = keyspace.prepared(incremental=False)
        outcome = await poller.poll_once()
        first_cpu = time.process_time() - start
        assert outcome.result == "accepted", outcome
        await asyncio.gather(*list(poller._releases))
        gc.collect()
        memory = (_rss_bytes() - rss_before) / args.instances
        put_ms, prepared_ms, poll_ms, poll_wall_ms = [], [], [], []
        build_cpu.clear()
        for change in changes:
            text = apply_change(parts, change)
            instance_id = parts.records[change.index]["id"]
            start = time.process_time()
            keyspace.put(INSTANCES + instance_id, text, 10_000_000 + change.number * 2)
            keyspace.put(SERIAL, str(change.serial).encode(), 10_000_001 + change.number * 2)
            put_ms.append((time.process_time() - start) * 1000)
            start = time.process_time()
            source.pending = keyspace.prepared(incremental=True)
            prepared_ms.append((time.process_time() - start) * 1000)
            start, wall = time.process_time(), time.perf_counter()
            outcome = await poller.poll_once()
            await asyncio.gather(*list(poller._releases))
            poll_ms.append((time.process_time() - start) * 1000)
            poll_wall_ms.append((time.perf_counter() - wall) * 1000)
            assert outcome.result == "accepted" and poller.last_build_was_delta, outcome
        return {"reset_s": reset_cpu, "first_build_s": first_cpu, "bytes_per_instance": memory,
                "put_ms": put_ms, "prepared_ms": prepared_ms, "build_ms": [t * 1000 for t in build_cpu],
                "poll_ms": poll_ms, "poll_wall_ms": poll_wall_ms}

    result = asyncio.run(scenario())
    directory.cleanup()
    print(f"instances {args.instances}, changes {args.changes}, dns preparer {'on' if args.dns else 'off'}, "
          f"state file {'on' if args.state else 'off'}")
    print(f"first load: Keyspace.reset {result['reset_s']:.2f} s CPU, full build {result['first_build_s']:.2f} s CPU; "
          f"memory {result['bytes_per_instance']:,.0f} B per instance (RSS growth)")
    for key, label in (("put_ms", "Keyspace.put (instance + serial)"), ("prepared_ms", "Keyspace.prepared"),
                       ("build_ms", "build (delta + preparers, thread CPU)"), ("poll_ms", "whole poll, CPU"),
                       ("poll_wall_ms", "whole poll, wall")):
        values = result[key]
        assert isinstance(values, list)
        print(f"  {label}: median {statistics.median(values):.2f} ms, max {max(values):.2f} ms")


if __name__ == "__main__":
    main()
