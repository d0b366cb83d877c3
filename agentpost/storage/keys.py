"""API keys and admin keys. Only SHA-256 digests of secrets ever reach the database."""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn

_KEY_COLS = """k.id, k.org_id, k.name, k.display_prefix, k.role, k.scopes, k.env_restricted,
  k.created_by_type, k.created_by_id, k.created_at, k.expires_at, k.revoked_at, k.last_used_at,
  ARRAY(SELECT e.environment_id FROM api_key_environments e
        WHERE e.org_id = k.org_id AND e.api_key_id = k.id ORDER BY 1) AS environment_ids"""


async def authenticate_api_key(txn: Txn, digest: bytes) -> dict[str, Any] | None:
    """The live key with this digest, joined with its organization's tier.

    Read on every request, never cached, so a revocation or expiry is effective on
    the very next request in every process.
    """
    return await txn.fetchone(
        f"SELECT {_KEY_COLS}, o.tier FROM api_keys k JOIN organizations o ON o.id = k.org_id "
        "WHERE k.secret_sha256 = %s AND k.revoked_at IS NULL "
        "AND (k.expires_at IS NULL OR k.expires_at > %s)",
        (digest, txn.now),
    )


async def insert_api_key(txn: Txn, *, org_id: str, key_id: str, name: str, display_prefix: str,
                         digest: bytes, role: str, scopes: list[str],
                         environment_ids: list[str] | None, created_by: tuple[str, str],
                         expires_at: Any) -> dict[str, Any]:
    """Store a new key (its digest only) and its environment restriction."""
    await txn.execute(
        "INSERT INTO api_keys (org_id, id, name, display_prefix, secret_sha256, role, scopes, "
        "env_restricted, created_by_type, created_by_id, created_at, expires_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (org_id, key_id, name, display_prefix, digest, role, sorted(scopes),
         environment_ids is not None, created_by[0], created_by[1], txn.now, expires_at),
    )
    for env_id in environment_ids or ():
        await txn.execute(
            "INSERT INTO api_key_environments (org_id, api_key_id, environment_id) "
            "VALUES (%s, %s, %s)",
            (org_id, key_id, env_id),
        )
    return await get_api_key(txn, org_id, key_id)


async def get_api_key(txn: Txn, org_id: str, key_id: str) -> dict[str, Any] | None:
    """One key of the organization (never its secret)."""
    return await txn.fetchone(
        f"SELECT {_KEY_COLS} FROM api_keys k WHERE k.org_id = %s AND k.id = %s", (org_id, key_id)
    )


async def list_api_keys(txn: Txn, org_id: str, after_id: str | None,
                        limit: int) -> list[dict[str, Any]]:
    """Keys of the organization, newest first."""
    return await txn.fetchall(
        f"SELECT {_KEY_COLS} FROM api_keys k WHERE k.org_id = %s "
        "AND (%s::text IS NULL OR k.id < %s) ORDER BY k.id DESC LIMIT %s",
        (org_id, after_id, after_id, limit),
    )


async def revoke_api_key(txn: Txn, org_id: str, key_id: str) -> bool:
    """Mark a key revoked; True when it exists in this organization."""
    return await txn.execute(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, %s) WHERE org_id = %s AND id = %s",
        (txn.now, org_id, key_id),
    ) == 1


async def touch_api_key(txn: Txn, org_id: str, key_id: str) -> None:
    """Record use, at most about once a minute per key (callers throttle)."""
    await txn.execute(
        "UPDATE api_keys SET last_used_at = %s WHERE org_id = %s AND id = %s",
        (txn.now, org_id, key_id),
    )


async def insert_admin_key(txn: Txn, key_id: str, name: str, display_prefix: str,
                           digest: bytes) -> dict[str, Any]:
    """Store a new admin key digest."""
    return await txn.fetchone(
        "INSERT INTO admin_keys (id, name, display_prefix, secret_sha256, created_at) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id, name, display_prefix, created_at",
        (key_id, name, display_prefix, digest, txn.now),
    )


async def authenticate_admin_key(txn: Txn, digest: bytes) -> dict[str, Any] | None:
    """The live admin key with this digest."""
    return await txn.fetchone(
        "SELECT id, name FROM admin_keys WHERE secret_sha256 = %s AND revoked_at IS NULL",
        (digest,),
    )
