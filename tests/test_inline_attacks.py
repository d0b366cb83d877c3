"""Hostile review of issue 12's inline writes (storage.long_text): a message's bytes sent
as ``convert_to('<text>', 'UTF8')`` (LongBytes) and its body read back inside PostgreSQL
by ``ap_blob_text`` (BlobText, migration 0037).

What must hold whatever a sender puts in a message: the blob row holds exactly the bytes
received and the body column exactly the parser's text, through every write path (one
copy, group-commit batches of one, two and several copies mixing tenants and encodings,
IMAP MULTIAPPEND, the submission's Sent copy, prepared statements), in every session
state (client encoding or standard_conforming_strings changed by SQL, a database that is
not UTF-8); and reads (IMAP BODY[] / BODY[TEXT] / partial, API /raw, SEARCH) give back
exactly those bytes and find their text.
"""

from __future__ import annotations

import hashlib
import io
import os

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from agentpost.core.group_commit import GroupCommit
from agentpost.storage.blob_body import body_sql, split_body
from agentpost.storage.blobs import key_for_digest
from agentpost.storage.long_text import (
    BLOB_TEXT_MIN_CHARS,
    BlobText,
    LongBytes,
    LongText,
    blob_text,
)
from tests.helpers import query
from tests.imap_client import Lit, new_inbox, session
from tests.test_group_commit import _wait_pending
from tests.test_mx import _send as _mx_send
from tests.test_smtp_submission import _dsn, _login, _setup, outbox, sub  # noqa: F401

# Characters a careless quoting or a lexer would mangle: quotes, backslashes, what looks
# like SQL, the BOM, line and paragraph separators, noncharacters, the last code point.
_TRICKY = ("it's a \\ back'slash '' \\' E'x' $$ $q$ %s %% '); DROP TABLE blobs; -- "
           "\ufeff\u2028\u2029\ufffe\uffff\U0010ffff h\u00e9llo \U0001f600 \u200b\r\n")
# Bytes no UTF-8 decoder may take: a surrogate, an overlong '/', 0xFF, past U+10FFFF.
_INVALID = b"\xed\xa0\x80 \xc0\xaf \xff \xf4\x90\x80\x80 \xe0\x80\x80 x\r\n"


def _message(to: str, body: bytes, *, subject: str = "probe", charset: str = "utf-8",
             eol: bytes = b"\r\n", extra: bytes = b"") -> bytes:
    head = [b"From: a@example.com", b"To: " + to.encode(), b"Subject: " + subject.encode(),
            b"Message-ID: <" + hashlib.sha256(body + subject.encode()).hexdigest().encode()
            + b"@probe>", b"MIME-Version: 1.0",
            b"Content-Type: text/plain; charset=" + charset.encode(),
            b"Content-Transfer-Encoding: 8bit"]
    return eol.join(head) + eol + extra + eol + body


def _sized(chunk: bytes, size: int, tail: bytes = b"the end marker zqxjkv\r\n") -> bytes:
    """``chunk`` repeated to make ``size`` bytes with ``tail`` last."""
    n = size - len(tail)
    return (chunk * (n // len(chunk) + 1))[:n] + tail


def _expected(raw: bytes) -> tuple[str | None, str | None]:
    """The parser's text and HTML bodies, with the analysis the ingest runs."""
    from agentpost.core.ingest_analysis import analyse_indexed

    parsed, _, _ = analyse_indexed(raw)
    bodies = parsed.text_body, parsed.html_body
    parsed.discard()
    return bodies


def _stored(dsn: str, org_id: str, message_id: str
            ) -> tuple[bytes | None, tuple[str | None, str | None], str]:
    [(data, text, html, key)] = query(
        dsn, f"SELECT b.data, {body_sql('m.')}, m.html_body, m.raw_blob_key FROM messages m "
             "LEFT JOIN blobs b ON b.key = m.raw_blob_key WHERE m.org_id = %s AND m.id = %s",
        (org_id, message_id))
    return (None if data is None else bytes(data)), (text, html), key


def _assert_exact(dsn: str, stored, raw: bytes) -> None:
    data, text, key = _stored(dsn, stored.org_id, stored.message_id)
    if key.startswith("db/"):
        assert data == raw
        assert key == "db/" + key_for_digest(hashlib.sha256(raw).hexdigest())
    assert text == _expected(raw)


def _utf8_probe(to: str, size: int = 255 * 1024, subject: str = "tricky",
                long_line: bool = True) -> bytes:
    """A UTF-8 message of ``size`` bytes with every tricky character, one line 100 KiB
    long (IMAP APPEND takes it, SMTP does not), whose body is the bytes' tail
    (BlobText) and whose bytes go as convert_to."""
    body = _TRICKY.encode() * 50 + (b"L" * 100 * 1024 + b"\r\n" if long_line else b"")
    head = _message(to, b"", subject=subject)
    return head + _sized(body, size - len(head))


# ----------------------------------------------------------------- the adapters alone


_PAYLOADS = {
    "every byte but NUL": bytes(range(1, 256)) * 20,
    "every byte": bytes(range(256)) * 20,
    "tricky utf-8": _TRICKY.encode() * 100,
    "invalid utf-8": _INVALID * 300,
    "quotes only": b"'" * 5000,
    "backslashes and quotes": b"\\'\\\\''\\" * 1000,
}


def _roundtrip_bytes(conn, value: bytes) -> bytes:
    with conn.cursor() as cur:
        cur.execute("SELECT %s::bytea", (LongBytes(value),))
        return bytes(cur.fetchone()[0])


def _check_session(conn) -> None:
    for name, payload in _PAYLOADS.items():
        assert _roundtrip_bytes(conn, payload) == payload, name


@pytest.fixture
def ascii_dsn(pg):
    """A database whose encoding is SQL_ASCII (no validation, no conversion)."""
    name = f"sqlascii_{os.getpid()}"
    admin = psycopg2.connect(pg.dsn())
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0 "
                    "LC_COLLATE 'C' LC_CTYPE 'C'")
    yield pg.dsn(name)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def test_long_bytes_are_exact_in_every_session_state(db_dsn, ascii_dsn):
    """Every byte value round-trips whether the fast literal or the hex fallback is
    taken: UTF-8 session, client_encoding changed by SQL and by psycopg2,
    standard_conforming_strings off, a SQL_ASCII database with a UTF8 or SQL_ASCII
    client."""
    conn = psycopg2.connect(db_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT %s::bytea", (LongBytes(_TRICKY.encode() * 100),))
            assert cur.query.startswith(b"SELECT convert_to('")  # the fast form is real
        _check_session(conn)
        for setting in ("SET client_encoding TO 'LATIN1'", "SET client_encoding TO 'SJIS'",
                        "SET standard_conforming_strings TO off"):
            with conn.cursor() as cur:
                cur.execute("RESET ALL")
                cur.execute(setting)
            _check_session(conn)
        with conn.cursor() as cur:
            cur.execute("RESET ALL")
        conn.set_client_encoding("LATIN1")
        _check_session(conn)
    finally:
        conn.close()
    for client in ("UTF8", "SQL_ASCII"):
        conn = psycopg2.connect(ascii_dsn)
        try:
            conn.set_client_encoding(client)
            _check_session(conn)
        finally:
            conn.close()


def test_blob_text_falls_back_to_the_exact_literal_off_utf8(ascii_dsn):
    """On a database that is not UTF-8 ap_blob_text is never called (convert_from's
    UTF8 would not be the bytes' text there): the body goes as a literal, exactly."""
    body = _TRICKY * (BLOB_TEXT_MIN_CHARS // len(_TRICKY) + 1)
    raw = b"Subject: a\r\n\r\n" + body.encode()
    made = blob_text(body, raw, "db/sha256/ab/cd")
    assert isinstance(made, BlobText)
    conn = psycopg2.connect(ascii_dsn)
    try:
        conn.set_client_encoding("UTF8")
        with conn.cursor() as cur:
            cur.execute("SELECT %s::text, %s::text", (made, LongText(body)))
            assert b"ap_blob_text" not in cur.query
            assert cur.fetchone() == (body, body)
            # storage.blob_body's pair: the body itself and no offset (0040)
            cur.execute("SELECT %s::text, %s::int", split_body(made))
            assert b"ap_blob_text" not in cur.query
            assert cur.fetchone() == (body, None)
    finally:
        conn.close()


def test_blob_text_is_exact_after_client_encoding_changed_by_sql(db_dsn):
    """ap_blob_text reads server-side; the session's client encoding (changed by SQL,
    psycopg2 unaware) must neither change the stored body nor send the fast literals."""
    body = _TRICKY * (BLOB_TEXT_MIN_CHARS // len(_TRICKY) + 1)
    raw = b"Subject: a\r\n\r\n" + body.encode()
    key = "db/" + key_for_digest(hashlib.sha256(raw).hexdigest())
    conn = psycopg2.connect(db_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SET client_encoding TO 'LATIN1'")
            cur.execute("CREATE TEMP TABLE t (n int, b text)")
            cur.execute("INSERT INTO blobs (key, size, refcount, created_at, data) "
                        "VALUES (%s, %s, 1, now(), %s)", (key, len(raw), LongBytes(raw)))
            assert b"convert_to" not in cur.query
            cur.execute("INSERT INTO t VALUES (1, %s)", (blob_text(body, raw, key),))
            assert b"ap_blob_text" in cur.query
            cur.execute("SELECT n, sha256(convert_to(b, 'UTF8')) FROM t ORDER BY n")
            want = hashlib.sha256(body.encode()).digest()
            assert [(n, bytes(h)) for n, h in cur.fetchall()] == [(1, want)]
            cur.execute("SELECT data = %s FROM blobs WHERE key = %s", (raw, key))
            assert cur.fetchone()[0] is True
    finally:
        conn.rollback()
        conn.close()


# ------------------------------------------------------------ through the real doors


def _variants(to: str) -> dict[str, bytes]:
    """Messages whose bytes or body stress one of the two literals or the header end."""
    tricky = _sized(_TRICKY.encode(), 60 * 1024)
    return {
        "tricky utf-8, 255 KiB": _utf8_probe(to),
        "invalid utf-8 declared utf-8": _message(to, _sized(_INVALID, 200 * 1024)),
        "NUL in the body": _message(to, _sized(b"nul \x00 here\r\n", 100 * 1024)),
        "latin-1 8bit": _message(to, _sized("caf\u00e9 'x' \\\r\n".encode("latin-1"),
                                              100 * 1024), charset="iso-8859-1"),
        "html only": _message(to, b"<p>" + tricky + b"</p>\r\n").replace(
            b"text/plain", b"text/html"),
        "utf-8 bytes declared us-ascii": _message(to, tricky, charset="us-ascii"),
        "LF-only": _message(to, tricky.replace(b"\r\n", b"\n"), eol=b"\n"),
        # the header ends at CR CR for a parser that reads bare CR as a line end; the
        # first CRLF CRLF / LF LF the body holds is not the header's end
        "CR-only header end": _message(to, b"", eol=b"\r")
        + _sized(b"para\n\nnext para\r\n\r\n", 40 * 1024),
        # a folded header whose continuation holds only blanks, then LF LF in a header
        "blank folded header": _message(to, tricky, extra=b"X-Fold: a\r\n \r\n\tb\r\n"),
        "LF LF inside the header": _message(to, tricky, extra=b"X-Odd: a\n\nX-More: b\r\n"),
    }


@pytest_twisted.ensureDeferred
async def test_every_variant_is_stored_exactly_on_the_per_copy_path(server, db_dsn):
    """One copy per delivery (the per-copy insert), each statement prepared after its
    first uses: bytes and body exact whatever the sender put in them, and every variant
    delivered twice (the second time over an existing blob row)."""
    inbox, _ = await new_inbox(server, "variants")
    for name, raw in _variants(inbox["email"]).items():
        for _ in range(2):
            [stored] = await server.deliver(raw, [inbox["email"]])
            _assert_exact(db_dsn, stored, raw)
        assert stored.message_id, name
    # the probes reach the paths under attack: a body read from the bytes, and bytes
    # sent as text (UTF-8, no NUL) next to others sent as hex
    probe = _utf8_probe(inbox["email"])
    assert isinstance(blob_text(_expected(probe)[0], probe, "db/sha256/ab/cd"), BlobText)
    html = _variants(inbox["email"])["html only"]
    assert isinstance(blob_text(_expected(html)[1], html, "db/sha256/ab/cd"), BlobText)


@pytest_twisted.ensureDeferred
async def test_reads_give_back_the_exact_bytes_and_search_finds_the_text(server, db_dsn):
    """IMAP BODY[], BODY[TEXT], partial fetches cutting a multibyte character, API /raw
    and IMAP SEARCH BODY/TEXT on a message whose body was read from its bytes."""
    inbox, key = await new_inbox(server, "reads")
    raw = _utf8_probe(inbox["email"])
    [stored] = await server.deliver(raw, [inbox["email"]])
    got = await server.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
    assert got.status == 200 and got.body == raw
    start = raw.index(b"\r\n\r\n") + 4
    cut = raw.index("\U0001f600".encode()) + 1  # inside a 4-byte character

    def fetch(c):
        c.ok("SELECT INBOX")
        whole = c.ok("FETCH 1 (BODY.PEEK[])")[0]
        text = c.ok("FETCH 1 (BODY.PEEK[TEXT])")[0]
        part = c.ok(f"FETCH 1 (BODY.PEEK[]<{cut}.4097>)")[0]
        tail = c.ok(f"FETCH 1 (BODY.PEEK[TEXT]<{len(raw) - start - 30}.1000>)")[0]
        found = [c.ok("UID SEARCH BODY zqxjkv")[0], c.ok("UID SEARCH TEXT \"DROP TABLE\"")[0],
                 c.ok("UID SEARCH CHARSET UTF-8 BODY ", Lit("h\u00e9llo".encode()))[0]]
        return whole, text, part, tail, found

    whole, text, part, tail, found = await session(server.imap_port, inbox["email"], key,
                                                   fetch)
    assert whole.endswith(b"{%d}\r\n" % len(raw) + raw + b")")
    assert text.endswith(raw[start:] + b")")
    assert part.endswith(b"{4097}\r\n" + raw[cut:cut + 4097] + b")")
    assert tail.endswith(b"{30}\r\n" + raw[-30:] + b")")
    uid = whole.split(b"UID ")[1].split()[0] if b"UID " in whole else b"1"
    assert found == [b"* SEARCH " + uid] * 3


@pytest.mark.parametrize("size", [256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 257 * 1024])
@pytest_twisted.ensureDeferred
async def test_the_limit_holds_at_256_kib_and_both_sides_read_back(server, db_dsn, size):
    inbox, key = await new_inbox(server, f"size{size}")
    raw = _utf8_probe(inbox["email"], size)
    assert len(raw) == size
    [stored] = await server.deliver(raw, [inbox["email"]])
    data, text, blob_key = _stored(db_dsn, stored.org_id, stored.message_id)
    assert blob_key.startswith("db/") == (size <= 256 * 1024)
    assert data == (raw if size <= 256 * 1024 else None)
    assert text == _expected(raw)
    got = await server.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
    assert got.status == 200 and got.body == raw


async def _org_target(server, name: str):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    return await server.core.router.resolve(inbox["email"], "a@example.com")


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_of_one_two_and_many_tenants_stay_exact(server, db_dsn):
    """Batches of one copy, two copies, and many copies of three tenants mixing a body
    read from the bytes, hex bytes (NUL, invalid UTF-8), a latin-1 literal, and the same
    bytes twice in one batch: every copy exact, every batch committed whole. Run three
    times so the staging is guessed and every statement executes prepared; the last
    time a guess is stale, so the batch is written again after a rollback."""
    from twisted.internet import task

    a, b, c = [await _org_target(server, n) for n in ("gca", "gcb", "gcc")]
    variants = _variants("x@agents.test")

    async def batch(deliveries, attempts=1, guess=True):
        clock = task.Clock()  # a group commit of its own: nothing in flight before
        gc = GroupCommit(server.core.db, clock, max_batch=32, delay_s=1.0, parallel=1)
        server.core.ingest.group_commit = gc
        pending = [defer.ensureDeferred(server.core.ingest.store(
            targets, io.BytesIO(raw), envelope_from="a@example.com", group=True))
            for targets, raw in deliveries]
        await _wait_pending(gc, len(deliveries))
        clock.advance(1.0)
        results = await defer.gatherResults(pending)
        assert gc.batches == attempts  # one transaction for all, or a stale guess and one
        assert (gc.guessed > 0) == guess  # staged without asking: the lead's blob rows
        for (_, raw), stored in zip(deliveries, results, strict=True):
            for one in stored:
                _assert_exact(db_dsn, one, raw)

    for run in range(3):
        probe = _utf8_probe("x@agents.test", 200 * 1024, subject=f"gc{run}")
        await batch([([a], probe)], guess=run > 0)
        await batch([([a, b], _utf8_probe("x@agents.test", 100 * 1024, f"two{run}"))],
                    guess=run > 0)
        stale = run == 2  # c already holds a reply to the probe: the guess fails
        if stale:
            msgid = probe.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
            await server.deliver(_message(c.email, b"a reply\r\n", subject="re").replace(
                b"MIME-Version", f"References: {msgid}\r\nMIME-Version".encode()), [c.email])
        await batch([([a, b, c], probe), ([c], probe),
                     ([b], variants["invalid utf-8 declared utf-8"]),
                     ([c], variants["NUL in the body"]), ([a], variants["latin-1 8bit"]),
                     ([b, c], variants["LF-only"])], attempts=2 if stale else 1,
                    guess=run > 0)
    # staged again by asking, c's copies joined the thread of the reply it already held
    threads = query(db_dsn, "SELECT DISTINCT thread_id FROM messages WHERE inbox_id = %s "
                            "AND subject IN ('re', 'gc2')", (c.inbox_id,))
    assert len(threads) == 1


@pytest_twisted.ensureDeferred
async def test_multiappend_and_concurrent_tenants_over_one_blob_row(server, db_dsn):
    """MULTIAPPEND of the same bytes twice and a hex message in one command, over bytes
    that already have a blob row (delivered by the MX), while another tenant receives
    the same bytes at the same moment: every copy exact, the row counted once per copy."""
    inbox, key = await new_inbox(server, "multiappend")
    other = await _org_target(server, "concurrent")
    raw = _utf8_probe(inbox["email"])
    hexed = _variants(inbox["email"])["NUL in the body"]
    [first] = await server.deliver(raw, [inbox["email"]])

    def append(cl):
        done = cl.cmd("APPEND INBOX ", Lit(raw, sync=False), " ", Lit(raw, sync=False),
                      " (\\Seen) ", Lit(hexed, sync=False))
        assert done[-1].split(b" ")[1] == b"OK", done
        cl.ok("SELECT INBOX")
        # NUL travels only in a literal8: BINARY[] (BODY[] stands a byte in for it)
        return [*cl.ok("FETCH 2:3 (BODY.PEEK[])"), *cl.ok("FETCH 4 (BINARY.PEEK[])")]

    fetched, theirs = await defer.gatherResults([
        defer.ensureDeferred(session(server.imap_port, inbox["email"], key, append)),
        defer.ensureDeferred(server.core.ingest.store([other], io.BytesIO(raw),
                                                      envelope_from="a@example.com"))])
    assert [f.endswith(b"{%d}\r\n" % len(raw) + raw + b")") for f in fetched[:2]] == [True] * 2
    assert fetched[2].endswith(b"~{%d}\r\n" % len(hexed) + hexed + b")")
    rows = query(db_dsn, "SELECT org_id, id FROM messages WHERE inbox_id = %s OR org_id = %s",
                 (inbox["id"], other.org_id))
    assert len(rows) == 5
    for org_id, message_id in rows:
        data, text, _ = _stored(db_dsn, org_id, message_id)
        assert (data, text) in [(raw, _expected(raw)), (hexed, _expected(hexed))]
    blob = "db/" + key_for_digest(hashlib.sha256(raw).hexdigest())
    assert query(db_dsn, "SELECT refcount FROM blobs WHERE key = %s", (blob,)) == [(4,)]
    assert first.message_id and theirs


def _submit(port: int, sender: str, key: str, raw: bytes) -> dict:
    with _login(port, sender, key) as smtp:
        return smtp.sendmail(sender, ["x@one.example"], raw, mail_options=["BODY=8BITMIME"])


@pytest_twisted.ensureDeferred
async def test_the_sent_copy_of_a_submission_is_exact(sub):  # noqa: F811
    """A 200 KiB UTF-8 message sent through submission: its Sent copy's bytes and body
    (read from the bytes) are exactly what the server kept for it."""
    _, sender, _, _, key = await _setup(sub)
    raw = _utf8_probe("x@one.example", 200 * 1024, long_line=False).replace(b"From: a@example.com",
                                                           b"From: " + sender["email"].encode())
    assert await deferToThread(_submit, sub.submission_port, sender["email"], key, raw) == {}
    [(org_id, message_id)] = query(
        _dsn(sub), "SELECT m.org_id, m.id FROM messages m JOIN folders f ON f.id = m.folder_id "
                   "WHERE m.inbox_id = %s AND f.name = 'Sent'", (sender["id"],))
    data, text, blob_key = _stored(_dsn(sub), org_id, message_id)
    assert blob_key.startswith("db/") and data is not None
    assert data.endswith(raw[raw.index(b"\r\n\r\n"):])  # the server may add headers
    assert text == _expected(data)


@pytest_twisted.ensureDeferred
async def test_a_server_on_a_sql_ascii_database_stores_the_same_bytes(ascii_dsn,
                                                                      openapi_checker):
    """Off UTF-8 both adapters fall back (hex bytes, a literal body): a UTF-8 message, an
    invalid one and a latin-1 one keep their bytes and the parser's text."""
    from agentpost.storage.migrations import migrate
    from tests.conftest import make_config, start_server

    dsn = ascii_dsn + " client_encoding=UTF8"  # what a UTF-8 application asks for
    await deferToThread(migrate, dsn)
    running = await start_server(make_config(dsn), openapi_checker)
    try:
        inbox, key = await new_inbox(running, "ascii")
        variants = _variants(inbox["email"])
        for name in ("tricky utf-8, 255 KiB", "invalid utf-8 declared utf-8", "latin-1 8bit"):
            raw = variants[name]
            [stored] = await running.deliver(raw, [inbox["email"]])
            _assert_exact(dsn, stored, raw)
            got = await running.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
            assert got.status == 200 and got.body == raw, name
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_mx_wire_in_parallel_sessions_stores_every_copy_exactly(server, db_dsn):
    """Real SMTP sessions at once (the MX's group commit batches them) for three tenants:
    the same UTF-8 bytes to all three and again to one, invalid UTF-8 and latin-1 next to
    them; what each copy holds is what its MX kept (its Received line added), exactly."""
    a, b, c = [await _org_target(server, n) for n in ("wirea", "wireb", "wirec")]
    variants = _variants("x@agents.test")
    probe = _utf8_probe("x@agents.test", 250 * 1024, long_line=False)
    sends = [([a.email, b.email, c.email], probe), ([a.email], probe),
             ([b.email], variants["invalid utf-8 declared utf-8"]),
             ([c.email], variants["latin-1 8bit"]),
             ([a.email, c.email], variants["blank folded header"])]
    outcomes = await defer.gatherResults([
        deferToThread(_mx_send, server.mx_port, "s@example.com", rcpts, raw,
                      options=["BODY=8BITMIME"]) for rcpts, raw in sends])
    assert outcomes == [("ok", {})] * len(sends)
    rows = query(db_dsn, "SELECT m.org_id, m.id FROM messages m WHERE m.inbox_id = ANY(%s) "
                         "AND m.subject <> 'prime'", ([a.inbox_id, b.inbox_id, c.inbox_id],))
    assert len(rows) == 8
    bodies = {raw[raw.index(b"\r\n\r\n"):] for _, raw in sends}
    for org_id, message_id in rows:
        data, text, blob_key = _stored(db_dsn, org_id, message_id)
        assert blob_key.startswith("db/") and data is not None
        assert blob_key == "db/" + key_for_digest(hashlib.sha256(data).hexdigest())
        assert any(data.endswith(body) for body in bodies)
        assert text == _expected(data)
