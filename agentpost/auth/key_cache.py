"""A per-process cache of API-key lookups that never outlives a change to the key.

Every authenticated request used to read its key (and its holder's roles) from
PostgreSQL: a round trip that was the largest single cost of a GET. This cache keeps
the row ``authenticate_api_key`` returned, keyed by the key's SHA-256 digest, under
rules that keep "revoked means refused on the very next request, in every process":

- Every change that can alter a key's power (revocation, expiry, role, scopes,
  environment restriction, the holder's organization or environment roles, removal
  of the holder, the organization's tier) NOTIFYs ``KEY_CHANNEL`` in the changing
  transaction (triggers of migration 0026), so the notice reaches every listening
  process at COMMIT. Any notice empties the whole cache: revocations are rare and a
  refill costs one lookup per key.
- The cache is used only while this process's LISTEN on that channel is confirmed
  (a :class:`~agentpost.storage.notify.Notifier` subscription on the process's one
  LISTEN connection, which reconnects with backoff).
  While another channel's LISTEN/UNLISTEN is in flight on that shared connection its
  socket cannot be read, so every lookup reads the database for that moment too.
  Before the LISTEN succeeded, and from the moment its connection fails until a new
  one has been confirmed, every request reads the database as before. A reconnect
  empties the cache (notices sent meanwhile were missed).
- Before each hit the LISTEN socket is read without blocking, so a notice already
  delivered to this process takes effect even if the reactor has not dispatched it
  yet (txpostgres hands notices to observers a scheduler tick later).
- A row read while a notice arrived (its snapshot may predate the change) is not
  stored: stores carry the generation seen before the read.
- ``expires_at`` is compared with the injected clock on every hit, and an entry is
  re-read after ``ttl_s`` seconds regardless, as a bound on any unforeseen path.

Only positive answers are cached; refused keys always go to the database (their
refusal is audited with the key's organization).
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from agentpost.storage.keys import KEY_CHANNEL
from agentpost.storage.notice_wait import NoticeWaiters
from agentpost.storage.notify import Notifier, NotifyLink

log = logging.getLogger(__name__)

#: Entries kept per process; beyond this the cache starts over (keys are few).
MAX_ENTRIES = 10_000


class _KeyListener(Notifier):
    """LISTEN on ``KEY_CHANNEL``: any notice empties the cache; so do the link's failure
    (the cache is off until it is back) and its return (notices were missed)."""

    def __init__(self, cache: KeyCache, dsn: str, *, reactor: Any, clock: IReactorTime,
                 max_backoff_s: float, link: NotifyLink | None) -> None:
        super().__init__(dsn, KEY_CHANNEL, reactor=reactor, clock=clock,
                         max_backoff_s=max_backoff_s, application_name="agentpost-key-cache",
                         link=link)
        self._cache = cache

    def _on_notify(self, notify: Any) -> None:
        self._cache._noticed(notify.payload)

    def _link_up(self) -> None:
        self._cache.invalidate()  # anything may have changed while nobody listened

    def _link_down(self) -> None:
        log.warning("key cache: LISTEN link down; reading keys from the database until "
                    "it is back")
        self._cache.invalidate()
        self._cache.waiters.release()


class KeyCache:
    """Digest -> key row, valid only while LISTEN on ``KEY_CHANNEL`` is confirmed."""

    def __init__(self, dsn: str, *, reactor: Any, clock: IReactorTime, now: Any,
                 ttl_s: float = 60.0, max_backoff_s: float = 10.0,
                 link: NotifyLink | None = None) -> None:
        """``link``: the process's shared LISTEN connection (None: one of its own)."""
        self._clock = clock
        self._now = now  # the database's clock (datetime), as expiry is stored
        self._ttl_s = ttl_s
        self._entries: dict[bytes, tuple[dict[str, Any], float]] = {}
        self._listener = _KeyListener(self, dsn, reactor=reactor, clock=clock,
                                      max_backoff_s=max_backoff_s, link=link)
        self.generation = 0
        self.waiters = NoticeWaiters(clock)  # API calls waiting for their notice
        self.hits = 0
        self.misses = 0

    # -- state ---------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Whether the LISTEN connection is confirmed (otherwise every lookup is a miss)."""
        return self._listener.connected and self._ttl_s > 0

    def invalidate(self) -> None:
        """Forget everything; rows being read now will not be stored."""
        self._entries.clear()
        self.generation += 1

    def _drain(self) -> bool:
        """Read the LISTEN socket without blocking; True when the cache is still usable."""
        return self._listener.poll()

    def _noticed(self, payload: str) -> None:
        self.invalidate()
        self.waiters.noticed()

    def ticket(self) -> int:
        """Take before committing a change to what keys may do; pass to :meth:`settle`."""
        return self.waiters.ticket()

    def settle(self, ticket: int, timeout_s: float = 5.0) -> defer.Deferred[None]:
        """After committing a change to a key (``ticket`` taken before it): empty this
        process's cache now, and fire once a key notice has come back on this process's
        LISTEN link since the ticket, then a grace later (storage.notice_wait). An API
        call that waits for this before answering leaves its client no window in which
        another process still answers from a stale entry. Revocations and membership
        changes are rare; a few milliseconds on their answer buy the guarantee."""
        self.invalidate()
        return self.waiters.wait(ticket, listening=self.usable, poll=self._drain,
                                 timeout_s=timeout_s)

    # -- lookups -------------------------------------------------------------------
    def get(self, digest: bytes) -> dict[str, Any] | None:
        """The cached row for this digest, or None (then the caller reads the database)."""
        if not self._entries or not self._drain():
            self.misses += 1
            return None
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return None
        row, stored_at = entry
        expires_at = row["expires_at"]
        if (self._clock.seconds() - stored_at >= self._ttl_s
                or (expires_at is not None and expires_at <= self._now())):
            del self._entries[digest]
            self.misses += 1
            return None
        self.hits += 1
        return row

    def put(self, digest: bytes, row: dict[str, Any], generation: int) -> None:
        """Keep a row read from the database, unless a notice arrived since ``generation``."""
        if self._ttl_s <= 0 or not self._drain() or generation != self.generation:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (row, self._clock.seconds())

    # -- the LISTEN link -----------------------------------------------------------
    async def start(self) -> None:
        """Begin listening (reconnecting in the background while the database is down)."""
        if self._ttl_s <= 0:
            return
        await self._listener.start()

    def stop(self) -> None:
        """Stop listening and forget everything."""
        self._listener.stop()
        self.invalidate()
        self.waiters.release()
