"""ShardedIndex: a mapping like a dict, and an edited copy never changes the index it came from."""

from __future__ import annotations

import random

import pytest

from edge.view import sharded
from edge.view.sharded import ShardedIndex


def test_a_sharded_index_answers_as_the_dict_it_was_made_of() -> None:
    entries = {f"name-{n}": n for n in range(1000)} | {("vpc-a", f"10.0.0.{n}"): n for n in range(50)}
    index = ShardedIndex.of(entries)
    assert len(index.shards) > 1
    assert len(index) == len(entries) and dict(index) == entries and dict(index.items()) == entries
    assert sorted(index.values()) == sorted(entries.values()) and set(index) == set(entries)
    assert index.get("name-7") == 7 and index[("vpc-a", "10.0.0.3")] == 3 and "name-999" in index
    assert index.get("nope") is None and index.get("nope", 5) == 5 and "nope" not in index
    with pytest.raises(KeyError):
        index["nope"]


@pytest.mark.parametrize("shard_size", [1, 4, 256])
def test_edits_make_a_new_index_and_share_untouched_shards(shard_size, monkeypatch) -> None:
    monkeypatch.setattr(sharded, "SHARD_SIZE", shard_size)
    rng = random.Random(shard_size)
    model = {f"k{n}": n for n in range(200)}
    index = ShardedIndex.of(model)
    for _ in range(60):
        before = dict(index)
        shards_before = index.shards
        editor = index.edit()
        expected = dict(model)
        for _ in range(rng.randrange(1, 6)):
            key = f"k{rng.randrange(400)}"
            operation = rng.choice(("set", "delete", "pop"))
            if operation == "set":
                editor[key] = expected[key] = rng.random()
            elif operation == "delete":
                if key in expected:
                    del editor[key], expected[key]
                else:
                    with pytest.raises(KeyError):
                        del editor[key]
            else:
                assert editor.pop(key, None) == expected.pop(key, None)
            assert len(editor) == len(expected) and editor.get(key) == expected.get(key)
        edited = editor.freeze()
        # The served index is untouched; the new one has the edits and shares the other shards.
        assert dict(index) == before and index.shards is shards_before
        assert dict(edited) == expected and len(edited) == len(expected)
        if len(edited.shards) == len(shards_before):
            shared = sum(a is b for a, b in zip(edited.shards, shards_before))
            assert shared >= len(shards_before) - 5
        index, model = edited, expected


def test_an_index_grown_by_edits_is_split_into_more_shards(monkeypatch) -> None:
    monkeypatch.setattr(sharded, "SHARD_SIZE", 2)
    index: ShardedIndex[int, int] = ShardedIndex.of({0: 0})
    assert len(index.shards) == 1
    for n in range(1, 200):
        editor = index.edit()
        editor[n] = n
        index = editor.freeze()
    assert len(index.shards) >= 16 and dict(index) == {n: n for n in range(200)}


def test_a_detached_index_leaves_its_shards_to_whoever_shares_them() -> None:
    index = ShardedIndex.of({n: n for n in range(1000)})
    editor = index.edit()
    editor[5000] = 5000
    edited = editor.freeze()
    shards = index.detach()
    assert len(index) == 0 and index.get(1) is None
    del shards
    assert dict(edited) == {n: n for n in range(1000)} | {5000: 5000}
