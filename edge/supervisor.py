"""One gateway, all cores: a supervisor that polls, and workers that serve.

The supervisor is the only process that talks to the control plane: it polls
the source, validates, and writes every accepted view to the state directory.
Workers share the instance-facing listeners with ``SO_REUSEPORT`` and follow
the state file, so control-plane load does not grow with the worker count.

Each worker has a socket pair to the supervisor carrying one-byte messages:

* worker -> supervisor ``S``: my listeners are bound and I am serving;
* worker -> supervisor ``R``: an unknown address asked; please poll the source now;
* supervisor -> worker ``P``: a poll finished; read the state file now;
* supervisor -> worker ``F``: a replacement is coming; stop following the state file.

The supervisor also creates the rate-limit tables (one for metadata, one for
DNS) in shared memory before the first worker starts and passes them to every
worker it starts, so the per-instance and per-address limits hold per gateway,
across worker restarts.

With ``view.shared_view`` (the default) the supervisor also writes every
accepted snapshot into the shared view (:mod:`edge.view.shared`) before it
says a poll finished, and workers answer from that one memory-mapped copy:
none of them decodes or indexes the view, so a worker starts serving at once
and gateway memory does not grow with the worker count.

Without it, each worker follows the state file and builds its own snapshot; a
view with at least ``view.swap_by_restart_instances`` instances that needs a
full build (not a delta of the served view) is swapped in by restarting the
workers one by one: each replacement builds the new
snapshot in its own process while the old worker keeps serving, binds, reports
serving, and only then is the old one retired.  No serving process ever stops
to build a large snapshot.

A worker that dies is restarted (with backoff if it keeps dying); the others
keep serving.  The supervisor holds the admin listener; ``/metrics`` there
aggregates every worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from edge.admin import AdminListener, AdminRoutes, Readiness, start_admin
from edge.config import Config
from edge.logs import event
from edge.metrics import Metrics
from edge.process import GatewayProcess
from edge.ratelimit import RateTables, create_shared_table, map_table
from edge.view.formats import ViewFormats, make_decoder
from edge.view.poller import Poller, PollOutcome
from edge.view.shared import SharedViewReader, SharedViewWriter, shared_view_directory
from edge.view.snapshot import Preparer, Snapshot
from edge.view.sources import SourceKinds, configured_source
from edge.view.statefile import StateFile
from edge.view.store import ViewStore

if TYPE_CHECKING:
    from edge.metadata.service import TokenKeyProvider

log = logging.getLogger("edge.supervisor")

REFRESH = b"R"
SERVING = b"S"
POLL_DONE = b"P"
FREEZE = b"F"
WORKER_FD_ENV = "EDGE_INTERNAL_CONTROL_FD"
RATE_TABLE_FD_ENV = {"metadata": "EDGE_INTERNAL_RATE_TABLE_FD", "dns": "EDGE_INTERNAL_DNS_RATE_TABLE_FD"}
"""Protocol -> the variable naming the descriptor of its shared rate-limit table."""
SHARED_VIEW_ENV = "EDGE_INTERNAL_SHARED_VIEW"
"""Where the supervisor publishes the shared view, if it does (a :class:`SharedViewGrant`)."""
RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0
"""A worker that lived this long resets the restart backoff."""
STOP_MARGIN = 3.0
"""Seconds beyond the workers' own delay and grace before a worker is killed."""


@dataclass(slots=True, eq=False)
class Worker:
    process: subprocess.Popen[bytes]
    control: socket.socket
    started_at: float
    reader: asyncio.Task[None] | None = field(default=None, repr=False)
    serving: bool = False

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, message: bytes) -> None:
        try:
            self.control.send(message)
        except OSError:
            pass

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.control.close()


@dataclass(slots=True)
class WorkerSlot:
    number: int
    current: Worker | None = None
    successor: Worker | None = None
    """A worker of the next generation, building its snapshot while ``current`` serves."""
    backoff: float = RESTART_BACKOFF_MIN
    restarts: int = 0


class Supervisor(GatewayProcess):
    log = log

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None, worker_argv: Sequence[str],
                 metrics: Metrics, sources: SourceKinds | None = None, formats: ViewFormats | None = None,
                 token_keys: TokenKeyProvider | None = None) -> None:
        self.config = config
        self.sources = sources
        self.formats = formats
        self.token_keys = token_keys
        """What the composition root's adapters add: source kinds, document formats, shared token keys."""
        self.reload_config = reload_config
        self.worker_argv = list(worker_argv)
        self.metrics = metrics
        self.store = ViewStore(source=config.view.source)
        self.readiness = Readiness(self.store, config.view.max_view_age, workers_serving=self.workers_serving)
        self.slots = [WorkerSlot(number) for number in range(config.workers)]
        self.poller: Poller | None = None
        self.stopping = False
        self.stop_requested = asyncio.Event()
        self.admin: AdminListener | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._retiring: list[Worker] = []
        self._served_before = False
        self._rolling: list[WorkerSlot] = []
        """Slots still to move to the new generation during a swap by restart."""
        self.rate_table_fds: dict[str, int] = {}
        """Protocol -> the rate-limit table every worker shares (created once; sized at start)."""
        self.shared_view: SharedViewWriter | None = None
        """Where accepted snapshots are published for the workers (``view.shared_view``)."""

    def workers_alive(self) -> int:
        return sum(1 for w in self._workers() if w.alive)

    def workers_serving(self) -> int:
        return sum(1 for slot in self.slots
                   if any(w is not None and w.serving and w.alive for w in (slot.current, slot.successor)))

    def _workers(self) -> list[Worker]:
        found = [w for slot in self.slots for w in (slot.current, slot.successor) if w is not None]
        return found + self._retiring

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.handle_signals()
        config = self.config
        os.makedirs(config.view.state_dir, mode=0o750, exist_ok=True)
        await asyncio.to_thread(prepare_shared_secrets, config, self.token_keys)
        source = configured_source(config, self.sources)
        preparers: list[Preparer] = []
        if config.view.shared_view:
            preparers, self.shared_view = await asyncio.to_thread(shared_view_publisher, config)
        self.poller = Poller(config.view, source, self.store, StateFile(config.view.state_dir, source.description),
                             preparers, decode=make_decoder(config, self.formats), on_outcome=self._poll_finished)
        self._served_before = await self.poller.load_last_good()
        if config.metadata.listen and "metadata" not in self.rate_table_fds:
            self.rate_table_fds["metadata"] = create_shared_table(config.metadata.rate_limit_entries)
        if config.dns.listen and "dns" not in self.rate_table_fds:
            self.rate_table_fds["dns"] = create_shared_table(config.dns.rate_limit_clients, "edge-dns-rate-limit")
        # The admin listener before any worker: a supervisor that cannot start leaves no workers behind.
        self.admin = await start_admin(config, AdminRoutes(self.store, self.readiness, self.metrics.render),
                                        self.metrics)
        for slot in self.slots:
            slot.current = self._spawn(slot)
        if self.store.current is None:
            await self.poller.poll_once()
        self.poller.start()
        event(log, logging.INFO, "edge started", pid=os.getpid(), workers=len(self.slots), source=source.description,
              metadata=",".join(str(x) for x in config.metadata.listen),
              dns=",".join(str(x) for x in config.dns.listen), admin=str(config.admin.listen or ""))
        monitor = loop.create_task(self._monitor())
        await self.stop_requested.wait()
        await self._shutdown(monitor)

    # -- workers ----------------------------------------------------------------------------------

    def _spawn(self, slot: WorkerSlot) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        env = {**os.environ, WORKER_FD_ENV: str(theirs.fileno())}
        passed = [theirs.fileno()]
        for protocol, fd in self.rate_table_fds.items():
            env[RATE_TABLE_FD_ENV[protocol]] = str(fd)
            passed.append(fd)
        writer = self.shared_view
        env[SHARED_VIEW_ENV] = SharedViewGrant(writer.directory if writer is not None else "",
                                               tuple(writer.extra_indexes) if writer is not None else ()).encode()
        process = subprocess.Popen([sys.executable, "-m", "edge", *self.worker_argv], env=env,
                                   pass_fds=passed)
        theirs.close()
        worker = Worker(process, ours, time.monotonic())
        worker.reader = asyncio.get_running_loop().create_task(self._read_worker(slot, worker))
        event(log, logging.INFO, "worker started", worker=slot.number, pid=process.pid)
        return worker

    async def _read_worker(self, slot: WorkerSlot, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(worker.control, 64)
            except OSError:
                return
            if not data:
                return
            if SERVING in data:
                worker.serving = True
                if worker is slot.successor:
                    self._promote(slot)
            if REFRESH in data:
                self._refresh_soon()

    def _refresh_soon(self) -> None:
        # Requests from every worker share one refresh; the poller rate-limits them further.
        if self.poller is None or (self._refresh_task is not None and not self._refresh_task.done()):
            return
        self._refresh_task = asyncio.get_running_loop().create_task(self.poller.refresh())

    def _poll_finished(self, outcome: PollOutcome) -> None:
        self.metrics.observe_poll(outcome, self.store)
        threshold = self.config.view.swap_by_restart_instances
        current = self.store.current
        # A delta build (few instances changed) is cheap enough to do in place; a full build
        # of a large view is left to replacement workers.
        full_build = self.poller is not None and not self.poller.last_build_was_delta
        if (outcome.result == "accepted" and threshold and len(self.slots) > 1 and current is not None
                and self.shared_view is None
                and len(current.instances) >= threshold and full_build and not self.stopping
                and self._served_before):
            self._start_rolling_swap()
        # Workers that have nothing to serve yet load the first view in place: nothing to stall.
        self._served_before = self._served_before or current is not None
        for worker in self._workers():
            worker.send(POLL_DONE)

    # -- swap by restart --------------------------------------------------------------------------

    def _start_rolling_swap(self) -> None:
        """Move every slot to a new worker that builds the new view before it serves.

        Serving workers are told to stop following the state file first, so none of
        them builds the large snapshot in place; each slot's replacement starts,
        builds, binds and reports serving, then the old worker is retired.
        """
        for slot in self.slots:
            if slot.current is not None:
                slot.current.send(FREEZE)
            if slot.successor is not None:
                # A replacement that started on the previous view: start over on this one.
                self._retire(slot.successor)
                slot.successor = None
        self._rolling = list(self.slots)
        event(log, logging.INFO, "swapping the view by restarting workers", workers=len(self.slots),
              instances=len(self.store.current.instances) if self.store.current else 0)
        self._roll_next()

    def _roll_next(self) -> None:
        while self._rolling and not self.stopping:
            slot = self._rolling.pop(0)
            if slot.current is None or not slot.current.alive:
                continue  # the monitor restarts it on the new view anyway
            slot.successor = self._spawn(slot)
            return

    def _promote(self, slot: WorkerSlot) -> None:
        old, slot.current, slot.successor = slot.current, slot.successor, None
        if old is not None:
            self._retire(old)
        event(log, logging.INFO, "worker replaced", worker=slot.number,
              pid=slot.current.process.pid if slot.current else None)
        self._roll_next()

    def _retire(self, worker: Worker) -> None:
        if worker.alive:
            worker.process.send_signal(signal.SIGTERM)
        self._retiring.append(worker)

    async def _monitor(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.2)
            for retired in [w for w in self._retiring if not w.alive]:
                retired.close()
                self._retiring.remove(retired)
            for slot in self.slots:
                if self.stopping:
                    break
                successor = slot.successor
                if successor is not None and not successor.alive:
                    event(log, logging.ERROR, "replacement worker exited before serving; retrying",
                          worker=slot.number, pid=successor.process.pid, code=successor.process.returncode)
                    successor.close()
                    slot.successor = None
                    asyncio.get_running_loop().call_later(slot.backoff, self._respawn_successor, slot)
                    slot.backoff = min(slot.backoff * 2, RESTART_BACKOFF_MAX)
                worker = slot.current
                if worker is None or worker.alive:
                    continue
                lived = time.monotonic() - worker.started_at
                event(log, logging.ERROR, "worker exited; restarting", worker=slot.number, pid=worker.process.pid,
                      code=worker.process.returncode, lived=round(lived, 1), restart_in=slot.backoff)
                worker.close()
                slot.current = None
                delay = slot.backoff
                slot.backoff = RESTART_BACKOFF_MIN if lived > STABLE_AFTER else min(slot.backoff * 2,
                                                                                     RESTART_BACKOFF_MAX)
                slot.restarts += 1
                self.metrics.worker_restarts.inc()
                asyncio.get_running_loop().call_later(delay, self._respawn, slot)

    def _respawn(self, slot: WorkerSlot) -> None:
        if self.stopping or slot.current is not None:
            return
        if slot.successor is not None:
            # A replacement is already on its way; it takes over once it serves.
            if slot.successor.serving:
                self._promote(slot)
            return
        slot.current = self._spawn(slot)

    def _respawn_successor(self, slot: WorkerSlot) -> None:
        if not self.stopping and slot.successor is None:
            slot.successor = self._spawn(slot)

    # -- signals ----------------------------------------------------------------------------------

    def apply(self, config: Config) -> dict[str, Any]:
        # Each worker re-reads the same files and applies them to its own services.
        for worker in self._workers():
            if worker.alive:
                worker.process.send_signal(signal.SIGHUP)
        return {"workers": len(self.slots)}

    async def _shutdown(self, monitor: asyncio.Task[None]) -> None:
        self.readiness.shutting_down = True
        admin = self.config.admin
        event(log, logging.INFO, "edge stopping", delay=admin.shutdown_delay, grace=admin.shutdown_grace)
        self.stopping = True
        monitor.cancel()
        if self.poller is not None:
            await self.poller.stop()
        workers = self._workers()
        for worker in workers:
            if worker.alive:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + admin.shutdown_delay + admin.shutdown_grace + STOP_MARGIN
        while time.monotonic() < deadline and any(w.alive for w in workers):
            await asyncio.sleep(0.05)
        for worker in workers:
            if worker.alive:
                event(log, logging.WARNING, "worker did not stop in time; killing it", pid=worker.process.pid)
                worker.process.kill()
                worker.process.wait()
            worker.close()
        if self.admin is not None:
            await self.admin.stop(admin.shutdown_grace)
        event(log, logging.INFO, "edge stopped")


ExtraIndex = tuple[Callable[[Snapshot], Any], Any]
"""How the supervisor finds a protocol's index in a prepared snapshot, and the type a worker reads it as."""


def shared_extra_indexes() -> dict[str, ExtraIndex]:
    """Protocol data that can be published with the shared view, because deriving it means walking every
    name.  Written once here for both sides: the supervisor publishes each, workers read each back."""
    from edge.dns.zonedata import WALKS_INDEX, WalkCount, dns_data

    return {WALKS_INDEX: (lambda snapshot: dns_data(snapshot).walks.counts, WalkCount)}


def published_extra_indexes(config: Config) -> list[str]:
    """The extra indexes a supervisor with ``config`` publishes: the DNS walks when it serves DNS."""
    from edge.dns.zonedata import WALKS_INDEX

    return [WALKS_INDEX] if config.dns.listen else []


def shared_view_publisher(config: Config) -> tuple[list[Preparer], SharedViewWriter]:
    """The supervisor's preparers with a shared view: the DNS data (so its name walks are updated
    from the changed names alone), then the writer, last."""
    known = shared_extra_indexes()
    writer = SharedViewWriter(shared_view_directory(config.view.state_dir),
                              {name: known[name][0] for name in published_extra_indexes(config)})
    preparers: list[Preparer] = []
    if config.dns.listen:
        from edge.dns.zonedata import make_preparer

        preparers.append(make_preparer())
    return [*preparers, writer], writer


@dataclass(frozen=True, slots=True)
class SharedViewGrant:
    """What a supervisor tells each worker it starts about the shared view: the worker follows the
    supervisor, not its own reading of the configuration, which may have changed on disk since."""

    directory: str
    """Empty: the supervisor publishes no shared view; follow the state file."""
    extra_indexes: tuple[str, ...] = ()

    def encode(self) -> str:
        return json.dumps({"directory": self.directory, "extra_indexes": list(self.extra_indexes)})

    @classmethod
    def from_env(cls) -> SharedViewGrant | None:
        text = os.environ.pop(SHARED_VIEW_ENV, None)
        if text is None:
            return None
        found = json.loads(text)
        return cls(found["directory"], tuple(found["extra_indexes"]))

    def reader(self, memo_entries: int) -> SharedViewReader:
        """A worker's reader of what :func:`shared_view_publisher` writes."""
        known = shared_extra_indexes()
        return SharedViewReader(self.directory, {name: known[name][1] for name in self.extra_indexes if name in known},
                                memo_entries)


def prepare_shared_secrets(config: Config, token_keys: TokenKeyProvider | None = None) -> None:
    """Create the state-directory token key and identity certificate before workers race to."""
    from edge.metadata.service import load_identity_signer, load_token_keys

    if config.metadata.listen:
        load_token_keys(config, token_keys)
        load_identity_signer(config)


class Follower(Protocol):
    """What a worker reads its supervisor's views with: the state file (a :class:`Poller` on it) or the
    shared view (:class:`edge.view.shared.SharedViewFollower`)."""

    async def poll_once(self) -> Any: ...

    async def stop(self) -> None: ...


class SupervisedRefresh:
    """A worker's "refresh now": ask the supervisor, then read what it published."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.poller: Follower | None = None
        self.on_lost: Callable[[], None] | None = None
        """Called when the supervisor is gone (without it: SIGTERM to this worker)."""
        self.on_freeze: Callable[[], None] | None = None
        """Called when this worker is told to keep its view (a replacement is building the next one)."""
        self.frozen = False
        self._waiters: list[asyncio.Future[None]] = []
        self._polled = asyncio.Event()
        """Set once the supervisor has finished a poll and this worker has read its result."""

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self.control, 64)
            except OSError:
                data = b""
            if not data:
                # The supervisor is gone: a worker without its supervisor must not linger.
                event(log, logging.ERROR, "supervisor connection lost; worker exiting")
                if self.on_lost is not None:
                    self.on_lost()
                else:
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            if FREEZE in data and self.poller is not None and not self.frozen:
                # A replacement worker will serve the next view; this one keeps what it has.
                self.frozen = True
                if self.on_freeze is not None:
                    self.on_freeze()
                await self.poller.stop()
            if POLL_DONE in data and self.poller is not None:
                waiters, self._waiters = self._waiters, []
                if not self.frozen:
                    await self.poller.poll_once()
                self._polled.set()
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    async def first_poll(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the supervisor's first poll result has been read.

        A worker started before the supervisor has any view would otherwise bind and answer
        every instance as unknown (after ``metadata.unknown_source_wait``) until the view
        lands; not yet bound, it leaves connections to workers that can answer them.
        """
        try:
            await asyncio.wait_for(self._polled.wait(), timeout)
        except asyncio.TimeoutError:
            event(log, logging.WARNING, "no view from the supervisor yet; serving without one", waited=timeout)

    def serving(self) -> None:
        try:
            self.control.send(SERVING)
        except OSError:
            pass

    async def refresh(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        first = not self._waiters
        self._waiters.append(waiter)
        if first:
            try:
                self.control.send(REFRESH)
            except OSError:
                waiter.set_result(None)
        await asyncio.shield(waiter)


def rate_tables_from_env() -> RateTables:
    """A worker's view of the rate-limit tables its supervisor shares with every worker."""
    return RateTables(metadata=_rate_table_from_env(RATE_TABLE_FD_ENV["metadata"]),
                      dns=_rate_table_from_env(RATE_TABLE_FD_ENV["dns"]))


def _rate_table_from_env(name: str) -> mmap.mmap | None:
    fd = os.environ.pop(name, None)
    if fd is None:
        return None
    try:
        return map_table(int(fd))
    finally:
        os.close(int(fd))


def control_socket_from_env() -> socket.socket | None:
    fd = os.environ.pop(WORKER_FD_ENV, None)
    if fd is None:
        return None
    control = socket.socket(fileno=int(fd))
    control.setblocking(False)
    return control
