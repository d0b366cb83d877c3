"""Attacks on the group commit's batched companion rows (storage.copy_rows): a batch of
three copies or more writes its new threads, events (with their wake-ups) and audit rows
in one statement per kind; what that stores and announces must be exactly what the
per-copy statements (a lone delivery) store and announce, for batches that mix
organizations, environments, replies, odd text and webhooks, and a bad copy must fail
alone with the error it gets alone while its batch-mates are stored.

Batches are made with a ``task.Clock`` (``delay_s``), as in tests/test_group_commit.py.
"""

from __future__ import annotations

import io
import json
import select
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg2
import pytest_twisted
from twisted.internet import defer, task

from agentpost.core.group_commit import GroupCommit
from agentpost.storage.database import text_array
from agentpost.storage.mail import EVENTS_CHANNEL
from tests.mailfactory import make_message
from tests.test_group_commit import _wait_pending
from tests.test_group_commit_batched import _rows
from tests.test_send_api import _send_path, outbox, sub  # noqa: F401
from tests.test_send_api import _setup as send_setup

_WHEN = datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=9, minutes=30)))
#: text[] literal syntax, JSON look-alikes, quotes, escapes, emoji, blanks.
_LABELS = ("{a,b}", "c,d", "\"q\"", "back\\slash", "NULL", "null", "", " sp ", "é😀",
           '{"j": [1]}', "}{", "a\\\"b")
_ENVELOPE = "o'dd\"{x,y}\\z@example.com"
_ODD_NAME = '"Q\\"{a,b}\\\\ ,😀" <Q.Odd@Example.COM>'
_EVENT_TYPE = "draft.saved"  # an event type of its own (webhooks filter on it)


class _Side:
    """Two organizations (A with an inbox in its default and in a second environment,
    B with one), each with webhooks; one side is written batched, its twin alone."""

    def __init__(self, inboxes: list[dict], targets: list, hooks: list[str],
                 orgs: list[str]) -> None:
        self.inboxes, self.targets, self.hooks, self.orgs = inboxes, targets, hooks, orgs

    def index(self, inbox_id: str) -> int:
        return [i["id"] for i in self.inboxes].index(inbox_id)


async def _side(server, tag: str) -> _Side:
    _, key_a = await server.new_org("A")
    _, key_b = await server.new_org("B")
    env = (await server.api.post("/api/v1/environments", {"name": f"st{tag}"},
                                 key=key_a)).json
    made = [await server.api.post("/api/v1/inboxes", body, key=key) for key, body in (
        (key_a, {"username": f"{tag}a1"}),
        (key_a, {"username": f"{tag}a2", "environment_id": env["id"]}),
        (key_b, {"username": f"{tag}b1"}))]
    assert all(m.status == 201 for m in made), made
    inboxes = [m.json for m in made]
    url = "https://hooks.example/in"
    hooks = []
    for key, body in ((key_a, {"url": url}),
                      (key_a, {"url": url, "inbox_id": inboxes[1]["id"]}),
                      (key_a, {"url": url, "event_types": ["message.sent"]}),
                      (key_a, {"url": url, "event_types": [_EVENT_TYPE]}),
                      (key_b, {"url": url,
                               "environment_ids": [inboxes[2]["environment_id"]]})):
        hook = await server.api.post("/api/v1/webhooks", body, key=key)
        assert hook.status == 201, hook
        hooks.append(hook.json["id"])
    targets = [await server.core.router.resolve(i["email"], "a@example.com")
               for i in inboxes]
    return _Side(inboxes, targets, hooks, [targets[0].org_id, targets[2].org_id])


def _gc(server) -> tuple[GroupCommit, task.Clock]:
    clock = task.Clock()
    gc = GroupCommit(server.core.db, clock, max_batch=16, delay_s=1.0, parallel=1)
    server.core.ingest.group_commit = gc
    return gc, clock


def _store(server, targets, raw: bytes, *, group: bool, labels=_LABELS,
           event_type: str | None = None) -> defer.Deferred:
    return defer.ensureDeferred(server.core.ingest.store(
        targets, io.BytesIO(raw), envelope_from=_ENVELOPE, group=group, labels=labels,
        received_at=_WHEN, event_type=event_type))


#: (target indexes, message, event type): sixteen deliveries mixing organizations,
#: environments, new threads and replies (two to one thread), odd text of every kind.
def _deliveries() -> list[tuple[list[int], bytes, str | None]]:
    many = ", ".join(f"R{n} <Rcpt{n}.É@Example.COM>" for n in range(40))
    return [
        ([0], make_message(subject='odd {a,b} "q" \\ , 😀 \'s', msgid="<o1@x>",
                           frm=_ODD_NAME, to="bot@agents.test, BOB <Bob@X.Test>"), None),
        ([0], make_message(subject="Re: pa", msgid="<r1@x>", in_reply_to="<pa@x>",
                           frm="Carl <CARL@x.test>"), None),
        ([0], make_message(subject="Re: pa again", msgid="<r2@x>", references="<pa@x>",
                           frm="Dora <dora@x.test>", to="EVE@x.test"), None),
        ([1], make_message(subject='{"subject": ["x"], "n": null}', msgid="<j1@x>"), None),
        ([2], make_message(subject="é" * 3000 + " long", msgid="<l1@x>"), None),
        ([0, 2], make_message(subject="both orgs", msgid="<bo@x>"), None),
        ([2], make_message(subject="Re: pb", msgid="<r3@x>", in_reply_to="<pb@x>"), None),
        ([1], make_message(subject="NULL", msgid="<n1@x>"), None),
        ([0], make_message(subject="many", msgid="<m1@x>", to=many), None),
        ([2], make_message(subject="", msgid="<e1@x>"), None),
        ([1], make_message(subject="[]", msgid="<a1@x>"), _EVENT_TYPE),
        ([0], make_message(subject="tab\there \u00a0 nbsp", msgid="<t1@x>"), None),
        ([1], make_message(subject="\\u0000 literal", msgid="<u1@x>"), _EVENT_TYPE),
        ([2, 1], make_message(subject="cross env", msgid="<ce@x>"), None),
        ([0], make_message(subject="plain 1", msgid="<p1@x>"), None),
        ([2], make_message(subject="plain 2", msgid="<p2@x>"), None),
    ]


def _parents() -> list[tuple[int, bytes]]:
    return [(0, make_message(subject="pa", msgid="<pa@x>")),
            (2, make_message(subject="pb", msgid="<pb@x>"))]


def make_subject(raw: bytes) -> str:
    """The subject a test message's thread and event carry."""
    from agentpost.mail.parse import parse_message

    return parse_message(raw).subject


def _listen(dsn: str):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute(f"LISTEN {EVENTS_CHANNEL}")
    return conn


def _wake_ups(conn) -> list[dict]:
    out: list[dict] = []
    while True:
        if not select.select([conn], [], [], 1.0)[0]:
            return out
        conn.poll()
        out += [json.loads(n.payload) for n in conn.notifies if n.channel == EVENTS_CHANNEL]
        del conn.notifies[:]


async def _snapshot(server, side: _Side) -> dict[str, Any]:
    """Everything a side stored beside its message rows, ids replaced by their place."""
    ids = [i["id"] for i in side.inboxes]
    envs = [i["environment_id"] for i in side.inboxes]
    threads = await _rows(server, "SELECT inbox_id, environment_id, org_id, subject, "
                                  "message_count, last_message_at, participants, labels "
                                  "FROM threads WHERE inbox_id = ANY(%s)", ids)
    events = await _rows(server, "SELECT e.id, e.org_id, e.inbox_id, e.environment_id, "
                                 "e.type, e.data, e.created_at, m.thread_id AS m_thread "
                                 "FROM events e JOIN messages m ON m.id = e.data->>'message_id' "
                                 "WHERE e.inbox_id = ANY(%s) ORDER BY e.txid, e.seq", ids)
    audit = await _rows(server, "SELECT a.*, m.inbox_id AS m_inbox, m.subject AS m_subject "
                                "FROM audit_log a JOIN messages m ON m.id = a.target_id "
                                "WHERE m.inbox_id = ANY(%s) ORDER BY m.inbox_id, m.uid", ids)
    hooks = await _rows(server, "SELECT webhook_id, event_id, event_type, created_at, "
                                "org_id FROM webhook_deliveries WHERE webhook_id = ANY(%s)",
                        side.hooks)
    subject_of = {e["id"]: (ids.index(e["inbox_id"]), e["data"]["subject"]) for e in events}
    for t in threads:
        assert t["environment_id"] == envs[ids.index(t["inbox_id"])]
        t["inbox_id"] = ids.index(t.pop("inbox_id"))
        t["org_id"] = side.orgs.index(t["org_id"])
        t.pop("environment_id")
    per_inbox: dict[int, list] = {}
    for e in events:
        n = ids.index(e["inbox_id"])
        assert e["environment_id"] == envs[n] and e["data"]["inbox_id"] == e["inbox_id"]
        assert e["data"]["thread_id"] == e["m_thread"]
        data = {k: v for k, v in e["data"].items() if k not in ("message_id", "inbox_id",
                                                               "thread_id")}
        per_inbox.setdefault(n, []).append((side.orgs.index(e["org_id"]), e["type"], data,
                                            e["created_at"]))
    audit_rows = []
    for a in audit:
        n = ids.index(a["m_inbox"])
        assert a["environment_id"] == envs[n] and a["details"].pop("inbox_id") == ids[n]
        assert a["org_id"] == side.targets[n].org_id
        audit_rows.append((n, a["m_subject"], a["actor_type"], a["actor_id"], a["action"],
                           a["outcome"], a["status"], a["remote_addr"], a["details"],
                           a["occurred_at"]))
    deliveries = sorted((side.hooks.index(h["webhook_id"]), subject_of[h["event_id"]],
                         h["event_type"], h["created_at"], side.orgs.index(h["org_id"]))
                        for h in hooks)
    return {"threads": sorted(threads, key=lambda t: (t["inbox_id"], t["subject"])),
            "events": per_inbox, "audit": sorted(audit_rows, key=repr),
            "webhooks": deliveries, "event_ids": [e["id"] for e in events],
            "event_subjects": [e["data"]["subject"] for e in events],
            "event_places": [(ids.index(e["inbox_id"]), e["type"]) for e in events]}


@pytest_twisted.ensureDeferred
async def test_a_batch_of_sixteen_across_orgs_and_envs_stores_what_alone_stores(
        server, db_dsn, sent):
    """Sixteen deliveries (eighteen copies) over two organizations and two environments,
    replies (two to one thread) among new threads, odd subjects, display names and labels,
    a custom event type, webhooks: the same threads, events (in the batch's order, with
    their wake-ups), audit rows and webhook deliveries as each delivery alone."""
    batched, alone = await _side(server, "q16b"), await _side(server, "q16a")
    for side in (batched, alone):
        for n, raw in _parents():
            await _store(server, [side.targets[n]], raw, group=False)
    gc, _ = _gc(server)  # sixteen fill a batch: it starts without the clock
    listener = _listen(db_dsn)
    try:
        _wake_ups(listener)
        sent.clear()
        pending = [_store(server, [batched.targets[n] for n in where], raw, group=True,
                          event_type=kind) for where, raw, kind in _deliveries()]
        results = await defer.DeferredList(pending, consumeErrors=True)
        assert all(ok for ok, _ in results), results
        assert gc.batches == 1
        [write] = [m for m in sent if "INSERT INTO messages" in m]
        assert "NULL::events" in write and "jsonb_to_recordset" in write
        woken_batched = _wake_ups(listener)
        # Alone, in the order the batch wrote them (deliveries parsed first come first).
        got = await _snapshot(server, batched)
        subjects = [make_subject(raw) for _, raw, _ in _deliveries()]
        order: list[int] = []
        for subject in got["event_subjects"][2:]:
            if subjects.index(subject) not in order:
                order.append(subjects.index(subject))
        for i in order:
            where, raw, kind = _deliveries()[i]
            await _store(server, [alone.targets[n] for n in where], raw, group=False,
                         event_type=kind)
        woken_alone = _wake_ups(listener)
    finally:
        listener.close()
    want = await _snapshot(server, alone)
    assert len(got["threads"]) == 17 and len(got["event_ids"]) == 2 + 18
    for part in ("threads", "events", "audit", "webhooks"):
        if part == "events":  # per inbox, batch's order; the created_at differs
            strip = {n: [e[:3] for e in rows] for n, rows in got[part].items()}
            assert strip == {n: [e[:3] for e in rows] for n, rows in want[part].items()}
        elif part == "threads":  # received_at is given: last_message_at too
            assert got[part] == want[part]
        elif part == "audit":
            assert [a[:-1] for a in got[part]] == [a[:-1] for a in want[part]]
        else:
            assert [w[:3] + w[4:] for w in got[part]] == [w[:3] + w[4:] for w in want[part]]
    threads = {t["subject"]: t for t in got["threads"] if t["subject"] != "both orgs"}
    assert threads["pa"]["message_count"] == 3 and threads["pb"]["message_count"] == 2
    assert threads["pa"]["last_message_at"] == _WHEN
    assert "q.odd@example.com" in threads['odd {a,b} "q" \\ , 😀 \'s']["participants"]
    assert threads["many"]["participants"][0] == "alice@example.com"
    assert len(threads["many"]["participants"]) == 41
    assert set(threads["plain 1"]["labels"]) == set(_LABELS)
    assert len(threads["plain 1"]["labels"]) == len(_LABELS)
    # Webhooks: one delivery per matching endpoint and event, created with it.
    batch_time = got["events"][1][-1][3]
    assert {w[3] for w in got["webhooks"] if w[1][1] not in ("pa", "pb")} == {batch_time}
    custom = [w for w in got["webhooks"] if w[0] == 3]
    assert sorted(w[1][1] for w in custom) == ["[]", "\\u0000 literal"]
    # One wake-up per event, in (txid, seq) order, same payloads as alone (ids aside).
    batch_ids = got["event_ids"][2:]
    assert [w["id"] for w in woken_batched] == batch_ids
    assert [(batched.index(w["inbox_id"]), w["type"]) for w in woken_batched] \
        == got["event_places"][2:]
    assert [(alone.index(w["inbox_id"]), w["type"]) for w in woken_alone] \
        == want["event_places"][2:]
    assert sorted((batched.orgs.index(w["org_id"]), w["type"]) for w in woken_batched) == \
        sorted((alone.orgs.index(w["org_id"]), w["type"]) for w in woken_alone)


@pytest_twisted.ensureDeferred
async def test_text_array_round_trips_hostile_payloads(server):
    """The wake-ups travel as one text[] literal: every payload comes back unchanged."""
    values = ['{"org_id": "o\\"q", "id": "x\\\\y", "type": "a,b", "inbox_id": null}',
              "NULL", "null", "", " lead and trail ", "{a,b}", "}", "{", ",", '"', "\\",
              "\\\\\"", "é😀", "line\nbreak", "tab\t", json.dumps({"t": 'q"\\{,}'})]
    [row] = await _rows(server, "SELECT %s::text[] AS a", text_array(values))
    assert row["a"] == values
    [row] = await _rows(server, "SELECT %s::text[] AS a", text_array([]))
    assert row["a"] == []


async def _failure(d: defer.Deferred) -> tuple[type, str]:
    try:
        await d
    except Exception as exc:  # what the caller would see
        return type(exc), str(exc)
    raise AssertionError("stored")


async def _isolation(server, dsn: str, tag: str, bad_labels: tuple[str, ...]) -> None:
    """A batch of four, one of them with ``bad_labels``: the others are stored, the bad
    one fails with the error it gets alone and leaves nothing behind (the failed shared
    attempt announces nothing: one wake-up per stored event)."""
    side = await _side(server, tag)
    gc, clock = _gc(server)
    listener = _listen(dsn)
    raws = [make_message(subject=f"{tag} {n}", msgid=f"<{tag}{n}@x>") for n in range(4)]
    pending = [_store(server, [side.targets[n % 3]], raw, group=True,
                      labels=bad_labels if n == 1 else _LABELS)
               for n, raw in enumerate(raws)]
    await _wait_pending(gc, len(pending))
    clock.advance(1.0)
    results = await defer.DeferredList(pending[:1] + pending[2:], consumeErrors=True)
    assert all(ok for ok, _ in results), results
    batched_error = await _failure(pending[1])
    try:
        woken = _wake_ups(listener)
    finally:
        listener.close()
    server.core.ingest.group_commit = None
    alone_error = await _failure(_store(server, [side.targets[1]], make_message(
        subject=f"{tag} alone", msgid=f"<{tag}alone@x>"), group=False, labels=bad_labels))
    assert batched_error == alone_error
    # A delivery to three inboxes (three copies: the batched statements) fails the same.
    assert await _failure(_store(server, side.targets, make_message(
        subject=f"{tag} three", msgid=f"<{tag}three@x>"), group=False,
        labels=bad_labels)) == alone_error
    ids = [i["id"] for i in side.inboxes]
    stored = await _rows(server, "SELECT (SELECT array_agg(subject ORDER BY subject) FROM "
                                 "messages WHERE inbox_id = ANY(%s)) AS m, (SELECT count(*) "
                                 "FROM threads WHERE inbox_id = ANY(%s)) AS t, (SELECT "
                                 "count(*) FROM events WHERE inbox_id = ANY(%s)) AS e",
                         ids, ids, ids)
    assert stored == [{"m": [f"{tag} 0", f"{tag} 2", f"{tag} 3"], "t": 3, "e": 3}]
    events = await _rows(server, "SELECT id FROM events WHERE inbox_id = ANY(%s) "
                                 "ORDER BY txid, seq", ids)
    assert sorted(w["id"] for w in woken) == sorted(e["id"] for e in events)
    hooks = await _rows(server, "SELECT event_id FROM webhook_deliveries "
                                "WHERE webhook_id = ANY(%s)", side.hooks)
    assert {h["event_id"] for h in hooks} == {e["id"] for e in events}


@pytest_twisted.ensureDeferred
async def test_a_nul_label_fails_its_copy_alone(server, db_dsn):
    await _isolation(server, db_dsn, "nul", ("ok", "x\x00y"))


@pytest_twisted.ensureDeferred
async def test_a_lone_surrogate_label_fails_its_copy_alone(server, db_dsn):
    await _isolation(server, db_dsn, "sur", ("ok", "x\ud800y"))


@pytest_twisted.ensureDeferred
async def test_an_inbox_deleted_after_routing_fails_alone_in_a_batch(server):
    """Targets resolved (RCPT) before their inbox is deleted: the copies to it fail as
    they fail alone, the rest of the batch (guessed from remembered folders or staged
    by asking) is stored."""
    side = await _side(server, "del")
    _, key = await server.new_org("C")
    doomed = (await server.api.post("/api/v1/inboxes", {"username": "deldoomed"},
                                    key=key)).json
    gone = await server.core.router.resolve(doomed["email"], "a@example.com")
    gc, clock = _gc(server)

    async def batch(tag: str, wheres: list[list]) -> list:
        pending = [_store(server, where, make_message(subject=f"{tag} {n}",
                                                      msgid=f"<{tag}{n}@x>"), group=True)
                   for n, where in enumerate(wheres)]
        await _wait_pending(gc, len(pending))
        clock.advance(1.0)
        return await defer.DeferredList(pending, consumeErrors=True)

    t = side.targets
    warm = await batch("warm", [[t[0]], [gone], [t[1]], [t[2]]])  # folders remembered
    assert all(ok for ok, _ in warm), warm
    deleted = await server.api.delete(f"/api/v1/inboxes/{doomed['id']}", key=key)
    assert deleted.status in (200, 204), deleted
    server.core.ingest.group_commit = None
    alone = await _failure(_store(server, [gone], make_message(subject="x", msgid="<x@x>"),
                                  group=False))
    server.core.ingest.group_commit = gc
    after = await batch("after", [[t[0]], [gone], [t[1], t[2]], [t[2], gone], [t[1]]])
    assert [ok for ok, _ in after] == [True, False, True, False, True], after
    for _, why in (after[1], after[3]):
        assert (why.type, str(why.value)) == alone
    ids = [i["id"] for i in side.inboxes]
    rows = await _rows(server, "SELECT m.subject, (SELECT count(*) FROM events e WHERE "
                               "e.data->>'message_id' = m.id) AS e, (SELECT count(*) FROM "
                               "threads th WHERE th.id = m.thread_id) AS t FROM messages m "
                               "WHERE m.inbox_id = ANY(%s) AND m.subject LIKE 'after%%' "
                               "ORDER BY m.subject", ids)
    assert [(r["subject"], r["e"], r["t"]) for r in rows] == [
        ("after 0", 1, 1), ("after 2", 1, 1), ("after 2", 1, 1), ("after 4", 1, 1)]


@pytest_twisted.ensureDeferred
async def test_an_inbox_that_holds_mail_can_be_deleted(server):
    """Its blobs were released (their rows removed) while its messages still named them:
    every inbox that had received mail answered 409 to DELETE."""
    _, key = await server.new_org("D")
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "delheld"}, key=key)).json
    for n in range(2):
        await server.deliver(make_message(subject=f"held {n}", msgid=f"<held{n}@x>"),
                             [inbox["email"]])
    deleted = await server.api.delete(f"/api/v1/inboxes/{inbox['id']}", key=key)
    assert deleted.status == 204, deleted
    assert await _rows(server, "SELECT count(*) AS n FROM messages WHERE inbox_id = %s",
                       inbox["id"]) == [{"n": 0}]
    gone = await server.api.get(f"/api/v1/inboxes/{inbox['id']}", key=key)
    assert gone.status == 404, gone


@pytest_twisted.ensureDeferred
async def test_a_reply_to_a_new_thread_of_the_same_batch(server):
    """Parent, reply and a reply to the reply in one batch: alone, each joins the
    first's thread."""
    side = await _side(server, "inb")
    gc, clock = _gc(server)
    t = side.targets[0]
    raws = [make_message(subject="in parent", msgid="<ip@x>"),
            make_message(subject="Re: in parent", msgid="<ir@x>", in_reply_to="<ip@x>"),
            make_message(subject="other", msgid="<io@x>"),
            make_message(subject="Re: Re: in parent", msgid="<irr@x>", in_reply_to="<ir@x>",
                         references="<ip@x> <ir@x>")]
    pending = []
    for raw in raws:  # in this order
        pending.append(_store(server, [t], raw, group=True))
        await _wait_pending(gc, len(pending))
    clock.advance(1.0)
    results = await defer.DeferredList(pending, consumeErrors=True)
    assert all(ok for ok, _ in results), results
    threads = [r[1][0].thread_id for r in results]
    assert threads[1] == threads[0] and threads[3] == threads[0] != threads[2]


async def _sent_rows(server, inbox: dict) -> dict[str, Any]:
    """A sending inbox's threads, events, audit and queue rows, by subject, ids aside."""
    inbox_id = inbox["id"]
    threads = await _rows(server, "SELECT subject, message_count, participants, labels "
                               "FROM threads WHERE inbox_id = %s ORDER BY subject", inbox_id)
    events = await _rows(server, "SELECT e.type, e.data, m.subject FROM events e JOIN messages m "
                              "ON m.id = e.data->>'message_id' WHERE e.inbox_id = %s "
                              "ORDER BY m.subject", inbox_id)
    for e in events:
        for k in ("message_id", "inbox_id", "thread_id", "received_at"):
            e["data"].pop(k)
    audit = await _rows(server, "SELECT a.actor_type, a.action, a.outcome, a.status, a.details, "
                             "m.subject FROM audit_log a JOIN messages m ON m.id = a.target_id "
                             "WHERE m.inbox_id = %s AND a.details ? 'folder' "  # the copy's
                             "ORDER BY m.subject", inbox_id)
    for a in audit:
        assert a["details"].pop("inbox_id", inbox_id) == inbox_id
        a["details"].pop("size", None)  # each composition has its own boundary
    queue = await _rows(server, "SELECT q.domain, q.size > 0 AS sized, m.subject, "
                             "array_agg(r.address ORDER BY r.address) AS rcpts "
                             "FROM outbound_queue q JOIN messages m ON m.id = q.message_id "
                             "JOIN outbound_recipients r ON r.queue_id = q.id "
                             "WHERE m.inbox_id = %s GROUP BY q.id, m.subject "
                             "ORDER BY m.subject, q.domain", inbox_id)
    rows = {"threads": threads, "events": events, "audit": audit, "queue": queue}
    return json.loads(json.dumps(rows, default=str).replace(inbox["email"], "SENDER"))


def _send_bodies() -> list[dict]:
    odd = 'q"{a,b}\\ , 😀 \'s {"j": null}'
    return [{"to": [f"r{n}@remote{n}.example", f"S{n}@Other.Example"],
             "subject": f"{odd} {n}", "text_body": f"body {n}"} for n in range(4)]


@pytest_twisted.ensureDeferred
async def test_sends_and_mx_copies_in_one_batch_store_what_alone_stores(sub):  # noqa: F811
    """Submissions (their queue rows ride as ``before_insert`` extra statements) mixed
    with MX deliveries in one batch: the same threads, events, audit and queue rows as
    each send alone."""
    _, sender, other, key = await send_setup(sub)
    _, sender_alone, _, key_alone = await send_setup(sub)
    gc, clock = _gc(sub)
    target = await sub.core.router.resolve(other["email"], "a@example.com")
    pending = [defer.ensureDeferred(sub.api.post(_send_path(sender), body, key=key))
               for body in _send_bodies()]
    pending += [_store(sub, [target], make_message(subject=f"mx {n}", msgid=f"<smx{n}@x>"),
                       group=True) for n in range(2)]
    await _wait_pending(gc, len(pending))
    clock.advance(1.0)
    answers = [await d for d in pending]
    assert [a.status for a in answers[:4]] == [201] * 4, answers
    assert gc.batches == 1
    sub.core.ingest.group_commit = None
    for body in _send_bodies():
        answer = await sub.api.post(_send_path(sender_alone), body, key=key_alone)
        assert answer.status == 201, answer
    got, want = await _sent_rows(sub, sender), await _sent_rows(sub, sender_alone)
    assert got == want
    assert len(got["threads"]) == 4 and len(got["queue"]) == 8 and len(got["audit"]) == 4
    assert {e["type"] for e in got["events"]} == {"message.sent"}
