"""The render memo (pure): keyed by snapshot generation, bounded, identical answers shared."""

from __future__ import annotations

from imds_harness import demo

from edge.metadata.identity import ensure_signer
from edge.metadata.render import Renderer
from edge.metadata.responses import Response
from edge.metadata.tree import split_path
from edge.view.parse import parse_view
from edge.view.snapshot import build_snapshot


def snapshot_of(document):
    return build_snapshot(parse_view(document))


def test_answers_follow_the_snapshot(tmp_path):
    renderer = Renderer(ensure_signer(tmp_path), max_entries=1000)
    first = snapshot_of(demo())
    instance = first.instances["i-0de0000000000001"]
    answer = renderer.lookup(first, instance, b"/latest/meta-data/instance-type")
    assert isinstance(answer, Response) and answer.body == b"t2.micro"
    assert renderer.lookup(first, instance, b"/latest/meta-data/instance-type") is answer
    second = snapshot_of(demo(**{"i-0de0000000000001": {"instance_type": "m5.large"}}))
    changed = renderer.lookup(second, second.instances["i-0de0000000000001"], b"/latest/meta-data/instance-type")
    assert changed.body == b"m5.large"  # type: ignore[union-attr]


def test_memo_is_bounded_and_shares_identical_answers(tmp_path):
    renderer = Renderer(ensure_signer(tmp_path), max_entries=50)
    snapshot = snapshot_of(demo())
    one = snapshot.instances["i-0de0000000000001"]
    two = snapshot.instances["i-0de0000000000002"]
    assert renderer.lookup(snapshot, one, b"/latest/meta-data/placement/region") is \
        renderer.lookup(snapshot, two, b"/2009-04-04/meta-data/placement/region/")
    for number in range(500):
        renderer.lookup(snapshot, one, b"/latest/meta-data/no-such-%d" % number)
        assert renderer._entries <= 50
    answer = renderer.lookup(snapshot, one, b"/latest/meta-data/instance-id")
    assert isinstance(answer, Response) and answer.body == b"i-0de0000000000001"


def test_an_instance_table_holds_its_rendered_answers_and_is_emptied_by_a_reset(tmp_path):
    renderer = Renderer(ensure_signer(tmp_path), max_entries=3)
    first = snapshot_of(demo())
    instance = first.instances["i-0de0000000000001"]
    table = renderer.answers_of(first, instance)
    answer = renderer.lookup(first, instance, b"/latest/meta-data/instance-type")
    assert table == {b"/latest/meta-data/instance-type": answer}
    renderer.lookup(first, instance, b"/latest/meta-data/no-such-thing")  # a 404 is not a rendered answer
    renderer.lookup(first, instance, b"/latest/meta-data/iam/security-credentials/demo-role")  # nor credentials
    assert list(table) == [b"/latest/meta-data/instance-type"]
    # Full: the memo starts again, and the table held is emptied rather than left to grow or pin answers.
    renderer.lookup(first, instance, b"/latest/meta-data/instance-id")
    assert table == {}
    assert renderer.answers_of(first, instance) == {b"/latest/meta-data/instance-id": renderer.lookup(
        first, instance, b"/latest/meta-data/instance-id")}
    # A new snapshot: every table held from the last one is emptied; none answers from the old view.
    held = renderer.answers_of(first, instance)
    second = snapshot_of(demo(**{"i-0de0000000000001": {"instance_type": "m5.large"}}))
    assert renderer.lookup(second, second.instances["i-0de0000000000001"],
                           b"/latest/meta-data/instance-type").body == b"m5.large"  # type: ignore[union-attr]
    assert held == {}


def test_split_path():
    assert split_path(b"/") == []
    assert split_path(b"//latest//meta-data/x/?a=b") == ["latest", "meta-data", "x"]
    assert split_path(b"/latest/meta-data/%69nstance-id") == ["latest", "meta-data", "instance-id"]
    assert split_path(b"http://169.254.169.254/latest/meta-data/") == ["latest", "meta-data"]
    assert split_path(b"HTTP://169.254.169.254") == []
    for bad in (b"latest", b"*", b"/latest/../x", b"/latest/%2e%2e/x", b"/\xff"):
        assert split_path(bad) is None


def test_rendered_trees_are_kept_for_the_instances_asked_last(tmp_path, monkeypatch):
    import edge.metadata.render as render

    monkeypatch.setattr(render, "TREES_KEPT", 2)
    renderer = Renderer(ensure_signer(tmp_path), max_entries=1000)
    snapshot = snapshot_of(demo())
    instances = [snapshot.instances[i] for i in sorted(snapshot.instances)]
    assert len(instances) >= 3
    for instance in instances:
        renderer.lookup(snapshot, instance, b"/latest/meta-data/instance-id")
    # Two trees kept, whatever the number of instances asked; every answer stays rendered.
    assert sorted(renderer._trees) == sorted(i.id for i in instances[-2:])
    first = instances[0]
    assert renderer.lookup(snapshot, first, b"/latest/meta-data/instance-id").body == first.id.encode()  # type: ignore[union-attr]
    # A path not rendered yet for an instance whose tree went is rendered from a new tree.
    answer = renderer.lookup(snapshot, first, b"/latest/meta-data/local-ipv4")
    assert isinstance(answer, Response) and answer.body == first.primary_interface.primary_ip.encode()
    assert first.id in renderer._trees and len(renderer._trees) == 2
