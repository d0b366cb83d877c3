"""The pool's connection (storage.pgconn) over a real PostgreSQL: backends killed while
a statement is in flight and while idle, cancellation, timeouts, large sends, connect
attempts that never finish; no file descriptor and no reactor entry outlives a link."""

import os
import socket

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.model.errors import TemporaryFailure
from agentpost.storage.database import Database
from agentpost.storage.pgconn import CancelInProgress, PgConnection


def _db(dsn, **kw):
    return Database(dsn, clock=reactor, reactor=reactor, **kw)


def _admin(pg):
    conn = psycopg2.connect(pg.dsn())
    conn.autocommit = True
    return conn


def _terminate(pg, pid):
    conn = _admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        conn.close()


async def _until(predicate, what, tries=400):
    """Let the reactor run until ``predicate()`` holds (bounded, never a timing claim)."""
    for _ in range(tries):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"never happened: {what}")


def _sleeping(pg, pid):
    conn = _admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,))
            row = cur.fetchone()
    finally:
        conn.close()
    return row is not None and row[0] == "PgSleep"


def _gone(pg, pid):
    conn = _admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            (n,) = cur.fetchone()
    finally:
        conn.close()
    return n == 0


def _ours_in_reactor():
    """Our connections the reactor watches, and how many of them are dead links."""
    ours = [s for s in set(reactor.getReaders()) | set(reactor.getWriters())
            if isinstance(s, PgConnection)]
    return ours, [c for c in ours if c._connection is None or c._connection.closed]


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


async def _pid(db):
    return await db.run_query("pid", "SELECT pg_backend_pid() AS p")


async def _open(dsn):
    conn = PgConnection(reactor)
    await conn.connect(dsn)
    return conn


async def _backend_pid(conn):
    cur = await conn.cursor().execute("SELECT pg_backend_pid()")
    return cur.fetchone()[0]


@pytest_twisted.ensureDeferred
async def test_a_backend_killed_mid_statement_fails_it_and_leaves_nothing_behind(db_dsn, pg):
    """The statement in flight fails with the driver's error; the socket and its reactor
    entry are gone at once; a new connection works."""
    conn = await _open(db_dsn)
    pid = await _backend_pid(conn)
    pending = conn.cursor().execute("SELECT pg_sleep(60)")
    await _until(lambda: _sleeping(pg, pid), "the statement is running")
    _terminate(pg, pid)
    with pytest.raises(psycopg2.OperationalError):
        await pending
    assert conn._connection.closed and conn.fileno() == -1
    assert conn not in reactor.getReaders() and conn not in reactor.getWriters()
    conn.close()  # again: harmless
    fresh = await _open(db_dsn)
    try:
        assert await _backend_pid(fresh) != pid
    finally:
        fresh.close()


@pytest_twisted.ensureDeferred
async def test_a_backend_killed_while_idle_leaves_the_reactor_by_itself(db_dsn, pg):
    """No statement in flight: the end of the link is noticed by the reader alone, which
    then leaves the reactor (an end of file, always readable, would otherwise spin it)."""
    conn = await _open(db_dsn)
    pid = await _backend_pid(conn)
    assert conn in reactor.getReaders()
    _terminate(pg, pid)
    await _until(lambda: conn._connection.closed, "the dead link is noticed")
    assert conn.fileno() == -1 and conn not in reactor.getReaders()
    with pytest.raises(psycopg2.InterfaceError):
        await conn.cursor().execute("SELECT 1")
    conn.close()


@pytest_twisted.ensureDeferred
async def test_the_pool_replaces_backends_killed_mid_statement_and_while_idle(db_dsn, pg):
    """Through Database: a statement whose backend is killed is retried on a fresh
    connection; a connection killed while idle is replaced on the next use."""
    db = _db(db_dsn, pool_size=1)
    seen = []

    async def work(txn):
        seen.append(await txn.fetchval("SELECT pg_backend_pid()"))
        if len(seen) == 1:
            await txn.execute("SELECT pg_sleep(60)")
        return seen[-1]

    try:
        first = (await _pid(db))[0]["p"]
        d = db.run_interaction("sleepy", work)
        await _until(lambda: seen and _sleeping(pg, seen[0]), "the statement is running")
        _terminate(pg, seen[0])
        second = await d
        assert seen[0] == first and second != first and len(seen) == 2
        _terminate(pg, second)
        await _until(lambda: _gone(pg, second), "the backend is gone")
        await _until(lambda: not _ours_in_reactor()[1], "the dead link left the reactor")
        third = (await _pid(db))[0]["p"]
        assert third not in (first, second)
    finally:
        await db.close()
    assert not _ours_in_reactor()[0]


@pytest_twisted.ensureDeferred
async def test_no_descriptor_outlives_a_link(db_dsn, pg):
    """Many kill-and-replace rounds, idle and mid-statement, then close: the process
    holds as many file descriptors as before, and the reactor none of ours."""
    db = _db(db_dsn, pool_size=2)
    await _pid(db)
    await db.close()
    before = _fd_count()
    db = _db(db_dsn, pool_size=2)
    try:
        for _ in range(12):
            pid = (await _pid(db))[0]["p"]
            _terminate(pg, pid)
            await _until(lambda p=pid: _gone(pg, p), "the backend is gone")
            conn = await _open(db_dsn)
            victim = await _backend_pid(conn)
            pending = conn.cursor().execute("SELECT pg_sleep(60)")
            await _until(lambda v=victim: _sleeping(pg, v), "the statement is running")
            _terminate(pg, victim)
            with pytest.raises(psycopg2.OperationalError):
                await pending
            conn.close()
            assert (await db.run_query("n", "SELECT 2 AS v")) == [{"v": 2}]
    finally:
        await db.close()
    assert not _ours_in_reactor()[0]
    assert _fd_count() == before


@pytest_twisted.ensureDeferred
async def test_cancelling_a_statement_keeps_the_connection(db_dsn):
    """Deferred.cancel asks the server to cancel; the statement then fails with
    CancelledError and the same session runs the next statement."""
    conn = await _open(db_dsn)
    try:
        pid = await _backend_pid(conn)
        pending = conn.cursor().execute("SELECT pg_sleep(60)")
        with pytest.raises(CancelInProgress):
            pending.cancel()
        with pytest.raises(defer.CancelledError):
            await pending
        assert await _backend_pid(conn) == pid
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_statement_timeout_is_a_temporary_failure_and_keeps_the_session(db_dsn):
    """The server's statement_timeout reaches the pool as itself (QueryCanceled: a
    TemporaryFailure, never retried), not as a cancellation; the session stays."""
    db = _db(db_dsn, pool_size=1, statement_timeout_s=0.2)
    try:
        first = (await _pid(db))[0]["p"]
        with pytest.raises(TemporaryFailure) as caught:
            await db.run_query("slow", "SELECT pg_sleep(30)")
        assert isinstance(caught.value.__cause__, psycopg2.errors.QueryCanceled)
        assert (await _pid(db))[0]["p"] == first
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_a_statement_larger_than_the_socket_buffer_is_sent_whole(db_dsn):
    """A send that would block goes on when the socket is writable, then stops watching
    for writability."""
    conn = await _open(db_dsn)
    try:
        big = "x" * 8_000_000
        cur = await conn.cursor().execute("SELECT length(%s)", (big,))
        assert cur.fetchone() == (len(big),)
        assert conn not in reactor.getWriters() and conn in reactor.getReaders()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_connect_that_never_answers_times_out_without_leaks(db_dsn):
    """A server that accepts and never speaks: TemporaryFailure after the connect
    timeout, and no socket or reactor entry left from the attempt."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        before = _fd_count()
        db = _db(f"host=127.0.0.1 port={port} dbname=x sslmode=disable", pool_size=1,
                 connect_timeout_s=0.3)
        try:
            with pytest.raises(TemporaryFailure):
                await db.run_query("x", "SELECT 1")
        finally:
            await db.close()
        assert not _ours_in_reactor()[0]
        # the kernel's accepted-but-unclaimed connection lives in the listener's queue
        assert _fd_count() == before
    finally:
        silent.close()
