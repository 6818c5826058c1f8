"""The composition root: config -> store, poller, listeners, signals, graceful shutdown.

Start order follows the availability rule: serve the last good view from disk
first (so a gateway restarted while the control plane is down answers at once),
bind, then poll the source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from typing import Protocol

from edge.admin import AdminRoutes, Readiness, start_admin
from edge.config import Config
from edge.errors import ConfigError, EdgeError
from edge.logs import event
from edge.view.poller import Poller
from edge.view.snapshot import Preparer
from edge.view.sources import open_source
from edge.view.statefile import StateFile
from edge.view.store import ViewStore

log = logging.getLogger("edge.server")

SHUTDOWN_LAME_DUCK = 0.5
"""Seconds between readiness going 503 and listeners closing, so routes can be withdrawn."""
SHUTDOWN_GRACE = 5.0
"""Seconds in-flight requests get to finish after the listeners close."""


class Service(Protocol):
    preparers: list[Preparer]

    async def start(self, reuse_port: bool = False) -> None: ...

    async def stop(self, grace: float) -> None: ...

    def reload(self, config: Config) -> None: ...


def install_uvloop() -> None:
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Gateway:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload_config = reload_config
        self.store = ViewStore(source=config.view.source)
        self.readiness = Readiness(self.store, config.view.max_view_age)
        self.services: list[Service] = []
        self.poller: Poller | None = None
        self._admin: asyncio.AbstractServer | None = None
        self._stopping = asyncio.Event()

    def _build_services(self) -> list[Service]:
        from edge.dns.service import DnsService
        from edge.metadata.service import MetadataService

        services: list[Service] = []
        if self.config.metadata.listen:
            services.append(MetadataService(self.config, self.store, self.refresh))
        if self.config.dns.listen:
            services.append(DnsService(self.config, self.store))
        return services

    async def refresh(self) -> None:
        if self.poller is not None:
            await self.poller.refresh()

    async def start(self) -> None:
        config = self.config
        os.makedirs(config.view.state_dir, mode=0o750, exist_ok=True)
        source = open_source(config.view.source, config.view)
        self.services = self._build_services()
        preparers = [p for service in self.services for p in service.preparers]
        self.poller = Poller(config.view, source, self.store, StateFile(config.view.state_dir, source.description),
                             preparers)
        await self.poller.load_last_good()
        for service in self.services:
            await service.start(reuse_port=config.workers > 1)
        self._admin = await start_admin(config, AdminRoutes(self.store, self.readiness))
        # The first poll runs before start() returns when there is nothing on disk, so
        # a fresh gateway binds and is ready as soon as its source answers.
        if self.store.current is None:
            await self.poller.poll_once()
        self.poller.start()
        event(log, logging.INFO, "edge started", pid=os.getpid(), source=source.description,
              metadata=",".join(str(x) for x in config.metadata.listen),
              dns=",".join(str(x) for x in config.dns.listen),
              admin=str(config.admin.listen or ""), ready=self.store.ready)

    async def stop(self) -> None:
        self.readiness.shutting_down = True
        event(log, logging.INFO, "edge stopping", lame_duck=SHUTDOWN_LAME_DUCK, grace=SHUTDOWN_GRACE)
        await asyncio.sleep(SHUTDOWN_LAME_DUCK)
        if self.poller is not None:
            await self.poller.stop()
        await asyncio.gather(*(service.stop(SHUTDOWN_GRACE) for service in self.services))
        if self._admin is not None:
            self._admin.close()
        event(log, logging.INFO, "edge stopped")

    def reload(self) -> None:
        if self.reload_config is None:
            return
        try:
            config = self.reload_config()
        except (ConfigError, EdgeError) as exc:
            event(log, logging.ERROR, "reload failed; keeping the running configuration", error=str(exc))
            return
        self.config = config
        self.readiness.max_view_age = config.view.max_view_age
        for service in self.services:
            service.reload(config)
        event(log, logging.INFO, "configuration reloaded")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await self._stopping.wait()
        await self.stop()


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    install_uvloop()
    if config.workers > 1:
        event(log, logging.WARNING, "several workers are not available yet; running one", workers=config.workers)
    gateway = Gateway(config, reload_config)
    try:
        asyncio.run(gateway.run_until_signalled())
    except EdgeError as exc:
        event(log, logging.ERROR, "edge cannot start", error=str(exc))
        return 1
    except OSError as exc:
        event(log, logging.ERROR, "edge cannot start", error=f"{exc.strerror or exc}")
        return 1
    return 0
