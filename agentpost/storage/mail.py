"""Folders, messages, attachments, blob references and the event outbox (threads are in
storage/threads.py, filter rules in storage/filters.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from psycopg2.extras import Json

from agentpost.storage import usage
from agentpost.storage.blob_body import body_sql
from agentpost.storage.blob_lead import write_ahead

# Writing a new message row lives in message_insert, its companion rows in copy_rows;
# re-exported for their callers (and below).
from agentpost.storage.copy_rows import EVENTS_CHANNEL as EVENTS_CHANNEL
from agentpost.storage.copy_rows import event_sql as event_sql
from agentpost.storage.database import Txn, text_array
from agentpost.storage.long_text import inline_columns
from agentpost.storage.message_insert import MAIL_CHANNEL as MAIL_CHANNEL
from agentpost.storage.message_insert import DeliveryAnswer as DeliveryAnswer
from agentpost.storage.message_insert import DeliveryProbe as DeliveryProbe
from agentpost.storage.message_insert import StaleGuess as StaleGuess
from agentpost.storage.message_insert import guessed_delivery_sql as guessed_delivery_sql
from agentpost.storage.message_insert import insert_message as insert_message
from agentpost.storage.message_insert import insert_messages as insert_messages
from agentpost.storage.message_insert import prepare_deliveries as prepare_deliveries
from agentpost.storage.threads import relabel_threads_sql

SYSTEM_FOLDERS = (("INBOX", "\\Inbox"), ("Sent", "\\Sent"), ("Drafts", "\\Drafts"),
                  ("Trash", "\\Trash"), ("Junk", "\\Junk"))


# Routing ------------------------------------------------------------------------------

def rules_sql(direction: str) -> str:
    """A scalar subquery: the ``direction`` ('receive' or 'send') filter rules that
    apply to inbox ``i`` (its own and its environment's), as a JSON list of
    {match_type, value, action} (core.filters.decide reads it)."""
    assert direction in ("receive", "send")
    return ("(SELECT coalesce(json_agg(json_build_object('match_type', r.match_type, "
            "'value', r.value, 'action', r.action)), '[]'::json) "
            "FROM filter_rules r WHERE r.org_id = i.org_id "
            f"AND r.environment_id = i.environment_id AND r.direction = '{direction}' "
            "AND (r.inbox_id IS NULL OR r.inbox_id = i.id))")


# Folders ------------------------------------------------------------------------------

async def create_system_folders(txn: Txn, org_id: str, environment_id: str,
                                inbox_id: str) -> None:
    """INBOX, Sent, Drafts, Trash and Junk for a new inbox.

    UIDVALIDITY is the column default: a fresh value of a sequence for every folder row
    (migration 0011), never the clock, so it cannot repeat for a name.
    """
    rows = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(SYSTEM_FOLDERS))
    params: list[Any] = []
    for name, special in SYSTEM_FOLDERS:
        params += [org_id, environment_id, inbox_id, name, special, txn.now]
    await txn.execute(
        "INSERT INTO folders (org_id, environment_id, inbox_id, name, special_use, "
        f"created_at) VALUES {rows} ON CONFLICT (inbox_id, name) DO NOTHING",
        params)


async def folder_by_name(txn: Txn, org_id: str, inbox_id: str,
                         name: str) -> dict[str, Any] | None:
    """A folder of an inbox."""
    return await txn.fetchone(
        "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq FROM folders "
        "WHERE org_id = %s AND inbox_id = %s AND name = %s", (org_id, inbox_id, name))


async def prepare_delivery(txn: Txn, *, org_id: str, inbox_id: str, folder_name: str,
                           blobs: list[tuple[str, int]],
                           thread: tuple[str, list[Any]],
                           inline: Mapping[str, bytes] | None = None) -> dict[str, Any]:
    """What a delivery needs before it writes, in ONE round trip: a reference to each of
    ``blobs`` (key, size; a key may repeat), taken under the blobs' advisory locks in
    key order (see :func:`reference_blob`); ``new_blobs``: the keys whose row is new
    (the caller re-checks the store); ``folder`` (id, name, special_use, uidvalidity;
    None when missing) and ``thread_id`` from the ``thread`` scalar subquery
    (storage.threads.find_thread_sql). ``inline``: the bytes of the blobs kept in
    PostgreSQL (storage.blobs.inline), written with their row (large ones just before,
    as a binary parameter: storage.blob_lead)."""
    inline = inline or {}
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for key, size in blobs:
        counts[key] = counts.get(key, 0) + 1
        sizes[key] = size
    keys = sorted(counts)
    data = await write_ahead(txn, keys, inline)  # large bytes first (storage.blob_lead)
    # One blob (a message without attachments, the common case) gets a one-row text:
    # fed a one-element array, the prepared statement's generic plan would assume an
    # unnest of 100 rows and PostgreSQL would keep planning it afresh (storage.prepared).
    if len(keys) == 1:
        sql = "SELECT pg_advisory_xact_lock(hashtextextended(%s::text, 7)); "
        rows_sql = ("(VALUES (%s::text, %s::bigint, %s::int, %s::bytea, %s::bool)) "
                    "AS x(k, s, n, d, u)")
        one, utf8 = inline_columns(data)
        params: list[Any] = [keys[0], txn.now, keys[0], sizes[keys[0]], counts[keys[0]],
                             one[0], utf8[0]]
    else:
        sql, params = "", []
        if keys:
            sql = ("SELECT pg_advisory_xact_lock(hashtextextended(k, 7)) "
                   "FROM (SELECT k FROM unnest(%s::text[]) AS k ORDER BY k) AS s; ")
            params = [keys]
        rows_sql = ("unnest(%s::text[], %s::bigint[], %s::int[], %s::bytea[], %s::bool[]) "
                    "AS x(k, s, n, d, u)")
        params += [txn.now, keys, [sizes[k] for k in keys], [counts[k] for k in keys],
                   *inline_columns(data)]
    row = await txn.fetchone_required(
        sql + "WITH b AS (INSERT INTO blobs (key, size, refcount, created_at, data, utf8) "
        f"  SELECT k, s, n, %s, d, u FROM {rows_sql} "
        "  ON CONFLICT (key) DO UPDATE SET refcount = blobs.refcount + EXCLUDED.refcount "
        "  RETURNING key, (xmax = 0) AS inserted) "
        "SELECT ARRAY(SELECT key FROM b WHERE inserted ORDER BY key) AS new_blobs, "
        "  (SELECT row_to_json(f) FROM (SELECT id, name, special_use, uidvalidity "
        "     FROM folders WHERE org_id = %s AND inbox_id = %s AND name = %s) AS f) AS folder, "
        f"  {thread[0]} AS thread_id",
        [*params, org_id, inbox_id, folder_name, *thread[1]])
    return row


async def allocate_uid(txn: Txn, org_id: str, folder_id: int) -> tuple[int, int]:
    """Next UID and MODSEQ of a folder, in the inserting transaction (row-locked)."""
    row = await txn.fetchone_required(
        "UPDATE folders SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1 "
        "WHERE org_id = %s AND id = %s RETURNING uidnext - 1 AS uid, highestmodseq AS modseq",
        (org_id, folder_id))
    return row["uid"], row["modseq"]


async def lock_folders(txn: Txn, org_id: str, folder_ids: list[int]) -> None:
    """Lock folder rows in id order (a change that will update several of them)."""
    await txn.execute(
        "SELECT 1 FROM folders WHERE org_id = %s AND id = ANY(%s) ORDER BY id "
        "FOR NO KEY UPDATE", (org_id, sorted(set(folder_ids))))


async def bump_modseq(txn: Txn, org_id: str, folder_id: int) -> int:
    """A new MODSEQ for a flag change in a folder."""
    modseq: int = await txn.fetchval(
        "UPDATE folders SET highestmodseq = highestmodseq + 1 WHERE org_id = %s AND id = %s "
        "RETURNING highestmodseq", (org_id, folder_id))
    return modseq


# Blob references ------------------------------------------------------------------------

def _blob_lock_sql() -> str:
    return "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))"


async def reference_blob(txn: Txn, key: str, size: int) -> bool:
    """Count one more user of a blob; True when the row is new (caller re-checks the store).

    The advisory lock pairs with ``lock_blob`` in the deleter, so a blob cannot be
    removed from the store between our put and our commit.
    """
    # One round trip: the lock, then the upsert, in one simple-query message.
    row = await txn.fetchone_required(
        _blob_lock_sql() + "; "
        "INSERT INTO blobs (key, size, refcount, created_at) VALUES (%s, %s, 1, %s) "
        "ON CONFLICT (key) DO UPDATE SET refcount = blobs.refcount + 1 "
        "RETURNING refcount", (key, key, size, txn.now))
    refcount: int = row["refcount"]
    return refcount == 1


def reference_copies_sql(org_id: str, message_ids: list[str]) -> tuple[str, list[Any]]:
    """One more user of every blob of the messages ``message_ids`` (their raw message
    and attachments; the caller holds the rows locked, so the blob rows exist), as
    statements to send in one round trip: the blobs' advisory locks in key order (byte
    order, as :func:`release_blobs` and Python's sorted()), then the counts. COPY used
    two round trips per message for this."""
    keys = ("SELECT raw_blob_key AS k FROM messages WHERE org_id = %s "
            "AND id = ANY(%s::text[]) UNION ALL SELECT blob_key FROM attachments "
            "WHERE org_id = %s AND message_id = ANY(%s::text[])")
    ids = text_array(message_ids)
    return ("SELECT pg_advisory_xact_lock(hashtextextended(s.k, 7)) FROM ("
            f"SELECT k FROM ({keys}) AS a GROUP BY k ORDER BY k COLLATE \"C\") AS s; "
            "UPDATE blobs b SET refcount = b.refcount + c.n "
            f"FROM (SELECT k, count(*) AS n FROM ({keys}) AS a GROUP BY k) AS c "
            "WHERE b.key = c.k",
            [org_id, ids, org_id, ids, org_id, ids, org_id, ids])


async def release_blob(txn: Txn, key: str) -> bool:
    """Count one user fewer; True when nobody uses the blob any more (row removed)."""
    await txn.execute(_blob_lock_sql(), (key,))
    row = await txn.fetchone(
        "UPDATE blobs SET refcount = refcount - 1 WHERE key = %s RETURNING refcount", (key,))
    if row is not None and row["refcount"] <= 0:
        await txn.execute("DELETE FROM blobs WHERE key = %s AND refcount <= 0", (key,))
        return True
    return False


async def release_blobs(txn: Txn, keys: list[str]) -> list[str]:
    """:func:`release_blob` for many references (a key may repeat) in ONE round trip:
    the blobs' locks in key order (two releasers cannot deadlock), the counts, and the
    rows nobody uses any more removed; returns their keys."""
    if not keys:
        return []
    distinct = sorted(set(keys))
    rows = await txn.fetchall(
        "SELECT pg_advisory_xact_lock(hashtextextended(k, 7)) "
        "FROM (SELECT k FROM unnest(%s::text[]) AS k ORDER BY k) AS s; "
        "UPDATE blobs b SET refcount = b.refcount - c.n "
        "FROM (SELECT k, count(*) AS n FROM unnest(%s::text[]) AS k GROUP BY k) AS c "
        "WHERE b.key = c.k; "
        "DELETE FROM blobs WHERE key = ANY(%s) AND refcount <= 0 RETURNING key",
        (distinct, keys, distinct))
    return sorted(r["key"] for r in rows)


#: Every key's lock, taken in key order (so two collectors, or a collector and a batch
#: of deliveries, cannot deadlock), then the keys still without a row: ONE round trip
#: for any number of keys. The lock statement runs on its own, ahead of the read, so
#: the read's snapshot is taken after the locks were granted and sees the references
#: their previous holders committed.
_UNREFERENCED_SQL = (
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 7)) "
    "FROM (SELECT k FROM unnest(%s::text[]) AS k ORDER BY k) AS s; "
    "SELECT k AS key FROM unnest(%s::text[]) AS k "
    "WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.key = k) ORDER BY k")


async def blobs_unreferenced(txn: Txn, keys: list[str]) -> list[str]:
    """Lock every key's blob and return those no row references: their store objects
    may be deleted while this transaction holds the locks."""
    keys = sorted(set(keys))
    if not keys:
        return []
    rows = await txn.fetchall(_UNREFERENCED_SQL, (keys, keys))
    return [r["key"] for r in rows]


# Messages -----------------------------------------------------------------------------

#: Bodies longer than this (characters) store no extracted_text: it is derived again
#: when read (core.messages), which keeps a third copy of a huge body out of the INSERT.
#: A shorter body stores none either when its new text is the whole body (most mail:
#: no quoted history), i.e. :func:`whole_body_text` of it; reads compute that again.
EXTRACTED_MAX_CHARS = 64 * 1024
_EXTRACTED = ("COALESCE(extracted_text, CASE WHEN length(b.body) <= "
              f"{EXTRACTED_MAX_CHARS} THEN btrim(replace(b.body, E'\\r\\n', E'\\n'), "
              "E' \\t\\r\\n') END) AS extracted_text")
#: ``b.body``: the text body wherever the row keeps it (storage.blob_body), read once
#: (OFFSET 0 keeps the planner from copying the expression into each use).
_BODY_JOIN = f"CROSS JOIN LATERAL (SELECT {body_sql('messages.')} AS body OFFSET 0) AS b"


def whole_body_text(text_body: str) -> str:
    """The body as new text: LF line ends, no blank space around it -- exactly what
    :data:`_EXTRACTED` computes in SQL for a row that stored no extracted_text."""
    return text_body.replace("\r\n", "\n").strip(" \t\r\n")


_MSG_COLS = ("id, org_id, environment_id, inbox_id, thread_id, folder_id, uid, modseq, "
             "direction, message_id_header, in_reply_to, reference_ids, subject, from_address, "
             "to_addresses, cc_addresses, bcc_addresses, reply_to, sent_at, received_at, "
             f"b.body AS text_body, html_body, {_EXTRACTED}, preview, size, raw_blob_key, "
             "has_attachments, labels, seen, flagged, answered, draft, deleted, "
             # The folder it is in (one message, one folder), for the API's ``folder``:
             # primary-key probes, no join to rewrite in every query FROM messages.
             "(SELECT f.name FROM folders f WHERE f.org_id = messages.org_id "
             " AND f.id = messages.folder_id) AS folder_name, "
             "(SELECT f.special_use FROM folders f WHERE f.org_id = messages.org_id "
             " AND f.id = messages.folder_id) AS folder_special_use")
_MSG_LIST_COLS = _MSG_COLS.replace(f"b.body AS text_body, html_body, {_EXTRACTED}, ", "")


_NOTIFY_FOLDER_SQL = "SELECT pg_notify(%s, %s)"


async def notify_folder(txn: Txn, folder_id: int) -> None:
    """Wake IMAP sessions watching a folder, in every process, once this commits.
    (PostgreSQL folds identical notifications within one transaction.)"""
    await txn.execute(_NOTIFY_FOLDER_SQL, (MAIL_CHANNEL, str(folder_id)))


def folder_list_key(inbox_id: str) -> str:
    """The wake-up key for "an inbox's folder list changed" (a folder created, deleted,
    renamed, (un)subscribed): IMAP NOTIFY sessions (RFC 5465 MailboxName,
    SubscriptionChange) listen for their own inbox's key only."""
    return "inbox:" + inbox_id


async def notify_folder_list(txn: Txn, inbox_id: str) -> None:
    """Wake IMAP sessions watching an inbox's folder list, once this commits."""
    await txn.execute(_NOTIFY_FOLDER_SQL, (MAIL_CHANNEL, folder_list_key(inbox_id)))


async def charge_storage(txn: Txn, org_id: str, inbox_id: str, size: int,
                         quota: int = 0) -> bool:
    """Add ``size`` bytes to an inbox's use; False (and nothing changed) if that would
    pass ``quota`` (0: no limit). See storage.usage."""
    return await usage.charge(txn, org_id, inbox_id, size, quota)


def charge_storage_sql(org_id: str, inbox_id: str, size: int, quota: int,
                       now: Any) -> tuple[str, list[Any]]:
    """:func:`charge_storage` as (sql, params) to send after other statements of the
    same round trip; its result is ``n`` (1: charged, 0: it would pass ``quota``)."""
    return usage.charge_sql(org_id, inbox_id, size, quota, now)


async def inbox_usage(txn: Txn, org_id: str, inbox_id: str) -> int:
    """Bytes an inbox's messages take (IMAP QUOTA), exactly: see storage.usage."""
    return await usage.inbox_usage(txn, org_id, inbox_id)


async def insert_attachment(txn: Txn, row: dict[str, Any]) -> None:
    """Insert one attachment row."""
    cols = list(row)
    await txn.execute(
        f"INSERT INTO attachments ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
        list(row.values()))


async def insert_event(txn: Txn, *, org_id: str, event_id: str, environment_id: str | None,
                       inbox_id: str | None, type_: str, data: dict[str, Any],
                       audit: list[dict[str, Any]] | None = None) -> None:
    """Write an event to the outbox and wake listeners in every process after commit.

    ``audit`` rows (core.audit's shape) travel in the same round trip: deliveries are
    hot, and their audit row must not cost one more exchange with the server."""
    await txn.execute(*event_sql(org_id=org_id, event_id=event_id,
                                 environment_id=environment_id, inbox_id=inbox_id,
                                 type_=type_, data=data, audit=audit, now=txn.now))


def env_clause(env_ids: frozenset[str] | None) -> tuple[str, list[Any]]:
    if env_ids is None:
        return "", []
    return " AND environment_id = ANY(%s)", [sorted(env_ids)]


async def list_messages(txn: Txn, org_id: str, env_ids: frozenset[str] | None, inbox_id: str,
                        *, thread_id: str | None, labels: list[str] | None, before: Any,
                        after: Any, unread: bool | None, after_id: str | None,
                        limit: int, folder: str | None = None,
                        message_id: str | None = None) -> list[dict[str, Any]]:
    """Messages of an inbox, newest first, filtered; bodies are not read. ``folder`` is
    a folder name of the inbox (none such: no messages); ``message_id`` the RFC 5322
    Message-ID without brackets (indexed: every copy of one message)."""
    env_sql, env_params = env_clause(env_ids)
    return await txn.fetchall(
        f"SELECT {_MSG_LIST_COLS} FROM messages WHERE org_id = %s AND inbox_id = %s{env_sql} "
        "AND (%s::text IS NULL OR thread_id = %s) "
        "AND (%s::text[] IS NULL OR labels @> %s) "
        "AND (%s::timestamptz IS NULL OR received_at < %s) "
        "AND (%s::timestamptz IS NULL OR received_at > %s) "
        "AND (%s::boolean IS NULL OR seen = NOT %s) "
        "AND (%s::text IS NULL OR folder_id = (SELECT f.id FROM folders f "
        "     WHERE f.org_id = %s AND f.inbox_id = %s AND f.name = %s)) "
        "AND (%s::text IS NULL OR message_id_header = %s) "
        "AND (%s::text IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (org_id, inbox_id, *env_params, thread_id, thread_id, labels, labels, before, before,
         after, after, unread, unread, folder, org_id, inbox_id, folder, message_id,
         message_id, after_id, after_id, limit))


async def get_message(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                      message_id: str, *, for_update: bool = False) -> dict[str, Any] | None:
    """One message with bodies."""
    env_sql, env_params = env_clause(env_ids)
    lock = " FOR UPDATE OF messages" if for_update else ""
    return await txn.fetchone(
        f"SELECT {_MSG_COLS} FROM messages {_BODY_JOIN} "
        f"WHERE org_id = %s AND id = %s{env_sql}{lock}",
        (org_id, message_id, *env_params))


async def list_attachments(txn: Txn, org_id: str, message_id: str) -> list[dict[str, Any]]:
    """Attachments of one message, in MIME order."""
    return await txn.fetchall(
        "SELECT id, message_id, filename, mime_type, size, content_id, disposition, sha256, "
        "blob_key FROM attachments WHERE org_id = %s AND message_id = %s ORDER BY part_index",
        (org_id, message_id))


FLAG_COLUMNS = ("seen", "flagged", "answered", "draft", "deleted", "labels")


async def apply_flags(txn: Txn, org_id: str, folder_id: int, updates: list[dict[str, Any]],
                      refresh_thread_ids: Iterable[str] = ()) -> int:
    """The one write of read state, IMAP flags and labels, whichever door asked (API,
    IMAP STORE, a FETCH that marks read), for messages of one folder: every row of
    ``updates`` carries ``id`` and the full new value of every FLAG_COLUMNS column (the
    caller holds the rows locked, so full values are exact). Returns their new MODSEQ.

    ONE round trip: the folder's next MODSEQ, the rows, then the summaries of
    ``refresh_thread_ids`` (which the caller has locked, :func:`lock_threads`) and the
    wake-up. The folder row stays locked from here to COMMIT, so callers make this the
    last statement of the transaction (several folders in id order): MODSEQs are then
    allocated in commit order (RFC 7162 §3.1.2: per mailbox, a later-committed change
    never has a lower MODSEQ than one a client has already seen), and the lock is held
    only through the COMMIT. Each row is written once: a second UPDATE of a row in one
    transaction would re-check its foreign keys, locking thread and folder rows
    (FOR KEY SHARE) out of order."""
    records = [{"id": u["id"], **{col: u[col] for col in FLAG_COLUMNS}} for u in updates]
    sql = ("WITH f AS (UPDATE folders SET highestmodseq = highestmodseq + 1 "
           "           WHERE org_id = %s AND id = %s RETURNING highestmodseq) "
           "UPDATE messages m SET seen = c.seen, flagged = c.flagged, answered = c.answered, "
           "draft = c.draft, deleted = c.deleted, labels = c.labels, modseq = f.highestmodseq "
           "FROM f, jsonb_to_recordset(%s::jsonb) AS c(id text, seen boolean, "
           "flagged boolean, answered boolean, draft boolean, deleted boolean, labels text[]) "
           # ``id = ANY`` as well: see storage.imap_commits.apply_flags_sql
           "WHERE m.org_id = %s AND m.id = ANY(%s::text[]) AND m.id = c.id; ")
    params: list[Any] = [org_id, folder_id, Json(records), org_id,
                         text_array(u["id"] for u in updates)]
    ids = sorted(set(refresh_thread_ids))
    if ids:
        refresh, refresh_params = relabel_threads_sql(org_id, ids, txn.now)
        sql += refresh + "; "
        params += refresh_params
    sql += ("SELECT highestmodseq, pg_notify(%s, %s) FROM folders "
            "WHERE org_id = %s AND id = %s")
    params += [MAIL_CHANNEL, str(folder_id), org_id, folder_id]
    modseq: int = await txn.fetchval(sql, params)
    return modseq


async def delete_messages(txn: Txn, org_id: str,
                          message_ids: list[str]) -> list[dict[str, Any]]:
    """Delete messages and (by cascade) their attachments and references, in ONE
    statement that takes no inbox or folder lock: per deleted message its ``id``,
    ``folder_id``, ``inbox_id``, ``size`` and ``blob_keys`` (raw and attachments).
    The caller then releases the blobs and records the storage use and the expunge
    (:func:`record_expunge`) last."""
    return await txn.fetchall(
        "WITH a AS (SELECT message_id, blob_key FROM attachments "
        "           WHERE org_id = %s AND message_id = ANY(%s)), "
        "d AS (DELETE FROM messages WHERE org_id = %s AND id = ANY(%s) "
        "      RETURNING id, raw_blob_key, folder_id, inbox_id, size) "
        "SELECT d.id, d.folder_id, d.inbox_id, d.size, "
        "       ARRAY[d.raw_blob_key] || ARRAY(SELECT a.blob_key FROM a WHERE a.message_id = d.id) "
        "       AS blob_keys FROM d ORDER BY d.id",
        (org_id, message_ids, org_id, message_ids))


async def record_expunge(txn: Txn, org_id: str, freed_bytes: dict[str, int],
                         folder_ids: list[int]) -> None:
    """After deletions: give inboxes their bytes back (negative usage deltas, no lock)
    and mark each folder expunged (a new MODSEQ, the folder's last expunge, a wake-up),
    in ONE round trip, folders in id order (core.mail_changes' lock order). Callers make
    this the last statement before COMMIT: the hot rows are then locked only through it."""
    sql: list[str] = []
    params: list[Any] = []
    release, release_params = usage.release_sql(freed_bytes, org_id, txn.now)
    if release:  # negative deltas: no inbox row lock (storage.usage)
        sql.append(release)
        params += release_params
    for folder_id in sorted(folder_ids):
        sql += [_MARK_EXPUNGED_SQL, _NOTIFY_FOLDER_SQL]
        params += [org_id, folder_id, MAIL_CHANNEL, str(folder_id)]
    if sql:
        await txn.execute("; ".join(sql), params)


_MARK_EXPUNGED_SQL = ("UPDATE folders SET highestmodseq = highestmodseq + 1, "
                      "expunged_modseq = highestmodseq + 1 WHERE org_id = %s AND id = %s")


async def mark_expunged(txn: Txn, org_id: str, folder_id: int) -> None:
    """A message left the folder: a new MODSEQ, remembered as the folder's last expunge
    (sessions re-check which UIDs still exist only when it moved), and a wake-up."""
    await txn.execute(_MARK_EXPUNGED_SQL + "; " + _NOTIFY_FOLDER_SQL,
                      (org_id, folder_id, MAIL_CHANNEL, str(folder_id)))


async def list_threads(txn: Txn, org_id: str, env_ids: frozenset[str] | None, inbox_id: str,
                       *, labels: list[str] | None, cursor: tuple[Any, str] | None,
                       limit: int) -> list[dict[str, Any]]:
    """Threads by latest activity."""
    env_sql, env_params = env_clause(env_ids)
    at, tid = cursor if cursor else (None, None)
    return await txn.fetchall(
        "SELECT id, org_id, environment_id, inbox_id, subject, message_count, last_message_at, "
        f"participants, labels, created_at FROM threads WHERE org_id = %s AND inbox_id = %s"
        f"{env_sql} AND (%s::text[] IS NULL OR labels @> %s) "
        "AND (%s::timestamptz IS NULL OR (last_message_at, id) < (%s, %s)) "
        "ORDER BY last_message_at DESC, id DESC LIMIT %s",
        (org_id, inbox_id, *env_params, labels, labels, at, at, tid, limit))


async def get_thread(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                     thread_id: str) -> dict[str, Any] | None:
    """One thread."""
    env_sql, env_params = env_clause(env_ids)
    return await txn.fetchone(
        "SELECT id, org_id, environment_id, inbox_id, subject, message_count, last_message_at, "
        f"participants, labels, created_at FROM threads WHERE org_id = %s AND id = %s{env_sql}",
        (org_id, thread_id, *env_params))


async def thread_message_ids(txn: Txn, org_id: str, thread_id: str) -> list[dict[str, Any]]:
    """Ids, folders, threads and flags of a thread's messages, locked (for label changes)."""
    return await txn.fetchall(
        "SELECT id, folder_id, thread_id, seen, flagged, answered, draft, deleted, labels "
        "FROM messages WHERE org_id = %s AND thread_id = %s ORDER BY id FOR UPDATE",
        (org_id, thread_id))


async def list_thread_messages(txn: Txn, org_id: str, thread_id: str) -> list[dict[str, Any]]:
    """The messages of a thread, oldest first, without bodies."""
    return await txn.fetchall(
        f"SELECT {_MSG_LIST_COLS} FROM messages WHERE org_id = %s AND thread_id = %s "
        "ORDER BY id", (org_id, thread_id))


async def blob_keys_of_inbox(txn: Txn, org_id: str, inbox_id: str) -> list[str]:
    """Every blob reference held by an inbox's messages and attachments (one per row)."""
    rows = await txn.fetchall(
        "SELECT raw_blob_key AS k FROM messages WHERE org_id = %s AND inbox_id = %s "
        "UNION ALL SELECT a.blob_key FROM attachments a JOIN messages m "
        "ON m.org_id = a.org_id AND m.id = a.message_id "
        "WHERE m.org_id = %s AND m.inbox_id = %s",
        (org_id, inbox_id, org_id, inbox_id))
    return [r["k"] for r in rows]
