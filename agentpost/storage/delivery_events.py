"""Delivery feedback rows (migration 0020): SNS receipts, the recipients a SES MessageId
names, per-recipient delivery state, ``delivery_events``, and the deliveries report.

Matching feedback to recipients is installation-level work (a notification arrives
before anyone knows its organization, like the queue workers' claims); every write
after the match names the organization of the rows it matched.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from agentpost.storage.database import Txn


async def record_receipt(txn: Txn, sns_message_id: str, topic_arn: str) -> bool:
    """Remember an SNS MessageId; False when it was seen before (a redelivery)."""
    inserted = await txn.fetchval(
        "INSERT INTO sns_receipts (sns_message_id, topic_arn, received_at) "
        "VALUES (%s, %s, %s) ON CONFLICT (sns_message_id) DO NOTHING RETURNING 1",
        (sns_message_id, topic_arn, txn.now))
    return bool(inserted)


async def recipients_by_transport_id(txn: Txn, transport_id: str) -> list[dict[str, Any]]:
    """The recipient rows one SES MessageId went to, locked for the update that follows,
    with their queue row's tenant facts."""
    return await txn.fetchall(
        "SELECT r.org_id, r.queue_id, r.address, r.delivery_status, q.environment_id, "
        "       q.inbox_id, q.message_id "
        "  FROM outbound_recipients r JOIN outbound_queue q "
        "    ON q.org_id = r.org_id AND q.id = r.queue_id "
        " WHERE r.transport_id = %s ORDER BY r.org_id, r.queue_id, r.address "
        "   FOR UPDATE OF r", (transport_id,))


async def set_delivery_status(txn: Txn, org_id: str, queue_id: str, address: str,
                              status: str) -> None:
    """A recipient's state after the hand-off (delivered, bounced, complained ...)."""
    await txn.execute(
        "UPDATE outbound_recipients SET delivery_status = %s, delivery_updated_at = %s "
        " WHERE org_id = %s AND queue_id = %s AND address = %s",
        (status, txn.now, org_id, queue_id, address))


async def insert_events(txn: Txn, rows: list[dict[str, Any]]) -> None:
    """``delivery_events`` rows (each with org_id first), in one statement."""
    if not rows:
        return
    cols = ["org_id", "id", "environment_id", "queue_id", "message_id", "recipient", "type",
            "bounce_type", "bounce_subtype", "smtp_code", "status_code", "diagnostic",
            "transport_id", "sns_message_id", "feedback", "occurred_at"]
    values = ", ".join(["(" + ", ".join(["%s"] * (len(cols) + 1)) + ")"] * len(rows))
    params: list[Any] = []
    for row in rows:
        params += [Json(row[c]) if c == "feedback" else row.get(c) for c in cols]
        params.append(txn.now)
    await txn.execute(
        f"INSERT INTO delivery_events ({', '.join(cols)}, created_at) VALUES {values}",
        params)


async def deliveries_of_message(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                                message_id: str) -> list[dict[str, Any]]:
    """Every recipient of a sent message with its hand-off and delivery state and its
    feedback events (oldest first), within the caller's environments. A recipient not
    yet answered whose row a worker holds (``sending``: the hand-off is under way) shows
    as ``sending``, not as the ``queued``/``deferred`` it had before the claim."""
    return await txn.fetchall(
        "SELECT r.address, q.domain, "
        "       CASE WHEN q.status = 'sending' AND r.status IN ('queued', 'deferred') "
        "            THEN 'sending' ELSE r.status END AS status, "
        "       r.delivery_status, r.attempts, r.smtp_code, "
        "       r.status_code, r.diagnostic, r.transport_id, r.updated_at, "
        "       r.delivery_updated_at, "
        "       COALESCE((SELECT json_agg(json_build_object("
        "           'id', e.id, 'type', e.type, 'bounce_type', e.bounce_type, "
        "           'bounce_subtype', e.bounce_subtype, 'smtp_code', e.smtp_code, "
        "           'status_code', e.status_code, 'diagnostic', e.diagnostic, "
        "           'occurred_at', e.occurred_at, 'created_at', e.created_at) "
        "           ORDER BY e.created_at, e.id) FROM delivery_events e "
        "          WHERE e.org_id = r.org_id AND e.queue_id = r.queue_id "
        "            AND e.recipient = r.address), '[]') AS events "
        "  FROM outbound_queue q JOIN outbound_recipients r "
        "    ON r.org_id = q.org_id AND r.queue_id = q.id "
        " WHERE q.org_id = %s AND q.message_id = %s "
        "   AND (%s::text[] IS NULL OR q.environment_id = ANY(%s)) "
        " ORDER BY r.address, q.id",
        (org_id, message_id, _envs(env_ids), _envs(env_ids)))


def _envs(env_ids: frozenset[str] | None) -> list[str] | None:
    return None if env_ids is None else sorted(env_ids)


async def delete_expired(txn: Txn, older_than: datetime, batch: int) -> int:
    """Delete up to ``batch`` delivery events (and SNS receipts) created before
    ``older_than``; returns the number of delivery events deleted."""
    deleted = await txn.execute(
        "DELETE FROM delivery_events WHERE id IN (SELECT id FROM delivery_events "
        " WHERE created_at < %s LIMIT %s)", (older_than, batch))
    await txn.execute(
        "DELETE FROM sns_receipts WHERE sns_message_id IN (SELECT sns_message_id "
        "  FROM sns_receipts WHERE received_at < %s LIMIT %s)", (older_than, batch))
    return deleted
