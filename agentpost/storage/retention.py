"""Deleting what has outlived its retention period."""

from __future__ import annotations

from agentpost.storage.database import Txn

RETENTION_LOCK_KEY = 0x41505254  # "APRT": one sweeper at a time across all processes


async def try_lock_sweep(txn: Txn) -> bool:
    """Take the sweep lock for this transaction, or learn another process holds it."""
    return bool(await txn.fetchval("SELECT pg_try_advisory_xact_lock(%s)", (RETENTION_LOCK_KEY,)))


async def delete_expired_audit(txn: Txn, tiers: list[str], keep_s: list[float],
                               unscoped_keep_s: float, batch: int) -> int:
    """Delete up to ``batch`` audit rows older than their organization's tier allows."""
    return await txn.execute(
        """
        DELETE FROM audit_log WHERE id IN (
            SELECT a.id FROM audit_log a
            LEFT JOIN organizations o ON o.id = a.org_id
            LEFT JOIN unnest(%s::text[], %s::float8[]) AS r(tier, keep_s) ON r.tier = o.tier
            WHERE a.occurred_at < %s - make_interval(secs =>
                  COALESCE(r.keep_s, CASE WHEN a.org_id IS NULL THEN %s ELSE %s END))
            LIMIT %s)
        """,
        (tiers, keep_s, txn.now, unscoped_keep_s, max(keep_s), batch),
    )


async def delete_expired_webhook_attempts(txn: Txn, before: object, batch: int) -> int:
    """Delete up to ``batch`` webhook attempts started before ``before`` (retention.events).

    Attempts also go with their delivery (foreign key cascade); this catches the old
    attempts of a delivery that is itself still kept, e.g. one replayed long after.
    """
    return await txn.execute(
        "DELETE FROM webhook_attempts WHERE seq IN (SELECT seq FROM webhook_attempts "
        "WHERE started_at < %s LIMIT %s)", (before, batch))


async def delete_finished_outbound(txn: Txn, before: object, batch: int) -> int:
    """Delete up to ``batch`` finished queue rows (every recipient done, no DSN owed; their
    recipients go by cascade) last changed before ``before`` (retention.outbound_queue).
    Their blob references were released when they finished."""
    return await txn.execute(
        "DELETE FROM outbound_queue WHERE id IN (SELECT id FROM outbound_queue "
        "WHERE status = 'done' AND NOT bounce_pending AND updated_at < %s "
        "ORDER BY updated_at LIMIT %s)", (before, batch))
