"""Small messages kept in PostgreSQL with their records (storage.blobs.inline, 0035):
written by the delivering transaction, read back byte-exact through every door, gone
with their last reference; larger ones and attachments still in the store."""

import hashlib

import pytest
import pytest_twisted
from twisted.internet import defer

from agentpost.storage.blobs import BlobNotFound, key_for_digest
from tests.conftest import make_config, start_server
from tests.helpers import execute as _execute
from tests.helpers import query
from tests.imap_client import new_inbox, session
from tests.mailfactory import make_message


def _blob_row(dsn: str, message_id: str) -> tuple[str, int, int, bytes | None]:
    [(key, size, refcount, data)] = query(
        dsn, "SELECT b.key, b.size, b.refcount, b.data FROM messages m "
        "JOIN blobs b ON b.key = m.raw_blob_key WHERE m.id = %s", (message_id,))
    return key, size, refcount, None if data is None else bytes(data)


@pytest_twisted.ensureDeferred
async def test_a_small_message_lives_in_its_blob_row_and_reads_back_everywhere(server, db_dsn):
    inbox, key = await new_inbox(server, "inline")
    raw = make_message(to=inbox["email"], subject="kept with its records",
                       body="a line of text\n" * 40)
    [stored] = await server.deliver(raw, [inbox["email"]])
    blob_key, size, refcount, data = _blob_row(db_dsn, stored.message_id)
    digest = hashlib.sha256(raw).hexdigest()
    assert blob_key == "db/" + key_for_digest(digest)
    assert (size, refcount, data) == (len(raw), 1, raw)
    # Nothing went to the store underneath.
    assert not await server.core.blobs.store.exists(key_for_digest(digest))

    got = await server.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
    assert got.status == 200 and got.body == raw
    header_end = raw.index(b"\r\n\r\n") + 4

    def fetch(c):
        c.ok("SELECT INBOX")
        whole = c.ok("FETCH 1 (BODY.PEEK[])")[0]
        part = c.ok("FETCH 1 (BODY.PEEK[]<7.25>)")[0]
        text = c.ok("FETCH 1 (BODY.PEEK[TEXT])")[0]
        return whole, part, text

    whole, part, text = await session(server.imap_port, inbox["email"], key, fetch)
    assert whole.endswith(b"{%d}\r\n" % len(raw) + raw + b")")
    assert part.endswith(b"{25}\r\n" + raw[7:32] + b")")
    assert text.endswith(raw[header_end:] + b")")


@pytest_twisted.ensureDeferred
async def test_copies_share_one_row_which_goes_with_the_last_reference(server, db_dsn):
    first, key_1 = await new_inbox(server, "inlineone")
    second, key_2 = await new_inbox(server, "inlinetwo")
    raw = make_message(to=first["email"], subject="to both")
    stored = await server.deliver(raw, [first["email"], second["email"]])
    keys = {_blob_row(db_dsn, s.message_id)[0] for s in stored}
    assert len(keys) == 1 and _blob_row(db_dsn, stored[0].message_id)[2] == 2

    def expunge(c):
        c.ok("SELECT INBOX")
        c.ok("STORE 1 +FLAGS (\\Deleted)")
        c.ok("EXPUNGE")

    await session(server.imap_port, first["email"], key_1, expunge)
    [blob_key] = keys
    assert query(db_dsn, "SELECT refcount, data IS NOT NULL FROM blobs WHERE key = %s",
                 (blob_key,)) == [(1, True)]
    await session(server.imap_port, second["email"], key_2, expunge)
    assert query(db_dsn, "SELECT 1 FROM blobs WHERE key = %s", (blob_key,)) == []


@pytest_twisted.ensureDeferred
async def test_altered_bytes_are_refused_not_served(server, db_dsn):
    """The bytes are checked against their SHA-256 as the store's are: a row changed
    behind our back answers a temporary error, never other content."""
    inbox, key = await new_inbox(server, "inlinebad")
    [stored] = await server.deliver(make_message(to=inbox["email"]), [inbox["email"]])
    blob_key = _blob_row(db_dsn, stored.message_id)[0]
    _execute(db_dsn, "UPDATE blobs SET data = 'not the message'::bytea WHERE key = %s",
             (blob_key,))
    got = await server.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
    assert got.status == 503 and b"not the message" not in got.body


@pytest_twisted.ensureDeferred
async def test_with_the_limit_at_zero_every_message_goes_to_the_store(db_dsn, tmp_path,
                                                                     openapi_checker):
    running = await start_server(make_config(db_dsn, storage={
        "backend": "local", "path": str(tmp_path / "blobs"), "inline_message_max": "0B"}),
        openapi_checker)
    try:
        inbox, key = await new_inbox(running, "nostoreinline")
        raw = make_message(to=inbox["email"], subject="to the store")
        [stored] = await running.deliver(raw, [inbox["email"]])
        blob_key, _, _, data = _blob_row(db_dsn, stored.message_id)
        assert blob_key == key_for_digest(hashlib.sha256(raw).hexdigest()) and data is None
        assert (tmp_path / "blobs" / blob_key).read_bytes() == raw
        got = await running.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
        assert got.body == raw
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_reads_asked_together_each_get_their_own_bytes(server, db_dsn):
    """Reads asked for in one reactor turn share one statement (an IMAP FETCH reads
    ahead, a queue round reads every message): each still gets its own bytes, a
    missing key its own BlobNotFound, and a cancelled read does not disturb the rest."""
    inbox, _ = await new_inbox(server, "inlinemany")
    raws = [make_message(to=inbox["email"], subject=f"number {i}") for i in range(5)]
    keys = []
    for raw in raws:
        [stored] = await server.deliver(raw, [inbox["email"]])
        keys.append(_blob_row(db_dsn, stored.message_id)[0])
    blobs = server.core.blobs
    missing = "db/" + key_for_digest(hashlib.sha256(b"never stored").hexdigest())
    reads = [defer.ensureDeferred(blobs.get_bytes(k)) for k in [*keys, keys[0]]]
    cancelled = defer.ensureDeferred(blobs.get_range(keys[1], 0, 10))
    lost = defer.ensureDeferred(blobs.get_bytes(missing))
    cancelled.cancel()
    assert await defer.gatherResults(reads) == [*raws, raws[0]]
    with pytest.raises(BlobNotFound):
        await lost
    with pytest.raises(defer.CancelledError):
        await cancelled
    assert await blobs.get_range(keys[2], 5, 7) == raws[2][5:12]


@pytest_twisted.ensureDeferred
async def test_ranges_are_cut_by_postgresql_and_exact_at_every_edge(server, db_dsn):
    """IMAP reads headers and partial bodies by range: asked together with whole reads
    of the same message in one turn, each gets exactly its slice, as Python slices."""
    inbox, _ = await new_inbox(server, "inlineranges")
    raw = make_message(to=inbox["email"], subject="ranges",
                       body="a line of text for the ranges, caf\u00e9\n" * 5000)
    [stored] = await server.deliver(raw, [inbox["email"]])
    key, size, _, data = _blob_row(db_dsn, stored.message_id)
    assert data == raw and size == len(raw) > 64 * 1024  # kept in PostgreSQL
    blobs = server.core.blobs
    ranges = [(0, 10), (5, 0), (size - 10, 100), (size, 1), (size + 5, 10), (0, 2**40),
              (2**40, 5), (2**31 - 1, 2**31), (3, size), (raw.index(b"\r\n\r\n"), 4)]
    reads = [defer.ensureDeferred(blobs.get_range(key, start, length))
             for start, length in ranges]
    whole = defer.ensureDeferred(blobs.get_bytes(key))
    got = await defer.gatherResults(reads)
    assert got == [raw[start:start + length] for start, length in ranges]
    assert await whole == raw
    missing = "db/" + key_for_digest(hashlib.sha256(b"never stored").hexdigest())
    with pytest.raises(BlobNotFound):
        await blobs.get_range(missing, 0, 10)
    for bad in [(-1, 5), (0, -1)]:
        with pytest.raises(ValueError):
            await blobs.get_range(key, *bad)


@pytest_twisted.ensureDeferred
async def test_utf8_messages_are_marked_and_read_back_as_text_exactly(server, db_dsn):
    """blobs.utf8 (migration 0038): set for bytes that are UTF-8 without NUL, which whole
    reads then take as text; anything else stays bytea. Every kind reads back exact."""
    inbox, _ = await new_inbox(server, "inlineutf8")
    head = f"From: a@example.com\r\nTo: {inbox['email']}\r\nSubject: kinds\r\n"
    kinds = {
        "ascii": (head + "\r\nplain\r\n").encode(),
        "utf-8": (head + "\r\ncaf\u00e9 \U0001f600 \u2028\r\n").encode(),
        "latin-1": head.encode() + b"\r\ncaf\xe9\r\n",
        "nul": head.encode() + b"\r\na\x00b\r\n",
        "surrogate": head.encode() + b"\r\n\xed\xa0\x80\r\n",
    }
    flags = {}
    for name, raw in kinds.items():
        [stored] = await server.deliver(raw, [inbox["email"]])
        key = _blob_row(db_dsn, stored.message_id)[0]
        [(flags[name],)] = query(db_dsn, "SELECT utf8 FROM blobs WHERE key = %s", (key,))
        assert await server.core.blobs.get_bytes(key) == raw
        assert await server.core.blobs.get_range(key, 3, 40) == raw[3:43]
    assert flags == {"ascii": True, "utf-8": True, "latin-1": False, "nul": False,
                     "surrogate": False}


def test_a_limit_past_one_mebibyte_is_refused_at_start():
    """Each kept message is sent to PostgreSQL as a literal twice its size: the limit
    stops where that costs the database more than the store (bench/README)."""
    from agentpost.config import ConfigError
    from agentpost.config.loader import parse_config

    assert parse_config({"storage": {"inline_message_max": "1MiB"}}, "test", environ={}).storage \
        .inline_message_max == 1024 * 1024
    with pytest.raises(ConfigError, match="inline_message_max"):
        parse_config({"storage": {"inline_message_max": "2MiB"}}, "test", environ={})
