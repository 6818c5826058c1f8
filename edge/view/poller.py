"""Poll the source, validate, build a snapshot off the loop, swap, persist.

The poller is the only writer of the store.  One task does every poll, so
periodic polls and "refresh now" requests never run concurrently: a refresh
request wakes the task early (no sooner than ``refresh_min_interval`` after the
previous poll) and every caller waiting at that moment is answered by the same
poll.  A boot storm of unknown instances therefore costs one poll.

Safety rules: a document is validated whole before it is swapped; a lower
serial never replaces a higher one and an equal serial is "unchanged"; every
accepted document is written to the state directory so a restart without the
control plane serves the last good view at once.

A new serial of the view being served is built as a delta of the current
snapshot when it can be (:mod:`edge.view.delta`): unchanged instances are not
decoded, validated or indexed again.  What that needs from the last build is
kept in ``_memo``, which never refers to a snapshot, only to values the
snapshots share.

A source may deliver a :class:`~edge.view.keyspace.PreparedView` (a view it
decoded and checked part by part, such as an etcd keyspace) instead of
bytes; one whose unchanged instances are the very objects being served is
applied as a delta without any decoding.  A source that is told of changes (a
watch) calls the function it was given by ``subscribe``, and the poller polls
at once (no sooner than ``refresh_min_interval`` after the previous poll).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from edge.config import ViewConfig
from edge.errors import SourceError, StateError, ViewInvalid
from edge.logs import event
from edge.view.delta import applies, apply_delta
from edge.view.formats import Decoded, DecodeMemo, decode_view, decode_view_reusing
from edge.view.keyspace import PreparedView
from edge.view.model import View
from edge.view.release import release_gradually, release_memo
from edge.view.snapshot import IndexState, Preparer, Snapshot, build_snapshot_tracked, remember_counts, run_preparers
from edge.view.sources import ViewSource
from edge.view.statefile import StateFile, changes_record, restore
from edge.view.store import ViewStore

log = logging.getLogger("edge.view")

MAX_PROBLEMS_LOGGED = 50
BUILD_SWITCH_INTERVAL = 0.0005

Decoder = Callable[[bytes], View]


@dataclass(frozen=True, slots=True)
class PollOutcome:
    result: str
    """``accepted``, ``unchanged``, ``rejected``, ``stale`` or ``error``."""
    serial: int | None = None
    error: str = ""


@contextmanager
def _building() -> Iterator[None]:
    """Keep the event loop responsive while a snapshot is built in a thread.

    A build allocates millions of objects; the cyclic collections that triggers
    would traverse them all while holding the interpreter lock, stalling the
    loop for tens of milliseconds (snapshots are acyclic, so pausing the
    collector loses nothing).  A shorter switch interval makes the build thread
    hand the lock back to the loop sooner.
    """
    was_enabled = gc.isenabled()
    interval = sys.getswitchinterval()
    gc.disable()
    sys.setswitchinterval(BUILD_SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if was_enabled:
            gc.enable()


@dataclass(slots=True)
class BuildMemo:
    """What the build of snapshot ``generation`` leaves for building the next one as a delta."""

    generation: int
    decoded: DecodeMemo | None
    """None when the document was not ``edge-view/1`` JSON (Eucalyptus GNI is always built in full)."""
    index: IndexState
    delta: bool = False
    """Whether this build was a delta (reported in logs and benchmarks)."""


SHARED_SAMPLE = 64


def _mostly_shared(current: Snapshot, view: View) -> bool:
    """Whether at least half of a sample of ``view``'s instances are the very objects ``current`` serves.

    A prepared view shares its unchanged instances with the snapshot built from the source's
    previous one; after the served snapshot came from elsewhere (the state file, a full
    document) they are equal but not the same, and a delta would redo every instance.
    """
    instances = view.instances
    if not instances:
        return True
    step = max(1, len(instances) // SHARED_SAMPLE)
    sample = instances[::step]
    served = current.instances
    return sum(served.get(instance.id) is instance for instance in sample) * 2 >= len(sample)


class _Stale(Exception):
    def __init__(self, serial: int) -> None:
        self.serial = serial


class Poller:
    def __init__(self, config: ViewConfig, source: ViewSource, store: ViewStore, state: StateFile | None,
                 preparers: Iterable[Preparer] = (), decode: Decoder = decode_view,
                 on_outcome: Callable[[PollOutcome], None] | None = None) -> None:
        self.config = config
        self.source = source
        self.store = store
        self.state = state
        self.preparers = tuple(preparers)
        self.decode = decode
        self.on_outcome = on_outcome
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._last_poll_started = 0.0
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._releases: set[asyncio.Task[object]] = set()
        self._memo: BuildMemo | None = None
        self._pending: BuildMemo | None = None
        self._in_progress: asyncio.Future[None] | None = None
        self._source_changed = False
        self._persisted: View | None = None
        """The view the state directory holds (document plus journal): a change relative to it is appended."""
        self._latest_document: Callable[[], bytes] | None = None
        """The document of the last view persisted through the journal (what a compaction writes)."""
        self._compaction: asyncio.Task[None] | None = None
        self.journal_events: dict[str, int] = {"state_journal_append": 0, "state_journal_compaction": 0,
                                               "state_journal_damaged": 0}
        """Running totals, reported with the source's in ``edge_view_source_events_total``."""

    # -- start-up -------------------------------------------------------------------------------

    async def load_last_good(self) -> bool:
        """Serve the view kept in the state directory (the document and its journal), if there is a valid one."""
        if self.state is None:
            return False
        try:
            restored = await asyncio.to_thread(restore, self.state)
        except StateError as exc:
            event(log, logging.ERROR, "last good view unreadable", error=str(exc))
            return False
        if restored is None:
            return False
        if restored.damage:
            # What precedes the damage is served; the next accepted view rewrites the document whole.
            self.journal_events["state_journal_damaged"] += 1
            self.store.status.source_events = {**self.store.status.source_events, **self.journal_events}
            event(log, logging.ERROR, "last good view journal damaged; serving the changes before the damage",
                  path=self.state.journal_path, applied=restored.applied, reason=restored.damage)
        data = restored.data
        try:
            with _building():
                snapshot = await asyncio.to_thread(self._build, data, None)
                if snapshot is not None:
                    self._swap(snapshot, "state")
        except ViewInvalid as exc:
            event(log, logging.ERROR, "last good view on disk is corrupt; ignoring it",
                  path=self.state.path, problems=len(exc.problems), first=exc.problems[0])
            return False
        except Exception as exc:  # noqa: BLE001 - start from the source rather than not at all
            event(log, logging.ERROR, "last good view on disk could not be built; ignoring it", exc_info=True,
                  path=self.state.path, error=repr(exc))
            return False
        assert snapshot is not None
        event(log, logging.INFO, "last good view loaded", serial=snapshot.serial, path=self.state.path,
              journal_records=restored.applied, **snapshot.counts())
        return True

    # -- the polling task -----------------------------------------------------------------------

    def start(self) -> None:
        self.source.subscribe(self._changed_at_source)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="view-poller")

    def _changed_at_source(self) -> None:
        """The source says it has news (a watch event): poll now rather than at the next interval."""
        self._source_changed = True
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.source.close()
        self._answer_waiters()
        await self._compact_journal(at_stop=True)

    async def refresh(self) -> None:
        """Ask for a poll now; completes when the poll that answers it has finished."""
        if self._task is None or self._task.done():
            # Not polling on a schedule (yet): a poll in progress, such as a fresh gateway's
            # first one while its listeners are already open, is the one that answers.
            if self._in_progress is not None:
                await asyncio.shield(self._in_progress)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await asyncio.shield(waiter)

    async def _run(self) -> None:
        while True:
            outcome = await self.poll_once()
            await self._sleep(self._delay_after(outcome))

    def _delay_after(self, outcome: PollOutcome) -> float:
        interval = self.config.poll_interval
        failures = self.store.status.consecutive_failures
        if failures:
            interval = min(interval * (2 ** min(failures, 16)), self.config.backoff_max)
        return interval * (1 + self._rng.uniform(0, self.config.poll_jitter))

    async def _sleep(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return
            self._wake.clear()
            if self._waiters or self._source_changed:
                # Rate-limit refreshes: never poll sooner than refresh_min_interval after the last poll.
                earliest = self._last_poll_started + self.config.refresh_min_interval
                await asyncio.sleep(max(0.0, earliest - time.monotonic()))
                return

    # -- one poll ---------------------------------------------------------------------------------

    async def poll_once(self) -> PollOutcome:
        self._last_poll_started = time.monotonic()
        self._source_changed = False
        answering = self._waiters
        self._waiters = []
        in_progress = self._in_progress = asyncio.get_running_loop().create_future()
        try:
            outcome = await self._poll()
        finally:
            for waiter in answering:
                if not waiter.done():
                    waiter.set_result(None)
            in_progress.set_result(None)
            if self._in_progress is in_progress:
                self._in_progress = None
        status = self.store.status
        status.source_events = {**self.source.counters(), **self.journal_events} if self.state is not None \
            else self.source.counters()
        status.polls += 1
        status.last_poll_at = time.time()
        status.last_poll_result = outcome.result
        if outcome.result in ("accepted", "unchanged") and self.store.current is not None:
            status.confirmed_at = status.last_poll_at
        if outcome.result in ("accepted", "unchanged"):
            if outcome.result == "accepted" or not status.last_error:
                status.consecutive_failures = 0
            if outcome.result == "accepted":
                status.last_error = ""
        else:
            status.consecutive_failures += 1
            status.last_error = outcome.error
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    async def _poll(self) -> PollOutcome:
        source = self.source.description
        try:
            data = await self.source.fetch()
        except SourceError as exc:
            event(log, logging.WARNING, "view source error", source=source, error=str(exc),
                  failures=self.store.status.consecutive_failures + 1)
            return PollOutcome("error", error=str(exc))
        if data is None:
            return PollOutcome("unchanged", serial=self._current_serial())
        current = self._current_serial()
        try:
            with _building():
                snapshot = await asyncio.to_thread(self._build, data, current)
                if snapshot is not None:
                    self._swap(snapshot, "source")
        except ViewInvalid as exc:
            shown = exc.problems[:MAX_PROBLEMS_LOGGED]
            event(log, logging.ERROR, "view rejected", source=source, problems=len(exc.problems),
                  reason=shown[0])
            for problem in shown[1:]:
                event(log, logging.ERROR, "view problem", source=source, problem=problem)
            if len(exc.problems) > len(shown):
                event(log, logging.ERROR, "view problems not shown", count=len(exc.problems) - len(shown))
            return PollOutcome("rejected", error=str(exc))
        except _Stale as stale:
            message = f"serial {stale.serial} is lower than the serial being served ({current})"
            event(log, logging.WARNING, "view ignored: lower serial", source=source, offered=stale.serial,
                  serving=current)
            return PollOutcome("stale", serial=stale.serial, error=message)
        except Exception as exc:  # noqa: BLE001 - a fault in decoding or indexing must not end polling
            event(log, logging.ERROR, "view build failed; keeping the current view", exc_info=True, source=source,
                  error=repr(exc))
            return PollOutcome("error", error=f"build failed: {exc!r}")
        if snapshot is None:
            return PollOutcome("unchanged", serial=current)
        event(log, logging.INFO, "view accepted", source=source, serial=snapshot.serial,
              previous=current, build="delta" if self.last_build_was_delta else "full", **snapshot.counts())
        await self._persist(data, snapshot.view)
        return PollOutcome("accepted", serial=snapshot.serial)

    def _current_serial(self) -> int | None:
        current = self.store.current
        return None if current is None else current.serial

    def _build(self, data: bytes | PreparedView, current_serial: int | None) -> Snapshot | None:
        """Runs in a worker thread: decode, check the serial (or version), index, prepare."""
        current = self.store.current
        memo = self._memo
        if memo is None or current is None or memo.generation != current.generation:
            memo = None
        decoded: Decoded | None = None
        delta: tuple[Snapshot, IndexState] | None = None
        prepared = isinstance(data, PreparedView)
        if isinstance(data, PreparedView):
            view = data.view
            if memo is not None and current is not None and view.serial > current.serial and applies(current, view):
                # None when a rule across instances is broken: the full build below explains it.
                if data.changes is not None and data.changes.base is current.view:
                    # The source says what changed since the very view being served.
                    delta = apply_delta(current, memo.index, view, changes=data.changes)
                elif data.incremental and _mostly_shared(current, view):
                    delta = apply_delta(current, memo.index, view)
        elif self._speaks_view(data):
            decoded = decode_view_reusing(data, memo.decoded if memo is not None else None, defer_cross_check=True)
            view = decoded.view
            if decoded.delta:
                assert memo is not None and current is not None
                if applies(current, view):
                    delta = apply_delta(current, memo.index, view)
                if delta is None:
                    # A rule across instances is broken (or the delta cannot apply): the full
                    # parser explains which, or validates the view for a full build.
                    view = decode_view(data)
                    decoded = None
        else:
            view = self.decode(data)
        if current_serial is not None and current is not None:
            if view.ordered and current.view.ordered:
                if view.serial < current_serial:
                    raise _Stale(view.serial)
                if view.serial == current_serial:
                    return None
            elif view.version and view.version == current.view.version:
                return None
        del current
        if delta is not None:
            snapshot, state = delta
            run_preparers(snapshot, self.preparers)
        else:
            snapshot, state = build_snapshot_tracked(
                view, self.preparers, check_unique=prepared or (decoded is not None and not decoded.cross_checked))
        remember_counts(snapshot)
        self._pending = BuildMemo(snapshot.generation, decoded.memo if decoded is not None else None, state,
                                  delta=delta is not None)
        return snapshot

    def _speaks_view(self, data: bytes) -> bool:
        if self.decode is decode_view:
            return True
        speaks = getattr(self.decode, "speaks_view", None)
        return speaks is not None and speaks(data)

    @property
    def last_build_was_delta(self) -> bool:
        return self._memo is not None and self._memo.delta

    def _swap(self, snapshot: Snapshot, loaded_from: str) -> None:
        holder = [self.store.current] if self.store.current is not None else []
        self.store.swap(snapshot, loaded_from)
        # Long-lived snapshot objects need no cycle collection; freezing them keeps
        # later collections (which hold the interpreter lock) short while serving.
        gc.freeze()
        pending, self._pending = self._pending, None
        previous_memo = [self._memo] if self._memo is not None else []
        self._memo = pending if pending is not None and pending.generation == snapshot.generation else None
        loop = asyncio.get_running_loop()
        replaced_by_delta = self._memo is not None and self._memo.delta
        if holder:
            task = loop.create_task(asyncio.to_thread(release_gradually, holder, replaced_by_delta))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)
        if previous_memo:
            memo_release = loop.create_task(asyncio.to_thread(release_memo, previous_memo, replaced_by_delta))
            self._releases.add(memo_release)
            memo_release.add_done_callback(self._releases.discard)

    async def _persist(self, data: bytes | PreparedView, view: View) -> None:
        """Keep the accepted view in the state directory.

        A prepared view that says what changed since the view kept there costs one journal
        record (the changed instances' texts); anything else, the whole document.
        """
        if self.state is None:
            return
        state = self.state
        changes = data.changes if isinstance(data, PreparedView) else None
        try:
            if changes is not None and self._persisted is not None and changes.base is self._persisted:
                assert isinstance(data, PreparedView)
                record = changes_record(changes.base.serial, view.serial, changes.texts, changes.removed)
                size = await asyncio.to_thread(state.append, record)
                self.journal_events["state_journal_append"] += 1
                self._latest_document = data.document
                if size > self.config.journal_compact_ratio * max(1, state.document_size()):
                    self._start_compaction()
            else:
                await self._finish_compaction()
                whole = data.document if isinstance(data, PreparedView) else data
                await asyncio.to_thread(lambda: state.write(whole() if callable(whole) else whole))
                self._latest_document = None
            self._persisted = view
            self.store.status.state_write_error = ""
        except StateError as exc:
            self._persisted = None  # the next accepted view is written whole
            self.store.status.state_write_error = str(exc)
            event(log, logging.ERROR, "last good view not saved; still serving it from memory", error=str(exc))

    def _start_compaction(self) -> None:
        if self._compaction is not None and not self._compaction.done():
            return
        self._compaction = asyncio.get_running_loop().create_task(self._compact_journal(), name="state-compaction")

    async def _finish_compaction(self) -> None:
        if self._compaction is not None:
            await asyncio.shield(self._compaction)
            self._compaction = None

    async def _compact_journal(self, at_stop: bool = False) -> None:
        """Fold the journal into a new document of the view it ends at (in a thread: O(view))."""
        if at_stop:
            await self._finish_compaction()
        state, document = self.state, self._latest_document
        if state is None or document is None:
            return
        try:
            if not await asyncio.to_thread(os.path.exists, state.journal_path):
                return
            await asyncio.to_thread(state.start_compaction)
            started = time.monotonic()
            await asyncio.to_thread(lambda: state.finish_compaction(document()))
            self.journal_events["state_journal_compaction"] += 1
            event(log, logging.INFO, "last good view journal compacted", path=state.path,
                  seconds=round(time.monotonic() - started, 3), at_stop=at_stop)
        except StateError as exc:
            # The set-aside journal stays and is replayed at start; the next whole write removes it.
            self._persisted = None
            self.store.status.state_write_error = str(exc)
            event(log, logging.ERROR, "last good view journal not compacted", error=str(exc))

    def _answer_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters = []
