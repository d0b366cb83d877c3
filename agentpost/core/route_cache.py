"""A per-process cache of the MX's routes to existing inboxes, emptied by any change.

Why: every RCPT asked PostgreSQL where its address goes (storage.mx_routes), one round
trip per message; for one sending session, which waits for each reply, that was about
a tenth of its cycle (bench/README.md, fourteenth pass). Routes change rarely (an inbox
created, deleted or readdressed, a domain verified or moved, a receive filter rule).

The rules are those of auth.key_cache:

- Every change that can alter a routing row NOTIFYs ``ROUTE_CHANNEL`` in the changing
  transaction (triggers of migration 0041 on inboxes, domains, shared_domains and
  filter_rules, so a manual UPDATE or a cascade notifies as the API does); any notice
  empties the whole cache of every listening process at COMMIT.
- The cache is used only while this process's LISTEN on that channel is confirmed
  (a :class:`~agentpost.storage.notify.Notifier` on the process's shared LISTEN
  connection); while the link is down every RCPT reads the database, and its return
  empties the cache (notices may have been missed).
- Before each hit the LISTEN socket is read without blocking, so a notice already
  delivered to this process takes effect even if the reactor has not dispatched it.
- A row read while a notice arrived is not stored (stores carry the generation seen
  before the read); an entry is re-read after ``ttl_s`` regardless.
- A change made through this process's API waits, before it is answered, for its notice
  to come back on this process's link (:meth:`RouteCache.settle`, storage.notice_wait):
  a client that removes a block rule and at once sends must not be refused for good by
  a kept copy of it.

Only routes to an inbox are kept. An unknown or unhosted address always reads the
database, so an inbox is found by the first RCPT after its creation committed, in every
process, with no window in which a stale "unknown" could bounce mail for good. A kept
route can be stale only between a change's COMMIT and its notice reaching a process
(the listening backend's hop: milliseconds), the same kind of window as between any
RCPT and its DATA, and the delivery's transaction closes both: a copy for an inbox
deleted meanwhile is not written, nor one for an inbox whose domain another
organization now holds (storage.message_batch.NAME_KEPT_SQL), and the sender gets a
temporary error at DATA; nothing reaches the name's former holder. (Not caught: an
inbox readdressed by plain SQL and its old address created by another organization
within that window; the API readdresses no inbox.)
Not used with an inbox quota: the use it answers with changes with every delivery.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from agentpost.storage.mx_routes import ROUTE_CHANNEL
from agentpost.storage.notice_wait import NoticeWaiters
from agentpost.storage.notify import Notifier, NotifyLink

log = logging.getLogger(__name__)

#: Entries kept per process; beyond this the cache starts over.
MAX_ENTRIES = 20_000


class _RouteListener(Notifier):
    """LISTEN on ``ROUTE_CHANNEL``: any notice empties the cache; so do the link's
    failure (the cache is off until it is back) and its return."""

    def __init__(self, cache: RouteCache, dsn: str, *, reactor: Any, clock: IReactorTime,
                 link: NotifyLink | None) -> None:
        super().__init__(dsn, ROUTE_CHANNEL, reactor=reactor, clock=clock,
                         application_name="agentpost-route-cache", link=link)
        self._cache = cache

    def _on_notify(self, notify: Any) -> None:
        self._cache._noticed()

    def _link_up(self) -> None:
        self._cache.invalidate()

    def _link_down(self) -> None:
        log.warning("route cache: LISTEN link down; RCPT reads the database until it is "
                    "back")
        self._cache.invalidate()
        self._cache.waiters.release()


class RouteCache:
    """(address, domain) -> routing row of an inbox, while the LISTEN link holds."""

    def __init__(self, dsn: str, *, reactor: Any, clock: IReactorTime, ttl_s: float = 60.0,
                 link: NotifyLink | None = None) -> None:
        self._clock = clock
        self._ttl_s = ttl_s
        self._entries: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        # One row per inbox, shared by all its keys (case variants): a row carries the
        # inbox's receive rules, which no limit bounds, so a copy per key would let one
        # tenant's case variants hold MAX_ENTRIES copies of a row of any size.
        self._rows: dict[str, dict[str, Any]] = {}
        self._listener = _RouteListener(self, dsn, reactor=reactor, clock=clock, link=link)
        self.generation = 0
        self.waiters = NoticeWaiters(clock)  # API calls waiting for their notice
        self.hits = 0
        self.misses = 0

    @property
    def usable(self) -> bool:
        """Whether the LISTEN link is confirmed (otherwise every lookup is a miss)."""
        return self._ttl_s > 0 and self._listener.connected

    def invalidate(self) -> None:
        """Forget everything; rows being read now will not be stored."""
        self._entries.clear()
        self._rows.clear()
        self.generation += 1

    def _noticed(self) -> None:
        self.invalidate()
        self.waiters.noticed()

    def ticket(self) -> int:
        """Take before committing a change to what routing reads; pass to :meth:`settle`."""
        return self.waiters.ticket()

    def settle(self, ticket: int, timeout_s: float = 5.0) -> defer.Deferred[None]:
        """After committing such a change (``ticket`` taken before it): empty this
        process's cache now, and fire once a route notice has come back on this
        process's LISTEN link since the ticket, then a grace later, as
        :meth:`agentpost.auth.key_cache.KeyCache.settle` does for keys
        (storage.notice_wait). By then the other processes have dropped their copies
        too."""
        self.invalidate()
        return self.waiters.wait(ticket, listening=self.usable, poll=self._listener.poll,
                                 timeout_s=timeout_s)

    @staticmethod
    def key(address: str, domain: str) -> tuple[str, str]:
        """What an entry is found by: the strings as given. Routing compares them with
        PostgreSQL's lower(), whose idea of case (non-ASCII letters, the database's
        locale) Python's does not share, so case variants are entries of their own,
        each answered by the database first."""
        return address, domain

    def get(self, key: tuple[str, str]) -> dict[str, Any] | None:
        """A copy of the cached row, or None (then the caller reads the database)."""
        if not self._entries or not self._listener.poll():
            self.misses += 1
            return None
        entry = self._entries.get(key)
        if entry is None or self._clock.seconds() - entry[1] >= self._ttl_s:
            self._entries.pop(key, None)
            self.misses += 1
            return None
        self.hits += 1
        return dict(entry[0])

    def put(self, key: tuple[str, str], row: dict[str, Any], generation: int) -> None:
        """Keep a route to an inbox read from the database, unless a notice arrived
        since ``generation`` (the read may predate a change) or the link is down."""
        if (not row.get("hosted") or row.get("inbox_id") is None or self._ttl_s <= 0
                or not self._listener.poll() or generation != self.generation):
            return
        if len(self._entries) >= MAX_ENTRIES or len(self._rows) >= MAX_ENTRIES:
            self._entries.clear()
            self._rows.clear()
        kept = self._rows.get(row["inbox_id"])
        if kept is None or kept != row:  # equal unless read across a change
            kept = self._rows[row["inbox_id"]] = dict(row)
        self._entries[key] = (kept, self._clock.seconds())

    async def start(self) -> None:
        """Begin listening (reconnecting in the background while the database is down)."""
        if self._ttl_s > 0:
            await self._listener.start()

    def stop(self) -> None:
        """Stop listening and forget everything."""
        self._listener.stop()
        self.invalidate()
        self.waiters.release()
