"""Small messages are parsed on the reactor thread, large ones in the pool (issue 12); the
two paths store identical rows."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from agentpost.core import parse_dispatch
from agentpost.core.ingest import _analyse_indexed
from tests.helpers import query
from tests.mailfactory import make_message

_COLUMNS = ("subject", "imap_envelope", "imap_bodystructure", "imap_body", "imap_sections",
            "sort_subject", "from_text", "sent_date", "size", "raw_blob_key", "preview",
            "headers", "text_body", "html_body", "extracted_text", "has_attachments")


def _message(n: int) -> bytes:
    return make_message(subject=f"=?utf-8?q?caf=C3=A9?= report {n}", body="body\n" * 50,
                        msgid="<same@example.com>", html="<p>hi</p>",
                        attachments=[("a.txt", "text/plain", b"x" * 300)])


@pytest_twisted.ensureDeferred
async def test_a_small_message_is_parsed_inline_a_large_one_in_the_pool(monkeypatch):
    used_pool = []
    real = parse_dispatch.threads.deferToThreadPool

    def spy(*args, **kwargs):
        used_pool.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(parse_dispatch.threads, "deferToThreadPool", spy)
    raw = _message(1)
    inline = await parse_dispatch.analyse(reactor, _analyse_indexed, raw)
    assert used_pool == []
    pooled = await parse_dispatch.analyse(reactor, _analyse_indexed, raw, inline_max=0)
    assert used_pool == [True]
    assert inline[1:] == pooled[1:]  # IMAP renderings and the search/sort keys
    assert inline[0].headers == pooled[0].headers
    assert inline[0].preview == pooled[0].preview
    big = b"X-Pad: " + b"p" * parse_dispatch.INLINE_PARSE_MAX_BYTES + b"\r\n" + raw
    await parse_dispatch.analyse(reactor, _analyse_indexed, big)
    assert used_pool == [True, True]


@pytest_twisted.ensureDeferred
async def test_an_inline_parse_error_surfaces_like_a_pooled_one():
    def broken(raw: bytes) -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError):
        await parse_dispatch.analyse(reactor, broken, b"x")
    with pytest.raises(ValueError):
        await parse_dispatch.analyse(reactor, broken, b"x", inline_max=0)


@pytest_twisted.ensureDeferred
async def test_both_paths_store_identical_rows(server, db_dsn, monkeypatch):
    _, key = await server.new_org()
    inboxes = [(await server.api.post("/api/v1/inboxes", {"username": f"parse{n}"},
                                      key=key)).json for n in range(2)]
    raw = _message(1)  # once: the MIME boundaries are random
    await server.deliver(raw, [inboxes[0]["email"]])  # inline
    monkeypatch.setattr(parse_dispatch, "INLINE_PARSE_MAX_BYTES", 0)
    await server.deliver(raw, [inboxes[1]["email"]])  # in the pool
    rows = query(db_dsn, f"SELECT {', '.join(_COLUMNS)} FROM messages "
                         "WHERE inbox_id IN (%s, %s) ORDER BY inbox_id = %s",
                 (inboxes[0]["id"], inboxes[1]["id"], inboxes[1]["id"]))
    assert len(rows) == 2
    assert rows[0] == rows[1]
    assert rows[0][1] and rows[0][2]  # rendered at ingest, not left to FETCH


_HEAD = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: x\r\nMIME-Version: 1.0\r\n"


@pytest.mark.parametrize("shape,raw", [
    ("nested multiparts", _HEAD + b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n'
     + b"".join(b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
                for i in range(60))),
    ("many parameters", _HEAD + b"Content-Type: text/plain; " + b"a=b; " * 200 + b"\r\n\r\nx"),
    ("a long spaced subject", b"Subject: " + b"a " * 3000 + b"\r\n" + _HEAD + b"\r\nx"),
    ("many headers", _HEAD + b"X-H: v\r\n" * 1000 + b"\r\nx"),
    ("many addresses", _HEAD + b"To: x@y.example\r\n" * 100 + b"\r\nx"),
    ("encoded words", b"Subject: " + b"=?utf-8?q?a?=" * 100 + b"\r\n" + _HEAD + b"\r\nx"),
    ("a large header", b"X-Big: " + b"v" * 9000 + b"\r\n" + _HEAD + b"\r\nx"),
    ("tab-separated tokens", b"To: " + b"\tx" * 3500 + b"\r\n" + _HEAD + b"\r\nx"),
    ("comma runs", b"To: " + b"," * 7000 + b"x@y\r\n" + _HEAD + b"\r\nx"),
    ("angle brackets", b"To: " + b"<" * 7000 + b"\r\n" + _HEAD + b"\r\nx"),
    ("nested comments", b"To: " + b"(" * 7000 + b"\r\n" + _HEAD + b"\r\nx"),
])
def test_costly_shapes_are_parsed_in_the_pool(shape, raw):
    """A stranger's message whose parse costs far more than its size must not stall the
    reactor (every session) while it is parsed."""
    assert len(raw) <= parse_dispatch.INLINE_PARSE_MAX_BYTES, shape
    assert not parse_dispatch.looks_plain(raw), shape


def test_ordinary_small_mail_is_parsed_inline():
    assert parse_dispatch.looks_plain(_message(1))
    assert parse_dispatch.looks_plain(b"Subject: hi\n\nbody\n")  # bare LF, too


_TEXT_HEAD = _HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
_BIG_BODY = b"a line of text, with @ and ; and =? and\r\n--not a boundary\r\n" * 1500


def test_one_large_text_part_is_parsed_inline_whatever_its_body_holds():
    """Its body holds no structure to walk: only the header's shapes count."""
    raw = _TEXT_HEAD + _BIG_BODY
    assert parse_dispatch.INLINE_PARSE_MAX_BYTES < len(raw) \
        <= parse_dispatch.SINGLE_PART_INLINE_MAX_BYTES
    assert parse_dispatch.looks_plain(raw)
    assert parse_dispatch.looks_plain(_HEAD + b"\r\n" + _BIG_BODY)  # no Content-Type
    too_big = _TEXT_HEAD + b"x" * parse_dispatch.SINGLE_PART_INLINE_MAX_BYTES
    assert not parse_dispatch.looks_plain(too_big)


@pytest.mark.parametrize("content_type", [
    b"multipart/mixed; boundary=b", b"message/rfc822", b"(comment) text/plain",
    b"\r\n multipart/alternative; boundary=b", b"application/octet-stream"])
def test_a_large_message_that_may_have_parts_goes_to_the_pool(content_type):
    raw = _HEAD + b"Content-Type: " + content_type + b"\r\n\r\n" + _BIG_BODY
    assert not parse_dispatch.looks_plain(raw)
    # a second Content-Type field that is not text/ counts too
    two = _TEXT_HEAD[:-2] + b"Content-Type: " + content_type + b"\r\n\r\n" + _BIG_BODY
    assert not parse_dispatch.looks_plain(two)


@pytest.mark.parametrize("extra", [b"; a=b" * 30, b" =?utf-8?q?a?=" * 40])
def test_a_text_part_with_a_costly_header_still_goes_to_the_pool(extra):
    raw = _HEAD + b"Content-Type: text/plain" + extra + b"\r\n\r\n" + _BIG_BODY
    assert not parse_dispatch.looks_plain(raw)
    assert not parse_dispatch.looks_plain(raw[:2000])


@pytest_twisted.ensureDeferred
async def test_a_large_text_message_parses_the_same_inline_and_in_the_pool():
    raw = _TEXT_HEAD + _BIG_BODY
    inline = await parse_dispatch.analyse(reactor, _analyse_indexed, raw)
    pooled = await parse_dispatch.analyse(reactor, _analyse_indexed, raw, inline_max=0)
    assert inline[1:] == pooled[1:]
    assert inline[0].text_body == pooled[0].text_body
    assert inline[0].text_body.count("not a boundary") == 1500


def test_a_large_text_part_with_bare_crs_goes_to_the_pool():
    """The stdlib parser takes a bare-CR message and ends a line at every CR: 120 KB of
    them cost it ~24 ms, a stall the reactor must not take; small ones stay inline."""
    raw = _TEXT_HEAD + b"x\r" * 60000
    assert not parse_dispatch.looks_plain(raw)
    assert parse_dispatch.looks_plain(_TEXT_HEAD + b"x\r" * 100)
    assert parse_dispatch.looks_plain(_TEXT_HEAD + b"x\r\n" * 40000)
