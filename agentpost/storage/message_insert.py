"""Writing a new message row: the message, its Message-ID references, its attachments,
the inbox's usage delta and the folder's UID, in one statement per copy (issue 12).

Split out of storage/mail.py (by job: this module writes new rows; mail.py reads and
changes them). Text values too large to quote whole go ahead in pieces
(storage.message_bodies), so a 10 MB body is never a 10 MB SQL literal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from agentpost.model.errors import MailboxFull
from agentpost.storage import message_bodies, usage
from agentpost.storage.database import Txn

MAIL_CHANNEL = "agentpost_mail"


async def insert_message(txn: Txn, row: dict[str, Any], *, quota: int = 0,
                         before: tuple[str, list[Any]] = ("", []),
                         attachments: list[dict[str, Any]] | None = None) -> tuple[int, int]:
    """Insert one message row (values prepared by core.ingest) with the folder's next UID
    and MODSEQ, its Message-ID references, its ``attachments`` (rows without
    ``message_id``), the inbox's storage use (a delta row, no lock on the inbox:
    storage.usage) and the folder wake-up, in ONE statement: the folder row stays
    locked from here to COMMIT, so nothing may come after it. ``before`` (sql, params)
    are statements sent ahead of it in the same round trip (the thread, the event).

    With ``quota`` (bytes, 0: none) the message is stored only if the inbox's use stays
    within it; otherwise nothing is written and :class:`MailboxFull` is raised.
    """
    lock_sql, lock_params = (before[0] + "; ", list(before[1])) if before[0] else ("", [])
    if quota:  # quota-checked writers to one inbox take turns (storage.usage)
        lock_sql += usage.quota_lock_sql() + "; "
        lock_params.append(row["inbox_id"])
    row = await message_bodies.send_large(txn, row)
    sql, params = _insert_message_sql(row, quota, attachments or [])
    found = await txn.fetchone(lock_sql + sql, [*lock_params, *params])
    if found is None or not found["charged"]:
        raise MailboxFull()
    if found["uid"] is None:
        raise LookupError("the folder of a new message vanished")
    return found["uid"], found["modseq"]


async def insert_messages(txn: Txn, copies: list[tuple[dict[str, Any], list[dict[str, Any]],
                                                       tuple[str, list[Any]]]]
                          ) -> dict[str, int]:
    """:func:`insert_message` (no quota) for many copies in ONE round trip: every
    ``before`` first (threads, events), then the message statements, so the folders'
    UID locks are taken together at the very end. Returns the UID of each message id
    stored; a copy missing from it was not stored (its inbox or folder vanished)."""
    sql: list[str] = []
    params: list[Any] = []
    copies = [(await message_bodies.send_large(txn, row), attachments, before)
              for row, attachments, before in copies]
    for _, _, before in copies:
        if before[0]:
            sql.append(before[0])
            params += before[1]
    # Folders are locked in (org, folder id) order whatever the batch's order, so two
    # batches over the same folders cannot deadlock; the sort is stable, so UIDs within
    # a folder follow the batch's order.
    for row, attachments, _ in sorted(copies, key=lambda c: (c[0]["org_id"],
                                                             c[0]["folder_id"])):
        one, one_params = _insert_message_sql(row, 0, attachments)
        sql.append(one)
        params += one_params
    sql.append("SELECT id, uid FROM messages WHERE org_id = ANY(%s) AND id = ANY(%s)")
    params += [sorted({row["org_id"] for row, _, _ in copies}),
               [row["id"] for row, _, _ in copies]]
    rows = await txn.fetchall("; ".join(sql), params)
    return {r["id"]: r["uid"] for r in rows}


def _insert_message_sql(row: dict[str, Any], quota: int,
                        attachments: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    row = {**row, "internal_date_zone": _zone_minutes(row.get("received_at"))}
    cols = list(row)
    values = [Json(v) if isinstance(v, dict | list) and c not in ("reference_ids", "labels",
                                                                   "envelope_to") else v
              for c, v in row.items()]
    att_sql, att_params = _attachments_cte(attachments)
    return (
        f"WITH q AS ({usage.charge_cte_sql()}), "
        "u AS (UPDATE folders SET uidnext = uidnext + 1, "
        "      highestmodseq = highestmodseq + 1 WHERE org_id = %s AND id = %s "
        "      AND EXISTS (SELECT 1 FROM q) "
        "      RETURNING uidnext - 1 AS uid, highestmodseq AS modseq), "
        f"m AS (INSERT INTO messages ({', '.join(cols)}, uid, modseq) "
        f"      SELECT {', '.join(['%s'] * len(cols))}, u.uid, u.modseq FROM u "
        "      RETURNING id, uid, modseq), "
        "r AS (INSERT INTO message_refs (org_id, inbox_id, ref, message_id) "
        "      SELECT DISTINCT %s, %s, ref, m.id FROM m, unnest(%s::text[]) AS ref) "
        f"{att_sql}"
        "SELECT (SELECT count(*) FROM q) AS charged, m.uid, m.modseq, "
        "       pg_notify(%s, %s) AS notified "
        "FROM (SELECT 1) AS one LEFT JOIN m ON true",
        [*usage.charge_params(row["org_id"], row["inbox_id"], row["size"], quota,
                              row["created_at"]),
         row["org_id"], row["folder_id"], *values, row["org_id"], row["inbox_id"],
         list(row["reference_ids"]), *att_params, MAIL_CHANNEL, str(row["folder_id"])])


def _zone_minutes(when: Any) -> int | None:
    """The UTC offset (minutes) an APPEND gave the internal date, so INTERNALDATE and
    SEARCH ON/BEFORE/SINCE keep its zone (issue 10); None (+0000) for UTC or no zone."""
    offset = when.utcoffset() if isinstance(when, datetime) else None
    minutes = int(offset.total_seconds() // 60) if offset else 0
    return minutes or None


_ATT_COLS = (("org_id", "text"), ("id", "text"), ("filename", "text"),
             ("mime_type", "text"), ("size", "bigint"), ("content_id", "text"),
             ("disposition", "text"), ("sha256", "text"), ("blob_key", "text"),
             ("part_index", "integer"))


def _attachments_cte(rows: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    """A CTE of :func:`insert_message` inserting the new message's attachment rows."""
    if not rows:
        return "", []
    names = [c for c, _ in _ATT_COLS]
    one = "(" + ", ".join(f"%s::{t}" for _, t in _ATT_COLS) + ")"
    params = [r[c] for r in rows for c in names]
    return (f", a AS (INSERT INTO attachments ({', '.join(names)}, message_id) "
            f"SELECT {', '.join('v.' + c for c in names)}, m.id FROM m, "
            f"(VALUES {', '.join([one] * len(rows))}) AS v({', '.join(names)})) ", params)
