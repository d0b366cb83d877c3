"""The audit trail."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from agentpost.storage.database import Txn

try:
    import ujson
except ImportError:  # pragma: no cover - a dependency of autobahn
    ujson = None  # type: ignore[assignment]

_COLS = ("id, occurred_at, org_id, environment_id, actor_type, actor_id, action, target_id, "
         "outcome, status, remote_addr, request_id, details")
_FIELDS = [c.strip() for c in _COLS.split(",")]


def audit_insert_sql(rows: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    """The INSERT for ``rows`` (at least one) and its parameters, for callers that send it
    in the same round trip as another statement (a delivery's event, see storage.mail)."""
    placeholders = ", ".join(["(" + ", ".join(["%s"] * len(_FIELDS)) + ")"] * len(rows))
    params: list[Any] = []
    for row in rows:
        for name in _FIELDS:
            value = row.get(name)
            params.append(Json(value or {}) if name == "details" else value)
    return f"INSERT INTO audit_log ({_COLS}) VALUES {placeholders}", params


async def insert_audit_rows(txn: Txn, rows: list[dict[str, Any]]) -> None:
    """Insert many rows in one statement (txpostgres has no executemany)."""
    if not rows:
        return
    sql, params = audit_insert_sql(rows)
    await txn.execute(sql, params)


#: The buffered rows' COMMIT does not wait for the WAL flush (about a millisecond of
#: fsync, more under load, with a pool connection held the whole time; one per slice).
#: They are rows of reads and refusals that were held in memory for up to a flush
#: interval already, so the exposure barely changes: a PostgreSQL crash can lose the
#: last few hundred milliseconds of them (wal_writer_delay), as an agentpost crash
#: loses its unflushed buffer. Rows of changes commit with their change, synchronously.
_ASYNC_COMMIT = "SET LOCAL synchronous_commit TO OFF; "
_BATCH_SQL = (f"INSERT INTO audit_log ({_COLS}) SELECT {_COLS} "
              "FROM json_populate_recordset(NULL::audit_log, %s::json)")


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


if ujson is not None:
    def _batch_json(rows: list[dict[str, Any]]) -> str:
        # The timestamp of every row is made text first: ujson's ``default`` hook costs
        # more per call than the stdlib's, and then writes a batch in a fifth of the time
        # (0.5 instead of 1.1-1.9 ms per 250 rows, a stall of the event loop every flush).
        return str(ujson.dumps(
            [{**row, "occurred_at": _json_value(row["occurred_at"])}
             if isinstance(row.get("occurred_at"), datetime) else row for row in rows],
            default=_json_value, escape_forward_slashes=False))
else:  # pragma: no cover - ujson comes with autobahn
    _batch_json = json.JSONEncoder(separators=(",", ":"), default=_json_value).encode


async def insert_audit_batch(txn: Txn, rows: list[dict[str, Any]]) -> None:
    """Insert the buffered rows as ONE JSON parameter (``json_populate_recordset``).

    The same rows as :func:`insert_audit_rows`, for the batches of the audit buffer:
    one C-level ``json.dumps`` instead of psycopg2 quoting thirteen values per row,
    and one parameter for PostgreSQL to parse instead of a VALUES list of thousands
    of literals. The rows must be storable (``core.audit.scrub_row``): no NUL, no lone
    surrogate; timestamps go as RFC 3339 text with their offset.
    """
    if not rows:
        return
    sql, params = audit_batch_sql(rows)
    await txn.execute(_ASYNC_COMMIT + sql, params)


def audit_batch_sql(rows: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    """:func:`insert_audit_batch`'s statement and parameter, for callers that send it in
    another round trip (a group-commit batch's rows: storage.copy_rows). Keys other than
    the columns are ignored, missing ones are NULL; raises TypeError or ValueError for a
    value JSON cannot carry."""
    return _BATCH_SQL, [_batch_json([{**row, "details": row.get("details") or {}}
                                     for row in rows])]


def _prefix_pattern(action: str | None) -> str | None:
    """The LIKE pattern of an ``inboxes.*`` filter, its text escaped; None (matching
    nothing) for an exact filter. An exact filter used to be a LIKE pattern too: ``%``
    and ``_`` matched anything and a trailing backslash failed the statement (400)."""
    if not action or not action.endswith("*"):
        return None
    prefix = action.rstrip("*")
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def list_audit(txn: Txn, org_id: str, *, env_ids: frozenset[str] | None,
                     actor_id: str | None, action: str | None, since: Any, until: Any,
                     after_id: str | None, limit: int,
                     own_actor_id: str | None = None) -> list[dict[str, Any]]:
    """Audit rows of one organization, newest first, filtered.

    Environment-confined readers (``env_ids`` set) see their environments' rows and,
    of the organization-level rows (no environment: members, keys, refusals), only
    their own (``own_actor_id``): the rest describe other people's credentials.
    """
    envs = None if env_ids is None else sorted(env_ids)
    return await txn.fetchall(
        f"SELECT {_COLS} FROM audit_log WHERE org_id = %s "
        "AND (%s::text[] IS NULL OR environment_id = ANY(%s) "
        "     OR (environment_id IS NULL AND actor_id = %s)) "
        "AND (%s::text IS NULL OR actor_id = %s) "
        "AND (%s::text IS NULL OR action = %s OR action LIKE %s) "
        "AND (%s::timestamptz IS NULL OR occurred_at >= %s) "
        "AND (%s::timestamptz IS NULL OR occurred_at < %s) "
        "AND (%s::text IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (org_id, envs, envs, own_actor_id, actor_id, actor_id, action, action,
         _prefix_pattern(action),
         since, since, until, until, after_id, after_id, limit),
    )
