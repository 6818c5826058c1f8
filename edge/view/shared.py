"""One served view per gateway: the supervisor writes it into a memory-mapped store, every worker reads it.

A worker that built its own snapshot held a whole copy of the view: gateway
memory grew with the number of cores.  With ``view.shared_view`` (the
default), the supervisor writes the indexes of every snapshot it accepts into
an LMDB environment in the state directory (``served-view/``), and workers
answer from read transactions on it.  Every process maps the same file, so
the kernel holds one copy of its pages whatever the worker count.

LMDB does what this needs and nothing more: a lookup is a B-tree walk in a
shared read-only mapping (no copy, no lock, no server); a write transaction
is atomic for every reader, so a worker's read transaction sees one whole
serial, never half of a change; and a one-instance change writes that
instance's keys alone.

Layout, one named database per index (keys are UTF-8; a pair key is joined
with NUL):

==================  ======================================================
``head``            ``head``: the view without its instances, the zones,
                    the counts, this publication's generation and which
                    keys it changed; ``zdict:<index>``: compression
                    dictionaries
``instances``       instance id -> the instance
``private``         network NUL address -> [instance id, interface position]
``public``          public address -> the same
``mac``             MAC -> the same
``names``           owner name -> its records by horizon
``extra:<name>``    protocol data another stage derives (DNS empty
                    non-terminal counts)
==================  ======================================================

Instances and names are msgpack compressed with a zlib dictionary sampled
from the view itself at each whole write: most of an encoded instance is
field names and values every instance repeats, so this keeps the shared file
at a fraction of the encoded size.  Each worker decodes a value on its first
use and keeps it in a bounded memo per snapshot; the memo of the next
snapshot takes over every entry whose key the publication did not change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import lmdb
import msgspec

from edge.errors import StateError
from edge.logs import event
from edge.view.model import Cloud, Instance, Network, View
from edge.view.sharded import ShardedIndex
from edge.view.snapshot import (
    COUNTS_KEY,
    Attachment,
    NameEntry,
    Preparer,
    Snapshot,
    ViewCounts,
    Zone,
    next_generation,
    run_preparers,
)
from edge.view.store import ViewStore

log = logging.getLogger("edge.view.shared")

SHARED_DIR = "served-view"
"""The environment's directory under ``view.state_dir``."""
SHARED_INDEXES_KEY = "view.shared_indexes"
"""``snapshot.extras`` key of a mapped snapshot's extra indexes (name -> mapping)."""
MAP_SIZE = 64 << 30
"""Address space each process reserves for the file (not memory: pages are mapped as they are used).
A 100k-instance view takes about 40 MB; the writer doubles it should a view ever outgrow it."""
MAX_READERS = 4096
"""Reader slots: each worker holds one read transaction per snapshot still in use (two during a swap)."""
ZDICT_SIZE = 4096
"""Bytes of sampled values in a compression dictionary: 4 KB took an encoded instance from about 1.1 KB
to 140 bytes, and decompressing one costs about 4 us (a 32 KB dictionary: 116 bytes, 11 us)."""
ZDICT_SAMPLES = 32
ZDICT_WINDOW_BITS = 12
"""A 4 KB deflate window: back references reach the whole dictionary and no further."""

K = TypeVar("K")
V = TypeVar("V")
_MISSING: Any = object()
_ABSENT: Any = object()
"""Memo entry of a key the index does not hold (unknown sources ask again and again)."""

ATTACHMENT_INDEXES = ("private", "public", "mac")
CORE_INDEXES = ("instances", *ATTACHMENT_INDEXES, "names")


class Head(msgspec.Struct, frozen=True):
    """What a publication says about itself: everything a snapshot holds that is not an index."""

    epoch: str
    """Random per writer: generations of different writers never compare."""
    generation: int
    serial: int
    generated: str | None
    cloud: Cloud
    networks: tuple[Network, ...]
    format: str
    version: str
    ordered: bool
    extensions: dict[str, Any]
    zones: tuple[Zone, ...]
    network_ids: tuple[str, ...]
    counts: dict[str, int]
    built_at: float
    changed: dict[str, list[bytes] | None]
    """Index -> keys written or deleted since generation - 1 (None: the index was written whole)."""


_head_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(Head)


# -- keys and values --------------------------------------------------------------------------------

def _key_bytes(index: str, key: Any) -> bytes:
    if index == "private":
        return f"{key[0]}\x00{key[1]}".encode()
    return str(key).encode()


def _key_of(index: str, raw: bytes | memoryview) -> Any:
    text = bytes(raw).decode()
    if index == "private":
        network, _, address = text.partition("\x00")
        return (network, address)
    return text


class _Compressor:
    """msgspec-encoded values, deflated against a dictionary sampled from the values themselves."""

    def __init__(self, zdict: bytes) -> None:
        self.zdict = zdict
        # Raw deflate with a window the size of the dictionary and a small state: copying a primed
        # compressor then costs less than priming one per value (measured: 13 us an instance at level 1,
        # 26 us with zlib's defaults, for 132 bytes instead of 136).
        self._primed = zlib.compressobj(1, zlib.DEFLATED, -ZDICT_WINDOW_BITS, 5, zlib.Z_DEFAULT_STRATEGY, zdict) \
            if zdict else zlib.compressobj(1, zlib.DEFLATED, -ZDICT_WINDOW_BITS, 5)

    @classmethod
    def sampled(cls, samples: Sequence[bytes]) -> _Compressor:
        """A dictionary from encoded values spread over the index (zlib prefers the most common strings
        last; the samples are alike, any order does)."""
        return cls(b"".join(samples)[-ZDICT_SIZE:])

    def compress(self, data: bytes) -> bytes:
        deflate = self._primed.copy()
        return deflate.compress(data) + deflate.flush()

    def decompress(self, data: bytes) -> bytes:
        inflate = zlib.decompressobj(-ZDICT_WINDOW_BITS, self.zdict) if self.zdict \
            else zlib.decompressobj(-ZDICT_WINDOW_BITS)
        return inflate.decompress(data) + inflate.flush()


_encoder = msgspec.msgpack.Encoder()


def _attachment_value(attachment: Attachment) -> bytes:
    position = attachment.instance.interfaces.index(attachment.interface)
    return _encoder.encode((attachment.instance.id, position))


# -- the writer (supervisor) -----------------------------------------------------------------------

@dataclass(slots=True)
class PublishStats:
    generation: int
    written: int
    """Keys put or deleted."""
    whole: tuple[str, ...]
    """Indexes written whole (the first publication, or a full build)."""
    seconds: float


ExtraIndexes = Mapping[str, Callable[[Snapshot], Mapping[Any, Any] | None]]
"""Extra index name -> how to find it in a prepared snapshot (None: this snapshot has none)."""


class SharedViewWriter:
    """Publishes snapshots into the environment; a :data:`edge.view.snapshot.Preparer` (call it last).

    Runs in the poller's build thread, after the protocol preparers and before the swap, so a
    worker told a poll finished finds the new serial committed.  A delta build is published as the
    keys it changed: unchanged shards of the snapshot's indexes are the very same objects as in the
    snapshot published before (:mod:`edge.view.sharded`), so the difference costs the touched shards.
    """

    def __init__(self, directory: str, extra_indexes: ExtraIndexes | None = None) -> None:
        self.directory = directory
        self.extra_indexes = dict(extra_indexes or {})
        # A fresh environment per supervisor: what a previous run left is of no use and may be of
        # another source.  Workers of a previous run (if any linger) keep their own mapping of the old file.
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        try:
            self.env = lmdb.open(directory, map_size=MAP_SIZE, max_dbs=len(CORE_INDEXES) + len(self.extra_indexes) + 2,
                                 max_readers=MAX_READERS, sync=False, metasync=False, readahead=False)
        except lmdb.Error as exc:
            raise StateError(f"cannot create the shared view in {directory}: {exc}") from None
        self.head_db = self.env.open_db(b"head")
        self.dbs = {name: self.env.open_db(name.encode()) for name in CORE_INDEXES}
        self.dbs.update({name: self.env.open_db(f"extra:{name}".encode()) for name in self.extra_indexes})
        self.epoch = secrets.token_hex(8)
        self.generation = 0
        self._published: dict[str, Mapping[Any, Any]] = {}
        self._compressors: dict[str, _Compressor] = {}

    def __call__(self, snapshot: Snapshot) -> None:
        self.publish(snapshot)

    def close(self) -> None:
        self.env.close()

    def publish(self, snapshot: Snapshot) -> PublishStats:
        started = time.perf_counter()
        indexes: dict[str, Mapping[Any, Any]] = {
            "instances": snapshot.instances, "private": snapshot.by_private, "public": snapshot.by_public,
            "mac": snapshot.by_mac, "names": snapshot.names}
        for name, find in self.extra_indexes.items():
            found = find(snapshot)
            indexes[name] = found if found is not None else {}
        while True:
            try:
                changed, written = self._write(snapshot, indexes)
                break
            except lmdb.MapFullError:
                size = self.env.info()["map_size"] * 2
                event(log, logging.WARNING, "shared view file outgrew its map; doubling it", map_size=size)
                self.env.set_mapsize(size)
        self._published = indexes
        self.env.reader_check()  # slots of workers that died holding a transaction, so their pages come back
        return PublishStats(self.generation, written, tuple(n for n, keys in changed.items() if keys is None),
                            time.perf_counter() - started)

    def _write(self, snapshot: Snapshot, indexes: Mapping[str, Mapping[Any, Any]]
               ) -> tuple[dict[str, list[bytes] | None], int]:
        changed: dict[str, list[bytes] | None] = {}
        written = 0
        with self.env.begin(write=True) as txn:
            for name, index in indexes.items():
                difference = _difference(self._published.get(name), index)
                if difference is None:
                    written += self._write_whole(txn, name, index)
                    changed[name] = None
                    continue
                puts, deletes = difference
                keys: list[bytes] = []
                db = self.dbs[name]
                for key in deletes:
                    raw = _key_bytes(name, key)
                    txn.delete(raw, db=db)
                    keys.append(raw)
                for key, value in puts:
                    raw = _key_bytes(name, key)
                    txn.put(raw, self._encode(name, value), db=db)
                    keys.append(raw)
                changed[name] = keys
                written += len(keys)
            self.generation += 1
            view = snapshot.view
            counts = snapshot.counts()
            head = Head(self.epoch, self.generation, view.serial, view.generated, view.cloud, view.networks,
                        view.format, view.version, view.ordered, dict(view.extensions), snapshot.zones,
                        tuple(sorted(snapshot.network_ids)),
                        {"networks": counts["networks"], "instances": counts["instances"],
                         "interfaces": counts["interfaces"], "names": counts["names"]},
                        snapshot.built_at, changed)
            txn.put(b"head", _head_encoder.encode(head), db=self.head_db)
        return changed, written

    def _write_whole(self, txn: lmdb.Transaction, name: str, index: Mapping[Any, Any]) -> int:
        db = self.dbs[name]
        txn.drop(db, delete=False)
        if name in ("instances", "names"):
            # The samples first, then each value encoded and compressed in one go: never every encoded
            # value at once (100k instances are 110 MB encoded, and the allocator keeps such peaks).
            step = max(1, len(index) // ZDICT_SAMPLES)
            samples = [_encoder.encode(value) for position, value in enumerate(index.values()) if position % step == 0]
            compressor = self._compressors[name] = _Compressor.sampled(samples)
            txn.put(f"zdict:{name}".encode(), compressor.zdict, db=self.head_db)
            compress, encode = compressor.compress, _encoder.encode
            rows = [(_key_bytes(name, key), compress(encode(value))) for key, value in index.items()]
        else:
            rows = [(_key_bytes(name, key), self._encode(name, value)) for key, value in index.items()]
        rows.sort()
        with txn.cursor(db) as cursor:
            cursor.putmulti(rows, append=True)
        return len(rows)

    def _encode(self, name: str, value: Any) -> bytes:
        if name in ATTACHMENT_INDEXES:
            return _attachment_value(value)
        if name in ("instances", "names"):
            return self._compressors[name].compress(_encoder.encode(value))
        return _encoder.encode(value)


def _difference(before: Mapping[Any, Any] | None, after: Mapping[Any, Any]
                ) -> tuple[list[tuple[Any, Any]], list[Any]] | None:
    """(keys put with their values, keys deleted) from ``before`` to ``after``; None: write ``after`` whole.

    Only two sharded indexes with the same shard count are compared, shard by shard, skipping every
    shard they share; values are compared by identity (a delta keeps unchanged values as they were).
    """
    if not (isinstance(before, ShardedIndex) and isinstance(after, ShardedIndex)):
        return None
    if len(before.shards) != len(after.shards):
        return None
    puts: list[tuple[Any, Any]] = []
    deletes: list[Any] = []
    for old, new in zip(before.shards, after.shards):
        if old is new:
            continue
        for key, value in new.items():
            if old.get(key, _MISSING) is not value:
                puts.append((key, value))
        deletes.extend(key for key in old if key not in new)
    return puts, deletes


# -- the reader (workers) --------------------------------------------------------------------------

class MappedIndex(Mapping[K, V], Generic[K, V]):
    """One index of a publication, read through a read transaction; decoded values kept in a bounded memo.

    The memo starts from the entries of the snapshot before whose keys this publication did not
    change (``carry``), so a one-instance change does not make a worker decode every instance again.
    """

    __slots__ = ("_txn", "_db", "_name", "_decode", "_memo", "_carry", "_stale", "_limit", "_size")

    def __init__(self, txn: lmdb.Transaction, db: Any, name: str, decode: Callable[[Any], Any], limit: int,
                 size: int, carry: dict[Any, Any] | None = None, stale: frozenset[bytes] = frozenset()) -> None:
        self._txn = txn
        self._db = db
        self._name = name
        self._decode = decode
        self._memo: dict[Any, Any] = {}
        self._carry = carry
        self._stale = stale
        self._limit = limit
        self._size = size

    def get(self, key: Any, default: Any = None) -> Any:
        found = self._memo.get(key, _MISSING)
        if found is _MISSING:
            found = self._load(key)
        return default if found is _ABSENT else found

    def __getitem__(self, key: Any) -> V:
        found = self.get(key, _MISSING)
        if found is _MISSING:
            raise KeyError(key)
        return found

    def __contains__(self, key: object) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def _load(self, key: Any) -> Any:
        raw_key = _key_bytes(self._name, key)
        carry = self._carry
        found = _MISSING
        if carry is not None and raw_key not in self._stale:
            found = carry.get(key, _MISSING)
        if found is _MISSING:
            raw = self._txn.get(raw_key, db=self._db)
            found = _ABSENT if raw is None else self._decode(raw)
        if len(self._memo) >= self._limit:
            # Bounded: when full it starts over, so what is still asked for is decoded once more.
            self._memo = {}
        self._memo[key] = found
        return found

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[K]:
        with self._txn.cursor(self._db) as cursor:
            for raw in cursor.iternext(keys=True, values=False):
                yield _key_of(self._name, raw)

    # A generator rather than an ItemsView (as ShardedIndex's): decoded for the caller, not memoized, so a
    # walk over every key does not fill the memo.
    def items(self) -> Iterator[tuple[K, V]]:  # type: ignore[override]
        with self._txn.cursor(self._db) as cursor:
            for raw_key, raw in cursor.iternext(keys=True, values=True):
                key = _key_of(self._name, raw_key)
                found = self._memo.get(key, _MISSING)
                yield key, (found if found is not _MISSING else self._decode(raw))

    # A generator rather than a ValuesView, as for items().
    def values(self) -> Iterator[V]:  # type: ignore[override]
        for _, value in self.items():
            yield value

    def memo(self) -> dict[Any, Any]:
        """The decoded values (and known absences) so far, for the next snapshot to take over."""
        return self._memo

    def let_go(self) -> None:
        """This snapshot has been replaced: stop reading from the memo of the one before it."""
        self._carry = None

    def __repr__(self) -> str:
        return f"MappedIndex({self._name!r}, {self._size} entries)"


class MappedInstances(Sequence[Instance]):
    """``view.instances`` of a mapped snapshot: every instance, decoded one at a time as it is walked."""

    __slots__ = ("_index",)

    def __init__(self, index: MappedIndex[str, Instance]) -> None:
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[Instance]:
        return self._index.values()

    def __getitem__(self, position: Any) -> Any:
        if isinstance(position, slice):
            return list(itertools.islice(iter(self), *position.indices(len(self))))
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(position)
        return next(itertools.islice(iter(self), position, None))


@dataclass(slots=True)
class _Publication:
    """A worker's handle on the publication one of its snapshots reads."""

    epoch: str
    generation: int
    indexes: dict[str, MappedIndex[Any, Any]]


PUBLICATION_KEY = "view.shared_publication"


class SharedViewReader:
    """A worker's side: the newest publication as a :class:`Snapshot` whose indexes read the shared file.

    ``extra_types``: extra index name -> the type its values decode to (as the writer's preparers made them).
    """

    def __init__(self, directory: str, extra_types: Mapping[str, Any] | None = None,
                 memo_entries: int = 2048, env: lmdb.Environment | None = None) -> None:
        self.directory = directory
        self.extra_types = dict(extra_types or {})
        self.memo_entries = memo_entries
        self.env: lmdb.Environment | None = env
        """Opened on first use; given, the writer's own (one process may open an environment only once)."""
        self._dbs: dict[str, Any] = {}
        self._zdicts: dict[str, tuple[bytes, Callable[[bytes], Any]]] = {}
        self._decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
            "instances": msgspec.msgpack.Decoder(Instance), "names": msgspec.msgpack.Decoder(NameEntry),
            **{name: msgspec.msgpack.Decoder(kind) for name, kind in self.extra_types.items()}}
        self._position = msgspec.msgpack.Decoder(tuple[str, int])

    def _open(self) -> lmdb.Environment | None:
        if self._dbs:
            return self.env
        env = self.env
        if env is None:
            if not os.path.exists(os.path.join(self.directory, "data.mdb")):
                return None
            try:
                env = lmdb.open(self.directory, readonly=True, lock=True, map_size=MAP_SIZE, readahead=False,
                                max_dbs=len(CORE_INDEXES) + len(self.extra_types) + 2, max_readers=MAX_READERS,
                                create=False)
            except lmdb.Error as exc:
                event(log, logging.ERROR, "shared view unreadable", path=self.directory, error=str(exc))
                return None
        # Handles opened outside any transaction of ours, so none is closed when a read transaction ends.
        names = {"head": b"head", **{name: name.encode() for name in CORE_INDEXES},
                 **{name: f"extra:{name}".encode() for name in self.extra_types}}
        try:
            self._dbs = {name: env.open_db(raw, create=False) for name, raw in names.items()}
        except lmdb.NotFoundError:
            # The supervisor is still creating them (or publishes no such index): look again next time.
            if env is not self.env:
                env.close()
            return None
        self.env = env
        return env

    def _db(self, name: str) -> Any:
        return self._dbs[name]

    def _begin(self) -> lmdb.Transaction | None:
        env = self._open()
        if env is None:
            return None
        try:
            return env.begin(buffers=False)
        except lmdb.MapResizedError:
            env.set_mapsize(0)  # the writer grew the map: adopt its size
            return env.begin(buffers=False)

    def _head(self, txn: lmdb.Transaction) -> Head | None:
        try:
            raw = txn.get(b"head", db=self._db("head"))
        except lmdb.NotFoundError:
            return None
        return None if raw is None else _head_decoder.decode(raw)

    def snapshot(self, previous: Snapshot | None = None) -> Snapshot | None:
        """The newest publication; None if there is none, or if it is the one ``previous`` reads."""
        txn = self._begin()
        if txn is None:
            return None
        head = self._head(txn)
        before = previous.extras.get(PUBLICATION_KEY) if previous is not None else None
        if head is None or (isinstance(before, _Publication) and (before.epoch, before.generation)
                            == (head.epoch, head.generation)):
            txn.abort()
            return None
        follows = isinstance(before, _Publication) and before.epoch == head.epoch \
            and before.generation == head.generation - 1
        indexes: dict[str, MappedIndex[Any, Any]] = {}
        for name in (*CORE_INDEXES, *self.extra_types):
            db = self._db(name)
            carry: dict[Any, Any] | None = None
            stale: frozenset[bytes] = frozenset()
            changed = head.changed.get(name)
            if follows and name in head.changed and changed is not None and name not in ATTACHMENT_INDEXES:
                # Attachments hold their instance: they are rebuilt from the instances index, never carried.
                assert isinstance(before, _Publication)
                carry, stale = before.indexes[name].memo(), frozenset(changed)
            indexes[name] = MappedIndex(txn, db, name, self._value_decoder(txn, name, indexes), self.memo_entries,
                                        txn.stat(db)["entries"], carry, stale)
        if isinstance(before, _Publication):
            for index in before.indexes.values():
                index.let_go()
        view = View(head.serial, head.generated, head.cloud, head.networks,
                    # A sequence read from the file, not a tuple: nothing a worker runs needs more than a walk.
                    MappedInstances(indexes["instances"]),  # type: ignore[arg-type]
                    format=head.format, version=head.version, ordered=head.ordered, extensions=head.extensions)
        counts: ViewCounts = {"networks": head.counts.get("networks", 0), "instances": head.counts.get("instances", 0),
                              "interfaces": head.counts.get("interfaces", 0), "names": head.counts.get("names", 0)}
        snapshot = Snapshot(
            view=view, generation=next_generation(), built_at=head.built_at, instances=indexes["instances"],
            by_private=indexes["private"], by_public=indexes["public"], by_mac=indexes["mac"],
            names=indexes["names"], zones=head.zones, network_ids=frozenset(head.network_ids))
        snapshot.extras[COUNTS_KEY] = counts
        snapshot.extras[PUBLICATION_KEY] = _Publication(head.epoch, head.generation, indexes)
        snapshot.extras[SHARED_INDEXES_KEY] = {name: indexes[name] for name in self.extra_types}
        return snapshot

    def _value_decoder(self, txn: lmdb.Transaction, name: str,
                       indexes: Mapping[str, MappedIndex[Any, Any]]) -> Callable[[bytes], Any]:
        decoder = self._decoders.get(name)
        if name in ("instances", "names"):
            zdict = txn.get(f"zdict:{name}".encode(), db=self._db("head")) or b""
            compressor = _Compressor(bytes(zdict))
            assert decoder is not None
            decode = decoder.decode
            decompress = compressor.decompress
            return lambda raw: decode(decompress(raw))
        if name in ATTACHMENT_INDEXES:
            position = self._position.decode

            def attachment(raw: bytes) -> Any:
                instance_id, where = position(raw)
                instance = indexes["instances"].get(instance_id)
                if instance is None:  # the writer keeps them together; a torn view is the writer's bug
                    raise StateError(f"shared view: {name} entry names instance {instance_id}, which is missing")
                return Attachment(instance, instance.interfaces[where])
            return attachment
        assert decoder is not None
        return decoder.decode


def shared_index(snapshot: Snapshot, name: str) -> Mapping[Any, Any] | None:
    """An extra index the supervisor published with this (mapped) snapshot, or None."""
    found = snapshot.extras.get(SHARED_INDEXES_KEY)
    if not isinstance(found, dict):
        return None
    return found.get(name)


def shared_view_directory(state_dir: str) -> str:
    return os.path.join(state_dir, SHARED_DIR)



class SharedViewFollower:
    """A worker's poller when its gateway shares one view: each new publication is swapped in as it is.

    Nothing is decoded or indexed here: the snapshot reads the shared file, and the protocol preparers
    only derive what is small (zones, DNS settings; the name walks come with the publication).  The
    supervisor says when a poll finished (:class:`edge.supervisor.SupervisedRefresh` calls
    :meth:`poll_once`); a check every ``interval`` seconds is the safety net.
    """

    def __init__(self, reader: SharedViewReader, store: ViewStore, preparers: Iterable[Preparer] = (),
                 interval: float = 5.0) -> None:
        self.reader = reader
        self.store = store
        self.preparers = tuple(preparers)
        self.interval = interval
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def poll_once(self) -> None:
        status = self.store.status
        status.polls += 1
        status.last_poll_at = time.time()
        try:
            snapshot = self.reader.snapshot(self.store.current)
            if snapshot is not None:
                run_preparers(snapshot, self.preparers)
        except Exception as exc:  # noqa: BLE001 - keep serving the snapshot in hand
            self.failures += 1
            status.last_poll_result, status.last_error = "error", f"shared view: {exc!r}"
            status.consecutive_failures += 1
            event(log, logging.ERROR, "shared view unreadable; keeping the current view", path=self.reader.directory,
                  error=repr(exc))
            return
        status.consecutive_failures = 0
        status.last_error = ""
        if snapshot is None:
            status.last_poll_result = "unchanged"
        else:
            status.last_poll_result = "accepted"
            first = self.store.current is None
            self.store.swap(snapshot, "shared")
            if first:
                event(log, logging.INFO, "serving the shared view", path=self.reader.directory, serial=snapshot.serial,
                      **snapshot.counts())
        if self.store.current is not None:
            status.confirmed_at = status.last_poll_at

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="shared-view-follower")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.poll_once()

    async def refresh(self) -> None:
        await self.poll_once()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
