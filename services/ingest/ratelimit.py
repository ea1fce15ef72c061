"""Per-source token buckets (events per second, with a burst)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass
class Bucket:
    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, n: int, now: float) -> float:
        """Take ``n`` tokens; return 0 on success, else seconds until they would be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        if n > self.burst:
            # A batch larger than the burst could never fit, and a retry would be
            # refused for ever: let it through once the bucket is full, into debt.
            if self.tokens >= self.burst:
                self.tokens -= n
                return 0.0
            return (self.burst - self.tokens) / self.rate
        return (n - self.tokens) / self.rate


class RateLimiter:
    """One bucket per source. With N worker processes each gets 1/N of the
    rate, since the kernel spreads connections evenly over SO_REUSEPORT."""

    def __init__(self, share: float = 1.0, max_sources: int = 100_000) -> None:
        self.share = share
        self.max_sources = max_sources
        self._buckets: dict[str, Bucket] = {}

    def check(self, source_id: str, rate: float | None, burst: int | None, n: int) -> float:
        """0 when ``n`` events may pass, else the seconds to wait (Retry-After)."""
        if rate is None or rate <= 0:
            return 0.0
        rate *= self.share
        size = max(float(burst) * self.share if burst else rate, 1.0)
        now = time.monotonic()
        bucket = self._buckets.get(source_id)
        if bucket is None or bucket.rate != rate or bucket.burst != size:
            if len(self._buckets) >= self.max_sources:
                self._buckets.clear()  # bounded: sources beyond the cap start fresh
            bucket = Bucket(rate, size, size, now)
            self._buckets[source_id] = bucket
        return bucket.take(n, now)


def retry_after_seconds(wait: float, minimum: int) -> int:
    return max(minimum, math.ceil(wait))
