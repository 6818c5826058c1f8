"""The one place the current snapshot lives, and the state others report on.

Handlers read ``store.current`` once per request.  The poller replaces it with
one assignment, so a request sees either the old snapshot or the new one,
never a mixture.  ``status`` feeds readiness, ``/view`` and metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.view.snapshot import Snapshot


@dataclass(slots=True)
class ViewStatus:
    """Mutable facts about the pipeline; only the poller writes them."""

    source: str = ""
    loaded_from: str = ""
    """``source`` or ``state`` (the last good view on disk)."""
    loaded_at: float | None = None
    confirmed_at: float | None = None
    """When the source last delivered or confirmed (unchanged) the view being served."""
    last_poll_at: float | None = None
    last_poll_result: str = ""
    """``accepted``, ``unchanged``, ``rejected``, ``stale``, ``error`` or empty before the first poll."""
    last_error: str = ""
    consecutive_failures: int = 0
    polls: int = 0
    state_write_error: str = ""
    source_events: dict[str, int] = field(default_factory=dict)
    """Running totals the source keeps (keys refused, watch events and restarts, full reads...)."""


SwapListener = Callable[[Snapshot], None]


class ViewStore:
    def __init__(self, source: str = "") -> None:
        self.current: Snapshot | None = None
        self.status = ViewStatus(source=source)
        self._listeners: list[SwapListener] = []
        self._changed: asyncio.Event | None = None

    @property
    def ready(self) -> bool:
        return self.current is not None

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the current snapshot was loaded."""
        if self.status.loaded_at is None:
            return None
        return (time.time() if now is None else now) - self.status.loaded_at

    def swap(self, snapshot: Snapshot, loaded_from: str) -> None:
        self.current = snapshot
        self.status.loaded_at = time.time()
        self.status.loaded_from = loaded_from
        for listener in self._listeners:
            listener(snapshot)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def on_swap(self, listener: SwapListener) -> None:
        self._listeners.append(listener)

    async def changed(self) -> None:
        """Wait for the next swap (callers bound it with a timeout)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()
