"""What a stored copy writes beside its message row: a new thread, its event (with the
wake-up that tells listeners in every process), its audit row.

Kept as values rather than SQL text (issue 12), so that a group-commit batch writes each
kind for all its copies in ONE statement, as it already writes their message rows
(storage.message_batch): a 4 KiB delivery's thread, event, wake-up and audit row were
four statements and ~33 quoted parameters of their own, and at 20 sessions to one inbox
they cost PostgreSQL about as much as the message rows themselves (pg_stat_statements:
~150 us of execution per copy, plus the parsing and binding of each statement), and
the MX's reactor thread the quoting of every parameter. A lone copy, a small batch or a
value JSON cannot carry keeps the statements one copy at a time (:meth:`CopyRows.sql`),
which store exactly the same rows: tests/test_copy_rows.py compares the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from agentpost.storage.audit import audit_batch_sql, audit_insert_sql
from agentpost.storage.database import json_param, text_array
from agentpost.storage.message_batch import json_rows
from agentpost.storage.threads import new_thread_sql

EVENTS_CHANNEL = "agentpost_events"

#: Whatever a copy writes, as (sql, params).
Statements = tuple[str, list[Any]]


@dataclass(frozen=True)
class CopyRows:
    """One copy's rows besides its message.

    ``event``: org_id, id, environment_id, inbox_id, type, data. ``new_thread``: the
    thread the copy starts (org_id, id, environment_id, inbox_id, subject, received_at,
    from_address, recipients, labels), or None when it joins one, whose update is then
    ``thread_update``. ``extra``: statements of the caller's own (submission's queue
    rows), which have no batched form."""

    now: datetime
    event: dict[str, Any]
    audit: tuple[dict[str, Any], ...] = ()
    new_thread: dict[str, Any] | None = None
    thread_update: Statements = ("", [])
    extra: Statements = ("", [])

    def plus(self, more: Statements) -> CopyRows:
        """These rows and ``more`` statements after them."""
        if not more[0]:
            return self
        sql = f"{self.extra[0]}; {more[0]}" if self.extra[0] else more[0]
        return replace(self, extra=(sql, [*self.extra[1], *more[1]]))

    def sql(self) -> Statements:
        """The statements of this copy alone: its thread, its event and wake-up, its
        audit row, then ``extra``."""
        parts: list[str] = []
        params: list[Any] = []
        for sql, values in (self._thread_sql(), self._event_sql(), self.extra):
            if sql:
                parts.append(sql)
                params += values
        return "; ".join(parts), params

    def _thread_sql(self) -> Statements:
        if self.new_thread is None:
            return self.thread_update
        t = self.new_thread
        return new_thread_sql(
            org_id=t["org_id"], thread_id=t["id"], environment_id=t["environment_id"],
            inbox_id=t["inbox_id"], subject=t["subject"], received_at=t["received_at"],
            from_address=t["from_address"], recipients=t["recipients"],
            labels=t["labels"], now=self.now)

    def _event_sql(self) -> Statements:
        e = self.event
        return event_sql(org_id=e["org_id"], event_id=e["id"],
                         environment_id=e["environment_id"], inbox_id=e["inbox_id"],
                         type_=e["type"], data=e["data"], audit=list(self.audit) or None,
                         now=self.now)


def event_sql(*, org_id: str, event_id: str, environment_id: str | None,
              inbox_id: str | None, type_: str, data: dict[str, Any],
              audit: list[dict[str, Any]] | None, now: Any) -> Statements:
    """An event's INSERT and wake-up (and ``audit`` rows) as (sql, params), to ride in
    another statement's round trip."""
    sql = ("INSERT INTO events (org_id, id, environment_id, inbox_id, type, data, created_at) "
           "VALUES (%s, %s, %s, %s, %s, %s, %s); SELECT pg_notify(%s, %s)")
    params: list[Any] = [
        org_id, event_id, environment_id, inbox_id, type_, json_param(data), now,
        EVENTS_CHANNEL, _wake_up(org_id, event_id, type_, inbox_id)]
    if audit:
        audit_sql, audit_params = audit_insert_sql(audit)
        sql += "; " + audit_sql
        params += audit_params
    return sql, params


def _wake_up(org_id: str, event_id: str, type_: str, inbox_id: str | None) -> str:
    return json.dumps({"org_id": org_id, "id": event_id, "type": type_, "inbox_id": inbox_id})


#: The new threads of a batch (params: the rows as a JSON array, then created_at and
#: updated_at). Participants and labels are computed as storage.threads.new_thread_sql
#: computes them for one thread, from the same values.
_THREADS_SQL = (
    "INSERT INTO threads (org_id, id, environment_id, inbox_id, subject, message_count, "
    "  last_message_at, participants, labels, created_at, updated_at) "
    "SELECT x.org_id, x.id, x.environment_id, x.inbox_id, x.subject, 1, x.received_at, "
    "  (SELECT COALESCE(jsonb_agg(DISTINCT a), '[]'::jsonb) FROM ("
    "     SELECT lower(x.from_address->>'email') AS a "
    "     UNION SELECT lower(r->>'email') FROM jsonb_array_elements(x.recipients) r"
    "   ) p WHERE a IS NOT NULL), "
    "  (SELECT COALESCE(array_agg(DISTINCT l ORDER BY l), '{}') FROM unnest(x.labels) l), "
    "  %s, %s "
    "FROM jsonb_to_recordset(%s::jsonb) AS x(org_id text, id text, environment_id text, "
    "  inbox_id text, subject text, received_at timestamptz, from_address jsonb, "
    "  recipients jsonb, labels text[])")
#: The events of a batch in the batch's order (their ``seq``), then their wake-ups in the
#: same order (params: created_at, the rows as a JSON array, the channel, the payloads).
_EVENTS_SQL = (
    "INSERT INTO events (org_id, id, environment_id, inbox_id, type, data, created_at) "
    "SELECT x.org_id, x.id, x.environment_id, x.inbox_id, x.type, x.data, %s "
    "FROM jsonb_populate_recordset(NULL::events, %s::jsonb) WITH ORDINALITY AS x "
    "ORDER BY x.ordinality; "
    "SELECT pg_notify(%s, p.v) FROM unnest(%s::text[]) WITH ORDINALITY AS p(v, n) "
    "ORDER BY p.n")
def statements(befores: list[CopyRows | Statements], *, batched: bool) -> tuple[list[str],
                                                                               list[Any]]:
    """The statements writing every copy's ``befores`` (in the batch's order), and their
    parameters: one statement per kind when ``batched`` and every copy's values can
    travel as JSON exactly, else each copy's own statements in turn."""
    rows = [b for b in befores if isinstance(b, CopyRows)]
    if batched and rows and len(rows) == len(befores):
        grouped = _grouped(rows)
        if grouped is not None:
            return grouped
    sql: list[str] = []
    params: list[Any] = []
    for before in befores:
        one = before.sql() if isinstance(before, CopyRows) else before
        if one[0]:
            sql.append(one[0])
            params += one[1]
    return sql, params


def _grouped(rows: list[CopyRows]) -> tuple[list[str], list[Any]] | None:
    """The batched statements, or None when a value cannot travel as JSON (ujson
    missing, a value JSON does not know: message_batch.json_rows, audit.audit_batch_sql):
    the caller writes one copy at a time."""
    if len({r.now for r in rows}) != 1:
        return None
    threads = [r.new_thread for r in rows if r.new_thread is not None]
    audit = [a for r in rows for a in r.audit]
    docs = json_rows(threads), json_rows([r.event for r in rows])
    if docs[0] is None or docs[1] is None:
        return None
    try:
        audit_sql = audit_batch_sql(audit) if audit else None
    except (TypeError, ValueError, OverflowError):
        return None
    now = rows[0].now
    sql: list[str] = []
    params: list[Any] = []
    if threads:
        sql.append(_THREADS_SQL)
        params += [now, now, docs[0]]
    for r in rows:  # what has no batched form: a joined thread's update, extra rows
        for own, values in (r.thread_update if r.new_thread is None else ("", []), r.extra):
            if own:
                sql.append(own)
                params += values
    sql.append(_EVENTS_SQL)
    params += [now, docs[1], EVENTS_CHANNEL,
               text_array(_wake_up(e["org_id"], e["id"], e["type"], e["inbox_id"])
                          for e in (r.event for r in rows))]
    if audit_sql is not None:
        sql.append(audit_sql[0])
        params += audit_sql[1]
    return sql, params

