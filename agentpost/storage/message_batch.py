"""A group-commit batch's message rows in ONE statement with ONE text (issue 12).

Why: psycopg2 quotes every parameter into the statement's text in the calling thread,
which holds the GIL. A 4 KiB delivery's message statement had 68 parameters (one
statement per copy), and quoting the batch's write was the largest single cost of the
MX's reactor thread measured with py-spy (``Cursor._doit``). Here every copy's row goes
in ONE JSON document (encoded by ujson in C; psycopg2 then quotes one string), unpacked
by PostgreSQL with ``jsonb_populate_recordset`` against the table's own row type, so the
statement's text does not depend on the batch's size either: it is prepared once
(storage.prepared) instead of once per batch size. The bodies, the widest values, go
beside the document in one ``text[]`` (:data:`TEXT_COLUMNS`): a quoted literal costs
PostgreSQL about half of what the same text costs as a JSON string.

PostgreSQL's side, measured on captured MX batches (backend CPU, both forms prepared):
from 3 copies on the one statement costs less than the per-copy ones (6-16 copies:
~0.4 against ~0.7 ms per message; 3-5: ~0.5 against ~0.8); for 1-2 copies its fixed
cost (parsing the document, the CTEs' sorts and hashes) is more (~1.0 against ~0.7), so
smaller batches keep the per-copy statements (:data:`BATCH_MIN_COPIES`). ``jsonb``
rather than ``json``: parsed once, where ``json`` is parsed again per row and per
``jsonb`` column (~15% more backend CPU).

What is stored is the same value for value: strings travel as JSON strings (exact,
emoji and backslashes included; the bodies as quoted literals, exact too), timestamps
and dates as the ISO text psycopg2 itself sends (``isoformat()``), lists as JSON arrays
into ``text[]`` or ``jsonb`` columns, None as null. A row this cannot carry exactly
-- a value JSON does not know (a body sent ahead in pieces, storage.message_bodies), or
a row without every column (JSON would give NULL where the table has a default) --
makes :func:`batch_insert_sql` answer None, and the caller writes one statement per
copy as before.

The statement does per row what storage.message_insert's per-copy statement does: a
usage delta if the inbox exists, the folder's next UID and MODSEQ (folders locked in
(org, id) order, UIDs within a folder in the batch's order), the message, its
Message-ID references (References and In-Reply-To: message_insert.message_refs) and
its attachments, and one folder wake-up per folder (NOTIFY
folds identical notifications in a transaction anyway).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from agentpost.storage.blob_body import split_body
from agentpost.storage.long_text import BlobText, long_text

try:
    import ujson
except ImportError:  # pragma: no cover - ujson comes with autobahn
    ujson = None  # type: ignore[assignment]

#: Batches with fewer copies are written one statement per copy (see above).
BATCH_MIN_COPIES = 3

#: The columns of a message row as core.ingest builds it (internal_date_zone is added
#: here); a row with another set of keys is written the old way.
ROW_COLUMNS = (
    "org_id", "id", "environment_id", "inbox_id", "thread_id", "folder_id", "direction",
    "message_id_header", "in_reply_to", "reference_ids", "subject", "from_address",
    "to_addresses", "cc_addresses", "bcc_addresses", "reply_to", "sent_at", "received_at",
    "headers", "text_body", "html_body", "extracted_text", "preview", "size",
    "raw_blob_key", "has_attachments", "seen", "flagged", "answered", "draft", "deleted",
    "labels", "imap_envelope", "imap_bodystructure", "imap_body", "imap_sections",
    "render_version", "envelope_from", "envelope_to", "created_at",
    "from_text", "to_text", "cc_text", "bcc_text", "sent_date", "sort_subject",
    "sort_from", "sort_to", "sort_cc", "sort_display_from", "sort_display_to")
_ROW_KEYS = frozenset(ROW_COLUMNS)
_INSERTED = (*ROW_COLUMNS, "internal_date_zone", "text_body_at")
_ATT_COLUMNS = ("org_id", "id", "filename", "mime_type", "size", "content_id",
                "disposition", "sha256", "blob_key", "part_index", "message_id")

#: The body columns, which travel beside the JSON rather than in it: a JSON string is
#: unescaped by PostgreSQL character by character (PostgreSQL 15), which for a 100 KiB
#: body cost the backend about as much again as reading the same text as a plain quoted
#: literal (measured: 150 KB of text, ~0.4-0.6 ms more per value). In the ``text[]``
#: parameter each copy has these three, in this order, at (ordinality - 1) * 3 + 1..3.
TEXT_COLUMNS = ("text_body", "html_body", "extracted_text")
#: What a body column may hold here: a body, or one read from the message's own bytes
#: by the server (storage.long_text.BlobText); both are quoted into the ``text[]``.
_TEXT_TYPES = (str, BlobText)


#: An inbox (``i``) may be written to while no other organization holds its domain as
#: a verified name. A route read at RCPT -- or kept by core.route_cache until a change's
#: notice arrives -- can name the former holder's inbox of a domain that has since
#: changed hands; its copy is then not written (NotStored: a temporary failure the
#: sender retries, and its next RCPT reads the new holder's answer), never stored with
#: the organization that no longer holds the name.
NAME_KEPT_SQL = ("NOT EXISTS (SELECT 1 FROM domains od WHERE od.name = lower(i.domain) "
                 "AND od.org_id <> i.org_id AND od.verified_at IS NOT NULL)")


def _select(col: str) -> str:
    """The INSERT's value for ``col``: from the JSON row, or from the bodies' arrays."""
    if col in TEXT_COLUMNS:
        return f"t.a[((c.ordinality - 1) * 3 + {TEXT_COLUMNS.index(col) + 1})::int]"
    if col == "text_body_at":
        return "t.b[c.ordinality::int]"
    return "c." + col


#: Params: the rows (a JSON array, batch order, without the body columns), their bodies
#: (TEXT_COLUMNS' values of each row in turn, a text[]), their text_body_at (an int[],
#: storage.blob_body), the attachment rows (a JSON array), the wake-up channel. ``c``:
#: the rows whose inbox exists and keeps its name (NAME_KEPT_SQL; those are charged, as
#: usage.charge_cte_sql does with no quota); ``l`` locks their folders in (org, id)
#: order -- the LockRows node runs above the sort -- before ``u`` moves each folder's
#: UIDNEXT and HIGHESTMODSEQ by its count; ``k`` numbers a folder's rows in batch order.
BATCH_INSERT_SQL = (
    "WITH d AS (SELECT * FROM jsonb_populate_recordset(NULL::messages, %s::jsonb) "
    "  WITH ORDINALITY AS d), "
    "t AS (SELECT %s::text[] AS a, %s::int[] AS b), "
    "c AS MATERIALIZED (SELECT d.*, row_number() OVER (PARTITION BY d.org_id, d.folder_id "
    "  ORDER BY d.ordinality) AS k FROM d WHERE EXISTS (SELECT 1 FROM inboxes i "
    f"  WHERE i.org_id = d.org_id AND i.id = d.inbox_id AND {NAME_KEPT_SQL})), "
    "q AS (INSERT INTO inbox_usage_deltas (org_id, inbox_id, bytes, created_at) "
    "  SELECT c.org_id, c.inbox_id, c.size, c.created_at FROM c ORDER BY c.ordinality), "
    "l AS (SELECT f.org_id, f.id FROM folders f "
    "  WHERE (f.org_id, f.id) IN (SELECT c.org_id, c.folder_id FROM c) "
    "  ORDER BY f.org_id, f.id FOR UPDATE OF f), "
    "u AS (UPDATE folders f SET uidnext = f.uidnext + g.n, "
    "  highestmodseq = f.highestmodseq + g.n "
    "  FROM (SELECT c.org_id, c.folder_id, count(*) AS n FROM c GROUP BY 1, 2) AS g, l "
    "  WHERE f.org_id = g.org_id AND f.id = g.folder_id AND l.org_id = f.org_id "
    "  AND l.id = f.id "
    "  RETURNING f.org_id, f.id, f.uidnext - g.n AS uid0, f.highestmodseq - g.n AS modseq0), "
    f"m AS (INSERT INTO messages ({', '.join(_INSERTED)}, uid, modseq) "
    f"  SELECT {', '.join(_select(col) for col in _INSERTED)}, u.uid0 + c.k - 1, "
    "  u.modseq0 + c.k FROM c JOIN u ON u.org_id = c.org_id AND u.id = c.folder_id "
    "  CROSS JOIN t "
    "  RETURNING org_id, id, inbox_id, folder_id, reference_ids, in_reply_to), "
    "r AS (INSERT INTO message_refs (org_id, inbox_id, ref, message_id) "
    "  SELECT DISTINCT m.org_id, m.inbox_id, x.ref, m.id FROM m, "
    "  unnest(array_append(m.reference_ids, m.in_reply_to)) AS x(ref) "
    "  WHERE x.ref IS NOT NULL), "
    f"a AS (INSERT INTO attachments ({', '.join(_ATT_COLUMNS)}) "
    f"  SELECT {', '.join('a.' + col for col in _ATT_COLUMNS)} "
    "  FROM jsonb_populate_recordset(NULL::attachments, %s::jsonb) AS a "
    "  JOIN m ON m.org_id = a.org_id AND m.id = a.message_id) "
    "SELECT pg_notify(%s, w.folder_id::text) FROM (SELECT DISTINCT folder_id FROM m) AS w")


def batch_insert_sql(copies: list[tuple[dict[str, Any], list[dict[str, Any]]]],
                     channel: str) -> tuple[str, list[Any]] | None:
    """(sql, params) writing every (row, attachments) of ``copies`` (in the order their
    UIDs are given within a folder), or None when a row cannot travel as JSON exactly
    (the caller then writes one statement per copy)."""
    if not copies:
        return None
    rows: list[dict[str, Any]] = []
    texts: list[str | None] = []
    ats: list[Any] = []
    atts: list[dict[str, Any]] = []
    for row, attachments in copies:
        if row.keys() != _ROW_KEYS:
            return None
        bodies = [row[col] for col in TEXT_COLUMNS]
        if not all(body is None or type(body) in _TEXT_TYPES for body in bodies):
            return None  # a body sent ahead in pieces (storage.message_bodies)
        bodies[0], at = split_body(bodies[0])  # TEXT_COLUMNS[0]: text_body
        ats.append(at)
        texts += (long_text(body) for body in bodies)
        doc = {**row, "internal_date_zone": zone_minutes(row["received_at"])}
        for col in TEXT_COLUMNS:
            del doc[col]
        rows.append(doc)
        atts += ({**att, "message_id": row["id"]} for att in attachments)
    docs = json_rows(rows), json_rows(atts)
    if docs[0] is None or docs[1] is None:
        return None  # a value JSON cannot carry: the per-copy statements
    return BATCH_INSERT_SQL, [docs[0], texts, ats, docs[1], channel]


def json_rows(rows: list[dict[str, Any]]) -> str | None:
    """Rows as one JSON array for a ``*_populate_recordset`` parameter (ujson, in C), or
    None when they cannot travel that way exactly: no ujson, or a value JSON does not
    know. (A lone surrogate stays in the text: psycopg2 refuses it there, as it refuses
    it in a per-row statement.)"""
    if ujson is None:
        return None
    try:
        return str(ujson.dumps(rows, ensure_ascii=False, escape_forward_slashes=False,
                               default=_iso))
    except (TypeError, ValueError, OverflowError):
        return None


def _iso(value: Any) -> str:
    """Timestamps and dates as psycopg2 sends them (``isoformat()``: microseconds and
    the UTC offset kept; a naive value is read in the session's time zone, as before)."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def zone_minutes(when: Any) -> int | None:
    """The UTC offset (minutes) an APPEND gave the internal date, so INTERNALDATE and
    SEARCH ON/BEFORE/SINCE keep its zone (issue 10); None (+0000) for UTC or no zone."""
    offset = when.utcoffset() if isinstance(when, datetime) else None
    minutes = int(offset.total_seconds() // 60) if offset else 0
    return minutes or None
