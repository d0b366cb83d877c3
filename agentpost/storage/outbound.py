"""The outbound queue's rows (migration 0015).

Enqueueing is tenant work and names its organization. Claiming and recording are the
queue workers' maintenance work across all organizations (like retention), but every
update names the row's own organization and id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agentpost.storage import mail as mail_store
from agentpost.storage.database import Txn

#: Wakes queue workers in every process once an enqueue commits.
OUTBOUND_CHANNEL = "agentpost_outbound"

#: Recipient states that are final.
FINAL = ("sent", "bounced", "failed")


async def insert_batch(txn: Txn, row: dict[str, Any], recipients: list[str]) -> None:
    """One queue row and its recipients, a reference on the raw blob, and a wake-up
    for the workers when this commits."""
    await mail_store.reference_blob(txn, row["raw_blob_key"], row["size"])
    cols = list(row)
    await txn.execute(
        f"INSERT INTO outbound_queue ({', '.join(cols)}) "
        f"VALUES ({', '.join(['%s'] * len(cols))}); "
        "INSERT INTO outbound_recipients (org_id, queue_id, address, status, updated_at) "
        "SELECT %s, %s, address, 'queued', %s FROM unnest(%s::text[]) AS address; "
        "SELECT pg_notify(%s, '')",
        [*row.values(), row["org_id"], row["id"], txn.now, recipients, OUTBOUND_CHANNEL])


async def claim_due(txn: Txn, now: datetime, lease_until: datetime, worker: str,
                    limit: int) -> list[dict[str, Any]]:
    """Lease up to ``limit`` due rows (new, deferred, or leased by a worker whose lease
    ran out), oldest first; rows other workers are claiming are skipped, not waited
    for. Returns the rows with the recipients still to try."""
    return await txn.fetchall(
        "WITH due AS ("
        "  SELECT id FROM outbound_queue"
        "   WHERE (status IN ('queued', 'deferred') AND next_attempt_at <= %s)"
        "      OR (status = 'sending' AND lease_until <= %s)"
        "   ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED) "
        "UPDATE outbound_queue q SET status = 'sending', lease_until = %s, leased_by = %s,"
        "       attempts = q.attempts + 1, updated_at = %s "
        "  FROM due WHERE q.id = due.id "
        "RETURNING q.org_id, q.id, q.environment_id, q.inbox_id, q.message_id, "
        "          q.raw_blob_key, q.mail_from, q.domain, q.attempts, q.expires_at, "
        "          ARRAY(SELECT r.address FROM outbound_recipients r "
        "                 WHERE r.queue_id = q.id AND r.status NOT IN ('sent', 'bounced',"
        "                 'failed') ORDER BY r.address) AS recipients",
        (now, now, limit, lease_until, worker, now))


async def record_results(txn: Txn, org_id: str, queue_id: str, worker: str,
                         results: list[dict[str, Any]]) -> bool:
    """Store each recipient's outcome of one hand-off. False (nothing written) when
    this worker no longer holds the lease: another took the row over after our lease
    ran out, and its outcome is the one that counts."""
    held = await txn.fetchval(
        "SELECT 1 FROM outbound_queue WHERE org_id = %s AND id = %s AND leased_by = %s "
        "AND status = 'sending' FOR UPDATE", (org_id, queue_id, worker))
    if not held:
        return False
    await txn.execute(
        "UPDATE outbound_recipients r SET status = x.status, attempts = r.attempts + 1, "
        "       smtp_code = x.smtp_code, status_code = x.status_code, "
        "       diagnostic = x.diagnostic, transport_id = x.transport_id, updated_at = %s "
        "  FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[], %s::text[], "
        "              %s::text[]) AS x(address, status, smtp_code, status_code, diagnostic,"
        "                               transport_id) "
        " WHERE r.org_id = %s AND r.queue_id = %s AND r.address = x.address",
        [txn.now, [r["address"] for r in results], [r["status"] for r in results],
         [r["smtp_code"] for r in results], [r["status_code"] for r in results],
         [r["diagnostic"] for r in results], [r["transport_id"] for r in results],
         org_id, queue_id])
    return True


async def finish_attempt(txn: Txn, org_id: str, queue_id: str, *,
                         next_attempt_at: datetime | None, bounce: bool,
                         last_error: str | None) -> str | None:
    """Close the attempt: ``deferred`` until ``next_attempt_at``, or ``done``; mark a
    DSN as owed. Returns the raw blob key when the row is done (its reference is
    released here; the caller collects the blob after commit)."""
    status = "deferred" if next_attempt_at is not None else "done"
    row = await txn.fetchone(
        "UPDATE outbound_queue SET status = %s, next_attempt_at = COALESCE(%s, "
        "       next_attempt_at), lease_until = NULL, leased_by = NULL, "
        "       bounce_pending = bounce_pending OR %s, last_error = %s, updated_at = %s "
        " WHERE org_id = %s AND id = %s RETURNING raw_blob_key",
        (status, next_attempt_at, bounce, last_error, txn.now, org_id, queue_id))
    if row is None or status != "done":
        return None
    released = await mail_store.release_blob(txn, row["raw_blob_key"])
    return row["raw_blob_key"] if released else None


async def record_attempt(txn: Txn, org_id: str, queue_id: str, worker: str,
                         results: list[dict[str, Any]], *,
                         next_attempt_at: datetime | None, bounce: bool,
                         last_error: str | None) -> tuple[bool, str | None]:
    """:func:`record_results` and :func:`finish_attempt` in one statement, then the
    blob reference released in one more (three round trips with COMMIT instead of six:
    this runs once per hand-off). Returns (whether this worker still held the lease,
    the raw blob key when it is no longer used by anyone)."""
    status = "deferred" if next_attempt_at is not None else "done"
    row = await txn.fetchone(
        "WITH held AS ("
        "  SELECT id FROM outbound_queue WHERE org_id = %(org)s AND id = %(id)s "
        "     AND leased_by = %(worker)s AND status = 'sending' FOR UPDATE), "
        "rcpt AS ("
        "  UPDATE outbound_recipients r SET status = x.status, attempts = r.attempts + 1, "
        "         smtp_code = x.smtp_code, status_code = x.status_code, "
        "         diagnostic = x.diagnostic, transport_id = x.transport_id, "
        "         updated_at = %(now)s "
        "    FROM held, unnest(%(addr)s::text[], %(st)s::text[], %(code)s::int[], "
        "                      %(enh)s::text[], %(diag)s::text[], %(tid)s::text[]) "
        "         AS x(address, status, smtp_code, status_code, diagnostic, transport_id) "
        "   WHERE r.org_id = %(org)s AND r.queue_id = held.id AND r.address = x.address), "
        "fin AS ("
        "  UPDATE outbound_queue q SET status = %(status)s, "
        "         next_attempt_at = COALESCE(%(next)s, q.next_attempt_at), "
        "         lease_until = NULL, leased_by = NULL, "
        "         bounce_pending = q.bounce_pending OR %(bounce)s, last_error = %(err)s, "
        "         updated_at = %(now)s "
        "    FROM held WHERE q.org_id = %(org)s AND q.id = held.id "
        "  RETURNING q.raw_blob_key) "
        "SELECT EXISTS (SELECT 1 FROM held) AS held, (SELECT raw_blob_key FROM fin) AS key",
        {"org": org_id, "id": queue_id, "worker": worker, "now": txn.now,
         "addr": [r["address"] for r in results], "st": [r["status"] for r in results],
         "code": [r["smtp_code"] for r in results],
         "enh": [r["status_code"] for r in results],
         "diag": [r["diagnostic"] for r in results],
         "tid": [r["transport_id"] for r in results],
         "status": status, "next": next_attempt_at, "bounce": bounce, "err": last_error})
    if row is None or not row["held"]:
        return False, None
    if status != "done" or row["key"] is None:
        return True, None
    released = await mail_store.release_blobs(txn, [row["key"]])
    return True, (released[0] if released else None)


async def recipients_of(txn: Txn, org_id: str, queue_id: str) -> list[dict[str, Any]]:
    """Every recipient of a queue row with its state."""
    return await txn.fetchall(
        "SELECT address, status, attempts, smtp_code, status_code, diagnostic, transport_id,"
        "       updated_at FROM outbound_recipients WHERE org_id = %s AND queue_id = %s "
        "ORDER BY address", (org_id, queue_id))


async def claim_bounces(txn: Txn, limit: int) -> list[dict[str, Any]]:
    """Rows owing a DSN, locked (skipping rows another worker is bouncing)."""
    return await txn.fetchall(
        "SELECT org_id, id, environment_id, inbox_id, message_id, raw_blob_key, mail_from, "
        "       created_at FROM outbound_queue WHERE bounce_pending ORDER BY updated_at LIMIT %s "
        "  FOR UPDATE SKIP LOCKED", (limit,))


async def bounced_recipients(txn: Txn, org_id: str, queue_id: str) -> list[dict[str, Any]]:
    """The recipients a DSN reports: those that bounced or failed."""
    return await txn.fetchall(
        "SELECT address, status, smtp_code, status_code, diagnostic FROM outbound_recipients "
        " WHERE org_id = %s AND queue_id = %s AND status IN ('bounced', 'failed') "
        " ORDER BY address", (org_id, queue_id))


async def postpone_bounce(txn: Txn, org_id: str, queue_id: str) -> None:
    """The DSN could not be stored now: behind every other owed DSN."""
    await txn.execute(
        "UPDATE outbound_queue SET updated_at = %s WHERE org_id = %s AND id = %s",
        (txn.now, org_id, queue_id))


async def bounce_delivered(txn: Txn, org_id: str, queue_id: str) -> None:
    """The DSN is stored: owe nothing more."""
    await txn.execute(
        "UPDATE outbound_queue SET bounce_pending = false, updated_at = %s "
        " WHERE org_id = %s AND id = %s", (txn.now, org_id, queue_id))


async def queue_of_message(txn: Txn, org_id: str, message_id: str) -> list[dict[str, Any]]:
    """A sent message's queue rows with their recipients (the send status API)."""
    return await txn.fetchall(
        "SELECT q.id, q.domain, q.status, q.attempts, q.next_attempt_at, q.last_error, "
        "       COALESCE(json_agg(json_build_object('address', r.address, 'status', "
        "         r.status, 'smtp_code', r.smtp_code, 'status_code', r.status_code, "
        "         'diagnostic', r.diagnostic) ORDER BY r.address) "
        "         FILTER (WHERE r.address IS NOT NULL), '[]') AS recipients "
        "  FROM outbound_queue q LEFT JOIN outbound_recipients r "
        "    ON r.org_id = q.org_id AND r.queue_id = q.id "
        " WHERE q.org_id = %s AND q.message_id = %s GROUP BY q.id ORDER BY q.domain",
        (org_id, message_id))
