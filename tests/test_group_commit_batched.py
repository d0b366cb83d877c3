"""Issue 12, group commit in fewer round trips: a batch is staged in ONE statement
(storage.message_insert.prepare_deliveries) and written in ONE more that also commits
(Txn.commit_with); what is stored is what one delivery at a time stores.

Batches are made with a ``task.Clock`` (``delay_s``), as in tests/test_group_commit.py.
"""

from __future__ import annotations

import io

import pytest_twisted
from twisted.internet import defer, task

from agentpost.core import ingest as ingest_module
from agentpost.core.group_commit import GroupCommit
from agentpost.storage.database import _UNLOCK_THEN_FLUSH
from agentpost.storage.message_insert import NotStored
from tests.mailfactory import make_message
from tests.test_group_commit import _setup as _base_setup
from tests.test_group_commit import _wait_pending


async def _setup(server, *names):
    """tests.test_group_commit's set-up, plus each inbox's routing target."""
    key, inboxes, clock, gc = await _base_setup(server, *names)
    targets = [await server.core.router.resolve(i["email"], "a@example.com") for i in inboxes]
    return key, inboxes, targets, clock, gc


def _store(server, targets, raw: bytes) -> defer.Deferred:
    return defer.ensureDeferred(server.core.ingest.store(
        targets, io.BytesIO(raw), envelope_from="a@example.com", group=True))


async def _batch(server, gc: GroupCommit, clock: task.Clock,
                 deliveries: list[tuple[list, bytes]]) -> list:
    pending = [_store(server, targets, raw) for targets, raw in deliveries]
    await _wait_pending(gc, len(pending))
    clock.advance(1.0)
    return await defer.DeferredList(pending, consumeErrors=True)


async def _rows(server, sql: str, *params) -> list[dict]:
    return await server.core.db.run_read("t", lambda txn: txn.fetchall(sql, params))


@pytest_twisted.ensureDeferred
async def test_a_batch_is_one_staging_round_trip_and_one_write_with_the_commit(server, sent):
    _, [one, two], targets, clock, gc = await _setup(server, "rt1", "rt2")
    deliveries = [([targets[n % 2]], make_message(subject=f"rt {n}", msgid=f"<rt{n}@x>"))
                  for n in range(6)]
    deliveries.append((targets, make_message(subject="both", msgid="<both@x>")))
    pending = [_store(server, t, raw) for t, raw in deliveries]
    await _wait_pending(gc, len(pending))
    sent.clear()
    clock.advance(1.0)
    results = await defer.gatherResults(pending)
    assert gc.batches == 1
    batch = [m for m in sent if "hashtextextended" in m or "INSERT INTO messages" in m
             or m == _UNLOCK_THEN_FLUSH]
    assert len(batch) == 2, [m[:120] for m in batch]
    stage, write = batch
    assert "INSERT INTO blobs" in stage and "INSERT INTO messages" not in stage
    assert "INSERT INTO messages" in write and "INSERT INTO threads" in write
    assert write.rstrip().endswith("AS r")  # the result, read past the COMMIT ...
    assert "; COMMIT; BEGIN; " in write  # ... that travelled with the write
    assert [s.inbox_id for s in results[6]] == [one["id"], two["id"]]  # the caller's order
    for inbox in (one, two):
        uids = [s.uid for stored in results for s in stored if s.inbox_id == inbox["id"]]
        assert sorted(uids) == [1, 2, 3, 4]
    for inbox in (one, two):
        rows = await _rows(server, "SELECT count(*) AS n, count(DISTINCT thread_id) AS t "
                                   "FROM messages WHERE inbox_id = %s", inbox["id"])
        assert rows == [{"n": 4, "t": 4}]
    # Each message's blob is referenced once per copy.
    [blob] = await _rows(server, "SELECT b.refcount FROM blobs b JOIN messages m "
                                 "ON m.raw_blob_key = b.key WHERE m.id = %s",
                         results[6][0].message_id)
    assert blob["refcount"] == 2


@pytest_twisted.ensureDeferred
async def test_batched_staging_finds_threads_as_one_delivery_does(server):
    """Parents, children that arrived first, and the inbox boundary, all in batches."""
    _, [_, other], [t_in, t_other], clock, gc = await _setup(server, "th1", "th2")
    first = await _batch(server, gc, clock, [
        ([t_in], make_message(subject="parent", msgid="<p1@x>")),
        ([t_in], make_message(subject="early child", msgid="<c2@x>",
                              references="<p9@x>")),
    ])
    assert all(ok for ok, _ in first)
    [parent], [child] = [r[1] for r in first]
    second = await _batch(server, gc, clock, [
        ([t_in], make_message(subject="reply", msgid="<r3@x>", in_reply_to="<p1@x>")),
        ([t_in], make_message(subject="late parent", msgid="<p9@x>")),
        ([t_other], make_message(subject="elsewhere", msgid="<r5@x>",
                                 in_reply_to="<p1@x>")),
        ([t_in], make_message(subject="deep", msgid="<r6@x>",
                              references="<nothing@x> <r0@x> <p1@x>")),
    ])
    assert all(ok for ok, _ in second)
    [reply], [late], [elsewhere], [deep] = [r[1] for r in second]
    assert reply.thread_id == parent.thread_id
    assert late.thread_id == child.thread_id != parent.thread_id
    assert elsewhere.inbox_id == other["id"] and elsewhere.thread_id != parent.thread_id
    assert deep.thread_id == parent.thread_id
    [thread] = await _rows(server, "SELECT message_count FROM threads WHERE id = %s",
                           parent.thread_id)
    assert thread["message_count"] == 3


@pytest_twisted.ensureDeferred
async def test_a_message_not_written_fails_alone_and_leaves_no_trace(server, monkeypatch):
    """A copy whose row cannot be written (its folder vanished between staging and the
    write) fails its batch's transaction before the COMMIT, naming it: its batch-mates
    are stored without it, and nothing of it (thread, event) is committed."""
    real = ingest_module._build_copy

    def doomed_folder(txn, target, parsed, *args):
        copy = real(txn, target, parsed, *args)
        if parsed.subject == "doomed":
            copy.row["folder_id"] = -1
        return copy

    monkeypatch.setattr(ingest_module, "_build_copy", doomed_folder)
    _, [inbox], [target], clock, gc = await _setup(server, "vanish")
    results = await _batch(server, gc, clock, [
        ([target], make_message(subject="kept 0", msgid="<k0@x>")),
        ([target], make_message(subject="doomed", msgid="<d1@x>")),
        ([target], make_message(subject="kept 2", msgid="<k2@x>")),
    ])
    assert results[0][0] and results[2][0] and not results[1][0]
    assert isinstance(results[1][1].value, NotStored)
    assert sorted(r[1][0].uid for r in (results[0], results[2])) == [1, 2]
    assert gc.batches == 3  # the shared attempt, the two kept, the doomed one alone
    counts = await _rows(
        server, "SELECT (SELECT count(*) FROM messages WHERE inbox_id = %s) AS m, "
                "(SELECT count(*) FROM threads WHERE inbox_id = %s) AS t, "
                "(SELECT count(*) FROM events WHERE inbox_id = %s "
                " AND type = 'message.received') AS e", inbox["id"], inbox["id"], inbox["id"])
    assert counts == [{"m": 2, "t": 2, "e": 2}]


@pytest_twisted.ensureDeferred
async def test_a_batch_to_an_inbox_without_folders_creates_them_once(server):
    """A missing folder is created per copy (the rare path), in the same transaction."""
    _, [inbox], [target], clock, gc = await _setup(server, "nofolders")
    await server.core.db.run_interaction("t", lambda txn: txn.execute(
        "DELETE FROM folders WHERE inbox_id = %s", (inbox["id"],)))
    results = await _batch(server, gc, clock, [
        ([target], make_message(subject=f"f {n}", msgid=f"<f{n}@x>")) for n in range(3)])
    assert all(ok for ok, _ in results)
    assert sorted(r[1][0].uid for r in results) == [1, 2, 3]
    assert gc.batches == 1
    names = await _rows(server, "SELECT name FROM folders WHERE inbox_id = %s ORDER BY name",
                        inbox["id"])
    assert [r["name"] for r in names] == ["Drafts", "INBOX", "Junk", "Sent", "Trash"]


@pytest_twisted.ensureDeferred
async def test_a_staging_failure_without_a_culprit_runs_each_alone(server, monkeypatch):
    """The batch's one staging statement fails (say, a value PostgreSQL refuses) without
    naming a delivery: each is run alone, and each is stored or fails on its own."""
    import psycopg2

    from agentpost.core import group_commit as gc_module

    real = gc_module.mail_store.prepare_deliveries

    async def failing_when_shared(txn, probes):
        if len(probes) > 1:
            raise psycopg2.DataError("simulated")
        return await real(txn, probes)

    monkeypatch.setattr(gc_module.mail_store, "prepare_deliveries", failing_when_shared)
    _, [inbox], [target], clock, gc = await _setup(server, "stagefail")
    results = await _batch(server, gc, clock, [
        ([target], make_message(subject=f"a {n}", msgid=f"<a{n}@x>")) for n in range(3)])
    assert all(ok for ok, _ in results)
    assert sorted(r[1][0].uid for r in results) == [1, 2, 3]
    assert gc.batches == 4  # the shared attempt, then one each
    [row] = await _rows(server, "SELECT count(*) AS n FROM messages WHERE inbox_id = %s",
                        inbox["id"])
    assert row["n"] == 3
