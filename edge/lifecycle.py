"""The lifecycle of a gateway's parts: what the composition root starts, reloads, asks and stops.

A :class:`Service` owns listeners (the DNS service, the metadata service, the admin
listener).  The composition root (:mod:`edge.server`) calls each the same way and asks
nothing else of them: it never probes a service for what it may have.

The process-level half (signals, the SIGHUP reload path shared by a gateway, a worker
and a supervisor) is :class:`edge.process.GatewayProcess`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from edge.config import Config
from edge.metrics import Tally
from edge.view.snapshot import Preparer


class Service(ABC):
    """One part of a gateway with listeners of its own."""

    name: str
    """What readiness calls it when it is not listening (``dns``, ``metadata``, ``admin``)."""
    preparers: Sequence[Preparer] = ()
    """What each snapshot needs built for this service before it is swapped in (off the loop)."""
    tally: Tally
    """Its per-request counts, exported as metrics by the composition root; replaced by a
    :class:`edge.metrics.NullTally` before :meth:`start` when metrics are off."""

    @abstractmethod
    async def start(self, reuse_port: bool = False) -> None:
        """Bind and serve (``reuse_port``: share the ports with the other workers of a gateway)."""

    @abstractmethod
    async def stop(self, grace: float) -> None:
        """Stop accepting; let what is in flight finish for at most ``grace`` seconds; close the rest."""

    @abstractmethod
    def reload(self, config: Config) -> None:
        """Apply a new configuration (SIGHUP) without dropping open connections."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Started, listening and not stopping."""

    def export_metrics(self) -> None:
        """Copy plain counters into :attr:`tally` (called about once a second, and once at stop)."""

    def hold_unknown_sources(self) -> None:
        """This process keeps its view while a replacement builds the next one (a swap by
        restart): a service that answers by source address holds unknown ones for it."""
