"""Run one metadata service in its own process (demo view) for multi-process tests.

``python imds_process.py --listen 127.0.0.1:0 --state-dir DIR [--token-key-file FILE] [--view FILE]``
prints ``port=N`` once listening and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

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
    args = parser.parse_args()
    config = Config(view=ViewConfig(state_dir=args.state_dir),
                    metadata=MetadataConfig(listen=(Listen.parse(args.listen),), token_key_file=args.token_key_file))
    document = json.load(open(args.view)) if args.view else demo_document()
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
    sys.exit(uvloop.run(main()))
