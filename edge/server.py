"""The composition root: config -> store, poller, listeners, signals, graceful shutdown.

Start order follows the availability rule: serve the last good view from disk
first (so a gateway restarted while the control plane is down answers at once),
bind, then poll the source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge.admin import AdminListener, AdminRoutes, Readiness, start_admin
from edge.config import Config
from edge.errors import EdgeError
from edge.fd_limit import raise_fd_limit
from edge.lifecycle import Service
from edge.logs import event
from edge.metrics import Metrics, NullTally, Syncer, prepare_multiprocess_dir
from edge.process import GatewayProcess
from edge.ratelimit import RateTables
from edge.supervisor import (
    SupervisedRefresh,
    Supervisor,
    SharedViewGrant,
    control_socket_from_env,
    rate_tables_from_env,
)
from edge.view.formats import ViewFormats, make_decoder
from edge.view.poller import Poller
from edge.view.shared import SHARED_DIR, SharedViewFollower
from edge.view.sources import SourceKinds, builtin_source_kinds, configured_source
from edge.view.statefile import LAST_GOOD_NAME, StateFile, StateFollower
from edge.view.store import ViewStore

if TYPE_CHECKING:
    from edge.metadata.service import FallbackFactory, TokenKeyProvider

log = logging.getLogger("edge.server")

FIRST_VIEW_WAIT = 60.0
"""How long a worker started with no view on disk waits for the supervisor's first poll
before binding anyway (a first build of a very large view takes tens of seconds)."""


@dataclass(frozen=True, slots=True)
class Adapters:
    """What cloud adapters add to the core, registered in one place (:func:`adapters`)."""

    sources: SourceKinds
    formats: ViewFormats
    metadata_fallback: FallbackFactory | None = None
    token_keys: TokenKeyProvider | None = None
    """Where ``fleet.token_key_source`` keys are read from (the metadata service names no store)."""


def adapters() -> Adapters:
    """Every adapter edge ships, plugged into the core here and nowhere else.

    Eucalyptus: the GNI document format (sniffed by its XML root), eucanetd's intip map
    bundled into the view source, and the controller's metadata service as the metadata
    fallback.  etcd: the ``etcd://`` and ``etcds://`` view sources and the fleet's token
    keys.  Nothing under ``edge/view``, ``edge/metadata`` or ``edge/dns`` names them; a
    second cloud adapter registers the same way.
    """
    from edge import etcd
    from edge.eucalyptus.fallback import fallback_for
    from edge.eucalyptus.gni import gni_decoder, is_gni
    from edge.eucalyptus.source import with_intip_map

    sources = builtin_source_kinds()
    etcd.register(sources)
    sources.add_wrapper(with_intip_map)
    formats = ViewFormats()
    formats.add("eucalyptus-gni", is_gni, gni_decoder)
    return Adapters(sources, formats, fallback_for, etcd.token_key_provider())


def install_uvloop() -> None:
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Gateway(GatewayProcess):
    """One serving process: the whole gateway, or one worker of a supervised gateway.

    A worker (``control`` given) follows the state file its supervisor writes
    instead of polling the source, asks the supervisor for refreshes, shares
    its listeners with ``SO_REUSEPORT`` and leaves the admin listener to the
    supervisor.
    """

    log = log

    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None,
                 metrics: Metrics | None = None, control: socket.socket | None = None,
                 rate_tables: RateTables | None = None, plugged: Adapters | None = None,
                 shared_view: SharedViewGrant | None = None) -> None:
        self.config = config
        self.shared_view = shared_view
        """A worker's: where its supervisor publishes the view (none, or an empty directory: the state file)."""
        self.adapters = plugged or adapters()
        self.reload_config = reload_config
        self.metrics = metrics or Metrics()
        self.control = control
        self.rate_tables = rate_tables or RateTables()
        """A worker's rate-limit tables, shared with the other workers by the supervisor."""
        self.store = ViewStore(source=config.view.source)
        self.readiness = Readiness(self.store, config.view.max_view_age)
        self.readiness.starting = True
        self.services: list[Service] = []
        self.poller: Poller | SharedViewFollower | None = None
        self.admin: AdminListener | None = None
        self.stop_requested = asyncio.Event()
        self._supervisor_lost = False
        self._supervised: SupervisedRefresh | None = None
        self._syncer: Syncer | None = None
        self._background: list[asyncio.Task[None]] = []

    def _build_services(self) -> list[Service]:
        from edge.dns.service import DnsService
        from edge.metadata.service import MetadataService

        services: list[Service] = []
        if self.config.metadata.listen:
            services.append(MetadataService(self.config, self.store, self.refresh,
                                            fallback_for=self.adapters.metadata_fallback,
                                            rate_table=self.rate_tables.metadata, token_keys=self.adapters.token_keys))
        if self.config.dns.listen:
            services.append(DnsService(self.config, self.store, self.rate_tables.dns))
        return services

    async def refresh(self) -> None:
        if self._supervised is not None:
            await self._supervised.refresh()
        elif self.poller is not None:
            await self.poller.refresh()

    async def start(self) -> None:
        config = self.config
        os.makedirs(config.view.state_dir, mode=0o750, exist_ok=True)
        source = configured_source(config, self.adapters.sources)
        state = StateFile(config.view.state_dir, source.description)
        self.services = self._build_services()
        self.readiness.services = self.services
        for service in self.services:
            if config.admin.metrics:
                self.metrics.adopt(service.tally)
            else:
                service.tally = NullTally(service.tally.protocol)
        preparers = [p for service in self.services for p in service.preparers]
        if self.control is None:
            poller = Poller(config.view, source, self.store, state, preparers, decode=make_decoder(config, self.adapters.formats),
                            on_outcome=lambda outcome: self.metrics.observe_poll(outcome, self.store))
            self.poller = poller
            await poller.load_last_good()
        else:
            # A worker reads what its supervisor accepted: the shared view it published, or the state file
            # it wrote (never writing either).
            follower: Poller | SharedViewFollower
            if self.shared_view is not None and self.shared_view.directory:
                follower = SharedViewFollower(self.shared_view.reader(config.view.shared_view_memo), self.store,
                                              preparers, config.view.poll_interval)
            else:
                follower = Poller(config.view, StateFollower(state, config.view.max_size), self.store, None,
                                  preparers, decode=make_decoder(config, self.adapters.formats))
            self.poller = follower
            self._supervised = SupervisedRefresh(self.control)
            self._supervised.poller = follower
            self._supervised.on_lost = self._orphaned
            self._supervised.on_freeze = self._hold_unknown_sources
            self._background.append(asyncio.get_running_loop().create_task(self._supervised.listen()))
            await follower.poll_once()
            if self.store.current is None:
                await self._supervised.first_poll(FIRST_VIEW_WAIT)
        for service in self.services:
            await service.start(reuse_port=self.control is not None)
        if self.control is None:
            self.admin = await start_admin(config, AdminRoutes(self.store, self.readiness, self.metrics.render),
                                            self.metrics)
            # With nothing on disk, poll before going on, so a fresh gateway is ready as
            # soon as its source answers.
            if self.store.current is None:
                await poller.poll_once()
        self.poller.start()
        if self._supervised is not None:
            self._supervised.serving()
        self._syncer = Syncer(self.metrics, before=[self._export_service_counters])
        self._syncer.start()
        self.readiness.starting = False
        event(log, logging.INFO, "edge started" if self.control is None else "worker started", pid=os.getpid(),
              source=source.description, metadata=",".join(str(x) for x in config.metadata.listen),
              dns=",".join(str(x) for x in config.dns.listen),
              admin=str(config.admin.listen or "") if self.control is None else "supervisor",
              ready=self.store.ready)

    def _export_service_counters(self) -> None:
        for service in self.services:
            service.export_metrics()

    async def stop(self) -> None:
        self.readiness.shutting_down = True
        admin = self.config.admin
        event(log, logging.INFO, "edge stopping", delay=admin.shutdown_delay, grace=admin.shutdown_grace)
        # Orphaned, nobody answers this gateway's readiness any more and its routes are on their way
        # out (edge.service withdraws them once every process has exited): no drain, stop now.
        await asyncio.sleep(0 if self._supervisor_lost else admin.shutdown_delay)
        if self.poller is not None:
            await self.poller.stop()
        await asyncio.gather(*(service.stop(admin.shutdown_grace) for service in self.services))
        if self.admin is not None:
            await self.admin.stop(admin.shutdown_grace)
        if self._syncer is not None:
            self._syncer.stop()
            self._export_service_counters()
            self.metrics.sync()
        for task in self._background:
            task.cancel()
        event(log, logging.INFO, "edge stopped")

    def apply(self, config: Config) -> dict[str, Any]:
        for service in self.services:
            service.reload(config)
        return {}

    async def run_until_signalled(self) -> None:
        self.handle_signals()
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # Stopped while starting (a worker still waiting for its first view, or orphaned): leave
            # without binding, rather than serve late next to whatever runs by then.
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            for task in self._background:
                task.cancel()
            if self.poller is not None:
                await self.poller.stop()
            event(log, logging.INFO, "edge stopped before serving")
            return
        starting.result()
        await stopping
        await self.stop()

    def _orphaned(self) -> None:
        """The supervisor died (crash, kill -9): stop at once, without the drain delay."""
        self._supervisor_lost = True
        self.stop_requested.set()

    def _hold_unknown_sources(self) -> None:
        """Kept on its view during a swap by restart: unknown addresses wait for the new workers."""
        for service in self.services:
            service.hold_unknown_sources()


def state_dir_contents(config: Config) -> list[str]:
    """What this configuration makes edge write to ``view.state_dir`` (said in the first log line)."""
    contents = [f"the last good view ({LAST_GOOD_NAME}.*)"]
    if config.metadata.listen and not (config.metadata.token_key_file or config.fleet.token_key_source):
        contents.append("generated IMDSv2 token keys (token-keys)")
    if config.metadata.listen and not config.metadata.identity_key_file:
        contents.append("a generated instance identity key and certificate (identity-key.pem, identity-cert.pem)")
    if config.workers > 1:
        contents.append("the workers' metrics (metrics/)")
        if config.view.shared_view:
            contents.append(f"the view the workers share ({SHARED_DIR}/)")
    return contents


def serve(config: Config, reload_config: Callable[[], Config] | None = None,
          argv: Sequence[str] = ()) -> int:
    """Run a gateway: one process, or a supervisor with ``config.workers`` workers."""
    control = control_socket_from_env()
    rate_tables = rate_tables_from_env()
    shared_view = SharedViewGrant.from_env()
    if control is None:
        # Said first, so nobody finds keys and views in a home directory without having been told.
        event(log, logging.INFO, "edge starting", state_dir=config.view.state_dir,
              writes="; ".join(state_dir_contents(config)))
    if control is None and config.workers > 1:
        # Before anything imports prometheus-client: workers write their metrics there.
        os.makedirs(config.view.state_dir, mode=0o750, exist_ok=True)
        prepare_multiprocess_dir(config.view.state_dir)
    # Workers inherit the raised limit; the first process of the gateway says when it is too low.
    raise_fd_limit(config, warn=control is None)
    install_uvloop()
    try:
        if control is None and config.workers > 1:
            plugged = adapters()
            supervisor = Supervisor(config, reload_config, list(argv), Metrics(), plugged.sources, plugged.formats,
                                    plugged.token_keys)
            asyncio.run(supervisor.run())
        else:
            gateway = Gateway(config, reload_config, Metrics(), control, rate_tables, shared_view=shared_view)
            asyncio.run(gateway.run_until_signalled())
    except EdgeError as exc:
        event(log, logging.ERROR, "edge cannot start", error=str(exc))
        return 1
    except OSError as exc:
        event(log, logging.ERROR, "edge cannot start", error=f"{exc.strerror or exc}")
        return 1
    return 0
