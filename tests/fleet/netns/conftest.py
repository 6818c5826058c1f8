"""One routed fleet per module: namespaces, BIRD, three gateways (see topology.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fleet.netns.topology import RoutedFleet, unavailable


@pytest.fixture(scope="module")
def routed_fleet(tmp_path_factory) -> Iterator[RoutedFleet]:
    reason = unavailable()
    if reason:
        pytest.skip(f"routed fleet in network namespaces: {reason}")
    fleet = RoutedFleet(tmp_path_factory.mktemp("routed"))
    try:
        fleet.build()
        fleet.wait_routes(fleet.gateway_hops(), timeout=60)
        yield fleet
    finally:
        fleet.close()
