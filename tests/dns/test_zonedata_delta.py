"""Empty non-terminals of a delta snapshot, updated from the changed names alone, equal a full walk.

Random documents and mutations come from the view delta tests (tests/view/test_delta.py): small address
pools, so reverse names share their in-addr.arpa and ip6.arpa ancestors, and public addresses inside
private ranges, so one ancestor is an empty non-terminal for some networks and not others.
"""

from __future__ import annotations

import copy
import random

import pytest
import uvloop

from edge.config import Config, ViewConfig
from edge.dns import zonedata
from edge.dns.service import DnsService
from edge.dns.zonedata import EXTRAS_KEY, build_dns_data, make_preparer
from edge.errors import ViewInvalid
from edge.view.example import example_document
from edge.view.formats import decode_view
from edge.view.poller import Poller
from edge.view.snapshot import build_snapshot
from edge.view.store import ViewStore
from tests.view.test_delta import MemorySource, Views, _encode, _settle


@pytest.fixture
def walks(monkeypatch) -> dict[str, int]:
    """How many delta builds updated the DNS marks from the changed names, and how many walked again."""
    tally = {"updated": 0, "walked again": 0}
    update = zonedata._update_walks

    def counted(*args, **kwargs):
        result = update(*args, **kwargs)
        tally["updated" if result is not None else "walked again"] += 1
        return result

    monkeypatch.setattr(zonedata, "_update_walks", counted)
    return tally


def _chain(seed: int, steps: int, service: bool = False) -> None:
    rng = random.Random(seed)
    views = Views(rng)
    document = views.document(rng.randint(3, 25))
    source = MemorySource()
    store = ViewStore("memory")
    # The DNS service's own preparer, as a gateway runs it, or the stand-alone one.
    preparers = DnsService(Config(), store).preparers if service else [make_preparer()]
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None, preparers=preparers)

    async def scenario() -> None:
        nonlocal document
        source.pending = _encode(document, None)
        assert (await poller.poll_once()).result == "accepted"
        for step in range(steps):
            candidate = copy.deepcopy(document)
            kind = views.mutate(candidate)
            candidate["serial"] = document["serial"] + 1
            data = _encode(candidate, None)
            try:
                expected = build_dns_data(build_snapshot(decode_view(data)))
            except ViewInvalid:
                continue
            source.pending = data
            if (await poller.poll_once()).result != "accepted":
                continue
            await _settle(poller)
            served = store.current.extras[EXTRAS_KEY]
            context = f"seed {seed} step {step} {kind}"
            # The counts are what marks empty non-terminals (DnsData.is_empty_non_terminal reads them).
            assert dict(served.walks.counts.items()) == dict(expected.walks.counts.items()), context
            document = candidate

    uvloop.run(scenario())


@pytest.mark.parametrize("through_dns_service", [False, True], ids=["preparer", "DnsService"])
def test_marks_updated_from_a_deltas_changed_names_equal_a_full_walk(through_dns_service, walks) -> None:
    tally = walks
    for seed in range(40):
        _chain(seed, 12, through_dns_service)
    # Random instances add leaves only (no name of theirs lies on another name's walk): all updates.
    assert tally["updated"] > 100, tally


def _served_after(documents: list[dict], name: str) -> list[tuple[bool, dict]]:
    """For each document served in turn: whether ``name`` is an empty non-terminal to the flat network,
    and every empty non-terminal's counts (read at once: a replaced snapshot's indexes are emptied when it is released)."""
    source = MemorySource()
    store = ViewStore("memory")
    poller = Poller(ViewConfig(state_dir="/nonexistent"), source, store, None, preparers=[make_preparer()])
    served = []

    async def scenario() -> None:
        for document in documents:
            source.pending = _encode(document, None)
            assert (await poller.poll_once()).result == "accepted"
            await _settle(poller)
            data = store.current.extras[EXTRAS_KEY]
            served.append((data.is_empty_non_terminal("", name), dict(data.walks.counts.items())))

    uvloop.run(scenario())
    return served


def test_a_changed_name_on_another_names_walk_means_a_full_walk(walks) -> None:
    tally = walks
    public_name = "ec2-203-0-113-25.cloud.example.com"
    with_address = example_document()
    with_address["cloud"]["dns_records"].append({"name": f"x.{public_name}", "type": "TXT", "value": "below"})
    without = copy.deepcopy(with_address)
    without["serial"] += 1
    del without["instances"][0]["interfaces"][0]["public_ip"]
    again = copy.deepcopy(with_address)
    again["serial"] += 2
    served = _served_after([with_address, without, again], public_name)
    # The instance's public name stops the walk from x.<it>; without the address it is an empty
    # non-terminal; with the address back it is a name again.
    assert [marked for marked, _ in served] == [False, True, False]
    assert tally == {"updated": 0, "walked again": 2}
    for (_, counts), document in zip(served, (with_address, without, again)):
        full = build_dns_data(build_snapshot(decode_view(_encode(document, None))))
        assert counts == dict(full.walks.counts.items())
