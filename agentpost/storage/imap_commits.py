"""IMAP writes that end in their own COMMIT (issue 10: lock windows).

Split from storage/imap.py: these build the statements of one STORE, EXPUNGE, COPY or
MOVE and send them with the COMMIT (:func:`commit_with`), so the folder row is held for
the statements and the fsync only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg2.extras import Json

from agentpost.storage.database import Txn, text_array
from agentpost.storage.imap import _INDEX_COLUMNS
from agentpost.storage.mail import FLAG_COLUMNS as _FLAG_COLUMNS
from agentpost.storage.message_insert import MAIL_CHANNEL
from agentpost.storage.prepared import GENERIC_PLANS

# Writes that end in their own COMMIT (issue 10: lock windows) ---------------------------
#
# Every change to a folder takes its row (UIDNEXT, HIGHESTMODSEQ) and holds it until
# COMMIT. Sent as a separate round trip, that COMMIT waits for the server's reactor to
# turn around first -- under load, longer than the statement and the fsync together --
# and every other writer of the folder waits with it. These helpers build the statements
# that take the folder row, and :func:`commit_with` sends them with the COMMIT in ONE
# message (Txn.commit_with), so the lock lasts for the statements and the fsync only.


async def commit_with(txn: Txn, sql: str, params: list[Any],
                      result_sql: str = "NULL::int", result_params: Sequence[Any] = (), *,
                      generic_plans: bool = False) -> Any:
    """Run the transaction's last statements ``sql``, then COMMIT, in one round trip;
    returns the JSON value of ``result_sql`` (an expression evaluated after ``sql``, in
    the transaction). Nothing may be written in ``txn`` afterwards. A link lost in this
    round trip leaves the outcome unknown: TemporaryFailure, never a retry (it could
    apply the change twice). See storage.database.Txn.commit_with (the MX's group
    commit ends the same way): the locks go before the WAL flush, and the change is
    still durable before the caller hears of it.

    ``generic_plans``: the statements use PostgreSQL's generic plans (storage.prepared.
    GENERIC_PLANS; the setting ends with this transaction) -- for batches whose plans
    were checked not to depend on their values (STORE's, EXPUNGE's)."""
    if generic_plans:
        sql = f"{GENERIC_PLANS}; {sql}"
    return await txn.commit_with(sql, params, result_sql, result_params)


def target_folder_sql(org_id: str, inbox_id: str, name: str) -> tuple[str, list[Any]]:
    """COPY/MOVE's destination by name as a scalar JSON expression (``id``,
    ``uidvalidity``; NULL when there is none), for the ``extra`` of the source rows'
    locking read (storage.imap.lock_messages): one round trip for both. INBOX is
    matched case-insensitively, as storage.imap.get_folder does."""
    return ("(SELECT json_build_object('id', t.id, 'uidvalidity', t.uidvalidity) "
            "FROM folders t WHERE t.org_id = %s AND t.inbox_id = %s "
            "AND (t.name = %s OR (upper(%s) = 'INBOX' AND t.name = 'INBOX')))",
            [org_id, inbox_id, name, name])


def notify_sql(folder_ids: Iterable[int]) -> tuple[str, list[Any]]:
    """Wake-ups for folders (storage.mail.notify_folder), as one statement."""
    ids = sorted(set(folder_ids))
    return ("SELECT pg_notify(%s, f::text) FROM unnest(%s::bigint[]) AS f",
            [MAIL_CHANNEL, ids])


def apply_flags_sql(org_id: str, folder_id: int,
                    updates: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    """storage.mail.apply_flags' write as one statement (the folder's next MODSEQ, then
    the rows, each with the full new value of every flag column), for a caller that
    commits right after it (:func:`commit_with`)."""
    records = [{"id": u["id"], **{col: u[col] for col in _FLAG_COLUMNS}} for u in updates]
    return ("WITH f AS (UPDATE folders SET highestmodseq = highestmodseq + 1 "
            "           WHERE org_id = %s AND id = %s RETURNING highestmodseq) "
            "UPDATE messages m SET seen = c.seen, flagged = c.flagged, answered = c.answered, "
            "draft = c.draft, deleted = c.deleted, labels = c.labels, modseq = f.highestmodseq "
            "FROM f, jsonb_to_recordset(%s::jsonb) AS c(id text, seen boolean, "
            "flagged boolean, answered boolean, draft boolean, deleted boolean, labels text[]) "
            # the id array as well as the join: a generic plan cannot see how many
            # records the JSON holds (it guesses 100) and hash-joined a scan of every
            # message of the organization; ``id = ANY`` probes the primary key instead
            "WHERE m.org_id = %s AND m.id = ANY(%s::text[]) AND m.id = c.id",
            [org_id, folder_id, Json(records), org_id, text_array(u["id"] for u in updates)])


def modseqs_result(org_id: str, folder_ids: list[int]) -> tuple[str, list[Any]]:
    """A :func:`commit_with` result: {folder id: HIGHESTMODSEQ} of locked folders."""
    return ("SELECT json_object_agg(id, highestmodseq) FROM folders "
            "WHERE org_id = %s AND id = ANY(%s)", [org_id, sorted(set(folder_ids))])


def mark_expunged_sql(org_id: str, folder_ids: list[int]) -> tuple[str, list[Any]]:
    """storage.mail.mark_expunged for folders in id order, as one statement (one new
    MODSEQ each, remembered as the folder's last expunge); wake-ups: :func:`notify_sql`."""
    return ("UPDATE folders f SET highestmodseq = f.highestmodseq + 1, "
            "expunged_modseq = f.highestmodseq + 1 "
            "FROM (SELECT id FROM folders WHERE org_id = %s AND id = ANY(%s) ORDER BY id "
            "      FOR NO KEY UPDATE) AS l WHERE f.org_id = %s AND f.id = l.id",
            [org_id, sorted(set(folder_ids)), org_id])


# EXPUNGE: the deletions, blob releases and usage deltas travel with the COMMIT too.
# What a statement learns (blob keys, folders, freed blobs) reaches the next ones in
# transaction-local settings (gone at COMMIT), as PostgreSQL arrays.
_KEYS = "agentpost.expunge_keys"
_FOLDERS = "agentpost.expunge_folders"
_FREED = "agentpost.expunge_freed"


def _setting(name: str, array_type: str) -> str:
    return f"current_setting('{name}')::{array_type}[]"


def expunge_messages_sql(org_id: str, message_ids: list[str],
                         now: Any) -> tuple[str, list[Any]]:
    """storage.mail.delete_messages + release_blobs + usage.release_sql as statements
    (IMAP EXPUNGE, locked message rows): the rows go (attachments and references by
    cascade), their inboxes get the bytes back (negative deltas, no lock), then the
    blobs' advisory locks in key order (byte order, as Python's sorted()), the counts,
    and the rows nobody uses any more removed: their keys are :func:`freed_result`.
    The deleted rows' folders are for :func:`mark_expunged_after_sql`."""
    keys = _setting(_KEYS, "text")
    delete = (
        "WITH a AS (SELECT message_id, blob_key FROM attachments "
        "           WHERE org_id = %s AND message_id = ANY(%s)), "
        "d AS (DELETE FROM messages WHERE org_id = %s AND id = ANY(%s) "
        "      RETURNING id, raw_blob_key, folder_id, inbox_id, size), "
        "u AS (INSERT INTO inbox_usage_deltas (org_id, inbox_id, bytes, created_at) "
        "      SELECT %s, d.inbox_id, -sum(d.size), %s FROM d GROUP BY d.inbox_id) "
        f"SELECT set_config('{_KEYS}', COALESCE((SELECT array_agg(k.k)::text FROM ("
        "    SELECT d.raw_blob_key AS k FROM d UNION ALL "
        "    SELECT a.blob_key FROM a JOIN d ON d.id = a.message_id) AS k "
        "  WHERE k.k IS NOT NULL), '{}'), true), "
        f"set_config('{_FOLDERS}', COALESCE((SELECT array_agg(DISTINCT d.folder_id)::text "
        "  FROM d), '{}'), true)")
    release = (
        "SELECT pg_advisory_xact_lock(hashtextextended(s.k, 7)) FROM ("
        f"  SELECT k FROM (SELECT DISTINCT k FROM unnest({keys}) AS k) AS d "
        "  ORDER BY k COLLATE \"C\") AS s; "
        "UPDATE blobs b SET refcount = b.refcount - c.n "
        f"FROM (SELECT k, count(*) AS n FROM unnest({keys}) AS k GROUP BY k) AS c "
        "WHERE b.key = c.k; "
        f"WITH r AS (DELETE FROM blobs WHERE key = ANY({keys}) AND refcount <= 0 "
        "           RETURNING key) "
        f"SELECT set_config('{_FREED}', COALESCE((SELECT array_agg(r.key ORDER BY r.key "
        "  COLLATE \"C\")::text FROM r), '{}'), true)")
    return (f"{delete}; {release}",
            [org_id, message_ids, org_id, message_ids, org_id, now])


def mark_expunged_after_sql(org_id: str) -> tuple[str, list[Any]]:
    """:func:`mark_expunged_sql` and :func:`notify_sql` for the folders of the rows
    :func:`expunge_messages_sql` deleted (none: nothing)."""
    folders = _setting(_FOLDERS, "bigint")
    return ("UPDATE folders f SET highestmodseq = f.highestmodseq + 1, "
            "expunged_modseq = f.highestmodseq + 1 "
            f"FROM (SELECT id FROM folders WHERE org_id = %s AND id = ANY({folders}) "
            "      ORDER BY id FOR NO KEY UPDATE) AS l WHERE f.org_id = %s AND f.id = l.id; "
            f"SELECT pg_notify(%s, f::text) FROM unnest({folders}) AS f ORDER BY f",
            [org_id, org_id, MAIL_CHANNEL])


def freed_result() -> tuple[str, list[Any]]:
    """A :func:`commit_with` result after :func:`expunge_messages_sql`: the keys of the
    blobs nobody references any more (the caller removes them from the store)."""
    return _setting(_FREED, "text"), []


def expunge_result(org_id: str, folder_id: int) -> tuple[str, list[Any]]:
    """:func:`freed_result` and the HIGHESTMODSEQ the expunge gave ``folder_id``, as a
    JSON object (``freed``, ``modseq``), for an EXPUNGE of that one folder: its
    session tells the process's mirror of the folder (core.imap_poll) at once."""
    return (f"json_build_object('freed', {_setting(_FREED, 'text')}, 'modseq', "
            "(SELECT highestmodseq FROM folders WHERE org_id = %s AND id = %s))",
            [org_id, folder_id])


def copy_messages_sql(org_id: str, message_ids: list[str], new_ids: list[str],
                      folder_id: int, now: Any) -> tuple[str, list[Any]]:
    """Copies of messages (rows, Message-ID references, attachment rows) into a folder,
    with consecutive UIDs in the given order and ONE new MODSEQ, allocated by the first
    statement (the folder row, locked to COMMIT). Result: :func:`uidnext_result`."""
    n = len(message_ids)
    src = "unnest(%s::text[], %s::text[]) WITH ORDINALITY AS x(src, dst, ord)"
    sql = (
        "WITH f AS (UPDATE folders SET uidnext = uidnext + %s, "
        "           highestmodseq = highestmodseq + 1 WHERE org_id = %s AND id = %s "
        "           RETURNING uidnext - %s AS first_uid, highestmodseq) "
        "INSERT INTO messages (org_id, id, environment_id, inbox_id, thread_id, folder_id, "
        "uid, modseq, direction, message_id_header, in_reply_to, reference_ids, subject, "
        "from_address, to_addresses, cc_addresses, bcc_addresses, reply_to, sent_at, "
        "received_at, headers, text_body, text_body_at, html_body, extracted_text, preview, "
        "size, raw_blob_key, has_attachments, labels, seen, flagged, answered, draft, deleted, "
        "envelope_from, envelope_to, created_at, imap_envelope, imap_bodystructure, "
        "imap_body, imap_sections, internal_date_zone, " + _INDEX_COLUMNS + ") "
        "SELECT m.org_id, x.dst, m.environment_id, m.inbox_id, m.thread_id, %s, "
        "f.first_uid + x.ord - 1, f.highestmodseq, m.direction, m.message_id_header, "
        "m.in_reply_to, m.reference_ids, m.subject, m.from_address, m.to_addresses, "
        "m.cc_addresses, m.bcc_addresses, m.reply_to, m.sent_at, m.received_at, m.headers, "
        "m.text_body, m.text_body_at, m.html_body, m.extracted_text, m.preview, m.size, "
        "m.raw_blob_key, m.has_attachments, m.labels, m.seen, m.flagged, m.answered, "
        "m.draft, m.deleted, m.envelope_from, m.envelope_to, %s, m.imap_envelope, "
        "m.imap_bodystructure, "
        "m.imap_body, m.imap_sections, m.internal_date_zone, "
        + ", ".join("m." + c.strip() for c in _INDEX_COLUMNS.split(",")) + " "
        f"FROM f, {src} JOIN messages m ON m.org_id = %s AND m.id = x.src ORDER BY x.ord; "
        "INSERT INTO message_refs (org_id, inbox_id, ref, message_id) "
        f"SELECT r.org_id, r.inbox_id, r.ref, x.dst FROM {src} "
        "JOIN message_refs r ON r.org_id = %s AND r.message_id = x.src; "
        "INSERT INTO attachments (org_id, id, message_id, filename, mime_type, size, "
        "content_id, disposition, sha256, blob_key, part_index) "
        "SELECT a.org_id, 'att_' || substr(md5(a.id || x.dst), 1, 26), x.dst, a.filename, "
        "a.mime_type, a.size, a.content_id, a.disposition, a.sha256, a.blob_key, "
        f"a.part_index FROM {src} JOIN attachments a ON a.org_id = %s AND a.message_id = x.src")
    params = [n, org_id, folder_id, n, folder_id, now, message_ids, new_ids, org_id,
              message_ids, new_ids, org_id, message_ids, new_ids, org_id]
    return sql, params


def move_messages_sql(org_id: str, message_ids: list[str], source_id: int,
                      target_id: int) -> tuple[str, list[Any]]:
    """Re-home messages in another folder with consecutive UIDs in the given order and
    ONE new MODSEQ; the source records one expunge. Both folder rows are locked first,
    in id order. Result: :func:`uidnext_result` of the target."""
    n = len(message_ids)
    lock = ("SELECT 1 FROM folders WHERE org_id = %s AND id = ANY(%s) ORDER BY id "
            "FOR NO KEY UPDATE")
    move = ("WITH f AS (UPDATE folders SET uidnext = uidnext + %s, "
            "           highestmodseq = highestmodseq + 1 WHERE org_id = %s AND id = %s "
            "           RETURNING uidnext - %s AS first_uid, highestmodseq) "
            "UPDATE messages m SET folder_id = %s, uid = f.first_uid + x.ord - 1, "
            "modseq = f.highestmodseq "
            "FROM f, unnest(%s::text[]) WITH ORDINALITY AS x(id, ord) "
            "WHERE m.org_id = %s AND m.id = x.id")
    expunged, expunged_params = mark_expunged_sql(org_id, [source_id])
    return (f"{lock}; {move}; {expunged}",
            [org_id, sorted({source_id, target_id}), n, org_id, target_id, n, target_id,
             message_ids, org_id, *expunged_params])


def uidnext_result(org_id: str, folder_id: int) -> tuple[str, list[Any]]:
    """A :func:`commit_with` result: the folder's UIDNEXT (after a copy or move of n
    messages, their UIDs are UIDNEXT - n ...)."""
    return ("SELECT uidnext FROM folders WHERE org_id = %s AND id = %s", [org_id, folder_id])


def lock_threads_sql(org_id: str, thread_ids: list[str]) -> tuple[str, list[Any]]:
    """storage.threads.lock_threads as a statement to send with others."""
    return ("SELECT 1 FROM threads WHERE org_id = %s AND id = ANY(%s::text[]) ORDER BY id "
            "FOR NO KEY UPDATE", [org_id, text_array(sorted(set(thread_ids)))])


def audit_to_uids_sql(org_id: str, audit_id: str, folder_id: int,
                      n: int) -> tuple[str, list[Any]]:
    """COPY/MOVE's audit row (written in the same transaction) gets the new UIDs,
    ``to_uids``: the n below the target folder's UIDNEXT, known only under its lock."""
    return ("UPDATE audit_log a SET details = a.details || jsonb_build_object('to_uids', "
            "CASE WHEN %s = 1 THEN (f.uidnext - 1)::text "
            "ELSE (f.uidnext - %s)::text || ':' || (f.uidnext - 1)::text END) "
            "FROM folders f WHERE f.org_id = %s AND f.id = %s AND a.org_id = %s AND a.id = %s",
            [n, n, org_id, folder_id, org_id, audit_id])
