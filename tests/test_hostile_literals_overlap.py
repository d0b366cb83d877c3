"""Hostile probes for three changes: statement parameters rendered as SQL literals in
Python (storage.sql_literals, Txn._send), the write-ahead pipeline not waited for
(Txn.pipeline(wait=False), Txn.settle, a lone MX delivery) and the DATA decoder's
CRLF-dot search and line-length windows (smtp.parser.DataDecoder).

Each test fails if the defect it names exists.

Found by this review and fixed: a lone delivery's write-ahead whose link was lost
surfaced inside Txn.commit_with, which took it for a link lost with the COMMIT (outcome
unknown, never retried): the sender got a 451 where a retry on a new link would have
stored the message (the two ``..._write_ahead_...retried/250`` probes). commit_with now
waits for the write-ahead before its own round trip."""

from __future__ import annotations

import enum
import random
import smtplib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from agentpost.smtp.parser import DataDecoder
from agentpost.storage import blob_lead, libpq_pipeline, sql_literals
from agentpost.storage.database import Database
from agentpost.storage.pgconn import PgConnection
from tests.helpers import execute
from tests.imap_client import new_inbox
from tests.test_smtp_data_decoder import _Reference, _run


class _Color(enum.IntEnum):
    RED = -3
    BIG = 2 ** 70


class _Name(enum.StrEnum):
    QUOTE = "it's"
    SLASH = "back\\"


class _MyStr(str):
    pass


class _MyInt(int):
    pass


class _MyDatetime(datetime):
    pass


_STRINGS = ["", "'", "\\", "a\\", "\\'", "'\\", "x' OR '1'='1", "%", "%s", "%%s", "%(a)s",
            "\u2028\u2029\u0085", "\ufeff", "\U0010ffff", "\x7f\x01\x1b", "\r\n\t",
            "$$; DROP TABLE blobs; $$", "E'\\\\'", "é" * 3000, "'" * 4001 + "\\",
            "\ud800", "a\udfffb", "nul\x00here"]
_INTS = [0, -0, 1, -1, 2 ** 31, -(2 ** 31), 2 ** 63, -(2 ** 63) - 1, 10 ** 400, -(10 ** 400)]
_NOW = datetime.now(UTC)
_OTHER = [True, False, None, _NOW, datetime(2000, 1, 1), datetime.max, datetime.min,
          datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=14))),
          _Color.RED, _Color.BIG, _Name.QUOTE, _Name.SLASH, _MyStr("my'str\\"), _MyInt(-5),
          _MyDatetime(2020, 2, 29, 12, tzinfo=UTC), ("a'", 1), b"by'tes\x00",
          memoryview(b"\\x00'"), bytearray(b"ba'"),
          [], [""], ["'", "\\", "%s"], [-1, -2], [True, None], [None], [[1], [2]],
          [_NOW, datetime(1999, 12, 31)], [_MyStr("x'")], [_Color.RED, 1], ["a", "\x00"],
          ["\ud800"], [1, "mixed'"], [10 ** 30, -(10 ** 30)], ("t", ("n", "'")),
          [_MyDatetime(2001, 1, 1)], [b"x'"]]
_POOL = _STRINGS + _INTS + _OTHER




def _outcome(fn, *args) -> Any:
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # compared by class: the same error psycopg2 raises
        return ("error", type(exc))


def test_every_shape_renders_as_mogrify_or_fails_alike(pg_conn):
    """Each value alone and random statements of them: sql_literals.render gives the
    very bytes of cursor.mogrify, or an error of the very same class."""
    assert sql_literals.usable(pg_conn)
    cur = pg_conn.cursor()
    for value in _POOL:
        for sql in ("SELECT %s", "SELECT 1-%s, '%%', %s"):
            params = [value] if sql.count("%s") == 1 else [value, value]
            assert _outcome(sql_literals.render, sql, params, pg_conn) == \
                _outcome(cur.mogrify, sql, params), (sql, value)
    rng = random.Random(4820)
    for _ in range(300):
        params = [rng.choice(_POOL) for _ in range(rng.randint(1, 40))]
        sql = "SELECT " + ", ".join(["%s"] * len(params)) + " -- 100%%"
        assert _outcome(sql_literals.render, sql, params, pg_conn) == \
            _outcome(cur.mogrify, sql, params)


def test_rendered_strings_read_back_as_sent(pg_conn):
    """PostgreSQL reads every string literal rendered here back as exactly that string
    (no injection through quotes or backslashes, nothing lost)."""
    cur = pg_conn.cursor()
    rng = random.Random(7)
    alphabet = ["'", "\\", "%", "s", "\u2028", "é", "\n", "E", "$", '"', ";", "-"]
    values = [s for s in _STRINGS if "\x00" not in s and "\ud800" not in s
              and "\udfff" not in s]
    values += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
               for _ in range(200)]
    cur.execute(sql_literals.render("SELECT ARRAY[" + ",".join(["%s::text"] * len(values))
                                    + "], %s::text[]", [*values, values], pg_conn))
    assert cur.fetchone() == (values, values)


async def _in_txn(db: Database, statements: list[tuple[str, list | None]]) -> list:
    async def work(txn):
        return [await txn.fetchval(sql, params) if params is not None
                else await txn.execute(sql) for sql, params in statements]
    return await db.run_interaction("test.literals", work)


@pytest_twisted.ensureDeferred
async def test_a_session_that_turns_standard_conforming_strings_off_is_not_injected(db_dsn):
    """Txn._send checks usable() per statement: after SET standard_conforming_strings
    TO off (session-wide, then LOCAL) on the pool's own link, a value with a backslash
    before a quote is still read back as sent (doubling quotes alone would let it close
    the literal and run the rest as SQL)."""
    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=1)
    evil = "\\' , (SELECT 'INJECTED') , '"
    try:
        for setting in ("SET standard_conforming_strings TO off",
                        "SET LOCAL standard_conforming_strings TO off"):
            got = await _in_txn(db, [(setting, None), ("SELECT %s::text", [evil]),
                                     ("SELECT array_length(ARRAY[%s, %s], 1)", [evil, "a\\"]),
                                     ("SELECT %s::text[]", [[evil, "\\"]])])
            assert got[1:] == [evil, 2, [evil, "\\"]]
        # back on (the session setting stays on the pooled link until reset)
        got = await _in_txn(db, [("SET standard_conforming_strings TO on", None),
                                 ("SELECT %s::text", [evil])])
        assert got[1:] == [evil]
    finally:
        await db.close()


# -- the DATA decoder -------------------------------------------------------------------

def _split_everywhere(data: bytes, max_line: int, stride: int = 1) -> None:
    for cut in range(0, len(data) + 1, stride):
        chunks = [data[:cut], data[cut:]]
        new = _run(DataDecoder(max_line_bytes=max_line), chunks)
        assert new[:4] == _run(_Reference(max_line), chunks)[:4], (cut, max_line)
        assert new[4] <= 2


def test_lines_at_and_around_the_limit_in_every_position():
    """Lines of 998..1002 octets (CRLF included) alone, after short lines, stuffed, at the
    very end of the body, split at every byte near the boundaries: line_too_long and
    the body agree with the line-by-line reference."""
    for total in (998, 999, 1000, 1001, 1002):
        long_line = b"L" * (total - 2) + b"\r\n"
        stuffed = b"." + b"S" * (total - 3) + b"\r\n"
        for body in (long_line, b"a\r\n" + long_line, b"a\r\n" * 400 + long_line + b"b\r\n",
                     stuffed, b"x\r\n" + stuffed + b".\r\n" + long_line,
                     long_line * 3, b"y" * 600 + b"\r\n" + long_line + b"z" * 500 + b"\r\n",
                     b"q\r\n" * 2 + long_line + b"\r\n.\r\n" + long_line):
            data = body + b".\r\nNOOP\r\n"
            _split_everywhere(data, 1000, stride=7)
            # and a few adversarial three-way splits around the long line's end
            end = data.find(b"\r\n", data.find(b"L" * 5) if b"L" * 5 in data else 0)
            for a in range(max(0, end - 3), min(len(data), end + 4)):
                for b in (a + 1, a + 2, len(data) - 3, len(data) - 1):
                    if a <= b <= len(data):
                        chunks = [data[:a], data[a:b], data[b:]]
                        assert _run(DataDecoder(1000), chunks)[:4] == \
                            _run(_Reference(1000), chunks)[:4]


def test_terminator_and_stuffed_dots_split_in_every_position():
    """CRLF . CRLF split at every byte, preceded by stuffed dots, a CR at a chunk's end,
    a lone dot line, a bare LF dot: the decoded body and the leftover are the
    reference's."""
    tails = [b"\r\n.\r\nQUIT\r\n", b"\r\n..\r\n.\r\n", b"\r\n.x\r\n.\r\nRSET\r\n",
             b"\n.\n\r\n.\r\n", b"\r\r\n.\r\n", b"\r\n.\r\r\n.\r\n", b"\r\n...\r\n.\r\n"]
    for head in (b"", b".", b"..x", b"abc", b"abc\r\n.", b"line\r\n.\r"):
        for tail in tails:
            _split_everywhere(head + tail, 1000)
            _split_everywhere(head + tail, 5)


def test_hundred_kib_bodies_with_stuffed_dots_at_start_middle_end():
    """Large bodies whose only line-start dots sit at the start, the middle or just before
    the terminator, cut at chunk sizes the network uses and at the dots themselves."""
    rng = random.Random(15)
    line = b"abcdefghij" * 7 + b"\r\n"
    base = line * (100 * 1024 // len(line))
    mid = len(base) // 2 // len(line) * len(line)
    variants = [b"." + base, base[:mid] + b".." + base[mid:], base + b".\r\n" + b"..end\r\n",
                b".\r\n" + base[:mid] + b"." + base[mid:] + b"." + line,
                base[:mid] + b"." * 999 + b"\r\n" + base[mid:],
                base[:mid] + b"." * 1001 + b"\r\n" + base[mid:]]
    for body in variants:
        data = body + b".\r\nQUIT\r\n"
        marks = [i for i in range(len(data)) if data[i:i + 1] in (b".", b"\r")][:40]
        marks += [len(data) - k for k in range(1, 12)]
        for size in (1, 2, 3, 4096, 16384, 65536):
            if size < 8:
                cuts = sorted(set(marks + [m + size for m in marks]))
            else:
                cuts = list(range(size, len(data), size))
            bounds = [c for c in cuts if 0 < c < len(data)]
            chunks = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)],
                                                strict=True)]
            new = _run(DataDecoder(), chunks)
            assert new[:4] == _run(_Reference(1000), chunks)[:4], (size, len(data))
        for _ in range(20):
            bounds = sorted(rng.sample(range(1, len(data)), 12))
            chunks = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)],
                                                strict=True)]
            assert _run(DataDecoder(), chunks)[:4] == _run(_Reference(1000), chunks)[:4]


def test_random_bodies_against_the_reference():
    rng = random.Random(98855)
    pieces = [b".", b"\r", b"\n", b"\r\n", b"x", b"\r\n.", b"\r\n..", b"y" * 997,
              b"z" * 998, b"w" * 1000, b"\r\n.\r\n"]
    for _ in range(600):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        if not data:
            continue
        bounds = sorted({rng.randint(0, len(data)) for _ in range(rng.randint(0, 5))})
        chunks = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
        for limit in (3, 1000):
            new = _run(DataDecoder(limit), chunks)
            assert new[:4] == _run(_Reference(limit), chunks)[:4], (data[:80], bounds)
            assert new[4] <= 2


# -- end to end through the MX ----------------------------------------------------------

def _send(port: int, mail_from: str, rcpts: list[str], raw: bytes) -> Any:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as smtp:
        try:
            return smtp.sendmail(mail_from, rcpts, raw)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code


async def _messages(server, key: str, inbox_id: str) -> list[dict]:
    listed = await server.api.get(f"/api/v1/inboxes/{inbox_id}/messages?limit=100", key=key)
    return listed.json["data"]


@pytest_twisted.ensureDeferred
async def test_subjects_and_envelopes_ending_in_backslashes_read_back_exactly(server):
    """Values ending in a backslash (which would swallow the closing quote under
    backslash escaping), Unicode line separators, percent signs, and an envelope sender
    with a quote: every one stored and read back exactly."""
    inbox, key = await new_inbox(server, "literals-hostile")
    subjects = ["ends in a backslash \\", "\\\\'", "100%% %s %(x)s sep end",
                "'); DELETE FROM messages; --\\"]
    raws: list[bytes] = []
    for subject in subjects:
        raw = (f"From: x@example.com\r\nTo: {inbox['email']}\r\nSubject: {subject}\r\n"
               "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
               f"\r\n\r\nbody {subject} \u2028 \u2029 \x85 \\\r\n").encode()
        raws.append(raw)
        assert await deferToThread(_send, server.mx_port, "o'neil%s@example.com",
                                   [inbox["email"]], raw) == {}
    got, bodies = [], []
    for summary in await _messages(server, key, inbox["id"]):
        got.append((await server.api.get(f"/api/v1/messages/{summary['id']}",
                                         key=key)).json["subject"])
        bodies.append((await server.api.get(f"/api/v1/messages/{summary['id']}/raw",
                                            key=key)).body)
    assert sorted(got) == sorted(subjects)
    assert sorted(raw for raw in raws if any(b.endswith(raw) for b in bodies)) == sorted(raws)


def _ahead_keys(statements) -> list[str]:
    for statement in statements:
        if getattr(statement, "name", None) == blob_lead.AHEAD_NAME:
            text = bytes(statement.params[0]).decode()
            return [k.strip('"') for k in text.strip("{}").split(",")]
    return []


def _advisory_waiters(holder) -> list[int]:
    with holder.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND wait_event = 'advisory' AND datname = current_database()")
        return [pid for (pid,) in cur.fetchall()]


async def _until(predicate, what: str, seconds: float = 15.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


async def _lone_delivery_behind_a_lock(server: Any, dsn: str, monkeypatch: Any,
                                       name: str) -> tuple[dict, str, Any]:
    """A new inbox (its folder known after one small message, so the next delivery is
    guessed and lone), and a session that takes the advisory lock of every blob key a
    write-ahead is about to write, just before the pipeline goes: that write-ahead then
    waits on it. Returns the inbox, its key and the locking session."""
    inbox, key = await new_inbox(server, name)
    warm = f"From: a@example.com\r\nTo: {inbox['email']}\r\nSubject: warm\r\n\r\nw\r\n"
    assert await deferToThread(_send, server.mx_port, "a@example.com", [inbox["email"]],
                               warm.encode()) == {}
    holder = psycopg2.connect(dsn)
    holder.autocommit = True
    locked: list[str] = []
    original = PgConnection.run_pipeline

    def locking(self, statements):
        for k in _ahead_keys(statements):
            if k not in locked:
                locked.append(k)
                with holder.cursor() as cur:
                    cur.execute("SELECT pg_advisory_lock(hashtextextended(%s, 7))", (k,))
        return original(self, statements)

    monkeypatch.setattr(PgConnection, "run_pipeline", locking)
    return inbox, key, holder


def _large(to: str, marker: str) -> bytes:
    head = (f"From: a@example.com\r\nTo: {to}\r\nSubject: {marker}\r\n\r\n").encode()
    line = f"large {marker} 'q' \\ %s\r\n".encode()
    return head + line * (110 * 1024 // len(line))


@pytest.mark.skipif(not libpq_pipeline.available(), reason="no libpq pipeline mode")
@pytest.mark.parametrize("blow", ["pg_cancel_backend", "pg_terminate_backend"])
@pytest_twisted.ensureDeferred
async def test_a_lone_large_delivery_whose_write_ahead_fails_is_never_acknowledged_wrongly(
        server, db_dsn, monkeypatch, blow):
    """A lone >=100 KiB delivery's write-ahead (not waited for) waits on its blob's lock,
    held by another session; its backend is cancelled / killed, again and again, for a
    second. Then the lock goes. The client hears 250 and finds the message once, or a
    4xx and finds nothing; the next delivery works and is stored exactly."""
    inbox, key, holder = await _lone_delivery_behind_a_lock(server, db_dsn, monkeypatch,
                                                            f"overlap-{blow}")
    raw = _large(inbox["email"], f"victim {blow}")
    try:
        sending = deferToThread(_send, server.mx_port, "a@example.com", [inbox["email"]], raw)
        await _until(lambda: bool(_advisory_waiters(holder)), "the write-ahead's lock wait")
        blown = 0
        for _ in range(20):
            for pid in _advisory_waiters(holder):
                with holder.cursor() as cur:
                    cur.execute(f"SELECT {blow}(%s)", (pid,))
                blown += 1
            await deferLater(reactor, 0.05, lambda: None)
            if sending.called:
                break
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
        outcome = await sending
        assert blown >= 1
        stored = [m for m in await _messages(server, key, inbox["id"])
                  if m.get("subject") == f"victim {blow}"]
        if outcome == {}:
            assert len(stored) == 1
            body = (await server.api.get(f"/api/v1/messages/{stored[0]['id']}/raw",
                                         key=key)).body
            assert body.endswith(raw)
        else:
            assert isinstance(outcome, int) and 400 <= outcome < 500, outcome
            assert stored == []
        monkeypatch.undo()  # the real run_pipeline again
        after = _large(inbox["email"], f"after {blow}")
        for _ in range(3):  # the pool's links all still work
            assert await deferToThread(_send, server.mx_port, "a@example.com",
                                       [inbox["email"]], after) == {}
        again = [m for m in await _messages(server, key, inbox["id"])
                 if m.get("subject") == f"after {blow}"]
        assert len(again) == 3
        for m in again:
            assert (await server.api.get(f"/api/v1/messages/{m['id']}/raw",
                                         key=key)).body.endswith(after)
    finally:
        holder.close()


@pytest.mark.skipif(not libpq_pipeline.available(), reason="no libpq pipeline mode")
@pytest_twisted.ensureDeferred
async def test_two_pools_racing_on_the_same_large_content_count_it_once_per_copy(db_dsn):
    """Two Database pools (two processes) write the same large content ahead without
    waiting, at once, many times: every transaction that commits counts its copy, the
    row holds the bytes exactly, and no transaction sees another's half-written row."""
    import hashlib

    from agentpost.storage.blobs import key_for_digest

    data = b"raced \x00\xff 'x' \\ " * 8000
    blob = "db/" + key_for_digest(hashlib.sha256(data).hexdigest())
    dbs = [Database(db_dsn, clock=reactor, reactor=reactor, pool_size=2) for _ in range(2)]

    async def deliver(txn):
        assert await blob_lead.write_ahead(txn, [blob], {blob: data}, wait=False) == [None]
        await txn.execute("UPDATE blobs SET refcount = refcount + 1 WHERE key = %s "
                          "AND data IS NOT NULL AND length(data) = %s", [blob, len(data)])
        return await txn.fetchval("SELECT refcount FROM blobs WHERE key = %s", [blob])

    try:
        runs = [db.run_interaction("test.race", deliver) for _ in range(6) for db in dbs]
        counts = await defer.gatherResults(runs, consumeErrors=True)
        assert sorted(counts) == list(range(1, len(runs) + 1))
        conn = psycopg2.connect(db_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT refcount, data FROM blobs WHERE key = %s", (blob,))
                [(refcount, stored)] = cur.fetchall()
        finally:
            conn.close()
        assert (refcount, bytes(stored)) == (len(runs), data)
    finally:
        for db in dbs:
            await db.close()
        execute(db_dsn, "DELETE FROM blobs WHERE key = %s", (blob,))


@pytest.mark.skipif(not libpq_pipeline.available(), reason="no libpq pipeline mode")
@pytest_twisted.ensureDeferred
async def test_a_cancelled_transaction_with_its_write_ahead_in_flight_leaves_the_link_usable(
        db_dsn):
    """The caller cancels run_interaction while the write-ahead (not waited for) waits
    on a lock: nothing is left written, and the pool's only link serves the next
    transaction correctly (no answer of the old pipeline read as the new one's)."""
    import hashlib

    from agentpost.storage.blobs import key_for_digest

    data = b"cancelled ahead " * 8000
    blob = "db/" + key_for_digest(hashlib.sha256(data).hexdigest())
    holder = psycopg2.connect(db_dsn)
    holder.autocommit = True
    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=1)
    started = []

    async def deliver(txn):
        started.append(1)
        await blob_lead.write_ahead(txn, [blob], {blob: data}, wait=False)
        return await txn.fetchval("SELECT %s::text", ["after"])

    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtextextended(%s, 7))", (blob,))
        running = db.run_interaction("test.cancel", deliver)
        await _until(lambda: bool(_advisory_waiters(holder)), "lock wait")
        running.cancel()
        await deferLater(reactor, 0.3, lambda: None)
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
        try:
            result = await running
        except Exception:  # cancelled (or failed): either is fine here
            result = None
        for i in range(5):
            got = await _in_txn(db, [("SELECT %s::text || %s::text", ["next'", str(i)])])
            assert got == [f"next'{i}"]
        with holder.cursor() as cur:
            cur.execute("SELECT count(*) FROM blobs WHERE key = %s", (blob,))
            [(rows,)] = cur.fetchall()
        assert rows == (1 if result == "after" else 0)
    finally:
        holder.close()
        await db.close()
        execute(db_dsn, "DELETE FROM blobs WHERE key = %s", (blob,))


@pytest.mark.skipif(not libpq_pipeline.available(), reason="no libpq pipeline mode")
@pytest_twisted.ensureDeferred
async def test_a_link_lost_in_the_unwaited_write_ahead_is_retried_not_taken_for_a_commit(
        db_dsn, pg):
    """The MX's lone delivery: write_ahead(wait=False), then the statement and its COMMIT
    in one round trip (Txn.commit_with). The backend dies while the write-ahead waits on
    a lock, before anything of the COMMIT was sent: a link lost before COMMIT, which
    run_interaction retries on a new link (as it did when the write-ahead was waited for).
    Taking it for the COMMIT's round trip ("outcome unknown", Txn.ended) refuses the
    retry: the sender gets a 451 for a delivery that could have been stored."""
    import hashlib

    from agentpost.storage.blobs import key_for_digest
    from tests import test_pgconn as pgconn_tests

    data = b"lost before commit \x00\xff" * 6000
    blob = "db/" + key_for_digest(hashlib.sha256(data).hexdigest())
    holder = psycopg2.connect(db_dsn)
    holder.autocommit = True
    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=2)
    attempts: list[int] = []

    async def deliver(txn):
        attempts.append(1)
        assert await blob_lead.write_ahead(txn, [blob], {blob: data}, wait=False) == [None]
        return await txn.commit_with(
            "UPDATE blobs SET refcount = refcount + 1 WHERE key = %s", [blob],
            "(SELECT refcount FROM blobs WHERE key = %s)", [blob])

    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtextextended(%s, 7))", (blob,))
        running = db.run_interaction("test.lost", deliver)
        await _until(lambda: bool(_advisory_waiters(holder)), "lock wait")
        [pid] = _advisory_waiters(holder)
        pgconn_tests._terminate(pg, pid)
        await _until(lambda: len(attempts) == 2 or running.called, "the retry or the end")
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
        outcome: Any
        try:
            outcome = await running
        except Exception as exc:  # the defect: reported, not raised
            outcome = exc
        assert (len(attempts), outcome) == (2, 1)
    finally:
        holder.close()
        await db.close()
        execute(db_dsn, "DELETE FROM blobs WHERE key = %s", (blob,))


@pytest.mark.skipif(not libpq_pipeline.available(), reason="no libpq pipeline mode")
@pytest_twisted.ensureDeferred
async def test_over_the_mx_a_backend_killed_once_during_the_write_ahead_still_gets_250(
        server, db_dsn, pg, monkeypatch):
    """The same through the MX: a lone 110 KiB delivery whose pool backend is killed
    once while its (unwaited) write-ahead waits on the blob lock. Nothing was committed,
    the link error came before the COMMIT was sent: the delivery is retried and the
    client hears 250, the message stored once, exactly (not a 451)."""
    from tests import test_pgconn as pgconn_tests

    inbox, key, holder = await _lone_delivery_behind_a_lock(server, db_dsn, monkeypatch,
                                                            "overlap-killed-once")
    raw = _large(inbox["email"], "killed once")
    try:
        sending = deferToThread(_send, server.mx_port, "a@example.com", [inbox["email"]], raw)
        await _until(lambda: bool(_advisory_waiters(holder)), "the write-ahead's lock wait")
        [pid] = _advisory_waiters(holder)
        pgconn_tests._terminate(pg, pid)
        await deferLater(reactor, 0.3, lambda: None)
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
        assert await sending == {}
        stored = [m for m in await _messages(server, key, inbox["id"])
                  if m.get("subject") == "killed once"]
        assert len(stored) == 1
        assert (await server.api.get(f"/api/v1/messages/{stored[0]['id']}/raw",
                                     key=key)).body.endswith(raw)
    finally:
        holder.close()
