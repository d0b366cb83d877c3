"""Cross-process wake-ups over PostgreSQL LISTEN/NOTIFY.

One dedicated connection per process listens; watchers register per key (a folder
id). A notification means "look again", never "here is the change": watchers re-read
state from the database, so a lost or duplicated wake-up cannot corrupt anything.
After the listening link breaks it reconnects with backoff on the injected clock and
wakes every watcher once, since notifications sent meanwhile were missed.

Subclasses (the WebSocket hub, the webhook worker, the API-key cache) override
``_on_notify`` to take every payload, and ``_link_up`` / ``_link_down`` to act the
moment the LISTEN is confirmed or lost. :meth:`Notifier.poll` reads notifications
already sent to this process without waiting for the reactor to dispatch them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from txpostgres import txpostgres

log = logging.getLogger(__name__)


class Notifier:
    """LISTEN on one channel; dispatch payloads to watchers keyed by payload."""

    def __init__(self, dsn: str, channel: str, *, reactor: Any, clock: IReactorTime,
                 max_backoff_s: float = 10.0,
                 application_name: str = "agentpost-listen") -> None:
        self._dsn = dsn
        self._channel = channel
        self._application_name = application_name
        self._reactor = reactor
        self._clock = clock
        self._max_backoff_s = max_backoff_s
        self._watchers: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self._conn: txpostgres.Connection | None = None
        self._running = False
        self._retry: Any = None
        self._backoff_s = 0.5
        self.connected = False

    def watch(self, key: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when ``key`` is notified; returns the unsubscribe function."""
        self._watchers[key].add(callback)

        def cancel() -> None:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(callback)
                if not watchers:
                    del self._watchers[key]

        return cancel

    def _dispatch(self, key: str | None) -> None:
        targets = ([cb for cbs in self._watchers.values() for cb in cbs] if key is None
                   else list(self._watchers.get(key, ())))
        for callback in targets:
            try:
                callback()
            except Exception:
                log.exception("notification watcher failed")

    def _on_notify(self, notify: Any) -> None:
        self._dispatch(notify.payload)

    def _link_up(self) -> None:
        """The LISTEN was (re)confirmed: anything may have happened while nobody listened,
        so every watcher looks again."""
        self._dispatch(None)

    def _link_down(self) -> None:
        """The LISTEN link failed (``connected`` is already False); a reconnect follows."""

    def poll(self) -> bool:
        """Read the LISTEN socket now, without blocking, and hand over any notification
        that already reached this process (txpostgres dispatches them only a reactor
        tick later). False when not listening; a failed read counts as a lost link."""
        conn = self._conn
        raw = None if conn is None else conn._connection
        if raw is None:
            return False
        try:
            raw.poll()
        except Exception as exc:  # the link died (pg_terminate_backend, restart)
            log.warning("LISTEN %s: link failed (%s)", self._channel, str(exc).strip())
            self._lost(conn, close=True)
            return False
        if raw.notifies:
            notices = raw.notifies[:]
            del raw.notifies[:]
            for notice in notices:
                self._on_notify(notice)
        return True

    async def start(self) -> None:
        """Begin listening (reconnecting in the background if the database is down)."""
        self._running = True
        await self._connect()

    async def _connect(self) -> None:
        self._retry = None
        if not self._running:
            return
        conn = txpostgres.Connection(reactor=self._reactor)
        try:
            d = conn.connect(self._dsn, application_name=self._application_name)
            d.addTimeout(10, self._clock)
            await d
            await conn.runOperation(f'LISTEN "{self._channel}"')
        except Exception as exc:
            log.warning("LISTEN %s failed (%s); retrying", self._channel, exc)
            try:
                conn.close()
            except Exception:  # noqa: S110 - never opened
                pass
            self._schedule_retry()
            return
        if not self._running:  # stopped while connecting
            conn.close()
            return
        conn.addNotifyObserver(self._on_notify)
        conn.connectionLost = self._lost_wrapper(conn, conn.connectionLost)
        self._conn = conn
        self.connected = True
        self._backoff_s = 0.5
        self._link_up()

    def _lost_wrapper(self, conn: Any, original: Callable[[Any], None]) -> Callable[[Any], None]:
        def lost(reason: Any) -> None:
            original(reason)
            self._lost(conn, close=False)

        return lost

    def _lost(self, conn: Any, *, close: bool) -> None:
        if self._conn is not conn or conn is None:
            return
        self._conn = None
        self.connected = False
        if close:
            try:
                conn.close()
            except Exception:  # noqa: S110 - already broken
                pass
        self._link_down()
        if self._running:
            log.warning("LISTEN %s connection lost; reconnecting", self._channel)
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._running and self._retry is None:
            delay, self._backoff_s = self._backoff_s, min(self._backoff_s * 2,
                                                          self._max_backoff_s)
            self._retry = self._clock.callLater(
                delay, lambda: defer.Deferred.fromCoroutine(self._connect()))

    def stop(self) -> None:
        """Stop listening."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except Exception:  # noqa: S110 - shutting down
                pass
        self.connected = False
