"""An address the view does not know yet: one shared refresh, a bounded wait, then the answer or 404."""

from __future__ import annotations

import asyncio
import time

from imds_harness import add_instance, connect, demo, parse, read_all, request

from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot


def publishes(document, delay=0.1):
    """An on_refresh hook: the poll takes ``delay`` seconds and then swaps ``document`` in."""
    async def on_refresh(harness):
        await asyncio.sleep(delay)
        harness.store.swap(build_snapshot(parse_view(document)), "source")
    return on_refresh


def boot_storm(port: int, addresses: list[str]) -> list[tuple[int, bytes]]:
    sockets = []
    for address in addresses:
        sock = connect(port, address)
        sock.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sockets.append(sock)
    answers = []
    for sock in sockets:
        with sock:
            status, _, body = parse(read_all(sock))
            answers.append((status, body))
    return answers


def test_new_instance_is_found_by_refreshing(start):
    document = demo()
    newer = add_instance(document, 7, "127.0.0.7")
    server = start(document, on_refresh=publishes(newer))
    status, _, body = parse(request(server.port, "GET", "/latest/meta-data/instance-id", source="127.0.0.7"))
    assert (status, body) == (200, b"i-0ad0000000000007")
    assert server.refreshes == 1
    # Known now: no more refreshes.
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id", source="127.0.0.7"))[0] == 200
    assert server.refreshes == 1


def test_boot_storm_causes_one_refresh(start):
    document = demo()
    newer = document
    addresses = [f"127.0.1.{n}" for n in range(1, 121)]
    for number, address in enumerate(addresses, 100):
        newer = add_instance(newer, number, address)
    server = start(document, on_refresh=publishes(newer, delay=0.5))
    answers = boot_storm(server.port, addresses)
    assert [status for status, _ in answers] == [200] * len(addresses)
    assert answers[0][1] == b"i-0ad0000000000064"
    assert server.refreshes == 1


def test_unknown_storm_is_bounded_and_404(start):
    server = start(unknown_source_wait=0.5, on_refresh=lambda h: asyncio.sleep(0.2))
    begun = time.monotonic()
    answers = boot_storm(server.port, [f"127.0.2.{n}" for n in range(1, 101)])
    assert {status for status, _ in answers} == {404}
    assert time.monotonic() - begun < 3
    # Requests that arrived while a refresh was already running wait for one more, shared by all.
    assert server.refreshes <= 2


def test_refresh_that_never_finishes_is_bounded(start):
    server = start(unknown_source_wait=0.3, on_refresh=lambda h: asyncio.sleep(60))
    begun = time.monotonic()
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id", source="127.0.3.1"))[0] == 404
    assert 0.25 < time.monotonic() - begun < 3
    # Known instances are answered at once meanwhile.
    begun = time.monotonic()
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id"))[0] == 200
    assert time.monotonic() - begun < 1.5


def test_no_view_yet_waits_for_the_first(start):
    document = demo()
    server = start(None, use_demo=False, on_refresh=publishes(document, delay=0.1))
    assert parse(request(server.port, "GET", "/latest/meta-data/instance-id"))[2] == b"i-0de0000000000001"
