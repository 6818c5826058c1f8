"""Subsystem counters kept as plain integers by the services reach /metrics under their documented names."""

from __future__ import annotations

from edge.metrics import EVENT_COUNTERS, Metrics, Tally


def test_event_counters_are_exported_with_their_label_and_only_their_increase() -> None:
    metrics = Metrics()
    tally = Tally("dns")
    metrics.adopt(tally)
    tally.events[("replies_dropped", "dns")] = 3
    tally.events[("connections_refused", "dns")] = 1
    metrics.sync()
    tally.events[("replies_dropped", "dns")] = 5  # services copy running totals
    metrics.sync()
    text = metrics.render()[1].decode()
    assert 'edge_replies_dropped_total{protocol="dns"} 5.0' in text
    assert 'edge_connections_refused_total{protocol="dns"} 1.0' in text


def test_every_event_counter_is_documented_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for metric, _help, _label in EVENT_COUNTERS.values():
        assert f"`{metric}`" in readme, metric
