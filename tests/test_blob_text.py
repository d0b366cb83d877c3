"""Issue 12: a plain body kept in PostgreSQL is read there from the message's own bytes
(storage.long_text.BlobText, migration 0037) instead of being sent a second time, and
since migration 0040 (storage.blob_body) is not stored a second time either: the row
keeps ``text_body_at``, checked by ``ap_blob_text_at`` when written.

What must hold: the stored body is the text the parser made, character for character,
through every write path (one copy, a group-commit batch of one and of several copies,
IMAP APPEND); the body goes as a literal whenever it is not exactly the UTF-8 tail of
the bytes (other charsets, transfer encodings, multipart, NUL); and the server-side
function fails loudly instead of storing NULL when it is asked for bytes that are not
there.
"""

from __future__ import annotations

import io

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor

from agentpost.core.group_commit import GroupCommit
from agentpost.storage.blob_body import body_sql
from agentpost.storage.long_text import BLOB_TEXT_MIN_CHARS, BlobText, blob_text
from agentpost.storage.pgconn import Cursor
from tests.helpers import query
from tests.imap_client import new_inbox, session
from tests.mailfactory import make_message

_CALL = "ap_blob_text('db/"
_CALL_AT = "ap_blob_text_at('db/"


@pytest.fixture
def sent(monkeypatch):
    """Every statement as it went to PostgreSQL, values quoted in (psycopg2's
    ``cursor.query``), decoded."""
    out: list[str] = []
    original = Cursor.execute

    def spy(self, query, vars=None):
        result = original(self, query, vars)
        if self.query is not None:
            out.append(self.query.decode("utf-8", "replace"))
        return result

    monkeypatch.setattr(Cursor, "execute", spy)
    return out


def _lines(marker: str, chars: int = 3 * BLOB_TEXT_MIN_CHARS) -> str:
    line = f"{marker} it's a line with a quote, a backslash \\ and 'more'\n"
    return line * (chars // len(line) + 1)


def _stored_body(db_dsn: str, stored) -> tuple[str | None, str | None]:
    """The text body as readers read it (storage.blob_body.body_sql), and the HTML."""
    [row] = query(db_dsn, f"SELECT {body_sql()}, html_body FROM messages "
                          "WHERE org_id = %s AND id = %s", (stored.org_id, stored.message_id))
    return row


def _kept(db_dsn: str, stored) -> tuple[bool, int | None]:
    """Whether the row holds a text_body of its own, and its text_body_at."""
    [row] = query(db_dsn, "SELECT text_body IS NOT NULL, text_body_at FROM messages "
                          "WHERE org_id = %s AND id = %s", (stored.org_id, stored.message_id))
    return row


def _expected(raw: bytes) -> str:
    """The parser's text body, with the same analysis the ingest runs."""
    from agentpost.core.ingest_analysis import analyse_indexed

    parsed, _, _ = analyse_indexed(raw)
    text = parsed.text_body
    parsed.discard()
    assert text is not None
    return text


def _mentions(sent, text: str) -> int:
    """Statements that carry ``text`` (a line of a body) as a literal."""
    return sum(text.replace("'", "''") in m for m in sent)


async def _group_store(server, emails: list[str], raw: bytes):
    targets = [await server.core.router.resolve(e, "a@example.com") for e in emails]
    return await server.core.ingest.store(targets, io.BytesIO(raw),
                                          envelope_from="a@example.com", group=True)


@pytest_twisted.ensureDeferred
async def test_a_plain_body_is_read_from_the_bytes_and_stored_exactly(server, db_dsn, sent):
    inbox, _ = await new_inbox(server, "blobtext")
    body = _lines("plain") + "the last line, it's past the preview\n"
    raw = make_message(to=inbox["email"], subject="plain", body=body)
    [stored] = await server.deliver(raw, [inbox["email"]])
    assert _stored_body(db_dsn, stored) == (_expected(raw), None)
    assert _kept(db_dsn, stored) == (False, raw.index(b"\r\n\r\n") + 4)
    assert sum(_CALL_AT in m for m in sent) == 1
    assert not any(_CALL in m for m in sent)
    # the body's text went once: inside the message's bytes, not again as the body
    assert _mentions(sent, "the last line, it's past the preview") == 1


@pytest_twisted.ensureDeferred
async def test_utf8_bodies_are_exact_in_batches_of_one_and_of_several(server, db_dsn, sent):
    _, key = await server.new_org()
    names = ["bt-one", "bt-two", "bt-three"]
    inboxes = [(await server.api.post("/api/v1/inboxes", {"username": n}, key=key)).json
               for n in names]
    server.core.ingest.group_commit = GroupCommit(server.core.db, reactor, max_batch=16,
                                                  parallel=2)
    body = _lines("héllo wörld 😀 ✓")
    raw = make_message(to=inboxes[0]["email"], subject="utf-8", body=body)
    assert b"8bit" in raw or b"base64" not in raw.split(b"\r\n\r\n")[0]
    expected = _expected(raw)
    [alone] = await _group_store(server, [inboxes[0]["email"]], raw)
    several = await _group_store(server, [i["email"] for i in inboxes], raw)
    for stored in [alone, *several]:
        assert _stored_body(db_dsn, stored) == (expected, None)
        assert _kept(db_dsn, stored) == (False, raw.index(b"\r\n\r\n") + 4)
    calls = [m for m in sent if _CALL_AT in m]
    assert len(calls) >= 2  # the lone copy's write and the batch's
    # the batch of three: one statement for all copies, the offsets in its int[]
    assert any(m.count("ARRAY[ap_blob_text_at(") == 1 and m.count(_CALL_AT) == 3
               for m in calls)


@pytest.mark.parametrize("shape", ["latin-1", "quoted-printable", "html-alternative",
                                   "short"])
@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_the_utf8_tail_goes_as_a_literal(server, db_dsn, sent,
                                                                  shape):
    inbox, _ = await new_inbox(server, "bt" + shape.replace("-", "")[:12])
    text = _lines("literal")
    if shape == "latin-1":
        head = (f"From: a@example.com\r\nTo: {inbox['email']}\r\nSubject: latin\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n")
        raw = head.encode() + ("caf\u00e9 " + text).replace("\n", "\r\n").encode("latin-1")
    elif shape == "quoted-printable":
        raw = make_message(to=inbox["email"], body=("=" * 80 + "\n") + text)
        assert b"quoted-printable" in raw
    elif shape == "html-alternative":
        raw = make_message(to=inbox["email"], body=text, html="<p>" + text + "</p>")
    else:
        raw = make_message(to=inbox["email"], body="short\n" * 10)
    [stored] = await server.deliver(raw, [inbox["email"]])
    assert _stored_body(db_dsn, stored)[0] == _expected(raw)
    assert _kept(db_dsn, stored) == (True, None)
    assert not any(_CALL in m or _CALL_AT in m for m in sent)
    # and a row may not claim both (migration 0040's CHECK)
    with pytest.raises(psycopg2.errors.CheckViolation):
        query(db_dsn, "UPDATE messages SET text_body_at = 0 WHERE org_id = %s AND id = %s",
              (stored.org_id, stored.message_id))


@pytest_twisted.ensureDeferred
async def test_imap_append_reads_the_body_from_the_bytes_too(server, db_dsn, sent):
    inbox, key = await new_inbox(server, "btappend")
    raw = make_message(to=inbox["email"], subject="appended", body=_lines("append"))

    def append(c):
        c.append("INBOX", raw)
        c.ok("SELECT INBOX")
        return c.ok("FETCH 1 (BODY.PEEK[TEXT])")[0]

    fetched = await session(server.imap_port, inbox["email"], key, append)
    assert fetched.endswith(raw[raw.index(b"\r\n\r\n") + 4:] + b")")
    [(text, own)] = query(db_dsn, f"SELECT {body_sql()}, text_body IS NOT NULL "
                                  "FROM messages WHERE inbox_id = %s", (inbox["id"],))
    assert text == _expected(raw) and not own
    assert any(_CALL_AT in m for m in sent)


_INSERT_BLOB = ("INSERT INTO blobs (key, size, refcount, created_at, data) "
                "VALUES (%s, %s, 0, now(), %s)")


def _refused(cur, sql: str, params: tuple = ()) -> None:
    cur.execute("SAVEPOINT s")
    with pytest.raises(psycopg2.errors.RaiseException, match="holds no text"):
        cur.execute(sql, params)
    cur.execute("ROLLBACK TO SAVEPOINT s")


@pytest.mark.parametrize("fn", ["ap_blob_text", "ap_blob_text_at"])
def test_the_checks_refuse_what_is_not_there(db_dsn, fn):
    """ap_blob_text (0037) and ap_blob_text_at (0040, the length from the TOAST header,
    no decompression) refuse a missing blob and any part that is not the whole tail:
    never a silent NULL. ap_body_text reads exactly the tail."""
    conn = psycopg2.connect(db_dsn)
    try:
        cur = conn.cursor()
        _refused(cur, f"SELECT {fn}('db/sha256/00/none', 0, 5)")
        cur.execute(_INSERT_BLOB, ("db/sha256/bt/good", 10, b"head\r\n\r\nab"))
        cur.execute(_INSERT_BLOB, ("db/sha256/bt/nul", 11, b"head\r\n\r\nab\x00"))
        for start, octets in [(8, 1), (7, 2), (0, 9), (-1, 11), (9, 2)]:  # never a part
            _refused(cur, f"SELECT {fn}('db/sha256/bt/good', %s, %s)", (start, octets))
        cur.execute(f"SELECT {fn}('db/sha256/bt/good', 8, 2), "
                    f"{fn}('db/sha256/bt/good', 10, 0)")
        answers = cur.fetchone()
        if fn == "ap_blob_text":
            assert answers == ("ab", "")
            with pytest.raises(psycopg2.errors.CharacterNotInRepertoire):
                cur.execute("SELECT ap_blob_text('db/sha256/bt/nul', 8, 3)")  # NUL
        else:
            assert answers == (8, 10)
            cur.execute("SELECT ap_body_text('db/sha256/bt/good', 8), "
                        "ap_body_text('db/sha256/bt/good', 10), "
                        "ap_body_text('db/sha256/bt/good', NULL), "
                        "ap_body_text('db/sha256/00/none', 0)")
            assert cur.fetchone() == ("ab", "", None, None)
    finally:
        conn.rollback()
        conn.close()


def test_blob_text_is_made_only_for_an_exact_long_tail():
    body = "x" * BLOB_TEXT_MIN_CHARS + "\r\n"
    raw = b"Subject: a\r\n\r\n" + body.encode()
    made = blob_text(body, raw, "db/sha256/ab/cd")
    assert isinstance(made, BlobText) and made == body
    assert (made.key, made.start, made.octets) == ("db/sha256/ab/cd", 14, len(body))
    lf = b"Subject: a\n\n" + body.encode()
    assert blob_text(body, lf, "db/sha256/ab/cd").start == 12
    for text, data, key in [
        (body, raw, "sha256/ab/cd"),  # in the store, not in PostgreSQL
        (body, raw, "db/sha256/ab/cd'; DROP TABLE blobs; --"),
        (body[:-3], raw, "db/sha256/ab/cd"),  # a prefix of the tail only
        (body + "y", raw, "db/sha256/ab/cd"),
        ("x" * 100, b"Subject: a\r\n\r\n" + b"x" * 100, "db/sha256/ab/cd"),  # short
        (body, body.encode(), "db/sha256/ab/cd"),  # no header end
        (body[:-2] + "\x00\r\n", b"S: a\r\n\r\n" + body[:-2].encode() + b"\x00\r\n",
         "db/sha256/ab/cd"),
        (None, raw, "db/sha256/ab/cd"),
    ]:
        assert type(blob_text(text, data, key)) is not BlobText
