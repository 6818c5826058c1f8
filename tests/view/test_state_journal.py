"""The last good view as a document plus a journal of changes: appended per change, replayed at start,
compacted, and never lost to a torn or corrupt tail."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
from collections.abc import Iterator

import pytest

from bench.generate import generate_view
from edge.config import ViewConfig
from edge.view.keyspace import PreparedView
from edge.view.poller import Poller
from edge.view.sources import open_source
from edge.view.statefile import StateFile, StateFollower, changes_record, restore
from edge.view.store import ViewStore
from tests.support import wait_until
from tests.view.test_incremental_http import FAST, ControlPlane, changed


@pytest.fixture
def control_plane() -> Iterator[ControlPlane]:
    server = ControlPlane(generate_view(instances=300, networks=2, serial=1)).start()
    yield server
    server.close()


def _follow(control_plane: ControlPlane, state_dir: str, serials: range, config: ViewConfig = FAST) -> tuple[Poller, StateFile]:
    """A poller following ``control_plane`` through ``serials`` (instance 10's type changed each time), then stopped."""
    source = open_source(control_plane.url, config)
    state = StateFile(state_dir, source.description)
    poller = Poller(config, source, ViewStore(), state)

    async def scenario() -> None:
        assert (await poller.poll_once()).result == "accepted"
        for serial in serials:
            control_plane.publish(changed(control_plane.document, serial, 10, f"type-{serial}"))
            assert (await poller.poll_once()).result == "accepted"
        # Stopped without its clean-stop compaction: as after a crash.
        poller._latest_document = None
        await poller.stop()

    asyncio.run(scenario())
    return poller, state


def _served(state: StateFile) -> tuple[int, str]:
    store = ViewStore()
    poller = Poller(FAST, open_source("http://127.0.0.1:9/unreachable", FAST), store, state)
    assert asyncio.run(poller.load_last_good())
    assert store.current is not None
    instance = store.current.view.instances
    return store.current.serial, next(i.instance_type for i in instance if i.instance_type.startswith("type-"))


def test_changes_are_journal_records_replayed_at_start(control_plane, tmp_path) -> None:
    _, state = _follow(control_plane, str(tmp_path), range(2, 7))
    records = state.read_journal().records
    # Serial 2 turned the source incremental (written whole); 3 to 6 are one small record each.
    assert len(records) == 4 and max(len(r) for r in records) < 4096
    assert _served(state) == (6, "type-6")


def test_a_torn_or_corrupt_journal_tail_loses_only_what_it_held(control_plane, tmp_path, caplog) -> None:
    poller, state = _follow(control_plane, str(tmp_path), range(2, 6))
    whole = open(state.journal_path, "rb").read()
    for damaged, expected in ((whole[:-7], 4), (whole[:-30] + b"X" * 29 + b"\n", 4), (whole + b"17 zz\nnot a rec", 5)):
        with open(state.journal_path, "wb") as handle:
            handle.write(damaged)
        caplog.clear()
        store = ViewStore()
        loading = Poller(FAST, open_source("http://127.0.0.1:9/unreachable", FAST), store, state)
        with caplog.at_level(logging.ERROR, logger="edge.view"):
            assert asyncio.run(loading.load_last_good())
        assert store.current is not None and store.current.serial == expected
        assert "last good view journal damaged" in caplog.text
        assert store.status.source_events["state_journal_damaged"] == 1


def test_the_journal_is_compacted_into_a_new_document(control_plane, tmp_path) -> None:
    config = dataclasses.replace(FAST, journal_compact_ratio=0.0001)
    source = open_source(control_plane.url, config)
    state = StateFile(str(tmp_path), source.description)
    poller = Poller(config, source, ViewStore(), state)

    async def scenario() -> None:
        assert (await poller.poll_once()).result == "accepted"
        for serial in range(2, 5):
            control_plane.publish(changed(control_plane.document, serial, 10, f"type-{serial}"))
            assert (await poller.poll_once()).result == "accepted"
            await poller._finish_compaction()
        await poller.stop()

    asyncio.run(scenario())
    assert poller.journal_events["state_journal_compaction"] >= 2
    assert not os.path.exists(state.journal_path) and not os.path.exists(state.compacting_path)
    restored = restore(state)
    assert restored is not None and restored.applied == 0
    assert _served(state) == (4, "type-4")


def test_a_clean_stop_compacts_the_journal(control_plane, tmp_path) -> None:
    source = open_source(control_plane.url, FAST)
    state = StateFile(str(tmp_path), source.description)
    poller = Poller(FAST, source, ViewStore(), state)

    async def scenario() -> None:
        assert (await poller.poll_once()).result == "accepted"
        for serial in range(2, 5):
            control_plane.publish(changed(control_plane.document, serial, 10, f"type-{serial}"))
            assert (await poller.poll_once()).result == "accepted"
        assert os.path.exists(state.journal_path)
        await poller.stop()

    asyncio.run(scenario())
    assert not os.path.exists(state.journal_path)
    assert _served(state) == (4, "type-4")


def test_a_worker_follows_the_document_and_journal_as_they_grow(control_plane, tmp_path) -> None:
    config = dataclasses.replace(FAST, journal_compact_ratio=0.02)
    source = open_source(control_plane.url, config)
    state = StateFile(str(tmp_path), source.description)
    poller = Poller(config, source, ViewStore(), state)
    follower = StateFollower(state, config.max_size)
    worker_store = ViewStore()
    worker = Poller(config, follower, worker_store, None)

    async def scenario() -> None:
        assert (await poller.poll_once()).result == "accepted"
        assert (await worker.poll_once()).result == "accepted"
        deltas = 0
        for serial in range(2, 12):
            control_plane.publish(changed(control_plane.document, serial, serial, f"type-{serial}"))
            assert (await poller.poll_once()).result == "accepted"
            if serial == 7:
                # Half a record being appended is not read until it is whole.
                with open(state.journal_path, "ab") as handle:
                    handle.write(b"120 0badf00d\n{\"form")
            outcome = await worker.poll_once()
            assert outcome.result == "accepted" and outcome.serial == serial, (serial, outcome)
            deltas += worker.last_build_was_delta
            if serial == 7:
                os.truncate(state.journal_path, os.path.getsize(state.journal_path) - 19)
            await poller._finish_compaction()
        assert poller.journal_events["state_journal_compaction"] >= 1
        assert deltas >= 5
        current = worker_store.current
        assert current is not None
        ids = [control_plane.document["instances"][n]["id"] for n in range(2, 12)]
        assert [current.instances[i].instance_type for i in ids] == [f"type-{n}" for n in range(2, 12)]

    asyncio.run(scenario())


def test_a_gateway_killed_after_changes_serves_them_without_its_source(control_plane, tmp_path) -> None:
    from tests.fleet.gateway import Gateway

    demo = __import__("edge.view.demo", fromlist=["demo_document"]).demo_document()
    demo["serial"] = 1
    control_plane.document = demo
    gateway = Gateway("one", "127.0.1.1", control_plane.url, tmp_path / "one",
                      env={"EDGE_VIEW_POLL_INTERVAL": "0.2", "EDGE_WORKERS": "1"})
    gateway.start()
    try:
        for serial in range(2, 6):
            control_plane.publish(changed(control_plane.document, serial, 0, f"m{serial}.large"))
            wait_until(lambda: gateway.serial() == serial, timeout=20)
        journals = [name for name in os.listdir(tmp_path / "one") if name.endswith(".journal")]
        assert journals, os.listdir(tmp_path / "one")
        gateway.kill()
        control_plane.close()  # the control control_plane is gone too
        gateway.start()
        assert gateway.serial() == 5
        assert gateway.get("/latest/meta-data/instance-type").body == b"m5.large"
        assert "journal_records=" in gateway.log()
    finally:
        gateway.stop()


def test_a_worker_is_handed_a_whole_document_as_bytes_until_a_journal_appears(control_plane, tmp_path) -> None:
    """A document source's view (document order, every top-level member) reaches workers as the bytes
    the supervisor took; only records need the view part by part."""
    state = StateFile(str(tmp_path), "test")
    follower = StateFollower(state, FAST.max_size)
    document = copy.deepcopy(control_plane.document)
    document["extensions"] = {"x-test": 1}
    state.write(json.dumps(document).encode())
    first = asyncio.run(follower.fetch())
    assert isinstance(first, bytes) and json.loads(first) == document
    assert asyncio.run(follower.fetch()) is None
    instance = copy.deepcopy(document["instances"][3])
    instance["instance_type"] = "m7.large"
    state.append(changes_record(document["serial"], document["serial"] + 1, [json.dumps(instance).encode()], []))
    second = asyncio.run(follower.fetch())
    assert isinstance(second, PreparedView) and second.view.serial == document["serial"] + 1
    assert next(i for i in second.view.instances if i.id == instance["id"]).instance_type == "m7.large"
