"""Idempotency keys: claim, record the answer, release, sweep (the only SQL for them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from agentpost.storage.database import Txn

_COLS = "fingerprint, state, claim, status, response, created_at, expires_at"


async def claim(txn: Txn, org_id: str, credential_id: str, key: str, fingerprint: str,
                token: str, expires_at: datetime) -> dict[str, Any] | None:
    """Insert a pending row; None when it is ours, else the existing row (locked)."""
    inserted = await txn.fetchone(
        "INSERT INTO idempotency_keys (org_id, credential_id, key, fingerprint, state, "
        "claim, created_at, expires_at) VALUES (%s, %s, %s, %s, 'pending', %s, %s, %s) "
        "ON CONFLICT (org_id, credential_id, key) DO NOTHING RETURNING key",
        (org_id, credential_id, key, fingerprint, token, txn.now, expires_at))
    if inserted is not None:
        return None
    return await txn.fetchone(
        f"SELECT {_COLS} FROM idempotency_keys WHERE org_id = %s AND credential_id = %s "
        "AND key = %s FOR UPDATE", (org_id, credential_id, key))


async def take_over(txn: Txn, org_id: str, credential_id: str, key: str, fingerprint: str,
                    token: str, expires_at: datetime) -> None:
    """Make an expired or abandoned row a fresh pending claim of ours."""
    await txn.execute(
        "UPDATE idempotency_keys SET fingerprint = %s, state = 'pending', claim = %s, "
        "status = NULL, response = NULL, created_at = %s, expires_at = %s "
        "WHERE org_id = %s AND credential_id = %s AND key = %s",
        (fingerprint, token, txn.now, expires_at, org_id, credential_id, key))


async def record(txn: Txn, org_id: str, credential_id: str, key: str, token: str,
                 status: int, response: Any) -> bool:
    """Our pending claim becomes the stored answer; False when it is no longer ours."""
    done = await txn.execute(
        "UPDATE idempotency_keys SET state = 'done', status = %s, response = %s "
        "WHERE org_id = %s AND credential_id = %s AND key = %s AND claim = %s "
        "AND state = 'pending'",
        (status, Json(response), org_id, credential_id, key, token))
    return done == 1


async def release(txn: Txn, org_id: str, credential_id: str, key: str, token: str) -> None:
    """Forget our pending claim (the request failed; a retry may run again)."""
    await txn.execute(
        "DELETE FROM idempotency_keys WHERE org_id = %s AND credential_id = %s AND key = %s "
        "AND claim = %s AND state = 'pending'", (org_id, credential_id, key, token))


async def delete_expired(txn: Txn, now: datetime, batch: int) -> int:
    """Delete up to ``batch`` rows past their 24 hours."""
    return await txn.execute(
        "DELETE FROM idempotency_keys WHERE ctid IN (SELECT ctid FROM idempotency_keys "
        "WHERE expires_at < %s LIMIT %s)", (now, batch))
