"""Hostile review of the write-ahead of large message bytes (storage.blob_lead) through
libpq's pipeline mode (storage.libpq_pipeline, PgConnection.run_pipeline, Txn.pipeline):
the libpq state left to psycopg2, the prepared-statement bookkeeping against
storage.prepared, and the bytes and counts of blob rows. Real PostgreSQL, real pool
connections; a probe that finds a defect fails.

Found by this review and fixed (the probes now pass):
- test_a_cancelled_write_ahead_does_not_break_the_next_one_on_its_connection: a pipeline
  ended by Deferred cancellation (CancelledError, not a psycopg2.Error) after its PREPARE
  ran left Session.prepared without the name and reset unset: the connection's next
  write-ahead PREPAREd again and failed with 42P05 (Txn.pipeline now resets the session
  on any exception, and asks for a rerun on 42P05/26000).
- test_a_statement_libpq_cannot_take_does_not_leave_the_link_in_pipeline_mode: an
  exception inside Pipeline._send (ctypes refusing a value) escaped Pipeline.__init__
  without _abandon: the link stayed in libpq's pipeline mode with BEGIN queued, and
  psycopg2's next statement failed ("PQsendQuery not allowed in pipeline mode").
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from agentpost.storage import blob_lead, libpq_pipeline
from agentpost.storage.blobs import key_for_digest
from agentpost.storage.database import Database, Txn
from agentpost.storage.libpq_pipeline import Statement
from agentpost.storage.pgconn import CancelInProgress, PgConnection
from agentpost.storage.prepared import Preparer, Session, StatementCache
from tests import test_pgconn as pgconn_tests
from tests.helpers import execute, query

pytestmark = pytest.mark.skipif(not libpq_pipeline.available(),
                                reason="psycopg2's libpq has no pipeline mode (before 14)")

LOCK = "SELECT pg_advisory_lock(hashtextextended(%s, 7))"


async def _ahead(txn, keys, inline):
    """blob_lead.write_ahead, then its answer (it returns once sent: Txn.settle)."""
    data = await blob_lead.write_ahead(txn, keys, inline)
    await txn.settle()
    return data


def _key(data: bytes) -> str:
    return "db/" + key_for_digest(hashlib.sha256(data).hexdigest())


async def _fetch(conn: PgConnection, sql: str, params: tuple = ()) -> list[tuple]:
    cur = await conn.cursor().execute(sql, params)
    return cur.fetchall() if cur.description is not None else []


def _txn(conn: PgConnection, session: Session) -> Txn:
    """A transaction as Database._run makes it (BEGIN folded into the first exchange),
    with the connection's own prepared-statement session."""
    return Txn(conn.cursor(), datetime.now(UTC), "BEGIN ISOLATION LEVEL READ COMMITTED",
               Preparer(StatementCache(), session, 0.0))


def _holding_lock(dsn: str, key: str) -> Any:
    """Another session holding the blob's advisory lock (a session lock, until
    :func:`_release_locks`): a delivery's write-ahead then waits on it."""
    holder = psycopg2.connect(dsn)
    holder.autocommit = True
    with holder.cursor() as cur:
        cur.execute(LOCK, (key,))
    return holder


def _release_locks(holder: Any) -> None:
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock_all()")


async def _behind_a_lock(dsn: str, data: bytes) -> tuple[str, Any, PgConnection, int]:
    """``data``'s blob key, another session holding its lock, and a pool connection (with
    its backend pid) whose write-ahead of ``data`` will wait on that lock."""
    key = _key(data)
    holder = _holding_lock(dsn, key)
    conn = await pgconn_tests._open(dsn)
    return key, holder, conn, await pgconn_tests._backend_pid(conn)


def _waiting_on_advisory(dsn: str, pid: int) -> bool:
    return query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s "
                      "AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                 (pid,)) == [(1,)]


@pytest.fixture
def inner_pipelines(monkeypatch):
    """The Deferreds of the real run_pipeline calls (recorded, not altered)."""
    seen: list[defer.Deferred] = []
    original = PgConnection.run_pipeline

    def recording(self, statements):
        d = original(self, statements)
        seen.append(d)
        return d

    monkeypatch.setattr(PgConnection, "run_pipeline", recording)
    return seen


# -- prepared-statement bookkeeping ---------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_cancelled_write_ahead_does_not_break_the_next_one_on_its_connection(
        db_dsn, inner_pipelines):
    """The write-ahead's PREPARE runs, its EXECUTE waits on a blob lock held elsewhere and
    is cancelled. The server keeps the prepared statement (PREPARE is not transactional);
    the session's bookkeeping must not then PREPARE it again on the same connection
    (42P05 would fail the next delivery that reuses the pooled connection)."""
    data = b"\x01cancelled ahead\xff" * 6000
    key, holder, conn, pid = await _behind_a_lock(db_dsn, data)
    session = Session()
    try:
        txn = _txn(conn, session)
        pending = defer.ensureDeferred(_ahead(txn, [key], {key: data}))
        await pgconn_tests._until(lambda: _waiting_on_advisory(db_dsn, pid), "lock wait")
        with pytest.raises(CancelInProgress):
            inner_pipelines[-1].cancel()
        with pytest.raises(defer.CancelledError):
            await pending
        _release_locks(holder)
        await _fetch(conn, "ROLLBACK")
        assert await _fetch(conn, "SELECT name FROM pg_prepared_statements") \
            == [(blob_lead.AHEAD_NAME,)], "premise: the PREPARE ran before the cancel"

        again = _txn(conn, session)  # the next delivery on the same pooled connection
        try:
            assert await _ahead(again, [key], {key: data}) == [None]
        except psycopg2.errors.DuplicatePreparedStatement as exc:
            pytest.fail(f"the next write-ahead on the connection failed: {exc}")
        await _fetch(conn, "ROLLBACK")
    finally:
        holder.close()
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_failed_write_ahead_resets_the_session_and_the_next_one_succeeds(db_dsn):
    """A statement error after the PREPARE ran (a lock timeout): the session starts
    afresh (unnamed statements until storage.prepared's DEALLOCATE ALL), so the pool's
    connection, reused, carries the next delivery."""
    data = b"lock timeout ahead " * 6000
    key, holder, conn, _pid = await _behind_a_lock(db_dsn, data)
    session = Session()
    try:
        await _fetch(conn, "SET lock_timeout = '200ms'")
        with pytest.raises(psycopg2.errors.LockNotAvailable) as caught:
            await _ahead(_txn(conn, session), [key], {key: data})
        assert caught.value.pgcode == "55P03"
        assert session.reset
        await _fetch(conn, "ROLLBACK")
        _release_locks(holder)
        txn = _txn(conn, session)
        assert await _ahead(txn, [key], {key: data}) == [None]
        rows = await _fetch(conn, "SELECT refcount, data FROM blobs WHERE key = %s", (key,))
        assert [(r, bytes(d)) for r, d in rows] == [(0, data)]
        await _fetch(conn, "ROLLBACK")
    finally:
        holder.close()
        conn.close()


@pytest_twisted.ensureDeferred
async def test_deallocate_all_of_the_statement_cache_then_the_write_ahead_prepares_again(
        db_dsn):
    """storage.prepared forgets a session's statements with DEALLOCATE ALL: the name
    leaves the session's set with them, so the write-ahead PREPAREs again (no 26000)."""
    data = b"deallocated " * 9000
    key = _key(data)
    conn = await pgconn_tests._open(db_dsn)
    session = Session()
    try:
        txn = _txn(conn, session)
        await _ahead(txn, [key], {key: data})
        await _fetch(conn, "ROLLBACK")
        assert blob_lead.AHEAD_NAME in session.prepared
        await Preparer(StatementCache(), session, 0.0)._forget_all(conn.cursor())
        assert blob_lead.AHEAD_NAME not in session.prepared
        txn = _txn(conn, session)
        assert await _ahead(txn, [key], {key: data}) == [None]
        await _fetch(conn, "ROLLBACK")
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_statement_dropped_server_side_fails_once_then_recovers(db_dsn):
    """The server lost the named statement behind the session's back (a DEALLOCATE not
    made by storage.prepared): the write-ahead fails with 26000 as psycopg2's class, the
    session is reset, and the connection's next write-ahead succeeds."""
    data = b"dropped " * 13000
    key = _key(data)
    conn = await pgconn_tests._open(db_dsn)
    session = Session()
    try:
        await _ahead(_txn(conn, session), [key], {key: data})
        await _fetch(conn, "ROLLBACK")
        await _fetch(conn, f"DEALLOCATE {blob_lead.AHEAD_NAME}")
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
            await _ahead(_txn(conn, session), [key], {key: data})
        await _fetch(conn, "ROLLBACK")
        assert session.reset
        assert await _ahead(_txn(conn, session), [key], {key: data}) == [None]
        await _fetch(conn, "ROLLBACK")
    finally:
        conn.close()


# -- libpq state left to psycopg2 ------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_statement_libpq_cannot_take_does_not_leave_the_link_in_pipeline_mode(
        db_dsn):
    """A parameter ctypes refuses (a str, not bytes) after BEGIN was queued: the call
    fails, and the connection must not stay in libpq's pipeline mode with BEGIN queued
    while psycopg2 believes it idle (the next psycopg2 statement would fail or run
    inside that stray BEGIN)."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
            await conn.run_pipeline([Statement("BEGIN"),
                                     Statement("SELECT $1::text", ["not bytes"])])  # type: ignore[list-item]
        if conn._connection.closed:  # closed and off the reactor: also sound
            assert conn.fileno() == -1
            return
        try:
            rows = await _fetch(conn, "SELECT 41 + 1, now() = statement_timestamp()")
        except psycopg2.Error as exc:
            pytest.fail(f"psycopg2's next statement failed on the link: {exc!r}")
        # not inside the stray BEGIN: now() is the statement's own time
        assert rows == [(42, True)]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_an_aborted_pipeline_is_read_to_its_sync_and_psycopg2_carries_on(db_dsn):
    """BEGIN, an error, then three statements the server skips (PGRES_PIPELINE_ABORTED
    each, every one ended by a NULL): the double-NULL guard must not take that for a
    lost link; the first error is reported and psycopg2's ROLLBACK ends it."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        with pytest.raises(psycopg2.errors.DivisionByZero):
            await conn.run_pipeline([Statement("BEGIN"), Statement("SELECT 1/0"),
                                     Statement("SELECT 1"), Statement("SELECT $1::int", [b"2"]),
                                     Statement("SELECT 3")])
        assert not conn._connection.closed
        await _fetch(conn, "ROLLBACK")
        assert await _fetch(conn, "SELECT 7") == [(7,)]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_duplicate_prepare_in_one_pipeline_fails_cleanly(db_dsn):
    """PREPARE of a name the server has (42P05): psycopg2's class, the EXECUTE skipped,
    the link idle and usable."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        sql = "SELECT length($1::bytea)"
        await conn.run_pipeline([Statement(sql, [b"ab"], [True], "ap_hostile", True)])
        with pytest.raises(psycopg2.errors.DuplicatePreparedStatement):
            await conn.run_pipeline([Statement("BEGIN"),
                                     Statement(sql, [b"abc"], [True], "ap_hostile", True)])
        await _fetch(conn, "ROLLBACK")
        assert await _fetch(conn, "SELECT 1") == [(1,)]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_cancel_that_arrives_after_the_results_does_not_hit_the_next_statement(
        db_dsn, inner_pipelines):
    """A cancel asked after the server already answered (the pipeline completes):
    psycopg2's next statements on the link are not cancelled by it."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        d = conn.run_pipeline([Statement("SELECT 1")])
        if not d.called:
            try:
                d.cancel()
            except CancelInProgress:
                pass
        try:
            await d
        except defer.CancelledError:
            pass
        for _ in range(20):
            assert await _fetch(conn, "SELECT 5 FROM pg_sleep(0.01)") == [(5,)]
    finally:
        conn.close()


# -- bytes and counts ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_bytes_at_and_around_the_threshold_are_stored_exactly(db_dsn):
    """Write-ahead at exactly LEAD_MIN_BYTES, a literal just below it, in one batch with
    a key whose bytes are all 0x00 and a store key: one round trip of ahead rows, then
    the delivery's own upsert (data NULL for the ahead rows): every row exact, counted."""
    from agentpost.storage.long_text import inline_columns
    from agentpost.storage.message_insert import _PREPARE_DELIVERIES_SQL

    at = bytes(range(256)) * (blob_lead.LEAD_MIN_BYTES // 256)
    below = b"y" * (blob_lead.LEAD_MIN_BYTES - 1)
    zeros = b"\x00" * (blob_lead.LEAD_MIN_TOTAL - blob_lead.LEAD_MIN_BYTES)
    inline = {_key(at): at, _key(below): below, _key(zeros): zeros}
    store_key = "store-hostile-" + hashlib.sha256(b"s").hexdigest()
    keys = sorted([*inline, store_key])
    conn = await pgconn_tests._open(db_dsn)
    session = Session()
    try:
        txn = _txn(conn, session)
        data = await _ahead(txn, keys, inline)
        assert [d is None for d in data] == [k not in inline or len(inline[k]) >= 16384
                                            for k in keys]
        sizes = {k: len(v) for k, v in inline.items()} | {store_key: 9}
        await txn.fetchall(_PREPARE_DELIVERIES_SQL, [
            keys, txn.now, keys, [sizes[k] for k in keys], [2 for _ in keys],
            *inline_columns(data), [], [], [], [], [], [], [], []])
        await _fetch(conn, "COMMIT")
        rows = {k: (n, s, bytes(d) if d is not None else None) for k, n, s, d in query(
            db_dsn, "SELECT key, refcount, size, data FROM blobs WHERE key = ANY(%s)",
            (keys,))}
        for k, v in inline.items():
            assert rows[k] == (2, len(v), v), k
        assert rows[store_key] == (2, 9, None)
    finally:
        execute(db_dsn, "DELETE FROM blobs WHERE key = ANY(%s)", (keys,))
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_release_racing_the_write_ahead_statement_itself_leaves_the_bytes(db_dsn):
    """The last reference of stored content is being released (lock held, row deleted,
    not yet committed) while the write-ahead statement starts: its snapshot still sees
    the row, its lock waits; the release commits; the write-ahead must then write the
    bytes again (ON CONFLICT is not decided by the old snapshot), so the delivery's
    count finds a row WITH its bytes."""
    data = b"\xfe race on the statement's snapshot\r\n" * 3000
    key = _key(data)
    execute(db_dsn, "INSERT INTO blobs (key, size, refcount, created_at, data, utf8) "
                    "VALUES (%s, %s, 1, now(), %s, false)", (key, len(data), data))
    releaser = psycopg2.connect(db_dsn)
    conn = await pgconn_tests._open(db_dsn)
    session = Session()
    try:
        pid = await pgconn_tests._backend_pid(conn)
        with releaser.cursor() as cur:  # storage.mail.release_blobs' order, uncommitted
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))", (key,))
            cur.execute("UPDATE blobs SET refcount = refcount - 1 WHERE key = %s", (key,))
            cur.execute("DELETE FROM blobs WHERE key = %s AND refcount <= 0", (key,))
        txn = _txn(conn, session)
        pending = defer.ensureDeferred(_ahead(txn, [key], {key: data}))
        await pgconn_tests._until(lambda: _waiting_on_advisory(db_dsn, pid), "lock wait")
        await deferToThread(releaser.commit)
        assert await pending == [None]
        await txn.execute("INSERT INTO blobs (key, size, refcount, created_at, data) "
                          "VALUES (%s, %s, 1, now(), NULL) ON CONFLICT (key) DO UPDATE "
                          "SET refcount = blobs.refcount + EXCLUDED.refcount",
                          (key, len(data)))
        await _fetch(conn, "COMMIT")
        [(refcount, stored)] = query(db_dsn, "SELECT refcount, data FROM blobs "
                                             "WHERE key = %s", (key,))
        assert stored is not None, "the delivery was counted on a row without its bytes"
        assert (refcount, bytes(stored)) == (1, data)
    finally:
        releaser.close()
        execute(db_dsn, "DELETE FROM blobs WHERE key = %s", (key,))
        conn.close()


# -- retries of the group commit re-run the write-ahead ---------------------------------

@pytest_twisted.ensureDeferred
async def test_a_stale_guess_reruns_the_write_ahead_and_counts_the_content_once_per_copy(
        server, db_dsn, inner_pipelines):
    """The same large message (NULs, not UTF-8) stored twice to one inbox: the second is
    guessed (its folder is remembered), written ahead, then refused by the guess's check
    (INBOX was replaced behind the process: StaleGuess), rolled back and staged again by
    asking -- the write-ahead runs a second time. The content ends in one row, exact,
    counted twice; the bytes served are those sent."""
    import io

    from agentpost.core.group_commit import GroupCommit

    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "stale-ahead"},
                                   key=key)).json
    gc = GroupCommit(server.core.db, reactor, max_batch=16, delay_s=0.0, parallel=2)
    server.core.ingest.group_commit = gc
    raw = (b"From: a@example.com\r\nTo: " + inbox["email"].encode() + b"\r\n"
           b"Subject: stale ahead\r\nMessage-ID: <stale-ahead@x>\r\n"
           b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n"
           + b"caf\xe9 \x00 'q' \\ line\r\n" * 6000)

    async def store():
        target = await server.core.router.resolve(inbox["email"], "a@example.com")
        [stored] = await server.core.ingest.store([target], io.BytesIO(raw),
                                                  envelope_from="a@example.com", group=True)
        return stored

    first = await store()
    [(old,)] = query(db_dsn, "SELECT id FROM folders WHERE inbox_id = %s AND name = 'INBOX'",
                     (inbox["id"],))
    execute(db_dsn, "UPDATE folders SET name = 'Old' WHERE id = %s", (old,))
    execute(db_dsn, "INSERT INTO folders (org_id, environment_id, inbox_id, name, "
                    "special_use, created_at) SELECT org_id, environment_id, inbox_id, "
                    "'INBOX', special_use, now() FROM folders WHERE id = %s", (old,))
    before = len(inner_pipelines)
    second = await store()
    assert len(inner_pipelines) - before == 2, "premise: written ahead, then again"
    assert (gc.guessed, gc.stale_guesses) == (1, 1), "premise: the guess was refused"
    rows = query(db_dsn, "SELECT b.refcount, b.size, b.data FROM messages m "
                         "JOIN blobs b ON b.key = m.raw_blob_key "
                         "WHERE m.org_id = %s AND m.id = ANY(%s)",
                 (first.org_id, [first.message_id, second.message_id]))
    assert len(rows) == 2
    assert {(r, s) for r, s, _ in rows} == {(2, len(bytes(rows[0][2])))}
    for _, _, data in rows:
        assert data is not None and bytes(data).endswith(raw[raw.index(b"\r\n\r\n"):])
    for stored in (first, second):
        got = await server.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
        assert got.body.endswith(raw[raw.index(b"\r\n\r\n"):])


# -- the link under load and breaking ----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_megabytes_written_ahead_over_many_socket_writes_arrive_exactly(db_dsn):
    """Several blobs of megabytes in one write-ahead (the socket takes them in many
    writes: WRITE waits, libpq's input read meanwhile): every byte as sent."""
    import os

    values = [os.urandom(3 * 1024 * 1024), b"\x00" * (2 * 1024 * 1024),
              bytes(range(256)) * 8192]
    inline = {_key(v): v for v in values}
    keys = sorted(inline)
    conn = await pgconn_tests._open(db_dsn)
    try:
        txn = _txn(conn, Session())
        assert await _ahead(txn, keys, inline) == [None] * len(keys)
        rows = await _fetch(conn, "SELECT key, size, md5(data), utf8 FROM blobs "
                                  "WHERE key = ANY(%s)", (keys,))
        await _fetch(conn, "ROLLBACK")
        assert {k: (s, m) for k, s, m, _ in rows} == {
            k: (len(v), hashlib.md5(v).hexdigest()) for k, v in inline.items()}  # noqa: S324
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_backend_killed_during_the_write_ahead_is_retried_by_run_interaction(
        db_dsn, pg):
    """The link dies while the write-ahead waits on a blob lock: a link error before
    COMMIT, so run_interaction runs the transaction again on a new link; the content
    ends in one row, counted once, exact."""
    from agentpost.storage.database import Database

    data = b"\xff killed while ahead \x00" * 5000
    key = _key(data)
    holder = psycopg2.connect(db_dsn)
    holder.autocommit = True
    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=2)
    attempts: list[int] = []

    async def deliver(txn):
        attempts.append(1)
        assert await _ahead(txn, [key], {key: data}) == [None]
        await txn.execute("INSERT INTO blobs (key, size, refcount, created_at, data) "
                          "VALUES (%s, %s, 1, now(), NULL) ON CONFLICT (key) DO UPDATE "
                          "SET refcount = blobs.refcount + EXCLUDED.refcount",
                          (key, len(data)))

    def waiter() -> list[tuple]:
        return query(db_dsn, "SELECT pid FROM pg_stat_activity WHERE wait_event_type = "
                             "'Lock' AND wait_event = 'advisory'")

    try:
        with holder.cursor() as cur:
            cur.execute(LOCK, (key,))
        running = db.run_interaction("test.killed", deliver)
        await pgconn_tests._until(lambda: bool(waiter()), "lock wait")
        [(pid,)] = waiter()
        pgconn_tests._terminate(pg, pid)
        await pgconn_tests._until(lambda: len(attempts) == 2, "the retry")
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
        await running
        [(refcount, stored)] = query(db_dsn, "SELECT refcount, data FROM blobs "
                                             "WHERE key = %s", (key,))
        assert (refcount, bytes(stored)) == (1, data)
    finally:
        holder.close()
        await db.close()
        execute(db_dsn, "DELETE FROM blobs WHERE key = %s", (key,))


@pytest_twisted.ensureDeferred
async def test_closing_the_link_mid_pipeline_never_touches_libpq_again(db_dsn):
    """PgConnection.close while a pipeline waits on the server: the pipeline is dropped
    before libpq frees the connection (no use of the freed PGconn from a late reactor
    event), the Deferred fails, nothing stays on the reactor."""
    from twisted.internet.task import deferLater

    holder = psycopg2.connect(db_dsn)
    holder.autocommit = True
    conn = await pgconn_tests._open(db_dsn)
    try:
        pid = await pgconn_tests._backend_pid(conn)
        with holder.cursor() as cur:
            cur.execute(LOCK, ("closing",))
        pending = conn.run_pipeline([Statement("BEGIN"), Statement(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", [b"closing"])])
        await pgconn_tests._until(lambda: _waiting_on_advisory(db_dsn, pid), "lock wait")
        conn.close()
        with pytest.raises(Exception):  # noqa: B017 - ConnectionDone
            await pending
        assert conn._pipeline is None and conn.fileno() == -1
        assert conn not in reactor.getReaders() and conn not in reactor.getWriters()
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
        await deferLater(reactor, 0.1, lambda: None)  # any late event finds nothing
    finally:
        holder.close()
        conn.close()


@pytest_twisted.ensureDeferred
async def test_notices_raised_inside_a_pipeline_reach_psycopg2_safely(db_dsn):
    """libpq calls psycopg2's notice callback from inside our ctypes calls (GIL
    released): the notices are psycopg2's afterwards and the link carries on."""
    conn = await pgconn_tests._open(db_dsn)
    try:
        body = "BEGIN " + "RAISE NOTICE 'n%', 1; " * 60 + "END"
        await conn.run_pipeline([Statement(f"DO $$ {body} $$"), Statement("SELECT 1")])
        assert await _fetch(conn, "SELECT 3") == [(3,)]
        assert conn._connection.notices and "n1" in conn._connection.notices[-1]
    finally:
        conn.close()


# -- the write-ahead is not waited for: the next exchange waits ------------------------

@pytest_twisted.ensureDeferred
async def test_the_next_statement_waits_for_the_write_ahead_and_sees_its_rows(db_dsn):
    """write_ahead returns while its statement still waits on a lock held elsewhere
    (the caller builds its next statement meanwhile); the transaction's next statement
    is sent only after the write-ahead's answer, and sees the row written."""
    data = b"not waited for \x00\xff" * 6000
    key, holder, conn, pid = await _behind_a_lock(db_dsn, data)
    session = Session()
    try:
        txn = _txn(conn, session)
        assert await blob_lead.write_ahead(txn, [key], {key: data}, wait=False) == [None]
        await pgconn_tests._until(lambda: _waiting_on_advisory(db_dsn, pid), "lock wait")
        following = defer.ensureDeferred(txn.fetchall(
            "SELECT refcount, data FROM blobs WHERE key = %s", [key]))
        await deferLater(reactor, 0.2, lambda: None)
        assert not following.called, "sent while the write-ahead was still running"
        _release_locks(holder)
        rows = await following
        assert [(r["refcount"], bytes(r["data"])) for r in rows] == [(0, data)]
        await _fetch(conn, "ROLLBACK")
        assert blob_lead.AHEAD_NAME in session.prepared
    finally:
        holder.close()
        conn.close()


@pytest_twisted.ensureDeferred
async def test_the_write_aheads_error_is_raised_by_the_next_statement(db_dsn):
    """A write-ahead that fails (a lock timeout) after write_ahead returned: the next
    statement raises that error (psycopg2's class, its pgcode), the session is reset as
    when it was waited for, and the link is idle for the ROLLBACK."""
    data = b"late error " * 9000
    key, holder, conn, _pid = await _behind_a_lock(db_dsn, data)
    session = Session()
    try:
        await _fetch(conn, "SET lock_timeout = '200ms'")
        txn = _txn(conn, session)
        assert await blob_lead.write_ahead(txn, [key], {key: data}, wait=False) == [None]
        with pytest.raises(psycopg2.errors.LockNotAvailable) as caught:
            await txn.execute("SELECT 1")
        assert caught.value.pgcode == "55P03"
        assert session.reset
        await _fetch(conn, "ROLLBACK")
        assert await _fetch(conn, "SELECT 2") == [(2,)]
    finally:
        holder.close()
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_transaction_that_fails_with_a_write_ahead_in_flight_rolls_it_back(db_dsn):
    """The body raises while its write-ahead is still in flight (waiting on a lock):
    Database._run waits for it before the ROLLBACK, so the pool's connection is neither
    closed nor confused; the rows written ahead are gone, and the same connection runs
    the next transaction."""
    data = b"body fails meanwhile " * 5000
    key = _key(data)
    holder = _holding_lock(db_dsn, key)
    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=1)
    pids: list[int] = []

    async def body(txn: Txn) -> None:
        pids.append(await txn.fetchval("SELECT pg_backend_pid()"))
        await blob_lead.write_ahead(txn, [key], {key: data}, wait=False)
        deferLater(reactor, 0.3, _release_locks, holder)
        raise RuntimeError("the delivery failed after its write-ahead was sent")

    try:
        with pytest.raises(RuntimeError, match="write-ahead was sent"):
            await db.run_interaction("test.ahead_fails", body)
        assert query(db_dsn, "SELECT count(*) FROM blobs WHERE key = %s", (key,)) == [(0,)]

        async def again(txn: Txn) -> int:
            return await txn.fetchval("SELECT pg_backend_pid()")

        assert await db.run_interaction("test.after", again) == pids[0]
    finally:
        await db.close()
        holder.close()
