"""A FETCH of headers only reads the header by range from the section map, whatever the
message's size (imap/commands/fetch.py ``_headers_only``): what a client syncing a folder
asks of every new message no longer reads and hashes whole messages of up to 256 KiB.

The answer must be the one the whole-message path gives. Asked alone, the header items
take the range path; asked together with ``BODY.PEEK[]`` the same items are cut from the
whole message. Both are compared for messages of odd shapes, kept in PostgreSQL and in
the store.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from tests.conftest import make_config, start_server
from tests.helpers import query
from tests.imap_client import new_inbox, session

_HEADER_ITEMS = ("BODY.PEEK[HEADER.FIELDS (FROM SUBJECT X-LONG)] BODY.PEEK[HEADER] "
                 "RFC822.HEADER BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)]<3.40>")

_SHAPES = [
    # a folded header, long field, CRLF
    b"From: a@example.com\r\nSubject: folded\r\n  over two lines\r\nX-Long: "
    + b"v" * 900 + b"\r\n\r\n" + b"body line\r\n" * 3000,
    # LF-only line ends
    b"From: a@example.com\nSubject: lf only\n\n" + b"body\n" * 2000,
    # no body at all, no blank line
    b"From: a@example.com\r\nSubject: header only\r\n",
    # 8-bit header text and a blank line that holds spaces
    "From: Jos\u00e9 <a@example.com>\r\nSubject: caf\u00e9\r\n\r\n".encode() + b"x\r\n" * 500,
    # a multipart message: the top-level header only
    b"From: a@example.com\r\nSubject: parts\r\nMIME-Version: 1.0\r\nContent-Type: "
    b"multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
    b"--b\r\nContent-Type: text/plain\r\nSubject: inner\r\n\r\nthere\r\n--b--\r\n",
]


def _items(lines: list[bytes]) -> list[bytes]:
    """Each header item's answer in a FETCH response (its name and literal)."""
    data = b"".join(lines)
    out = []
    for name in (rb"BODY\[HEADER\.FIELDS \(FROM SUBJECT X-LONG\)\]", rb"BODY\[HEADER\]",
                 rb"RFC822\.HEADER", rb"BODY\[HEADER\.FIELDS\.NOT \(SUBJECT\)\]<3>"):
        match = re.search(name + rb" \{(\d+)\}\r\n", data)
        assert match is not None, (name, data[:300])
        out.append(data[match.end():match.end() + int(match.group(1))])
    return out


async def _compare(port: int, inbox: dict, key: str) -> list[tuple[list[bytes], list[bytes]]]:
    def work(c):
        for raw in _SHAPES:
            c.append("INBOX", raw)
        c.ok("SELECT INBOX")
        pairs = []
        for n in range(1, len(_SHAPES) + 1):
            alone = c.ok(f"FETCH {n} ({_HEADER_ITEMS})")
            whole = c.ok(f"FETCH {n} ({_HEADER_ITEMS} BODY.PEEK[])")
            pairs.append((_items(alone), _items(whole)))
        return pairs

    return await session(port, inbox["email"], key, work)


@pytest_twisted.ensureDeferred
async def test_header_items_by_range_match_the_whole_message(server, monkeypatch):
    inbox, key = await new_inbox(server, "hdrranges")
    blobs = server.core.blobs
    reads: list[str] = []
    for name in ("get_bytes", "get_range"):
        original = getattr(blobs, name)

        async def counted(*args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return await _original(*args, **kwargs)

        monkeypatch.setattr(blobs, name, counted)
    for alone, whole in await _compare(server.imap_port, inbox, key):
        assert alone == whole
    # alone: ranges only (one per header item and message); with BODY[]: whole reads
    assert reads.count("get_bytes") == len(_SHAPES)
    assert reads.count("get_range") >= len(_SHAPES)


@pytest.mark.parametrize("inline_max", ["0B", "256KiB"])
@pytest_twisted.ensureDeferred
async def test_header_items_by_range_match_in_the_store_too(db_dsn, tmp_path, openapi_checker,
                                                            inline_max):
    running = await start_server(
        make_config(db_dsn, storage={"backend": "local", "path": str(tmp_path / "blobs"),
                                     "inline_message_max": inline_max}), openapi_checker)
    try:
        inbox, key = await new_inbox(running, "hdrstore")
        for alone, whole in await _compare(running.imap_port, inbox, key):
            assert alone == whole
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_header_read_of_bytes_gone_from_the_store_says_expunged(db_dsn, tmp_path,
                                                                       openapi_checker):
    """A message whose bytes are gone from the store (collected after an expunge by
    another session, between this session's row and its read): the whole-message path
    answered EXPUNGEISSUED for it and sent the others, and so does the range path."""
    running = await start_server(
        make_config(db_dsn, storage={"backend": "local", "path": str(tmp_path / "blobs"),
                                     "inline_message_max": "0B"}), openapi_checker)
    try:
        inbox, key = await new_inbox(running, "hdrgone")

        def work(c):
            c.append("INBOX", _SHAPES[0])
            c.append("INBOX", _SHAPES[1])
            c.ok("SELECT INBOX")
            [(blob,)] = query(db_dsn, "SELECT raw_blob_key FROM messages "
                                      "WHERE inbox_id = %s AND uid = 1", (inbox["id"],))
            (tmp_path / "blobs" / blob).unlink()
            answer = c.tagged("g", "FETCH 1:2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            c.ok("NOOP")  # the session goes on
            return answer

        answer = await session(running.imap_port, inbox["email"], key, work)
        assert answer[-1].startswith(b"g NO [EXPUNGEISSUED]"), answer[-1]
        assert any(b"Subject: lf only" in line for line in answer)  # the other is sent
    finally:
        await running.service.stopService()
