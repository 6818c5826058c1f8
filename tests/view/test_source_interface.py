"""The view source interface: what the poller asks of every source, and that every source offers it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from edge.config import Config, EucalyptusConfig, ViewConfig
from edge.server import adapters
from edge.view.demo import demo_document
from edge.view.poller import Poller
from edge.view.sources import ViewSource, configured_source
from edge.view.store import ViewStore


class Minimal(ViewSource):
    """Only what a source must write: the rest is the interface's."""

    description = "minimal"

    async def fetch(self) -> bytes | None:
        return json.dumps(demo_document()).encode()


class Pushing(Minimal):
    description = "pushing"

    def __init__(self) -> None:
        self.changed: Callable[[], None] | None = None
        self.closed = 0

    def subscribe(self, changed: Callable[[], None]) -> None:
        self.changed = changed

    def counters(self) -> dict[str, int]:
        return {"watch_event": 7}

    def close(self) -> None:
        self.closed += 1


def run_poller(source: ViewSource) -> ViewStore:
    async def scenario() -> ViewStore:
        store = ViewStore(source.description)
        poller = Poller(ViewConfig(state_dir="/nonexistent", poll_interval=3600), source, store, None)
        poller.start()
        await poller.poll_once()
        await poller.stop()
        return store

    return asyncio.run(scenario())


def test_a_source_that_writes_only_fetch_is_polled_started_and_stopped() -> None:
    store = run_poller(Minimal())
    assert store.current is not None
    assert store.status.source_events == {}


def test_the_poller_subscribes_exports_the_counters_of_and_closes_a_source() -> None:
    source = Pushing()
    store = run_poller(source)
    assert source.changed is not None, "not subscribed on start"
    assert store.status.source_events == {"watch_event": 7}
    assert source.closed == 1, "not closed on stop"


@pytest.mark.parametrize("spec", ["demo", "view.json", "file://view.json", "http://127.0.0.1:9/view",
                                  "https://127.0.0.1:9/view", "etcd://127.0.0.1:9/edge/view",
                                  "etcd://127.0.0.1:9/edge/view/"])
def test_every_source_kind_is_a_view_source(spec: str, tmp_path) -> None:
    source = configured_source(Config(view=ViewConfig(source=spec)), adapters().sources)
    assert isinstance(source, ViewSource), type(source)


def test_the_gni_with_its_intip_map_is_a_view_source(tmp_path) -> None:
    config = Config(view=ViewConfig(source=str(tmp_path / "gni.xml")),
                    eucalyptus=EucalyptusConfig(intip_map_file=str(tmp_path / "map")))
    source = configured_source(config, adapters().sources)
    assert "+intip:" in source.description
    assert isinstance(source, ViewSource)
