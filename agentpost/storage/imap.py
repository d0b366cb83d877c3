"""IMAP views of the mail tables: folders by name, UID-addressed messages, flags, search."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import psycopg2
import psycopg2.errors

from agentpost.mail import keywords as kw
from agentpost.model.errors import Conflict, InvalidRequest
from agentpost.storage.blob_body import body_sql
from agentpost.storage.database import Txn
from agentpost.storage.mail import (
    folder_list_key,
    mark_expunged,
    notify_folder,
    notify_folder_list,
)
from agentpost.storage.message_insert import MAIL_CHANNEL
from agentpost.storage.prepared import GENERIC_PLANS

SYSTEM_FLAGS = {"\\Seen": "seen", "\\Flagged": "flagged", "\\Answered": "answered",
                "\\Draft": "draft", "\\Deleted": "deleted"}
#: What a session needs of a message: UID, MODSEQ and flags (keywords folded in
#: ``labels``; their first-seen spellings are not read per row: they never change, and
#: core.imap_spellings knows them, reading only those it has not seen yet).
_META = "uid, modseq, seen, flagged, answered, draft, deleted, labels"
#: The text body, wherever the row keeps it (storage.blob_body).
_BODY = body_sql()
#: Folders one inbox may hold (system folders included): without a cap one IMAP session
#: could grow the table, and every LIST of the inbox, without end (as subscriptions).
MAX_FOLDERS_PER_INBOX = 5000
#: The \\Recent mark of the folder row ``f`` (migration 0029: a row of its own, which
#: the first claim creates; none yet means 0).
_RECENT_OF_F = ("COALESCE((SELECT r.recent_uid FROM folder_recent r WHERE r.org_id = f.org_id "
                "AND r.folder_id = f.id), 0)")


def flags_of(row: dict[str, Any],
             spellings: Mapping[str, str] | None = None) -> frozenset[str]:
    """IMAP flags of a message row: system flags from columns, keywords from the folded
    ``labels`` shown in the inbox's first-seen spelling, from ``spellings`` (folded ->
    spelling, each folding back to its keyword: core.imap_spellings resolves them for
    the rows of a read, storage.keywords.remember for keywords a change just added);
    a keyword without one shows folded.

    A folder has few distinct flag combinations, so equal sets are one shared object
    (a session selecting 10,000 messages kept 10,000 frozensets of ~200 bytes each)."""
    labels = tuple(row["labels"])
    if labels and spellings:
        labels = tuple([spellings.get(k, k) for k in labels])
    return _flag_set(row["seen"], row["flagged"], row["answered"], row["draft"],
                     row["deleted"], labels)


@functools.lru_cache(maxsize=4096)
def _flag_set(seen: bool, flagged: bool, answered: bool, draft: bool, deleted: bool,
              labels: tuple[str, ...]) -> frozenset[str]:
    out = set(labels)
    for flag, on in (("\\Seen", seen), ("\\Flagged", flagged), ("\\Answered", answered),
                     ("\\Draft", draft), ("\\Deleted", deleted)):
        if on:
            out.add(flag)
    return frozenset(out)


def uid_array(uids: list[int] | None) -> str | None:
    """UIDs as ONE bigint[] literal ('{1,2,3}'): psycopg2 sends a list as ARRAY[1,2,3],
    an expression of as many constants, which PostgreSQL parses and plans item by item
    (a session's 300 known UIDs after every command) and which makes every length a
    different statement text."""
    if uids is None:
        return None
    return "{" + ",".join(map(str, uids)) + "}"


async def list_folders(txn: Txn, org_id: str, inbox_id: str) -> list[dict[str, Any]]:
    """Every folder of an inbox, with whether it has children and is subscribed
    (storage.subscriptions; a subscription may also name no folder)."""
    return await txn.fetchall(
        "SELECT f.id, f.name, f.special_use, EXISTS (SELECT 1 FROM mailbox_subscriptions s "
        "WHERE s.org_id = f.org_id AND s.inbox_id = f.inbox_id AND s.name = f.name) "
        "AS subscribed, EXISTS (SELECT 1 FROM folders c WHERE c.org_id = f.org_id AND "
        "c.inbox_id = f.inbox_id AND starts_with(c.name, f.name || '/')) AS has_children "
        "FROM folders f WHERE f.org_id = %s AND f.inbox_id = %s ORDER BY f.name",
        (org_id, inbox_id))


async def get_folder(txn: Txn, org_id: str, inbox_id: str, name: str, *,
                     for_update: bool = False) -> dict[str, Any] | None:
    """A folder by name (INBOX matched case-insensitively, as RFC 3501 requires)."""
    lock = " FOR UPDATE" if for_update else ""
    return await txn.fetchone(
        "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq, "
        f"{_RECENT_OF_F} AS recent_uid FROM folders f WHERE org_id = %s AND inbox_id = %s "
        "AND (name = %s OR (upper(%s) = 'INBOX' AND name = 'INBOX'))" + lock,
        (org_id, inbox_id, name, name))


async def get_folder_by_id(txn: Txn, org_id: str, inbox_id: str,
                           folder_id: int) -> dict[str, Any] | None:
    """A folder by id, within the inbox."""
    return await txn.fetchone(
        "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq FROM folders "
        "WHERE org_id = %s AND inbox_id = %s AND id = %s", (org_id, inbox_id, folder_id))


async def create_folder(txn: Txn, org_id: str, environment_id: str, inbox_id: str,
                        name: str) -> None:
    """A user folder; an existing name is a Conflict ([ALREADYEXISTS]). Its UIDVALIDITY
    is the column default (a fresh sequence value, migration 0011): a folder deleted and
    created again, even within one second, never gets the old value back. It is not
    subscribed (RFC 3501 §6.3.3; storage.subscriptions). An inbox that already holds
    :data:`MAX_FOLDERS_PER_INBOX` folders gets no more (InvalidRequest)."""
    try:
        added = await txn.execute(
            "INSERT INTO folders (org_id, environment_id, inbox_id, name, created_at) "
            "SELECT %s, %s, %s, %s, %s WHERE (SELECT count(*) FROM folders "
            "WHERE org_id = %s AND inbox_id = %s) < %s",
            (org_id, environment_id, inbox_id, name, txn.now, org_id, inbox_id,
             MAX_FOLDERS_PER_INBOX))
    except psycopg2.errors.UniqueViolation:
        raise Conflict("Folder already exists.") from None
    if not added:
        raise InvalidRequest(f"An inbox holds at most {MAX_FOLDERS_PER_INBOX} folders.")
    await notify_folder_list(txn, inbox_id)


async def delete_folder(txn: Txn, org_id: str, folder_id: int) -> None:
    """Remove a folder row (its messages must already be gone); wakes the inbox's
    folder-list watchers (IMAP NOTIFY)."""
    await txn.execute(
        "WITH d AS (DELETE FROM folders WHERE org_id = %s AND id = %s RETURNING inbox_id) "
        "SELECT pg_notify(%s, %s || d.inbox_id) FROM d",
        (org_id, folder_id, MAIL_CHANNEL, folder_list_key("")))


async def rename_folder(txn: Txn, org_id: str, inbox_id: str, old: str, new: str) -> None:
    """Rename a folder and its children; a fresh UIDVALIDITY is not needed (UIDs stay)."""
    try:
        await txn.execute(
            "UPDATE folders SET name = %s || substr(name, length(%s) + 1) "
            "WHERE org_id = %s AND inbox_id = %s AND (name = %s OR "
            "starts_with(name, %s || '/'))", (new, old, org_id, inbox_id, old, old))
    except psycopg2.errors.UniqueViolation:
        raise Conflict("Folder already exists.") from None
    await notify_folder_list(txn, inbox_id)


async def folder_meta(txn: Txn, org_id: str, folder_id: int) -> list[dict[str, Any]]:
    """UID, MODSEQ and flags of every message in a folder, ascending UID."""
    return await txn.fetchall(
        f"SELECT {_META} FROM messages WHERE org_id = %s AND folder_id = %s ORDER BY uid",
        (org_id, folder_id))


async def select_folder(txn: Txn, org_id: str, inbox_id: str, name: str,
                        since: tuple[int, int] = (-1, -1)
                        ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """SELECT/EXAMINE's reads in ONE statement (one snapshot, so no transaction, and
    one round trip instead of four): the folder by name (as :func:`get_folder`, with
    its \\Recent mark) and the UID, MODSEQ and flags of every message, ascending UID.

    When the folder is ``since``'s (its id, and a MODSEQ the caller has every message
    at -- core.imap_poll's mirror) only what changed after it: the messages above that
    MODSEQ, and the UIDs still present (``folder["present"]``) if something left since;
    ``folder["delta"]`` tells which answer it is."""
    rows = await txn.fetchall(
        f"{GENERIC_PLANS}; "
        "SELECT f.id AS folder_id, f.name AS folder_name, f.uidvalidity, f.uidnext, "
        "f.highestmodseq, f.expunged_modseq, COALESCE(r.recent_uid, 0) AS recent_uid, "
        "pr.present, m.* FROM folders f "
        "LEFT JOIN folder_recent r ON r.org_id = f.org_id AND r.folder_id = f.id "
        # once per folder row, not per message row
        "LEFT JOIN LATERAL (SELECT CASE WHEN f.id = %s AND f.expunged_modseq > %s THEN "
        "(SELECT COALESCE(array_agg(p.uid), '{}')::bigint[] FROM messages p "
        "WHERE p.folder_id = f.id) END AS present) pr ON true "
        f"LEFT JOIN LATERAL (SELECT {_META} FROM messages WHERE org_id = f.org_id "
        "AND folder_id = f.id AND f.id <> %s "
        f"UNION ALL SELECT {_META} FROM messages WHERE folder_id = f.id AND f.id = %s "
        "AND f.highestmodseq > %s AND modseq > %s) m ON true "
        "WHERE f.org_id = %s AND f.inbox_id = %s "
        "AND (f.name = %s OR (upper(%s) = 'INBOX' AND f.name = 'INBOX')) ORDER BY m.uid",
        (since[0], since[1], since[0], since[0], since[1], since[1], org_id, inbox_id,
         name, name))
    if not rows:
        return None, []
    first = rows[0]
    folder = {"id": first["folder_id"], "name": first["folder_name"],
              "uidvalidity": first["uidvalidity"], "uidnext": first["uidnext"],
              "highestmodseq": first["highestmodseq"], "recent_uid": first["recent_uid"],
              "expunged_modseq": first["expunged_modseq"] or 0,
              "present": first["present"], "delta": first["folder_id"] == since[0]}
    return folder, [r for r in rows if r["uid"] is not None]


async def deleted_uids(txn: Txn, org_id: str, inbox_id: str, folder_id: int,
                       uids: list[int] | None) -> list[int] | None:
    """UIDs flagged \\Deleted (among ``uids`` when given), ascending: what EXPUNGE would
    remove, read without a lock in one statement (None: the folder is gone)."""
    among, params = _uid_filter(uids)
    row = await txn.fetchone(
        "SELECT ARRAY(SELECT uid FROM messages WHERE org_id = f.org_id AND folder_id = f.id "
        f"AND deleted{among} ORDER BY uid) "
        "AS uids FROM folders f WHERE f.org_id = %s AND f.inbox_id = %s AND f.id = %s",
        (*params, org_id, inbox_id, folder_id))
    return None if row is None else list(row["uids"])


def _uid_filter(uids: list[int] | None) -> tuple[str, list[Any]]:
    """`` AND uid = ANY(...)`` for a UID list, nothing for None (all): two statement
    texts rather than ``(%s IS NULL OR uid = ANY(%s))``, which a prepared statement's
    generic plan cannot use an index for, so every STORE of three messages read the
    whole folder."""
    if uids is None:
        return "", []
    return " AND uid = ANY(%s::bigint[])", [uid_array(uids)]


async def folder_counts(txn: Txn, org_id: str, folder_id: int,
                        recent_uid: int = 0) -> dict[str, Any]:
    """MESSAGES, UNSEEN, RECENT (UIDs above ``recent_uid``), SIZE and DELETED for STATUS."""
    return await txn.fetchone_required(
        "SELECT count(*) AS messages, count(*) FILTER (WHERE NOT seen) AS unseen, "
        "min(uid) FILTER (WHERE NOT seen) AS first_unseen, "
        "count(*) FILTER (WHERE uid > %s) AS recent, COALESCE(sum(size), 0) AS size, "
        "count(*) FILTER (WHERE deleted) AS deleted "
        "FROM messages WHERE org_id = %s AND folder_id = %s", (recent_uid, org_id, folder_id))


async def recent_mark(txn: Txn, org_id: str, folder_id: int) -> int:
    """The folder's recent mark as last committed, without a lock (one statement): the
    mark only rises, so a mark at or above a UID means another session has claimed it."""
    return await txn.fetchval(
        "SELECT recent_uid FROM folder_recent WHERE org_id = %s AND folder_id = %s",
        (org_id, folder_id)) or 0


async def claim_recent(txn: Txn, org_id: str, folder_id: int, up_to_uid: int) -> int:
    """Raise the folder's recent mark to ``up_to_uid``; returns the mark before this
    call (row-locked, so two sessions never both get the same UIDs).

    The mark has a row of its own (migration 0029), created here by the folder's first
    claim: the folder row is the one every writer locks for UIDNEXT and HIGHESTMODSEQ
    until its COMMIT, and a claim no longer waits for them (nor they for it). The
    transaction commits asynchronously (no WAL flush while the row is held). That is
    safe for \\Recent alone -- a crash can at worst forget a claim, and a message may
    then be \\Recent in one more session, which RFC 3501 §2.3.2 tolerates; nothing else
    is written here. Sent without BEGIN (Database.run_read), the statements are one
    implicit transaction that commits as the message ends: no round trip holds the row.
    The folder deleted meanwhile: nothing to claim (0)."""
    try:
        old = await txn.fetchval(
            "SET LOCAL synchronous_commit TO OFF; "
            "INSERT INTO folder_recent (org_id, folder_id) SELECT org_id, id FROM folders "
            "WHERE org_id = %s AND id = %s ON CONFLICT DO NOTHING; "
            "WITH old AS (SELECT recent_uid FROM folder_recent WHERE org_id = %s "
            "             AND folder_id = %s FOR NO KEY UPDATE) "
            "UPDATE folder_recent r SET recent_uid = GREATEST(r.recent_uid, %s) FROM old "
            "WHERE r.org_id = %s AND r.folder_id = %s RETURNING old.recent_uid",
            (org_id, folder_id, org_id, folder_id, up_to_uid, org_id, folder_id))
    except psycopg2.errors.ForeignKeyViolation:
        return 0
    return old or 0


async def fetch_rows(txn: Txn, org_id: str, folder_id: int, uids: list[int],
                     columns: list[str]) -> list[dict[str, Any]]:
    """The requested columns (from core's allow-list) for existing UIDs."""
    cols = ", ".join([_META, *columns])
    return await txn.fetchall(
        f"{GENERIC_PLANS}; SELECT {cols} FROM messages WHERE org_id = %s AND folder_id = %s "
        "AND uid = ANY(%s::bigint[]) ORDER BY uid", (org_id, folder_id, uid_array(uids)))


async def lock_messages(txn: Txn, org_id: str, inbox_id: str, folder_id: int,
                        uids: list[int] | None, *, deleted_only: bool = False,
                        before: tuple[str, list[Any]] = ("", []),
                        extra: tuple[str, list[Any]] = ("NULL::text[]", []),
                        ) -> tuple[list[dict[str, Any]], Any] | None:
    """The rows STORE, EXPUNGE, COPY and MOVE change, locked, in UID order (``uids``
    None: all; ``deleted_only``: those flagged \\Deleted, re-checked once locked), and
    the folder checked to be the inbox's, in ONE round trip with the statements
    ``before``; also returns the value of the scalar expression ``extra``. None when the
    folder is gone."""
    cols = f"id, thread_id, folder_id, raw_blob_key, inbox_id, size, {_META}"
    among, among_params = _uid_filter(uids)
    sql = (f"SELECT f.id AS folder_present, {extra[0]} AS extra, m.* FROM folders f "
           f"LEFT JOIN LATERAL (SELECT {cols} FROM messages WHERE org_id = f.org_id "
           f"AND folder_id = f.id{among}"
           + (" AND deleted" if deleted_only else "") +
           " ORDER BY uid FOR UPDATE) m ON true "
           "WHERE f.org_id = %s AND f.inbox_id = %s AND f.id = %s")
    params = [*extra[1], *among_params, org_id, inbox_id, folder_id]
    if before[0]:
        sql, params = f"{before[0]}; {sql}", [*before[1], *params]
    rows = await txn.fetchall(sql, params)
    if not rows:
        return None
    found = [{k: v for k, v in r.items() if k not in ("folder_present", "extra")}
             for r in rows if r["id"] is not None]
    return found, rows[0]["extra"]


async def message_ids_for_uids(txn: Txn, org_id: str, folder_id: int, uids: list[int], *,
                               for_update: bool = False) -> list[dict[str, Any]]:
    """Full rows (ids, blob keys, flags) for UIDs, locked when changing them."""
    lock = " FOR UPDATE" if for_update else ""
    return await txn.fetchall(
        f"SELECT id, thread_id, folder_id, raw_blob_key, inbox_id, size, {_META} FROM messages "
        "WHERE org_id = %s AND folder_id = %s AND uid = ANY(%s::bigint[]) ORDER BY uid" + lock,
        (org_id, folder_id, uid_array(uids)))


#: Columns ingest derives for SEARCH and SORT (migration 0012) and the version of the
#: renderers that made them (0013), copied with the message.
_INDEX_COLUMNS = ("sent_date, from_text, to_text, cc_text, bcc_text, sort_subject, sort_from, "
                  "sort_to, sort_cc, sort_display_from, sort_display_to, render_version")


async def copy_message(txn: Txn, org_id: str, message_id: str, new_id: str, folder_id: int,
                       uid: int, modseq: int) -> None:
    """Duplicate a message row (and its attachment rows) into another folder."""
    await txn.execute(
        "INSERT INTO messages (org_id, id, environment_id, inbox_id, thread_id, folder_id, uid, "
        "modseq, direction, message_id_header, in_reply_to, reference_ids, subject, "
        "from_address, to_addresses, cc_addresses, bcc_addresses, reply_to, sent_at, "
        "received_at, headers, text_body, text_body_at, html_body, extracted_text, preview, "
        "size, raw_blob_key, has_attachments, labels, seen, flagged, answered, draft, deleted, "
        "envelope_from, envelope_to, created_at, imap_envelope, imap_bodystructure, imap_body, "
        "imap_sections, internal_date_zone, " + _INDEX_COLUMNS + ") "
        "SELECT org_id, %s, environment_id, inbox_id, thread_id, %s, %s, %s, direction, "
        "message_id_header, in_reply_to, reference_ids, subject, from_address, to_addresses, "
        "cc_addresses, bcc_addresses, reply_to, sent_at, received_at, headers, text_body, "
        "text_body_at, html_body, extracted_text, preview, size, raw_blob_key, has_attachments, "
        "labels, seen, flagged, answered, draft, deleted, envelope_from, envelope_to, %s, "
        "imap_envelope, imap_bodystructure, imap_body, imap_sections, internal_date_zone, "
        + _INDEX_COLUMNS + " FROM messages WHERE org_id = %s AND id = %s",
        (new_id, folder_id, uid, modseq, txn.now, org_id, message_id))
    await txn.execute(
        "INSERT INTO message_refs (org_id, inbox_id, ref, message_id) "
        "SELECT org_id, inbox_id, ref, %s FROM message_refs "
        "WHERE org_id = %s AND message_id = %s", (new_id, org_id, message_id))
    await txn.execute(
        "INSERT INTO attachments (org_id, id, message_id, filename, mime_type, size, "
        "content_id, disposition, sha256, blob_key, part_index) "
        "SELECT org_id, 'att_' || substr(md5(id || %s), 1, 26), %s, filename, mime_type, size, "
        "content_id, disposition, sha256, blob_key, part_index FROM attachments "
        "WHERE org_id = %s AND message_id = %s", (new_id, new_id, org_id, message_id))
    await notify_folder(txn, folder_id)


async def move_message(txn: Txn, org_id: str, message_id: str, src_folder: int,
                       folder_id: int, uid: int, modseq: int) -> None:
    """Re-home a message in another folder with a new UID (RFC 6851 semantics)."""
    await txn.execute(
        "UPDATE messages SET folder_id = %s, uid = %s, modseq = %s WHERE org_id = %s "
        "AND id = %s", (folder_id, uid, modseq, org_id, message_id))
    await mark_expunged(txn, org_id, src_folder)
    await notify_folder(txn, folder_id)


#: The folder row of a change poll (org-scoped: no row, nothing read), as the first
#: part of a UNION whose message parts follow; then ``FROM f``.
_FOLDER_PART = (
    "WITH f AS MATERIALIZED (SELECT id, highestmodseq, expunged_modseq, "
    f"                        {_RECENT_OF_F} AS recent_uid "
    "                        FROM folders f WHERE org_id = %s AND id = %s) "
    "SELECT 'folder' AS part, highestmodseq AS uid, expunged_modseq AS modseq, "
    "NULL::boolean AS seen, NULL::boolean AS flagged, NULL::boolean AS answered, "
    "NULL::boolean AS draft, NULL::boolean AS deleted, NULL::text[] AS labels, "
    "recent_uid")
#: A message part's filter: only when the folder moved past the given MODSEQ (an
#: uncorrelated subquery, so a one-time filter: nothing moved, nothing read).
_MOVED = "(SELECT highestmodseq FROM f) > %s AND folder_id = (SELECT id FROM f)"


async def folder_delta(txn: Txn, org_id: str, folder_id: int, after_modseq: int,
                       want_present: bool) -> dict[str, Any] | None:
    """What a process-wide mirror of the folder (core.imap_poll) needs to catch up from
    ``after_modseq``: the folder row (HIGHESTMODSEQ, the expunge mark, \\Recent), every
    message whose MODSEQ is above it (new ones included: an insert takes a fresh
    MODSEQ), and -- only when something left the folder since and ``want_present`` --
    the UIDs still there, as one array. None when the folder is gone.

    ONE statement (one snapshot), independent of any session's view: every session of
    the process with the folder selected is answered from its result. ``after_modseq``
    -1 reads every message (the mirror's first load)."""
    rows = await txn.fetchall(
        f"{GENERIC_PLANS}; {_FOLDER_PART}, NULL::bigint[] AS present FROM f "
        f"UNION ALL SELECT 'm', {_META}, NULL, NULL FROM messages WHERE {_MOVED} "
        "AND modseq > %s "
        "UNION ALL SELECT 'present', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
        "NULL, (SELECT COALESCE(array_agg(uid), '{}')::bigint[] FROM messages "
        "WHERE folder_id = (SELECT id FROM f)) "
        "WHERE (SELECT expunged_modseq FROM f) > %s AND %s",
        (org_id, folder_id, after_modseq, after_modseq, after_modseq, want_present))
    folder = next((row for row in rows if row["part"] == "folder"), None)
    if folder is None:
        return None
    present = next((row["present"] for row in rows if row["part"] == "present"), None)
    return {"highestmodseq": folder["uid"], "expunged_modseq": folder["modseq"] or 0,
            "recent_uid": folder["recent_uid"] or 0, "present": present,
            "messages": [row for row in rows if row["part"] == "m"]}


async def changes(txn: Txn, org_id: str, folder_id: int, max_known_uid: int,
                  known_uids: list[int], since_modseq: int) -> dict[str, Any]:
    """New messages, flag changes among known ones, and which known ones still exist
    (``present`` is None when nothing left the folder since ``since_modseq``; the folder
    row missing means it was deleted: nothing is present).

    ONE statement (one snapshot, so no transaction around it; it runs after nearly
    every command): the folder's row, then -- only if its HIGHESTMODSEQ moved -- the
    new and changed messages, and -- only if something left -- the known UIDs no longer
    there (``present`` is the rest: a few rows back instead of hundreds), told apart by
    ``part``. Also the folder's \\Recent mark (``recent_uid``), so that claiming new
    arrivals needs no read of its own."""
    # The message parts are scoped through ``f`` (the folder row of this org, or none):
    # with ``org_id = %s`` on messages too, the planner ANDed a bitmap of every message
    # of the organization (the messages_msgid index) into each part, reading thousands
    # of index entries per poll to find a handful of rows.
    rows = await txn.fetchall(
        f"{_FOLDER_PART} FROM f "
        # the uncorrelated subqueries are one-time filters: nothing moved, nothing read
        f"UNION ALL SELECT 'm', {_META}, NULL FROM messages WHERE {_MOVED} AND uid > %s "
        f"UNION ALL SELECT 'm', {_META}, NULL FROM messages WHERE {_MOVED} AND uid <= %s "
        "AND modseq > %s "
        # the known UIDs that are gone (a few rows), not the hundreds still present
        "UNION ALL SELECT 'gone', k.u, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
        "NULL FROM unnest(%s::bigint[]) AS k(u) WHERE (SELECT expunged_modseq FROM f) > %s "
        "AND NOT EXISTS (SELECT 1 FROM messages WHERE folder_id = (SELECT id FROM f) "
        "AND uid = k.u)",
        (org_id, folder_id, since_modseq, max_known_uid,
         since_modseq, max_known_uid, since_modseq,
         uid_array(known_uids), since_modseq))
    folder = next((row for row in rows if row["part"] == "folder"), None)
    if folder is None:
        return {"new": [], "changed": [], "present": set(), "highestmodseq": since_modseq,
                "recent_uid": None}
    out: dict[str, Any] = {"new": [], "changed": [], "present": None,
                           "highestmodseq": folder["uid"],
                           "recent_uid": folder["recent_uid"] or 0}
    gone: set[int] = set()
    for row in rows:
        if row["part"] == "folder":
            continue
        if row["part"] == "gone":
            gone.add(row["uid"])
        elif row["uid"] > max_known_uid:
            out["new"].append(row)
        else:
            out["changed"].append(row)
    out["new"].sort(key=lambda r: r["uid"])
    out["changed"].sort(key=lambda r: r["uid"])
    if folder["modseq"] > since_modseq:
        out["present"] = set(known_uids) - gone
    return out


# SEARCH -------------------------------------------------------------------------------

_HEADER_COLUMNS = {"subject": "subject"}
#: The whole decoded address fields, as ingest stores them (agentpost.mail.searchkeys);
#: NULL when the message has no such field.
_ADDRESS_COLUMNS = {"from": "from_text", "to": "to_text", "cc": "cc_text", "bcc": "bcc_text"}
_HAS_HEADER_SQL = ("EXISTS (SELECT 1 FROM jsonb_array_elements(headers) h "
                   "WHERE lower(h->>0) = %s)")
#: A stored field value unfolded (RFC 5322 2.2.3): ingest keeps the line breaks of a
#: folded field, and a HEADER or TEXT string may span the fold ("folded  across").
_UNFOLDED_VALUE = "translate(h->>1, E'\\r\\n', '')"
#: TEXT's header side: each field as its own "Name: value" line, unfolded. Not the
#: jsonb's text form, whose quoting (\", \\, \r\n) no search string matches.
_HEADER_LINE_MATCH = ("EXISTS (SELECT 1 FROM jsonb_array_elements(headers) h "
                      f"WHERE (h->>0) || ': ' || {_UNFOLDED_VALUE} ILIKE %s)")


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


#: The calendar date of the internal date in the zone stored with it (minutes east).
_INTERNAL_DAY = ("((received_at AT TIME ZONE 'UTC') "
                 "+ make_interval(mins => coalesce(internal_date_zone, 0)))::date")


def search_sql(key: tuple[Any, ...], params: list[Any]) -> str:
    """Translate a parsed SEARCH key into a SQL condition (values go into ``params``)."""
    op = key[0]
    if op == "all":
        return "TRUE"
    if op == "and":
        parts = [search_sql(k, params) for k in key[1]]
        return "(" + " AND ".join(parts or ["TRUE"]) + ")"
    if op == "or":
        return f"({search_sql(key[1], params)} OR {search_sql(key[2], params)})"
    if op == "not":
        return f"(NOT {search_sql(key[1], params)})"
    if op == "uid":
        params.append(uid_array(list(key[1])))
        return "uid = ANY(%s::bigint[])"
    if op == "flag":
        col = SYSTEM_FLAGS.get(key[1])
        if col is None:  # \Recent and unknown system flags: nothing is stored for them
            return "FALSE" if key[2] else "TRUE"
        return col if key[2] else f"NOT {col}"
    if op == "keyword":  # stored folded (agentpost.mail.keywords): equality after folding
        params.append(kw.fold(key[1]))
        return "(%s = ANY(labels))" if key[2] else "(NOT %s = ANY(labels))"
    if op == "header":
        name, text = key[1].lower(), key[2]
        if text == "":  # every message that has the field matches (RFC 3501 6.4.4)
            params.append(name)
            return _HAS_HEADER_SQL
        if name in _ADDRESS_COLUMNS:
            params.append(_like(text))
            return f"(coalesce({_ADDRESS_COLUMNS[name]}, '') ILIKE %s)"
        if name in _HEADER_COLUMNS:
            params.append(_like(text))
            return f"({_HEADER_COLUMNS[name]} ILIKE %s)"
        params.extend([name, _like(text)])
        return ("EXISTS (SELECT 1 FROM jsonb_array_elements(headers) h "
                f"WHERE lower(h->>0) = %s AND {_UNFOLDED_VALUE} ILIKE %s)")
    if op == "body":
        params.extend([_like(key[1]), _like(key[1])])
        return f"(coalesce({_BODY}, '') ILIKE %s OR coalesce(html_body, '') ILIKE %s)"
    if op == "text":
        params.extend([_like(key[1])] * 3)
        return (f"(coalesce({_BODY}, '') ILIKE %s OR coalesce(html_body, '') ILIKE %s "
                f"OR {_HEADER_LINE_MATCH})")
    if op in ("sentbefore", "senton", "sentsince"):
        # The Date field's own calendar date, its time and zone disregarded; a message
        # without a (readable) Date matches none of them, and NOT of each.
        params.append(key[1])
        cmp = {"sentbefore": "<", "senton": "=", "sentsince": ">="}[op]
        return f"coalesce(sent_date {cmp} %s, FALSE)"
    if op in ("before", "on", "since"):
        # The internal date's calendar date as its own zone shows it (the APPEND's,
        # +0000 when none), time and zone disregarded (RFC 3501 6.4.4; issue 10).
        params.append(key[1])
        cmp = {"before": "<", "on": "=", "since": ">="}[op]
        return f"({_INTERNAL_DAY} {cmp} %s::date)"
    if op == "larger":
        params.append(int(key[1]))
        return "(size > %s)"
    if op == "smaller":
        params.append(int(key[1]))
        return "(size < %s)"
    if op == "modseq":
        params.append(int(key[1]))
        return "(modseq >= %s)"
    raise ValueError(f"unsupported search key {op!r}")


def _casemap(column: str) -> str:
    """i;ascii-casemap (RFC 4790): ASCII letters folded, then octet order."""
    return (f"translate({column}, 'abcdefghijklmnopqrstuvwxyz', "
            f"'ABCDEFGHIJKLMNOPQRSTUVWXYZ') COLLATE \"C\"")


#: SORT keys (RFC 5256, RFC 5957) as SQL over the message row. Text keys are stored at
#: ingest (agentpost.mail.searchkeys): the base subject, the first address's mailbox,
#: its display name or addr-spec; all compared with i;ascii-casemap.
SORT_KEYS = {
    "ARRIVAL": "received_at",
    "DATE": "COALESCE(sent_at, received_at)",
    "SIZE": "size",
    "FROM": _casemap("sort_from"),
    "TO": _casemap("sort_to"),
    "CC": _casemap("sort_cc"),
    "SUBJECT": _casemap("sort_subject"),
    "DISPLAYFROM": _casemap("sort_display_from"),
    "DISPLAYTO": _casemap("sort_display_to"),
}


async def search(txn: Txn, org_id: str, folder_id: int, key: tuple[Any, ...],
                 sort: list[tuple[str, bool]] | None = None) -> list[int]:
    """UIDs matching a search key: ascending, or in ``sort`` order ([(key, reverse)],
    ties by UID as RFC 5256 wants)."""
    params: list[Any] = []
    condition = search_sql(key, params)
    # A missing field sorts as an empty one: first, or last when REVERSE turns it round.
    order = ", ".join(f"{SORT_KEYS[name]} {'DESC NULLS LAST' if reverse else 'ASC NULLS FIRST'}"
                      for name, reverse in sort or ())
    rows = await txn.fetchall(
        f"SELECT uid FROM messages WHERE org_id = %s AND folder_id = %s AND {condition} "
        f"ORDER BY {order + ', ' if order else ''}uid", (org_id, folder_id, *params))
    return [r["uid"] for r in rows]


async def thread_fields(txn: Txn, org_id: str, folder_id: int,
                        key: tuple[Any, ...]) -> list[dict[str, Any]]:
    """IMAP THREAD (RFC 5256): the threading columns of the messages matching a search
    key, ascending UID, in one statement (the threading itself runs in Python)."""
    params: list[Any] = []
    condition = search_sql(key, params)
    return await txn.fetchall(
        "SELECT uid, message_id_header, reference_ids, in_reply_to, subject, sent_at, "
        "received_at FROM messages "
        f"WHERE org_id = %s AND folder_id = %s AND {condition} ORDER BY uid",
        (org_id, folder_id, *params))
