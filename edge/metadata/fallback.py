"""Another metadata service asked before the view: a cloud's own controller, behind a cache.

Some clouds know things no view carries (image, keys, user-data, the identity
document their instances verify).  A cloud adapter implements
:class:`MetadataFallback`; the composition root hands it to the metadata
service, and the handler knows nothing else about it.  After identification,
rate limit and token checks (which stay edge's), a metadata read the fallback
claims (:meth:`~MetadataFallback.path_of`) is answered from its
:meth:`~MetadataFallback.cached` answer without I/O; otherwise the request takes
the slow path (:class:`NeedFallback`) and waits for
:meth:`~MetadataFallback.fetch`.  Whenever the fallback has no answer (a 404, or
its service is down with nothing usable kept), the view answers, so instances
keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edge.config import Config
from edge.metadata.responses import Response
from edge.view.model import Instance
from edge.view.snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class NeedFallback:
    """The handler's slow-path request: ask the fallback for ``path`` on behalf of ``instance``."""

    instance: Instance
    address: str
    """The instance's primary private address (how some services identify it)."""
    path: str
    ttl_line: bytes | None


class MetadataFallback(Protocol):
    def path_of(self, target: bytes) -> str | None:
        """The path to ask for (e.g. ``latest/meta-data/ami-id``), or None when the view alone answers."""

    def cached(self, snapshot: Snapshot, instance: Instance, path: str, now: float) -> Response | None:
        """An answer known without I/O (fresh in the cache, or decided by the view); None: fetch it."""

    async def fetch(self, snapshot: Snapshot | None, instance: Instance, address: str, path: str) -> Response | None:
        """The answer after asking (or a stale one while the service is down); None: the view answers."""

    def view_changed(self, snapshot: Snapshot) -> None:
        """A new view is being served (instances appeared or left): warm or trim the cache."""

    def configure(self, config: Config) -> None:
        """SIGHUP: take the new configuration, keeping what is cached."""

    def counters(self) -> dict[tuple[str, str], int]:
        """Plain counters for the metrics (``(metric, label) -> total``), read once a second."""

    async def close(self) -> None:
        """Stop background work (prefetching)."""
