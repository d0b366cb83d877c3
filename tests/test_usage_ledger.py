"""Issue 12: an inbox's storage use without a hot row.

Deliveries append usage deltas (storage.usage) instead of updating ``inboxes.used_bytes``;
the fold job moves them into the column. What users see (API ``used_bytes``, IMAP QUOTA,
the quota checks) is exact whether or not the fold has run, a delivery no longer waits
for another transaction holding the inbox's row, and quota-checked writers to one inbox
stay exact among themselves.
"""

from __future__ import annotations

import psycopg2
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from agentpost.jobs.usage_fold import UsageFold
from agentpost.storage import usage
from tests.mailfactory import make_message


async def _inbox(server, name: str = "ledger"):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    return inbox, key


async def _column_and_pending(server, inbox_id: str) -> tuple[int, int]:
    row = await server.core.db.run_read("t", lambda txn: txn.fetchone(
        "SELECT i.used_bytes, (SELECT count(*) FROM inbox_usage_deltas d "
        "WHERE d.inbox_id = i.id) AS pending FROM inboxes i WHERE i.id = %s", (inbox_id,)))
    return row["used_bytes"], row["pending"]


@pytest_twisted.ensureDeferred
async def test_deliveries_append_deltas_and_the_fold_keeps_the_use_exact(server):
    await server.core.usage_fold.stop()  # folded by hand below
    inbox, key = await _inbox(server)
    await defer.gatherResults([
        defer.ensureDeferred(server.deliver(make_message(subject=f"m{n}", msgid=f"<m{n}@x>"),
                                            [inbox["email"]]))
        for n in range(8)])
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?limit=50",
                                   key=key)).json["data"]
    total = sum(m["size"] for m in listed)
    assert len(listed) == 8 and total > 0
    assert await _column_and_pending(server, inbox["id"]) == (0, 8)  # no row updated
    shown = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}", key=key)).json
    assert shown["used_bytes"] == total  # exact before the fold
    assert await server.core.usage_fold.run_once() >= 8
    assert await _column_and_pending(server, inbox["id"]) == (total, 0)
    shown = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}", key=key)).json
    assert shown["used_bytes"] == total  # and after it

    # An expunge gives the bytes back as a negative delta, folded the same way.
    deleted = listed[0]
    assert (await server.api.delete(f"/api/v1/messages/{deleted['id']}",
                                    key=key)).status in (200, 204)
    shown = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}", key=key)).json
    assert shown["used_bytes"] == total - deleted["size"]
    await server.core.usage_fold.run_once()
    assert await _column_and_pending(server, inbox["id"]) == (total - deleted["size"], 0)


@pytest_twisted.ensureDeferred
async def test_a_delivery_does_not_wait_for_a_transaction_holding_the_inbox_row(server, db_dsn):
    """Before issue 12 the delivery would queue behind this lock until it was released."""
    inbox, _ = await _inbox(server)
    conn = psycopg2.connect(db_dsn)
    try:
        cur = conn.cursor()
        cur.execute("SELECT 1 FROM inboxes WHERE id = %s FOR NO KEY UPDATE", (inbox["id"],))
        delivery = defer.ensureDeferred(
            server.deliver(make_message(subject="not blocked"), [inbox["email"]]))
        stored = await delivery.addTimeout(30, reactor)  # blocked: TimeoutError
        assert len(stored) == 1
    finally:
        conn.rollback()
        conn.close()


@pytest_twisted.ensureDeferred
async def test_quota_checked_writers_to_one_inbox_are_exact(server):
    """Two concurrent quota-checked charges that together pass the quota: one wins,
    the other is refused once the first has committed (the advisory lock)."""
    await server.core.usage_fold.stop()
    inbox, _ = await _inbox(server, "tight")
    org_id = (await server.core.db.run_read("t", lambda txn: txn.fetchval(
        "SELECT org_id FROM inboxes WHERE id = %s", (inbox["id"],))))
    release = defer.Deferred()
    first_charged = defer.Deferred()

    async def first(txn):
        ok = await usage.charge(txn, org_id, inbox["id"], 600, quota=1000)
        first_charged.callback(ok)
        await release  # hold the transaction (and the lock) open
        return ok

    async def second(txn):
        return await usage.charge(txn, org_id, inbox["id"], 600, quota=1000)

    a = defer.ensureDeferred(server.core.db.run_interaction("t.first", first))
    assert await first_charged is True
    b = defer.ensureDeferred(server.core.db.run_interaction("t.second", second))
    await deferToThread(lambda: None)  # let the second reach the lock
    assert not b.called
    release.callback(None)
    assert await a is True
    assert await b is False
    used = await server.core.db.run_read("t", lambda txn: usage.inbox_usage(
        txn, org_id, inbox["id"]))
    assert used == 600


@pytest_twisted.ensureDeferred
async def test_the_fold_runs_on_the_injected_clock_and_one_process_at_a_time(server, db_dsn):
    await server.core.usage_fold.stop()
    inbox, _ = await _inbox(server, "clocked")
    await server.deliver(make_message(subject="one"), [inbox["email"]])
    conn = psycopg2.connect(db_dsn)
    try:  # another process folding: this one skips
        cur = conn.cursor()
        cur.execute("SELECT pg_advisory_lock(%s)", (usage.FOLD_LOCK_KEY,))
        assert await server.core.usage_fold.run_once() is None
        assert (await _column_and_pending(server, inbox["id"]))[1] == 1
        cur.execute("SELECT pg_advisory_unlock(%s)", (usage.FOLD_LOCK_KEY,))
    finally:
        conn.close()
    clock = task.Clock()
    job = UsageFold(server.core.db, clock, interval_s=5.0)
    job.start()
    if job.running is not None:
        await job.running
    used, pending = await _column_and_pending(server, inbox["id"])
    assert used > 0 and pending == 0
    await server.deliver(make_message(subject="two"), [inbox["email"]])
    clock.advance(5.0)
    if job.running is not None:
        await job.running
    assert (await _column_and_pending(server, inbox["id"]))[1] == 0
    await job.stop()


@pytest_twisted.ensureDeferred
async def test_the_folding_process_vacuums_the_deltas_it_deleted(server, db_dsn):
    """The deltas table is a queue (appended by deliveries, emptied by every fold): the
    fold vacuums it once enough rows died, instead of leaving dead rows for every quota
    check to read until autovacuum's next visit."""
    from tests.helpers import query

    await server.core.usage_fold.stop()
    inbox, _ = await _inbox(server, "vacuumed")
    org_id = query(db_dsn, "SELECT org_id FROM inboxes WHERE id = %s", (inbox["id"],))[0][0]

    def vacuums() -> int:
        rows = query(db_dsn, "SELECT vacuum_count FROM pg_stat_user_tables "
                             "WHERE relname = 'inbox_usage_deltas'")
        return int(rows[0][0])

    def append(rows: int) -> None:
        conn = psycopg2.connect(db_dsn)
        conn.autocommit = True
        try:
            conn.cursor().execute(
                "INSERT INTO inbox_usage_deltas (org_id, inbox_id, bytes, created_at) "
                "SELECT %s, %s, 1, now() FROM generate_series(1, %s)",
                (org_id, inbox["id"], rows))
        finally:
            conn.close()

    await server.core.usage_fold.run_once()  # whatever earlier tests left
    job = UsageFold(server.core.db, task.Clock(), interval_s=5.0)
    before = vacuums()
    append(1)  # below the threshold: folded, not vacuumed
    assert await job.run_once() == 1
    assert vacuums() == before
    append(250)
    assert await job.run_once() == 250
    assert vacuums() == before + 1
    assert (await _column_and_pending(server, inbox["id"])) == (251, 0)
