"""Per-source-address token buckets (the AWS resolver allows 1024 packets/s per interface).

Memory is bounded: when more addresses than ``max_clients`` are tracked, the
table is swept of buckets that have refilled (idle clients), and cleared if
that frees nothing, so a spoofed-source flood costs at most one table.
"""

from __future__ import annotations


class RateLimiter:
    def __init__(self, rate: float, max_clients: int = 65536, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.max_clients = max_clients
        self.buckets: dict[str, list[float]] = {}
        self.limited = 0

    def allow(self, address: str, now: float) -> bool:
        """Take one token for ``address``; False when its bucket is empty."""
        if not self.rate:
            return True
        bucket = self.buckets.get(address)
        if bucket is None:
            if len(self.buckets) >= self.max_clients:
                self._sweep(now)
            self.buckets[address] = [self.burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            self.limited += 1
            return False
        bucket[0] = tokens - 1.0
        return True

    def _sweep(self, now: float) -> None:
        full = [a for a, (tokens, at) in self.buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for address in full:
            del self.buckets[address]
        if len(self.buckets) >= self.max_clients:
            self.buckets.clear()
