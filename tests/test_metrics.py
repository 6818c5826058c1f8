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


def test_metadata_replies_are_counted_by_route_family_and_status() -> None:
    from edge.metadata.responses import ANSWERS, Outcome, text
    from edge.metrics import LATENCY_SAMPLE

    metrics = Metrics()
    tally = Tally("http")
    metrics.adopt(tally)
    leaf = text(b"i-0123").keep_alive
    missing = ANSWERS[Outcome.NOT_FOUND].close
    replies = ([(b"/latest/meta-data/instance-id", leaf)] * 5 + [(b"/latest/meta-data/nope", missing)] * 2
               + [(b"/latest/user-data", missing), (b"/", leaf), (b"/latest/meta-data/iam/info", leaf)]
               + [(b"/latest/meta-data/instance-id", leaf)] * (3 * LATENCY_SAMPLE - 10))
    for target, reply in replies:
        tally.http_reply(bytes(target), reply, 0.0)  # a new target object per request, as from the parser
    metrics.sync()
    tally.http_reply(b"/latest/meta-data/instance-id", leaf, 0.0)
    metrics.sync()
    text_ = metrics.render()[1].decode()
    expected = {("meta-data", "200"): 3 * LATENCY_SAMPLE - 4, ("meta-data", "404"): 2, ("user-data", "404"): 1,
                ("versions", "200"): 1, ("iam", "200"): 1}
    for (family, status), count in expected.items():
        assert f'edge_requests_total{{family="{family}",protocol="http",status="{status}"}} {count}.0' in text_
    # The first reply and every LATENCY_SAMPLE-th after it are timed, each standing for LATENCY_SAMPLE replies.
    assert f'edge_request_duration_seconds_count{{protocol="http"}} {4.0 * LATENCY_SAMPLE}' in text_


def test_long_metadata_answers_are_counted_by_their_status() -> None:
    from edge.metadata.responses import text

    tally = Tally("http")
    long_body = text(b"x" * 4096)
    for _ in range(3):
        tally.http_reply(b"/latest/user-data", bytes(bytearray(long_body.keep_alive)), 0.0)
    assert all(len(response) <= 256 for response, _count in tally.replies.values())
    assert all(len(response) <= 256 for response in tally.others)
    tally.fold()
    assert tally.raw == {("user-data", b"200"): 3} and not tally.replies and not tally.others


def test_several_answers_to_one_target_are_each_counted() -> None:
    from edge.metadata.responses import ANSWERS, Outcome, text
    from edge.metrics import REPLIES_HELD

    tally = Tally("http")
    leaf = text(b"i-0123")
    answers = [leaf.keep_alive, leaf.close, ANSWERS[Outcome.UNAUTHORIZED].keep_alive, leaf.keep_alive,
               bytes(bytearray(leaf.keep_alive))]  # equal bytes, another object
    for _ in range(3):
        for answer in answers:
            tally.http_reply(bytes(b"/latest/meta-data/instance-id"), answer, 0.0)
    assert tally.held == 4  # the equal copy is held apart from the answer held for the target; both count
    for index in range(REPLIES_HELD):  # folds while held, then keeps counting
        tally.http_reply(b"/latest/meta-data/item-%d" % index, leaf.keep_alive, 0.0)
        tally.http_reply(b"/latest/meta-data/item-%d" % index, leaf.close, 0.0)
        assert tally.held <= REPLIES_HELD
    tally.fold()
    assert tally.raw == {("meta-data", b"200"): 12 + 2 * REPLIES_HELD, ("meta-data", b"401"): 3}


def test_distinct_metadata_answers_held_are_bounded_and_still_counted() -> None:
    from edge.metadata.responses import text
    from edge.metrics import REPLIES_HELD

    tally = Tally("http")
    for index in range(3 * REPLIES_HELD):
        tally.http_reply(b"/latest/meta-data/item-%d" % index, text(b"%d" % index).keep_alive, 0.0)
        assert tally.held <= REPLIES_HELD
    tally.fold()
    assert tally.raw == {("meta-data", b"200"): 3 * REPLIES_HELD}
