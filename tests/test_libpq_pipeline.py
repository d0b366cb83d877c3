"""libpq's pipeline mode on the pool's psycopg2 connections (storage.libpq_pipeline,
PgConnection.run_pipeline), over a real PostgreSQL: binary parameters arrive byte for
byte, a statement's error is psycopg2's own class and leaves the link usable, a
cancel and a killed backend end the pipeline as they end a psycopg2 statement, and
psycopg2 finds the connection idle afterwards."""

import psycopg2
import psycopg2.errors
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from agentpost.storage import libpq_pipeline
from agentpost.storage.libpq_pipeline import Statement, bytea_array
from agentpost.storage.pgconn import CancelInProgress, PgConnection
from tests import test_pgconn as pgconn_tests

pytestmark = pytest.mark.skipif(not libpq_pipeline.available(),
                                reason="psycopg2's libpq has no pipeline mode (before 14)")

#: Every byte value, a NUL, bytes that are not UTF-8, and a quote: what no literal takes.
AWKWARD = bytes(range(256)) * 3 + b"\x00\xff\xfe'\\\r\n.\r\n"


async def _fetch(conn: PgConnection, sql: str, params: tuple = ()) -> list[tuple]:
    cur = await conn.cursor().execute(sql, params)
    return cur.fetchall() if cur.description is not None else []


@pytest_twisted.ensureDeferred
async def test_binary_parameters_arrive_byte_for_byte_inside_psycopg2s_transaction(db_dsn):
    """BEGIN and a binary INSERT in one pipeline, then psycopg2 reads the row in the same
    transaction and commits it: both drivers share one session and one transaction."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        await _fetch(conn, "CREATE TEMP TABLE t (k text, d bytea, a bytea[])")
        big = AWKWARD * 400  # ~300 KB: several socket writes
        await conn.run_pipeline([
            Statement("BEGIN"),
            Statement("INSERT INTO t VALUES ($1, $2, $3)",
                      [b"one", big, bytea_array([AWKWARD, b"", big])],
                      [False, True, True]),
        ])
        rows = await _fetch(conn, "SELECT k, d, a, txid_current_if_assigned() IS NOT NULL "
                                  "FROM t")
        await _fetch(conn, "COMMIT")
        (key, data, array, in_txn), = rows
        assert key == "one" and bytes(data) == big and in_txn
        assert [bytes(v) for v in array] == [AWKWARD, b"", big]
        assert (await _fetch(conn, "SELECT count(*) FROM t")) == [(1,)]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_prepared_statement_is_prepared_once_then_reused(db_dsn):
    """``prepare`` sends the PREPARE with the first execution; later pipelines name it."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        sql = "SELECT length($1::bytea)"
        await conn.run_pipeline([Statement(sql, [AWKWARD], [True], "ap_test_len", True)])
        await conn.run_pipeline([Statement(sql, [b"abc"], [True], "ap_test_len")])
        rows = await _fetch(conn, "SELECT name FROM pg_prepared_statements")
        assert rows == [("ap_test_len",)]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_statement_error_is_psycopg2s_class_and_the_link_stays_usable(db_dsn):
    """The first error wins (later statements are skipped by the server), with its
    SQLSTATE as psycopg2 sets it; the aborted transaction ends with psycopg2's ROLLBACK."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        await _fetch(conn, "CREATE TEMP TABLE u (k text PRIMARY KEY)")
        await _fetch(conn, "INSERT INTO u VALUES ('taken')")
        with pytest.raises(psycopg2.errors.UniqueViolation) as caught:
            await conn.run_pipeline([
                Statement("BEGIN"),
                Statement("INSERT INTO u VALUES ($1)", [b"taken"]),
                Statement("SELECT 1/0"),
            ])
        assert caught.value.pgcode == "23505" and "taken" in caught.value.pgerror
        assert isinstance(caught.value, psycopg2.IntegrityError)
        assert conn._connection.info.transaction_status == \
            psycopg2.extensions.TRANSACTION_STATUS_INERROR
        await _fetch(conn, "ROLLBACK")
        assert await _fetch(conn, "SELECT count(*) FROM u") == [(1,)]
        assert conn.fileno() != -1 and conn in reactor.getReaders()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_cancelling_a_pipeline_cancels_it_on_the_server(db_dsn, pg):
    """Deferred.cancel asks the server to cancel; the pipeline ends with CancelledError
    once the server answers, and the link is then idle and usable."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        pid = await pgconn_tests._backend_pid(conn)
        pending = conn.run_pipeline([Statement("SELECT pg_sleep(60)")])
        await pgconn_tests._until(lambda: pgconn_tests._sleeping(pg, pid), "sleeping")
        with pytest.raises(CancelInProgress):  # the canceller says so (storage.pgconn)
            pending.cancel()
        with pytest.raises(defer.CancelledError):
            await pending
        assert await _fetch(conn, "SELECT 41 + 1") == [(42,)]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_backend_killed_mid_pipeline_fails_it_and_leaves_nothing_behind(db_dsn, pg):
    """A broken link is psycopg2's OperationalError; the connection is closed and off the
    reactor at once, as for a psycopg2 statement (test_pgconn)."""
    conn = await pgconn_tests._open(db_dsn)
    pid = await pgconn_tests._backend_pid(conn)
    pending = conn.run_pipeline([Statement("BEGIN"), Statement("SELECT pg_sleep(60)")])
    await pgconn_tests._until(lambda: pgconn_tests._sleeping(pg, pid), "sleeping")
    pgconn_tests._terminate(pg, pid)
    with pytest.raises(psycopg2.OperationalError):
        await pending
    assert conn._connection.closed and conn.fileno() == -1
    assert conn not in reactor.getReaders() and conn not in reactor.getWriters()
    with pytest.raises(psycopg2.InterfaceError):
        await conn.run_pipeline([Statement("SELECT 1")])


@pytest_twisted.ensureDeferred
async def test_a_pipeline_needs_an_idle_connection(db_dsn):
    """While a psycopg2 statement is in flight a pipeline is refused, not interleaved."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        running = conn.cursor().execute("SELECT pg_sleep(0.05)")
        with pytest.raises(RuntimeError):
            await conn.run_pipeline([Statement("SELECT 1")])
        await running
        await conn.run_pipeline([Statement("SELECT 1")])
    finally:
        conn.close()
