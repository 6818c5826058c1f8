"""One metadata worker (demo view, no admin, no DNS) for load tests.

``python bench/metadata_server.py --listen 127.0.0.1:PORT --state-dir DIR`` prints ``port=N`` when
listening and serves until SIGTERM.  The rate limit is off: the load generator is one "instance".
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop

from edge.config import Config, Listen, MetadataConfig, ViewConfig
from edge.metadata.service import MetadataService
from edge.view.demo import demo_document
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    config = Config(view=ViewConfig(state_dir=args.state_dir),
                    metadata=MetadataConfig(listen=(Listen.parse(args.listen),), rate=0.0,
                                            max_connections_per_source=100_000))
    store = ViewStore("bench")
    store.swap(build_snapshot(parse_view(demo_document())), "source")

    async def refresh() -> None:
        return None

    service = MetadataService(config, store, refresh)
    await service.start()
    print(f"port={service.addresses[0][1]}", flush=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await service.stop(0.5)


if __name__ == "__main__":
    uvloop.run(main())
