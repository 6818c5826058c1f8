"""A view built as a delta of the previous snapshot equals a full build of the same document.

Random views (seeded: the same runs every time) go through a real Poller one
mutated serial after another: instances added, removed, edited, readdressed,
moved between networks, given or stripped of public IPs, reordered; DNS
records and networks changed; and invalid serials (duplicate ids, addresses,
public IPs, MACs, bad fields) that must be rejected with exactly the problems
the full parser reports.  After every accepted serial each index of the
served snapshot is compared with ``build_snapshot(decode_view(document))``,
after the replaced snapshot has been released.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random

import pytest
import uvloop

from edge.config import ViewConfig
from edge.errors import ViewInvalid
from edge.view import delta as delta_module
from edge.view.changes import load_document
from edge.view.formats import _ByteStream, _StreamingObject, decode_view
from edge.view.keyspace import Keyspace, PreparedView
from edge.view.model import DEFAULT_NETWORK
from edge.view.poller import Poller
from edge.view.snapshot import Snapshot, build_snapshot, build_snapshot_tracked
from edge.view.sources import ViewSource
from edge.view.store import ViewStore

NETWORKS = ("vpc-a", "vpc-b", DEFAULT_NETWORK)


class MemorySource(ViewSource):
    description = "memory"

    def __init__(self) -> None:
        self.pending: bytes | None = None

    async def fetch(self) -> bytes | None:
        pending, self.pending = self.pending, None
        return pending


class PreparedSource(ViewSource):
    description = "prepared"

    def __init__(self) -> None:
        self.pending: PreparedView | None = None

    async def fetch(self) -> PreparedView | None:
        pending, self.pending = self.pending, None
        return pending


class Views:
    """Random edge-view/1 documents and mutations of them, small address pools so names collide."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.counter = 0

    def address(self, network: str) -> str:
        if network == DEFAULT_NETWORK:
            return f"192.168.{self.rng.randrange(3)}.{self.rng.randrange(1, 40)}"
        return f"10.0.{self.rng.randrange(2)}.{self.rng.randrange(1, 40)}"

    def public(self) -> str:
        if self.rng.random() < 0.2:
            # Public addresses inside private ranges share reverse names with private ones.
            return f"10.0.{self.rng.randrange(2)}.{self.rng.randrange(1, 40)}"
        return f"198.51.100.{self.rng.randrange(1, 60)}"

    def twins(self, document: dict) -> None:
        """Two instances whose addresses render the same name (``::ffff:a.b.c.d`` and ``::ffff:a:b:c:d``).

        The only way two instances add records to one name in one horizon, so the order of
        their records depends on their order in the document.
        """
        used = self.used(document)
        n = self.rng.randrange(1, 200)
        for text in (f"::ffff:10.0.0.{n}", f"::ffff:10:0:0:{n}"):
            instance = self.instance(used)
            interface = instance["interfaces"][0]
            network = interface.get("network", DEFAULT_NETWORK)
            if (network, text) in used or ("public", text) in used:
                continue
            interface["private_ips"] = interface["private_ips"][:1] + [text]
            used.add((network, text))
            if self.rng.random() < 0.5:
                interface["public_ip"] = text
                used.add(("public", text))
            document["instances"].insert(self.rng.randrange(len(document["instances"]) + 1), instance)

    def fresh_id(self) -> str:
        self.counter += 1
        return f"i-{self.counter:08x}{self.rng.getrandbits(16):04x}"

    def interface(self, network: str, device_index: int, used: set) -> dict:
        rng = self.rng
        self.counter += 1
        addresses = []
        for _ in range(rng.choice((1, 1, 2))):
            address = self.address(network)
            if (network, address) not in used:
                used.add((network, address))
                addresses.append(address)
        if not addresses:
            addresses = [f"10.0.9.{self.counter % 250 + 1}" if network else f"192.168.9.{self.counter % 250 + 1}"]
            used.add((network, addresses[0]))
        interface = {"id": f"eni-{self.counter:08x}", "mac": self.mac(), "device_index": device_index,
                     "private_ips": addresses}
        if network:
            interface["network"] = network
        if rng.random() < 0.4:
            public = self.public()
            if ("public", public) not in used:
                used.add(("public", public))
                interface["public_ip"] = public
        if rng.random() < 0.2:
            interface["ipv6s"] = [f"2001:db8:{rng.randrange(4)}::{self.counter:x}"]
            if rng.random() < 0.3:
                interface["private_ips"] = interface["private_ips"] + [f"fd00::{self.counter:x}"]
        if network == DEFAULT_NETWORK and rng.random() < 0.2:
            interface["metadata_sources"] = [f"255.0.{self.counter // 250}.{self.counter % 250 + 1}"]
        return interface

    def mac(self) -> str:
        self.counter += 1
        return "02:00:" + ":".join(f"{(self.counter >> s) & 0xff:02x}" for s in (24, 16, 8, 0))

    def instance(self, used: set) -> dict:
        rng = self.rng
        interfaces = [self.interface(rng.choice(NETWORKS), index, used) for index in range(rng.choice((1, 1, 1, 2)))]
        instance = {"id": self.fresh_id(), "interfaces": interfaces, "instance_type": "t2.micro",
                    "tags": {"Name": f"host-{self.counter}", "note": "caf\u00e9"}}
        if rng.random() < 0.3:
            # Not starting with "id": the decoder falls back to the same position in the old document.
            instance = {"interfaces": instance.pop("interfaces"), **instance}
        return instance

    def document(self, size: int) -> dict:
        used: set = set()
        same_domain = self.rng.random() < 0.3
        cloud = {"internal_domain": "corp.internal", "public_domain": "corp.internal" if same_domain else "corp.example",
                 "private_name_template": "ip-{ip}", "public_name_template": "ip-{ip}" if same_domain else "ec2-{ip}",
                 "dns_ttl": 60, "dns_records": []}
        networks = [{"id": "vpc-a", "cidrs": ["10.0.0.0/16", "fd00::/64", "2001:db8::/32", "::/16"]},
                    {"id": "vpc-b", "cidrs": ["10.0.0.0/16", "fd00::/64", "2001:db8::/32", "::/16"]}]
        if self.rng.random() < 0.3:
            networks.append({"id": "", "cidrs": ["192.168.0.0/16", "2001:db8::/32", "fd00::/64", "::/16"]})
        document = {"format": "edge-view/1", "serial": 1, "cloud": cloud, "networks": networks,
                    "instances": [self.instance(used) for _ in range(size)]}
        if self.rng.random() < 0.5:
            self.twins(document)
        self.add_records(document)
        return document

    def add_records(self, document: dict) -> None:
        """DNS records, some on names instances also have (their private or public names)."""
        records = [{"name": "api.corp.example", "type": "A", "value": "198.51.100.200"}]
        for instance in self.rng.sample(document["instances"], min(2, len(document["instances"]))):
            interface = instance["interfaces"][0]
            label = interface["private_ips"][0].replace(".", "-").replace(":", "-")
            records.append({"name": f"ip-{label}.corp.internal", "type": "TXT", "value": "also here"})
            if "public_ip" in interface:
                public = interface["public_ip"].replace(".", "-").replace(":", "-")
                records.append({"name": f"ec2-{public}.corp.example",
                                "type": "A", "value": "198.51.100.250"})
        document["cloud"]["dns_records"] = records

    def used(self, document: dict) -> set:
        used: set = set()
        for instance in document["instances"]:
            for interface in instance["interfaces"]:
                network = interface.get("network", DEFAULT_NETWORK)
                used.update((network, a) for a in interface["private_ips"] + interface.get("ipv6s", []))
                used.update((DEFAULT_NETWORK, a) for a in interface.get("metadata_sources", []))
                if "public_ip" in interface:
                    used.add(("public", interface["public_ip"]))
        return used

    # -- mutations: each returns a description; the document is changed in place -------------

    def mutate(self, document: dict) -> str:
        instances = document["instances"]
        rng = self.rng
        kinds = ["add", "remove", "edit", "readdress", "move", "public_on", "public_off", "reorder",
                 "remove_all_but_one", "ipv6", "twins"]
        kinds += ["records", "networks", "networks"]
        kinds += ["dup_id", "dup_private", "dup_public", "dup_mac", "bad_ip", "self_dup_mac"] * 1
        kind = rng.choice(kinds)
        if not instances:
            kind = "add"
        victim = rng.randrange(len(instances)) if instances else 0
        if kind == "add":
            for _ in range(rng.randint(1, 3)):
                instances.insert(rng.randrange(len(instances) + 1), self.instance(self.used(document)))
        elif kind == "remove":
            del instances[victim]
        elif kind == "remove_all_but_one":
            del instances[1:]
        elif kind == "edit":
            instances[victim]["tags"] = {"Name": f"renamed-{self.counter}"}
            self.counter += 1
        elif kind == "readdress":
            interface = instances[victim]["interfaces"][0]
            used = self.used(document)
            network = interface.get("network", DEFAULT_NETWORK)
            address = self.address(network)
            if (network, address) in used:
                return "readdress (taken: rejected)"
            interface["private_ips"] = [address] + interface["private_ips"][1:]
        elif kind == "move":
            interface = instances[victim]["interfaces"][0]
            network = rng.choice(NETWORKS)
            used = self.used(document)
            address = self.address(network)
            if (network, address) in used:
                return "move (taken: rejected)"
            interface["network"] = network
            interface["private_ips"] = [address]
            interface.pop("ipv6s", None)
            interface.pop("metadata_sources", None)
            if not network:
                del interface["network"]
        elif kind == "public_on":
            public = self.public()
            if ("public", public) in self.used(document):
                return "public_on (taken: rejected)"
            instances[victim]["interfaces"][-1]["public_ip"] = public
        elif kind == "public_off":
            for interface in instances[victim]["interfaces"]:
                interface.pop("public_ip", None)
        elif kind == "twins":
            self.twins(document)
        elif kind == "reorder":
            rng.shuffle(instances)
        elif kind == "ipv6":
            interface = instances[victim]["interfaces"][0]
            interface["ipv6s"] = [f"2001:db8:3::{rng.randrange(1, 50):x}"]
        elif kind == "records":
            self.add_records(document)
        elif kind == "networks":
            # Widening keeps every instance valid; narrowing to 10.0.0.0/24 strands those in 10.0.1.x,
            # which were valid (and are reused as text) under the old networks.
            document["networks"][0]["cidrs"] = rng.choice((["10.0.0.0/16", "fd00::/64", "2001:db8::/32", "::/16"],
                                                           ["10.0.0.0/8", "fd00::/64", "2001:db8::/32", "::/16"],
                                                           ["10.0.0.0/24", "fd00::/64", "2001:db8::/32", "::/16"]))
        elif kind == "dup_id":
            clone = self.instance(self.used(document))
            clone["id"] = instances[victim]["id"]
            instances.append(clone)
        elif kind == "dup_private":
            clone = self.instance(self.used(document))
            clone["interfaces"][0]["network"] = instances[victim]["interfaces"][0].get("network", DEFAULT_NETWORK)
            clone["interfaces"][0]["private_ips"] = list(instances[victim]["interfaces"][0]["private_ips"][:1])
            if not clone["interfaces"][0]["network"]:
                del clone["interfaces"][0]["network"]
            instances.insert(0, clone)
        elif kind == "dup_public":
            with_public = [i for i in instances if any("public_ip" in f for f in i["interfaces"])]
            if not with_public:
                return "dup_public (none)"
            public = next(f["public_ip"] for f in with_public[0]["interfaces"] if "public_ip" in f)
            instances[victim]["interfaces"][0]["public_ip"] = public
        elif kind == "dup_mac":
            other = instances[(victim + 1) % len(instances)]
            instances[victim]["interfaces"][0]["mac"] = other["interfaces"][-1]["mac"]
        elif kind == "self_dup_mac":
            interfaces = instances[victim]["interfaces"]
            interfaces.append(self.interface("vpc-a", len(interfaces), self.used(document)))
            interfaces[-1]["mac"] = interfaces[0]["mac"]
        elif kind == "bad_ip":
            instances[victim]["interfaces"][0]["private_ips"] = ["10.0.0.300"]
        return kind


def _assert_same(served: Snapshot, full: Snapshot) -> None:
    assert served.view == full.view
    assert dict(served.instances) == dict(full.instances)
    assert dict(served.by_private) == dict(full.by_private)
    assert dict(served.by_public) == dict(full.by_public)
    assert dict(served.by_mac) == dict(full.by_mac)
    assert served.names.keys() == full.names.keys()
    networks = full.network_ids | {"vpc-unknown"}
    for name, entry in full.names.items():
        assert served.names[name] == entry, name
        for network in networks:
            assert served.names[name].records_for(network) == entry.records_for(network)
    assert served.zones == full.zones
    assert served.network_ids == full.network_ids
    # A delta's counts (logged, shown by /view) come from the previous ones, not from walking the view.
    assert served.counts() == full.counts()


def _encode(document: dict, indent: int | None) -> bytes:
    return json.dumps(document, indent=indent, ensure_ascii=False).encode()


async def _settle(poller: Poller) -> None:
    while poller._releases:
        await asyncio.gather(*list(poller._releases))


def _run_chain(seed: int, steps: int) -> dict[str, int]:
    rng = random.Random(seed)
    views = Views(rng)
    document = views.document(rng.randint(3, 25))
    indent = rng.choice((None, 1))
    source = MemorySource()
    store = ViewStore("memory")
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None)
    tally = {"delta": 0, "full": 0, "rejected": 0}

    async def scenario() -> None:
        nonlocal document
        source.pending = _encode(document, indent)
        assert (await poller.poll_once()).result == "accepted"
        for step in range(steps):
            candidate = copy.deepcopy(document)
            kind = views.mutate(candidate)
            candidate["serial"] = document["serial"] + 1
            data = _encode(candidate, indent)
            try:
                expected = build_snapshot(decode_view(data))
                problems = None
            except ViewInvalid as exc:
                expected, problems = None, exc.problems
            source.pending = data
            outcome = await poller.poll_once()
            await _settle(poller)
            context = f"seed {seed} step {step} {kind}"
            if problems is not None:
                assert outcome.result == "rejected", context
                assert outcome.error == str(ViewInvalid(problems)), context
                tally["rejected"] += 1
                continue
            assert outcome.result == "accepted", (context, outcome)
            tally["delta" if poller.last_build_was_delta else "full"] += 1
            _assert_same(store.current, expected)
            document = candidate

    uvloop.run(scenario())
    return tally


@pytest.mark.parametrize("path", ["bytes, one batch", "bytes, small batches", "reference, one chunk",
                                  "reference, small chunks", "bytes, small shards"])
def test_delta_builds_equal_full_builds_over_random_mutations(path, monkeypatch) -> None:
    if "shards" in path:
        monkeypatch.setattr("edge.view.sharded.SHARD_SIZE", 2)
    # Small batches and chunks cut documents where a 100 MB document is cut.
    if path.startswith("reference"):
        monkeypatch.setattr(_ByteStream, "decode", lambda self: False)
        monkeypatch.setattr(_StreamingObject, "CHUNK", 97 if "small" in path else 1 << 20)
    elif "small" in path:
        monkeypatch.setattr(_ByteStream, "BATCH", 97)
    totals = {"delta": 0, "full": 0, "rejected": 0}
    for seed in range(40):
        for key, count in _run_chain(seed, steps=12).items():
            totals[key] += count
    # The comparison means something only if both paths and rejections really ran.
    assert totals["delta"] > 150 and totals["full"] > 20 and totals["rejected"] > 40, totals


def _run_keyspace_chain(seed: int, steps: int, delta_calls: list[bool]) -> dict[str, int]:
    """Random documents taken part by part into a keyspace (as an HTTP ``since`` source does), whose
    prepared views carry what changed; every accepted serial compared with a full build."""
    rng = random.Random(seed)
    views = Views(rng)
    document = views.document(rng.randint(3, 25))
    keyspace = Keyspace("memory")
    source = PreparedSource()
    store = ViewStore("memory")
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None)
    tally = {"delta": 0, "full": 0, "rejected": 0}

    async def scenario() -> None:
        nonlocal document
        assert load_document(keyspace, _encode(document, None))
        source.pending = keyspace.prepared(incremental=False)
        assert (await poller.poll_once()).result == "accepted"
        for step in range(steps):
            candidate = copy.deepcopy(document)
            kind = views.mutate(candidate)
            candidate["serial"] = document["serial"] + 1
            if not load_document(keyspace, _encode(candidate, None)):
                continue  # two instances with one id: a keyspace cannot hold that document
            document = candidate
            prepared = keyspace.prepared(incremental=True)
            try:
                expected = build_snapshot_tracked(prepared.view, check_unique=True)[0]
            except ViewInvalid:
                expected = None
            source.pending = prepared
            outcome = await poller.poll_once()
            await _settle(poller)
            context = f"seed {seed} step {step} {kind}"
            if expected is None:
                assert outcome.result == "rejected", context
                tally["rejected"] += 1
                continue
            assert outcome.result == "accepted", (context, outcome)
            tally["delta" if poller.last_build_was_delta else "full"] += 1
            _assert_same(store.current, expected)

    uvloop.run(scenario())
    return tally


@pytest.mark.parametrize("shard_size", [256, 2])
def test_deltas_from_a_keyspaces_change_sets_equal_full_builds(shard_size, monkeypatch) -> None:
    # Two entries per shard: every change copies some shards and shares the others, and views that
    # grow by deltas alone are split into more shards.
    monkeypatch.setattr("edge.view.sharded.SHARD_SIZE", shard_size)
    calls: list[bool] = []
    apply_delta = delta_module.apply_delta

    def counted(*args, **kwargs):
        calls.append(kwargs.get("changes") is not None)
        return apply_delta(*args, **kwargs)

    monkeypatch.setattr("edge.view.poller.apply_delta", counted)
    totals = {"delta": 0, "full": 0, "rejected": 0}
    for seed in range(40):
        for key, count in _run_keyspace_chain(seed, 12, calls).items():
            totals[key] += count
    # Both paths and rejections ran, and the deltas worked from the change sets, not a comparison.
    assert totals["delta"] > 150 and totals["full"] > 20 and totals["rejected"] > 20, totals
    assert sum(calls) > 150, (sum(calls), len(calls))


def test_unchanged_instances_are_the_previous_objects() -> None:
    views = Views(random.Random(7))
    document = views.document(30)
    source = MemorySource()
    store = ViewStore("memory")
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None)

    async def scenario() -> tuple[Snapshot, Snapshot]:
        source.pending = _encode(document, None)
        await poller.poll_once()
        first = store.current
        document["serial"] = 2
        document["instances"][5]["tags"] = {"Name": "changed"}
        source.pending = _encode(document, None)
        await poller.poll_once()
        return first, store.current

    first, second = uvloop.run(scenario())
    assert poller.last_build_was_delta
    changed = document["instances"][5]["id"]
    for instance in second.view.instances:
        previous = first.instances.get(instance.id) if first.instances else None
        if instance.id == changed:
            assert dict(instance.tags) == {"Name": "changed"}
        else:
            # ``first`` may already be released (emptied); compare with the values that survive.
            assert previous is None or previous is instance


def test_delta_survives_release_of_the_replaced_snapshot() -> None:
    """The replaced snapshot is emptied in a thread; the new one shares its values and must stay whole."""
    views = Views(random.Random(11))
    document = views.document(40)
    source = MemorySource()
    store = ViewStore("memory")
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None)

    async def scenario() -> None:
        source.pending = _encode(document, None)
        await poller.poll_once()
        document["serial"] = 2
        del document["instances"][3]
        source.pending = _encode(document, None)
        await poller.poll_once()
        assert poller._releases, "the replaced snapshot is handed to a release task"
        results = await asyncio.gather(*list(poller._releases))
        assert True in results

    uvloop.run(scenario())
    assert poller.last_build_was_delta
    _assert_same(store.current, build_snapshot(decode_view(_encode(document, None))))


def test_a_snapshot_replaced_by_a_delta_frees_what_it_alone_held_and_leaves_its_shards_to_the_next() -> None:
    """Replaced by a delta, a snapshot's shards are the next one's: they are dropped, not emptied; its
    protocol data (a DNS answer memo filled while it served) is emptied."""
    from edge.dns.zonedata import EXTRAS_KEY, make_preparer

    views = Views(random.Random(5))
    document = views.document(60)
    source = MemorySource()
    store = ViewStore("memory")
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None, [make_preparer()])

    async def scenario() -> tuple[dict, list[dict]]:
        source.pending = _encode(document, None)
        await poller.poll_once()
        replaced = store.current
        assert replaced is not None
        data = replaced.extras[EXTRAS_KEY]
        data.memo_for("")[b"question"] = "rendered"
        memo = data.memo
        shards = list(replaced.instances.shards)
        document["serial"] = 2
        document["instances"][7]["tags"] = {"Name": "changed"}
        source.pending = _encode(document, None)
        await poller.poll_once()
        assert poller.last_build_was_delta
        del replaced
        while poller._releases:
            assert True in await asyncio.gather(*list(poller._releases))
        return memo, shards

    memo, shards = uvloop.run(scenario())
    assert memo == {}
    # Shared with the served snapshot, whole: untouched shards are the very same dictionaries.
    served = store.current
    assert served is not None
    assert sum(1 for old, new in zip(shards, served.instances.shards) if old is new) >= len(shards) - 1
    assert all(shard for shard in shards)
    _assert_same(served, build_snapshot(decode_view(_encode(document, None))))


@pytest.mark.parametrize("text", [b"{not json", b'{"format": "edge-view/1", "serial": 3, "instances": [}', b"[1, 2]",
                                  b'{"format": "edge-view/1", "serial": 3, "instances": {}}', b"\xff\xfe"])
def test_broken_documents_after_a_served_view_are_reported_as_without_one(text: bytes) -> None:
    views = Views(random.Random(3))
    document = views.document(5)
    source = MemorySource()
    store = ViewStore("memory")
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None)
    with pytest.raises(ViewInvalid) as expected:
        decode_view(text)

    async def scenario() -> str:
        source.pending = _encode(document, None)
        assert (await poller.poll_once()).result == "accepted"
        source.pending = text
        outcome = await poller.poll_once()
        assert outcome.result == "rejected"
        return outcome.error

    assert uvloop.run(scenario()) == str(expected.value)
    assert store.current.serial == 1
