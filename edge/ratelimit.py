"""Token buckets per client, with bounded memory: metadata (per instance) and DNS (per address).

The buckets live in a fixed table of slots, one slot per tracked client:
``tag`` (a 64-bit hash of the client's key, 0 for a free slot), ``tokens`` and
``stamp`` (when ``tokens`` was last computed).  The table is a buffer, so it
can be shared: the supervisor of a gateway with workers creates one in shared
memory before the workers start and hands it to every worker, so the limit
holds per gateway, whichever worker a connection or datagram lands on, and
across worker restarts (the table outlives them).  Metadata and DNS have one
table each (:class:`RateTables`): their limits are separate budgets.  A process
without a supervisor uses a private one: a plain list, which Python indexes
faster than shared memory.

Under concurrency the table is approximate, by design: two workers updating
the same bucket at the same instant can lose one of the two updates (one
request not counted), and two workers claiming the same free slot for
different clients leave it to one of them (the other claims another slot on
its next request).  There is no lock on the hot path.

A client's slot is one of :data:`PROBES` slots from its hash.  A bucket that
has refilled completely is indistinguishable from a new one, so its slot is
taken by the next client that needs one; only when every slot it may use
holds a busy bucket does a client take one over anyway (that bucket restarts
full), so a flood of spoofed sources costs nothing but lenience toward them.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from typing import Protocol, cast

SLOT_FIELDS = 3
"""tag, tokens, stamp: three 8-byte fields per slot."""
SLOT_BYTES = SLOT_FIELDS * 8
PROBES = 8
"""Slots a client's hash may use (consecutive, wrapping)."""


class _Fields(Protocol):
    """Numbered 8-byte fields read and written by index: a list, or a typed view of the shared table."""

    def __getitem__(self, index: int, /) -> float: ...

    def __setitem__(self, index: int, value: float, /) -> None: ...


def table_bytes(entries: int) -> int:
    return max(1, entries) * SLOT_BYTES


def create_shared_table(entries: int, name: str = "edge-rate-limit") -> int:
    """A file descriptor of a zeroed table for ``entries`` clients in shared memory (memfd);
    ``name`` is what ``/proc/PID/fd`` shows for it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, table_bytes(entries))
    return fd


def map_table(fd: int) -> mmap.mmap:
    """The table behind ``fd`` (from :func:`create_shared_table`), mapped shared."""
    return mmap.mmap(fd, 0)


@dataclass(frozen=True, slots=True)
class RateTables:
    """The tables a worker's supervisor shares with every worker, one per protocol; None: a private one."""

    metadata: mmap.mmap | None = None
    dns: mmap.mmap | None = None


def _tag(key: str) -> int:
    """A stable 64-bit hash, never 0 (Python's str hash differs between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") | 1


class RateLimiter:
    __slots__ = ("rate", "burst", "_max_entries", "entries", "refused", "_table", "_tags", "_values", "_slots")

    def __init__(self, rate: float, burst: float, max_entries: int, table: mmap.mmap | None = None) -> None:
        self.rate = rate
        """Tokens per second; 0 turns the limiter off."""
        self.burst = float(burst)
        self._table = table
        if table is not None:
            view = memoryview(table)
            # The stubs type every memoryview item as int on assignment; a "d" view takes floats.
            self._tags = cast(_Fields, view.cast("Q"))
            self._values = cast(_Fields, view.cast("d"))
            self.entries = len(table) // SLOT_BYTES
        self._slots: dict[str, tuple[int, int]] = {}
        """key -> (index of its slot's first field, its tag): the hash is computed once per key."""
        self.max_entries = max_entries
        self.refused = 0

    @property
    def max_entries(self) -> int:
        """Clients tracked: the size of a private table (set anew on reload, which forgets every
        bucket), and the bound of this process's key -> slot memo.  A shared table keeps the size
        it was created with."""
        return self._max_entries

    @max_entries.setter
    def max_entries(self, count: int) -> None:
        self._max_entries = count
        if self._table is None and count != getattr(self, "entries", None):
            self.entries = max(1, count)
            fields: list[float] = [0] * (self.entries * SLOT_FIELDS)
            self._tags = self._values = fields
            self._slots = {}

    def allow(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket at monotonic time ``now``; False when it is empty."""
        if self.rate <= 0:
            return True
        found = self._slots.get(key)
        if found is None:
            found = self._claim(key, now)
        slot, tag = found
        if self._tags[slot] != tag:
            # Another client (or another worker, for another client) took the slot meanwhile.
            slot, tag = self._claim(key, now)
        values = self._values
        tokens = values[slot + 1] + (now - values[slot + 2]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        values[slot + 2] = now
        if tokens < 1.0:
            values[slot + 1] = tokens
            self.refused += 1
            return False
        values[slot + 1] = tokens - 1.0
        return True

    def _claim(self, key: str, now: float) -> tuple[int, int]:
        tag = _tag(key)
        tags, values, entries = self._tags, self._values, self.entries
        rate, burst = self.rate, self.burst
        first = tag % entries
        chosen = -1
        for probe in range(PROBES):
            slot = (first + probe) % entries * SLOT_FIELDS
            there = tags[slot]
            if there == tag:
                chosen = slot  # its bucket, kept by another worker or before this process forgot it
                break
            if there == 0 or values[slot + 1] + (now - values[slot + 2]) * rate >= burst:
                chosen = slot
                tags[slot] = tag
                values[slot + 1] = burst
                values[slot + 2] = now
                break
        if chosen < 0:
            chosen = first * SLOT_FIELDS
            tags[chosen] = tag
            values[chosen + 1] = burst
            values[chosen + 2] = now
        slots = self._slots
        if len(slots) >= self._max_entries:
            slots.clear()
        found = slots[key] = (chosen, tag)
        return found

    def __len__(self) -> int:
        """Slots holding a client (full or not)."""
        tags = self._tags
        return sum(1 for slot in range(0, self.entries * SLOT_FIELDS, SLOT_FIELDS) if tags[slot])
