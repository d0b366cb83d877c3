"""Issue 12: a delivery's large message bytes are written ahead of its statements, as a
binary parameter through libpq's pipeline mode (storage.blob_lead), in the same
transaction. What must hold: the bytes are stored exactly whatever they hold (NUL,
not UTF-8, quotes), the rows are counted once per copy, nothing survives a delivery
that fails, the content already stored is left as it is, two processes writing the same
content at once end with one row counted twice, and the path is really taken over the
MX (smtplib, group commit)."""

from __future__ import annotations

import hashlib
import smtplib
from datetime import UTC, datetime

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from agentpost.storage import blob_lead, libpq_pipeline
from agentpost.storage.blobs import key_for_digest
from agentpost.storage.database import Database, Txn
from agentpost.storage.pgconn import PgConnection
from tests.helpers import execute, query
from tests.imap_client import new_inbox, session

pytestmark = pytest.mark.skipif(not libpq_pipeline.available(),
                                reason="psycopg2's libpq has no pipeline mode (before 14)")

async def _ahead(txn, keys, inline):
    """blob_lead.write_ahead, then its answer (it returns once sent: Txn.settle)."""
    data = await blob_lead.write_ahead(txn, keys, inline)
    await txn.settle()
    return data



@pytest.fixture
def waits(monkeypatch):
    """The ``wait`` of every Txn.pipeline call (the real ones: this only records)."""
    seen: list[bool] = []
    original = Txn.pipeline

    async def recording(self, sql, name, params, binary, *, wait=True):
        seen.append(wait)
        return await original(self, sql, name, params, binary, wait=wait)

    monkeypatch.setattr(Txn, "pipeline", recording)
    return seen


@pytest.fixture
def pipelines(monkeypatch):
    """How many pipelines the pool's connections ran (the real ones: this only counts)."""
    calls: list[int] = []
    original = PgConnection.run_pipeline

    def counting(self, statements):
        calls.append(len(statements))
        return original(self, statements)

    monkeypatch.setattr(PgConnection, "run_pipeline", counting)
    return calls


def _raw(to: str, marker: bytes, kib: int = 100) -> bytes:
    """A message of about ``kib`` KiB whose body is Latin-1 with NULs and quotes: bytes
    no text literal could carry (it would have gone as hex)."""
    head = (b"From: Alice <alice@example.com>\r\nTo: " + to.encode() + b"\r\n"
            b"Subject: bytes ahead " + marker + b"\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=iso-8859-1\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n")
    line = b"caf\xe9 na\xefve 'quoted' \\ back\x00slash " + marker + b"\r\n"
    return head + line * (kib * 1024 // len(line))


def _send(port: int, rcpts: list[str], raw: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as smtp:
        return smtp.sendmail("alice@example.com", rcpts, raw)


async def _stored(server, key: str, inbox_id: str) -> list[bytes]:
    listed = await server.api.get(f"/api/v1/inboxes/{inbox_id}/messages?limit=100", key=key)
    return [(await server.api.get(f"/api/v1/messages/{m['id']}/raw", key=key)).body
            for m in listed.json["data"]]


@pytest_twisted.ensureDeferred
async def test_large_messages_over_the_mx_are_written_ahead_and_stored_exactly(
        server, db_dsn, pipelines, waits):
    """One message to two inboxes and a UTF-8 one: byte-exact through the API, one row
    per content counted once per copy, its UTF-8 flag right. Each came alone, so its
    statement was built while its bytes were being written (not waited for)."""
    first, key_1 = await new_inbox(server, "ahead-one")
    second, key_2 = await new_inbox(server, "ahead-two")
    latin = _raw(first["email"], b"latin")
    text = ("Grüße, it's a line of UTF-8 text with a \\ and a quote 'x'\n" * 2000).encode()
    utf8 = (b"From: a@example.com\r\nTo: " + first["email"].encode() + b"\r\n"
            b"Subject: utf-8 ahead\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text.replace(b"\n", b"\r\n"))
    assert await deferToThread(_send, server.mx_port, [first["email"], second["email"]],
                               latin) == {}
    assert await deferToThread(_send, server.mx_port, [first["email"]], utf8) == {}
    assert pipelines, "the bytes went as a literal: the pipeline was never used"
    assert False in waits, "a lone delivery waited for its write-ahead"

    got_1 = await _stored(server, key_1, first["id"])
    [got_2] = await _stored(server, key_2, second["id"])
    assert len(got_1) == 2 and got_2.endswith(latin)
    assert sorted(g.endswith(latin) for g in got_1) == [False, True]
    [stored_utf8] = [g for g in got_1 if g.endswith(utf8)]
    rows = query(db_dsn, "SELECT b.key, b.size, b.refcount, b.utf8, b.data FROM blobs b "
                         "WHERE b.key IN (SELECT raw_blob_key FROM messages) ORDER BY b.size")
    by_bytes = {bytes(data): (key, size, refcount, flag) for key, size, refcount, flag, data
                in rows}
    key, size, refcount, flag = by_bytes[got_2]
    assert (size, refcount, flag) == (len(got_2), 2, False)
    assert key == "db/" + key_for_digest(hashlib.sha256(got_2).hexdigest())
    assert by_bytes[stored_utf8][1:] == (len(stored_utf8), 1, True)


@pytest_twisted.ensureDeferred
async def test_concurrent_sessions_batch_large_messages_and_lose_none(server, pipelines):
    """Eight sessions at once (group commit batches them): every message stored, exact."""
    inbox, key = await new_inbox(server, "ahead-burst")
    raws = [_raw(inbox["email"], b"burst-%d" % i) for i in range(16)]

    def session(part: list[bytes]) -> None:
        with smtplib.SMTP("127.0.0.1", server.mx_port, timeout=60) as smtp:
            for raw in part:
                assert smtp.sendmail("alice@example.com", [inbox["email"]], raw) == {}

    await defer.gatherResults([deferToThread(session, raws[i::8]) for i in range(8)],
                              consumeErrors=True)
    stored = await _stored(server, key, inbox["id"])
    assert len(stored) == len(raws)
    assert sorted(next(i for i, r in enumerate(raws) if s.endswith(r)) for s in stored) \
        == list(range(len(raws)))
    assert pipelines


def _db(dsn: str) -> Database:
    return Database(dsn, clock=reactor, reactor=reactor, pool_size=2)


def _key(data: bytes) -> str:
    return "db/" + key_for_digest(hashlib.sha256(data).hexdigest())


@pytest_twisted.ensureDeferred
async def test_rows_written_ahead_go_with_a_transaction_that_fails(db_dsn):
    """In the transaction the row is there, unreferenced; rolled back, it is gone."""
    db = _db(db_dsn)
    data = b"\x00\xff" * 60_000
    key = _key(data)
    seen = []

    async def fails(txn):
        assert await _ahead(txn, [key], {key: data}) == [None]
        seen.append(await txn.fetchone("SELECT refcount, utf8, data FROM blobs WHERE key = %s",
                                       (key,)))
        raise RuntimeError("the delivery failed after its bytes were written")

    try:
        with pytest.raises(RuntimeError):
            await db.run_interaction("test.ahead", fails)
        [row] = seen
        assert (row["refcount"], row["utf8"], bytes(row["data"])) == (0, False, data)
        assert query(db_dsn, "SELECT count(*) FROM blobs WHERE key = %s", (key,)) == [(0,)]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_small_bytes_and_store_blobs_stay_with_the_statement(db_dsn):
    """Below the thresholds (a blob under LEAD_MIN_BYTES, or large ones that come to less
    than LEAD_MIN_TOTAL), and for blobs in the store (no bytes), nothing is written
    ahead: the values come back for the delivery's own statement. Over the total, each
    large one is written ahead (in the transaction only: nothing is committed here)."""
    db = _db(db_dsn)
    small = b"x" * (blob_lead.LEAD_MIN_BYTES - 1)
    large = b"y" * (blob_lead.LEAD_MIN_TOTAL - 1)  # alone, not worth the round trip
    huge = [b"z" * (blob_lead.LEAD_MIN_TOTAL // 2), b"w" * (blob_lead.LEAD_MIN_TOTAL // 2)]

    async def body(txn):
        return await _ahead(txn, ["db/small", "store/key"], {"db/small": small})

    async def alone(txn):
        return await _ahead(txn, ["db/large"], {"db/large": large})

    async def together(txn):
        keys = ["db/small", "db/w", "db/z"]
        out = await _ahead(
            txn, keys, {"db/small": small, "db/z": huge[0], "db/w": huge[1]})
        rows = await txn.fetchall("SELECT key, data FROM blobs WHERE key = ANY(%s) "
                                  "ORDER BY key", (keys,))
        seen.append((out, [(r["key"], bytes(r["data"])) for r in rows]))
        raise RuntimeError("roll back: no delivery counts these rows")

    seen: list = []

    try:
        assert await db.run_interaction("test.ahead", body) == [small, None]
        assert await db.run_interaction("test.ahead", alone) == [large]
        with pytest.raises(RuntimeError):
            await db.run_interaction("test.ahead", together)
        [(out, rows)] = seen
        assert out == [small, None, None]  # two halves of the total: both written ahead
        assert rows == [("db/w", huge[1]), ("db/z", huge[0])]
        assert query(db_dsn, "SELECT count(*) FROM blobs WHERE key IN "
                             "('db/small', 'db/large', 'db/w', 'db/z')") == [(0,)]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_stored_content_is_left_alone_and_two_processes_count_it_twice(db_dsn):
    """A row already there keeps its bytes and count; two pools (two processes) writing
    the same new content at once, each then counting its reference as the delivery's
    statement does, end with one row counted twice. (The row's unique key alone would
    order these two; the locks taken ahead are what the release test below needs.)"""
    data = "ünïcode, it's text\n".encode() * 6000
    key = _key(data)
    first, second = _db(db_dsn), _db(db_dsn)

    async def deliver(txn):
        assert await _ahead(txn, [key], {key: data}) == [None]
        await txn.execute(
            "INSERT INTO blobs (key, size, refcount, created_at, data) "
            "VALUES (%s, %s, 1, %s, NULL) "
            "ON CONFLICT (key) DO UPDATE SET refcount = blobs.refcount + EXCLUDED.refcount",
            (key, len(data), datetime.now(UTC)))

    try:
        await defer.gatherResults([first.run_interaction("test.a", deliver),
                                   second.run_interaction("test.b", deliver)],
                                  consumeErrors=True)
        [(refcount, flag, stored)] = query(
            db_dsn, "SELECT refcount, utf8, data FROM blobs WHERE key = %s", (key,))
        assert (refcount, flag, bytes(stored)) == (2, True, data)
        await first.run_interaction("test.c", deliver)
        [(refcount, stored)] = query(db_dsn, "SELECT refcount, data FROM blobs WHERE key = %s",
                                     (key,))
        assert (refcount, bytes(stored)) == (3, data)
    finally:
        await first.close()
        await second.close()


def _release(dsn: str, key: str) -> None:
    """storage.mail.release_blobs' order in its own session: the blob's advisory lock,
    one reference less, the row deleted at none."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))", (key,))
            cur.execute("UPDATE blobs SET refcount = refcount - 1 WHERE key = %s", (key,))
            cur.execute("DELETE FROM blobs WHERE key = %s AND refcount <= 0", (key,))
    finally:
        conn.close()


def _waiting_for_advisory_lock(dsn: str) -> bool:
    return query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                      "AND wait_event = 'advisory'") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_a_release_waits_for_the_delivery_that_wrote_ahead(db_dsn):
    """The content is stored once (refcount 1) and its last reference is being released
    while a delivery of the same content has written ahead (finding the row there) but
    not yet counted its reference: the release waits on the blob's lock until the
    delivery commits, then only takes its own reference away. Without the lock taken
    ahead, the release would delete the row and the delivery's count would make a new
    one without its bytes."""
    data = b"\xfe\xff shared content\r\n" * 6000
    key = _key(data)
    db = _db(db_dsn)
    execute(db_dsn, "INSERT INTO blobs (key, size, refcount, created_at, data, utf8) "
                    "VALUES (%s, %s, 1, now(), %s, false)", (key, len(data), data))
    releasing: list[defer.Deferred] = []

    async def deliver(txn):
        assert await _ahead(txn, [key], {key: data}) == [None]
        releasing.append(deferToThread(_release, db_dsn, key))
        for _ in range(500):  # until the release waits on the lock (or, wrongly, is done)
            if releasing[0].called or _waiting_for_advisory_lock(db_dsn):
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert not releasing[0].called, "the release did not wait for the delivery"
        await txn.execute("UPDATE blobs SET refcount = refcount + 1 WHERE key = %s", (key,))

    try:
        await db.run_interaction("test.ahead", deliver)
        await releasing[0]
        [(refcount, stored)] = query(db_dsn, "SELECT refcount, data FROM blobs WHERE key = %s",
                                     (key,))
        assert (refcount, bytes(stored)) == (1, data)
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_the_one_copy_path_and_imap_append_write_ahead_too(server, pipelines):
    """Outside the MX's group commit (storage.mail.prepare_delivery: one delivery in its
    own transaction, IMAP APPEND): the same bytes ahead, stored and read back exactly."""
    inbox, key = await new_inbox(server, "ahead-single")
    delivered = _raw(inbox["email"], b"single")
    [stored] = await server.deliver(delivered, [inbox["email"]])
    assert pipelines, "the one-copy path sent the bytes as a literal"
    got = await server.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
    assert got.status == 200 and got.body == delivered
    appended = _raw(inbox["email"], b"appended", kib=150)
    before = len(pipelines)

    def append_then_fetch(c):
        c.append("INBOX", appended)
        c.ok("SELECT INBOX")
        return b"".join(c.ok("UID FETCH 1:* (BODY.PEEK[])"))

    fetched = await session(server.imap_port, inbox["email"], key, append_then_fetch)
    assert len(pipelines) > before
    for raw in (appended, delivered):  # a NUL goes out as 0x80 in a literal (imap.wire)
        assert b"{%d}\r\n" % len(raw) + raw.replace(b"\x00", b"\x80") in fetched
    assert sorted(len(b) for b in await _stored(server, key, inbox["id"])) == \
        sorted([len(delivered), len(appended)])
    assert appended in await _stored(server, key, inbox["id"])  # byte-exact, NULs and all
