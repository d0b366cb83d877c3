"""Waiting for a committed change's NOTIFY to come back, shared by the caches that
LISTEN for their invalidations (auth.key_cache, core.route_cache).

Why: an API call that changes what a cache holds (revokes a key, removes a block rule)
should answer only once every process has dropped its copy, or the client's very next
request can be answered from a stale one in another process. PostgreSQL signals every
listening backend at the COMMIT, so once the notice is back on this process's link the
others have theirs too, give or take their scheduling (:data:`SIBLING_GRACE_S`).

Why a ticket: the notice can come back *before* the call that committed learns that
its COMMIT succeeded (the listening backend is signalled first, and the reactor may read
the LISTEN socket before the committing connection's answer). A wait that starts after
the transaction would then wait for a notice that has already gone by, until its
timeout: five seconds on one call in two under load (hostile review). So the caller
takes :meth:`NoticeWaiters.ticket` before the transaction and waits with it after: any
notice counted since then ends the wait at once. Notices carry no transaction's name:
one from an earlier COMMIT may be the one counted, and the grace covers ours, which is
right behind it on the same link.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

#: Seconds a settled change waits after its notice came back: the other listening
#: backends are scheduled after ours on a busy machine (each must run to write its
#: notice; a test caught the difference once under load).
SIBLING_GRACE_S = 0.02


class NoticeWaiters:
    """Counts a channel's notices and releases the calls waiting for one."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiting: list[defer.Deferred[None]] = []
        self.count = 0  # notices seen on this process's link
        self.timeouts = 0  # waits that ended by their timeout (for tests and diagnostics)

    def ticket(self) -> int:
        """Take before the transaction whose notice :meth:`wait` will wait for."""
        return self.count

    def noticed(self) -> None:
        """A notice came: count it and release every wait."""
        self.count += 1
        self.release()

    def release(self) -> None:
        """Release every wait (a notice came, or nobody listens any more: a cache that
        cannot listen is off, so there is nothing to wait for)."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.callback(None)

    def _timed_out(self, result: object, timeout: float) -> None:
        self.timeouts += 1

    def wait(self, since: int, *, listening: bool, poll: Callable[[], object],
             timeout_s: float = 5.0) -> defer.Deferred[None]:
        """Fire once a notice has been counted since ``since`` (at most ``timeout_s``),
        then :data:`SIBLING_GRACE_S` later; at once when not ``listening``. ``poll``
        reads the link without blocking first, so a notice already in the socket
        counts."""
        if not listening:
            return defer.succeed(None)
        poll()
        if self.count != since:  # counted since the ticket: nothing left to wait for
            d: defer.Deferred[None] = defer.succeed(None)
        else:
            d = defer.Deferred()
            self._waiting.append(d)
            d.addTimeout(timeout_s, self._clock, onTimeoutCancel=self._timed_out)
        d.addCallback(lambda _: task.deferLater(self._clock, SIBLING_GRACE_S, lambda: None))
        return d
