"""pytest-benchmark: the view pipeline's CPU cost (decode + validate + index).

Runs in CI with --benchmark-disable (each body once, as a test); for figures:
``python -m pytest bench/bench_view.py --benchmark-enable``.  Larger views and
memory/stall figures come from ``python -m bench.view_scale``.
"""

from __future__ import annotations

import json

import pytest

from edge.testing.generate import generate_view
from edge.view.formats import decode_view
from edge.view.snapshot import build_snapshot


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
