"""Issue 12, migration 0040: a plain body kept only in its message's bytes
(storage.blob_body) reads back exactly wherever a body is read.

What must hold: the API's message (text and extracted text, below and above the size
where extracted text is derived in Python), IMAP SEARCH BODY/TEXT, IMAP COPY and MOVE
(the copy keeps the offset, not a body of its own, and outlives the original), a
draft APPENDed over IMAP, and several recipients in two organizations -- every one of
them gives the parser's text, and no row stores the body a second time.
"""

from __future__ import annotations

import pytest_twisted

from agentpost.storage.blob_body import body_sql
from agentpost.storage.long_text import BLOB_TEXT_MIN_CHARS
from agentpost.storage.mail import whole_body_text
from tests.helpers import query
from tests.imap_client import new_inbox, session
from tests.mailfactory import make_message
from tests.test_blob_text import (
    _expected,
    sent,  # noqa: F401 - SQL as executed (values in)
)


def _body(marker: str, chars: int) -> str:
    line = f"{marker} line of plain text, with it's quote and a \\ backslash\n"
    return line * (chars // len(line) + 1)


def _rows(db_dsn: str, inbox_id: str) -> list[tuple]:
    """(own body stored?, text_body_at, the body as read) of an inbox's rows, by UID."""
    return query(db_dsn, f"SELECT text_body IS NOT NULL, text_body_at, {body_sql()} "
                         "FROM messages WHERE inbox_id = %s ORDER BY folder_id, uid",
                 (inbox_id,))


@pytest_twisted.ensureDeferred
async def test_the_api_reads_the_body_and_its_extracted_text(server, db_dsn):
    inbox, key = await new_inbox(server, "bodyat-api")
    # 20 K characters: extracted text computed in SQL; 100 K: derived in Python
    for chars in (BLOB_TEXT_MIN_CHARS + 4000, 100 * 1024):
        raw = make_message(to=inbox["email"], subject=f"api {chars}",
                           body=_body(f"api{chars}", chars))
        [stored] = await server.deliver(raw, [inbox["email"]])
        got = (await server.api.get(f"/api/v1/messages/{stored.message_id}", key=key)).json
        expected = _expected(raw)
        assert got["text_body"] == expected
        assert got["extracted_text"] == whole_body_text(expected)
    rows = _rows(db_dsn, inbox["id"])
    assert len(rows) == 2 and all(not own and at and at > 0 for own, at, _ in rows)


@pytest_twisted.ensureDeferred
async def test_imap_search_finds_words_of_a_body_kept_in_its_bytes(server, db_dsn):
    inbox, key = await new_inbox(server, "bodyat-search")
    for n, word in enumerate(["zebracorn", "quokkafish"]):
        body = _body("filler", BLOB_TEXT_MIN_CHARS + 100) + f"the word is {word}\n"
        raw = make_message(to=inbox["email"], subject=f"search {n}", body=body)
        await server.deliver(raw, [inbox["email"]])
    assert all(not own for own, _, _ in _rows(db_dsn, inbox["id"]))

    def search(c):
        c.ok("SELECT INBOX")
        return [c.ok(f"UID SEARCH {criteria}")[0] for criteria in (
            "BODY zebracorn", "TEXT quokkafish", "NOT BODY zebracorn", "BODY nothere",
            "BODY FILLER")]

    found = await session(server.imap_port, inbox["email"], key, search)
    assert found == [b"* SEARCH 1", b"* SEARCH 2", b"* SEARCH 2", b"* SEARCH",
                     b"* SEARCH 1 2"]


@pytest_twisted.ensureDeferred
async def test_copies_keep_the_offset_and_outlive_the_original(server, db_dsn):
    inbox, key = await new_inbox(server, "bodyat-copy")
    raw = make_message(to=inbox["email"], subject="copied",
                       body=_body("copied", BLOB_TEXT_MIN_CHARS * 2))
    [stored] = await server.deliver(raw, [inbox["email"]])
    expected = _expected(raw)

    def copy_then_expunge(c):
        c.ok('CREATE "Kept"')
        c.ok('CREATE "Moved"')
        c.ok("SELECT INBOX")
        c.ok('UID COPY 1 "Kept"')
        c.ok('UID COPY 1 "Kept"')  # two copies, one per COPY
        c.ok('UID MOVE 1 "Moved"')  # the original leaves INBOX
        c.ok('SELECT "Moved"')
        c.ok("UID STORE 1 +FLAGS.SILENT (\\Deleted)")
        c.ok("EXPUNGE")  # and is gone for good
        c.ok('SELECT "Kept"')
        return c.ok("UID FETCH 1:* (BODY.PEEK[TEXT])")

    fetched = b"\n".join(await session(server.imap_port, inbox["email"], key,
                                       copy_then_expunge))
    tail = raw[raw.index(b"\r\n\r\n") + 4:]
    assert fetched.count(b"{%d}\r\n" % len(tail) + tail + b")") == 2
    rows = _rows(db_dsn, inbox["id"])
    assert len(rows) == 2
    offset = raw.index(b"\r\n\r\n") + 4
    assert rows == [(False, offset, expected)] * 2
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?folder=Kept",
                                   key=key)).json["data"]
    assert len(listed) == 2 and stored.message_id not in {m["id"] for m in listed}
    for item in listed:
        got = (await server.api.get(f"/api/v1/messages/{item['id']}", key=key)).json
        assert got["text_body"] == expected


@pytest_twisted.ensureDeferred
async def test_an_appended_draft_is_read_from_its_bytes(server, db_dsn):
    inbox, key = await new_inbox(server, "bodyat-draft")
    raw = make_message(frm=inbox["email"], to="bob@example.com", subject="long draft",
                       body=_body("draft", BLOB_TEXT_MIN_CHARS + 10))

    def append(c):
        c.append("Drafts", raw)

    await session(server.imap_port, inbox["email"], key, append)
    [(own, at, _)] = _rows(db_dsn, inbox["id"])
    assert not own and at
    [draft] = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/drafts",
                                    key=key)).json["data"]
    full = (await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)).json
    assert full["text_body"] == _expected(raw)


@pytest_twisted.ensureDeferred
async def test_recipients_in_two_organizations_share_the_bytes_not_a_body(server, db_dsn):
    first, key1 = await new_inbox(server, "bodyat-one")
    second, key2 = await new_inbox(server, "bodyat-two")
    raw = make_message(to=f"{first['email']}, {second['email']}", subject="both",
                       body=_body("both", BLOB_TEXT_MIN_CHARS * 3))
    stored = await server.deliver(raw, [first["email"], second["email"]])
    expected = _expected(raw)
    assert len(stored) == 2
    for inbox, key, copy in ((first, key1, stored[0]), (second, key2, stored[1])):
        assert [row[:2] for row in _rows(db_dsn, inbox["id"])] == [
            (False, raw.index(b"\r\n\r\n") + 4)]
        got = (await server.api.get(f"/api/v1/messages/{copy.message_id}", key=key)).json
        assert got["text_body"] == expected
    # one organization's key reads none of the other's copy
    other = await server.api.get(f"/api/v1/messages/{stored[1].message_id}", key=key1)
    assert other.status == 404
    # the first organization deletes its copy; the second still reads its body
    gone = await server.api.delete(f"/api/v1/messages/{stored[0].message_id}", key=key1)
    assert gone.status in (200, 204)
    got = (await server.api.get(f"/api/v1/messages/{stored[1].message_id}", key=key2)).json
    assert got["text_body"] == expected


@pytest_twisted.ensureDeferred
async def test_a_lone_copy_with_an_offset_still_goes_prepared(server, sent):  # noqa: F811
    """The offset's SQL is a checked call (ap_blob_text_at), not a literal: it must
    still be an argument of the prepared statement (storage.prepared), or every lone
    delivery of a long plain body is planned afresh (measured: 0.28 ms a message)."""
    from tests.conftest import _PREPARE_THRESHOLD

    inbox, _ = await new_inbox(server, "bodyat-prepared")
    for n in range(3):
        raw = make_message(to=inbox["email"], subject=f"lone {n}",
                           body=_body(f"lone{n}", BLOB_TEXT_MIN_CHARS + 10))
        await server.deliver(raw, [inbox["email"]])
    from agentpost.storage.prepared import split_statements

    parts = [part.strip() for m in sent for part in split_statements(m)
             if "ap_blob_text_at(" in part]
    assert len(parts) == 3  # one message statement per delivery
    if _PREPARE_THRESHOLD:
        assert all(part.startswith("EXECUTE ap_") for part in parts[1:]), parts[-1][:300]
    else:  # prepared statements off: plain text, as before
        assert not any(part.startswith("EXECUTE ap_") for part in parts)
