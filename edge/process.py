"""A gateway process as signals see it: a whole gateway, one of its workers, or their supervisor.

SIGTERM and SIGINT ask it to stop (each kind drains in its own way); SIGHUP re-reads the
configuration file and applies it.  The reading, the refusal of a bad file and what every
kind applies alike (readiness limits, the admin listener) are written once here; each kind
says what else a new configuration changes (:meth:`GatewayProcess.apply`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from edge.admin import AdminListener, Readiness
from edge.config import Config
from edge.errors import ConfigError, EdgeError
from edge.logs import event


class GatewayProcess(ABC):
    log: logging.Logger
    config: Config
    reload_config: Callable[[], Config] | None
    """Reads the configuration again (the command line's files and environment); None: nothing to re-read."""
    readiness: Readiness
    admin: AdminListener | None
    stop_requested: asyncio.Event

    def handle_signals(self) -> None:
        """Stop on SIGTERM or SIGINT, reload on SIGHUP (on the running loop)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def reload(self) -> None:
        """Re-read the configuration; a file that does not load leaves everything as it was."""
        if self.reload_config is None:
            return
        try:
            config = self.reload_config()
        except (ConfigError, EdgeError) as exc:
            event(self.log, logging.ERROR, "reload failed; keeping the running configuration", error=str(exc))
            return
        self.config = config
        self.readiness.max_view_age = config.view.max_view_age
        if self.admin is not None:
            self.admin.reload(config)
        details = self.apply(config)
        event(self.log, logging.INFO, "configuration reloaded", **details)

    @abstractmethod
    def apply(self, config: Config) -> dict[str, Any]:
        """What this kind of process changes for a new configuration; returns fields for the log line."""
