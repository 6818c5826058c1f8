"""The view pipeline end to end: source -> poller -> snapshot -> store -> state directory."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
import uvloop

from edge.config import ViewConfig
from edge.view.demo import demo_document
from edge.view.poller import Poller
from edge.view.sources import FileSource, HttpSource
from edge.view.statefile import StateFile
from edge.view.store import ViewStore


def run(coroutine):
    return uvloop.run(coroutine)


def _config(tmp_path, **changes) -> ViewConfig:
    values = dict(state_dir=str(tmp_path / "state"), poll_interval=0.05, poll_jitter=0.0, backoff_max=0.2,
                  refresh_min_interval=0.05, connect_timeout=0.5, read_timeout=0.5)
    values.update(changes)
    return ViewConfig(**values)


def _write(path, document) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(document, handle)
    os.replace(temporary, path)


def _document(serial: int, **cloud) -> dict:
    document = demo_document()
    document["serial"] = serial
    document["cloud"].update(cloud)
    return document


def _poller(tmp_path, path, **changes) -> tuple[Poller, ViewStore, StateFile]:
    config = _config(tmp_path, **changes)
    source = FileSource(str(path), config.max_size)
    store = ViewStore(source.description)
    state = StateFile(config.state_dir, source.description)
    return Poller(config, source, store, state), store, state


def test_accept_then_persist_then_swap_on_new_serial(tmp_path) -> None:
    path = tmp_path / "view.json"
    _write(path, _document(5))
    poller, store, state = _poller(tmp_path, path)

    async def scenario():
        first = await poller.poll_once()
        assert first.result == "accepted" and store.current.serial == 5
        snapshot = store.current
        assert json.loads(state.read())["serial"] == 5
        assert (await poller.poll_once()).result == "unchanged"
        assert store.current is snapshot
        _write(path, _document(6, dns_ttl=99))
        assert (await poller.poll_once()).result == "accepted"
        assert store.current.serial == 6 and store.current.view.cloud.dns_ttl == 99
        assert store.status.loaded_from == "source" and store.status.consecutive_failures == 0

    run(scenario())


def test_lower_and_equal_serials_never_replace_the_view(tmp_path, caplog) -> None:
    path = tmp_path / "view.json"
    _write(path, _document(10))
    poller, store, _ = _poller(tmp_path, path)

    async def scenario():
        await poller.poll_once()
        _write(path, _document(9, dns_ttl=1))
        with caplog.at_level(logging.WARNING, logger="edge.view"):
            outcome = await poller.poll_once()
        assert outcome.result == "stale"
        assert "lower serial" in caplog.text and "offered=9" in caplog.text
        assert store.current.serial == 10 and store.current.view.cloud.dns_ttl == 60
        _write(path, _document(10, dns_ttl=2))
        assert (await poller.poll_once()).result == "unchanged"
        assert store.current.view.cloud.dns_ttl == 60

    run(scenario())


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "not valid JSON"),
    (b'{"format": "other/1", "serial": 1, "instances": []}', "$.format"),
    (b'{"format": "edge-view/1", "instances": []}', "$.serial: required field is missing"),
    (b'{"format": "edge-view/1", "serial": "11", "instances": []}', "expected integer"),
    (b'{"format": "edge-view/1", "serial": 11, "instances": [{"id": "i-1"}]}', "interfaces: required"),
])
def test_bad_documents_are_rejected_and_the_view_stays(tmp_path, caplog, content: bytes, problem: str) -> None:
    path = tmp_path / "view.json"
    _write(path, _document(10))
    poller, store, state = _poller(tmp_path, path)

    async def scenario():
        await poller.poll_once()
        good = store.current
        path.write_bytes(content)
        with caplog.at_level(logging.ERROR, logger="edge.view"):
            outcome = await poller.poll_once()
        assert outcome.result == "rejected"
        assert store.current is good
        assert problem in caplog.text
        assert problem in store.status.last_error
        assert store.status.consecutive_failures == 1
        assert json.loads(state.read())["serial"] == 10  # nothing accepted is lost

    run(scenario())


def test_restart_with_control_plane_down_serves_last_good_view(tmp_path, control_plane) -> None:
    control_plane.publish(_document(42))
    config = _config(tmp_path)

    def gateway():
        source = HttpSource(control_plane.url, config)
        store = ViewStore(source.description)
        return Poller(config, source, store, StateFile(config.state_dir, source.description)), store

    async def first_life():
        poller, store = gateway()
        assert (await poller.poll_once()).result == "accepted"

    async def second_life():
        poller, store = gateway()
        assert await poller.load_last_good()
        assert store.current.serial == 42 and store.status.loaded_from == "state"
        assert store.current.attachment_for("", "127.0.0.1").instance.id == "i-0de0000000000001"
        outcome = await poller.poll_once()
        assert outcome.result == "error"
        assert store.current.serial == 42

    run(first_life())
    control_plane.status = 500  # the control plane is down
    run(second_life())


def test_corrupt_last_good_file_is_ignored(tmp_path, caplog) -> None:
    path = tmp_path / "view.json"
    _write(path, _document(3))
    poller, store, state = _poller(tmp_path, path)
    os.makedirs(state.directory)
    with open(state.path, "wb") as handle:
        handle.write(b'{"format": "edge-view/1", "serial": 9, "instan')

    async def scenario():
        with caplog.at_level(logging.ERROR, logger="edge.view"):
            assert not await poller.load_last_good()
        assert "corrupt" in caplog.text
        assert store.current is None
        assert (await poller.poll_once()).result == "accepted"
        assert store.current.serial == 3

    run(scenario())


def test_a_fault_building_the_last_good_view_starts_from_the_source(tmp_path, caplog) -> None:
    path = tmp_path / "view.json"
    _write(path, _document(3))
    poller, store, state = _poller(tmp_path, path)
    os.makedirs(state.directory)
    _write(state.path, _document(9))
    real_build = poller._build

    def faulty_build(data, current):
        poller._build = real_build  # type: ignore[method-assign]
        raise MemoryError

    poller._build = faulty_build  # type: ignore[method-assign]

    async def scenario():
        with caplog.at_level(logging.ERROR, logger="edge.view"):
            assert not await poller.load_last_good()
        assert "could not be built" in caplog.text
        assert store.current is None
        assert (await poller.poll_once()).result == "accepted"
        assert store.current.serial == 3

    run(scenario())


def test_unwritable_state_dir_keeps_serving(tmp_path, caplog) -> None:
    path = tmp_path / "view.json"
    _write(path, _document(3))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    poller, store, _ = _poller(tmp_path, path, state_dir=str(blocker / "state"))

    async def scenario():
        with caplog.at_level(logging.ERROR, logger="edge.view"):
            assert (await poller.poll_once()).result == "accepted"
        assert store.current.serial == 3
        assert "last good view not saved" in caplog.text
        assert store.status.state_write_error

    run(scenario())


def test_refresh_requests_are_coalesced(tmp_path) -> None:
    path = tmp_path / "view.json"
    _write(path, _document(1))
    poller, store, _ = _poller(tmp_path, path, poll_interval=30.0, refresh_min_interval=0.01)
    fetches = 0
    real_fetch = poller.source.fetch

    async def counting_fetch():
        nonlocal fetches
        fetches += 1
        return await real_fetch()

    poller.source.fetch = counting_fetch  # type: ignore[method-assign]

    async def scenario():
        nonlocal fetches
        poller.start()
        await asyncio.sleep(0.05)  # the first scheduled poll
        assert store.current.serial == 1
        fetches = 0
        _write(path, _document(2))
        await asyncio.wait_for(asyncio.gather(*(poller.refresh() for _ in range(500))), 5)
        assert fetches == 1
        assert store.current.serial == 2
        await poller.stop()

    run(scenario())


def test_refresh_before_the_schedule_starts_waits_for_the_first_poll(tmp_path) -> None:
    # A fresh gateway opens its listeners, then polls once before polling on a schedule: an
    # instance asking in between must get the view that poll brings, not a 404.
    path = tmp_path / "view.json"
    _write(path, _document(1))
    poller, store, _ = _poller(tmp_path, path, poll_interval=30.0)
    real_fetch = poller.source.fetch

    async def slow_fetch():
        await asyncio.sleep(0.3)
        return await real_fetch()

    poller.source.fetch = slow_fetch  # type: ignore[method-assign]

    async def scenario():
        first = asyncio.get_running_loop().create_task(poller.poll_once())
        await asyncio.sleep(0.05)
        assert store.current is None
        await asyncio.wait_for(poller.refresh(), 5)
        assert store.current is not None and store.current.serial == 1
        await first
        await asyncio.wait_for(poller.refresh(), 1)  # nothing in progress, no schedule: returns at once

    run(scenario())


def test_a_fault_while_building_keeps_the_view_and_the_polling(tmp_path, caplog) -> None:
    # A bug in decoding or indexing (not a rejected view) must not end the polling task.
    path = tmp_path / "view.json"
    _write(path, _document(1))
    poller, store, _ = _poller(tmp_path, path)
    real_decode = poller.decode
    faults = {"left": 1}

    def faulty_decode(data):
        if faults["left"]:
            faults["left"] -= 1
            raise TypeError("a fault in the build")
        return real_decode(data)

    async def scenario():
        assert (await poller.poll_once()).result == "accepted"
        poller.decode = faulty_decode
        poller._memo = None  # take the plain decoder, the one made faulty
        poller._speaks_view = lambda data: False  # type: ignore[method-assign]
        _write(path, _document(2))
        outcome = await poller.poll_once()
        assert outcome.result == "error" and "a fault in the build" in outcome.error
        assert store.current.serial == 1
        _write(path, _document(3))
        assert (await poller.poll_once()).result == "accepted"
        assert store.current.serial == 3

    with caplog.at_level(logging.ERROR):
        run(scenario())
    assert "view build failed" in caplog.text


def test_backoff_grows_while_the_source_fails_and_is_capped(tmp_path) -> None:
    poller, store, _ = _poller(tmp_path, tmp_path / "missing.json", poll_interval=1.0, backoff_max=8.0)

    async def scenario():
        delays = []
        for _ in range(6):
            outcome = await poller.poll_once()
            assert outcome.result == "error"
            delays.append(poller._delay_after(outcome))
        assert delays == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
        assert store.status.consecutive_failures == 6

    run(scenario())


def test_jitter_spreads_polls(tmp_path) -> None:
    poller, _, _ = _poller(tmp_path, tmp_path / "v.json", poll_interval=10.0, poll_jitter=0.5)
    from edge.view.poller import PollOutcome
    delays = {poller._delay_after(PollOutcome("unchanged")) for _ in range(50)}
    assert len(delays) > 40 and min(delays) >= 10.0 and max(delays) <= 15.0
