"""One metadata service in its own process (no admin, no DNS), for load tests and multi-process tests.

``python bench/metadata_server.py --listen 127.0.0.1:PORT --state-dir DIR [--token-key-file FILE]
[--view FILE] [--limits off|default]`` prints ``port=N`` when listening and serves until SIGTERM.

The view is the demo view unless ``--view`` names a document.  ``--limits off`` (the default)
turns the per-instance rate limit and connection cap off, because a load generator is one
"instance"; ``--limits default`` keeps the server's defaults, as a gateway runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    parser.add_argument("--token-key-file", default="")
    parser.add_argument("--view", default="")
    parser.add_argument("--limits", choices=("off", "default"), default="off")
    args = parser.parse_args()
    limits = {"rate": 0.0, "max_connections_per_source": 100_000} if args.limits == "off" else {}
    config = Config(view=ViewConfig(state_dir=args.state_dir),
                    metadata=MetadataConfig(listen=(Listen.parse(args.listen),), token_key_file=args.token_key_file,
                                            **limits))
    if args.view:
        with open(args.view) as handle:
            document = json.load(handle)
    else:
        document = demo_document()
    store = ViewStore("process")
    store.swap(build_snapshot(parse_view(document)), "source")

    async def refresh() -> None:
        return None

    service = MetadataService(config, store, refresh)
    await service.start()
    print(f"port={service.addresses[0][1]}", flush=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await service.stop(1.0)


if __name__ == "__main__":
    uvloop.run(main())
