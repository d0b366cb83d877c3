"""The audit trail writer.

Changes write their audit row inside their own transaction, so the two commit or
vanish together. Reads and refusals are not in a transaction of their own worth
paying for, so their rows are buffered and written in batches on the injected clock;
a clean shutdown flushes the buffer, and a failed flush keeps the rows for the next.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from agentpost.core.context import RequestContext
from agentpost.model.ids import new_id
from agentpost.model.principal import AdminPrincipal, Principal
from agentpost.storage import audit as audit_store
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)


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
    if isinstance(principal, AdminPrincipal) and ctx.details.get("org_id"):
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


class AuditTrail:
    """Writes audit rows transactionally (changes) or in batches (everything else)."""

    def __init__(self, db: Database, clock: IReactorTime, flush_interval_s: float,
                 max_buffer: int) -> None:
        self._db = db
        self._clock = clock
        self._interval = flush_interval_s
        self._max_buffer = max_buffer
        self._buffer: list[dict[str, Any]] = []
        self._loop: task.LoopingCall | None = None
        self._flushing: defer.Deferred[None] | None = None

    async def write_in(self, txn: Txn, ctx: RequestContext, status: int = 200) -> None:
        """Record a change inside the transaction that makes it."""
        await audit_store.insert_audit_rows(txn, [audit_row(ctx, "allowed", status, txn.now)])
        txn.after_commit(setattr, ctx, "audited", True)

    def enqueue(self, ctx: RequestContext, outcome: str, status: int | None) -> None:
        """Buffer a row for a read or a refused request."""
        self._buffer.append(audit_row(ctx, outcome, status, self._db.now()))
        if len(self._buffer) >= self._max_buffer:
            self.flush()

    def start(self) -> None:
        """Begin periodic flushing on the injected clock."""
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(log.error)

    def flush(self) -> defer.Deferred[None]:
        """Write what is buffered; on failure keep it (bounded) for the next attempt."""
        if self._flushing is not None:
            return self._flushing
        if not self._buffer:
            return defer.succeed(None)
        rows, self._buffer = self._buffer, []

        def failed(failure: Any) -> None:
            log.warning("audit flush failed (%s); will retry", failure.getErrorMessage())
            keep = self._max_buffer * 50
            self._buffer = (rows + self._buffer)[-keep:]

        def done(_: Any) -> None:
            self._flushing = None

        d = self._db.run_interaction("audit.flush", audit_store.insert_audit_rows, rows)
        d.addCallbacks(lambda _: None, failed)
        d.addBoth(done)
        self._flushing = d if not d.called else None
        return d

    @property
    def pending(self) -> int:
        """Rows waiting to be written."""
        return len(self._buffer)

    async def stop(self) -> None:
        """Stop the timer and write everything still buffered."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for _ in range(3):
            if self._flushing is not None:
                await self._flushing
            if not self._buffer:
                return
            await self.flush()
