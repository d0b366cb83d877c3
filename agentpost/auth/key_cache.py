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
- The cache is used only while this process's LISTEN on that channel is confirmed.
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
from txpostgres import txpostgres

from agentpost.storage.keys import KEY_CHANNEL

log = logging.getLogger(__name__)

#: Entries kept per process; beyond this the cache starts over (keys are few).
MAX_ENTRIES = 10_000


class KeyCache:
    """Digest -> key row, valid only while LISTEN on ``KEY_CHANNEL`` is confirmed."""

    def __init__(self, dsn: str, *, reactor: Any, clock: IReactorTime, now: Any,
                 ttl_s: float = 60.0, max_backoff_s: float = 10.0) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._clock = clock
        self._now = now  # the database's clock (datetime), as expiry is stored
        self._ttl_s = ttl_s
        self._max_backoff_s = max_backoff_s
        self._entries: dict[bytes, tuple[dict[str, Any], float]] = {}
        self._conn: txpostgres.Connection | None = None
        self._raw: Any = None  # the psycopg2 connection under _conn, once LISTENing
        self._running = False
        self._retry: Any = None
        self._backoff_s = 0.5
        self.generation = 0
        self._settling: dict[str, list[defer.Deferred[None]]] = {}
        self.hits = 0
        self.misses = 0

    # -- state ---------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Whether the LISTEN connection is confirmed (otherwise every lookup is a miss)."""
        return self._raw is not None and self._ttl_s > 0

    def invalidate(self) -> None:
        """Forget everything; rows being read now will not be stored."""
        self._entries.clear()
        self.generation += 1

    def _drain(self) -> bool:
        """Read the LISTEN socket without blocking; True when the cache is still usable."""
        raw = self._raw
        if raw is None:
            return False
        try:
            raw.poll()
        except Exception as exc:  # the link died (pg_terminate_backend, restart)
            log.warning("key cache: LISTEN link failed (%s); reading keys from the "
                        "database until it is back", str(exc).strip())
            self._down(self._conn)
            return False
        if raw.notifies:
            notices = raw.notifies[:]
            del raw.notifies[:]
            self._noticed(notices)
        return True

    def _noticed(self, notices: list[Any]) -> None:
        self.invalidate()
        for notice in notices:
            for d in self._settling.pop(notice.payload, ()):
                if not d.called:
                    d.callback(None)

    def settle(self, key_id: str, timeout_s: float = 1.0) -> defer.Deferred[None]:
        """After committing a change to ``key_id``: empty this process's cache now and
        fire once the change's NOTIFY came back on this process's LISTEN link (at most
        ``timeout_s``). PostgreSQL signals every listening process at the same COMMIT,
        so an API call that waits for this before answering leaves its client no
        window in which another process still answers from a stale entry."""
        self.invalidate()
        if not self.usable:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._settling.setdefault(key_id, []).append(d)
        self._drain()
        d.addTimeout(timeout_s, self._clock, onTimeoutCancel=lambda *_: None)
        return d

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
        if not self._drain() or generation != self.generation:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (row, self._clock.seconds())

    # -- the LISTEN link -----------------------------------------------------------
    async def start(self) -> None:
        """Begin listening (reconnecting in the background while the database is down)."""
        if self._ttl_s <= 0:
            return
        self._running = True
        await self._connect()

    async def _connect(self) -> None:
        self._retry = None
        if not self._running:
            return
        conn = txpostgres.Connection(reactor=self._reactor)
        try:
            d = conn.connect(self._dsn, application_name="agentpost-key-cache")
            d.addTimeout(10, self._clock)
            await d
            await conn.runOperation(f'LISTEN "{KEY_CHANNEL}"')
        except Exception as exc:
            log.warning("key cache: LISTEN failed (%s); retrying", str(exc).strip())
            try:
                conn.close()
            except Exception:  # noqa: S110 - never opened
                pass
            self._schedule_retry()
            return
        if not self._running:
            conn.close()
            return
        original = conn.connectionLost

        def lost(reason: Any) -> None:
            original(reason)
            self._down(conn)

        conn.connectionLost = lost
        conn.addNotifyObserver(lambda notice: self._noticed([notice]))
        self._conn = conn
        self._backoff_s = 0.5
        self.invalidate()  # anything may have changed while nobody listened
        self._raw = conn._connection  # read notices without waiting for a reactor tick

    def _down(self, conn: Any) -> None:
        """The LISTEN link failed: stop using the cache at once, reconnect later."""
        current = self._conn
        if current is None or current is not conn:
            return
        self._conn, self._raw = None, None
        self.invalidate()
        self._release_settling()
        try:
            current.close()
        except Exception:  # noqa: S110 - already broken
            pass
        self._schedule_retry()

    def _release_settling(self) -> None:
        """Nobody listens any more: nothing to wait for (the cache is off meanwhile)."""
        waiting, self._settling = self._settling, {}
        for ds in waiting.values():
            for d in ds:
                if not d.called:
                    d.callback(None)

    def _schedule_retry(self) -> None:
        if self._running and self._retry is None:
            delay, self._backoff_s = self._backoff_s, min(self._backoff_s * 2,
                                                          self._max_backoff_s)
            self._retry = self._clock.callLater(
                delay, lambda: defer.Deferred.fromCoroutine(self._connect()))

    def stop(self) -> None:
        """Stop listening and forget everything."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        conn, self._conn, self._raw = self._conn, None, None
        self.invalidate()
        self._release_settling()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: S110 - shutting down
                pass
