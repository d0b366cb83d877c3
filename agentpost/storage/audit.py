"""The audit trail."""

from __future__ import annotations

from typing import Any

from psycopg2.extras import Json

from agentpost.storage.database import Txn

_COLS = ("id, occurred_at, org_id, environment_id, actor_type, actor_id, action, target_id, "
         "outcome, status, remote_addr, request_id, details")
_FIELDS = [c.strip() for c in _COLS.split(",")]


async def insert_audit_rows(txn: Txn, rows: list[dict[str, Any]]) -> None:
    """Insert many rows in one statement (txpostgres has no executemany)."""
    if not rows:
        return
    placeholders = ", ".join(["(" + ", ".join(["%s"] * len(_FIELDS)) + ")"] * len(rows))
    params: list[Any] = []
    for row in rows:
        for name in _FIELDS:
            value = row.get(name)
            params.append(Json(value or {}) if name == "details" else value)
    await txn.execute(f"INSERT INTO audit_log ({_COLS}) VALUES {placeholders}", params)


async def list_audit(txn: Txn, org_id: str, *, env_ids: frozenset[str] | None,
                     actor_id: str | None, action: str | None, since: Any, until: Any,
                     after_id: str | None, limit: int) -> list[dict[str, Any]]:
    """Audit rows of one organization, newest first, filtered."""
    envs = None if env_ids is None else sorted(env_ids)
    return await txn.fetchall(
        f"SELECT {_COLS} FROM audit_log WHERE org_id = %s "
        "AND (%s::text[] IS NULL OR environment_id IS NULL OR environment_id = ANY(%s)) "
        "AND (%s::text IS NULL OR actor_id = %s) "
        "AND (%s::text IS NULL OR action = %s OR action LIKE %s) "
        "AND (%s::timestamptz IS NULL OR occurred_at >= %s) "
        "AND (%s::timestamptz IS NULL OR occurred_at < %s) "
        "AND (%s::text IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (org_id, envs, envs, actor_id, actor_id, action, action,
         (action or "").rstrip("*") + "%" if action and action.endswith("*") else action,
         since, since, until, until, after_id, after_id, limit),
    )
