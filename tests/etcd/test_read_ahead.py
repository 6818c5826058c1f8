"""Pages read ahead in a thread: the order kept, a failure raised where it belongs, the thread stopped."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from edge.errors import SourceError
from edge.etcd.view_source import read_ahead
from tests.support import wait_until


def test_items_come_in_order_and_a_failure_is_raised_in_its_place() -> None:
    def produce() -> Iterator[int]:
        yield from range(5)
        raise SourceError("page 5 broke")

    seen: list[int] = []
    with pytest.raises(SourceError, match="page 5 broke"):
        for item in read_ahead(produce(), 2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_the_producer_runs_at_most_depth_ahead_and_stops_when_the_reader_does() -> None:
    made: list[int] = []
    finished = threading.Event()

    def produce() -> Iterator[int]:
        try:
            for number in range(1000):
                made.append(number)
                yield number
        finally:
            finished.set()

    items = read_ahead(produce(), 2)
    assert next(items) == 0
    # One handed over, two waiting, one made and waiting for room: never the whole range.
    wait_until(lambda: len(made) >= 3)
    assert len(made) <= 4
    items.close()
    wait_until(finished.is_set)
    assert len(made) <= 5
