"""What polling a view in etcd costs: an unchanged poll (header only) against a value fetch.

Starts a throwaway etcd member on loopback, stores a generated view
(gzip-compressed, as large views must be to fit etcd's request limit) and
times ``EtcdSource.fetch()`` through the real gateway: the first fetch (value
transferred, inflated), then ``--polls`` unchanged polls.  Also reports the
bytes etcd sends for each kind of answer.

    python bench/fleet_etcd_poll.py --instances 10000 --polls 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generate import generate_view  # noqa: E402
from edge.config import ViewConfig  # noqa: E402
from edge.view.etcd_source import EtcdSource  # noqa: E402
from tests.etcd.server import EtcdServer  # noqa: E402


def answer_bytes(endpoint: str, request: dict) -> int:
    req = urllib.request.Request(f"http://{endpoint}/v3/kv/range", data=json.dumps(request).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as response:
        return len(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--polls", type=int, default=200)
    args = parser.parse_args()

    document = json.dumps(generate_view(instances=args.instances, networks=4, user_data_bytes=256)).encode()
    value = gzip.compress(document)
    server = EtcdServer(Path(tempfile.mkdtemp(prefix="edge-etcd-bench-")) / "data")
    server.start()
    try:
        # etcd's default request cap is 1.5 MiB; say so rather than fail obscurely.
        if len(value) > 1_400_000:
            print(f"gzip value is {len(value)} bytes: over etcd's default --max-request-bytes; use fewer instances")
            return 1
        revision = server.put("edge/view", value)
        source = EtcdSource(server.url("edge/view"), ViewConfig())
        started = time.perf_counter()
        data = asyncio.run(source.fetch())
        first = time.perf_counter() - started
        assert data == document

        async def polls() -> list[float]:
            times = []
            for _ in range(args.polls):
                began = time.perf_counter()
                assert await source.fetch() is None
                times.append(time.perf_counter() - began)
            return times

        times = asyncio.run(polls())
        key = base64.b64encode(b"edge/view").decode()
        full = answer_bytes(server.endpoint, {"key": key})
        header = answer_bytes(server.endpoint, {"key": key, "min_mod_revision": str(revision + 1)})
    finally:
        server.stop()
    print(f"view: {args.instances} instances, {len(document)} bytes JSON, {len(value)} bytes gzip in etcd")
    print(f"first fetch (value, base64 JSON, inflate): {first * 1000:.1f} ms, answer {full} bytes")
    print(f"unchanged poll: median {statistics.median(times) * 1000:.2f} ms, "
          f"p99 {sorted(times)[int(len(times) * 0.99) - 1] * 1000:.2f} ms over {len(times)} polls, "
          f"answer {header} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
