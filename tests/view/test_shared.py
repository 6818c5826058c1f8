"""The shared view: what the supervisor publishes is what every worker reads, whole and atomically."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import msgspec
import pytest

from bench.generate import generate_view
from edge.dns.zonedata import WALKS_INDEX, WalkCount, build_dns_data, dns_data, make_preparer
from edge.view.delta import apply_delta
from edge.view.parse import parse_view_bytes
from edge.view.shared import SharedViewFollower, SharedViewReader, SharedViewWriter
from edge.view.snapshot import Snapshot, build_snapshot_tracked, run_preparers
from edge.view.store import ViewStore

EXTRA = {WALKS_INDEX: lambda snapshot: dns_data(snapshot).walks.counts}
EXTRA_TYPES = {WALKS_INDEX: WalkCount}


def _view(instances: int = 300, serial: int = 1, seed: int = 1):
    return parse_view_bytes(json.dumps(generate_view(instances=instances, networks=3, serial=serial,
                                                     seed=seed)).encode())


def _retagged(view, position: int, value: str, serial: int):
    instance = view.instances[position]
    changed = msgspec.structs.replace(instance, tags=(("Name", value),))
    instances = view.instances[:position] + (changed,) + view.instances[position + 1:]
    return dataclasses.replace(view, serial=serial, instances=instances)


@pytest.fixture
def published(tmp_path):
    writer = SharedViewWriter(str(tmp_path / "served-view"), EXTRA)
    reader = SharedViewReader(writer.directory, EXTRA_TYPES, memo_entries=100_000, env=writer.env)
    yield writer, reader
    writer.close()


def _same_indexes(built: Snapshot, mapped: Snapshot) -> None:
    for name in ("instances", "by_private", "by_public", "by_mac", "names"):
        expected, found = getattr(built, name), getattr(mapped, name)
        assert len(found) == len(expected), name
        assert sorted(found) == sorted(expected), name
        for key, value in expected.items():
            assert found.get(key) == value, (name, key)
            assert key in found
    assert mapped.by_private.get(("nowhere", "192.0.2.1")) is None
    assert ("nowhere", "192.0.2.1") not in mapped.by_private
    assert mapped.view.cloud == built.view.cloud and mapped.view.networks == built.view.networks
    assert mapped.serial == built.serial and mapped.zones == built.zones and mapped.network_ids == built.network_ids
    assert list(mapped.view.instances) == sorted(built.view.instances, key=lambda i: i.id)
    assert mapped.counts() == built.counts()


def test_a_published_snapshot_reads_back_whole(published):
    writer, reader = published
    built, _ = build_snapshot_tracked(_view(), [make_preparer()])
    stats = writer.publish(built)
    assert set(stats.whole) == {"instances", "private", "public", "mac", "names", WALKS_INDEX}
    mapped = reader.snapshot()
    assert mapped is not None
    _same_indexes(built, mapped)
    assert reader.snapshot(mapped) is None  # nothing newer


def test_a_delta_is_published_as_the_keys_it_changed_and_workers_keep_what_did_not_change(published):
    writer, reader = published
    view = _view()
    built, state = build_snapshot_tracked(view, [make_preparer()])
    writer.publish(built)
    first = reader.snapshot()
    assert first is not None
    kept_id, changed_id = view.instances[1].id, view.instances[7].id
    kept = first.instances[kept_id]
    assert first.instances[changed_id].tags != (("Name", "renamed"),)

    next_view = _retagged(view, 7, "renamed", serial=2)
    result = apply_delta(built, state, next_view)
    assert result is not None
    delta, _ = result
    run_preparers(delta, [make_preparer()])
    stats = writer.publish(delta)
    # That instance's keys alone: itself, its address and MAC entries, its names.
    assert stats.whole == () and 1 <= stats.written <= 8, stats
    second = reader.snapshot(first)
    assert second is not None and second.serial == 2
    assert second.instances[changed_id].tags == (("Name", "renamed"),)
    interface = view.instances[7].interfaces[0]
    # An attachment holds its instance: the changed one, though the address entry itself was not rewritten.
    assert second.by_private[(interface.network, interface.primary_ip)].instance.tags == (("Name", "renamed"),)
    # Decoded once by this worker, unchanged since: the very same value, not decoded again.
    assert second.instances[kept_id] is kept
    # The snapshot before keeps answering what it answered (its own read transaction).
    assert first.instances[changed_id].tags != (("Name", "renamed"),)
    _same_indexes(delta, second)


def test_a_full_build_after_deltas_rewrites_the_indexes_whole(published):
    writer, reader = published
    built, _ = build_snapshot_tracked(_view(serial=1), [make_preparer()])
    writer.publish(built)
    first = reader.snapshot()
    other, _ = build_snapshot_tracked(_view(instances=120, serial=2, seed=9), [make_preparer()])
    stats = writer.publish(other)
    assert "instances" in stats.whole
    second = reader.snapshot(first)
    assert second is not None
    _same_indexes(other, second)
    gone = built.view.instances[0].id
    assert gone not in second.instances and gone in first.instances


def test_dns_data_of_a_mapped_snapshot_answers_as_the_built_one(published):
    writer, reader = published
    document = generate_view(instances=200, networks=3, serial=1)
    # Names below names make empty non-terminals: the walks the supervisor publishes.
    document["cloud"]["dns_records"] = [
        {"name": "a.b.c.svc.cloud.internal", "type": "A", "value": "10.9.9.9", "ttl": 30},
        {"name": "x.y.svc.cloud.internal", "type": "TXT", "value": "hello", "ttl": 30}]
    built, _ = build_snapshot_tracked(parse_view_bytes(json.dumps(document).encode()), [make_preparer()])
    writer.publish(built)
    mapped = reader.snapshot()
    assert mapped is not None
    expected = dns_data(built)
    found = build_dns_data(mapped)
    assert expected.walks.counts  # the test means something only with empty non-terminals
    networks = sorted(built.network_ids)
    candidates = set(built.names) | set(expected.walks.counts) | {"nothing.svc.cloud.internal"}
    for name in candidates:
        for network in networks:
            assert found.records(network, name) == expected.records(network, name), (network, name)
            assert found.is_empty_non_terminal(network, name) == expected.is_empty_non_terminal(network, name)
    assert found.zones == expected.zones


def test_the_memo_is_bounded(tmp_path):
    writer = SharedViewWriter(str(tmp_path / "served-view"))
    reader = SharedViewReader(writer.directory, memo_entries=10, env=writer.env)
    built, _ = build_snapshot_tracked(_view(instances=100))
    writer.publish(built)
    mapped = reader.snapshot()
    assert mapped is not None
    for instance in built.view.instances:
        assert mapped.instances[instance.id] == instance
    assert len(mapped.instances.memo()) <= 10  # type: ignore[attr-defined]
    writer.close()


READER = textwrap.dedent("""
    import sys, time
    from edge.view.shared import SharedViewReader
    reader = SharedViewReader(sys.argv[1])
    instance_id, last = sys.argv[2], int(sys.argv[3])
    snapshot, seen, deadline = None, set(), time.monotonic() + 60
    while time.monotonic() < deadline:
        newer = reader.snapshot(snapshot)
        if newer is None:
            continue
        snapshot = newer
        tag = dict(snapshot.instances[instance_id].tags)["Name"]
        # Written in one transaction with the serial: a reader sees both or neither.
        assert tag == f"serial-{snapshot.serial}", (tag, snapshot.serial)
        seen.add(snapshot.serial)
        if snapshot.serial == last:
            break
    print(len(seen), snapshot.serial if snapshot else None)
""")


def test_another_process_sees_each_publication_whole(tmp_path):
    writer = SharedViewWriter(str(tmp_path / "served-view"))
    view = _retagged(_view(instances=200), 3, "serial-1", serial=1)
    built, state = build_snapshot_tracked(view)
    writer.publish(built)
    last = 60
    reader = subprocess.Popen([sys.executable, "-c", READER, writer.directory, view.instances[3].id, str(last)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        for serial in range(2, last + 1):
            view = _retagged(view, 3, f"serial-{serial}", serial=serial)
            result = apply_delta(built, state, view)
            assert result is not None
            built, state = result
            writer.publish(built)
        out, err = reader.communicate(timeout=90)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    seen, final = out.split()
    assert final == str(last) and int(seen) >= 1
    writer.close()


def test_a_worker_keeps_its_view_when_the_shared_file_is_damaged(tmp_path, caplog):
    writer = SharedViewWriter(str(tmp_path / "served-view"))
    built, _ = build_snapshot_tracked(_view(instances=50))
    writer.publish(built)
    store = ViewStore()
    follower = SharedViewFollower(SharedViewReader(writer.directory, env=writer.env), store)
    asyncio.run(follower.poll_once())
    serving = store.current
    assert serving is not None and serving.serial == 1
    with writer.env.begin(write=True) as txn:
        txn.put(b"head", b"\x93not a head", db=writer.head_db)
    asyncio.run(follower.poll_once())
    assert store.current is serving
    assert follower.failures == 1 and store.status.last_poll_result == "error"
    assert "shared view unreadable; keeping the current view" in caplog.text
    writer.close()


def test_a_reader_waits_for_a_writer_that_has_published_nothing(tmp_path):
    assert SharedViewReader(str(tmp_path / "nothing-here")).snapshot() is None
    writer = SharedViewWriter(str(tmp_path / "served-view"))
    try:
        assert SharedViewReader(writer.directory, env=writer.env).snapshot() is None
    finally:
        writer.close()
    with pytest.raises(lmdb.Error):
        lmdb.open(str(tmp_path / "nothing-here"), readonly=True, create=False)
