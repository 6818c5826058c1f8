"""The view in etcd: stored under one key (polled by revision), or as a keyspace under a prefix (watched).

Each poll is one range request with ``min_mod_revision`` set just past the
revision last delivered: while the key is unchanged etcd answers with the
header and the match count only, so an idle fleet costs etcd a few hundred
bytes per gateway per poll however large the view is.  A count of zero means
the key is gone (an error: the gateway keeps its view); a cluster revision
lower than the one delivered means the cluster was restored from a backup,
and the value is fetched again.

Values may be stored gzip-compressed (recognised by the gzip magic bytes) to
stay under etcd's request size limit (``--max-request-bytes``, 1.5 MiB by
default).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar, cast

from edge.config import ViewConfig
from edge.errors import SourceError, ViewInvalid, ViewTooLarge
from edge.etcd.client import (
    PAGE_BYTES,
    EtcdAccess,
    EtcdAddress,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdValueTooLarge,
    KeyValue,
    RangePage,
    RangeResult,
    Watch,
    prefix_end,
)
from edge.logs import event
from edge.view.inflate import gunzip_capped
from edge.view.keyspace import INSTANCES, Keyspace, PreparedView
from edge.view.sources import ViewSource

log = logging.getLogger("edge.view")

_GZIP_MAGIC = b"\x1f\x8b"


def etcd_access(config: ViewConfig) -> EtcdAccess:
    """The TLS files and login of ``config``."""
    return EtcdAccess(ca_file=config.ca_file, cert_file=config.cert_file, key_file=config.key_file,
                      username=config.etcd_username, password=str(config.etcd_password),
                      password_file=config.etcd_password_file)


def view_client(spec: str, config: ViewConfig) -> EtcdClient:
    """A client for the view at ``spec`` with ``config``'s timeouts, size cap and access; an
    address that does not parse is a SourceError, as every source reports a bad spec."""
    try:
        address = EtcdAddress.parse(spec)
    except EtcdError as exc:
        raise SourceError(str(exc)) from None
    return EtcdClient(address, config.connect_timeout, config.read_timeout, config.max_size, etcd_access(config))


class EtcdSource(ViewSource):
    def __init__(self, spec: str, config: ViewConfig) -> None:
        self.client = view_client(spec, config)
        address = self.client.address
        self.description = str(address)
        self.max_size = config.max_size
        self.config = config
        self.revision = 0
        """``mod_revision`` of the value last delivered (0: none yet)."""
        self._timeout = len(address.endpoints) * (config.connect_timeout + config.read_timeout) + 1
        self.value_fetches = 0
        """Polls that transferred the value (the rest were header-only)."""

    async def fetch(self) -> bytes | None:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._poll), self._timeout)
        except asyncio.TimeoutError:
            raise SourceError(f"{self.description}: no answer within {self._timeout:g}s") from None

    def forget(self) -> None:
        """Deliver the value again next poll even if unchanged."""
        self.revision = 0

    def _poll(self) -> bytes | None:
        result = self._range(self.revision + 1 if self.revision else 0)
        if result.kv is None and result.count and result.revision < self.revision:
            self.revision = 0
            result = self._range(0)
        if result.count == 0:
            raise SourceError(f"{self.description}: key not found")
        if result.kv is None:
            return None
        self.value_fetches += 1
        data = result.kv.value
        if data.startswith(_GZIP_MAGIC):
            data = gunzip_capped(data, self.max_size, self.description, "value")
        self.revision = result.kv.mod_revision
        return data

    def _range(self, min_mod_revision: int) -> RangeResult:
        try:
            return self.client.get(self.client.address.key, min_mod_revision)
        except EtcdValueTooLarge as exc:
            raise ViewTooLarge(str(exc)) from None
        except EtcdError as exc:
            raise SourceError(str(exc)) from None


# -- the view as a keyspace ---------------------------------------------------------------------------

WATCH_STALL_AFTER = 5.0
"""Seconds a change the safety-net poll found may take to come through the watch before it counts as stalled."""
READ_AHEAD_PAGES = 2
"""Pages of a full read fetched ahead of the mirror checking them: etcd writes the next pages (on another
core) while this process parses one, and at most this many wait in memory."""

_Item = TypeVar("_Item")


def read_ahead(produce: Iterator[_Item], depth: int) -> Generator[_Item, None, None]:
    """The items of ``produce``, made in a thread of their own up to ``depth`` ahead of the caller.

    An exception ``produce`` raises is raised here, in its place; closing this iterator (or
    leaving the loop over it) stops the thread at its next item.
    """
    slots: queue.Queue[tuple[bool, _Item | None, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def offer(last: bool, item: _Item | None, error: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                slots.put((last, item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce:
                if not offer(False, item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            offer(True, None, exc)
            return
        finally:
            close = getattr(produce, "close", None)
            if close is not None:
                close()  # a generator's own cleanup runs now, in this thread
        offer(True, None)

    threading.Thread(target=run, name="etcd-read-ahead", daemon=True).start()
    try:
        while True:
            last, item, error = slots.get()
            if error is not None:
                raise error
            if last:
                return
            yield cast("_Item", item)
    finally:
        stop.set()


def is_keyspace(spec: str) -> bool:
    """``etcd://HOST:PORT/PREFIX/`` (a key ending in ``/``) names a keyspace, not one key."""
    return spec.startswith(("etcd://", "etcds://")) and spec.endswith("/")


def open_etcd_source(spec: str, config: ViewConfig) -> EtcdSource | EtcdKeyspaceSource:
    """The view under one etcd key, or (for an address ending in ``/``) the keyspace under that prefix."""
    return EtcdKeyspaceSource(spec, config) if is_keyspace(spec) else EtcdSource(spec, config)


class EtcdKeyspaceSource(ViewSource):
    """The view as keys under a prefix (:mod:`edge.view.keyspace`), read once and then watched.

    The first poll reads every key under the prefix at one revision R (a linearizable
    first page, the others pinned to R; the instances last, streamed into the mirror as
    their pages arrive) and starts a watch from R+1 over the gateway's
    streaming ``/v3/watch``; each event is applied to the mirror as it arrives and the
    poller is told to poll, which delivers the new view once its serial has risen.

    Every scheduled poll is also a safety net (:meth:`_catch_up`): a count of the keys
    under the prefix and, when the cluster's revision has moved, the keys modified since
    the mirror's revision.  Changes the watch has not delivered are applied; changes it
    has still not reported ``stall_after`` seconds later mean it stalled, and a count
    that differs from the mirror's means deletions were missed: both end in a fresh
    read of every key, as does a watch that breaks, is compacted or sends anything but
    watch messages.  So a gateway is never more than one poll behind.
    """

    def __init__(self, spec: str, config: ViewConfig) -> None:
        self.client = view_client(spec, config)
        address = self.client.address
        self.description = str(address)
        self.prefix = address.key
        self.end = prefix_end(address.key)
        self._timeout = len(address.endpoints) * (config.connect_timeout + config.read_timeout) * 4 + 1
        self.keyspace = Keyspace(self.description)
        self.revision = 0
        """The mirror holds every change up to this revision (0: nothing read yet)."""
        self._lock = threading.Lock()
        """Held while the mirror changes: by a poll's reads and by the watch thread's events."""
        self._fresh_read_needed = True
        self._watch: Watch | None = None
        self._watch_generation = 0
        self._watch_revision = 0
        """The highest revision the watch has reported (applied or already held)."""
        self._awaiting_watch: tuple[int, float] | None = None
        """(revision, when): changes a safety-net poll applied that the watch has yet to report."""
        self.stall_after = WATCH_STALL_AFTER
        self.page_bytes = PAGE_BYTES
        """About how many bytes of keys and values each range request of a read asks for."""
        self._delivered_serial: int | None = None
        self._delivered_once = False
        self._notify: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.full_reads = 0
        self.watch_events = 0
        self.watch_restarts = 0
        """Watches ended by an error, a compaction or a stall (each followed by a fresh read)."""
        self.caught_up = 0
        """Changes the safety-net poll applied before the watch delivered them."""

    # -- the poller's side -------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Running totals for ``edge_view_source_events_total``."""
        return {"key_refused": self.keyspace.problems, "watch_event": self.watch_events,
                "watch_restart": self.watch_restarts, "full_read": self.full_reads, "caught_up": self.caught_up}

    def subscribe(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` on the running loop whenever the watch brings news (the poller polls then)."""
        self._loop = asyncio.get_running_loop()
        self._notify = changed

    async def fetch(self) -> PreparedView | None:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._poll), self._timeout)
        except asyncio.TimeoutError:
            raise SourceError(f"{self.description}: no answer within {self._timeout:g}s") from None

    def forget(self) -> None:
        """Deliver the view again next poll even if its serial has not changed."""
        self._delivered_serial = None

    def close(self) -> None:
        with self._lock:
            self._watch_generation += 1
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    # -- one poll (in a thread) ------------------------------------------------------------

    def _poll(self) -> PreparedView | None:
        try:
            with self._lock:
                if self._fresh_read_needed:
                    self._read_everything()
                else:
                    self._catch_up()
                start_watch = self._watch is None
            if start_watch:
                self._start_watch()
            with self._lock:
                return self._deliver()
        except EtcdValueTooLarge as exc:
            raise ViewTooLarge(str(exc)) from None
        except EtcdError as exc:
            raise SourceError(str(exc)) from None

    def _read_everything(self) -> None:
        """Every key under the prefix at one revision, into the mirror (unchanged parts stay as they are)."""
        for attempt in range(3):
            try:
                revision = self._read_all_keys()
                break
            except EtcdCompacted:
                if attempt == 2:
                    raise
        self.revision = revision
        self._awaiting_watch = None
        self._fresh_read_needed = False
        self.full_reads += 1
        self._stop_watch()

    def _read_all_keys(self) -> int:
        """Every key under the prefix at one revision R into the mirror; R.

        The keys that are not instances come first (the networks are what each instance
        is checked against), then the instances, handed to the mirror as their pages
        arrive, with the next pages read ahead meanwhile.  A read that fails part way
        leaves the mirror holding some values of R: a fresh read is still needed, and no
        view is delivered until one succeeds.
        """
        pages = read_ahead(self._pages(), READ_AHEAD_PAGES)
        try:
            head: list[tuple[str, bytes, int]] = []
            revision = 0
            for in_instances, page in pages:
                revision = revision or page.revision
                if in_instances:
                    break
                head += [self._item(kv) for kv in page.kvs]
            if not head and not page.kvs:
                raise SourceError(f"{self.description}: no keys under the prefix")

            def instances() -> Iterator[tuple[str, bytes, int]]:
                yield from [self._item(kv) for kv in page.kvs]
                for _, more in pages:
                    yield from [self._item(kv) for kv in more.kvs]

            self.keyspace.reset(head, instances())
            return revision
        finally:
            pages.close()

    def _pages(self) -> Iterator[tuple[bool, RangePage]]:
        """(is it the instances' range, page): the prefix in three ranges, all at the first one's revision."""
        instances = self.prefix + INSTANCES.encode()
        after_instances = prefix_end(instances)
        revision = 0
        for start, end, in_instances in ((self.prefix, instances, False), (after_instances, self.end, False),
                                         (instances, after_instances, True)):
            for page in self.client.range_pages(start, end, revision, page_bytes=self.page_bytes):
                revision = page.revision
                yield in_instances, page

    def _item(self, kv: KeyValue) -> tuple[str, bytes, int]:
        return self._name(kv.key), kv.value, kv.mod_revision

    def _name(self, key: bytes) -> str:
        return key[len(self.prefix):].decode("utf-8", "replace")

    def _catch_up(self) -> None:
        """The safety net: changes since the mirror's revision, and the key count.

        First a count, which etcd answers from its index: when the cluster's revision is the
        mirror's and the count matches, nothing was written anywhere since, and the poll
        ends there.  Otherwise a range asks for the keys modified since the mirror's
        revision, which makes etcd read the prefix's values (it filters by revision after
        reading), so it is asked only when something was written.
        """
        awaiting = self._awaiting_watch
        if awaiting is not None and self._watch_revision >= awaiting[0]:
            awaiting = self._awaiting_watch = None  # the watch has caught up with what a poll found
        if (awaiting is not None and self._watch is not None
                and time.monotonic() - awaiting[1] >= self.stall_after):
            # Changes an earlier poll found have still not come through the watch: it is stuck.
            event(log, logging.WARNING, "etcd watch stalled; reading every key again", source=self.description,
                  waiting_for=awaiting[0], watch_revision=self._watch_revision)
            self.watch_restarts += 1
            self._read_everything()
            return
        revision, count = self.client.count(self.prefix, self.end)
        if revision < self.revision:
            # The cluster was restored from a backup to an older revision: start over.
            self.revision = self._watch_revision = 0
            self._read_everything()
            return
        if revision == self.revision and count == self.keyspace.key_count:
            return
        kvs: list[KeyValue] = []
        count = -1
        for page in self.client.range_pages(self.prefix, self.end, min_mod_revision=self.revision + 1,
                                            page_bytes=self.page_bytes):
            if count < 0:
                count = page.count  # the first page's: every key under the prefix, before the filter
            revision = page.revision
            kvs += page.kvs
        for kv in kvs:
            self.keyspace.put(self._name(kv.key), kv.value, kv.mod_revision)
        self.caught_up += len(kvs)
        self.revision = max(self.revision, revision)
        if kvs and self._watch is not None and awaiting is None:
            self._awaiting_watch = (max(kv.mod_revision for kv in kvs), time.monotonic())
        if count != self.keyspace.key_count:
            # Keys were deleted and the watch has not said so: only a full read finds which.
            self._read_everything()

    def _deliver(self) -> PreparedView | None:
        if not self.keyspace.changed and self._delivered_serial is not None:
            return None
        try:
            view, _ = self.keyspace.view()
        except ViewInvalid as exc:
            raise SourceError("; ".join(exc.problems)) from None
        if view.serial == self._delivered_serial:
            return None
        incremental = self._delivered_once
        self._delivered_serial = view.serial
        self._delivered_once = True
        return self.keyspace.prepared(incremental)

    # -- the watch (its own thread) ----------------------------------------------------------------

    def _start_watch(self) -> None:
        with self._lock:
            if self._watch is not None:
                return
            self._watch_generation += 1
            generation = self._watch_generation
            watch = self._watch = self.client.watch(self.prefix, self.end, self.revision + 1)
        threading.Thread(target=self._follow, args=(watch, generation), name="etcd-watch", daemon=True).start()

    def _stop_watch(self) -> None:
        """Called with the lock held."""
        self._watch_generation += 1
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def _follow(self, watch: Watch, generation: int) -> None:
        try:
            for _, events in watch:
                if not events:
                    continue
                with self._lock:
                    if generation != self._watch_generation:
                        return
                    self._watch_revision = max(self._watch_revision, max(item.kv.mod_revision for item in events))
                    applied = 0
                    for item in events:
                        if item.kv.mod_revision <= self.revision:
                            continue  # a poll's read already holds it
                        name = self._name(item.kv.key)
                        if item.deleted:
                            self.keyspace.delete(name)
                        else:
                            self.keyspace.put(name, item.kv.value, item.kv.mod_revision)
                        applied += 1
                    if applied:
                        self.revision = max(self.revision, max(item.kv.mod_revision for item in events))
                        self.watch_events += applied
                if applied:
                    self._tell_poller()
        except EtcdError as exc:
            with self._lock:
                if generation != self._watch_generation:
                    return
                self._watch = None
                self._fresh_read_needed = True
                self.watch_restarts += 1
            event(log, logging.WARNING, "etcd watch ended; reading every key again", source=self.description,
                  error=str(exc))
            self._tell_poller()
        except Exception as exc:  # noqa: BLE001 - a fault here must not leave the mirror silently frozen
            with self._lock:
                if generation == self._watch_generation:
                    self._watch = None
                    self._fresh_read_needed = True
                    self.watch_restarts += 1
            event(log, logging.ERROR, "etcd watch failed; reading every key again", exc_info=True,
                  source=self.description, error=repr(exc))
            self._tell_poller()

    def _tell_poller(self) -> None:
        loop, notify = self._loop, self._notify
        if loop is not None and notify is not None:
            try:
                loop.call_soon_threadsafe(notify)
            except RuntimeError:
                pass  # the loop has closed: the gateway is stopping
