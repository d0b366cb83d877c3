"""Uploaded attachments and the server's own secrets (the only SQL for them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agentpost.storage import mail as mail_store
from agentpost.storage.database import Txn

_COLS = ("org_id, environment_id, key, filename, mime_type, declared_size, size, sha256, "
         "blob_key, created_by, created_at, url_expires_at, expires_at, used_at")


async def server_secret(txn: Txn, name: str, candidate: bytes) -> bytes:
    """The named secret, created from ``candidate`` by whichever process asks first."""
    value = await txn.fetchval(
        "WITH ins AS (INSERT INTO server_secrets (name, value, created_at) "
        "VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING value) "
        "SELECT value FROM ins UNION ALL SELECT value FROM server_secrets WHERE name = %s "
        "LIMIT 1", (name, candidate, txn.now, name))
    return bytes(value)


async def insert_upload(txn: Txn, row: dict[str, Any]) -> dict[str, Any]:
    """A new upload row (content not there yet)."""
    cols = list(row)
    return await txn.fetchone_required(
        f"INSERT INTO uploads ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
        f"RETURNING {_COLS}", [row[c] for c in cols])


async def get_by_key(txn: Txn, key: str) -> dict[str, Any] | None:
    """An upload by its key alone: only for the signed PUT, whose signature names it."""
    return await txn.fetchone(f"SELECT {_COLS} FROM uploads WHERE key = %s", (key,))


async def get_upload(txn: Txn, org_id: str, key: str, now: datetime) -> dict[str, Any] | None:
    """An organization's unexpired upload."""
    return await txn.fetchone(
        f"SELECT {_COLS} FROM uploads WHERE org_id = %s AND key = %s AND expires_at > %s",
        (org_id, key, now))


async def attach_content(txn: Txn, key: str, blob_key: str, size: int,
                         sha256: str) -> bool:
    """Record the arrived content and count a reference on its blob; False when the
    upload already has content (or is gone): nothing is referenced then."""
    row = await txn.fetchone(
        "UPDATE uploads SET blob_key = %s, size = %s, sha256 = %s "
        "WHERE key = %s AND blob_key IS NULL RETURNING key", (blob_key, size, sha256, key))
    if row is None:
        return False
    await mail_store.reference_blob(txn, blob_key, size)
    return True


async def mark_used(txn: Txn, org_id: str, keys: list[str], now: datetime) -> None:
    """Note that a send used these uploads (kept until they expire: one upload may be
    attached to several messages)."""
    await txn.execute(
        "UPDATE uploads SET used_at = %s WHERE org_id = %s AND key = ANY(%s)",
        (now, org_id, keys))


async def delete_expired(txn: Txn, now: datetime,
                         batch: int) -> tuple[int, list[str], list[tuple[str, str]]]:
    """Delete up to ``batch`` expired uploads: how many, the blob keys nobody uses any
    more (to be deleted from the store after the commit), and the (org_id, key) of those
    whose content never arrived through us (a staged object may be left to delete)."""
    rows = await txn.fetchall(
        "DELETE FROM uploads WHERE key IN (SELECT key FROM uploads WHERE expires_at < %s "
        "ORDER BY expires_at LIMIT %s) RETURNING org_id, key, blob_key", (now, batch))
    keys = [r["blob_key"] for r in rows if r["blob_key"]]
    unfilled = [(r["org_id"], r["key"]) for r in rows if not r["blob_key"]]
    return len(rows), await mail_store.release_blobs(txn, keys), unfilled
