"""The audit trail writer.

Changes write their audit row inside their own transaction, so the two commit or
vanish together. Reads and refusals are not in a transaction of their own worth
paying for, so their rows are buffered and written in batches on the injected clock;
a clean shutdown waits for the buffer to be written. PostgreSQL being away keeps the
rows (bounded) for the next attempt; a row PostgreSQL refuses never blocks the others.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from agentpost.core.context import RequestContext
from agentpost.model.errors import AgentPostError
from agentpost.model.ids import new_id
from agentpost.model.principal import AdminPrincipal, Principal
from agentpost.storage import audit as audit_store
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

#: A drain starts as soon as this many rows wait (or the timer fires), and writes at
#: most this many per INSERT. Under a steady 1,700 GET/s the 200 ms timer alone made
#: batches of ~340 rows whose JSON took 1.5-2 ms of the event loop in one piece, a
#: stall every request in the process waited behind (issue 12); slices of 128 keep each
#: piece near half a millisecond for the same rows per second.
FLUSH_SLICE = 128


def audit_row(ctx: RequestContext, outcome: str, status: int | None, when: Any) -> dict[str, Any]:
    """The row describing one request."""
    principal = ctx.principal
    if isinstance(principal, Principal):
        org_id, actor_type, actor_id = principal.org_id, "api_key", principal.credential_id
    elif isinstance(principal, AdminPrincipal):
        org_id, actor_type, actor_id = None, "admin_key", principal.admin_key_id
    else:
        org_id, actor_type, actor_id = None, "anonymous", None
    details = dict(ctx.details)
    # Admin actions on an organization, and refusals aimed at one (a revoked key, a
    # failed IMAP login on its inbox), are filed with that organization.
    if not isinstance(principal, Principal) and ctx.details.get("org_id"):
        org_id = ctx.details["org_id"]
    return {
        "id": new_id("aud"),
        "occurred_at": when,
        "org_id": org_id,
        "environment_id": ctx.environment_id,
        "actor_type": actor_type,
        "actor_id": actor_id,
        "action": ctx.action,
        "target_id": ctx.target_id,
        "outcome": outcome,
        "status": status,
        "remote_addr": ctx.remote_addr,
        "request_id": ctx.request_id,
        "details": details,
    }


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def scrub_row(row: dict[str, Any]) -> bool:
    """Make the row's text storable in place; True when anything had to change.

    PostgreSQL text and jsonb refuse NUL, and UTF-8 has no lone surrogates. Those become
    U+FFFD, so the request is still on record, recognisably, instead of failing to write.
    """
    changed = False
    for name, value in row.items():
        kind = type(value)
        if kind is str:
            if value.isascii() and "\x00" not in value:
                continue  # the usual case, decided without a regex (every request's row)
        elif not value or not isinstance(value, str | dict | list | tuple):
            continue  # None, numbers, timestamps, an empty details dict: nothing to clean
        clean = _scrubbed(value)
        if clean != value:
            row[name], changed = clean, True
    return changed


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_scrubbed(k): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrubbed(v) for v in value)
    return value


async def write_change(txn: Txn, ctx: RequestContext, status: int = 200) -> None:
    """Record a change inside the transaction that makes it (so the two commit or vanish
    together). A function, not only a method of :class:`AuditTrail`, because the core
    operations every door shares (core.mail_changes) run inside the caller's
    transaction and need no buffer."""
    row = audit_row(ctx, "allowed", status, txn.now)
    scrub_row(row)
    await audit_store.insert_audit_rows(txn, [row])
    txn.after_commit(setattr, ctx, "audited", True)


class AuditTrail:
    """Writes audit rows transactionally (changes) or in batches (everything else).

    The batch path never lets one row hold up the others. A batch PostgreSQL refuses for
    a reason other than being away is retried row by row, and a row it still refuses is
    logged in full and dropped (``quarantined``). While PostgreSQL is away rows wait in a
    bounded buffer (the oldest go first, counted in ``dropped``) and the timer retries.
    """

    def __init__(self, db: Database, clock: IReactorTime, flush_interval_s: float,
                 max_buffer: int, capacity: int | None = None) -> None:
        self._db = db
        self._clock = clock
        self._interval = flush_interval_s
        self._max_buffer = max_buffer  # rows per INSERT; this many waiting flushes at once
        self._slice = max(1, min(max_buffer, FLUSH_SLICE))
        self._capacity = capacity or max_buffer * 50
        self._buffer: list[dict[str, Any]] = []
        self._loop: task.LoopingCall | None = None
        self._draining = False
        self._waiters: list[defer.Deferred[None]] = []
        self._database_away = False
        self.sanitised = 0  # rows whose text had to be made storable (NUL -> U+FFFD)
        self.quarantined = 0  # rows PostgreSQL refused even alone: logged, then dropped
        self.dropped = 0  # oldest rows let go because the buffer was full

    async def write_in(self, txn: Txn, ctx: RequestContext, status: int = 200) -> None:
        """Record a change inside the transaction that makes it."""
        await write_change(txn, ctx, status)

    def enqueue(self, ctx: RequestContext, outcome: str, status: int | None) -> None:
        """Buffer a row for a read or a refused request."""
        row = audit_row(ctx, outcome, status, self._db.now())
        if scrub_row(row):
            self.sanitised += 1
            log.info("audit row %s (%s) held unstorable text; stored with U+FFFD",
                     row["id"], row["action"])
        self._buffer.append(row)
        self._trim()
        if (len(self._buffer) >= self._slice and not self._database_away
                and not self._draining):  # a drain under way picks the row up anyway
            self.flush()

    def start(self) -> None:
        """Begin periodic flushing on the injected clock."""
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(log.error)

    def flush(self) -> defer.Deferred[None]:
        """Write everything buffered (including rows added meanwhile); never fails.

        Fires once the buffer is empty, or once PostgreSQL proved unreachable (the rows
        stay for the next attempt). Concurrent callers share one drain.
        """
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        if not self._draining:
            self._draining = True
            defer.Deferred.fromCoroutine(self._drain()).addErrback(
                lambda f: log.error("audit flush failed: %s", f.getTraceback())
            ).addBoth(self._drained)
        return waiter

    def _drained(self, _: Any) -> None:
        self._draining = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _drain(self) -> None:
        while self._buffer:
            rows = self._buffer[: self._slice]
            del self._buffer[: len(rows)]
            try:
                await self._db.run_interaction("audit.flush", audit_store.insert_audit_batch,
                                               rows)
            except Exception as exc:
                if _temporary(exc):
                    self._keep(rows, exc)
                    return
                log.warning("audit flush: a batch of %d was refused (%s); writing rows "
                            "one by one", len(rows), exc)
                if not await self._write_singly(rows):
                    return
            self._database_away = False

    async def _write_singly(self, rows: list[dict[str, Any]]) -> bool:
        """Write each row alone; False when PostgreSQL went away (the rest are kept)."""
        for i, row in enumerate(rows):
            try:
                await self._db.run_interaction("audit.flush_row",
                                               audit_store.insert_audit_batch, [row])
            except Exception as exc:
                if _temporary(exc):
                    self._keep(rows[i:], exc)
                    return False
                self.quarantined += 1
                log.error("audit row quarantined (not written: %s): %s", exc, _printable(row))
        return True

    def _keep(self, rows: list[dict[str, Any]], exc: Exception) -> None:
        """Put rows back at the head of the buffer for the next attempt."""
        self._database_away = True
        self._buffer[:0] = rows
        self._trim()
        log.warning("audit flush failed (%s); %d rows kept for the next attempt",
                    exc, len(self._buffer))

    def _trim(self) -> None:
        excess = len(self._buffer) - self._capacity
        if excess > 0:
            del self._buffer[:excess]
            self.dropped += excess
            log.error("audit buffer full (%d rows): dropped the %d oldest", self._capacity,
                      excess)

    @property
    def pending(self) -> int:
        """Rows waiting to be written."""
        return len(self._buffer)

    async def stop(self) -> None:
        """Stop the timer and write everything still buffered (waiting for the write)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        await self.flush()
        if self._buffer:
            log.error("stopping with %d audit rows unwritten: the database is unavailable",
                      len(self._buffer))


def _temporary(exc: Exception) -> bool:
    """PostgreSQL away or overloaded (retry later), as opposed to refusing the rows."""
    return isinstance(exc, AgentPostError) and exc.temporary


def _printable(row: dict[str, Any]) -> str:
    """A quarantined row as one log line, so it can still be recovered from the journal."""
    return json.dumps(row, default=str, ensure_ascii=True, sort_keys=True)
