"""Hostile review of the guessed staging (core.known_folders, issue 12): blob reference
counts after a stale guess, deliveries to several organizations in one delivery and in
one batch, repeated bytes in a guessed batch, and guessed and asked batches running in
parallel over the same blob and folders."""

from __future__ import annotations

import io

import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.core.group_commit import GroupCommit
from agentpost.storage.blob_body import body_sql
from tests.helpers import query
from tests.mailfactory import make_message
from tests.test_group_commit import _wait_pending


async def _org_inbox(server, name):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    return await server.core.router.resolve(inbox["email"], "a@example.com")


async def _store(server, targets, raw: bytes):
    return await server.core.ingest.store(targets, io.BytesIO(raw),
                                          envelope_from="a@example.com", group=True)


async def _primed(server, *names: str, max_batch: int = 16):
    """An inbox in a new organization per name, a group commit of its own installed,
    and one message to all of them, so their INBOX is remembered (guessable)."""
    targets = [await _org_inbox(server, name) for name in names]
    gc = GroupCommit(server.core.db, reactor, max_batch=max_batch, delay_s=0.0, parallel=2)
    server.core.ingest.group_commit = gc
    await _store(server, targets, make_message(subject="prime", msgid=f"<{names[0]}@prime>"))
    return targets, gc


def _refcount(db_dsn, key) -> int:
    [(n,)] = query(db_dsn, "SELECT refcount FROM blobs WHERE key = %s", (key,))
    return n


def _placed(db_dsn, stored) -> tuple:
    [row] = query(db_dsn, "SELECT m.org_id, m.inbox_id, f.inbox_id, f.name, m.uid, "
                          "f.uidvalidity FROM messages m JOIN folders f ON f.id = m.folder_id "
                          "WHERE m.org_id = %s AND m.id = %s",
                  (stored.org_id, stored.message_id))
    return row


@pytest_twisted.ensureDeferred
async def test_a_stale_guess_leaves_no_blob_reference_behind(server, db_dsn):
    """The lead's reference upsert runs before the check that fails it: rolled back."""
    target = await _org_inbox(server, "stale-blob")
    gc = GroupCommit(server.core.db, reactor, max_batch=16, delay_s=0.0, parallel=2)
    server.core.ingest.group_commit = gc
    await _store(server, [target], make_message(subject="Re", msgid="<c@s>",
                                                references="<p@s>"))
    [parent] = await _store(server, [target], make_message(subject="p", msgid="<p@s>"))
    assert gc.stale_guesses == 1
    assert _refcount(db_dsn, parent.raw_blob_key) == 1


@pytest_twisted.ensureDeferred
async def test_one_delivery_to_two_organizations_is_guessed_into_each_own_folder(
        server, db_dsn):
    (mine, theirs), gc = await _primed(server, "multi-a", "multi-b")
    raw = make_message(subject="both", msgid="<m1@x>")
    out = await _store(server, [theirs, mine], raw)
    assert (gc.guessed, gc.stale_guesses) == (1, 0)
    assert [_placed(db_dsn, s)[:5] for s in out] == [
        (theirs.org_id, theirs.inbox_id, theirs.inbox_id, "INBOX", 2),
        (mine.org_id, mine.inbox_id, mine.inbox_id, "INBOX", 2)]
    assert all(_placed(db_dsn, s)[5] == s.uidvalidity for s in out)
    assert _refcount(db_dsn, out[0].raw_blob_key) == 2
    out = await _store(server, [theirs, mine], raw)  # the same bytes again: 4 references
    assert _refcount(db_dsn, out[0].raw_blob_key) == 4


@pytest_twisted.ensureDeferred
async def test_a_guessed_batch_of_repeated_bytes_across_organizations(server, db_dsn):
    a = await _org_inbox(server, "batch-a")
    b = await _org_inbox(server, "batch-b")
    clock = task.Clock()
    gc = GroupCommit(server.core.db, clock, max_batch=16, delay_s=1.0, parallel=1)
    server.core.ingest.group_commit = gc

    async def batch(items):
        pending = [defer.ensureDeferred(_store(server, t, raw)) for t, raw in items]
        await _wait_pending(gc, len(items))
        clock.advance(1.0)
        return [s for some in await defer.gatherResults(pending) for s in some]

    await batch([([a], make_message(subject="pa", msgid="<pa@x>")),
                 ([b], make_message(subject="pb", msgid="<pb@x>"))])
    raw = make_message(subject="same", msgid="<same@x>")
    out = await batch([([a], raw), ([b], raw), ([a, b], raw), ([b], raw)])
    assert (gc.guessed, gc.stale_guesses) == (1, 0)
    assert _refcount(db_dsn, out[0].raw_blob_key) == 5
    for s in out:
        org, inbox, folder_inbox, name, _, uidvalidity = _placed(db_dsn, s)
        assert (org, inbox, folder_inbox, name, uidvalidity) == (
            s.org_id, s.inbox_id, s.inbox_id, "INBOX", s.uidvalidity)
    for t in (a, b):
        uids = query(db_dsn, "SELECT uid FROM messages WHERE inbox_id = %s ORDER BY uid",
                     (t.inbox_id,))
        assert [u for (u,) in uids] == list(range(1, len(uids) + 1))


@pytest_twisted.ensureDeferred
async def test_guessed_and_asked_batches_in_parallel_over_the_same_blob(server, db_dsn):
    """parallel=2: replies (asked) and plain messages (guessed) with the same bytes for
    the same two inboxes: every message stored once, UIDs dense, the blob counted once
    per copy, no batch failed."""
    (a, b), gc = await _primed(server, "par-a", "par-b", max_batch=3)
    plain = make_message(subject="same", msgid="<same@par>")
    reply = make_message(subject="Re", msgid="<re@par>", references="<elsewhere@par>")
    pending = [defer.ensureDeferred(_store(server, [a, b] if n % 3 else [b, a],
                                           reply if n % 2 else plain))
               for n in range(24)]
    results = await defer.gatherResults(pending, consumeErrors=True)
    assert len(results) == 24
    assert gc.guessed > 0
    for key, count in ((results[0][0].raw_blob_key, 12), (results[1][0].raw_blob_key, 12)):
        assert _refcount(db_dsn, key) == 2 * count
    for t in (a, b):
        uids = [u for (u,) in query(db_dsn, "SELECT uid FROM messages WHERE inbox_id = %s "
                                             "ORDER BY uid", (t.inbox_id,))]
        assert uids == list(range(1, 26))


@pytest_twisted.ensureDeferred
async def test_a_write_that_guessed_nothing_is_never_retried_as_a_stale_guess(
        server, db_dsn):
    """Only a guessed batch can meet a stale guess. A failed cast whose text happens to
    carry the marker, in a batch that was staged by asking, fails that delivery; it was
    retried as a stale guess for as long as it failed (here: until the statement stops
    failing on its 6th try, when the message was stored after 6 transactions)."""
    target = await _org_inbox(server, "no-loop")
    gc = GroupCommit(server.core.db, reactor, max_batch=16, delay_s=0.0, parallel=2)
    server.core.ingest.group_commit = gc
    calls = []

    def before_insert(txn, copy):
        calls.append(copy.message_id)
        if len(calls) <= 5:
            return "SELECT ('agentpost: stale guess' || %s)::int", [""]
        return "", []

    raw = make_message(subject="Re", msgid="<loop@x>", references="<elsewhere@x>")
    failed = None
    try:
        await server.core.ingest.store([target], io.BytesIO(raw), envelope_from="a@x.test",
                                       group=True, before_insert=before_insert)
    except Exception as exc:
        failed = exc
    assert failed is not None
    assert (len(calls), gc.stale_guesses) == (1, 0)
    assert query(db_dsn, "SELECT count(*) FROM messages WHERE inbox_id = %s",
                 (target.inbox_id,)) == [(0,)]


def _raw_8bit(body: bytes, msgid: str) -> bytes:
    return (b"From: a@example.com\r\nTo: b@agents.test\r\nSubject: odd\r\n"
            b"Message-ID: " + msgid.encode() + b"\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body + b"\r\n")


@pytest_twisted.ensureDeferred
async def test_long_bodies_with_hostile_bytes_are_stored_through_a_guessed_batch(
        server, db_dsn):
    """Bodies past storage.long_text's threshold with quotes, backslashes, NUL, invalid
    UTF-8 and CR: stored (or refused) as any other body, never a 500 or a broken literal."""
    (target,), gc = await _primed(server, "odd-bodies")
    bodies = [b"'\\'" * 3000, b"x\x00y'" * 2000, b"\xff\xfe'\xc3(" * 2000,
              b"\xed\xa0\x80'" * 2000, "\u3042'\\".encode() * 2000, b"a\rb'" * 2000]
    for n, body in enumerate(bodies, 1):
        [stored] = await _store(server, [target], _raw_8bit(body, f"<ob{n}@x>"))
        [(text,)] = query(db_dsn, f"SELECT {body_sql()} FROM messages WHERE org_id = %s "
                                  "AND id = %s", (stored.org_id, stored.message_id))
        assert len(text) >= 4096 and "\x00" not in text
        if n in (1, 5):  # valid UTF-8 without CR or NUL: exactly the body
            assert text.rstrip("\r\n") == body.decode()
    assert gc.guessed >= 1


@pytest_twisted.ensureDeferred
async def test_no_deadlock_between_guessed_and_asked_batches(server, db_dsn, caplog):
    """Three inboxes in two organizations, recipients in every order, shared bytes,
    replies (asked) among plain messages (guessed), two batches at a time: no batch
    meets a deadlock (the retry would hide it: the log tells)."""
    import logging

    caplog.set_level(logging.INFO, logger="agentpost")
    (a, b, c), gc = await _primed(server, "dl-a", "dl-b", "dl-c", max_batch=4)
    orders = [[a, b], [b, a], [c, a, b], [b, c], [c], [a, c, b]]
    raws = [make_message(subject="same", msgid="<dl-same@x>"),
            make_message(subject="Re", msgid="<dl-re@x>", references="<dl-p@x>"),
            make_message(subject="other", msgid="<dl-o@x>")]
    pending = [defer.ensureDeferred(_store(server, orders[n % 6], raws[n % 3]))
               for n in range(48)]
    await defer.gatherResults(pending)
    assert gc.guessed > 0
    assert not [r for r in caplog.records if "Deadlock" in r.getMessage()]
    total = 0
    for t in (a, b, c):
        uids = [u for (u,) in query(db_dsn, "SELECT uid FROM messages WHERE inbox_id = %s "
                                             "ORDER BY uid", (t.inbox_id,))]
        assert uids == list(range(1, len(uids) + 1))
        total += len(uids)
    assert total == 3 + sum(len(orders[n % 6]) for n in range(48))
