"""Server-side prepared statements (storage.prepared): same answers as plain statements,
fewer plans; never a changed meaning, never a broken transaction."""

import pytest_twisted
from twisted.internet import reactor, task

from agentpost.storage.database import Database
from agentpost.storage.prepared import StatementCache, _make_part, split_statements


def test_split_statements_respects_quotes_comments_and_dollar_quotes():
    sql = ("SELECT 'a;b', \"c;d\" FROM t; "
           "SELECT $$x;y$$, $tag$p;q$tag$ -- c;omment\n; "
           "INSERT INTO t VALUES ('it''s; fine') /* a;b */ ;  ; SELECT 1")
    assert split_statements(sql) == [
        "SELECT 'a;b', \"c;d\" FROM t",
        "SELECT $$x;y$$, $tag$p;q$tag$ -- c;omment",
        "INSERT INTO t VALUES ('it''s; fine') /* a;b */",
        "SELECT 1",
    ]


def test_parts_number_placeholders_and_unescape_percent():
    part = _make_part("SELECT %s::int, x LIKE 'a%%' FROM t WHERE y = %s")
    assert part.preparable and part.nparams == 2
    assert part.prepare_sql.endswith("AS SELECT $1::int, x LIKE 'a%' FROM t WHERE y = $2")
    assert part.execute_sql == f"EXECUTE {part.name}(%s, %s)"
    assert not _make_part("SET LOCAL lock_timeout = %s").preparable
    assert _make_part("SELECT 1").execute_sql.startswith("EXECUTE ap_")  # no parameters
    assert not _make_part("SELECT 'a%%'").preparable  # read differently with parameters
    assert not _make_part("SELECT %(a)s").preparable  # named parameters


def test_threshold_counts_uses():
    cache = StatementCache(3)
    assert cache.template("SELECT %s", [1]) is None
    assert cache.template("SELECT %s", [1]) is None
    assert cache.template("SELECT %s", [1]) is not None
    assert StatementCache(0).template("SELECT %s", [1]) is None  # off
    assert StatementCache(1).template("SELECT %(a)s", {"a": 1}) is None  # named


def _db(dsn, **kw):
    kw.setdefault("clock", reactor)
    return Database(dsn, reactor=reactor, pool_size=1, **kw)


async def _prepared_names(db):
    rows = await db.run_query("t.names", "SELECT name FROM pg_prepared_statements")
    return {r["name"] for r in rows}


@pytest_twisted.ensureDeferred
async def test_repeated_statement_is_prepared_once_and_answers_the_same(db_dsn):
    db = _db(db_dsn, prepare_threshold=3)
    sql = "SELECT %s::int + %s::int AS n, %s::text AS s"
    try:
        answers = [(await db.run_query("t", sql, [i, 1, f"v{i}"]))[0] for i in range(6)]
        assert answers == [{"n": i + 1, "s": f"v{i}"} for i in range(6)]
        names = await _prepared_names(db)
        assert len(names) == 1 and next(iter(names)).startswith("ap_")
        # Multi-statement strings inside a transaction: each part prepared on its own.
        async def body(txn):
            for i in range(4):
                await txn.execute("CREATE TEMP TABLE IF NOT EXISTS t (n int) ON COMMIT DROP; "
                                  "INSERT INTO t VALUES (%s); INSERT INTO t VALUES (%s)",
                                  [i, i * 10])
            return await txn.fetchval("SELECT sum(n) FROM t WHERE n >= %s", [0])
        assert await db.run_interaction("t.multi", body) == sum(i + i * 10 for i in range(4))
        # + the INSERT (both parts are one statement); the sum ran once: not yet.
        assert len(await _prepared_names(db)) == 2
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_values_the_prepared_types_would_misread_run_as_plain_text(db_dsn):
    """PREPARE types both sides of ``%s < %s`` as text: ints compared as text would say
    9 < 10 is false. Such values run the old way; strings still use the prepared plan."""
    db = _db(db_dsn, prepare_threshold=1)
    try:
        for _ in range(3):
            rows = await db.run_query("t", "SELECT %s < %s AS less", [9, 10])
            assert rows == [{"less": True}]
        rows = await db.run_query("t", "SELECT %s < %s AS less", ["9", "10"])
        assert rows == [{"less": False}]  # text, as it always was for strings
        # An integer beyond int4 for an int4 parameter: plain text, no "out of range".
        await db.run_query("t", "SELECT count(*) AS c FROM folders WHERE uidvalidity = %s",
                           [1])
        big = await db.run_query(
            "t", "SELECT count(*) AS c FROM folders WHERE uidvalidity = %s", [3_000_000_000])
        assert big == [{"c": 0}]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_a_statement_postgres_cannot_prepare_leaves_the_transaction_alone(db_dsn):
    db = _db(db_dsn, prepare_threshold=1)

    async def body(txn):
        await txn.execute("CREATE TABLE kept (n int)")
        await txn.execute("INSERT INTO kept VALUES (%s)", [1])
        # "could not determine data type of parameter $1": refused, run as text.
        assert await txn.fetchval("SELECT %s IS NULL AS x", [None]) is True
        await txn.execute("INSERT INTO kept VALUES (%s)", [2])
        return await txn.fetchval("SELECT count(*) FROM kept WHERE n > %s", [0])

    try:
        assert await db.run_interaction("t.refused", body) == 2
        assert (await db.run_query("t", "SELECT count(*) AS c FROM kept WHERE n > %s",
                                   [0])) == [{"c": 2}]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_a_table_changed_under_a_plan_is_planned_again(db_dsn):
    """``cached plan must not change result type`` after ALTER TABLE: the transaction is
    run again with the session's statements forgotten, and the caller never sees it."""
    db = _db(db_dsn, prepare_threshold=1)
    try:
        await db.run_interaction("t.ddl", lambda txn: txn.execute(
            "CREATE TABLE shape (id int, a text); INSERT INTO shape VALUES (1, 'x')"))
        sql = "SELECT * FROM shape WHERE id = %s"
        assert await db.run_query("t", sql, [1]) == [{"id": 1, "a": "x"}]
        await db.run_interaction("t.ddl", lambda txn: txn.execute(
            "ALTER TABLE shape ADD COLUMN b text DEFAULT 'y'"))
        assert await db.run_query("t", sql, [1]) == [{"id": 1, "a": "x", "b": "y"}]

        async def in_txn(txn):
            return await txn.fetchall(sql, [1])
        await db.run_interaction("t.ddl", lambda txn: txn.execute(
            "ALTER TABLE shape ADD COLUMN c int DEFAULT 3"))
        assert await db.run_interaction("t.read", in_txn) == [
            {"id": 1, "a": "x", "b": "y", "c": 3}]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_sessions_plan_again_as_they_age(db_dsn):
    """A generic plan made on a nearly empty table must not outlive its statistics: the
    session forgets its statements after 10 s, then 20, 40, ... (on the injected clock)."""
    clock = task.Clock()
    clock.advance(1000)
    db = _db(db_dsn, prepare_threshold=1, clock=clock)
    sql = "SELECT %s::int AS n"
    try:
        async def prepared_at():
            rows = await db.run_query(  # its "%" keeps this one from being prepared
                "t", "SELECT prepare_time FROM pg_prepared_statements "
                "WHERE statement LIKE '%AS n%'")
            return [r["prepare_time"] for r in rows]
        await db.run_query("t", sql, [1])
        first = await prepared_at()
        clock.advance(9)
        await db.run_query("t", sql, [2])
        assert await prepared_at() == first  # still young
        clock.advance(2)
        await db.run_query("t", sql, [3])
        again = await prepared_at()
        assert len(again) == 1 and again != first
        clock.advance(12)  # the second lifetime is 20 s
        await db.run_query("t", sql, [4])
        assert await prepared_at() == again
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_off_sends_plain_statements(db_dsn):
    db = _db(db_dsn, prepare_threshold=0)
    try:
        for i in range(5):
            assert await db.run_query("t", "SELECT %s::int AS n", [i]) == [{"n": i}]
        assert await _prepared_names(db) == set()
    finally:
        await db.close()
