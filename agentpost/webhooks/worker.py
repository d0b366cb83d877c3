"""The webhook delivery worker: claims due deliveries from the PostgreSQL queue and
POSTs them, signed, with treq on the reactor.

Any number of processes run one each. Claims use ``FOR UPDATE SKIP LOCKED`` and a lease
(storage/webhooks.py), so each attempt of each delivery is made by exactly one process;
a process that dies mid-attempt loses its lease and another one makes the next attempt.
Outcomes are recorded fenced by attempt number, each attempt also as a row of the
delivery's history (``webhook_attempts``: status, latency, capped error and body
excerpt, next retry) in the same statement.

Schedule: the first attempt as soon as the event commits (the fan-out trigger NOTIFYs
``agentpost_webhooks`` when it created a delivery, which wakes every process; events
no endpoint wants wake nobody), then retries after 30 s, 2 min, 10 min, 1 h and 4 h; after the
sixth failed attempt the delivery is failed. Each attempt has 30 s; 2xx is success;
redirects are not followed; at most :data:`BODY_CAP` bytes of the answer are read. An
endpoint is disabled after :data:`DISABLE_AFTER` consecutive failed attempts, with a
``webhook.disabled`` event. Timers run on the injected clock.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from agentpost.auth.sealing import Sealer
from agentpost.core.events import envelope
from agentpost.core.webhooks import secret_context
from agentpost.model.errors import WebhookURLNotAllowed
from agentpost.model.ids import new_id
from agentpost.storage import events as event_store
from agentpost.storage import webhooks as store
from agentpost.storage.database import Database, Txn
from agentpost.storage.mail import insert_event
from agentpost.storage.notify import Notifier, NotifyLink
from agentpost.webhooks.signing import signed_headers
from agentpost.webhooks.ssrf import SSRFGuard, pinned_agent

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (30, 120, 600, 3600, 4 * 3600)
MAX_ATTEMPTS = len(RETRY_DELAYS_S) + 1
DISABLE_AFTER = 50
TIMEOUT_S = 30.0
BODY_CAP = 4096
EXCERPT_CAP = store.EXCERPT_CAP  # bytes of an answer kept with its attempt
USER_AGENT = "AgentPost-Webhooks/1"


class DeliveriesWakeup(Notifier):
    """LISTEN on the channel the fan-out trigger notifies when it created webhook
    deliveries (migration 0030); every notice wakes every watcher."""

    def __init__(self, dsn: str, *, reactor: Any, clock: IReactorTime,
                 link: NotifyLink | None = None) -> None:
        super().__init__(dsn, store.WAKEUP_CHANNEL, reactor=reactor, clock=clock, link=link)

    def _on_notify(self, notify: Any) -> None:
        self._dispatch(None)


class _Capped(Protocol):
    """Collects at most ``cap`` bytes of a response body, then stops reading.

    ``done`` fires with the bytes; cancelling it (the attempt's timeout) drops the
    connection. A plain Deferred let the timeout fail the attempt but left the socket
    with an endpoint that sent its headers and then trickled its body, for as long as
    that endpoint liked: one more open connection per attempt."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._buf = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        room = self._cap - len(self._buf)
        if room > 0:
            self._buf += data[:room]
        if len(self._buf) >= self._cap and self.transport is not None:
            cast(Any, self.transport).stopProducing()  # a response body's transport

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(bytes(self._buf))


class WebhookWorker:
    """Delivers due webhook deliveries; see the module doc."""

    def __init__(self, db: Database, guard: SSRFGuard, sealer: Sealer | None, *,
                 reactor: Any, clock: IReactorTime, concurrency: int = 16,
                 lease_s: float = 120.0, poll_s: float = 5.0,
                 wakeup: Notifier | None = None) -> None:
        self._db = db
        self._guard = guard
        self._sealer = sealer
        self._reactor = reactor
        self._clock = clock
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._wakeup = wakeup
        self._unwatch: Any = None
        self._running = False
        self._draining = False
        self._again = False
        self._inflight: set[defer.Deferred[None]] = set()
        self._timer: Any = None
        self._drain_d: defer.Deferred[None] | None = None

    async def start(self) -> None:
        """Begin delivering (and listening for new events)."""
        self._running = True
        if self._wakeup is not None:
            self._unwatch = self._wakeup.watch("*", self.kick)
            await self._wakeup.start()
        self.kick()

    async def stop(self) -> None:
        """Stop claiming; wait for attempts in progress (their leases would expire)."""
        self._running = False
        if self._unwatch is not None:
            self._unwatch()
        if self._wakeup is not None:
            self._wakeup.stop()
        self._cancel_timer()
        if self._drain_d is not None:
            await self._drain_d
        if self._inflight:
            await defer.DeferredList(list(self._inflight))

    def kick(self) -> None:
        """Look for due deliveries now (new event, re-enabled endpoint, timer)."""
        if not self._running:
            return
        if self._draining:
            self._again = True
            return
        self._draining = True
        self._drain_d = defer.Deferred.fromCoroutine(self._drain())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        if self._running:
            self._timer = self._clock.callLater(max(0.0, delay), self.kick)

    async def _drain(self) -> None:
        full = False
        due = None
        try:
            while self._running:
                self._again = False
                room = self._concurrency - len(self._inflight)
                if room <= 0:
                    full = True  # an attempt finishing kicks again
                    break
                lease_until = self._db.now() + timedelta(seconds=self._lease_s)
                rows = await self._db.run_interaction(
                    "webhooks.claim", store.claim_due, lease_until=lease_until, limit=room)
                for row in rows:
                    d = defer.Deferred.fromCoroutine(self._attempt(row))
                    self._inflight.add(d)
                    d.addBoth(self._finished, d)
                if not rows and not self._again:
                    break
            if not full:
                due = await self._db.run_read("webhooks.next_due", store.next_due)
        except Exception:
            log.exception("webhook delivery: claiming failed")
        finally:
            self._draining = False
            self._drain_d = None
        if full:
            return
        if self._again and self._running:
            # Woken (a new event's NOTIFY) while the loop had ended and next_due was
            # being read: that read may predate the event, so look again now rather
            # than sleep until the poll timer.
            self.kick()
            return
        delay = self._poll_s
        if due is not None:
            wait = (due - self._db.now()).total_seconds()
            if wait > 0:  # (due already: claimed by another process just now)
                delay = min(delay, wait)
        self._schedule(delay)

    def _finished(self, result: Any, d: defer.Deferred[None]) -> None:
        self._inflight.discard(d)
        if isinstance(result, Failure):
            log.error("webhook delivery failed unexpectedly: %s", result.getTraceback())
        self.kick()

    def _secrets(self, row: dict[str, Any]) -> list[str]:
        if self._sealer is None:
            raise RuntimeError("no [secrets] key_file: cannot sign")
        ad = secret_context(row["org_id"], row["webhook_id"])
        out = [self._sealer.open(bytes(row["secret_sealed"]), ad).decode("ascii")]
        expires = row["previous_expires_at"]
        if row["previous_secret_sealed"] is not None and expires is not None \
                and expires > self._db.now():
            out.append(self._sealer.open(bytes(row["previous_secret_sealed"]), ad)
                       .decode("ascii"))
        return out

    async def _body(self, row: dict[str, Any]) -> tuple[str, bytes] | None:
        """The message id (Standard Webhooks' webhook-id) and raw body; None when the
        event is no longer kept."""
        if row["event_id"] is None:
            return row["id"], json.dumps(row["payload"], separators=(",", ":")).encode()
        events = await self._db.run_read("webhooks.event", event_store.events_by_ids,
                                         [row["event_id"]])
        if not events:
            return None
        return row["event_id"], json.dumps(envelope(events[0]), separators=(",", ":"),
                                           default=str).encode()

    async def _attempt(self, row: dict[str, Any]) -> None:
        started = self._clock.seconds()
        status: int | None = None
        error: str | None
        excerpt: str | None = None
        try:
            body = await self._body(row)
            if body is None:
                ok, error = False, "the event is no longer kept"
            else:
                status, error, excerpt = await self._post(row, *body)
                ok = status is not None and 200 <= status < 300
        except Exception as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"[:500]
        latency_ms = int((self._clock.seconds() - started) * 1000)
        await self._db.run_interaction(
            "webhooks.record", self._record, row, ok=ok, status=status,
            started_at=datetime.fromtimestamp(started, UTC), latency_ms=latency_ms,
            error=error, excerpt=excerpt)

    async def _post(self, row: dict[str, Any], msg_id: str,
                    body: bytes) -> tuple[int | None, str | None, str | None]:
        """One signed POST; (HTTP status or None, error text or None, the start of the
        answer's body or None)."""
        try:
            target = await self._guard.target(row["url"])
        except WebhookURLNotAllowed as exc:
            return None, exc.message, None
        headers = signed_headers(self._secrets(row), msg_id, int(self._clock.seconds()), body)
        headers.update({"content-type": "application/json", "user-agent": USER_AGENT,
                        "x-agentpost-delivery": row["id"],
                        "x-agentpost-attempt": str(row["attempt"])})
        client = HTTPClient(pinned_agent(self._reactor, target, TIMEOUT_S))

        async def exchange() -> tuple[int, bytes]:
            wire: dict[bytes | str, list[bytes | str]] = {k: [v] for k, v in headers.items()}
            response = await client.request("POST", row["url"], data=body, headers=wire)
            capped = _Capped(BODY_CAP)
            response.deliverBody(capped)
            return response.code, await capped.done

        d = defer.Deferred.fromCoroutine(exchange())
        d.addTimeout(TIMEOUT_S, self._clock)
        try:
            code, answer = await d
        except defer.TimeoutError:
            return None, f"no answer within {TIMEOUT_S:.0f} s", None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500], None
        excerpt = answer[:EXCERPT_CAP].decode("utf-8", "replace") or None
        if 200 <= code < 300:
            return code, None, excerpt
        snippet = answer[:200].decode("utf-8", "replace")
        return code, f"HTTP {code}" + (f": {snippet}" if snippet else ""), excerpt

    async def _record(self, txn: Txn, row: dict[str, Any], *, ok: bool, status: int | None,
                      started_at: datetime, latency_ms: int, error: str | None,
                      excerpt: str | None) -> None:
        ping = row["event_id"] is None
        final = ok or ping or row["attempt"] >= MAX_ATTEMPTS
        retry_at = None if final else txn.now + timedelta(
            seconds=RETRY_DELAYS_S[row["attempt"] - 1])
        if not await store.record_attempt(txn, row, ok=ok, final=final, retry_at=retry_at,
                                          started_at=started_at, status_code=status,
                                          latency_ms=latency_ms, error=error,
                                          excerpt=excerpt):
            return  # our lease ran out and another attempt owns the row
        if ping:
            return
        if await store.count_outcome(txn, row["org_id"], row["webhook_id"], ok=ok,
                                     disable_after=DISABLE_AFTER):
            log.warning("webhook %s disabled after %d consecutive failures",
                        row["webhook_id"], DISABLE_AFTER)
            await insert_event(txn, org_id=row["org_id"], event_id=new_id("evt"),
                               environment_id=None, inbox_id=None, type_="webhook.disabled",
                               data={"webhook_id": row["webhook_id"], "url": row["url"],
                                     "consecutive_failures": DISABLE_AFTER,
                                     "reason": "consecutive_failures"})

