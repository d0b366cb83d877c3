"""Issue 12, group commit: MX deliveries that arrive together share one transaction.

The batch is driven by a ``task.Clock`` (``delay_s``), so what is batched is decided by
the test, not by timing: nothing is stored (and no caller answered) before the shared
COMMIT, every delivery gets its own UID, and a delivery that fails does not fail its
batch-mates.
"""

from __future__ import annotations

import io

import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.core.group_commit import GroupCommit
from agentpost.model.errors import AgentPostError
from tests.mailfactory import make_message


async def _wait_pending(gc: GroupCommit, n: int) -> None:
    """Until ``n`` deliveries wait in the batch (they are parsed in threads first)."""
    for _ in range(2000):
        if len(gc._pending) >= n:
            return
        await task.deferLater(reactor, 0.005, lambda: None)
    raise AssertionError(f"only {len(gc._pending)} of {n} deliveries reached the batch")


async def _setup(server, *names):
    _, key = await server.new_org()
    inboxes = [(await server.api.post("/api/v1/inboxes", {"username": n}, key=key)).json
               for n in names]
    clock = task.Clock()
    gc = GroupCommit(server.core.db, clock, max_batch=16, delay_s=1.0, parallel=1)
    server.core.ingest.group_commit = gc
    return key, inboxes, clock, gc


def _store(server, target, n: int) -> defer.Deferred:
    raw = make_message(subject=f"batched {n}", msgid=f"<b{n}@x>")
    return defer.ensureDeferred(server.core.ingest.store(
        [target], io.BytesIO(raw), envelope_from="a@example.com", group=True))


async def _count(server, inbox_id: str) -> int:
    return await server.core.db.run_read("t", lambda txn: txn.fetchval(
        "SELECT count(*) FROM messages WHERE inbox_id = %s", (inbox_id,)))


@pytest_twisted.ensureDeferred
async def test_deliveries_arriving_together_share_one_commit(server):
    key, [inbox], clock, gc = await _setup(server, "burst")
    target = await server.core.router.resolve(inbox["email"], "a@example.com")
    pending = [_store(server, target, n) for n in range(6)]
    await _wait_pending(gc, 6)
    assert not any(d.called for d in pending)  # nobody answered before the COMMIT
    assert await _count(server, inbox["id"]) == 0
    clock.advance(1.0)
    stored = [s for [s] in await defer.gatherResults(pending)]
    assert gc.batches == 1
    assert sorted(s.uid for s in stored) == [1, 2, 3, 4, 5, 6]
    assert await _count(server, inbox["id"]) == 6
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?limit=50",
                                   key=key)).json["data"]
    shown = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}", key=key)).json
    assert shown["used_bytes"] == sum(m["size"] for m in listed)
    assert len({m["thread_id"] for m in listed}) == 6


@pytest_twisted.ensureDeferred
async def test_a_failing_delivery_does_not_fail_its_batch_mates(server):
    key, [kept, doomed], clock, gc = await _setup(server, "kept", "doomed")
    good = await server.core.router.resolve(kept["email"], "a@example.com")
    bad = await server.core.router.resolve(doomed["email"], "a@example.com")
    pending = [_store(server, good, 0), _store(server, bad, 1), _store(server, good, 2)]
    await _wait_pending(gc, 3)
    # The inbox goes away between RCPT and the batch: its delivery cannot be stored.
    assert (await server.api.delete(f"/api/v1/inboxes/{doomed['id']}",
                                    key=key)).status in (200, 204)
    clock.advance(1.0)
    results = await defer.DeferredList(pending, consumeErrors=True)
    assert results[0][0] and results[2][0]
    assert not results[1][0]
    assert isinstance(results[1][1].value, AgentPostError | LookupError)
    assert sorted(r[1][0].uid for r in (results[0], results[2])) == [1, 2]
    assert await _count(server, kept["id"]) == 2


@pytest_twisted.ensureDeferred
async def test_a_lone_delivery_is_not_delayed(server):
    """No delay configured: a delivery with a free transaction slot starts at once."""
    _, [inbox], _, _ = await _setup(server, "lone")
    gc = GroupCommit(server.core.db, task.Clock(), delay_s=0.0, parallel=1)
    server.core.ingest.group_commit = gc
    target = await server.core.router.resolve(inbox["email"], "a@example.com")
    [stored] = await _store(server, target, 1)  # the Clock never advances
    assert stored.uid == 1 and gc.batches == 1


@pytest_twisted.ensureDeferred
async def test_a_shared_write_failing_without_a_culprit_runs_each_alone(server, monkeypatch):
    """When the batch's one write fails and names no delivery, each is run alone."""
    import psycopg2

    from agentpost.core import group_commit as gc_module

    real = gc_module.mail_store.insert_messages

    async def failing_when_shared(txn, writes, **kwargs):
        if len(writes) > 1:
            raise psycopg2.DataError("simulated")
        return await real(txn, writes, **kwargs)

    monkeypatch.setattr(gc_module.mail_store, "insert_messages", failing_when_shared)
    _, [inbox], clock, gc = await _setup(server, "split")
    target = await server.core.router.resolve(inbox["email"], "a@example.com")
    pending = [_store(server, target, n) for n in range(3)]
    await _wait_pending(gc, 3)
    clock.advance(1.0)
    stored = [s for [s] in await defer.gatherResults(pending)]
    assert sorted(s.uid for s in stored) == [1, 2, 3]
    assert gc.batches == 4  # the shared attempt, then one each
    assert await _count(server, inbox["id"]) == 3
