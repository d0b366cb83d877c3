"""Cross-process wake-ups over PostgreSQL LISTEN/NOTIFY.

One dedicated connection per process listens: a :class:`NotifyLink`, built once in
``agentpost.app`` and handed to every :class:`Notifier` of the process, LISTENs on the
union of their channels. PostgreSQL signals *every* listening backend of the database
at each COMMIT that sent a NOTIFY (the channel filter runs in the receiver), and the
MX's every delivery transaction sends some, so each extra listening connection costs
database CPU on every delivery, and a connection per process sharing the database.

A :class:`Notifier` is one channel's subscription on a link. Watchers register per key
(a folder id). A notification means "look again", never "here is the change": watchers
re-read state from the database, so a lost or duplicated wake-up cannot corrupt
anything. After the link breaks every subscriber learns it at once (``_link_down``,
``connected`` False); the link reconnects with backoff on the injected clock, LISTENs
on every channel in one round trip and wakes every watcher once (``_link_up``), since
notifications sent meanwhile were missed.

Subclasses (the WebSocket hub, the webhook worker, the API-key cache) override
``_on_notify`` to take every payload, and ``_link_up`` / ``_link_down`` to act the
moment their channel's LISTEN is confirmed or lost. :meth:`Notifier.poll` reads
notifications already sent to this process without waiting for the reactor to
dispatch them; it hands every notice found to its own channel's subscribers.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from txpostgres import txpostgres

log = logging.getLogger(__name__)


class _Connection(txpostgres.Connection):  # type: ignore[misc]  # untyped library
    """txpostgres's connection, handing notices over as they are read.

    txpostgres runs its observers through a Cooperator: a task and a timer, then
    another reactor pass, for every read that brought notices; on the MX that is every
    delivery (its events and folder wake-ups), ~4% of a one-session profile. Our one
    observer (:meth:`NotifyLink._on_notify`) only routes each notice to cheap
    subscriber hooks and catches their errors, so it runs at once, in arrival order."""

    def checkForNotifies(self) -> None:
        """Dispatch the notices psycopg2 has read, now."""
        raw = self._connection
        if raw is None or not raw.notifies:
            return
        notices = raw.notifies[:]
        del raw.notifies[:]
        for notice in notices:
            for observer in list(self.getNotifyObservers()):
                try:
                    observer(notice)
                except Exception:
                    log.exception("LISTEN link: a notice observer failed")


def _quoted(channel: str) -> str:
    if not channel or '"' in channel or "\x00" in channel:
        raise ValueError(f"unusable LISTEN channel name {channel!r}")
    return f'"{channel}"'


def _run_operation(conn: Any, sql: str) -> defer.Deferred[None]:
    return conn.runOperation(sql)  # type: ignore[no-any-return]


class NotifyLink:
    """This process's one LISTEN connection, shared by every :class:`Notifier`.

    The channels listened to follow the subscribers: on (re)connect all of them in one
    round trip; a subscriber joining a live link gets its LISTEN then (and becomes
    ``connected`` when that is confirmed); the last subscriber of a channel leaving
    sends UNLISTEN. The connection closes when the last subscriber leaves or
    :meth:`close` is called, and opens again for the next subscriber. Statements are
    sent by one task at a time, which re-reads the wanted channels until nothing is
    left to change, so subscriptions made meanwhile are never lost.

    The link belongs to an application's object graph (two servers in one test process
    must not share one), never to a module global.
    """

    def __init__(self, dsn: str, *, reactor: Any, clock: IReactorTime,
                 max_backoff_s: float = 10.0,
                 application_name: str = "agentpost-listen") -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._clock = clock
        self._max_backoff_s = max_backoff_s
        self._application_name = application_name
        self._subs: dict[str, list[Notifier]] = defaultdict(list)
        self._listening: set[str] = set()  # confirmed on the current connection
        self._conn: txpostgres.Connection | None = None
        self._task: defer.Deferred[None] | None = None  # connecting / (UN)LISTENing
        self._waiters: list[defer.Deferred[None]] = []
        self._retry: Any = None
        self._backoff_s = 0.5
        self._statements = 0  # (UN)LISTEN statements in flight on the connection
        self._dropping: set[str] = set()  # channels an UNLISTEN in flight ends
        self._epoch = 0  # bumped by close(): a connect begun before it is discarded

    @property
    def connected(self) -> bool:
        """Whether the connection is open (each channel's LISTEN may still be pending)."""
        return self._conn is not None

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend serving the connection (pg_stat_activity.pid), if open."""
        raw = None if self._conn is None else self._conn._connection
        return None if raw is None or raw.closed else int(raw.get_backend_pid())

    @property
    def channels(self) -> frozenset[str]:
        """The channels whose LISTEN is confirmed on the current connection."""
        return frozenset(self._listening)

    # -- subscribers ---------------------------------------------------------------
    async def subscribe(self, sub: Notifier) -> None:
        """Add ``sub``; return once its channel's LISTEN is confirmed (``sub`` is then
        ``connected`` and had its ``_link_up``) or the attempt failed (a reconnect with
        backoff follows in the background, as while the database is down)."""
        subs = self._subs[sub.channel]
        if sub in subs:
            return
        subs.append(sub)
        if (self._conn is not None and sub.channel in self._listening
                and sub.channel not in self._dropping):
            self._confirm(sub)
            return
        await self._kick()

    def unsubscribe(self, sub: Notifier) -> None:
        """Remove ``sub`` (UNLISTEN when it was its channel's last; the connection
        closes when it was the last subscriber of all)."""
        subs = self._subs.get(sub.channel)
        if subs is None or sub not in subs:
            return
        subs.remove(sub)
        sub.connected = False
        if not subs:
            del self._subs[sub.channel]
        if not self._subs:
            self.close()
        elif sub.channel not in self._subs and self._conn is not None:
            self._kick()  # UNLISTEN, in the background

    def _confirm(self, sub: Notifier) -> None:
        if not sub.connected:
            sub.connected = True
            sub._link_up()

    # -- the connection ------------------------------------------------------------
    def _kick(self) -> defer.Deferred[None]:
        """Run the connect / (UN)LISTEN task unless it runs; fires when it is done."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        if self._task is None:
            task = defer.Deferred.fromCoroutine(self._drive())
            self._task = task
            task.addBoth(self._driven)
        return waiter

    def _driven(self, result: Any) -> None:
        self._task = None
        if isinstance(result, Failure):
            log.error("LISTEN link: %s", result.getTraceback())
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _drive(self) -> None:
        """Connect if needed, then (UN)LISTEN until the channels match the subscribers;
        start over when the connection changed meanwhile (lost, or closed and
        subscribed again); stop when a reconnect is scheduled or nobody listens."""
        while True:
            conn = self._conn
            if conn is None:
                if self._retry is not None or not self._subs:
                    return
                await self._connect()  # on failure it schedules the retry
            elif await self._sync(conn):
                return

    async def _sync(self, conn: Any) -> bool:
        """LISTEN / UNLISTEN on ``conn`` until it matches the subscribers (True), or
        until ``conn`` is no longer the link's (False)."""
        while conn is self._conn:
            wanted = set(self._subs)
            add, drop = wanted - self._listening, self._listening - wanted
            if not add and not drop:
                return True
            sql = "; ".join([f"LISTEN {_quoted(c)}" for c in sorted(add)]
                            + [f"UNLISTEN {_quoted(c)}" for c in sorted(drop)])
            self._statements += 1
            self._dropping = drop
            try:
                await _run_operation(conn, sql)
            except Exception as exc:
                if conn is self._conn:
                    log.warning("LISTEN %s failed (%s)", ", ".join(sorted(add | drop)),
                                str(exc).strip())
                    self._lost(conn)
                return False
            finally:
                self._statements -= 1
                self._dropping = set()
            if conn is not self._conn:
                return False
            self._listening = (self._listening | add) - drop
            self._backoff_s = 0.5
            for channel in sorted(add):
                for sub in list(self._subs.get(channel, ())):
                    self._confirm(sub)
        return False

    async def _connect(self) -> None:
        """Open the connection (on failure schedule a retry, unless :meth:`close` came
        meanwhile: the caller then looks at the subscribers again)."""
        epoch = self._epoch
        conn = _Connection(reactor=self._reactor)
        try:
            d = conn.connect(self._dsn, application_name=self._application_name)
            d.addTimeout(10, self._clock)
            await d
        except Exception as exc:
            log.warning("LISTEN link: connecting failed (%s); retrying", exc)
            try:
                conn.close()
            except Exception:  # noqa: S110 - never opened
                pass
            if epoch == self._epoch:
                self._schedule_retry()
            return
        if not self._subs or epoch != self._epoch:  # everybody left / closed meanwhile
            conn.close()
            return
        conn.addNotifyObserver(self._on_notify)
        conn.connectionLost = self._lost_wrapper(conn, conn.connectionLost)
        self._conn = conn
        self._listening = set()

    def _lost_wrapper(self, conn: Any, original: Callable[[Any], None]) -> Callable[[Any], None]:
        def lost(reason: Any) -> None:
            original(reason)
            self._lost(conn)

        return lost

    def _lost(self, conn: Any) -> None:
        """The link failed: every subscriber is down at once, one reconnect follows."""
        if self._conn is None or self._conn is not conn:
            return
        self._conn = None
        self._listening = set()
        try:  # also when the reactor saw it die: a statement in flight then fails now
            conn.close()
        except Exception:  # noqa: S110 - already broken
            pass
        for sub in [s for subs in self._subs.values() for s in subs]:
            if sub.connected:
                sub.connected = False
                sub._link_down()
        if self._subs:
            log.warning("LISTEN connection lost; reconnecting")
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._subs and self._retry is None:
            delay, self._backoff_s = self._backoff_s, min(self._backoff_s * 2,
                                                          self._max_backoff_s)
            self._retry = self._clock.callLater(delay, self._retried)

    def _retried(self) -> None:
        self._retry = None
        self._kick()

    def close(self) -> None:
        """Close the connection, cancel any reconnect and forget every subscriber (the
        process is stopping, or nobody listens; their ``stop`` is then a no-op). A
        later :meth:`subscribe` opens the link again."""
        self._epoch += 1
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._backoff_s = 0.5
        conn, self._conn = self._conn, None
        self._listening = set()
        subs, self._subs = self._subs, defaultdict(list)
        for sub in [s for channel_subs in subs.values() for s in channel_subs]:
            sub.connected = False
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: S110 - shutting down
                pass

    # -- notifications -------------------------------------------------------------
    def _on_notify(self, notify: Any) -> None:
        for sub in list(self._subs.get(notify.channel, ())):
            if sub.connected:
                try:
                    sub._on_notify(notify)
                except Exception:
                    log.exception("LISTEN %s: subscriber failed", notify.channel)

    def poll(self) -> bool:
        """Read the socket now, without blocking, and hand over any notification that
        already reached this process (txpostgres dispatches them only a reactor tick
        later). False when not connected, when a failed read lost the link, and while
        a LISTEN/UNLISTEN is in flight: the reply belongs to that statement's cursor,
        which would wait forever if it were read here, so nothing can be said about
        notices until it is back (the key cache reads the database meanwhile)."""
        conn = self._conn
        raw = None if conn is None else conn._connection
        if raw is None or self._statements:
            return False
        try:
            raw.poll()
        except Exception as exc:  # the link died (pg_terminate_backend, restart)
            log.warning("LISTEN link failed (%s)", str(exc).strip())
            self._lost(conn)
            return False
        if raw.notifies:
            notices = raw.notifies[:]
            del raw.notifies[:]
            for notice in notices:
                self._on_notify(notice)
        return True


class Notifier:
    """One channel's subscription on a :class:`NotifyLink`; dispatches payloads to
    watchers keyed by payload.

    Without ``link`` the Notifier gets a link (a connection) of its own, for tools and
    tests that use one channel; the server passes the process's shared link.
    """

    def __init__(self, dsn: str, channel: str, *, reactor: Any, clock: IReactorTime,
                 max_backoff_s: float = 10.0,
                 application_name: str = "agentpost-listen",
                 link: NotifyLink | None = None) -> None:
        _quoted(channel)
        self.channel = channel
        self._link = link or NotifyLink(dsn, reactor=reactor, clock=clock,
                                        max_backoff_s=max_backoff_s,
                                        application_name=application_name)
        self._watchers: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self.connected = False  # this channel's LISTEN is confirmed (set by the link)

    @property
    def link(self) -> NotifyLink:
        """The connection this subscription listens on."""
        return self._link

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
        """Read the shared socket now, without blocking, handing every notification
        found to its channel's subscribers. False when this channel is not listened to
        (or the link cannot be read now); a failed read counts as a lost link."""
        return self.connected and self._link.poll()

    async def start(self) -> None:
        """Begin listening (reconnecting in the background if the database is down)."""
        await self._link.subscribe(self)

    def stop(self) -> None:
        """Stop listening (the link UNLISTENs when this was its channel's last)."""
        self._link.unsubscribe(self)
        self.connected = False
