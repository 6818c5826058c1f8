"""The view as an etcd keyspace: checked key by key, read once, then followed by a watch; and its publisher."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from bench.generate import generate_view
from edge.config import ViewConfig
from edge.errors import SourceError, ViewInvalid
from edge.etcd.client import EtcdAccess, EtcdClient, EtcdCompacted, prefix_end
from edge.etcd.publish import MAX_TXN_OPS, Published, PublishError, publish, publish_client
from edge.etcd.view_source import EtcdKeyspaceSource, open_etcd_source
from edge.view.demo import demo_document
from edge.view.formats import decode_view
from edge.view.keyspace import Keyspace, PreparedView
from edge.view.poller import Poller
from edge.view.statefile import StateFile
from edge.view.store import ViewStore
from tests.etcd.server import RecordingProxy, TcpProxy
from tests.support import wait_until

FAST = ViewConfig(connect_timeout=1.0, read_timeout=3.0)
PREFIX = "edge/view/"


def demo(serial: int) -> dict[str, Any]:
    document = demo_document()
    document["serial"] = serial
    return document


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def publisher(endpoint: str, prefix: str = PREFIX) -> EtcdClient:
    return publish_client(f"etcd://{endpoint}/{prefix}", 1.0, 5.0, 1 << 28, EtcdAccess())


def keyspace_source(endpoint: str, prefix: str = PREFIX) -> EtcdKeyspaceSource:
    source = open_etcd_source(f"etcd://{endpoint}/{prefix}", FAST)
    assert isinstance(source, EtcdKeyspaceSource)
    return source


def fetch(source: EtcdKeyspaceSource) -> PreparedView | None:
    return asyncio.run(source.fetch())


# -- the keyspace on its own ------------------------------------------------------------------------

def put_document(keyspace: Keyspace, document: dict[str, Any], revision: int = 1) -> None:
    for network in document["networks"]:
        keyspace.put("networks/" + network["id"], encode(network), revision)
    for instance in document["instances"]:
        keyspace.put("instances/" + instance["id"], encode(instance), revision)
    keyspace.put("cloud", encode(document["cloud"]), revision)
    keyspace.put("serial", str(document["serial"]).encode(), revision)


def test_a_keyspace_makes_the_view_its_document_makes() -> None:
    document = demo(4)
    keyspace = Keyspace("test")
    put_document(keyspace, document)
    view, as_document = keyspace.view()
    expected = decode_view(encode({**document, "instances": sorted(document["instances"], key=lambda i: i["id"]),
                                   "networks": sorted(document["networks"], key=lambda n: n["id"])}))
    assert view.serial == 4 and view.instances == expected.instances and view.cloud == expected.cloud
    assert view.networks == expected.networks
    assert decode_view(as_document()) == view
    assert keyspace.problems == 0


def test_a_bad_key_is_a_problem_of_that_part_only() -> None:
    document = demo(1)
    keyspace = Keyspace("test")
    put_document(keyspace, document)
    before, _ = keyspace.view()
    victim = document["instances"][0]["id"]
    kept = next(i for i in before.instances if i.id == victim)

    keyspace.put("instances/" + victim, b"{not json", 2)
    keyspace.put("serial", b"2", 2)
    view, as_document = keyspace.view()
    assert view.serial == 2 and next(i for i in view.instances if i.id == victim) is kept
    assert keyspace.problems == 1 and "not valid JSON" in keyspace.rejected["instances/" + victim]
    assert decode_view(as_document()).instances == view.instances

    wrong_id = dict(document["instances"][1], id="i-elsewhere")
    keyspace.put("instances/" + document["instances"][1]["id"], encode(wrong_id), 3)
    keyspace.put("instances/i-bad-address", encode(dict(document["instances"][2], id="i-bad-address",
                                                        interfaces=[{"mac": "zz"}])), 3)
    keyspace.put("surprise", b"{}", 3)
    keyspace.put("serial", b"three", 3)
    view, _ = keyspace.view()
    assert view.serial == 2 and len(view.instances) == len(document["instances"])
    assert keyspace.problems == 5
    assert {"surprise", "serial", "instances/i-bad-address"} <= set(keyspace.rejected)

    # A good value clears the problem; a deletion removes the instance.
    keyspace.put("instances/" + victim, encode(document["instances"][0]), 4)
    keyspace.delete("instances/" + document["instances"][1]["id"])
    keyspace.put("serial", b"4", 4)
    view, _ = keyspace.view()
    assert view.serial == 4 and "instances/" + victim not in keyspace.rejected
    assert len(view.instances) == len(document["instances"]) - 1


def test_a_fault_checking_a_value_is_a_problem_of_that_key(monkeypatch) -> None:
    document = demo(1)
    keyspace = Keyspace("test")
    put_document(keyspace, document)
    before, _ = keyspace.view()
    import edge.view.keyspace as module

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(module, "instance_from_wire", broken)
    victim = document["instances"][0]
    keyspace.put("instances/" + victim["id"], encode(dict(victim, instance_type="m5.large")), 2)
    keyspace.put("serial", b"2", 2)
    view, _ = keyspace.view()
    assert view.serial == 2 and view.instances == before.instances
    assert keyspace.problems == 1 and "a bug" in keyspace.rejected["instances/" + victim["id"]]


def test_an_instance_written_before_its_network_is_taken_when_the_network_arrives() -> None:
    document = demo(1)
    keyspace = Keyspace("test")
    instance = next(i for i in document["instances"] if i["interfaces"][0].get("network"))
    network_id = instance["interfaces"][0]["network"]
    keyspace.put("serial", b"1", 1)
    keyspace.put("instances/" + instance["id"], encode(instance), 1)
    assert keyspace.view()[0].instances == ()
    network = next(n for n in document["networks"] if n["id"] == network_id)
    keyspace.put("networks/" + network_id, encode(network), 2)
    view, _ = keyspace.view()
    assert [i.id for i in view.instances] == [instance["id"]] and not keyspace.rejected


def document_items(document: dict[str, Any], revision: int = 1) -> list[tuple[str, bytes, int]]:
    return ([("networks/" + n["id"], encode(n), revision) for n in document["networks"]]
            + [("instances/" + i["id"], encode(i), revision) for i in document["instances"]]
            + [("cloud", encode(document["cloud"]), revision), ("serial", str(document["serial"]).encode(), revision)])


def test_a_fresh_read_applies_network_changes_to_the_instances_once(monkeypatch) -> None:
    document = generate_view(instances=40, networks=6, serial=1)
    keyspace = Keyspace("test")
    passes: list[int] = []
    original = Keyspace._networks_changed

    def counted(self: Keyspace) -> None:
        passes.append(len(self.networks))
        original(self)

    monkeypatch.setattr(Keyspace, "_networks_changed", counted)
    keyspace.reset(document_items(document))
    assert passes == [6] and len(keyspace.view()[0].instances) == 40
    # A fresh read without one network: its instances are refused (logged, counted), the rest stay.
    gone = document["networks"][1]["id"]
    fewer = dict(document, serial=2, networks=[n for n in document["networks"] if n["id"] != gone])
    kept = keyspace.view()[0].instances
    keyspace.reset([item if item[0] != "serial" else ("serial", b"2", 2) for item in document_items(fewer)])
    view, _ = keyspace.view()
    orphans = [i["id"] for i in document["instances"] if i["interfaces"][0].get("network") == gone]
    assert orphans and passes == [6, 5] and keyspace.problems == len(orphans)
    assert {i.id for i in view.instances} == {i.id for i in kept} - set(orphans)


def test_a_fresh_read_in_any_key_order_makes_the_view_in_id_order_and_says_what_changed() -> None:
    import random

    document = generate_view(instances=60, networks=3, serial=1)
    items = document_items(document)
    random.Random(5).shuffle(items)
    keyspace = Keyspace("test")
    keyspace.reset(items)
    first = keyspace.prepared(incremental=False)
    ids = [i.id for i in first.view.instances]
    assert ids == sorted(i["id"] for i in document["instances"]) and first.changes is None
    # A fresh read after one instance changed, one left and one arrived, its keys in another order.
    second = copy.deepcopy(document)
    second["serial"] = 2
    second["instances"][7]["instance_type"] = "m6.large"
    gone = second["instances"].pop(20)["id"]
    arrived = copy.deepcopy(second["instances"][0])
    arrived["id"] = "i-00000000000000aa"
    for interface in arrived["interfaces"]:
        interface["mac"] = "02:00:00:00:aa:aa"
        interface["private_ips"] = ["10.200.0.9"]
        interface.pop("public_ip", None)
    second["instances"].append(arrived)
    items = document_items(second, revision=2)
    keep = {("instances/" + i["id"]) for n, i in enumerate(second["instances"]) if n != 7 and i is not arrived}
    items = [(name, text, 1 if name in keep or name.startswith(("networks/", "cloud")) else 2)
             for name, text, _ in items]
    random.Random(6).shuffle(items)
    keyspace.reset(items)
    prepared = keyspace.prepared(incremental=True)
    assert [i.id for i in prepared.view.instances] == sorted(i["id"] for i in second["instances"])
    assert prepared.changes is not None and prepared.changes.base is first.view
    assert [i.id for i in prepared.changes.upserted] == sorted([second["instances"][7]["id"], arrived["id"]])
    assert prepared.changes.removed == (gone,)
    before = {i.id: i for i in first.view.instances}
    assert sum(before.get(i.id) is i for i in prepared.view.instances) == len(second["instances"]) - 2


def test_instances_streamed_into_a_fresh_read_are_checked_after_every_network() -> None:
    document = generate_view(instances=30, networks=4, serial=1)
    items = document_items(document)
    keyspace = Keyspace("test")
    pulled: list[int] = []

    def instances() -> Iterator[tuple[str, bytes, int]]:
        for item in items:
            if item[0].startswith("instances/"):
                pulled.append(len(keyspace.networks))  # how many networks the mirror held by then
                yield item

    keyspace.reset([item for item in items if not item[0].startswith("instances/")], instances())
    view, _ = keyspace.view()
    assert pulled == [4] * 30 and keyspace.problems == 0
    assert [i.id for i in view.instances] == sorted(i["id"] for i in document["instances"])
    # The same keys as one list make the same view.
    other = Keyspace("test")
    other.reset(items)
    assert other.view()[0].instances == view.instances


def test_a_keyspace_without_a_serial_is_not_a_view() -> None:
    keyspace = Keyspace("test")
    keyspace.put("cloud", b"{}", 1)
    with pytest.raises(ViewInvalid, match="serial"):
        keyspace.view()


# -- the publisher ---------------------------------------------------------------------------------

def test_publish_writes_the_fewest_changes_in_bounded_transactions(etcd) -> None:
    document = generate_view(instances=300, networks=2, serial=1)
    proxy = RecordingProxy(etcd.endpoint).start()
    try:
        client = publisher(proxy.endpoint)
        first = publish(encode(document), client)
        assert first.puts == 300 + 2 + 2 and first.deletes == 0 and first.transactions >= 3
        txns = [e for e in proxy.exchanges if e.path == "/v3/kv/txn"]
        assert len(txns) == first.transactions and all(e.status == 200 for e in txns)
        assert all(len(e.request["success"]) <= MAX_TXN_OPS for e in txns)
        serial_key = _b64((PREFIX + "serial").encode())
        puts_in = [[op["request_put"]["key"] for op in e.request["success"] if "request_put" in op] for e in txns]
        assert [serial_key in keys for keys in puts_in] == [False] * (len(txns) - 1) + [True]

        assert publish(encode(document), client) == Published(1, 0, 0, 0, first.revision)

        changed = copy.deepcopy(document)
        changed["serial"] = 2
        changed["instances"][7]["instance_type"] = "m5.xlarge"
        removed = changed["instances"].pop(9)["id"]
        proxy.exchanges.clear()
        second = publish(encode(changed), client)
        assert (second.puts, second.deletes, second.transactions) == (2, 1, 1)
        (txn,) = [e for e in proxy.exchanges if e.path == "/v3/kv/txn"]
        assert {"request_delete_range": {"key": _b64((PREFIX + "instances/" + removed).encode())}} in \
            txn.request["success"]

        # A serial not above the one in etcd would never be served: refused, nothing written.
        stale = copy.deepcopy(changed)
        stale["instances"][0]["instance_type"] = "t1.micro"
        with pytest.raises(PublishError, match="not above"):
            publish(encode(stale), client)
        # An invalid view is refused before anything is written.
        broken = copy.deepcopy(changed)
        broken["serial"] = 3
        broken["instances"][0]["interfaces"][0]["mac"] = "not a mac"
        proxy.exchanges.clear()
        with pytest.raises(ViewInvalid):
            publish(encode(broken), client)
        assert proxy.exchanges == []
    finally:
        proxy.close()

    source = keyspace_source(etcd.endpoint)
    try:
        prepared = fetch(source)
        assert prepared is not None and prepared.view.serial == 2 and len(prepared.view.instances) == 299
        assert decode_view(prepared.document()).instances == prepared.view.instances
    finally:
        source.close()


def _b64(data: bytes) -> str:
    import base64
    return base64.b64encode(data).decode()


# -- the source: a full read, then the watch --------------------------------------------------------

def test_a_gateway_poller_follows_the_keyspace_by_watch_and_builds_deltas(etcd, tmp_path) -> None:
    document = generate_view(instances=200, networks=2, serial=1)
    client = publisher(etcd.endpoint)
    publish(encode(document), client)
    source = keyspace_source(etcd.endpoint)
    store = ViewStore()
    state = StateFile(str(tmp_path / "state"), source.description)
    # Polls an hour apart: after the first, only the watch can bring a change in time.
    poller = Poller(ViewConfig(poll_interval=3600, refresh_min_interval=0.05), source, store, state)

    async def scenario() -> None:
        poller.start()
        try:
            await _until(lambda: store.current is not None and store.current.serial == 1)
            first = store.current
            assert first is not None
            changed = copy.deepcopy(document)
            changed["serial"] = 2
            changed["instances"][5]["instance_type"] = "c5.large"
            await asyncio.to_thread(publish, encode(changed), client)
            await _until(lambda: store.current is not None and store.current.serial == 2)
            second = store.current
            assert second is not None and poller.last_build_was_delta
            target = changed["instances"][5]["id"]
            assert second.instances[target].instance_type == "c5.large"
            same = sum(second.instances[i] is first.instances[i] for i in first.instances)
            assert same == len(first.instances) - 1
            assert source.full_reads == 1 and source.watch_events == 2
        finally:
            await poller.stop()

    asyncio.run(scenario())
    assert decode_view(state.read()).serial == 2


async def _until(condition: Any, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_bad_values_in_etcd_are_problems_of_their_keys_never_a_lost_view(etcd) -> None:
    document = demo(1)
    client = publisher(etcd.endpoint)
    publish(encode(document), client)
    source = keyspace_source(etcd.endpoint)
    try:
        prepared = fetch(source)
        assert prepared is not None
        victim = document["instances"][0]["id"]
        etcd.put(PREFIX + "instances/" + victim, "garbage")
        etcd.put(PREFIX + "serial", "2")
        wait_until(lambda: source.counters()["key_refused"] == 1)
        later = fetch(source)
        assert later is not None and later.view.serial == 2
        assert [i for i in later.view.instances if i.id == victim] == [i for i in prepared.view.instances
                                                                        if i.id == victim]
    finally:
        source.close()


def test_an_idle_poll_costs_etcd_one_count_from_its_index(etcd) -> None:
    publish(encode(demo(1)), publisher(etcd.endpoint))
    proxy = RecordingProxy(etcd.endpoint).start()
    source = keyspace_source(proxy.endpoint)
    try:
        assert fetch(source) is not None
        wait_until(lambda: source._watch is not None)
        proxy.exchanges.clear()
        assert fetch(source) is None
        assert [e.request.get("count_only") for e in proxy.exchanges] == [True]
        # The watch (streamed through the proxy) is alive and brings the next change.
        etcd.put(PREFIX + "serial", "2")
        wait_until(lambda: source.watch_events == 1)
        proxy.exchanges.clear()
        prepared = fetch(source)
        assert prepared is not None and prepared.view.serial == 2
        assert [e.request.get("count_only") for e in proxy.exchanges] == [True]
        # A write elsewhere in the cluster moves its revision: one range finds nothing of ours,
        # and the polls after it are counts again.
        etcd.put("elsewhere/key", "x")
        proxy.exchanges.clear()
        assert fetch(source) is None
        assert [bool(e.request.get("count_only")) for e in proxy.exchanges] == [True, False]
        assert "min_mod_revision" in proxy.exchanges[1].request
        proxy.exchanges.clear()
        assert fetch(source) is None
        assert [e.request.get("count_only") for e in proxy.exchanges] == [True]
    finally:
        source.close()
        proxy.close()


def test_deletions_the_watch_missed_are_found_by_the_next_poll(etcd) -> None:
    document = demo(1)
    publish(encode(document), publisher(etcd.endpoint))
    source = keyspace_source(etcd.endpoint)
    try:
        assert fetch(source) is not None
        source.close()  # no watch: the poll alone must notice
        gone = document["instances"][0]["id"]
        etcd.delete(PREFIX + "instances/" + gone)
        etcd.put(PREFIX + "serial", "2")
        prepared = fetch(source)
        assert prepared is not None and prepared.view.serial == 2
        assert gone not in {i.id for i in prepared.view.instances}
        assert source.full_reads == 2
    finally:
        source.close()


def test_a_broken_garbled_or_stalled_watch_ends_in_a_fresh_read(etcd) -> None:
    document = demo(1)
    client = publisher(etcd.endpoint)
    publish(encode(document), client)
    proxy = TcpProxy(etcd.client_port)
    source = keyspace_source(proxy.endpoint)

    def watching() -> bool:
        # The watch has its answer's headers: it exists on the member and its connection is the proxy's.
        watch = source._watch
        return watch is not None and watch.endpoint != ""

    try:
        assert fetch(source) is not None and source.full_reads == 1
        wait_until(watching)

        # Garbage in the stream (one well-framed chunk that is not a watch message).
        proxy.inject(b"8\r\ngarbage\n\r\n")
        wait_until(lambda: source.watch_restarts == 1)
        assert fetch(source) is None and source.full_reads == 2
        wait_until(watching)

        # The connection breaks.
        proxy.cut()
        wait_until(lambda: source.watch_restarts == 2)
        document["serial"] = 2
        document["instances"][0]["instance_type"] = "m1.small"
        publish(encode(document), client)
        prepared = fetch(source)
        assert prepared is not None and prepared.view.serial == 2 and source.full_reads == 3
        wait_until(watching)

        # The watch stalls: the next poll applies what it misses (one poll behind at most),
        # and the one after, finding it still silent, reads everything and starts a new watch.
        source.stall_after = 0.0
        proxy.freeze()
        document["serial"] = 3
        document["instances"][1]["instance_type"] = "m1.large"
        publish(encode(document), client)
        prepared = fetch(source)
        assert prepared is not None and prepared.view.serial == 3 and source.caught_up == 2
        assert source.full_reads == 3
        assert fetch(source) is None
        assert source.full_reads == 4 and source.watch_restarts == 3
    finally:
        source.close()
        proxy.close()


def test_a_watch_from_a_compacted_revision_says_so(etcd) -> None:
    for serial in range(1, 5):
        etcd.put(PREFIX + "serial", str(serial))
    revision = etcd.put(PREFIX + "serial", "5")
    etcd.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
    client = publisher(etcd.endpoint)
    watch = client.watch(PREFIX.encode(), prefix_end(PREFIX.encode()), 2)
    with pytest.raises(EtcdCompacted):
        for _ in watch:
            pass


def test_an_empty_prefix_is_a_source_error(etcd) -> None:
    source = keyspace_source(etcd.endpoint, "nothing/here/")
    with pytest.raises(SourceError, match="no keys"):
        fetch(source)



def test_publish_keeps_each_transaction_within_etcds_request_size(etcd) -> None:
    # 60 instances of about 40 KB each: fewer than 128 operations, but more than 1.5 MiB together.
    document = generate_view(instances=60, networks=1, serial=1, user_data_bytes=30_000)
    proxy = RecordingProxy(etcd.endpoint).start()
    try:
        done = publish(encode(document), publisher(proxy.endpoint))
        txns = [e for e in proxy.exchanges if e.path == "/v3/kv/txn"]
        assert done.transactions == len(txns) >= 2 and all(e.status == 200 for e in txns)
        assert all(len(json.dumps(e.request)) <= 1024 * 1024 + 64 * 1024 for e in txns)
    finally:
        proxy.close()
    source = keyspace_source(etcd.endpoint)
    try:
        prepared = fetch(source)
        assert prepared is not None and len(prepared.view.instances) == 60
    finally:
        source.close()


def test_a_full_read_is_paged_by_size_at_one_revision_and_fits_the_answer_cap(etcd) -> None:
    # 60 instances of about 40 KB each (53 KB base64) under a 400 KB view.max_size: the answer cap
    # (the base64 of max_size) holds a few of them, the first page of 1,000 keys does not.
    document = generate_view(instances=60, networks=1, serial=1, user_data_bytes=30_000)
    publish(encode(document), publisher(etcd.endpoint))
    proxy = RecordingProxy(etcd.endpoint).start()
    source = open_etcd_source(f"etcd://{proxy.endpoint}/{PREFIX}",
                              ViewConfig(connect_timeout=1.0, read_timeout=3.0, max_size=400_000))
    assert isinstance(source, EtcdKeyspaceSource)
    try:
        prepared = fetch(source)
        assert prepared is not None and len(prepared.view.instances) == 60
        assert [i.id for i in prepared.view.instances] == sorted(i["id"] for i in document["instances"])
        ranges = [e for e in proxy.exchanges if e.path == "/v3/kv/range"]
        revision = ranges[0].response["header"]["revision"]
        # The first request is linearizable (no revision); every later one is pinned to its revision.
        assert "revision" not in ranges[0].request
        assert all(e.request.get("revision") == revision for e in ranges[1:])
        instance_pages = [e for e in ranges if base64.b64decode(e.request["key"]).startswith(
            (PREFIX + "instances/").encode())]
        served = [e for e in instance_pages if len(json.dumps(e.response)) <= 400_000 * 4 // 3 + 65536]
        assert len(served) >= 10, "pages sized to fit the cap"
        assert sum(len(e.response.get("kvs", ())) for e in served) == 60
        assert int(instance_pages[0].request["limit"]) > int(instance_pages[-1].request["limit"])
        # Every key was read once: the serial, the cloud, the network and the 60 instances.
        assert source.keyspace.problems == 0 and source.keyspace.key_count == 63
    finally:
        source.close()
        proxy.close()


def test_a_read_whose_revision_is_compacted_between_pages_starts_again(etcd) -> None:
    document = generate_view(instances=120, networks=2, serial=1)
    publish(encode(document), publisher(etcd.endpoint))
    source = keyspace_source(etcd.endpoint)
    source.page_bytes = 20_000  # about 15 instances a page
    original = source.client.range_page
    calls: list[int] = []

    def compacting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            # Between two pages of the instances: a publication moves the cluster on, and the
            # revision the read is pinned to is compacted away.
            changed = dict(document["instances"][100], instance_type="m7.compacted")
            etcd.put(PREFIX + "instances/" + changed["id"], json.dumps(changed))
            revision = etcd.put(PREFIX + "serial", "2")
            etcd.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return original(*args, **kwargs)

    source.client.range_page = compacting  # type: ignore[method-assign]  # wrapped for this client alone
    try:
        prepared = fetch(source)
        assert prepared is not None and prepared.view.serial == 2 and len(prepared.view.instances) == 120
        changed_id = document["instances"][100]["id"]
        assert [i.instance_type for i in prepared.view.instances if i.id == changed_id] == ["m7.compacted"]
        assert source.full_reads == 1 and source.keyspace.problems == 0 and len(calls) > 8
    finally:
        source.close()
