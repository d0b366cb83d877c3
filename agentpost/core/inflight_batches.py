"""Work that arrives while other work is in flight leaves together.

The MX's group commit (core.group_commit) and its RCPT lookups (core.route_batch)
share this rule: an item starts at once while fewer than ``parallel`` batches run, so
a lone session waits for nothing; items that arrive meanwhile wait for the next free
slot and then go together (up to ``max_batch``), so batches grow with the load by
themselves. ``delay_s`` > 0 makes a batch that could start wait that long for company,
on the injected clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")
log = logging.getLogger(__name__)


class InflightBatches(Generic[T]):
    """Hands items to ``run_batch`` in batches, at most ``parallel`` running at once.
    ``run_batch`` settles each item itself; should it raise, that is logged and the slot
    is freed all the same, so the queue never stalls."""

    def __init__(self, run_batch: Callable[[list[T]], Coroutine[Any, Any, Any]],
                 clock: IReactorTime, *, max_batch: int, parallel: int,
                 delay_s: float = 0.0) -> None:
        self._run_batch = run_batch
        self._clock = clock
        self.max_batch = max(1, max_batch)
        self.parallel = max(1, parallel)
        self.delay_s = max(0.0, delay_s)
        self.pending: list[T] = []
        self._timer: IDelayedCall | None = None
        self._running = 0

    def add(self, item: T) -> None:
        """Queue ``item``; it leaves now, after ``delay_s``, or when a batch ends."""
        self.pending.append(item)
        if self._running < self.parallel:
            if len(self.pending) >= self.max_batch or self.delay_s == 0:
                self.flush()
            elif self._timer is None:
                self._timer = self._clock.callLater(self.delay_s, self.flush)

    def flush(self) -> None:
        """Start a batch of what is waiting (no-op when empty)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        batch = self.pending[:self.max_batch]
        del self.pending[:self.max_batch]
        if batch:
            self._running += 1
            d: defer.Deferred[Any] = defer.ensureDeferred(self._run_batch(batch))
            d.addErrback(lambda f: log.error("a batch failed: %s", f.getTraceback()))
            d.addBoth(self._finished)

    def _finished(self, _: Any) -> None:
        self._running -= 1
        if self.pending:  # they waited for a whole batch already: no more delay
            self.flush()
