"""Free a replaced snapshot a little at a time.

Dropping the last reference to a 100k-instance snapshot frees millions of
objects in one cascade that holds the interpreter lock for hundreds of
milliseconds: the event loop would stall right after every swap.  Instead the
poller hands the old snapshot to a thread that empties its indexes in small
batches, so the lock changes hands between batches.

This is safe only because nothing else refers to the old snapshot any more:
the store points at the new one and handlers read the store once per request.
The reference count is checked first; if anyone still holds the snapshot
(a request waiting on an upstream, say), it is left to ordinary reclamation.

A snapshot built as a delta (:mod:`edge.view.delta`) shares most values with
the one it replaced: instances, attachments, name entries, and the shards of
its indexes (:mod:`edge.view.sharded`), which are released by dropping this
snapshot's references to them, never emptied.  Only containers are
emptied here (dicts, lists, the attributes of protocol extras), never the
values in them, so shared values simply lose one reference and live on in the
new snapshot; only what nobody else refers to is freed.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from edge.view.sharded import ShardedIndex
from edge.view.snapshot import Snapshot

BATCH = 2000
"""Objects freed between chances for the event loop to run."""
WAIT_FOR_HOLDERS = 5.0
"""Seconds to wait for requests that still hold the old snapshot to finish."""


def release_gradually(holder: list[Snapshot], replaced_by_delta: bool = False) -> bool:
    """Empty and free the only snapshot in ``holder``; False if someone else held it.

    Runs in a worker thread.  ``holder`` is a one-element list so that this
    function owns the only reference the caller passed.  ``replaced_by_delta``:
    the snapshot that replaced it was built from it, so its instances live on
    and dropping them is only a matter of reference counts.
    """
    snapshot = holder.pop()
    deadline = time.monotonic() + WAIT_FOR_HOLDERS
    # Expected references: the local name and getrefcount's own argument.
    while sys.getrefcount(snapshot) > 2:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    # What only this snapshot's protocol data holds (answer memos) is emptied in batches either way.
    for value in list(snapshot.extras.values()):
        _empty(value, shared_shards=replaced_by_delta)
    snapshot.extras.clear()
    if replaced_by_delta:
        # The next snapshot holds all but the few values this change replaced: its instances, and every
        # shard of its indexes the change did not touch.  Dropping this one frees only those few, so
        # nothing here is worth walking (a walk over 100k instances and every shard cost 3-4 ms of CPU
        # per change).
        del snapshot
        return True
    instances = list(snapshot.view.instances)
    for index in (snapshot.names, snapshot.by_private, snapshot.by_public, snapshot.by_mac, snapshot.instances):
        _empty(index)
    del snapshot
    while instances:
        del instances[-BATCH // 4:]
        time.sleep(0)
    return True


def _empty(container: Any, shared_shards: bool = False) -> None:
    """Empty ``container`` in batches; ``shared_shards``: a sharded index's shards are (nearly) all held by
    the index that replaced it, so they are dropped at once rather than looked at one by one."""
    if isinstance(container, ShardedIndex):
        # Shards are shared with the snapshot that replaced this one: drop references, never empty them.
        # Those nobody else holds are freed then, each a short cascade.
        shards = container.detach()
        if shared_shards:
            return
        freed = 0
        while shards:
            shard = shards.pop()
            if sys.getrefcount(shard) <= 2:  # this name and getrefcount's argument: freed just below
                freed += len(shard)
            del shard
            if freed >= BATCH:
                time.sleep(0)
                freed = 0
    elif isinstance(container, dict):
        popitem = container.popitem
        while container:
            for _ in range(min(BATCH, len(container))):
                popitem()
            time.sleep(0)
    elif isinstance(container, list):
        while container:
            del container[-BATCH:]
            time.sleep(0)
    else:
        # Protocol-prepared data is often a small object holding the big indexes.
        attributes = getattr(container, "__dict__", None) or {
            name: getattr(container, name) for name in getattr(type(container), "__slots__", ())
            if hasattr(container, name)}
        for value in attributes.values():
            if isinstance(value, (dict, list, ShardedIndex)):
                _empty(value, shared_shards)


def release_memo(holder: list[Any], replaced_by_delta: bool = False) -> None:
    """Free a replaced build memo (``Poller._memo``) in batches, like a snapshot's indexes.

    ``replaced_by_delta``: the memo that replaced it was edited from it, sharing its contributors' shards.
    """
    memo = holder.pop()
    decoded, index = memo.decoded, memo.index
    del memo
    if decoded is not None:
        _empty(decoded.by_id)
        _empty(decoded.by_hash)
        _empty(decoded.order)
    _empty(index.contributors, shared_shards=replaced_by_delta)
