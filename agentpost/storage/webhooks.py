"""Webhook endpoints and their delivery queue (migration 0025).

Deliveries are created by the ``events_webhook_fanout`` trigger in each event's own
transaction; workers in any process claim due ones with ``FOR UPDATE SKIP LOCKED`` and
a lease, and record each attempt fenced by its attempt number, so an attempt that
outlived its lease cannot overwrite a newer one. Each recorded attempt also becomes a
``webhook_attempts`` row (migration 0027) in the same statement, so a delivery's history
survives its next attempt.

Environment-confined principals see only endpoints whose environment filter lies
within their environments (an endpoint with no filter sees every environment's events,
so it is organization-wide).
"""

from __future__ import annotations

from typing import Any

from psycopg2.extras import Json

from agentpost.storage.database import Txn

#: Notified by the fan-out trigger when an event created deliveries (migration 0030).
WAKEUP_CHANNEL = "agentpost_webhooks"

_COLS = ("id, url, description, event_types, inbox_id, environment_ids, enabled, "
         "consecutive_failures, disabled_reason, previous_expires_at, created_at, "
         "updated_at")
_DCOLS = ("id, webhook_id, event_id, event_type, status, attempt, next_attempt_at, "
          "status_code, latency_ms, error, created_at, updated_at, "
          "(SELECT count(*) FROM webhook_attempts a WHERE a.org_id = webhook_deliveries.org_id "
          "AND a.delivery_id = webhook_deliveries.id)::int AS attempts")
_ACOLS = ("seq::text AS cursor, delivery_id, webhook_id, attempt, started_at, status_code, "
          "latency_ms, error, response_excerpt, next_retry_at")
ERROR_CAP = 500  # characters of an attempt's error text kept (the column's CHECK)
EXCERPT_CAP = 256  # characters of an answer's body kept with its attempt


def _visible(env_ids: frozenset[str] | None) -> tuple[str, list[Any]]:
    if env_ids is None:
        return "", []
    return " AND environment_ids IS NOT NULL AND environment_ids <@ %s", [sorted(env_ids)]


async def insert(txn: Txn, row: dict[str, Any]) -> dict[str, Any]:
    """Create an endpoint."""
    cols = list(row)
    return await txn.fetchone_required(
        f"INSERT INTO webhooks ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
        f"RETURNING {_COLS}", list(row.values()))


async def count(txn: Txn, org_id: str) -> int:
    """How many endpoints the organization has (under a transaction-scoped advisory lock
    per organization, so two concurrent creations cannot both pass the cap)."""
    await txn.execute("SELECT pg_advisory_xact_lock(hashtext('webhooks:' || %s))",
                      (org_id,))
    return int(await txn.fetchval("SELECT count(*) FROM webhooks WHERE org_id = %s",
                                  (org_id,)))


async def get(txn: Txn, org_id: str, env_ids: frozenset[str] | None, webhook_id: str, *,
              lock: bool = False) -> dict[str, Any] | None:
    """One endpoint, if visible."""
    env_sql, env_params = _visible(env_ids)
    return await txn.fetchone(
        f"SELECT {_COLS}, secret_sealed, previous_secret_sealed FROM webhooks "
        f"WHERE org_id = %s AND id = %s{env_sql}{' FOR UPDATE' if lock else ''}",
        (org_id, webhook_id, *env_params))


async def list_webhooks(txn: Txn, org_id: str, env_ids: frozenset[str] | None, *,
                        after_id: str | None, limit: int) -> list[dict[str, Any]]:
    """Endpoints, newest first."""
    env_sql, env_params = _visible(env_ids)
    return await txn.fetchall(
        f"SELECT {_COLS} FROM webhooks WHERE org_id = %s{env_sql} "
        "AND (%s::text IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (org_id, *env_params, after_id, after_id, limit))


async def update(txn: Txn, org_id: str, webhook_id: str,
                 changes: dict[str, Any]) -> dict[str, Any]:
    """Apply column changes to a row the caller has locked; returns the new row."""
    sets = ", ".join(f"{k} = %s" for k in changes)
    return await txn.fetchone_required(
        f"UPDATE webhooks SET {sets} WHERE org_id = %s AND id = %s RETURNING {_COLS}",
        (*changes.values(), org_id, webhook_id))


async def delete(txn: Txn, org_id: str, webhook_id: str) -> None:
    """Delete an endpoint (its deliveries go with it)."""
    await txn.execute("DELETE FROM webhooks WHERE org_id = %s AND id = %s",
                      (org_id, webhook_id))


async def list_deliveries(txn: Txn, org_id: str, webhook_id: str, *, after_id: str | None,
                          limit: int) -> list[dict[str, Any]]:
    """Deliveries of one endpoint (the caller checked it is visible), newest first."""
    return await txn.fetchall(
        f"SELECT {_DCOLS} FROM webhook_deliveries WHERE org_id = %s AND webhook_id = %s "
        "AND (%s::text IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (org_id, webhook_id, after_id, after_id, limit))


async def replay(txn: Txn, org_id: str, webhook_id: str,
                 delivery_id: str) -> dict[str, Any] | None:
    """Queue a finished delivery again, due now, with a fresh attempt schedule."""
    return await txn.fetchone(
        "UPDATE webhook_deliveries SET status = 'pending', attempt = 0, lease_until = NULL, "
        "next_attempt_at = %s, updated_at = %s WHERE org_id = %s AND webhook_id = %s "
        f"AND id = %s AND status <> 'pending' RETURNING {_DCOLS}",
        (txn.now, txn.now, org_id, webhook_id, delivery_id))


async def get_delivery(txn: Txn, org_id: str, webhook_id: str,
                       delivery_id: str) -> dict[str, Any] | None:
    """One delivery of an endpoint."""
    return await txn.fetchone(
        f"SELECT {_DCOLS} FROM webhook_deliveries WHERE org_id = %s AND webhook_id = %s "
        "AND id = %s", (org_id, webhook_id, delivery_id))


async def insert_ping(txn: Txn, *, org_id: str, delivery_id: str, webhook_id: str,
                      payload: dict[str, Any]) -> None:
    """A test ping, due now (its body is kept in ``payload``: no event row)."""
    await txn.execute(
        "INSERT INTO webhook_deliveries (org_id, id, webhook_id, event_id, event_type, "
        "payload, next_attempt_at, created_at, updated_at) "
        "VALUES (%s, %s, %s, NULL, 'webhook.test', %s, %s, %s, %s)",
        (org_id, delivery_id, webhook_id, Json(payload), txn.now, txn.now, txn.now))


async def claim_due(txn: Txn, *, lease_until: Any, limit: int) -> list[dict[str, Any]]:
    """Take up to ``limit`` due deliveries of enabled endpoints for one attempt each:
    rows another process is claiming are skipped, and the lease keeps them ours."""
    return await txn.fetchall(
        "UPDATE webhook_deliveries d SET attempt = d.attempt + 1, lease_until = %s, "
        "updated_at = %s FROM webhooks w WHERE w.org_id = d.org_id AND w.id = d.webhook_id "
        "AND d.id IN (SELECT d2.id FROM webhook_deliveries d2 JOIN webhooks w2 "
        "ON w2.org_id = d2.org_id AND w2.id = d2.webhook_id AND w2.enabled "
        "WHERE d2.status = 'pending' AND d2.next_attempt_at <= %s "
        "AND (d2.lease_until IS NULL OR d2.lease_until <= %s) "
        "ORDER BY d2.next_attempt_at LIMIT %s FOR UPDATE OF d2 SKIP LOCKED) "
        "RETURNING d.id, d.org_id, d.webhook_id, d.event_id, d.event_type, d.payload, "
        "d.attempt, w.url, w.secret_sealed, w.previous_secret_sealed, w.previous_expires_at",
        (lease_until, txn.now, txn.now, txn.now, limit))


async def next_due(txn: Txn) -> Any:
    """When the earliest pending delivery of an enabled endpoint is due (None: none)."""
    return await txn.fetchval(
        "SELECT min(greatest(d.next_attempt_at, coalesce(d.lease_until, d.next_attempt_at))) "
        "FROM webhook_deliveries d JOIN webhooks w ON w.org_id = d.org_id "
        "AND w.id = d.webhook_id AND w.enabled WHERE d.status = 'pending'")


def _text(value: str | None, cap: int) -> str | None:
    """Text PostgreSQL can store (no NUL) within ``cap`` characters."""
    return None if value is None else value.replace("\x00", "\ufffd")[:cap]


async def record_attempt(txn: Txn, delivery: dict[str, Any], *, ok: bool,
                         final: bool, retry_at: Any, started_at: Any,
                         status_code: int | None, latency_ms: int, error: str | None,
                         excerpt: str | None) -> bool:
    """Store one attempt's outcome on its delivery and as a row of its history, in one
    statement, fenced by its attempt number (False: the lease was lost and a newer
    attempt owns the row; nothing changed)."""
    status = "succeeded" if ok else ("failed" if final else "pending")
    error = _text(error, ERROR_CAP)
    changed = await txn.execute(
        "WITH d AS (UPDATE webhook_deliveries SET status = %s, lease_until = NULL, "
        "next_attempt_at = coalesce(%s, next_attempt_at), status_code = %s, "
        "latency_ms = %s, error = %s, updated_at = %s "
        "WHERE id = %s AND attempt = %s AND status = 'pending' "
        "RETURNING org_id, id, webhook_id, attempt) "
        "INSERT INTO webhook_attempts (org_id, delivery_id, webhook_id, attempt, started_at, "
        "status_code, latency_ms, error, response_excerpt, next_retry_at) "
        "SELECT org_id, id, webhook_id, attempt, %s, %s, %s, %s, %s, %s FROM d",
        (status, retry_at, status_code, latency_ms, error, txn.now, delivery["id"],
         delivery["attempt"], started_at, status_code, latency_ms, error,
         _text(excerpt, EXCERPT_CAP), retry_at))
    return changed == 1


async def list_attempts(txn: Txn, org_id: str, delivery_id: str, *, after: str | None,
                        limit: int) -> list[dict[str, Any]]:
    """Attempts of one delivery (the caller checked it is visible), newest first;
    ``after`` is the ``cursor`` of the last row of the previous page."""
    return await txn.fetchall(
        f"SELECT {_ACOLS} FROM webhook_attempts WHERE org_id = %s AND delivery_id = %s "
        "AND (%s::bigint IS NULL OR seq < %s::bigint) ORDER BY seq DESC LIMIT %s",
        (org_id, delivery_id, after, after, limit))


async def count_outcome(txn: Txn, org_id: str, webhook_id: str, *, ok: bool,
                        disable_after: int) -> bool:
    """Count a success (resets) or failure of an endpoint; True when this failure
    disabled it."""
    if ok:
        await txn.execute(
            "UPDATE webhooks SET consecutive_failures = 0 WHERE org_id = %s AND id = %s "
            "AND consecutive_failures <> 0", (org_id, webhook_id))
        return False
    row = await txn.fetchone(
        "UPDATE webhooks SET consecutive_failures = consecutive_failures + 1, "
        "enabled = CASE WHEN consecutive_failures + 1 >= %s THEN false ELSE enabled END, "
        "disabled_reason = CASE WHEN enabled AND consecutive_failures + 1 >= %s "
        "THEN 'consecutive_failures' ELSE disabled_reason END, updated_at = %s "
        "WHERE org_id = %s AND id = %s "
        "RETURNING consecutive_failures, (SELECT enabled FROM webhooks WHERE id = %s) "
        "AS was_enabled, enabled",
        (disable_after, disable_after, txn.now, org_id, webhook_id, webhook_id))
    return bool(row and row["was_enabled"] and not row["enabled"])
