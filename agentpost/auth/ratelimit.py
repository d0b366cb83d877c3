"""Per-credential token buckets.

Buckets live in each process: with N processes a key gets at most N times the
configured rate, which is the usual trade for not paying a database round trip per
request. The clock is injected so tests drive time with task.Clock.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from agentpost.model.errors import RateLimited


class TokenBuckets:
    """A bucket per key: ``rate`` tokens/s refill, ``burst`` capacity."""

    def __init__(self, clock: IReactorTime, rate: float, burst: int, max_keys: int = 100_000):
        self._clock = clock
        self._rate = rate
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> None:
        """Spend one token or raise RateLimited with the wait until the next one."""
        now = self._clock.seconds()
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise RateLimited(retry_after_s=(1.0 - tokens) / self._rate)
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._buckets.clear()  # bounded memory; a reset only ever forgives
        self._buckets[key] = (tokens - 1.0, now)
