"""The real listeners under fuzz: DNS over UDP and TCP, metadata and admin HTTP, a few seconds each.

Inputs are made by a seeded mutator from valid messages (``bench/fuzz_listeners.py``, which runs
the same bursts for longer).  After every burst the server must answer a valid query correctly
over the same transport and its resident memory must stay within a bound; replies read during a
burst must be well-formed; the server must never log a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from bench.fuzz_listeners import BURSTS, TARGETS, Server, free_port, fuzz

BUDGET = 3.0
"""Seconds of fuzz per target in the test suite (``python -m bench.fuzz_listeners`` runs longer)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    started = Server(tmp_path_factory.mktemp("fuzz"))
    yield started
    started.stop()


@pytest.mark.parametrize("target", TARGETS)
def test_listener_survives_fuzz(server, target):
    tally = fuzz(server, target, BUDGET, seed=12)
    assert tally.anomalies == [], tally.anomalies
    assert tally.inputs > 100 and tally.bursts >= 2
    assert "Traceback" not in server.logs()


def test_checks_notice_a_server_that_stopped_answering():
    """The after-burst checks fail when there is nothing to answer (so a passing run means something)."""
    gone = SimpleNamespace(dns=free_port(), metadata=free_port(), admin=free_port())  # nothing listens there
    for target in TARGETS:
        _, check = BURSTS[target]
        try:
            problem = check(gone)
        except OSError as error:
            problem = repr(error)
        assert problem is not None, target
