"""The Eucalyptus controller as edge's metadata fallback (:class:`edge.metadata.fallback.MetadataFallback`).

For a GNI-fed gateway, a metadata read is answered:

1. from the ``eucalyptus`` answer profile when the GNI alone decides it
   (:mod:`edge.eucalyptus.profile`: addresses, names, MACs, placement, the
   network tree, the version list), exactly as the controller formats it;
2. else from the controller's answer, cached per (instance, path), asked once
   however many wait, served stale while the controller is unreachable;
3. else (the controller has nothing, or is down with nothing kept) from the
   view, as any gateway would: paths edge adds (tokens, tags, events) stay.

The controller answers the same for every metadata version (``MetadataPipeline``
strips it), so answers are kept under ``latest/...`` whatever version was asked.

**Prefetch**: when an instance appears in the GNI, every path the controller
serves for it (walked from its listings: user-data, keys, image, block devices,
IAM, the identity document...) is fetched in the background, a few requests at a
time, so an instance that never asked still gets its user-data and keys while
the controller is down.  An instance is walked again when half of
``controller_stale_if_error`` has passed since its last walk, at the next GNI
change.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import tempfile
import time
from pathlib import Path

from edge.config import Config
from edge.eucalyptus.controller import ControllerAnswer, ControllerMetadata, ControllerUnavailable
from edge.eucalyptus.gni import GniOptions
from edge.eucalyptus.profile import EucalyptusProfile, ProfileOptions
from edge.logs import event
from edge.metadata.fallback import MetadataFallback
from edge.metadata.responses import ANSWERS, BINARY, Outcome, Response, response
from edge.metadata.tree import VERSION_SET, split_path
from edge.view.model import Instance
from edge.view.snapshot import Snapshot

log = logging.getLogger("edge.eucalyptus")

_ASKED = frozenset({"meta-data", "user-data", "dynamic"})
PREFETCH_PATHS_PER_INSTANCE = 256
"""A walk stops after this many paths (a controller answering endless listings cannot loop it)."""
PREFETCH_QUEUE = 100_000
"""Instances waiting to be walked; more are dropped (and counted) until the queue drains."""
RENDERED_PER_ENTRY = 4
SAVED_NAME = "eucalyptus-controller-cache.json"
SAVE_INTERVAL = 30.0
"""The controller's answers are saved at most this often while they change (and when prefetching
drains its queue, and at stop), so a gateway restarted during an outage still has them."""
PREFETCH_RETRY = 30.0
"""Seconds after which instances whose walk failed (the controller was down) are walked again."""


def controller_path(target: bytes) -> str | None:
    """The controller path for a request target, normalised as the controller reads it.

    ``/`` is the version list (``""``); ``/<version>/`` the instance's top listing
    (``latest/``); ``meta-data`` and ``dynamic`` without a trailing slash are their listings;
    ``user-data/`` is user-data.  None: not a path the controller serves.
    """
    parts = split_path(target)
    if parts is None:
        return None
    if not parts:
        return ""
    if parts[0] not in VERSION_SET:
        return None
    if len(parts) == 1:
        return "latest/" if target.split(b"?", 1)[0].endswith(b"/") else None
    if parts[1] not in _ASKED:
        return None
    path = "/".join(["latest", *parts[1:]])
    if parts[-1] in ("meta-data", "dynamic") and len(parts) == 2:
        return path + "/"
    if parts[1] == "user-data":
        return "latest/user-data" if len(parts) == 2 else None
    if target.split(b"?", 1)[0].endswith(b"/"):
        path += "/"
    return path


class ControllerFallback(MetadataFallback):
    """Profile first, then the controller's cached answers, prefetched as instances appear."""

    def __init__(self, config: Config) -> None:
        self.controller = ControllerMetadata(config.eucalyptus)
        self.configure(config)
        self.saved_path = Path(config.view.state_dir) / SAVED_NAME
        self._saved_stored = 0
        self._saver: asyncio.Task[None] | None = None
        self._restore()
        self._rendered: dict[tuple[str, str], tuple[object, Response]] = {}
        self._profiled: dict[tuple[str, str], tuple[int, Response | None]] = {}
        self._walked: dict[str, tuple[str, float]] = {}
        """instance id -> (address it was walked for, when)."""
        self._queue: collections.deque[tuple[str, str]] = collections.deque()
        self._queued: set[str] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._unwalked: dict[str, str] = {}
        """Instances whose last walk failed -> their address: walked again every PREFETCH_RETRY seconds,
        so an instance that appeared while the controller was down is prefetched once it is back."""
        self._retry: asyncio.TimerHandle | None = None
        self.counts = {"hit": 0, "profile": 0, "prefetched": 0, "prefetch_failed": 0, "prefetch_dropped": 0}

    def configure(self, config: Config) -> None:
        euca = config.eucalyptus
        self.config = euca
        self.controller.configure(euca)
        self.profile = EucalyptusProfile(ProfileOptions(GniOptions.of(config), euca.use_instance_dns))
        self._profiled = {}

    # -- answering -------------------------------------------------------------------------------

    def path_of(self, target: bytes) -> str | None:
        return controller_path(target)

    def cached(self, snapshot: Snapshot, instance: Instance, path: str, now: float) -> Response | None:
        profiled = self._profile_answer(snapshot, instance, path)
        if profiled is not None:
            return profiled
        answer = self.controller.cached(instance.id, path, now)
        if answer is None:
            return None
        self.counts["hit"] += 1
        return self._render(instance.id, path, answer)

    async def fetch(self, snapshot: Snapshot | None, instance: Instance, address: str, path: str) -> Response | None:
        try:
            answer = await self.controller.fetch(instance.id, address, path)
        except ControllerUnavailable:
            return None
        return self._render(instance.id, path, answer)

    def _profile_answer(self, snapshot: Snapshot, instance: Instance, path: str) -> Response | None:
        key = (instance.id, path)
        known = self._profiled.get(key)
        if known is not None and known[0] == snapshot.generation:
            found = known[1]
        else:
            body = self.profile.answer(snapshot, instance, path)
            found = None if body is None else response(200, body)
            if len(self._profiled) >= self.controller.config.controller_cache_entries:
                self._profiled = {}
            self._profiled[key] = (snapshot.generation, found)
        if found is not None:
            self.counts["profile"] += 1
        return found

    def _render(self, instance_id: str, path: str, answer: ControllerAnswer) -> Response:
        key = (instance_id, path)
        known = self._rendered.get(key)
        if known is not None and known[0] is answer:
            return known[1]
        if answer.status == 200:
            rendered = response(200, answer.body, BINARY) if path.endswith("user-data") else response(200, answer.body)
        elif answer.status == 404:
            rendered = ANSWERS[Outcome.NOT_FOUND]
        else:
            rendered = ANSWERS[Outcome.UNAVAILABLE]
        if len(self._rendered) > RENDERED_PER_ENTRY * self.controller.config.controller_cache_entries:
            self._rendered = {}
        self._rendered[key] = (answer, rendered)
        return rendered

    # -- prefetch --------------------------------------------------------------------------------

    def view_changed(self, snapshot: Snapshot) -> None:
        if not self.config.prefetch:
            return
        now = time.time()
        rewalk = self.config.controller_stale_if_error / 2
        present: set[str] = set()
        for instance in snapshot.view.instances:
            present.add(instance.id)
            address = _primary_address(instance)
            walked = self._walked.get(instance.id)
            if walked is not None and walked[0] == address and now - walked[1] < rewalk:
                continue
            if instance.id in self._queued:
                continue
            if len(self._queue) >= PREFETCH_QUEUE:
                self.counts["prefetch_dropped"] += 1
                continue
            self._queue.append((instance.id, address))
            self._queued.add(instance.id)
        for gone in [i for i in self._walked if i not in present]:
            del self._walked[gone]
        for gone in [i for i in self._unwalked if i not in present]:
            del self._unwalked[gone]
        if self._queue:
            self._start_workers()
        if self._saver is None:
            self._saver = asyncio.get_running_loop().create_task(self._save_while_serving())

    def _walk_failed_again(self) -> None:
        self._retry = None
        for instance_id, address in list(self._unwalked.items()):
            if instance_id not in self._queued and len(self._queue) < PREFETCH_QUEUE:
                self._queue.append((instance_id, address))
                self._queued.add(instance_id)
        if self._queue:
            self._start_workers()

    def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [task for task in self._workers if not task.done()]
        while len(self._workers) < self.config.prefetch_concurrency:
            self._workers.append(loop.create_task(self._prefetch_worker()))

    async def _prefetch_worker(self) -> None:
        await self._drain_queue()
        if not self._queue and not any(not t.done() for t in self._workers if t is not asyncio.current_task()):
            await self.save()  # a finished round of prefetching is worth keeping at once

    async def _drain_queue(self) -> None:
        while self._queue:
            instance_id, address = self._queue.popleft()
            self._queued.discard(instance_id)
            try:
                complete = await self.prefetch(instance_id, address)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not stop the others
                event(log, logging.ERROR, "prefetch failed", instance=instance_id, error=repr(exc))
                complete = False
            if complete:
                self._walked[instance_id] = (address, time.time())
                self._unwalked.pop(instance_id, None)
                self.counts["prefetched"] += 1
            else:
                self._unwalked[instance_id] = address
                self.counts["prefetch_failed"] += 1
                if self._retry is None:
                    self._retry = asyncio.get_running_loop().call_later(PREFETCH_RETRY, self._walk_failed_again)

    async def prefetch(self, instance_id: str, address: str) -> bool:
        """Walk every path the controller serves for one instance; True when every one answered."""
        pending = collections.deque(["latest/", "latest/user-data", "latest/meta-data/", "latest/dynamic/"])
        seen: set[str] = set()
        complete = True
        while pending and len(seen) < PREFETCH_PATHS_PER_INSTANCE:
            path = pending.popleft()
            if path in seen:
                continue
            seen.add(path)
            try:
                answer = await self.controller.fetch(instance_id, address, path)
            except ControllerUnavailable:
                return False
            if answer.status != 200 or not path.endswith("/") or path == "latest/":
                continue
            for line in answer.body.decode("utf-8", "replace").splitlines():
                entry = line.strip()
                if not entry or "/" in entry.rstrip("/") or entry in (".", ".."):
                    continue
                if "=" in entry and entry.partition("=")[0].isdigit():
                    entry = entry.partition("=")[0] + "/"  # public-keys: "0=name" is the directory 0/
                pending.append(path + entry)
        return complete

    def counters(self) -> dict[tuple[str, str], int]:
        stats = self.controller.stats
        values = {
            "fetched": max(0, stats.fetches - stats.failures),
            "failed": stats.failures,
            "stale": stats.stale_served,
            "coalesced": stats.coalesced,
            "starting": stats.not_ready,
            **self.counts,
        }
        return {("metadata_fallback", name): value for name, value in values.items()}

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        tasks = [*self._workers, *([self._saver] if self._saver is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._workers, self._saver = [], None
        await self.save()

    # -- kept across restarts ----------------------------------------------------------------------

    def _restore(self) -> None:
        try:
            data = self.saved_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            event(log, logging.WARNING, "saved controller answers unreadable", path=str(self.saved_path),
                  error=exc.strerror or str(exc))
            return
        try:
            restored = self.controller.restore(data, time.time())
        except (ValueError, TypeError, KeyError) as exc:
            event(log, logging.WARNING, "saved controller answers ignored", path=str(self.saved_path),
                  error=str(exc)[:200])
            return
        self._saved_stored = self.controller.stored
        event(log, logging.INFO, "saved controller answers loaded", path=str(self.saved_path), answers=restored)

    async def _save_while_serving(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            await self.save()

    async def save(self) -> None:
        """Write the usable answers to the state directory if they changed (temporary file, rename)."""
        stored = self.controller.stored
        if stored == self._saved_stored:
            return
        data = self.controller.saved(time.time())
        try:
            await asyncio.to_thread(_write_atomically, self.saved_path, data)
        except OSError as exc:
            event(log, logging.WARNING, "controller answers not saved", path=str(self.saved_path),
                  error=exc.strerror or str(exc))
            return
        self._saved_stored = stored


def _primary_address(instance: Instance) -> str:
    return next((i for i in instance.interfaces if i.device_index == 0), instance.interfaces[0]).primary_ip


def fallback_for(config: Config, current: MetadataFallback | None) -> MetadataFallback | None:
    """The composition root's factory: a controller fallback when ``controller_url`` is set."""
    if not config.eucalyptus.controller_url:
        return None
    if isinstance(current, ControllerFallback):
        current.configure(config)
        return current
    return ControllerFallback(config)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:  # mkstemp: mode 0600 (user-data may hold secrets)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
