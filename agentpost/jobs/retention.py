"""The retention sweep.

Every process runs the timer; a transaction-scoped advisory lock makes sure only one
of them deletes at a time, and deleting in small batches keeps each transaction short
so the API never waits behind a long purge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from twisted.internet.interfaces import IReactorTime

from agentpost.config.sections import RetentionSection
from agentpost.config.units import parse_duration
from agentpost.jobs.periodic import Periodic
from agentpost.storage import delivery_events as delivery_store
from agentpost.storage import events as event_store
from agentpost.storage import logins as login_store
from agentpost.storage import retention as store
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

LOGIN_BUCKET_IDLE_S = 24 * 3600

TIERS = ("free", "developer", "startup", "business", "enterprise")


class RetentionSweep:
    """Deletes expired audit rows, delivery events and SNS receipts, events, and finished
    outbound queue rows."""

    def __init__(self, db: Database, clock: IReactorTime, config: RetentionSection,
                 also: Sequence[Callable[[], Awaitable[int]]] = ()) -> None:
        self._db = db
        # Further sweeps run after the audit one (expired uploads, idempotency answers).
        self._also = tuple(also)
        self._clock = clock
        self._config = config
        self._periodic = Periodic("retention sweep", clock, config.interval, self.sweep_once,
                                  self._report)

    def _audit_policy(self) -> tuple[list[str], list[float]]:
        return list(TIERS), [getattr(self._config, f"audit_{tier}") for tier in TIERS]

    async def sweep_once(self) -> int:
        """One full sweep; returns rows deleted (0 when another process holds the lock)."""
        tiers, keep = self._audit_policy()
        total = 0
        while True:

            async def batch(txn: Txn) -> int | None:
                if not await store.try_lock_sweep(txn):
                    return None
                return await store.delete_expired_audit(
                    txn, tiers, keep, self._config.audit_unscoped, self._config.batch_size)

            deleted = await self._db.run_interaction("retention.audit", batch)
            if deleted is None:
                return total
            total += deleted
            if deleted < self._config.batch_size:
                break
        # Failed-login allowances idle for a day are full again: forget them.
        idle_since = datetime.fromtimestamp(self._clock.seconds() - LOGIN_BUCKET_IDLE_S, UTC)

        async def purge(txn: Txn) -> int:
            if not await store.try_lock_sweep(txn):
                return 0
            return await login_store.purge_idle(txn, idle_since)

        await self._db.run_interaction("retention.login_failures", purge)
        await self._sweep_delivery_events()
        await self._sweep_events()
        await self._sweep_outbound()
        for sweep in self._also:
            try:
                await sweep()
            except Exception:  # one failing sweep must not stop the others
                log.exception("retention: a sweep failed")
        return total

    def _older_than(self, keep: float | str) -> datetime:
        if isinstance(keep, str):  # a section built in code, not through the loader
            keep = parse_duration(keep)
        return datetime.fromtimestamp(self._clock.seconds() - keep, UTC)

    async def _in_batches(self, name: str, delete: Callable[[Txn], Awaitable[int]]) -> int:
        """Run ``delete`` (at most batch_size rows) in transactions under the one-sweeper
        lock until a batch comes back short; the rows deleted (another process holding
        the lock ends it)."""
        total = 0
        while True:

            async def batch(txn: Txn) -> int | None:
                if not await store.try_lock_sweep(txn):
                    return None
                return await delete(txn)

            deleted = await self._db.run_interaction(f"retention.{name}", batch)
            total += deleted or 0
            if deleted is None or deleted < self._config.batch_size:
                if total:
                    log.info("retention: deleted %d rows of %s", total, name)
                return total

    async def _sweep_delivery_events(self) -> int:
        """Delivery feedback rows (and SNS receipts) older than retention.delivery_events."""
        older_than = self._older_than(self._config.delivery_events)
        return await self._in_batches("delivery_events", lambda txn: delivery_store.delete_expired(
            txn, older_than, self._config.batch_size))

    async def _sweep_events(self) -> int:
        """The event log and finished webhook deliveries older than retention.events."""
        older_than = self._older_than(self._config.events)

        async def delete(txn: Txn) -> int:
            # Webhook attempts of the same age too (issue 13); a full batch of either
            # keeps the loop going.
            attempts = await store.delete_expired_webhook_attempts(
                txn, older_than, self._config.batch_size)
            return max(attempts, await event_store.sweep(txn, older_than,
                                                         self._config.batch_size))

        return await self._in_batches("events", delete)

    async def _sweep_outbound(self) -> int:
        """Finished outbound queue rows (and their recipients' states) older than
        retention.outbound_queue."""
        older_than = self._older_than(self._config.outbound_queue)
        return await self._in_batches("outbound_queue", lambda txn: store.delete_finished_outbound(
            txn, older_than, self._config.batch_size))

    def _report(self, deleted: int) -> None:
        if deleted:
            log.info("retention: deleted %d expired audit rows", deleted)

    def start(self) -> None:
        """Sweep now and then every ``interval``."""
        self._periodic.start()

    async def stop(self) -> None:
        """Stop the timer and wait for a sweep in progress."""
        await self._periodic.stop()
