"""The storage wrapper: outages become 503 and heal by themselves; transactions behave."""

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor

from agentpost.model.errors import TemporaryFailure
from agentpost.storage.database import _FLUSH_ENDING, _UNLOCK_THEN_FLUSH, Database


@pytest_twisted.ensureDeferred
async def test_database_outage_gives_503_then_recovers_without_restart(server, pg):
    """Stop PostgreSQL: 503 (never a hang, never 500); start it: the same server answers 200."""
    _, owner = await server.new_org()
    assert (await server.api.get("/api/v1/inboxes", key=owner)).status == 200
    pg.stop()
    try:
        for path in ("/api/v1/inboxes", "/api/v1/environments"):
            resp = await server.api.get(path, key=owner)
            assert resp.status == 503, resp
        write = await server.api.post("/api/v1/inboxes", {"username": "during-outage"},
                                      key=owner)
        assert write.status == 503
        ready = await server.api.get("/readyz")
        assert ready.status == 503
    finally:
        pg.start()
    healed = await server.api.get("/api/v1/inboxes", key=owner)
    assert healed.status == 200
    assert healed.json["data"] == []  # the refused write did not half-happen
    made = await server.api.post("/api/v1/inboxes", {"username": "after-outage"}, key=owner)
    assert made.status == 201
    assert (await server.api.get("/readyz")).status == 200


def _db(dsn, **kw):
    return Database(dsn, clock=reactor, reactor=reactor, **kw)


@pytest_twisted.ensureDeferred
async def test_after_commit_hooks_run_only_after_commit(db_dsn):
    """Hooks fire after COMMIT, and never for a rolled-back transaction."""
    db = _db(db_dsn, pool_size=2)
    fired = []

    async def ok(txn):
        await txn.execute("CREATE TABLE t (x int)")
        txn.after_commit(fired.append, "ok")
        assert fired == []
        return 1

    async def boom(txn):
        await txn.execute("INSERT INTO t VALUES (1)")
        txn.after_commit(fired.append, "boom")
        raise ValueError("no")

    try:
        assert await db.run_interaction("ok", ok) == 1
        with pytest.raises(ValueError):
            await db.run_interaction("boom", boom)
        rows = await db.run_query("count", "SELECT count(*) AS n FROM t")
        assert fired == ["ok"] and rows == [{"n": 0}]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_serialization_failures_are_retried(db_dsn):
    """Two serializable transactions that conflict: the loser is retried and both succeed."""
    db = _db(db_dsn, pool_size=4, retries=5)
    setup = psycopg2.connect(db_dsn)
    setup.autocommit = True
    setup.cursor().execute("CREATE TABLE counter (n int); INSERT INTO counter VALUES (0)")
    setup.close()
    attempts = []

    async def bump(txn, tag):
        attempts.append(tag)
        n = await txn.fetchval("SELECT n FROM counter")
        await txn.execute("SELECT pg_sleep(0.05)")
        await txn.execute("UPDATE counter SET n = %s", (n + 1,))
        return n + 1

    from twisted.internet import defer

    try:
        results = await defer.gatherResults([
            db.run_interaction("bump", bump, "a", isolation="serializable"),
            db.run_interaction("bump", bump, "b", isolation="serializable"),
        ])
        assert sorted(results) == [1, 2]
        assert len(attempts) >= 3  # at least one retry happened
        final = await db.run_query("read", "SELECT n FROM counter")
        assert final == [{"n": 2}]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_database_is_a_temporary_failure(pg):
    """Connection refused surfaces as TemporaryFailure, quickly, not as a driver error."""
    db = _db("host=127.0.0.1 port=1 dbname=x", pool_size=1, connect_timeout_s=2)
    try:
        with pytest.raises(TemporaryFailure):
            await db.run_query("x", "SELECT 1")
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_pool_replaces_connections_killed_by_the_server(db_dsn, pg):
    """Backends terminated under the pool are replaced on the next use, without error."""
    db = _db(db_dsn, pool_size=2)
    try:
        await db.run_query("warm", "SELECT 1")
        killer = psycopg2.connect(pg.dsn())
        killer.autocommit = True
        with killer.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        killer.close()
        conn = psycopg2.connect(db_dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'agentpost'")
        conn.close()
        rows = await db.run_query("after", "SELECT 2 AS v")
        assert rows == [{"v": 2}]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_unlock_before_flush_commits_and_rolls_back_like_commit(db_dsn, sent):
    """The early-unlock ending (asynchronous COMMIT, then a synchronous one that flushes
    it) stores what the body wrote, leaves no transaction open, and a failing body still
    leaves nothing behind."""
    db = _db(db_dsn, pool_size=1)
    try:
        await db.run_interaction("t", lambda txn: txn.execute("CREATE TABLE u (x int)"))

        async def write(txn, value):
            await txn.execute("INSERT INTO u VALUES (%s)", [value])
            return value

        assert await db.run_interaction("t", write, 1, unlock_before_flush=True) == 1
        # The ending really is the early-unlock one (a plain COMMIT would pass the rest).
        assert sent[-1] == _UNLOCK_THEN_FLUSH
        assert await db.run_interaction("t", write, 3) == 3
        assert sent[-1] == "COMMIT"

        async def boom(txn):
            await txn.execute("INSERT INTO u VALUES (2)")
            raise ValueError("no")

        with pytest.raises(ValueError):
            await db.run_interaction("t", boom, unlock_before_flush=True)
        rows = await db.run_query("t", "SELECT x, pg_current_xact_id_if_assigned() AS xid "
                                       "FROM u")
        assert rows == [{"x": 1, "xid": None}, {"x": 3, "xid": None}]  # idle, not in a txn
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_a_delivery_releases_the_folder_row_before_the_flush(server, sent):
    """Ingest (the MX's group commit and single stores) ends with the early unlock: on
    its own, or in the round trip of the last insert (Txn.commit_with)."""
    from tests.mailfactory import make_message

    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "unlock"},
                                   key=owner)).json
    before = len(sent)
    await server.deliver(make_message(subject="u", msgid="<u@x>"), [inbox["email"]])
    endings = [m for m in sent[before:] if _FLUSH_ENDING in m]
    assert endings, sent[before:]
    assert all("synchronous_commit TO OFF" in m for m in endings)
