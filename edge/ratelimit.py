"""Token buckets per client, with bounded memory: one limiter for metadata (per instance) and DNS (per address).

A bucket that has refilled completely is indistinguishable from a new one, so
when the table is full the full buckets are dropped without losing anything;
only if every tracked client is still busy is the whole table reset, so a
flood of spoofed sources costs at most one table.
"""

from __future__ import annotations


class RateLimiter:
    __slots__ = ("rate", "burst", "max_entries", "_buckets", "refused")

    def __init__(self, rate: float, burst: float, max_entries: int) -> None:
        self.rate = rate
        """Tokens per second; 0 turns the limiter off."""
        self.burst = float(burst)
        self.max_entries = max_entries
        self._buckets: dict[str, list[float]] = {}
        self.refused = 0

    def allow(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket at monotonic time ``now``; False when it is empty."""
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_entries:
                self._prune(now)
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            self.refused += 1
            return False
        bucket[0] = tokens - 1.0
        return True

    def _prune(self, now: float) -> None:
        rate, burst = self.rate, self.burst
        self._buckets = {k: b for k, b in self._buckets.items() if b[0] + (now - b[1]) * rate < burst}
        if len(self._buckets) >= self.max_entries:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)
