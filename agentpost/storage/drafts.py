"""Draft rows (migration 0019) and the Drafts-folder copies they point at.

A draft is visible only while its copy is a live message (not flagged ``\\Deleted``)
in its inbox's ``\\Drafts`` folder: a copy an IMAP client moved elsewhere or is about
to expunge is no longer a draft, whatever the row says. Tenant work names its
organization (and the principal's environments); the scheduled-send job's claim runs
across organizations, like the outbound queue's, but every update names the row's
own organization and id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from agentpost.storage.blob_body import body_sql
from agentpost.storage.database import Txn
from agentpost.storage.mail import env_clause

#: The row joined with its copy: the copy supplies thread, labels and the headers an
#: adopted draft was read from.
_COLS = ("d.org_id, d.id, d.environment_id, d.inbox_id, d.message_id, d.fields, d.status, "
         "d.send_at, d.scheduled_by, d.lease_until, d.leased_by, d.attempts, d.last_error, "
         "d.created_at, d.updated_at, m.thread_id, m.labels, m.folder_id, m.uid, "
         "m.raw_blob_key, m.size")
_FROM = ("FROM drafts d JOIN messages m ON m.org_id = d.org_id AND m.id = d.message_id "
         "JOIN folders f ON f.org_id = m.org_id AND f.id = m.folder_id "
         "AND f.special_use = '\\Drafts' ")
_LIVE = " AND NOT m.deleted"


def _env(env_ids: frozenset[str] | None) -> tuple[str, list[Any]]:
    sql, params = env_clause(env_ids)
    return sql.replace("environment_id", "d.environment_id"), params


async def drafts_folder(txn: Txn, org_id: str, inbox_id: str) -> dict[str, Any] | None:
    """The inbox's Drafts folder (by special use: system folders cannot be renamed)."""
    return await txn.fetchone(
        "SELECT id, name, uidvalidity FROM folders WHERE org_id = %s AND inbox_id = %s "
        "AND special_use = '\\Drafts'", (org_id, inbox_id))


async def unadopted(txn: Txn, org_id: str, inbox_id: str, limit: int) -> list[dict[str, Any]]:
    """Live messages of the inbox's Drafts folder that no draft row points at (an IMAP
    client APPENDed or COPYed them), oldest first, with what a draft is read from."""
    return await txn.fetchall(
        "SELECT m.id, m.environment_id, m.subject, m.to_addresses, m.cc_addresses, "
        f"m.bcc_addresses, m.reply_to, {body_sql('m.')} AS text_body, m.html_body, "
        "m.message_id_header, m.in_reply_to, m.reference_ids, m.received_at "
        "FROM messages m JOIN folders f ON f.org_id = m.org_id AND f.id = m.folder_id "
        "WHERE m.org_id = %s AND m.inbox_id = %s AND f.inbox_id = %s "
        "AND f.special_use = '\\Drafts' AND NOT m.deleted "
        "AND NOT EXISTS (SELECT 1 FROM drafts d WHERE d.org_id = m.org_id "
        "                AND d.message_id = m.id) "
        "ORDER BY m.id LIMIT %s", (org_id, inbox_id, inbox_id, limit))


async def message_by_header(txn: Txn, org_id: str, inbox_id: str,
                            message_id_header: str) -> str | None:
    """The API id of a message of the inbox with this Message-ID (without brackets)."""
    found: str | None = await txn.fetchval(
        "SELECT id FROM messages WHERE org_id = %s AND inbox_id = %s "
        "AND message_id_header = %s ORDER BY id LIMIT 1", (org_id, inbox_id, message_id_header))
    return found


async def insert_draft(txn: Txn, row: dict[str, Any]) -> bool:
    """A new draft row; False when its copy already has one (adopted meanwhile)."""
    values = {**row, "fields": Json(row["fields"])}
    cols = list(values)
    count = await txn.execute(
        f"INSERT INTO drafts ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
        "ON CONFLICT (org_id, message_id) DO NOTHING", list(values.values()))
    return count == 1


async def get_draft(txn: Txn, org_id: str, env_ids: frozenset[str] | None, draft_id: str,
                    *, for_update: bool = False) -> dict[str, Any] | None:
    """One live draft with its copy's thread and labels (``for_update`` locks the row)."""
    env_sql, env_params = _env(env_ids)
    lock = " FOR UPDATE OF d" if for_update else ""
    return await txn.fetchone(
        f"SELECT {_COLS} {_FROM} WHERE d.org_id = %s AND d.id = %s{env_sql}{_LIVE}{lock}",
        (org_id, draft_id, *env_params))


async def list_drafts(txn: Txn, org_id: str, env_ids: frozenset[str] | None, inbox_id: str,
                      *, after_id: str | None, limit: int) -> list[dict[str, Any]]:
    """Live drafts of an inbox, newest first, after the cursor id: without their
    bodies (a page of large drafts is not read whole), with the copy's preview."""
    env_sql, env_params = _env(env_ids)
    cols = _COLS.replace("d.fields", "d.fields - 'text_body' - 'html_body' AS fields")
    return await txn.fetchall(
        f"SELECT {cols}, m.preview {_FROM} WHERE d.org_id = %s AND d.inbox_id = %s"
        f"{env_sql}{_LIVE} "
        "AND (%s::text IS NULL OR d.id < %s) ORDER BY d.id DESC LIMIT %s",
        (org_id, inbox_id, *env_params, after_id, after_id, limit))


async def repoint(txn: Txn, org_id: str, draft_id: str, expected_message_id: str,
                  new_message_id: str, changes: dict[str, Any]) -> bool:
    """Point a draft at its new copy and set ``changes`` (columns of the row), only if
    it still points at ``expected_message_id`` and is not being sent: False otherwise
    (another edit or a send got there first)."""
    sets = ["message_id = %s", "updated_at = %s"]
    params: list[Any] = [new_message_id, txn.now]
    for col, value in changes.items():
        sets.append(f"{col} = %s")
        params.append(Json(value) if col == "fields" else value)
    count = await txn.execute(
        f"UPDATE drafts SET {', '.join(sets)} WHERE org_id = %s AND id = %s "
        "AND message_id = %s AND status <> 'sending'",
        [*params, org_id, draft_id, expected_message_id])
    return count == 1


async def set_schedule(txn: Txn, org_id: str, draft_id: str, *, status: str,
                       send_at: datetime | None, scheduled_by: str | None,
                       last_error: str | None = None) -> None:
    """Schedule, cancel (status draft) or fail a draft; any lease is dropped."""
    await txn.execute(
        "UPDATE drafts SET status = %s, send_at = %s, scheduled_by = %s, last_error = %s, "
        "lease_until = NULL, leased_by = NULL, updated_at = %s "
        "WHERE org_id = %s AND id = %s",
        (status, send_at, scheduled_by, last_error, txn.now, org_id, draft_id))


async def claim_due(txn: Txn, now: datetime, lease_until: datetime, worker: str,
                    limit: int) -> list[dict[str, Any]]:
    """Lease up to ``limit`` due drafts (scheduled and due, or claimed by a job whose
    lease ran out), earliest first; rows another job is claiming are skipped, not
    waited for, so no draft is claimed by two jobs."""
    return await txn.fetchall(
        "WITH due AS ("
        "  SELECT org_id, id FROM drafts"
        "   WHERE (status = 'scheduled' AND send_at <= %s)"
        "      OR (status = 'sending' AND lease_until <= %s)"
        "   ORDER BY send_at LIMIT %s FOR UPDATE SKIP LOCKED) "
        "UPDATE drafts d SET status = 'sending', lease_until = %s, leased_by = %s, "
        "       attempts = d.attempts + 1, updated_at = %s "
        "  FROM due WHERE d.org_id = due.org_id AND d.id = due.id "
        "RETURNING d.org_id, d.id, d.environment_id, d.inbox_id, d.scheduled_by, d.send_at, "
        "d.attempts",
        (now, now, limit, lease_until, worker, now))


async def holds_lease(txn: Txn, org_id: str, draft_id: str, worker: str) -> bool:
    """Whether ``worker`` still holds the draft's lease (the row is locked)."""
    return bool(await txn.fetchval(
        "SELECT 1 FROM drafts WHERE org_id = %s AND id = %s AND status = 'sending' "
        "AND leased_by = %s FOR UPDATE", (org_id, draft_id, worker)))


async def next_due(txn: Txn) -> datetime | None:
    """When the earliest scheduled draft is due (the job sleeps until then)."""
    found: datetime | None = await txn.fetchval(
        "SELECT min(send_at) FROM drafts WHERE status = 'scheduled'")
    return found


async def take_lease(txn: Txn, org_id: str, draft_id: str, worker: str,
                     lease_until: datetime) -> None:
    """Mark a (locked) draft as leaving now: ``sending``, held by ``worker``; edits,
    cancels and the scheduled-send job leave it alone until the lease runs out."""
    await txn.execute(
        "UPDATE drafts SET status = 'sending', send_at = COALESCE(send_at, %s), "
        "lease_until = %s, leased_by = %s, attempts = attempts + 1, updated_at = %s "
        "WHERE org_id = %s AND id = %s",
        (txn.now, lease_until, worker, txn.now, org_id, draft_id))


async def attachments_of(txn: Txn, org_id: str,
                         message_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The attachments of several copies in ONE statement (a page of drafts), by
    message id, each in MIME order."""
    rows = await txn.fetchall(
        "SELECT id, message_id, filename, mime_type, size, content_id, disposition, sha256, "
        "blob_key FROM attachments WHERE org_id = %s AND message_id = ANY(%s) "
        "ORDER BY message_id, part_index", (org_id, message_ids))
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in message_ids}
    for row in rows:
        out[row["message_id"]].append(row)
    return out
