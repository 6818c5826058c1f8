"""pytest-benchmark: the view pipeline's CPU cost (decode + validate + index).

Runs in CI with --benchmark-disable (each body once, as a test); for figures:
``python -m pytest bench/bench_view.py --benchmark-enable``.  Larger views and
memory/stall figures come from ``python -m bench.view_scale``.
"""

from __future__ import annotations

import json

import pytest

from bench.generate import generate_view
from edge.view.delta import apply_delta
from edge.view.formats import decode_view, decode_view_reusing
from edge.view.snapshot import build_snapshot, build_snapshot_tracked


@pytest.fixture(scope="module", params=[1000, 10000], ids=lambda n: f"{n}-instances")
def document(request) -> bytes:
    return json.dumps(generate_view(instances=request.param, networks=8)).encode()


def test_decode_and_validate(benchmark, document: bytes) -> None:
    view = benchmark(decode_view, document)
    assert len(view.instances) in (1000, 10000)


def test_build_snapshot(benchmark, document: bytes) -> None:
    view = decode_view(document)
    snapshot = benchmark(build_snapshot, view)
    assert len(snapshot.instances) == len(view.instances)
    first = view.instances[0].interfaces[0]
    assert snapshot.attachment_for(first.network, first.private_ips[0]).instance is view.instances[0]


def test_delta_build_one_percent_changed(benchmark) -> None:
    """A new serial with 1% of 10k instances changed, built as a delta of the served snapshot."""
    document = generate_view(instances=10000, networks=8)
    first = decode_view_reusing(json.dumps(document).encode(), None)
    snapshot, state = build_snapshot_tracked(first.view)
    document["serial"] += 1
    for instance in document["instances"][::100]:
        instance["tags"] = {"Name": "changed"}
    newer = json.dumps(document).encode()

    def delta():
        decoded = decode_view_reusing(newer, first.memo)
        return decoded, apply_delta(snapshot, state, decoded.view)

    decoded, built = benchmark(delta)
    assert decoded.reused == 9900 and not decoded.cross_checked
    assert built is not None and built[0].view.instances[0].tags == (("Name", "changed"),)
