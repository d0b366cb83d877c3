"""One way to run background work on a timer: the retention sweep, the re-render job
and the outbound queue worker all need the same four promises, so they share this.

- **Never two runs at once** in one process (a slow run is not overlapped by the next
  tick); a wake-up during a run asks for exactly one more run after it.
- **The clock is injected** (``IReactorTime``), so tests drive it with ``task.Clock``.
- **A failed run is logged, not raised**: the timer keeps going and the next run
  tries again.
- **Stopping waits** for the run in progress, so a shutdown lets it commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

log = logging.getLogger(__name__)


class Periodic:
    """Runs ``work`` now (if asked), every ``interval_s``, and whenever woken."""

    def __init__(self, name: str, clock: IReactorTime, interval_s: float,
                 work: Callable[[], Coroutine[Any, Any, Any]],
                 report: Callable[[Any], None] | None = None) -> None:
        self.name = name
        self._clock = clock
        self._interval_s = interval_s
        self._work = work
        self._report = report
        self._loop: task.LoopingCall | None = None
        self.running: defer.Deferred[Any] | None = None
        self._again = False
        self._stopped = False

    def wake(self) -> None:
        """Run now, or once more right after the run in progress."""
        if self._stopped:
            return
        if self.running is not None:
            self._again = True
            return
        self._again = False
        d: defer.Deferred[Any] = defer.Deferred.fromCoroutine(self._work())
        d.addBoth(self._done)
        self.running = d if not d.called else None

    def _done(self, result: Any) -> None:
        self.running = None
        if isinstance(result, Failure):
            log.warning("%s failed: %s", self.name, result.getErrorMessage())
        elif self._report is not None:
            self._report(result)
        if self._again:
            self.wake()

    def start(self, *, now: bool = True) -> None:
        """Run every ``interval_s`` (and at once unless ``now`` is False)."""
        self._stopped = False
        self._loop = task.LoopingCall(self.wake)
        self._loop.clock = self._clock
        self._loop.start(self._interval_s, now=now)

    async def stop(self) -> None:
        """Stop the timer and wait for the run in progress."""
        self._stopped = True
        self._again = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.running is not None:
            await self.running
