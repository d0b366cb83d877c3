"""An inbox's storage use without a hot row (issue 12).

A delivery used to add its size to ``inboxes.used_bytes`` inside its transaction, so
every delivery to one inbox waited for the previous one's COMMIT and fsync on that row.
Now each change of use (a delivery, a copy, an expunge with a negative amount) appends
a row to ``inbox_usage_deltas``, a table nobody updates, and
:func:`fold` (agentpost.jobs.usage_fold, on a timer) moves them into the column. The
exact use is always the column plus the rows not yet folded, read in one statement
(one snapshot), so it never depends on when the fold last ran.

Quota: a write that must stay within a quota (IMAP APPEND, COPY) takes the inbox's
advisory lock before it reads the use, so such writers are exact among themselves. MX
deliveries check fullness at RCPT only (one recipient's quota must not fail a message
for the others) and are only counted, as before: those in flight while the inbox fills
can take it past the quota by at most what they carry (sessions x message size).
"""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn

#: Seed of the advisory-lock key space of the quota check (blobs use 7).
_QUOTA_LOCK_SEED = 24
#: One advisory key for "a fold is running" (any process, any database user).
FOLD_LOCK_KEY = 0x0A9E_5024


def used_sql(alias: str) -> str:
    """SQL for the exact use of the inbox row ``alias`` (the fold plus pending deltas)."""
    return (f"GREATEST({alias}.used_bytes + COALESCE((SELECT sum(d.bytes) "
            f"FROM inbox_usage_deltas d WHERE d.org_id = {alias}.org_id "
            f"AND d.inbox_id = {alias}.id), 0), 0)::bigint")


def quota_lock_sql() -> str:
    """Statement (params: inbox id) serialising quota-checked writes to one inbox.
    It must run as its own statement BEFORE the check, so that the check's snapshot
    is taken after the lock was granted and sees the previous holder's delta."""
    return f"SELECT pg_advisory_xact_lock(hashtextextended(%s, {_QUOTA_LOCK_SEED}))"


def charge_cte_sql() -> str:
    """A data-modifying CTE body appending one delta if it fits the quota; RETURNING 1.

    Params: org_id, inbox_id, bytes, created_at, org_id, inbox_id, quota, bytes, quota.
    No row (nothing written) when the inbox is gone or the quota would be passed."""
    return ("INSERT INTO inbox_usage_deltas (org_id, inbox_id, bytes, created_at) "
            "SELECT %s, %s, %s, %s FROM inboxes i WHERE i.org_id = %s AND i.id = %s "
            f"AND (%s = 0 OR {used_sql('i')} + %s <= %s) RETURNING 1")


def charge_params(org_id: str, inbox_id: str, size: int, quota: int, now: Any) -> list[Any]:
    """The parameters of :func:`charge_cte_sql`."""
    return [org_id, inbox_id, size, now, org_id, inbox_id, quota, size, quota]


def charge_sql(org_id: str, inbox_id: str, size: int, quota: int,
               now: Any) -> tuple[str, list[Any]]:
    """:func:`charge` as (sql, params), for a caller that sends other statements ahead
    of it in the same round trip: its result (``n``: 1 charged, 0 refused) is the
    last statement's. With a quota, the lock is a statement of its own before the check
    (see :func:`quota_lock_sql`), which a multi-statement message keeps."""
    sql = f"WITH q AS ({charge_cte_sql()}) SELECT count(*) AS n FROM q"
    params = charge_params(org_id, inbox_id, size, quota, now)
    if quota:
        sql = quota_lock_sql() + "; " + sql
        params = [inbox_id, *params]
    return sql, params


async def charge(txn: Txn, org_id: str, inbox_id: str, size: int, quota: int = 0) -> bool:
    """Add ``size`` bytes to an inbox's use; False (nothing changed) if that would pass
    ``quota`` (0: no limit, and no lock)."""
    return bool(await txn.fetchval(*charge_sql(org_id, inbox_id, size, quota, txn.now)))


def release_sql(freed_bytes: dict[str, int], org_id: str, now: Any) -> tuple[str, list[Any]]:
    """ONE statement giving inboxes bytes back (negative deltas), or "" if none."""
    if not freed_bytes:
        return "", []
    rows = ", ".join(["(%s, %s, %s, %s)"] * len(freed_bytes))
    params: list[Any] = []
    for inbox_id in sorted(freed_bytes):
        params += [org_id, inbox_id, -freed_bytes[inbox_id], now]
    return (f"INSERT INTO inbox_usage_deltas (org_id, inbox_id, bytes, created_at) "
            f"VALUES {rows}", params)


async def inbox_usage(txn: Txn, org_id: str, inbox_id: str) -> int:
    """Bytes an inbox's messages take, exactly (IMAP QUOTA, the API)."""
    used = await txn.fetchval(
        f"SELECT {used_sql('i')} FROM inboxes i WHERE i.org_id = %s AND i.id = %s",
        (org_id, inbox_id))
    return int(used or 0)


async def fold(txn: Txn) -> int | None:
    """Move every committed delta into ``inboxes.used_bytes``; the number of deltas
    folded, or None when another process is folding (it will do the same work).

    One statement: readers see the deltas or the column, never both or neither. All
    visible deltas of an inbox are folded together, so the clamp at 0 (a use that
    drifted below zero) never sees a negative amount without its positive one."""
    if not await txn.fetchval("SELECT pg_try_advisory_xact_lock(%s)", (FOLD_LOCK_KEY,)):
        return None
    n = await txn.fetchval(
        "WITH d AS (DELETE FROM inbox_usage_deltas RETURNING org_id, inbox_id, bytes), "
        "s AS (SELECT org_id, inbox_id, sum(bytes)::bigint AS n, count(*) AS c "
        "      FROM d GROUP BY org_id, inbox_id), "
        "u AS (UPDATE inboxes i SET used_bytes = GREATEST(i.used_bytes + s.n, 0) "
        "      FROM s WHERE i.org_id = s.org_id AND i.id = s.inbox_id RETURNING 1) "
        "SELECT COALESCE(sum(c), 0)::bigint FROM s")
    return int(n or 0)


async def vacuum(txn: Txn) -> None:
    """VACUUM the deltas table (outside any transaction: Database.run_read). Every fold
    deletes what deliveries appended, so the table is a queue: without this its dead
    rows stayed until autovacuum's next visit (up to a minute, autovacuum_naptime), and
    each quota check's sum of an inbox's pending deltas read them all -- ~1 ms per IMAP
    APPEND after a burst. The table holds a few seconds of deliveries, so this is cheap;
    SKIP_LOCKED leaves it to whoever is already vacuuming it."""
    await txn.fetchall("VACUUM (SKIP_LOCKED) inbox_usage_deltas")
