"""Hostile review of migration 0040 (storage.blob_body): a plain body kept only as its
message's own bytes (``text_body`` NULL, ``text_body_at`` the offset).

What an attacker (a sender on the internet, a tenant) would try: bodies at the edges
of the ingest's equality check (the size threshold, BOM, CR-only and LF-only header
ends, 8-bit header bytes, trailing blanks, a body of one CRLF, the inline size limit);
the group-commit batch (3+ copies) next to the per-copy statements, over the MX wire
and across organizations in one transaction; reply/forward quoting a body kept in the
bytes; submission's Sent copies; MULTIAPPEND of drafts; the blob row's lifetime across
COPY, MOVE, EXPUNGE, API delete, inbox delete and two organizations sharing the bytes;
the non-UTF-8 (SQL_ASCII) database; and whether one organization can reach another's
body through the shared blob row. Each test fails if the guarantee it names breaks.
"""

from __future__ import annotations

import hashlib
import re

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from agentpost.storage.blob_body import body_sql
from agentpost.storage.blobs import key_for_digest
from agentpost.storage.long_text import BLOB_TEXT_MIN_CHARS, BlobText, blob_text
from tests.helpers import query
from tests.imap_client import Lit, new_inbox, session
from tests.test_inline_attacks import _TRICKY, _expected, _message, _sized, ascii_dsn  # noqa: F401
from tests.test_mx import _send as _mx_send
from tests.test_smtp_submission import _dsn, _login, _setup, outbox, sub  # noqa: F401


@pytest.fixture
def batches(monkeypatch):
    """How many copies each group-commit batch statement wrote (the batch path taken,
    not the per-copy statements it falls back on)."""
    from agentpost.storage import message_insert

    written: list[int] = []
    real = message_insert.batch_insert_sql

    def counting(copies, channel):
        out = real(copies, channel)
        if out is not None:
            written.append(len(copies))
        return out

    monkeypatch.setattr(message_insert, "batch_insert_sql", counting)
    return written


def _inline_key(raw: bytes) -> str:
    return "db/" + key_for_digest(hashlib.sha256(raw).hexdigest())


def _rep(chunk: bytes, size: int, tail: bytes) -> bytes:
    """``chunk`` whole, repeated to at least ``size`` bytes, then ``tail`` (no character
    cut in two, unlike a truncation)."""
    return chunk * (size // len(chunk) + 1) + tail


def _row(dsn: str, org_id: str, message_id: str) -> tuple[bool, int | None, str | None]:
    """(own text_body stored?, text_body_at, the body as readers compute it)."""
    [row] = query(dsn, f"SELECT text_body IS NOT NULL, text_body_at, {body_sql()} "
                       "FROM messages WHERE org_id = %s AND id = %s", (org_id, message_id))
    return row


def _kept_in_bytes(raw: bytes) -> bool:
    """Whether the ingest's check would keep ``raw``'s body only as its bytes."""
    text = _expected(raw)[0]
    return isinstance(blob_text(text, raw, "db/sha256/ab/cd"), BlobText)


async def _api_text(server, key: str, message_id: str) -> str | None:
    got = await server.api.get(f"/api/v1/messages/{message_id}", key=key)
    assert got.status == 200, got
    return got.json["text_body"]


def _refcounts(dsn: str, key: str) -> tuple[int | None, int]:
    """(the blob row's refcount or None when the row is gone, the rows naming it)."""
    rows = query(dsn, "SELECT refcount FROM blobs WHERE key = %s", (key,))
    [(named,)] = query(
        dsn, "SELECT (SELECT count(*) FROM messages WHERE raw_blob_key = %s) "
             "+ (SELECT count(*) FROM attachments WHERE blob_key = %s)", (key, key))
    return (rows[0][0] if rows else None), named


# ------------------------------------------------------------------ bodies at the edges


def _edge_bodies(to: str) -> dict[str, tuple[bytes, bool | None]]:
    """name -> (message, whether its body must be kept only in its bytes; None: either,
    the parser decides -- what is read back must still be the parser's text)."""
    marker = "edgemarker{}"
    ascii_line = b"plain line of text for the threshold probe\r\n"

    def exact_chars(n: int, tail: bytes) -> bytes:
        # ``n`` characters in all, ``tail`` last (ASCII: characters are bytes)
        return _sized(ascii_line, n, tail)

    multibyte = ("h\u00e9llo w\u00f6rld \u20ac \U0001f600 ".encode() * 2000)
    return {
        "exactly the threshold": (_message(to, exact_chars(
            BLOB_TEXT_MIN_CHARS, marker.format("a").encode() + b"\r\n"),
            subject="min"), True),
        "one under the threshold": (_message(to, exact_chars(
            BLOB_TEXT_MIN_CHARS - 1, marker.format("b").encode() + b"\r\n"),
            subject="min-1"), False),
        "multibyte (fewer chars than octets)": (_message(
            to, multibyte + marker.format("c").encode() + b"\r\n", subject="mb"), True),
        "BOM first": (_message(to, "\ufeff".encode() + _sized(
            _TRICKY.encode(), 40 * 1024, marker.format("d").encode() + b"\r\n"),
            subject="bom"), None),
        "trailing blanks": (_message(to, _sized(
            ascii_line, 30 * 1024, marker.format("e").encode() + b" \t\r\n\r\n \r\n\t\t"),
            subject="trail"), None),
        "only CRLF": (_message(to, b"\r\n", subject="crlf"), False),
        "8-bit latin-1 header, UTF-8 body": (_message(to, _sized(
            _TRICKY.encode(), 40 * 1024, marker.format("f").encode() + b"\r\n"),
            subject="latinhead", extra=b"X-Latin: caf\xe9 na\xefve\r\n"), None),
        "LF-only everywhere": (_message(to, _sized(
            b"lf only line\n", 30 * 1024, marker.format("g").encode() + b"\n"),
            subject="lf", eol=b"\n"), None),
        "LF-only header, CRLF body": (_message(to, _sized(
            ascii_line, 30 * 1024, marker.format("h").encode() + b"\r\n"),
            subject="lfcrlf", eol=b"\n"), None),
        "CR-only header end": (_message(to, b"", eol=b"\r", subject="cr") + _sized(
            b"para\n\nnext para\r\n\r\n", 40 * 1024, marker.format("i").encode() + b"\r\n"),
            None),
        "CRLF CRLF opens the body": (_message(to, b"\r\n\r\n" + _sized(
            ascii_line, 30 * 1024, marker.format("j").encode() + b"\r\n"),
            subject="blankfirst"), None),
    }


@pytest_twisted.ensureDeferred
async def test_bodies_at_the_edges_read_back_exactly_everywhere(server, db_dsn):
    """Every edge body: the API and the rows' body expression give the parser's text,
    the offset is kept exactly when the ingest's check says so (the threshold itself
    included, one character under excluded), and IMAP SEARCH finds the body's last
    word, once per copy, for both the first delivery and a second one of the same
    bytes over the existing blob row."""
    inbox, key = await new_inbox(server, "edges")
    variants = _edge_bodies(inbox["email"])
    markers = {}
    for name, (raw, must) in variants.items():
        kept = _kept_in_bytes(raw)
        if must is not None:
            assert kept == must, name  # the probe reaches the path it is meant for
        text = _expected(raw)[0]
        for _ in range(2):
            [stored] = await server.deliver(raw, [inbox["email"]])
            own, at, body = _row(db_dsn, stored.org_id, stored.message_id)
            assert body == text, name
            assert (at is not None) == kept and own == (not kept and text is not None), name
            assert await _api_text(server, key, stored.message_id) == text, name
        found = re.search(rb"edgemarker[a-z]", raw)
        markers[name] = found.group().decode() if found else None

    def search(c):
        c.ok("SELECT INBOX")
        return {name: c.ok(f"UID SEARCH BODY {marker}")[0]
                for name, marker in markers.items() if marker}

    found = await session(server.imap_port, inbox["email"], key, search)
    assert len(found) == len(variants) - 1  # all but the body of one CRLF
    for name, line in found.items():
        assert len(line.split()) == 4, (name, line)  # "* SEARCH u1 u2"


@pytest.mark.parametrize("size", [256 * 1024, 256 * 1024 + 1])
@pytest_twisted.ensureDeferred
async def test_the_inline_limit_decides_where_the_body_lives(server, db_dsn, size):
    """At storage.inline_message_max (256 KiB) the body is kept only in the bytes; one
    byte over, the bytes go to the blob store and the row keeps its own body; both read
    back exactly through the API and SEARCH."""
    inbox, key = await new_inbox(server, f"limit{size}")
    raw = _message(inbox["email"], b"")
    raw += _sized(b"limit probe line\r\n", size - len(raw), b"limitzqx\r\n")
    assert len(raw) == size
    [stored] = await server.deliver(raw, [inbox["email"]])
    own, at, body = _row(db_dsn, stored.org_id, stored.message_id)
    text = _expected(raw)[0]
    assert body == text and await _api_text(server, key, stored.message_id) == text
    inline = size <= 256 * 1024
    assert (at is not None, own) == (inline, not inline)

    def search(c):
        c.ok("SELECT INBOX")
        return c.ok("UID SEARCH BODY limitzqx")[0]

    assert await session(server.imap_port, inbox["email"], key, search) == b"* SEARCH 1"


# ----------------------------------------------------- batches, the wire, organizations


@pytest_twisted.ensureDeferred
async def test_one_smtp_transaction_to_three_organizations_batches_and_isolates(
        server, db_dsn, batches):
    """One MX transaction to inboxes of three organizations (a group-commit batch of
    three copies, the batch statement): each copy keeps the offset and reads back the
    body; no organization's key reads another's copy, and no organization's SEARCH
    finds a word that only another organization's message holds, though both messages'
    bodies live in blob rows side by side."""
    orgs = [await new_inbox(server, f"wire{n}") for n in range(3)]
    emails = [inbox["email"] for inbox, _ in orgs]
    raw = _message(", ".join(emails), _rep(_TRICKY.encode(), 60 * 1024,
                                             b"sharedwordqq\r\n"), subject="wire")
    secret = _message(emails[0], _sized(b"private text\r\n", 40 * 1024,
                                        b"onlyfororgzeroqq\r\n"), subject="secret")
    outcome = await deferToThread(_mx_send, server.mx_port, "s@example.com", emails, raw,
                                  options=["BODY=8BITMIME"])
    assert outcome == ("ok", {})
    assert batches == [3]  # the batch statement wrote the three copies
    await server.deliver(secret, [emails[0]])
    copies = []
    for inbox, _key in orgs:
        rows = query(db_dsn, "SELECT org_id, id FROM messages WHERE inbox_id = %s "
                             "AND subject = 'wire'", (inbox["id"],))
        assert len(rows) == 1
        copies.append(rows[0])
    [(data,)] = query(db_dsn, "SELECT b.data FROM messages m JOIN blobs b "
                              "ON b.key = m.raw_blob_key WHERE m.org_id = %s AND m.id = %s",
                      copies[0])
    text = _expected(bytes(data))[0]  # what the MX kept (its Received line added)
    for (org_id, message_id), (_, key) in zip(copies, orgs, strict=True):
        own, at, body = _row(db_dsn, org_id, message_id)
        assert not own and at is not None and body == text
        assert await _api_text(server, key, message_id) == text
    for n, (_, key) in enumerate(orgs):
        for m, (_, message_id) in enumerate(copies):
            if m != n:
                got = await server.api.get(f"/api/v1/messages/{message_id}", key=key)
                assert got.status == 404

    async def search(n):
        inbox, key = orgs[n]

        def run(c):
            c.ok("SELECT INBOX")
            return [c.ok("UID SEARCH BODY onlyfororgzeroqq")[0],
                    c.ok("UID SEARCH TEXT sharedwordqq")[0]]

        return await session(server.imap_port, inbox["email"], key, run)

    assert await search(0) == [b"* SEARCH 2", b"* SEARCH 1"]
    for n in (1, 2):
        assert await search(n) == [b"* SEARCH", b"* SEARCH 1"]


# ---------------------------------------------------------- reply, forward, submission


@pytest_twisted.ensureDeferred
async def test_reply_and_forward_quote_a_body_kept_in_its_bytes(sub):  # noqa: F811
    """A reply with ``quote`` and a forward of a message whose row stores no body:
    both carry the original's text (the API's answer and the Sent copy as stored)."""
    _, sender, _, _, key = await _setup(sub)
    dsn = _dsn(sub)
    raw = _message(sender["email"], _sized(b"the original words\r\n", 30 * 1024,
                                           b"quotedtailmarker\r\n"), subject="orig")
    [orig] = await sub.deliver(raw, [sender["email"]])
    own, at, _ = _row(dsn, orig.org_id, orig.message_id)
    assert not own and at is not None
    for path, body in (("reply", {"text_body": "Thanks.", "quote": True}),
                       ("forward", {"to": "dave@remote.example", "text_body": "FYI"})):
        resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/{path}", body,
                                  key=key)
        assert resp.status == 201, resp
        assert "quotedtailmarker" in (resp.json["text_body"] or ""), path
        assert "the original words" in resp.json["text_body"], path
        stored = await _api_text(sub, key, resp.json["id"])
        assert stored is not None and "quotedtailmarker" in stored, path


@pytest_twisted.ensureDeferred
async def test_a_submitted_message_s_sent_copy_keeps_the_offset(sub):  # noqa: F811
    """Port 587: the Sent copy of a long plain message keeps its body only in its bytes
    and reads back exactly (API, SEARCH in Sent); the queue's reference to the same
    blob row is counted besides the copy's."""
    _, sender, _, _, key = await _setup(sub)
    dsn = _dsn(sub)
    raw = _message("x@one.example", _sized(b"submitted line\r\n", 40 * 1024,
                                           b"submittedmarker\r\n"), subject="sub")
    raw = raw.replace(b"From: a@example.com", b"From: " + sender["email"].encode())

    def submit():
        with _login(sub.submission_port, sender["email"], key) as smtp:
            return smtp.sendmail(sender["email"], ["x@one.example"], raw,
                                 mail_options=["BODY=8BITMIME"])

    assert await deferToThread(submit) == {}
    [(org_id, message_id, blob)] = query(
        dsn, "SELECT m.org_id, m.id, m.raw_blob_key FROM messages m JOIN folders f "
             "ON f.id = m.folder_id WHERE m.inbox_id = %s AND f.name = 'Sent'",
        (sender["id"],))
    [(data,)] = query(dsn, "SELECT data FROM blobs WHERE key = %s", (blob,))
    text = _expected(bytes(data))[0]
    own, at, body = _row(dsn, org_id, message_id)
    assert not own and at is not None and body == text
    assert await _api_text(sub, key, message_id) == text

    def search(c):
        c.ok("SELECT Sent")
        return c.ok("UID SEARCH BODY submittedmarker")[0]

    assert await session(sub.imap_port, sender["email"], key, search) == b"* SEARCH 1"
    refcount, named = _refcounts(dsn, blob)
    [(queued,)] = query(dsn, "SELECT count(*) FROM outbound_queue WHERE raw_blob_key = %s "
                             "AND status <> 'done'", (blob,))
    assert refcount is not None and refcount >= named + queued


# ------------------------------------------------------------------------- drafts


@pytest_twisted.ensureDeferred
async def test_multiappend_of_the_same_draft_twice_adopts_both_with_bodies(server, db_dsn):
    """MULTIAPPEND of the same long draft twice into Drafts (one blob row, two copies
    with the offset): the drafts API adopts both and reads each body whole."""
    inbox, key = await new_inbox(server, "multidraft")
    raw = _message("bob@example.com", _rep(_TRICKY.encode(), 30 * 1024,
                                             b"draftmarker\r\n"), subject="twice")
    raw = raw.replace(b"From: a@example.com", b"From: " + inbox["email"].encode())
    assert _kept_in_bytes(raw)

    def append(c):
        done = c.cmd("APPEND Drafts (\\Draft) ", Lit(raw, sync=False), " (\\Draft) ",
                     Lit(raw, sync=False))
        assert done[-1].split(b" ")[1] == b"OK", done

    await session(server.imap_port, inbox["email"], key, append)
    rows = query(db_dsn, "SELECT text_body IS NULL, text_body_at IS NOT NULL FROM messages "
                         "WHERE inbox_id = %s", (inbox["id"],))
    assert rows == [(True, True)] * 2
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/drafts",
                                   key=key)).json["data"]
    assert len(listed) == 2
    text = _expected(raw)[0]
    for draft in listed:
        full = (await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)).json
        assert full["text_body"] == text


# ------------------------------------------------------------------ the blob's lifetime


@pytest_twisted.ensureDeferred
async def test_the_blob_row_lives_while_any_copy_names_it(server, db_dsn):
    """The same bytes delivered to two organizations, APPENDed twice, COPYed, MOVEd,
    EXPUNGEd, deleted through the API and with a whole inbox: after every step the
    blob row's refcount is exactly the rows naming it, and every copy left reads its
    body; the row goes only with the last copy. A refcount below the copies would let
    a collector (or the last release) take bytes a row's body still needs."""
    a_inbox, a_key = await new_inbox(server, "life-a")
    b_inbox, b_key = await new_inbox(server, "life-b")
    raw = _message(f"{a_inbox['email']}, {b_inbox['email']}",
                   _sized(b"lifetime body line\r\n", 30 * 1024, b"lifetimemarker\r\n"),
                   subject="life")
    blob = _inline_key(raw)
    text = _expected(raw)[0]

    def consistent():
        refcount, named = _refcounts(db_dsn, blob)
        assert refcount == (named or None), (refcount, named)
        rows = query(db_dsn, f"SELECT {body_sql()}, text_body_at FROM messages "
                             "WHERE raw_blob_key = %s", (blob,))
        assert all(body == text and at is not None for body, at in rows), rows
        return named

    a_copy, b_copy = await server.deliver(raw, [a_inbox["email"], b_inbox["email"]])
    assert consistent() == 2

    def append_copy_move_expunge(c):
        c.append("INBOX", raw)
        c.append("INBOX", raw)
        c.ok('CREATE "Keep"')
        c.ok("SELECT INBOX")
        c.ok('UID COPY 1:* "Keep"')
        c.ok('UID MOVE 2 "Keep"')
        c.ok("UID STORE 3 +FLAGS.SILENT (\\Deleted)")
        c.ok("UID EXPUNGE 3")

    await session(server.imap_port, a_inbox["email"], a_key, append_copy_move_expunge)
    # INBOX: uid 1 (delivered); Keep: 3 copies + the moved one
    assert consistent() == 1 + 1 + 4
    gone = await server.api.delete(f"/api/v1/messages/{a_copy.message_id}", key=a_key)
    assert gone.status in (200, 204)
    assert consistent() == 1 + 4
    gone = await server.api.delete(f"/api/v1/inboxes/{a_inbox['id']}", key=a_key)
    assert gone.status in (200, 204), gone
    assert consistent() == 1
    assert await _api_text(server, b_key, b_copy.message_id) == text

    def search(c):
        c.ok("SELECT INBOX")
        return c.ok("UID SEARCH BODY lifetimemarker")[0]

    assert await session(server.imap_port, b_inbox["email"], b_key, search) == b"* SEARCH 1"
    gone = await server.api.delete(f"/api/v1/messages/{b_copy.message_id}", key=b_key)
    assert gone.status in (200, 204)
    assert consistent() == 0
    assert query(db_dsn, "SELECT 1 FROM blobs WHERE key = %s", (blob,)) == []


def test_the_database_refuses_an_offset_the_bytes_do_not_hold(db_dsn, server):
    """ap_blob_text_at refuses an offset/length the blob row does not hold (never a
    silent NULL body), and the CHECK refuses a row that keeps both a body and an
    offset; ap_body_text of a key no row has is NULL, not another row's bytes."""
    conn = psycopg2.connect(db_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO blobs (key, size, refcount, created_at, data) "
                        "VALUES ('db/probe-offset', 10, 1, now(), 'head\r\n\r\nab'::bytea)")
            cur.execute("SELECT ap_blob_text_at('db/probe-offset', 8, 2), "
                        "ap_body_text('db/probe-offset', 8), "
                        "ap_body_text('db/probe-absent', 0)")
            assert cur.fetchone() == (8, "ab", None)
        for args in ("8, 3", "7, 2", "-1, 11", "0, 9"):
            with pytest.raises(psycopg2.errors.RaiseException), conn, conn.cursor() as cur:
                cur.execute(f"SELECT ap_blob_text_at('db/probe-offset', {args})")
        with pytest.raises(psycopg2.errors.RaiseException), conn, conn.cursor() as cur:
            cur.execute("SELECT ap_blob_text_at('db/probe-absent', 0, 0)")
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                        "WHERE conname = 'messages_text_body_at'")
            [(check,)] = cur.fetchall()
            assert "text_body IS NULL" in check
    finally:
        with conn, conn.cursor() as cur:
            cur.execute("DELETE FROM blobs WHERE key = 'db/probe-offset'")
        conn.close()


# -------------------------------------------------------------------- SQL_ASCII


@pytest_twisted.ensureDeferred
async def test_a_sql_ascii_database_keeps_the_literal_on_every_path(
        ascii_dsn, openapi_checker, batches):  # noqa: F811
    """Off UTF-8 no row keeps an offset (convert_from would not give the same text
    back): the per-copy path, a batch of three copies, IMAP COPY, MULTIAPPEND: each
    row stores the parser's text itself, and the API and SEARCH read it.

    BUG at 481eab0 (this test fails): the group-commit batch's ``text_body_at`` array
    (storage.message_batch, ``%s::int[]``) holds :class:`blob_body._BodyAt` values,
    which off UTF-8 render as a bare ``NULL``; psycopg2 then sends ``ARRAY[NULL,NULL,
    NULL]`` -- typed text[] -- and once the statement is prepared (storage.prepared)
    ``EXECUTE`` refuses it: "parameter $3 of type text[] cannot be coerced to the
    expected type integer[]". Every MX transaction of three or more copies with a long
    plain body is answered 451, every retry too. Fix: ``_QuotedBodyAt.getquoted``
    returns ``b"NULL::integer"`` off UTF-8 (verified: this test then passes)."""
    from agentpost.storage.migrations import migrate
    from tests.conftest import make_config, start_server

    dsn = ascii_dsn + " client_encoding=UTF8"
    await deferToThread(migrate, dsn)
    running = await start_server(make_config(dsn), openapi_checker)
    try:
        inboxes = [await new_inbox(running, f"asc{n}") for n in range(3)]
        emails = [inbox["email"] for inbox, _ in inboxes]
        raw = _message(", ".join(emails), _rep(_TRICKY.encode(), 40 * 1024,
                                                 b"asciimarker\r\n"), subject="ascii")
        assert _kept_in_bytes(raw)
        text = _expected(raw)[0]
        single = await running.deliver(raw, emails[:1])  # per copy
        # three copies in one MX transaction: the group commit's batch statement
        outcome = await deferToThread(_mx_send, running.mx_port, "s@example.com", emails,
                                      raw, options=["BODY=8BITMIME"])
        assert outcome == ("ok", {}) and batches == [3]
        batch = query(dsn, "SELECT org_id, id, inbox_id FROM messages WHERE subject = 'ascii'"
                           " AND id <> %s", (single[0].message_id,))
        assert len(single) == 1 and len(batch) == 3
        inbox, key = inboxes[0]

        def work(c):
            c.append("INBOX", raw)
            c.append("INBOX", raw)
            c.ok("SELECT INBOX")
            c.ok('CREATE "Keep"')
            c.ok('UID COPY 1:* "Keep"')
            c.ok('SELECT "Keep"')
            return c.ok("UID SEARCH BODY asciimarker")[0]

        found = await session(running.imap_port, inbox["email"], key, work)
        assert found == b"* SEARCH 1 2 3 4"
        rows = query(dsn, "SELECT id, text_body, text_body_at FROM messages "
                          "WHERE subject = 'ascii'")
        assert len(rows) == 1 + 3 + 2 + 4
        assert all(body == text and at is None for _, body, at in rows)
        copies = [(c.message_id, c.inbox_id) for c in single] + [(m, i) for _, m, i in batch]
        for message_id, inbox_id in copies:
            key = next(k for i, k in inboxes if i["id"] == inbox_id)
            assert await _api_text(running, key, message_id) == text
    finally:
        await running.service.stopService()


# ------------------------------------------------------------ concurrency on one row


@pytest_twisted.ensureDeferred
async def test_delete_racing_a_new_delivery_of_the_same_bytes(server, db_dsn):
    """One organization deletes its only copy (the blob row's last reference) while
    another receives the same bytes: whichever commits first, the new copy's body reads
    back and the refcount matches the rows."""
    a_inbox, a_key = await new_inbox(server, "race-a")
    b_inbox, b_key = await new_inbox(server, "race-b")
    for n in range(4):
        raw = _message(f"{a_inbox['email']}, {b_inbox['email']}",
                       _sized(b"race body line\r\n", 20 * 1024, b"racemarker%d\r\n" % n),
                       subject=f"race{n}")
        [a_copy] = await server.deliver(raw, [a_inbox["email"]])
        results = await defer.gatherResults([
            defer.ensureDeferred(server.api.delete(f"/api/v1/messages/{a_copy.message_id}",
                                                   key=a_key)),
            defer.ensureDeferred(server.deliver(raw, [b_inbox["email"]]))])
        assert results[0].status in (200, 204)
        [b_copy] = results[1]
        assert await _api_text(server, b_key, b_copy.message_id) == _expected(raw)[0]
        refcount, named = _refcounts(db_dsn, _inline_key(raw))
        assert refcount == named == 1


# ------------------------------------------------- the other readers of one message


@pytest_twisted.ensureDeferred
async def test_changing_a_message_answers_with_its_body(server, db_dsn):
    """PATCH (read/unread) and labels add/remove read the row FOR UPDATE and answer
    with the message: the body kept in the bytes comes back in each answer, and the
    row still stores no body of its own afterwards."""
    inbox, key = await new_inbox(server, "patchbody")
    raw = _message(inbox["email"], _rep(_TRICKY.encode(), 30 * 1024, b"patchmarker\r\n"),
                   subject="patch")
    [stored] = await server.deliver(raw, [inbox["email"]])
    text = _expected(raw)[0]
    path = f"/api/v1/messages/{stored.message_id}"
    answers = [await server.api.patch(path, {"read": True}, key=key),
               await server.api.post(path + "/labels", {"labels": ["keep"]}, key=key),
               await server.api.request("DELETE", path + "/labels", json_body={"labels": ["keep"]},
                                      key=key),
               await server.api.patch(path, {"read": False}, key=key)]
    for answer in answers:
        assert answer.status == 200, answer
        assert answer.json["text_body"] == text
    own, at, body = _row(db_dsn, stored.org_id, stored.message_id)
    assert not own and at is not None and body == text


@pytest_twisted.ensureDeferred
async def test_imap_thread_and_sort_with_body_criteria(server, db_dsn):
    """THREAD and SORT take the same search keys as SEARCH: BODY, TEXT and NOT BODY over
    rows whose body is kept in the bytes pick exactly the messages holding the word."""
    inbox, key = await new_inbox(server, "threadbody")
    for n, word in enumerate(["alphaword", "betaword", "alphaword"]):
        raw = _message(inbox["email"], _rep(b"thread filler\r\n", 20 * 1024,
                                            f"{word} {n}\r\n".encode()), subject=f"t{n}")
        await server.deliver(raw, [inbox["email"]])
    rows = query(db_dsn, "SELECT text_body_at IS NOT NULL FROM messages WHERE inbox_id = %s",
                 (inbox["id"],))
    assert rows == [(True,)] * 3

    def run(c):
        c.ok("SELECT INBOX")
        return [c.ok("UID THREAD REFERENCES UTF-8 BODY alphaword")[0],
                c.ok("UID SORT (SUBJECT) UTF-8 TEXT betaword")[0],
                c.ok("UID SORT (REVERSE ARRIVAL) UTF-8 NOT BODY betaword")[0]]

    found = await session(server.imap_port, inbox["email"], key, run)
    assert found[0] == b"* THREAD (1)(3)"
    assert found[1] == b"* SORT 2"
    assert found[2] == b"* SORT 3 1"


@pytest_twisted.ensureDeferred
async def test_an_html_only_body_keeps_no_offset_and_reads_back(server, db_dsn):
    """A long single-part text/html message whose HTML is its bytes' tail: no text body,
    no offset (text_body_at is for the text body alone), and the HTML reads back whole
    through the API and SEARCH."""
    inbox, key = await new_inbox(server, "htmlonly")
    raw = _message(inbox["email"], b"<p>" + _rep(_TRICKY.encode(), 30 * 1024,
                                                 b"htmlmarker</p>\r\n"),
                   subject="html").replace(b"text/plain", b"text/html")
    assert isinstance(blob_text(_expected(raw)[1], raw, "db/sha256/ab/cd"), BlobText)
    [stored] = await server.deliver(raw, [inbox["email"]])
    [(text_body, at, html)] = query(db_dsn, "SELECT text_body, text_body_at, html_body "
                                            "FROM messages WHERE id = %s",
                                    (stored.message_id,))
    assert (text_body, at, html) == (None, None, _expected(raw)[1])
    got = (await server.api.get(f"/api/v1/messages/{stored.message_id}", key=key)).json
    assert got["text_body"] is None and got["html_body"] == _expected(raw)[1]

    def search(c):
        c.ok("SELECT INBOX")
        return c.ok("UID SEARCH BODY htmlmarker")[0]

    assert await session(server.imap_port, inbox["email"], key, search) == b"* SEARCH 1"
