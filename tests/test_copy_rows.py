"""Issue 12: a group-commit batch writes its copies' new threads, events (with their
wake-ups) and audit rows in one statement per kind (storage.copy_rows); what is stored
and announced is what one copy at a time stores and announces, odd values included.

Batches are made with a ``task.Clock`` (``delay_s``), as in tests/test_group_commit.py.
"""

from __future__ import annotations

import io
import select
from datetime import UTC, datetime, timedelta, timezone

import psycopg2
import pytest_twisted
from twisted.internet import defer

from agentpost.storage import copy_rows, message_batch
from agentpost.storage.mail import EVENTS_CHANNEL
from tests.mailfactory import make_message
from tests.test_group_commit import _wait_pending
from tests.test_group_commit_batched import _rows, _setup

_WHEN = datetime(2026, 2, 3, 4, 5, 6, 789012, tzinfo=timezone(timedelta(hours=-3, minutes=-30)))
_LABELS = ("b", "a", "é😀", "a", "quote'\"", "back\\slash", "")
_ODD = "é😀 \\ back\\slash 'single' \"double\" \t tab / ∞"
_NO_FROM = (b"To: Bot <bot@agents.test>\r\nSubject: no from\r\nMessage-ID: <nofrom@x>\r\n"
            b"Date: Sun, 29 Nov 2026 07:00:00 +0000\r\n\r\nNobody sent this.\r\n")
_PARENT = make_message(subject="parent", msgid="<parent@x>")


def _raws() -> list[bytes]:
    """The batch: new threads with odd subjects and addresses, one without a From, and a
    reply that joins the parent's thread (an update, which has no batched form)."""
    return [
        make_message(subject=_ODD, msgid="<odd@x>", frm="Ána <ANA@Example.COM>",
                     to="bot@agents.test, Bob <bob@x.test>"),
        _NO_FROM,
        make_message(subject="Re: parent", msgid="<reply@x>", in_reply_to="<parent@x>",
                     frm="Carl <carl@x.test>", to="BOB@X.TEST"),
        make_message(subject="plain", msgid="<plain@x>", to="bot@agents.test, ana@example.com"),
    ]


def _store(server, target, raw: bytes, group: bool) -> defer.Deferred:
    return defer.ensureDeferred(server.core.ingest.store(
        [target], io.BytesIO(raw), envelope_from="a'b\\c@example.com", group=group,
        labels=_LABELS, received_at=_WHEN))


async def _threads(server, inbox_id: str) -> dict[str, dict]:
    rows = await _rows(server, "SELECT subject, message_count, last_message_at, participants, "
                               "labels, environment_id FROM threads WHERE inbox_id = %s",
                       inbox_id)
    return {r["subject"]: r for r in rows}


async def _events(server, inbox_id: str) -> list[dict]:
    rows = await _rows(server, "SELECT e.id, e.type, e.data, e.environment_id, m.subject "
                               "FROM events e JOIN messages m ON m.id = e.data->>'message_id' "
                               "WHERE e.inbox_id = %s ORDER BY e.txid, e.seq", inbox_id)
    for row in rows:
        assert row["data"]["message_id"] and row["data"]["thread_id"]
        row["data"] = {k: v for k, v in row["data"].items()
                       if k not in ("message_id", "inbox_id", "thread_id")}
    return rows


async def _audit(server, inbox_id: str) -> list[dict]:
    rows = await _rows(server, "SELECT a.actor_type, a.actor_id, a.action, a.outcome, "
                               "a.status, a.remote_addr, a.details, a.environment_id, "
                               "a.occurred_at, m.subject FROM audit_log a JOIN messages m "
                               "ON m.id = a.target_id WHERE m.inbox_id = %s ORDER BY m.uid",
                       inbox_id)
    for row in rows:
        assert row["details"].pop("inbox_id") == inbox_id
    return rows


def _wake_ups(conn) -> list[dict]:
    """The payloads of the event wake-ups this LISTENing connection has had."""
    import json

    select.select([conn], [], [], 2.0)
    conn.poll()
    out = [json.loads(n.payload) for n in conn.notifies if n.channel == EVENTS_CHANNEL]
    del conn.notifies[:]
    return out


@pytest_twisted.ensureDeferred
async def test_a_batch_writes_its_rows_as_one_copy_at_a_time_does(server, db_dsn, sent):
    _, [batched, alone], [t_batch, t_alone], clock, gc = await _setup(server, "cr1", "cr2")
    for target in (t_batch, t_alone):  # the reply's parent, in each inbox, alone
        await _store(server, target, _PARENT, group=False)
    listener = psycopg2.connect(db_dsn)
    listener.autocommit = True
    listener.cursor().execute(f"LISTEN {EVENTS_CHANNEL}")
    try:
        sent.clear()
        pending = [_store(server, t_batch, raw, group=True) for raw in _raws()]
        await _wait_pending(gc, len(pending))
        clock.advance(1.0)
        results = await defer.DeferredList(pending, consumeErrors=True)
        assert all(ok for ok, _ in results), results
        assert gc.batches == 1
        [write] = [m for m in sent if "INSERT INTO messages" in m]
        assert write.count("INSERT INTO events") == 1 and "NULL::events" in write
        assert write.count("INSERT INTO threads") == 1 and "jsonb_to_recordset" in write
        assert write.count("INSERT INTO audit_log") == 1 and "NULL::audit_log" in write
        assert write.count("UPDATE threads") == 1  # the reply's thread, its own statement
        woken = _wake_ups(listener)
        for raw in _raws():
            await _store(server, t_alone, raw, group=False)
    finally:
        listener.close()

    got, want = await _threads(server, batched["id"]), await _threads(server, alone["id"])
    assert got == want and len(got) == 4  # parent (with its reply), odd, no from, plain
    odd = next(subject for subject in got if subject.startswith("é😀"))
    assert "back\\slash 'single' \"double\"" in odd
    assert got[odd]["participants"] == ["ana@example.com", "bob@x.test", "bot@agents.test"]
    assert got[odd]["labels"] == ["", "a", "b", "back\\slash", "quote'\"", "é😀"]
    assert got[odd]["last_message_at"] == _WHEN
    assert got["parent"]["message_count"] == 2
    assert "carl@x.test" in got["parent"]["participants"]
    assert got["no from"]["participants"] == ["bot@agents.test"]

    events, alone_events = await _events(server, batched["id"]), await _events(server,
                                                                               alone["id"])
    assert [{k: v for k, v in e.items() if k != "id"} for e in events] == \
        [{k: v for k, v in e.items() if k != "id"} for e in alone_events]
    assert [e["subject"] for e in events] == ["parent", odd, "no from", "Re: parent",
                                              "plain"]  # the batch's order, as sent
    assert events[2]["data"]["from"] is None and events[1]["data"]["subject"] == odd
    # One wake-up per event of the batch, in the same order, naming it.
    assert [w["id"] for w in woken] == [e["id"] for e in events[1:]]
    assert {(w["type"], w["inbox_id"]) for w in woken} == {("message.received",
                                                            batched["id"])}

    audit, alone_audit = await _audit(server, batched["id"]), await _audit(server,
                                                                         alone["id"])
    times = [row.pop("occurred_at") for row in audit]
    assert len(set(times[1:])) == 1  # the batch's transaction time
    for row in alone_audit:
        row.pop("occurred_at")
    assert audit == alone_audit and len(audit) == 5
    assert audit[1]["details"] == {"folder": "INBOX", "size": len(_raws()[0])}


@pytest_twisted.ensureDeferred
async def test_without_json_a_batch_writes_one_copy_at_a_time(server, monkeypatch, sent):
    """No JSON encoder (or a value it cannot carry): the copies' own statements, in the
    same batch transaction, with the same rows."""
    monkeypatch.setattr(message_batch, "ujson", None)
    _, [inbox], [target], clock, gc = await _setup(server, "crj")
    sent.clear()
    pending = [_store(server, target, raw, group=True) for raw in _raws()[:2] + _raws()[3:]]
    await _wait_pending(gc, len(pending))
    clock.advance(1.0)
    results = await defer.DeferredList(pending, consumeErrors=True)
    assert all(ok for ok, _ in results) and gc.batches == 1
    [write] = [m for m in sent if "INSERT INTO messages" in m]
    assert write.count("INSERT INTO events") == 3 and "NULL::events" not in write
    assert len(await _threads(server, inbox["id"])) == 3
    assert len(await _events(server, inbox["id"])) == 3


def test_statements_keep_given_sql_and_small_batches_per_copy():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    rows = copy_rows.CopyRows(now, {"org_id": "o", "id": "evt_1", "environment_id": None,
                                    "inbox_id": None, "type": "t", "data": {}})
    alone = copy_rows.statements([rows, rows], batched=False)
    assert alone[0] == [rows.sql()[0]] * 2
    # Any copy given as plain statements (no values): every copy writes its own.
    mixed = copy_rows.statements([rows, ("SELECT %s", [1])], batched=True)
    assert mixed == ([rows.sql()[0], "SELECT %s"], [*rows.sql()[1], 1])
    grouped = copy_rows.statements([rows.plus(("SELECT %s", [2])), rows], batched=True)
    assert grouped[0][0] == "SELECT %s" and grouped[1][0] == 2  # extra rows go first
    assert "NULL::events" in grouped[0][1] and len(grouped[0]) == 2  # no thread, no audit
