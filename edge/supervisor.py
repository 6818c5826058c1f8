"""One gateway, all cores: a supervisor that polls, and workers that serve.

The supervisor is the only process that talks to the control plane: it polls
the source, validates, and writes every accepted view to the state directory.
Workers share the instance-facing listeners with ``SO_REUSEPORT`` and follow
the state file, so control-plane load does not grow with the worker count.

Each worker has a socket pair to the supervisor carrying one-byte messages:

* worker -> supervisor ``S``: my listeners are bound and I am serving;
* worker -> supervisor ``R``: an unknown address asked; please poll the source now;
* supervisor -> worker ``P``: a poll finished; read the state file now.

A worker that dies is restarted (with backoff if it keeps dying); the others
keep serving.  The supervisor holds the admin listener; ``/metrics`` there
aggregates every worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edge.admin import AdminRoutes, Readiness, start_admin
from edge.config import Config
from edge.errors import ConfigError, EdgeError
from edge.logs import event
from edge.metrics import Metrics
from edge.view.formats import make_decoder
from edge.view.poller import PollOutcome, Poller
from edge.view.sources import configured_source
from edge.view.statefile import StateFile
from edge.view.store import ViewStore

log = logging.getLogger("edge.supervisor")

REFRESH = b"R"
SERVING = b"S"
POLL_DONE = b"P"
WORKER_FD_ENV = "EDGE_INTERNAL_CONTROL_FD"
RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0
"""A worker that lived this long resets the restart backoff."""
STOP_MARGIN = 3.0
"""Seconds beyond the workers' own delay and grace before a worker is killed."""


@dataclass(slots=True)
class WorkerSlot:
    number: int
    process: subprocess.Popen[bytes] | None = None
    control: socket.socket | None = None
    started_at: float = 0.0
    backoff: float = RESTART_BACKOFF_MIN
    restarts: int = 0
    serving: bool = False
    reader: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None, worker_argv: Sequence[str],
                 metrics: Metrics) -> None:
        self.config = config
        self.reload_config = reload_config
        self.worker_argv = list(worker_argv)
        self.metrics = metrics
        self.store = ViewStore(source=config.view.source)
        self.readiness = Readiness(self.store, config.view.max_view_age, workers_serving=self.workers_serving)
        self.slots = [WorkerSlot(number) for number in range(config.workers)]
        self.poller: Poller | None = None
        self.stopping = False
        self._stop = asyncio.Event()
        self._admin: asyncio.AbstractServer | None = None
        self._refresh_task: asyncio.Task[None] | None = None

    def workers_alive(self) -> int:
        return sum(1 for slot in self.slots if slot.process is not None and slot.process.poll() is None)

    def workers_serving(self) -> int:
        return sum(1 for slot in self.slots if slot.serving and slot.process is not None
                   and slot.process.poll() is None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        config = self.config
        os.makedirs(config.view.state_dir, mode=0o750, exist_ok=True)
        await asyncio.to_thread(prepare_shared_secrets, config)
        source = configured_source(config)
        self.poller = Poller(config.view, source, self.store, StateFile(config.view.state_dir, source.description),
                             decode=make_decoder(config), on_outcome=self._poll_finished)
        await self.poller.load_last_good()
        for slot in self.slots:
            self._spawn(slot)
        self._admin = await start_admin(config, AdminRoutes(self.store, self.readiness, self.metrics.render))
        if self.store.current is None:
            await self.poller.poll_once()
        self.poller.start()
        event(log, logging.INFO, "edge started", pid=os.getpid(), workers=len(self.slots), source=source.description,
              metadata=",".join(str(x) for x in config.metadata.listen),
              dns=",".join(str(x) for x in config.dns.listen), admin=str(config.admin.listen or ""))
        monitor = loop.create_task(self._monitor())
        await self._stop.wait()
        await self._shutdown(monitor)

    # -- workers ----------------------------------------------------------------------------------

    def _spawn(self, slot: WorkerSlot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        env = {**os.environ, WORKER_FD_ENV: str(theirs.fileno())}
        slot.process = subprocess.Popen([sys.executable, "-m", "edge", *self.worker_argv], env=env,
                                        pass_fds=(theirs.fileno(),))
        theirs.close()
        slot.control = ours
        slot.started_at = time.monotonic()
        slot.reader = asyncio.get_running_loop().create_task(self._read_worker(slot, ours))
        event(log, logging.INFO, "worker started", worker=slot.number, pid=slot.process.pid)

    async def _read_worker(self, slot: WorkerSlot, control: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(control, 64)
            except OSError:
                return
            if not data:
                return
            if SERVING in data:
                slot.serving = True
            if REFRESH in data:
                self._refresh_soon()

    def _refresh_soon(self) -> None:
        # Requests from every worker share one refresh; the poller rate-limits them further.
        if self.poller is None or (self._refresh_task is not None and not self._refresh_task.done()):
            return
        self._refresh_task = asyncio.get_running_loop().create_task(self.poller.refresh())

    def _poll_finished(self, outcome: PollOutcome) -> None:
        self.metrics.observe_poll(outcome, self.store)
        for slot in self.slots:
            if slot.control is not None:
                try:
                    slot.control.send(POLL_DONE)
                except OSError:
                    pass

    async def _monitor(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.2)
            for slot in self.slots:
                process = slot.process
                if process is None or process.poll() is None or self.stopping:
                    continue
                lived = time.monotonic() - slot.started_at
                event(log, logging.ERROR, "worker exited; restarting", worker=slot.number, pid=process.pid,
                      code=process.returncode, lived=round(lived, 1), restart_in=slot.backoff)
                self._discard(slot)
                delay = slot.backoff
                slot.backoff = RESTART_BACKOFF_MIN if lived > STABLE_AFTER else min(slot.backoff * 2,
                                                                                     RESTART_BACKOFF_MAX)
                slot.restarts += 1
                self.metrics.worker_restarts.inc()
                asyncio.get_running_loop().call_later(delay, self._respawn, slot)

    def _respawn(self, slot: WorkerSlot) -> None:
        if not self.stopping and slot.process is None:
            self._spawn(slot)

    def _discard(self, slot: WorkerSlot) -> None:
        slot.process = None
        slot.serving = False
        if slot.reader is not None:
            slot.reader.cancel()
        if slot.control is not None:
            slot.control.close()
            slot.control = None

    # -- signals ----------------------------------------------------------------------------------

    def reload(self) -> None:
        if self.reload_config is not None:
            try:
                config = self.reload_config()
            except (ConfigError, EdgeError) as exc:
                event(log, logging.ERROR, "reload failed; keeping the running configuration", error=str(exc))
                return
            self.config = config
            self.readiness.max_view_age = config.view.max_view_age
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGHUP)
        event(log, logging.INFO, "configuration reloaded", workers=len(self.slots))

    async def _shutdown(self, monitor: asyncio.Task[None]) -> None:
        self.readiness.shutting_down = True
        admin = self.config.admin
        event(log, logging.INFO, "edge stopping", delay=admin.shutdown_delay, grace=admin.shutdown_grace)
        self.stopping = True
        monitor.cancel()
        if self.poller is not None:
            await self.poller.stop()
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + admin.shutdown_delay + admin.shutdown_grace + STOP_MARGIN
        while time.monotonic() < deadline and self.workers_alive():
            await asyncio.sleep(0.05)
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                event(log, logging.WARNING, "worker did not stop in time; killing it", worker=slot.number)
                slot.process.kill()
                slot.process.wait()
            self._discard(slot)
        if self._admin is not None:
            self._admin.close()
        event(log, logging.INFO, "edge stopped")


def prepare_shared_secrets(config: Config) -> None:
    """Create the state-directory token key and identity certificate before workers race to."""
    from edge.metadata.service import load_identity_signer, load_token_keys

    if config.metadata.listen:
        load_token_keys(config)
        load_identity_signer(config)


class SupervisedRefresh:
    """A worker's "refresh now": ask the supervisor, then read the state file it wrote."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.poller: Poller | None = None
        self._waiters: list[asyncio.Future[None]] = []

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
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if POLL_DONE in data and self.poller is not None:
                waiters, self._waiters = self._waiters, []
                await self.poller.poll_once()
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

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


def control_socket_from_env() -> socket.socket | None:
    fd = os.environ.pop(WORKER_FD_ENV, None)
    if fd is None:
        return None
    control = socket.socket(fileno=int(fd))
    control.setblocking(False)
    return control
