"""Reading the event log (the ``events`` outbox of migration 0002, ordered by 0025).

Rows are written by storage.mail.insert_event in the transaction of the change they
describe. Paging is by (txid, seq) -- the writing transaction's id, then insert order
-- and only rows written by transactions older than every transaction still running
are returned (``txid < pg_snapshot_xmin(pg_current_snapshot())``), so a row can never
commit *behind* a cursor a reader already holds. Ids (ULIDs) are roughly time-ordered
but not commit-ordered, which is why they are not the paging key. See migration 0025
and docs/events.md.
"""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn

_COLS = "id, org_id, environment_id, inbox_id, type, data, created_at"
_SAFE = "txid < pg_snapshot_xmin(pg_current_snapshot())"


def _env_clause(env_ids: frozenset[str] | None) -> tuple[str, list[Any]]:
    # An environment-confined reader sees only its environments' events (not the
    # organization-wide ones, environment_id NULL).
    if env_ids is None:
        return "", []
    return " AND environment_id = ANY(%s)", [sorted(env_ids)]


async def events_after(txn: Txn, org_id: str, env_ids: frozenset[str] | None, *,
                       after: str | None, types: list[str] | None, inbox_id: str | None,
                       limit: int) -> list[dict[str, Any]]:
    """Events of an organization after the cursor event ``after`` (None: from the start
    of retention), oldest first, filtered, at most ``limit`` rows.

    A cursor whose row is gone (swept by retention, or never this organization's)
    falls back to id order: everything with a larger id, which at worst repeats a few
    events (delivery is at-least-once; clients dedupe by id)."""
    env_sql, env_params = _env_clause(env_ids)
    where = [f"org_id = %s{env_sql}", _SAFE]
    params: list[Any] = [org_id, *env_params]
    if after is not None:
        where.append(
            "(CASE WHEN c.c_txid IS NULL THEN id > %s ELSE (txid, seq) > (c.c_txid, c.c_seq) END)")
        params.append(after)
    if types:
        where.append("type = ANY(%s)")
        params.append(list(types))
    if inbox_id is not None:
        where.append("inbox_id = %s")
        params.append(inbox_id)
    cursor = ("LEFT JOIN (SELECT txid AS c_txid, seq AS c_seq FROM events "
              "WHERE org_id = %s AND id = %s) c ON true " if after is not None else "")
    cursor_params = [org_id, after] if after is not None else []
    return await txn.fetchall(
        f"SELECT {', '.join('e.' + c for c in _COLS.split(', '))} FROM events e {cursor}"
        f"WHERE {' AND '.join(where)} ORDER BY txid, seq LIMIT %s",
        (*cursor_params, *params, limit))


async def events_by_ids(txn: Txn, ids: list[str]) -> list[dict[str, Any]]:
    """The events with these ids, in log order, whatever their organization: callers
    (the live WebSocket fan-out, the webhook worker) hold ids from a NOTIFY or a queue
    row and apply their own organization/environment filter to ``org_id`` and
    ``environment_id``. Not gated by the commit-order bound: a notified id has
    committed."""
    if not ids:
        return []
    return await txn.fetchall(
        f"SELECT {_COLS} FROM events WHERE id = ANY(%s) ORDER BY txid, seq", (list(ids),))


async def sweep(txn: Txn, before: Any, limit: int) -> int:
    """Delete up to ``limit`` events created before ``before`` (retention.events), and
    webhook deliveries of the same age; returns how many events went."""
    await txn.execute(
        "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries "
        "WHERE created_at < %s AND status <> 'pending' LIMIT %s)", (before, limit))
    return await txn.execute(
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < %s "
        "LIMIT %s)", (before, limit))
