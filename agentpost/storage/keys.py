"""API keys and admin keys. Only SHA-256 digests of secrets ever reach the database."""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn

#: LISTEN/NOTIFY channel: the payload is the id of a key that was revoked or whose
#: power may have changed; listeners re-read the key (a wake-up, never the news itself).
KEY_CHANNEL = "agentpost_key_changed"

_KEY_COLS = """k.id, k.org_id, k.name, k.display_prefix, k.role, k.scopes, k.env_restricted,
  k.created_by_type, k.created_by_id, k.user_id, k.created_at, k.expires_at, k.revoked_at,
  k.last_used_at, ARRAY(SELECT e.environment_id FROM api_key_environments e
        WHERE e.org_id = k.org_id AND e.api_key_id = k.id ORDER BY 1) AS environment_ids"""


# What the key's holder is *now*: their organization role, their environment roles,
# and (for holder-less "owner seat" keys) whether the organization has an owner person.
# auth.cred.principal_from_key turns these into the key's effective power.
_HOLDER_COLS = """m.role AS holder_role,
  COALESCE((SELECT json_object_agg(em.environment_id, em.role) FROM env_memberships em
            WHERE em.org_id = k.org_id AND em.user_id = k.user_id),
           '{}'::json) AS holder_environments,
  EXISTS (SELECT 1 FROM org_memberships w
          WHERE w.org_id = k.org_id AND w.role = 'owner') AS org_has_owner"""


async def authenticate_api_key(txn: Txn, digest: bytes) -> dict[str, Any] | None:
    """The live key with this digest, its organization's tier and its holder's current roles.

    Read on every request, never cached, so a revocation, an expiry, a demotion or the
    holder's removal from the organization is effective on the very next request in
    every process. A key whose holder is no longer a member is refused here (no row),
    exactly like a revoked one: refusing is the safe default, and no later re-admission
    of the person should silently revive it (core.members revokes such keys as well).
    """
    return await txn.fetchone(
        f"SELECT {_KEY_COLS}, o.tier, {_HOLDER_COLS} "
        "FROM api_keys k JOIN organizations o ON o.id = k.org_id "
        "LEFT JOIN org_memberships m ON m.org_id = k.org_id AND m.user_id = k.user_id "
        "WHERE k.secret_sha256 = %s AND k.revoked_at IS NULL "
        "AND (k.expires_at IS NULL OR k.expires_at > %s) "
        "AND (k.user_id IS NULL OR m.user_id IS NOT NULL)",
        (digest, txn.now),
    )


async def insert_api_key(txn: Txn, *, org_id: str, key_id: str, name: str, display_prefix: str,
                         digest: bytes, role: str, scopes: list[str],
                         environment_ids: list[str] | None, created_by: tuple[str, str],
                         user_id: str | None, expires_at: Any) -> dict[str, Any]:
    """Store a new key (its digest only), its holder and its environment restriction."""
    await txn.execute(
        "INSERT INTO api_keys (org_id, id, name, display_prefix, secret_sha256, role, scopes, "
        "env_restricted, created_by_type, created_by_id, user_id, created_at, expires_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (org_id, key_id, name, display_prefix, digest, role, sorted(scopes),
         environment_ids is not None, created_by[0], created_by[1], user_id, txn.now,
         expires_at),
    )
    for env_id in environment_ids or ():
        await txn.execute(
            "INSERT INTO api_key_environments (org_id, api_key_id, environment_id) "
            "VALUES (%s, %s, %s)",
            (org_id, key_id, env_id),
        )
    row = await get_api_key(txn, org_id, key_id)
    assert row is not None  # inserted just above, in this transaction
    return row


async def get_api_key(txn: Txn, org_id: str, key_id: str) -> dict[str, Any] | None:
    """One key of the organization (never its secret)."""
    return await txn.fetchone(
        f"SELECT {_KEY_COLS} FROM api_keys k WHERE k.org_id = %s AND k.id = %s", (org_id, key_id)
    )


async def get_api_key_with_holder(txn: Txn, org_id: str, key_id: str) -> dict[str, Any] | None:
    """One key of the organization with what its holder is *now* (``_HOLDER_COLS``).

    core.api_keys ranks a key by its holder's current organization role before letting
    anyone revoke it (an admin must not cut off the owner's keys, whatever role they
    were minted with).
    """
    return await txn.fetchone(
        f"SELECT {_KEY_COLS}, {_HOLDER_COLS} FROM api_keys k "
        "LEFT JOIN org_memberships m ON m.org_id = k.org_id AND m.user_id = k.user_id "
        "WHERE k.org_id = %s AND k.id = %s",
        (org_id, key_id),
    )


async def list_api_keys(txn: Txn, org_id: str, after_id: str | None, limit: int,
                        within: list[str] | None = None) -> list[dict[str, Any]]:
    """Keys of the organization, newest first; with ``within``, only keys confined to
    some of those environments (filtered here, not after the LIMIT, so that a page of
    keys the caller may not see does not end its listing early)."""
    return await txn.fetchall(
        f"SELECT {_KEY_COLS} FROM api_keys k WHERE k.org_id = %s "
        "AND (%s::text IS NULL OR k.id < %s) "
        "AND (%s::text[] IS NULL OR (k.env_restricted AND NOT EXISTS ("
        "  SELECT 1 FROM api_key_environments e WHERE e.org_id = k.org_id "
        "  AND e.api_key_id = k.id AND e.environment_id <> ALL(%s::text[])))) "
        "ORDER BY k.id DESC LIMIT %s",
        (org_id, after_id, after_id, within, within, limit),
    )


async def revoke_api_key(txn: Txn, org_id: str, key_id: str) -> bool:
    """Mark a key revoked; True when it exists in this organization.

    Also NOTIFY :data:`KEY_CHANNEL` with the key id, delivered at COMMIT to every
    process, so their long-lived sessions on the key end within seconds
    (``agentpost.auth.sessions``).
    """
    return await txn.execute(
        "WITH revoked AS (UPDATE api_keys SET revoked_at = COALESCE(revoked_at, %s) "
        "WHERE org_id = %s AND id = %s RETURNING id) SELECT pg_notify(%s, id) FROM revoked",
        (txn.now, org_id, key_id, KEY_CHANNEL),
    ) == 1


async def notify_keys_held_by(txn: Txn, org_id: str, user_ids: list[str]) -> None:
    """NOTIFY :data:`KEY_CHANNEL` for every live key these people hold, at COMMIT.

    A key's power follows its holder's role, so a demotion or a narrower environment
    assignment changes what open sessions on those keys may do; the notice makes every
    process re-read the keys now instead of at its next periodic check.
    """
    await txn.execute(
        "SELECT pg_notify(%s, id) FROM api_keys "
        "WHERE org_id = %s AND user_id = ANY(%s) AND revoked_at IS NULL",
        (KEY_CHANNEL, org_id, user_ids),
    )


async def live_keys_held_by(txn: Txn, org_id: str, user_id: str) -> list[str]:
    """Ids of the unrevoked keys a person holds (to revoke when they leave)."""
    rows = await txn.fetchall(
        "SELECT id FROM api_keys WHERE org_id = %s AND user_id = %s AND revoked_at IS NULL "
        "ORDER BY id",
        (org_id, user_id),
    )
    return [r["id"] for r in rows]


async def touch_api_key(txn: Txn, org_id: str, key_id: str) -> None:
    """Record use, at most about once a minute per key (callers throttle)."""
    await txn.execute(
        "UPDATE api_keys SET last_used_at = %s WHERE org_id = %s AND id = %s",
        (txn.now, org_id, key_id),
    )


async def insert_admin_key(txn: Txn, key_id: str, name: str, display_prefix: str,
                           digest: bytes) -> dict[str, Any]:
    """Store a new admin key digest."""
    return await txn.fetchone_required(
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


async def org_of_key_digest(txn: Txn, digest: bytes) -> dict[str, Any] | None:
    """The organization and id of the key with this digest, live or not.

    Only to file a refused request (a revoked or expired key, a departed holder's key)
    in its organization's audit trail; never used to let anything in, and the caller
    answers exactly as for an unknown key.
    """
    return await txn.fetchone(
        "SELECT org_id, id, revoked_at, expires_at FROM api_keys WHERE secret_sha256 = %s",
        (digest,),
    )


async def live_api_keys(txn: Txn, keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The keys among ``keys`` ((org_id, key id) pairs) that are still live, read as
    :func:`authenticate_api_key` reads them; a key left out is revoked, expired, gone or
    held by someone who left. Long-lived sessions re-check their keys with this (one
    statement for all the keys of a process)."""
    return await txn.fetchall(
        f"SELECT {_KEY_COLS}, o.tier, {_HOLDER_COLS} "
        "FROM unnest(%s::text[], %s::text[]) AS wanted (org_id, id) "
        "JOIN api_keys k ON k.org_id = wanted.org_id AND k.id = wanted.id "
        "JOIN organizations o ON o.id = k.org_id "
        "LEFT JOIN org_memberships m ON m.org_id = k.org_id AND m.user_id = k.user_id "
        "WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > %s) "
        "AND (k.user_id IS NULL OR m.user_id IS NOT NULL)",
        ([org for org, _ in keys], [key for _, key in keys], txn.now),
    )
