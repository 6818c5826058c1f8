"""An immutable mapping split into shards by key hash, so a changed copy shares what did not change.

A snapshot's indexes (instances, addresses, MACs, DNS names) are read by the
event loop while the next snapshot is built in a thread, so a served index is
never changed.  Copying a 400k-entry dictionary for every one-instance change
costs O(view); a :class:`ShardedIndex` instead keeps its entries in a fixed
number of small dictionaries (a power of two, chosen for about
``SHARD_SIZE`` entries each) picked by the low bits of the key's hash, and
:class:`ShardedEditor` makes the next index by copying only the shards its
keys fall in.  Both indexes then share every other shard, read-only.

A lookup costs one hash (cached for strings), one tuple index and one dict
lookup: the price of a Python method call over a plain ``dict.get``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")

SHARD_SIZE = 256
"""Entries per shard aimed at: a change copies a few shards of about this size per index."""
REGROW = 8
"""An edited index whose shards average this many times ``SHARD_SIZE`` is split again into more shards
(a view that grew by deltas alone; amortised over the changes that grew it)."""

_MISSING: Any = object()


def shard_count_for(size: int) -> int:
    count = 1
    while count * SHARD_SIZE < size:
        count *= 2
    return count


class ShardedIndex(Mapping[K, V], Generic[K, V]):
    """A read-only mapping whose entries live in ``len(shards)`` dictionaries, picked by ``hash(key) & mask``."""

    __slots__ = ("_shards", "_mask", "_size")

    def __init__(self, shards: tuple[dict[K, V], ...], size: int) -> None:
        self._shards = shards
        self._mask = len(shards) - 1
        self._size = size

    @classmethod
    def of(cls, entries: Mapping[K, V] | Iterable[tuple[K, V]], shards: int | None = None) -> ShardedIndex[K, V]:
        items = entries.items() if isinstance(entries, Mapping) else entries
        if shards is None:
            if not isinstance(entries, Mapping):
                items = list(items)
            # A Mapping's items view and the list above both have a length; mypy sees only Iterable.
            shards = shard_count_for(len(items))  # type: ignore[arg-type]
        parts: tuple[dict[K, V], ...] = tuple({} for _ in range(shards))
        mask = shards - 1
        size = 0
        for key, value in items:
            part = parts[hash(key) & mask]
            if key not in part:
                size += 1
            part[key] = value
        return cls(parts, size)

    # Lookups: what request handlers call.

    def get(self, key: K, default: Any = None) -> Any:
        return self._shards[hash(key) & self._mask].get(key, default)

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & self._mask][key]

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & self._mask]

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    # A generator rather than an ItemsView: nothing here needs set operations on the items.
    def items(self) -> Iterator[tuple[K, V]]:  # type: ignore[override]
        for shard in self._shards:
            yield from shard.items()

    # A generator rather than a ValuesView, as for items().
    def values(self) -> Iterator[V]:  # type: ignore[override]
        for shard in self._shards:
            yield from shard.values()

    def __repr__(self) -> str:
        return f"ShardedIndex({self._size} entries in {len(self._shards)} shards)"

    @property
    def shards(self) -> tuple[dict[K, V], ...]:
        """The shard dictionaries (shared with other indexes: never change them)."""
        return self._shards

    def edit(self) -> ShardedEditor[K, V]:
        return ShardedEditor(self)

    def detach(self) -> list[dict[K, V]]:
        """Hand the shards over for releasing and leave this index empty (only for a retired snapshot)."""
        shards = list(self._shards)
        self._shards = ({},)
        self._mask = 0
        self._size = 0
        return shards


class ShardedEditor(Generic[K, V]):
    """The next version of a :class:`ShardedIndex`: a shard is copied the first time a key in it changes."""

    __slots__ = ("_shards", "_mask", "_size", "_owned")

    def __init__(self, base: ShardedIndex[K, V]) -> None:
        self._shards = list(base.shards)
        self._mask = len(self._shards) - 1
        self._size = len(base)
        self._owned: set[int] = set()

    def _writable(self, key: K) -> dict[K, V]:
        slot = hash(key) & self._mask
        if slot not in self._owned:
            self._shards[slot] = dict(self._shards[slot])
            self._owned.add(slot)
        return self._shards[slot]

    def get(self, key: K, default: Any = None) -> Any:
        return self._shards[hash(key) & self._mask].get(key, default)

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & self._mask][key]

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & self._mask]

    def __len__(self) -> int:
        return self._size

    def __setitem__(self, key: K, value: V) -> None:
        shard = self._writable(key)
        if key not in shard:
            self._size += 1
        shard[key] = value

    def __delitem__(self, key: K) -> None:
        shard = self._shards[hash(key) & self._mask]
        if key not in shard:
            raise KeyError(key)
        del self._writable(key)[key]
        self._size -= 1

    @overload
    def pop(self, key: K) -> V: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...

    def pop(self, key: K, default: Any = _MISSING) -> Any:
        if key not in self._shards[hash(key) & self._mask]:
            if default is _MISSING:
                raise KeyError(key)
            return default
        self._size -= 1
        return self._writable(key).pop(key)

    def freeze(self) -> ShardedIndex[K, V]:
        """The edited index (the editor must not be used afterwards)."""
        if self._size > REGROW * SHARD_SIZE * len(self._shards):
            return ShardedIndex.of(((k, v) for shard in self._shards for k, v in shard.items()),
                                   shard_count_for(self._size))
        return ShardedIndex(tuple(self._shards), self._size)
