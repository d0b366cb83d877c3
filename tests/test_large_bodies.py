"""Issue 12, memory: large text bodies go to PostgreSQL in pieces (storage.message_bodies)
and are stored exactly: the same characters, CRLF kept, 8-bit text intact, through both
the single-delivery and the group-commit insert path."""

from __future__ import annotations

import io

import pytest_twisted
from twisted.internet import defer

from agentpost.storage import message_bodies
from agentpost.storage.blob_body import body_sql

_HEAD = ("From: Alice <alice@example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n"
         "Message-ID: <{subject}@example.com>\r\nMIME-Version: 1.0\r\n"
         "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
#: NUL-free 8-bit text (2-, 3- and 4-byte UTF-8), CRLF line ends, a line of dots.
_LINE = "Grüße, naïve café — 日本語 ✓ 𝄞 emoji 🙂 tab\there.\r\n..\r\nplain ascii line\r\n"


def _message(to: str, subject: str, body: str) -> bytes:
    return _HEAD.format(to=to, subject=subject).encode() + body.encode("utf-8")


async def _stored_body(server, message_id: str) -> str:
    return await server.core.db.run_read("t", lambda txn: txn.fetchval(
        f"SELECT {body_sql()} FROM messages WHERE id = %s", (message_id,)))


async def _setup(server, *names):
    _, key = await server.new_org()
    targets = []
    for name in names:
        inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
        targets.append(await server.core.router.resolve(inbox["email"], "a@example.com"))
    return key, targets


def _store(server, targets, raw: bytes, group: bool) -> defer.Deferred:
    return defer.ensureDeferred(server.core.ingest.store(
        targets, io.BytesIO(raw), envelope_from="a@example.com", group=group))


@pytest_twisted.ensureDeferred
async def test_pieces_join_to_the_exact_body(server, monkeypatch):
    """Small thresholds so that pieces split CRLF pairs and multi-byte characters."""
    monkeypatch.setattr(message_bodies, "LARGE_CHARS", 1000)
    monkeypatch.setattr(message_bodies, "CHUNK_CHARS", 333)
    key, [one, two] = await _setup(server, "pieces-one", "pieces-two")
    body = _LINE * 97
    assert len(body) > 1000
    # Alone (no group commit), to two recipients: one body sent once, stored twice.
    stored = await _store(server, [one, two], _message(one.email, "alone", body), False)
    for copy in stored:
        assert await _stored_body(server, copy.message_id) == body
    # Several large deliveries sharing one group-commit transaction.
    others = [_LINE * (40 + n) + f"end {n}\r\n" for n in range(3)]
    results = await defer.gatherResults(
        [_store(server, [two], _message(two.email, f"grouped{n}", b), True)
         for n, b in enumerate(others)])
    for [copy], expected in zip(results, others, strict=True):
        assert await _stored_body(server, copy.message_id) == expected
    # What the API shows is the same text.
    shown = (await server.api.get(f"/api/v1/messages/{stored[0].message_id}", key=key)).json
    assert shown["text_body"] == body


@pytest_twisted.ensureDeferred
async def test_body_over_10_mb_is_stored_exactly(server):
    _, [target] = await _setup(server, "big-body")
    body = _LINE * (10_600_000 // len(_LINE.encode()))
    raw = _message(target.email, "big", body)
    assert len(raw) > 10 * 1024 * 1024 and len(body) > message_bodies.LARGE_CHARS
    [copy] = await _store(server, [target], raw, True)
    assert await _stored_body(server, copy.message_id) == body
    [again] = await _store(server, [target], _message(target.email, "big2", body), False)
    assert await _stored_body(server, again.message_id) == body


@pytest_twisted.ensureDeferred
async def test_small_bodies_take_the_plain_path(server, monkeypatch):
    """Ordinary messages send no pieces (no temp table in their transaction)."""
    _, [target] = await _setup(server, "small-body")
    sent: list[object] = []
    real = message_bodies.Txn.execute

    async def spy(txn, sql, params=None):
        sent.append(sql)
        return await real(txn, sql, params)

    monkeypatch.setattr(message_bodies.Txn, "execute", spy)
    [copy] = await _store(server, [target], _message(target.email, "small", _LINE), True)
    assert await _stored_body(server, copy.message_id) == _LINE
    assert not any("ap_body_parts" in str(s) for s in sent)
