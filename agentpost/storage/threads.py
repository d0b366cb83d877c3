"""Threads: finding the thread a message joins and keeping each thread's summary
(counts, participants, labels, last message) in step with its messages."""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn, json_param, text_array


async def find_thread(txn: Txn, org_id: str, inbox_id: str, message_id: str | None,
                      related_ids: list[str]) -> str | None:
    """The thread a message joins: its parents' thread, else a thread whose members
    already referenced this message (children that arrived first).

    One statement of index probes only, built so that no plan can walk the inbox: no
    ORDER BY over messages (with stale statistics a young inbox looks like one row, and
    the planner read it all backwards in id order to skip a sort); the earliest parent
    is picked here from the few rows found. See migration 0006.
    """
    if not related_ids and not message_id:
        return None
    sql, params = _find(org_id, inbox_id, message_id, related_ids)
    rows = await txn.fetchall(sql, params)
    if not rows:
        return None
    thread_id: str = min(rows, key=lambda r: (r["kind"], r["id"]))["thread_id"]
    return thread_id


_PARENTS_SQL = (
    "SELECT 0 AS kind, x.id, x.thread_id FROM unnest(%s::text[]) AS p(ref) "
    "CROSS JOIN LATERAL (SELECT m.id, m.thread_id FROM messages m "
    "  WHERE m.org_id = %s AND m.inbox_id = %s AND m.message_id_header = p.ref "
    "  LIMIT 1) AS x")
_CHILDREN_SQL = (
    "(SELECT 1 AS kind, r.message_id AS id, m.thread_id FROM message_refs r "
    "   JOIN messages m ON m.org_id = r.org_id AND m.id = r.message_id "
    "  WHERE r.org_id = %s AND r.inbox_id = %s AND r.ref = %s "
    "  ORDER BY r.message_id LIMIT 1)")


def _find(org_id: str, inbox_id: str, message_id: str | None,
          related_ids: list[str]) -> tuple[str, list[Any]]:
    """The probes this message needs, and only those: a probe that cannot match (no
    parents to look up, no Message-ID to be referenced by) is left out of the text
    rather than fed an empty array or a NULL, so a prepared statement's generic plan
    costs what a custom one would and PostgreSQL stops planning it every time
    (storage.prepared)."""
    parts: list[str] = []
    params: list[Any] = []
    if related_ids:
        parts.append(_PARENTS_SQL)
        params += [related_ids, org_id, inbox_id]
    if message_id:
        parts.append(_CHILDREN_SQL)
        params += [org_id, inbox_id, message_id]
    return " UNION ALL ".join(parts), params


def find_thread_sql(org_id: str, inbox_id: str, message_id: str | None,
                    related_ids: list[str]) -> tuple[str, list[Any]]:
    """:func:`find_thread` as a scalar subquery (NULL: a new thread), to ride in another
    statement: the earliest of the few rows the probes find."""
    if not related_ids and not message_id:
        return "NULL::text", []
    sql, params = _find(org_id, inbox_id, message_id, related_ids)
    return f"(SELECT f.thread_id FROM ({sql}) AS f ORDER BY f.kind, f.id LIMIT 1)", params


async def insert_thread(txn: Txn, *, org_id: str, thread_id: str, environment_id: str,
                        inbox_id: str, subject: str) -> None:
    """A new, empty thread (counters are updated by ``touch_thread``)."""
    await txn.execute(
        "INSERT INTO threads (org_id, id, environment_id, inbox_id, subject, last_message_at, "
        "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (org_id, thread_id, environment_id, inbox_id, subject, txn.now, txn.now, txn.now))


async def refresh_thread(txn: Txn, org_id: str, thread_id: str) -> None:
    """Recompute count, last activity, participants and labels from the thread's messages."""
    await txn.execute(
        """
        UPDATE threads t SET
            message_count = s.n,
            last_message_at = COALESCE(s.last_at, t.last_message_at),
            participants = COALESCE(s.participants, '[]'::jsonb),
            labels = COALESCE(s.labels, '{}'),
            updated_at = %s
        FROM (
            SELECT count(*) AS n, max(received_at) AS last_at,
                   (SELECT jsonb_agg(DISTINCT a) FROM messages m2,
                        LATERAL (SELECT lower(m2.from_address->>'email') AS a
                                 UNION SELECT lower(x->>'email')
                                 FROM jsonb_array_elements(m2.to_addresses || m2.cc_addresses) x
                                ) p
                    WHERE m2.org_id = %s AND m2.thread_id = %s AND a IS NOT NULL
                   ) AS participants,
                   (SELECT array_agg(DISTINCT l ORDER BY l) FROM messages m3, unnest(m3.labels) l
                    WHERE m3.org_id = %s AND m3.thread_id = %s) AS labels
            FROM messages m WHERE m.org_id = %s AND m.thread_id = %s
        ) s
        WHERE t.org_id = %s AND t.id = %s
        """,
        (txn.now, org_id, thread_id, org_id, thread_id, org_id, thread_id, org_id, thread_id))


async def lock_threads(txn: Txn, org_id: str, thread_ids: list[str]) -> None:
    """Lock thread rows in id order, for a change that refreshes them only after it
    has locked the inbox or folder rows (STORE, COPY): threads come before those
    (core.mail_changes' lock order). FOR NO KEY UPDATE, the lock an UPDATE takes: a
    new message's foreign-key check (FOR KEY SHARE) is not blocked by it."""
    if thread_ids:
        await txn.execute(
            "SELECT 1 FROM threads WHERE org_id = %s AND id = ANY(%s::text[]) ORDER BY id "
            "FOR NO KEY UPDATE", (org_id, text_array(sorted(set(thread_ids)))))


def refresh_threads_sql(org_id: str, ids: list[str], now: Any) -> tuple[str, list[Any]]:
    """:func:`refresh_thread` for many threads as ONE statement (threads not yet
    locked are locked in plan order: lock them first, :func:`lock_threads`)."""
    return ("""
        UPDATE threads t SET
            message_count = c.n,
            last_message_at = COALESCE(c.last_at, t.last_message_at),
            participants = COALESCE(
                (SELECT jsonb_agg(DISTINCT a) FROM messages m2,
                     LATERAL (SELECT lower(m2.from_address->>'email') AS a
                              UNION SELECT lower(x->>'email')
                              FROM jsonb_array_elements(m2.to_addresses || m2.cc_addresses) x
                             ) p
                 WHERE m2.org_id = t.org_id AND m2.thread_id = t.id AND a IS NOT NULL),
                '[]'::jsonb),
            labels = COALESCE(
                (SELECT array_agg(DISTINCT l ORDER BY l) FROM messages m3, unnest(m3.labels) l
                 WHERE m3.org_id = t.org_id AND m3.thread_id = t.id), '{}'),
            updated_at = %s
        FROM unnest(%s::text[]) AS x(id)
        CROSS JOIN LATERAL (SELECT count(*) AS n, max(received_at) AS last_at
                            FROM messages m WHERE m.org_id = %s AND m.thread_id = x.id) c
        WHERE t.org_id = %s AND t.id = x.id
        """, [now, text_array(ids), org_id, org_id])


def relabel_threads_sql(org_id: str, ids: list[str], now: Any) -> tuple[str, list[Any]]:
    """The labels part of :func:`refresh_threads_sql` alone, for a change of flags and
    labels only (STORE, the API's label and read-state changes): count, last activity
    and participants cannot have moved, and re-aggregating every address of the thread
    was most of the statement's cost. Same locking rule (lock the threads first)."""
    return ("UPDATE threads t SET labels = COALESCE((SELECT array_agg(DISTINCT l ORDER BY l) "
            "FROM messages m3, unnest(m3.labels) l WHERE m3.org_id = t.org_id "
            "AND m3.thread_id = t.id), '{}'), updated_at = %s "
            "WHERE t.org_id = %s AND t.id = ANY(%s::text[])",
            [now, org_id, text_array(sorted(set(ids)))])


async def refresh_threads(txn: Txn, org_id: str, thread_ids: list[str], *,
                          drop_empty: bool = False) -> None:
    """:func:`refresh_thread` for many threads in ONE round trip, locking them in id
    order first (two changes over the same threads cannot deadlock); with
    ``drop_empty``, threads left without messages are removed (threads exist only
    while they have messages)."""
    if thread_ids:
        await txn.execute(*lock_and_refresh_sql(org_id, thread_ids, txn.now,
                                                drop_empty=drop_empty))


def lock_and_refresh_sql(org_id: str, thread_ids: list[str], now: Any, *,
                         drop_empty: bool = False) -> tuple[str, list[Any]]:
    """:func:`refresh_threads` as (sql, params), to ride in another round trip (IMAP
    EXPUNGE sends it with its COMMIT); ("", []) for no threads."""
    ids = sorted(set(thread_ids))
    if not ids:
        return "", []
    refresh, params = refresh_threads_sql(org_id, ids, now)
    sql = ("SELECT 1 FROM threads WHERE org_id = %s AND id = ANY(%s::text[]) ORDER BY id "
           "FOR NO KEY UPDATE; " + refresh)
    params = [org_id, text_array(ids), *params]
    if drop_empty:
        sql += ("; DELETE FROM threads WHERE org_id = %s AND id = ANY(%s::text[]) "
                "AND NOT EXISTS (SELECT 1 FROM messages WHERE org_id = %s "
                "AND thread_id = threads.id)")
        params += [org_id, text_array(ids), org_id]
    return sql, params


async def add_to_thread(txn: Txn, org_id: str, thread_id: str, *, received_at: Any,
                        from_address: dict[str, str] | None,
                        recipients: list[dict[str, str]], labels: list[str]) -> None:
    """Fold one new message into its thread's count, last activity, participants and
    labels -- what :func:`refresh_thread` computes, without reading the thread's
    messages (a 10,000-message thread made every delivery re-aggregate 10,000 rows).
    Runs before the message row exists, so the folder's UID lock is held briefly."""
    await txn.execute(*add_to_thread_sql(org_id, thread_id, received_at=received_at,
                                         from_address=from_address, recipients=recipients,
                                         labels=labels, now=txn.now))


_PARTICIPANTS_SQL = (
    "SELECT COALESCE(jsonb_agg(DISTINCT a), '[]'::jsonb) FROM ("
    "    SELECT jsonb_array_elements_text({old}) AS a"
    "    UNION SELECT lower(%s::jsonb->>'email')"
    "    UNION SELECT lower(x->>'email') FROM jsonb_array_elements(%s::jsonb) x"
    ") p WHERE a IS NOT NULL")


def add_to_thread_sql(org_id: str, thread_id: str, *, received_at: Any,
                      from_address: dict[str, str] | None, recipients: list[dict[str, str]],
                      labels: list[str], now: Any) -> tuple[str, list[Any]]:
    """:func:`add_to_thread` as (sql, params), to ride in a delivery's round trip."""
    return (f"""
        UPDATE threads t SET
            message_count = t.message_count + 1,
            last_message_at = CASE WHEN t.message_count = 0 THEN %s
                                   ELSE GREATEST(t.last_message_at, %s) END,
            participants = ({_PARTICIPANTS_SQL.format(old='t.participants')}),
            labels = (SELECT COALESCE(array_agg(DISTINCT l ORDER BY l), '{{}}')
                      FROM unnest(t.labels || %s::text[]) l),
            updated_at = %s
        WHERE t.org_id = %s AND t.id = %s
        """, [received_at, received_at, json_param(from_address), json_param(recipients),
              labels, now, org_id, thread_id])


def new_thread_sql(*, org_id: str, thread_id: str, environment_id: str, inbox_id: str,
                   subject: str, received_at: Any, from_address: dict[str, str] | None,
                   recipients: list[dict[str, str]], labels: list[str],
                   now: Any) -> tuple[str, list[Any]]:
    """A new thread already holding its first message's summary: :func:`insert_thread`
    and :func:`add_to_thread` in one statement."""
    return (f"""
        INSERT INTO threads (org_id, id, environment_id, inbox_id, subject, message_count,
                             last_message_at, participants, labels, created_at, updated_at)
        VALUES (%s, %s, %s, %s, %s, 1, %s,
                ({_PARTICIPANTS_SQL.format(old="'[]'::jsonb")}),
                (SELECT COALESCE(array_agg(DISTINCT l ORDER BY l), '{{}}')
                 FROM unnest(%s::text[]) l), %s, %s)
        """, [org_id, thread_id, environment_id, inbox_id, subject, received_at,
              json_param(from_address), json_param(recipients), labels, now, now])


async def delete_thread_if_empty(txn: Txn, org_id: str, thread_id: str) -> None:
    """Threads exist only while they have messages."""
    await txn.execute(
        "DELETE FROM threads WHERE org_id = %s AND id = %s AND NOT EXISTS ("
        "SELECT 1 FROM messages WHERE org_id = %s AND thread_id = %s)",
        (org_id, thread_id, org_id, thread_id))
