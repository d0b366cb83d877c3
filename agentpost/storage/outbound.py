"""The outbound queue's rows (migration 0015).

Enqueueing is tenant work and names its organization. Claiming and recording are the
queue workers' maintenance work across all organizations (like retention), but every
update names the row's own organization and id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agentpost.storage import mail as mail_store
from agentpost.storage.database import Txn
from agentpost.storage.mail import _blob_lock_sql

#: Wakes queue workers in every process once an enqueue commits.
OUTBOUND_CHANNEL = "agentpost_outbound"

#: Recipient states that are final.
FINAL = ("sent", "bounced", "failed")


async def insert_batch(txn: Txn, rows: list[dict[str, Any]],
                         recipients: list[list[str]]) -> None:
    """Queue rows (one per recipient domain of one message, ``recipients[i]`` for
    ``rows[i]``) with their recipients, one reference per row on the message's raw blob,
    and a wake-up for the workers when this commits: ONE round trip however many
    domains (it runs inside the submission's transaction, which it keeps short).

    Every row names the same blob. The blob lock is the one storage.mail takes for every
    reference (it pairs with the collector's)."""
    if not rows:
        return
    sql, params = insert_batch_sql(txn.now, rows, recipients)
    await txn.execute(sql, params)


def insert_batch_sql(now: datetime, rows: list[dict[str, Any]], recipients: list[list[str]],
                     *, blob_locked: bool = False) -> tuple[str, list[Any]]:
    """:func:`insert_batch`'s statements, for a caller that sends them ahead of another
    statement in the same round trip (submission: with the Sent copy's insert).
    ``blob_locked``: this transaction already took the blob's lock (it referenced the
    blob before), so the lock statement is left out."""
    first = rows[0]
    cols = list(first)
    values = ", ".join(["(" + ", ".join(["%s"] * len(cols)) + ")"] * len(rows))
    flat_ids = [row["id"] for row, group in zip(rows, recipients, strict=True) for _ in group]
    flat_addresses = [a for group in recipients for a in group]
    lock_sql, lock_params = ("", []) if blob_locked else (
        _blob_lock_sql() + "; ", [first["raw_blob_key"]])
    # ONE statement (data-modifying CTEs; the foreign keys are checked at its end):
    # one statement to prepare, bind and run per send instead of four.
    return (
        lock_sql
        + "WITH b AS (INSERT INTO blobs (key, size, refcount, created_at) "
        "VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (key) DO UPDATE SET refcount = blobs.refcount + EXCLUDED.refcount), "
        f"q AS (INSERT INTO outbound_queue ({', '.join(cols)}) VALUES {values}), "
        "r AS (INSERT INTO outbound_recipients (org_id, queue_id, address, status, "
        "updated_at) SELECT %s, q, a, 'queued', %s FROM unnest(%s::text[], %s::text[]) "
        "AS x(q, a)) "
        "SELECT pg_notify(%s, '')",
        [*lock_params, first["raw_blob_key"], first["size"], len(rows), now,
         *(v for row in rows for v in row.values()), first["org_id"], now, flat_ids,
         flat_addresses, OUTBOUND_CHANNEL])


async def claim_due(txn: Txn, now: datetime, lease_until: datetime, worker: str,
                    limit: int) -> list[dict[str, Any]]:
    """Lease up to ``limit`` due rows (new, deferred, or leased by a worker whose lease
    ran out), oldest first; rows other workers are claiming are skipped, not waited
    for. Returns the rows with the recipients still to try, and ``suppressed``: those of
    them now on the organization's suppression list."""
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
        "                 'failed') ORDER BY r.address) AS recipients, "
        # those of them the organization has suppressed since the message was queued
        # (a hard bounce or a complaint of another message): never tried again
        "          ARRAY(SELECT r.address FROM outbound_recipients r "
        "                 WHERE r.queue_id = q.id AND r.status NOT IN ('sent', 'bounced',"
        "                 'failed') AND EXISTS (SELECT 1 FROM suppressions s "
        "                 WHERE s.org_id = q.org_id AND s.email = lower(r.address))) "
        "            AS suppressed",
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


@dataclass(frozen=True)
class Attempt:
    """One hand-off's outcome to record: every recipient's result (dicts as
    agentpost.outbound.transports.Outcome.row gives them) and how the row goes on
    (``next_attempt_at`` set: deferred until then; None: done)."""

    org_id: str
    queue_id: str
    results: list[dict[str, Any]]
    next_attempt_at: datetime | None
    bounce: bool
    last_error: str | None


def _text(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL: a relay's reply that has one is recorded without
    it (otherwise the whole batch's outcome could not be written)."""
    return value.replace("\x00", "") if isinstance(value, str) else value


async def record_attempts(txn: Txn, worker: str,
                          attempts: list[Attempt]) -> tuple[set[str], list[str]]:
    """Record many hand-offs in two round trips (plus COMMIT), however many there are:
    each row's recipients and the row itself closed (``deferred`` or ``done``, a DSN
    marked as owed), but only the rows this worker still leases -- a row another worker
    took over after our lease ran out keeps that worker's outcome. Then the blob
    references of the rows that are done are released together.

    Returns (the queue ids that were recorded, the raw blob keys no longer used by
    anyone: the caller collects them after COMMIT)."""
    if not attempts:
        return set(), []
    rcpts = [(a.queue_id, r) for a in attempts for r in a.results]
    rows = await txn.fetchall(
        "WITH x AS ("
        "  SELECT * FROM unnest(%(org)s::text[], %(id)s::text[], %(status)s::text[], "
        "                       %(next)s::timestamptz[], %(bounce)s::boolean[], "
        "                       %(err)s::text[]) "
        "      AS x(org_id, id, status, next_at, bounce, err)), "
        "fin AS ("
        "  UPDATE outbound_queue q SET status = x.status, "
        "         next_attempt_at = COALESCE(x.next_at, q.next_attempt_at), "
        "         lease_until = NULL, leased_by = NULL, "
        "         bounce_pending = q.bounce_pending OR x.bounce, last_error = x.err, "
        "         updated_at = %(now)s "
        "    FROM x WHERE q.org_id = x.org_id AND q.id = x.id "
        "     AND q.leased_by = %(worker)s AND q.status = 'sending' "
        "  RETURNING q.org_id, q.id, q.status, q.raw_blob_key), "
        "rcpt AS ("
        "  UPDATE outbound_recipients r SET status = y.status, attempts = r.attempts + 1, "
        "         smtp_code = y.smtp_code, status_code = y.status_code, "
        "         diagnostic = y.diagnostic, transport_id = y.transport_id, "
        "         updated_at = %(now)s "
        "    FROM fin, unnest(%(rq)s::text[], %(addr)s::text[], %(st)s::text[], "
        "                     %(code)s::int[], %(enh)s::text[], %(diag)s::text[], "
        "                     %(tid)s::text[]) "
        "         AS y(queue_id, address, status, smtp_code, status_code, diagnostic, "
        "              transport_id) "
        "   WHERE y.queue_id = fin.id AND r.org_id = fin.org_id AND r.queue_id = fin.id "
        "     AND r.address = y.address) "
        "SELECT id, status, raw_blob_key FROM fin",
        {"org": [a.org_id for a in attempts], "id": [a.queue_id for a in attempts],
         "status": ["deferred" if a.next_attempt_at is not None else "done"
                    for a in attempts],
         "next": [a.next_attempt_at for a in attempts],
         "bounce": [a.bounce for a in attempts],
         "err": [_text(a.last_error) for a in attempts], "now": txn.now, "worker": worker,
         "rq": [q for q, _ in rcpts], "addr": [r["address"] for _, r in rcpts],
         "st": [r["status"] for _, r in rcpts], "code": [r["smtp_code"] for _, r in rcpts],
         "enh": [_text(r["status_code"]) for _, r in rcpts],
         "diag": [_text(r["diagnostic"]) for _, r in rcpts],
         "tid": [_text(r["transport_id"]) for _, r in rcpts]})
    done = [r["raw_blob_key"] for r in rows if r["status"] == "done"]
    released = await mail_store.release_blobs(txn, done) if done else []
    return {r["id"] for r in rows}, released


async def recipients_of(txn: Txn, org_id: str, queue_id: str) -> list[dict[str, Any]]:
    """Every recipient of a queue row with its state."""
    return await txn.fetchall(
        "SELECT address, status, attempts, smtp_code, status_code, diagnostic, transport_id,"
        "       updated_at FROM outbound_recipients WHERE org_id = %s AND queue_id = %s "
        "ORDER BY address", (org_id, queue_id))


async def claim_bounces(txn: Txn, limit: int) -> list[dict[str, Any]]:
    """Rows owing a DSN, locked (skipping rows another worker is bouncing), with the
    sending inbox's address (``inbox_email``, None once the inbox is gone): the DSN is
    addressed to the inbox, not to the envelope sender, which a custom MAIL FROM turns
    into ``alice@bounce.example.com``."""
    return await txn.fetchall(
        "SELECT q.org_id, q.id, q.environment_id, q.inbox_id, q.message_id, q.raw_blob_key, "
        "       q.mail_from, q.created_at, i.email AS inbox_email "
        "  FROM outbound_queue q "
        "  LEFT JOIN inboxes i ON i.org_id = q.org_id AND i.id = q.inbox_id "
        " WHERE q.bounce_pending ORDER BY q.updated_at LIMIT %s "
        "  FOR UPDATE OF q SKIP LOCKED", (limit,))


async def bounced_recipients(txn: Txn, org_id: str, queue_id: str) -> list[dict[str, Any]]:
    """The recipients a DSN reports: those that bounced or failed and no earlier DSN
    of the row named (a row's recipients can fail at different attempts)."""
    return await txn.fetchall(
        "SELECT address, status, smtp_code, status_code, diagnostic FROM outbound_recipients "
        " WHERE org_id = %s AND queue_id = %s AND status IN ('bounced', 'failed') "
        "   AND NOT reported ORDER BY address", (org_id, queue_id))


async def postpone_bounce(txn: Txn, org_id: str, queue_id: str) -> None:
    """The DSN could not be stored now: behind every other owed DSN."""
    await txn.execute(
        "UPDATE outbound_queue SET updated_at = %s WHERE org_id = %s AND id = %s",
        (txn.now, org_id, queue_id))


async def bounce_delivered(txn: Txn, org_id: str, queue_id: str) -> None:
    """The DSN is stored: owe nothing more, and never report its recipients again.
    The row is locked (:func:`claim_bounces`), and recording an attempt updates the row
    before its recipients, so no recipient fails between the DSN's read and this."""
    await txn.execute(
        "UPDATE outbound_queue SET bounce_pending = false, updated_at = %s "
        " WHERE org_id = %s AND id = %s; "
        "UPDATE outbound_recipients SET reported = true "
        " WHERE org_id = %s AND queue_id = %s AND status IN ('bounced', 'failed') "
        "   AND NOT reported", (txn.now, org_id, queue_id, org_id, queue_id))


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


_SENDING_CHECKS = (
    "SELECT i.send_paused, "
    "       (EXISTS (SELECT 1 FROM shared_domains s WHERE s.name = lower(i.domain)) "
    "        OR d.id IS NOT NULL) AS domain_verified, "
    "       d.mail_from_subdomain || '.' || d.name AS mail_from_domain, "
    f"       {mail_store.rules_sql('send')} AS rules, "
    "       ARRAY(SELECT s.email FROM suppressions s WHERE s.org_id = i.org_id "
    "              AND s.email = ANY(%s::text[])) AS suppressed{limits}{inbox} "
    "FROM inboxes i LEFT JOIN domains d ON d.org_id = i.org_id "
    "  AND d.name = lower(i.domain) AND d.verified_at IS NOT NULL{joins} "
    "WHERE i.org_id = %s AND {where} AND i.id = %s")
#: The send limits' buckets of the inbox and its organization, read with the checks
#: (core.send_limits: the early refusal at RCPT) instead of in a second round trip.
_BUCKET_COLUMNS = "".join(
    f", {alias}.{col} AS {scope}_{col}" for alias, scope in (("lo", "organization"),
                                                             ("li", "inbox"))
    for col in ("tokens", "refilled_at", "day", "day_count"))
_BUCKET_JOINS = (" LEFT JOIN send_limits_org lo ON lo.org_id = i.org_id"
                 " LEFT JOIN send_limits_inbox li ON li.org_id = i.org_id"
                 " AND li.inbox_id = i.id")
#: What the send API needs of the inbox itself (core.sending), with the checks.
_INBOX_COLUMNS = ", i.id, i.org_id, i.environment_id, i.email, i.display_name"
_SENDING_CHECKS_SQL = {
    (buckets, inbox): _SENDING_CHECKS.format(
        limits=_BUCKET_COLUMNS if buckets else "", joins=_BUCKET_JOINS if buckets else "",
        inbox=_INBOX_COLUMNS if inbox else "",
        where=("(%s::text[] IS NULL OR i.environment_id = ANY(%s))" if inbox
               else "i.environment_id = %s"))
    for buckets in (False, True) for inbox in (False, True)
}


async def sending_checks(txn: Txn, org_id: str, environment_id: str, inbox_id: str,
                         emails: list[str], *, buckets: bool = False
                         ) -> dict[str, Any] | None:
    """What a send checks before it queues, in ONE statement however many recipients:
    the inbox's ``send_paused``, ``domain_verified`` (shared or verified domain),
    ``mail_from_domain`` (the verified domain's custom MAIL FROM, ``bounce.example.com``;
    else None), the send-direction filter ``rules``, and ``suppressed``: which of
    ``emails`` (already normalised, core.suppressions) are on the organization's
    suppression list. None when the inbox is gone. ``buckets``: also the send limits'
    rows, as columns ``organization_tokens``, ``inbox_day_count``, ... (NULL: that scope
    has not sent)."""
    return await txn.fetchone(_SENDING_CHECKS_SQL[buckets, False],
                              (emails, org_id, environment_id, inbox_id))


async def inbox_and_sending_checks(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                                   inbox_id: str, emails: list[str], *,
                                   buckets: bool = False) -> dict[str, Any] | None:
    """:func:`sending_checks` for an inbox known only by its id (the send API), in the
    organization and the allowed environments (``env_ids``; None: all), with the
    inbox's ``id``, ``org_id``, ``environment_id``, ``email`` and ``display_name``: the
    inbox lookup and the checks in ONE statement. None: no such inbox here (404)."""
    envs = None if env_ids is None else sorted(env_ids)
    return await txn.fetchone(_SENDING_CHECKS_SQL[buckets, True],
                              (emails, org_id, envs, envs, inbox_id))
