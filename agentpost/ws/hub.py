"""One LISTEN per process on the events channel, fanned out to this process's sockets.

A notification (``storage.mail.insert_event`` sends it at COMMIT) carries only ids:
``{org_id, id, type, inbox_id}``. The hub keeps the ids of organizations that have a
socket here, waits a few milliseconds so a burst of mail costs one query, reads the
rows with ``events_by_ids`` (one statement for the whole batch) and offers each row to
the sockets of its organization; every socket re-applies its own organization,
environment and filter checks before it sends anything.

Notifications can be lost (the LISTEN connection drops and reconnects). The Notifier
then wakes every watcher once; the hub asks every socket to catch up from the event
log after the last event it delivered (``events_after``), so nothing is missed.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from agentpost.storage import events as event_store
from agentpost.storage.database import Database
from agentpost.storage.mail import EVENTS_CHANNEL
from agentpost.storage.notify import Notifier, NotifyLink

log = logging.getLogger(__name__)

#: How long notifications are gathered before one read serves them all.
COALESCE_S = 0.005
#: Ids read per statement.
IDS_PER_QUERY = 500
_RECONNECTED = "\x00reconnected"  # a watcher key no JSON payload can equal


class Subscriber(Protocol):
    """What the hub needs from a socket (agentpost.ws.protocol.EventStreamProtocol)."""

    org_id: str
    key_id: str

    def offer(self, row: dict[str, Any]) -> None:
        """A committed event row of this socket's organization (not yet filtered)."""

    def catch_up(self, rewind: bool = True) -> None:
        """Notifications may have been missed: re-read the log after the cursor."""


class _EventListener(Notifier):
    """The Notifier, handing every payload to the hub instead of keyed watchers."""

    def __init__(self, hub: EventHub, dsn: str, *, reactor: Any, clock: IReactorTime,
                 link: NotifyLink | None) -> None:
        super().__init__(dsn, EVENTS_CHANNEL, reactor=reactor, clock=clock, link=link)
        self._hub = hub

    def _on_notify(self, notify: Any) -> None:
        self._hub.notified(notify.payload)


class EventHub:
    """This process's sockets by organization, and the one LISTEN that feeds them."""

    def __init__(self, db: Database, dsn: str, *, reactor: Any, clock: IReactorTime,
                 coalesce_s: float = COALESCE_S, link: NotifyLink | None = None) -> None:
        """``link``: the process's shared LISTEN connection (None: one of its own)."""
        self._db = db
        self._clock = clock
        self._coalesce_s = coalesce_s
        self.listener = _EventListener(self, dsn, reactor=reactor, clock=clock, link=link)
        self.listener.watch(_RECONNECTED, self._reconnected)  # fired only by _dispatch(None)
        self._by_org: dict[str, set[Subscriber]] = defaultdict(set)
        self._per_key: dict[str, int] = defaultdict(int)
        self._pending: dict[str, None] = {}  # ids to read, in arrival order
        self._flush_call: Any = None
        self._reading: defer.Deferred[None] | None = None
        self.queries = 0  # statements issued (tests and the benchmark count them)

    # ------------------------------------------------------------------ sockets

    def connections_of(self, key_id: str) -> int:
        """Open sockets of one API key in this process (the per-key cap)."""
        return self._per_key.get(key_id, 0)

    def add(self, sub: Subscriber) -> None:
        """Start offering ``sub`` its organization's events."""
        self._by_org[sub.org_id].add(sub)
        self._per_key[sub.key_id] += 1

    def remove(self, sub: Subscriber) -> None:
        """Stop (idempotent)."""
        subs = self._by_org.get(sub.org_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self._by_org[sub.org_id]
        self._per_key[sub.key_id] -= 1
        if self._per_key[sub.key_id] <= 0:
            del self._per_key[sub.key_id]

    @property
    def count(self) -> int:
        """Open sockets in this process."""
        return sum(len(s) for s in self._by_org.values())

    # ------------------------------------------------------------------ notifications

    def notified(self, payload: str) -> None:
        """A NOTIFY arrived: remember the id if a socket here may want it."""
        if not self._by_org:  # no socket in this process: nothing to read or decode
            return
        try:
            note = json.loads(payload)
            org_id, event_id = note["org_id"], note["id"]
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring a malformed event notification %r", payload[:200])
            return
        if org_id not in self._by_org:
            return
        self._pending[event_id] = None
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(self._coalesce_s, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if self._reading is not None:  # one read at a time; it re-arms when done
            return
        ids, self._pending = list(self._pending), {}
        if not ids:
            return
        self._reading = defer.ensureDeferred(self._read(ids))
        self._reading.addErrback(self._read_failed, len(ids))
        self._reading.addBoth(self._read_done)

    def _read_failed(self, failure: Any, count: int) -> None:
        log.warning("reading %d notified events failed (%s); sockets catch up from the log",
                    count, failure.getErrorMessage())
        self._reconnected()

    def _read_done(self, _: Any) -> None:
        self._reading = None
        if self._pending and self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    async def _read(self, ids: list[str]) -> None:
        for start in range(0, len(ids), IDS_PER_QUERY):
            self.queries += 1
            rows = await self._db.run_read("ws.events_by_ids", event_store.events_by_ids,
                                           ids[start:start + IDS_PER_QUERY])
            for row in rows:
                for sub in list(self._by_org.get(row["org_id"], ())):
                    try:
                        sub.offer(row)
                    except Exception:
                        log.exception("offering an event to a socket failed")

    def _reconnected(self) -> None:
        """The LISTEN link (re)connected or a read failed: every socket re-reads the log."""
        for subs in list(self._by_org.values()):
            for sub in list(subs):
                sub.catch_up()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """LISTEN (reconnecting in the background while the database is away)."""
        await self.listener.start()

    def stop(self) -> None:
        """Stop listening and every timer (sockets are closed with the listeners)."""
        self.listener.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
