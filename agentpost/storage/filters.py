"""Receive and send filter rules (allow/block by address, domain or subdomain)."""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn
from agentpost.storage.mail import env_clause

_RULE_COLS = ("id, org_id, environment_id, inbox_id, direction, action, match_type, value, "
              "created_at")


async def insert_rule(txn: Txn, row: dict[str, Any]) -> dict[str, Any]:
    """Store a filter rule."""
    cols = list(row)
    return await txn.fetchone_required(
        f"INSERT INTO filter_rules ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
        f" RETURNING {_RULE_COLS}", list(row.values()))


async def list_rules(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                     after_id: str | None, limit: int) -> list[dict[str, Any]]:
    """Rules newest first."""
    env_sql, env_params = env_clause(env_ids)
    return await txn.fetchall(
        f"SELECT {_RULE_COLS} FROM filter_rules WHERE org_id = %s{env_sql} "
        "AND (%s::text IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (org_id, *env_params, after_id, after_id, limit))


async def get_rule(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                   rule_id: str) -> dict[str, Any] | None:
    """One rule."""
    env_sql, env_params = env_clause(env_ids)
    return await txn.fetchone(
        f"SELECT {_RULE_COLS} FROM filter_rules WHERE org_id = %s AND id = %s{env_sql}",
        (org_id, rule_id, *env_params))


async def delete_rule(txn: Txn, org_id: str, rule_id: str) -> bool:
    """Remove a rule."""
    return await txn.execute("DELETE FROM filter_rules WHERE org_id = %s AND id = %s",
                             (org_id, rule_id)) == 1
