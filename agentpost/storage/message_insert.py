"""Writing a new message row: the message, its Message-ID references, its attachments,
the inbox's usage delta and the folder's UID, in one statement per copy (issue 12); and
for the MX's group commit (core.group_commit), a whole batch staged in one statement
(:func:`prepare_deliveries`) and written with its COMMIT in one more (its message rows
as one JSON parameter from three copies on: storage.message_batch).

Split out of storage/mail.py (by job: this module writes new rows; mail.py reads and
changes them). Text values too large to quote whole go ahead in pieces
(storage.message_bodies), so a 10 MB body is never a 10 MB SQL literal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors

from agentpost.model.errors import MailboxFull
from agentpost.storage import copy_rows, message_bodies, usage
from agentpost.storage.blob_body import split_row
from agentpost.storage.blob_lead import write_ahead
from agentpost.storage.copy_rows import CopyRows, Statements
from agentpost.storage.database import Txn, json_param
from agentpost.storage.long_text import inline_columns, long_text
from agentpost.storage.message_batch import (
    BATCH_MIN_COPIES,
    NAME_KEPT_SQL,
    TEXT_COLUMNS,
    batch_insert_sql,
    zone_minutes,
)

MAIL_CHANNEL = "agentpost_mail"


async def insert_message(txn: Txn, row: dict[str, Any], *, quota: int = 0,
                         before: tuple[str, list[Any]] = ("", []),
                         attachments: list[dict[str, Any]] | None = None,
                         commit: bool = False) -> tuple[int, int]:
    """Insert one message row (values prepared by core.ingest) with the folder's next UID
    and MODSEQ, its Message-ID references, its ``attachments`` (rows without
    ``message_id``), the inbox's storage use (a delta row, no lock on the inbox:
    storage.usage) and the folder wake-up, in ONE statement: the folder row stays
    locked from here to COMMIT, so nothing may come after it. ``before`` (sql, params)
    are statements sent ahead of it in the same round trip (the thread, the event).

    With ``quota`` (bytes, 0: none) the message is stored only if the inbox's use stays
    within it; otherwise nothing is written and :class:`MailboxFull` is raised.

    With ``commit`` the same round trip commits the transaction (Txn.commit_with): the
    folder's UID lock is held through no further exchange, and a single delivery (an
    IMAP APPEND) costs one round trip less. A message not written then fails the
    transaction before its COMMIT, so nothing sent ahead of it commits either.
    """
    lock_sql, lock_params = (before[0] + "; ", list(before[1])) if before[0] else ("", [])
    if quota:  # quota-checked writers to one inbox take turns (storage.usage)
        lock_sql += usage.quota_lock_sql() + "; "
        lock_params.append(row["inbox_id"])
    row = await message_bodies.send_large(txn, row)
    sql, params = _insert_message_sql(row, quota, attachments or [])
    if commit:
        return await _insert_and_commit(txn, row, lock_sql + sql, [*lock_params, *params])
    found = await txn.fetchone(lock_sql + sql, [*lock_params, *params])
    if found is None or not found["charged"]:
        raise MailboxFull()
    if found["uid"] is None:
        raise LookupError("the folder of a new message vanished")
    return found["uid"], found["modseq"]


#: After a single message's insert (``commit``): fails the transaction when the row was
#: not written, saying whether its folder is still there (else the quota refused it).
_ONE_STORED_SQL = (
    "SELECT ('agentpost: not stored: ' || CASE WHEN EXISTS (SELECT 1 FROM folders "
    "  WHERE org_id = %s AND id = %s) AND EXISTS (SELECT 1 FROM inboxes i "
    f"  WHERE i.org_id = %s AND i.id = %s AND {NAME_KEPT_SQL}) "
    "  THEN 'quota' ELSE 'folder' END)::int "
    "WHERE NOT EXISTS (SELECT 1 FROM messages WHERE org_id = %s AND id = %s)")
_ONE_STORED_RESULT = ("SELECT json_build_array(uid, modseq) FROM messages "
                      "WHERE org_id = %s AND id = %s")


async def _insert_and_commit(txn: Txn, row: dict[str, Any], sql: str,
                             params: list[Any]) -> tuple[int, int]:
    org, folder, msg = row["org_id"], row["folder_id"], row["id"]
    try:
        found = await txn.commit_with(f"{sql}; {_ONE_STORED_SQL}",
                                      [*params, org, folder, org, row["inbox_id"], org, msg],
                                      _ONE_STORED_RESULT, [org, msg])
    except psycopg2.errors.InvalidTextRepresentation as exc:
        why = _NOT_STORED.search(str(exc))
        if why is None:
            raise
        if why.group(1) == "quota":
            raise MailboxFull() from exc
        raise LookupError("the folder of a new message vanished") from exc
    return int(found[0]), int(found[1])


class NotStored(LookupError):
    """A message of a batch was not written (its inbox or folder vanished)."""

    def __init__(self, message_id: str) -> None:
        super().__init__("the folder of a new message vanished")
        self.message_id = message_id


#: After a batch's inserts and before its COMMIT: fails the transaction (and names the
#: message) when a message row was not written, so that nothing of it (its thread, its
#: event) commits. Plain SQL cannot raise; a failed cast carries our text instead.
_ALL_STORED_SQL = (
    "SELECT ('" + "agentpost: not stored: ' || x.id)::int FROM unnest(%s::text[]) AS x(id) "
    "LEFT JOIN LATERAL (SELECT true AS found FROM messages m "
    "  WHERE m.org_id = ANY(%s) AND m.id = x.id LIMIT 1) AS f ON true "
    "WHERE f.found IS NULL")
_NOT_STORED = re.compile(r"agentpost: not stored: ([A-Za-z0-9_]+)")
#: Each stored id's UID (params: the ids, the orgs), one index probe per id: a generic
#: plan of ``id = ANY(...)`` made while the table was small scans the whole table until
#: the statement is prepared again (storage.prepared), and the group commit's transaction
#: forces generic plans (pg_stat_statements, submission bench: 0.53 ms a batch, now 0.16).
_UIDS_FROM = ("FROM unnest(%s::text[]) AS x(id) JOIN LATERAL (SELECT m.uid FROM messages m "
              "  WHERE m.org_id = ANY(%s) AND m.id = x.id LIMIT 1) AS f ON true")
_UIDS_SQL = "SELECT json_object_agg(x.id, f.uid) " + _UIDS_FROM


async def insert_messages(txn: Txn, copies: list[tuple[dict[str, Any], list[dict[str, Any]],
                                                       CopyRows | Statements]], *,
                          commit: bool = False,
                          lead: tuple[str, list[Any]] = ("", [])) -> dict[str, int]:
    """:func:`insert_message` (no quota) for many copies in ONE round trip: every
    ``before`` first (threads, events; from three copies on, each kind in one statement:
    storage.copy_rows), then the message statements, so the folders'
    UID locks are taken together at the very end. Returns the UID of each message id
    stored; a copy missing from it was not stored (its inbox or folder vanished).

    With ``commit`` the same round trip commits the transaction (Txn.commit_with), so
    the UID locks are held through no further exchange; a copy that was not stored then
    fails the transaction first (:class:`NotStored`, naming it), nothing is committed.

    ``lead`` (sql, params) goes first in the same round trip: a delivery staged without
    asking (:func:`guessed_delivery_sql`); when its guess was wrong nothing is written
    and :class:`StaleGuess` is raised."""
    sql: list[str] = [lead[0]] if lead[0] else []
    params: list[Any] = list(lead[1])
    copies = [(await message_bodies.send_large(txn, row), attachments, before)
              for row, attachments, before in copies]
    before_sql, before_params = copy_rows.statements(
        [before for _, _, before in copies], batched=len(copies) >= BATCH_MIN_COPIES)
    sql += before_sql
    params += before_params
    # Folders are locked in (org, folder id) order whatever the batch's order, so two
    # batches over the same folders cannot deadlock; the sort is stable, so UIDs within
    # a folder follow the batch's order.
    ordered = sorted(copies, key=lambda c: (c[0]["org_id"], c[0]["folder_id"]))
    batch = batch_insert_sql([(row, attachments) for row, attachments, _ in ordered],
                             MAIL_CHANNEL) if len(ordered) >= BATCH_MIN_COPIES else None
    if batch is not None:
        sql.append(batch[0])
        params += batch[1]
    else:  # few copies, or a value JSON cannot carry exactly: one statement per copy
        for row, attachments, _ in ordered:
            one, one_params = _insert_message_sql(row, 0, attachments)
            sql.append(one)
            params += one_params
    orgs = sorted({row["org_id"] for row, _, _ in copies})
    ids = [row["id"] for row, _, _ in copies]
    if not commit:
        sql.append("SELECT x.id, f.uid " + _UIDS_FROM)
        rows = await txn.fetchall("; ".join(sql), [*params, ids, orgs])
        return {r["id"]: r["uid"] for r in rows}
    sql.append(_ALL_STORED_SQL)
    try:
        found = await txn.commit_with("; ".join(sql), [*params, ids, orgs], _UIDS_SQL,
                                      [ids, orgs])
    except psycopg2.errors.InvalidTextRepresentation as exc:
        if lead[0] and _STALE_GUESS in str(exc):  # without a guess: never (a retry loop)
            raise StaleGuess() from exc
        missing = _NOT_STORED.search(str(exc))
        if missing is None:
            raise
        raise NotStored(missing.group(1)) from exc
    return {key: int(uid) for key, uid in (found or {}).items()}


class StaleGuess(LookupError):
    """A delivery staged from what the process remembered (:func:`guessed_delivery_sql`)
    met a database that no longer matches it: nothing was written; stage it by asking."""

    def __init__(self) -> None:
        super().__init__("a delivery's remembered folder or thread no longer holds")


_STALE_GUESS = "agentpost: stale guess"
#: What a guessed delivery leads its write with: the statements of
#: :data:`_PREPARE_DELIVERIES_SQL` that need no answer (the generic plans, the blobs'
#: locks in key order, their references counted), then a check of each copy's guess:
#: its folder is still the one remembered (same id, name and UIDVALIDITY, in its inbox)
#: and no stored message of the inbox references its Message-ID, so it starts a thread
#: (what the staging's thread lookup finds for a message that names no parent). A
#: failed check fails the transaction before anything of the delivery is written.
_GUESSED_DELIVERY_SQL = (
    "SET LOCAL plan_cache_mode TO force_generic_plan; "
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 7)) "
    "FROM (SELECT k FROM unnest(%s::text[]) AS k ORDER BY k) AS s; "
    "INSERT INTO blobs (key, size, refcount, created_at, data, utf8) "
    "  SELECT k, s, n, %s, d, u "
    "  FROM unnest(%s::text[], %s::bigint[], %s::int[], %s::bytea[], %s::bool[]) "
    "  AS x(k, s, n, d, u) "
    "  ON CONFLICT (key) DO UPDATE SET refcount = blobs.refcount + EXCLUDED.refcount; "
    f"SELECT ('{_STALE_GUESS}' || left(x.org, 0))::int "  # a constant would fail at once
    "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::text[]) "
    "  AS x(org, inbox, folder, name, uidvalidity, msgid) "
    "WHERE NOT EXISTS (SELECT 1 FROM folders f WHERE f.org_id = x.org AND f.id = x.folder "
    "    AND f.inbox_id = x.inbox AND f.name = x.name AND f.uidvalidity = x.uidvalidity) "
    "  OR EXISTS (SELECT 1 FROM message_refs r JOIN messages m ON m.org_id = r.org_id "
    "    AND m.id = r.message_id WHERE r.org_id = x.org AND r.inbox_id = x.inbox "
    "    AND r.ref = x.msgid)")


async def guessed_delivery_sql(txn: Txn, probes: list[DeliveryProbe],
                               folders: list[dict[str, Any]], *,
                               overlap: bool = False) -> tuple[str, list[Any]]:
    """The ``lead`` of :func:`insert_messages` for a delivery staged without asking:
    each copy (``probes``, none naming a parent) goes to the folder the process
    remembers for it (``folders``, in the same order) and starts a new thread. Only for
    blobs kept in PostgreSQL (``probe.inline``): a blob in the store whose row is new
    must be checked in the store first, which needs the staging's answer. Large message
    bytes are written before (storage.blob_lead), in the transaction's first round
    trip; ``overlap``: without waiting for its answer (the caller builds the rest
    meanwhile)."""
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    inline: dict[str, bytes] = {}
    for probe in probes:
        if probe.related:
            raise ValueError("a reply's thread is looked up, never guessed")
        for key, size in probe.blobs:
            if key not in probe.inline:
                raise ValueError("only blobs kept in PostgreSQL are referenced unasked")
            counts[key] = counts.get(key, 0) + 1
            sizes[key] = size
        inline.update(probe.inline)
    keys = sorted(counts)
    data = await write_ahead(txn, keys, inline, wait=not overlap)
    return _GUESSED_DELIVERY_SQL, [
        keys, txn.now, keys, [sizes[k] for k in keys], [counts[k] for k in keys],
        *inline_columns(data),
        [p.org_id for p in probes],
        [p.inbox_id for p in probes],
        [f["id"] for f in folders], [f["name"] for f in folders],
        [f["uidvalidity"] for f in folders], [p.message_id for p in probes]]


@dataclass(frozen=True)
class DeliveryProbe:
    """What one copy of a batched delivery asks :func:`prepare_deliveries`: its blobs
    (key, size), its inbox's folder, and the thread probes of its Message-ID and of
    the ids it replies to or references (``related``)."""

    org_id: str
    inbox_id: str
    folder_name: str
    blobs: list[tuple[str, int]]
    message_id: str | None
    related: list[str]
    #: the bytes of the blobs kept in PostgreSQL (storage.blobs.inline), by key
    inline: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class DeliveryAnswer:
    """:func:`prepare_deliveries`' answer for one copy: ``folder`` (id, name,
    special_use, uidvalidity; None when missing), ``thread_id`` (None: a new thread)
    and ``new_blobs``, the copy's blob keys whose row the batch created.

    ``thread_kind`` says how the stored thread was found: 0, a parent's; 1, a message
    that referenced this one. ``starts_thread``: ``thread_id`` is a new thread's, which
    this copy starts (core.batch_threads: a later copy of the batch replies to it)."""

    folder: dict[str, Any] | None
    thread_id: str | None
    new_blobs: list[str]
    thread_kind: int | None = None
    starts_thread: bool = False


#: prepare_deliveries' text: one shape for every batch (arrays, never a list of values),
#: so it is prepared once. Blob locks in key order, then every reference counted in one
#: upsert; per copy its folder, and its thread: the earliest parent found (``p``, one
#: index probe per referenced id), else the earliest message that referenced it, as
#: [kind, thread id] (kind 0: a parent's, 1: a referrer's).
#: The batch's transaction uses generic plans from here on (SET LOCAL, so until its
#: COMMIT): PostgreSQL would plan this statement afresh for every batch smaller than the
#: ten rows a generic plan assumes for an array (0.3-0.5 ms each, measured), although
#: its shape -- lateral index probes per row -- is the same whatever the count; the
#: write's statements settle on generic plans anyway.
_PREPARE_DELIVERIES_SQL = (
    "SET LOCAL plan_cache_mode TO force_generic_plan; "
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 7)) "
    "FROM (SELECT k FROM unnest(%s::text[]) AS k ORDER BY k) AS s; "
    "WITH b AS (INSERT INTO blobs (key, size, refcount, created_at, data, utf8) "
    "  SELECT k, s, n, %s, d, u "
    "  FROM unnest(%s::text[], %s::bigint[], %s::int[], %s::bytea[], %s::bool[]) "
    "  AS x(k, s, n, d, u) "
    "  ON CONFLICT (key) DO UPDATE SET refcount = blobs.refcount + EXCLUDED.refcount "
    "  RETURNING key, (xmax = 0) AS inserted), "
    "p AS (SELECT p.i, y.id, y.thread_id "
    "  FROM unnest(%s::int[], %s::text[], %s::text[], %s::text[]) AS p(i, org, inbox, ref) "
    "  CROSS JOIN LATERAL (SELECT m.id, m.thread_id FROM messages m "
    "    WHERE m.org_id = p.org AND m.inbox_id = p.inbox AND m.message_id_header = p.ref "
    "    LIMIT 1) AS y) "
    "SELECT CASE WHEN x.i = 1 THEN ARRAY(SELECT key FROM b WHERE inserted) END AS new_blobs, "
    "  (SELECT row_to_json(f) FROM (SELECT id, name, special_use, uidvalidity FROM folders "
    "     WHERE org_id = x.org AND inbox_id = x.inbox AND name = x.folder) AS f) AS folder, "
    "  (SELECT json_build_array(t.kind, t.thread_id) FROM ("
    "     SELECT 0 AS kind, p.id, p.thread_id FROM p WHERE p.i = x.i "
    "     UNION ALL (SELECT 1, r.message_id, m.thread_id FROM message_refs r "
    "       JOIN messages m ON m.org_id = r.org_id AND m.id = r.message_id "
    "       WHERE r.org_id = x.org AND r.inbox_id = x.inbox AND r.ref = x.msgid "
    "       ORDER BY r.message_id LIMIT 1)) AS t "
    "   ORDER BY t.kind, t.id LIMIT 1) AS thread "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) "
    "  WITH ORDINALITY AS x(org, inbox, folder, msgid, i) ORDER BY x.i")


async def prepare_deliveries(txn: Txn, probes: list[DeliveryProbe]) -> list[DeliveryAnswer]:
    """:func:`prepare_delivery` for every copy of a batch (core.group_commit) in ONE
    round trip, answers in ``probes``' order. The blobs of all copies are referenced
    together (a key may repeat, in a copy or across copies), under their advisory
    locks taken in key order; the thread found for a copy is the one
    storage.threads.find_thread would find."""
    if not probes:
        return []
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    inline: dict[str, bytes] = {}
    pairs: tuple[list[int], list[str], list[str], list[str]] = ([], [], [], [])
    for i, probe in enumerate(probes, 1):
        for key, size in probe.blobs:
            counts[key] = counts.get(key, 0) + 1
            sizes[key] = size
        inline.update(probe.inline)
        for ref in probe.related:
            pairs[0].append(i)
            pairs[1].append(probe.org_id)
            pairs[2].append(probe.inbox_id)
            pairs[3].append(ref)
    keys = sorted(counts)
    data = await write_ahead(txn, keys, inline)
    rows = await txn.fetchall(_PREPARE_DELIVERIES_SQL, [
        keys, txn.now, keys, [sizes[k] for k in keys], [counts[k] for k in keys],
        *inline_columns(data), *pairs,
        [p.org_id for p in probes], [p.inbox_id for p in probes],
        [p.folder_name for p in probes], [p.message_id for p in probes]])
    new = set(rows[0]["new_blobs"] or ()) if rows else set()
    return [DeliveryAnswer(row["folder"], row["thread"][1] if row["thread"] else None,
                           sorted({key for key, _ in probe.blobs if key in new}),
                           row["thread"][0] if row["thread"] else None)
            for probe, row in zip(probes, rows, strict=True)]


#: list values of a message row that are PostgreSQL arrays (the other lists are jsonb).
_ARRAY_COLUMNS = frozenset({"reference_ids", "labels", "envelope_to"})
#: The columns that may hold a whole body (quoted by storage.long_text).
_BODY_COLUMNS = frozenset(TEXT_COLUMNS)


def _insert_message_sql(row: dict[str, Any], quota: int,
                        attachments: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    row = split_row({**row, "internal_date_zone": zone_minutes(row.get("received_at"))})
    cols = list(row)
    values = [json_param(v) if isinstance(v, dict | list) and c not in _ARRAY_COLUMNS
              else long_text(v) if c in _BODY_COLUMNS else v for c, v in row.items()]
    att_sql, att_params = _attachments_cte(attachments)
    return (
        f"WITH q AS ({usage.charge_cte_sql()}), "
        "u AS (UPDATE folders SET uidnext = uidnext + 1, "
        "      highestmodseq = highestmodseq + 1 WHERE org_id = %s AND id = %s "
        "      AND EXISTS (SELECT 1 FROM q) AND EXISTS (SELECT 1 FROM inboxes i "
        f"      WHERE i.org_id = %s AND i.id = %s AND {NAME_KEPT_SQL}) "
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
         row["org_id"], row["folder_id"], row["org_id"], row["inbox_id"], *values,
         row["org_id"], row["inbox_id"],
         message_refs(row), *att_params, MAIL_CHANNEL, str(row["folder_id"])])


def message_refs(row: Mapping[str, Any]) -> list[str]:
    """The Message-IDs a new message refers to, as ``message_refs`` records them (what a
    later message finds it by: storage.threads' children): its References and its
    In-Reply-To. A reply that names its parent only in In-Reply-To (clients may) and
    arrives before it would otherwise never be found by it, and the two would not be
    threaded."""
    refs = list(row["reference_ids"] or ())
    if row.get("in_reply_to") and row["in_reply_to"] not in refs:
        refs.append(row["in_reply_to"])
    return refs


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
