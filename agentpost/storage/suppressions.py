"""The suppression list (migration 0020): one row per (organization, address).

Addresses arrive here already normalized (core.suppressions.normalize_address).
Environment-confined readers see the entries caused by mail of their environments and
the organization-wide ones (manual entries, environment_id NULL).
"""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn

_COLS = "id, email, reason, environment_id, source_message_id, diagnostic, created_at"


def _visible(env_ids: frozenset[str] | None) -> tuple[str, list[Any]]:
    if env_ids is None:
        return "", []
    return " AND (environment_id IS NULL OR environment_id = ANY(%s))", [sorted(env_ids)]


async def add(txn: Txn, row: dict[str, Any]) -> dict[str, Any] | None:
    """Insert an entry; None when the address is already suppressed (the first reason
    is kept: it is the one that explains the list entry)."""
    cols = list(row)
    return await txn.fetchone(
        f"INSERT INTO suppressions ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
        f" ON CONFLICT (org_id, email) DO NOTHING RETURNING {_COLS}", list(row.values()))


async def is_suppressed(txn: Txn, org_id: str, email: str) -> bool:
    """Whether ``email`` is on the organization's list (every environment's entries
    count: the list protects the organization's sending reputation as a whole)."""
    return bool(await txn.fetchval(
        "SELECT 1 FROM suppressions WHERE org_id = %s AND email = %s", (org_id, email)))


async def get(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
              email: str) -> dict[str, Any] | None:
    """One entry, if visible."""
    env_sql, env_params = _visible(env_ids)
    return await txn.fetchone(
        f"SELECT {_COLS} FROM suppressions WHERE org_id = %s AND email = %s{env_sql}",
        (org_id, email, *env_params))


async def list_entries(txn: Txn, org_id: str, env_ids: frozenset[str] | None, *,
                       email: str | None, after_id: str | None,
                       limit: int) -> list[dict[str, Any]]:
    """Entries newest first, optionally only one address."""
    env_sql, env_params = _visible(env_ids)
    return await txn.fetchall(
        f"SELECT {_COLS} FROM suppressions WHERE org_id = %s{env_sql} "
        "AND (%s::text IS NULL OR email = %s) AND (%s::text IS NULL OR id < %s) "
        "ORDER BY id DESC LIMIT %s",
        (org_id, *env_params, email, email, after_id, after_id, limit))


async def remove(txn: Txn, org_id: str, email: str) -> bool:
    """Delete an entry; False when there was none."""
    return await txn.execute("DELETE FROM suppressions WHERE org_id = %s AND email = %s",
                             (org_id, email)) == 1
