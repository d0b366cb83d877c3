"""Issue 12: a lone MX delivery staged without its staging round trip (core.known_folders).

The write then leads with the staging's statements and a check of what was guessed
(the folder, and that the message starts a thread). These tests change the database
behind the process's back, and poison what it remembers, the way another process or a
hostile tenant could, and check that every message still lands in its own inbox's
folder and thread, with its blob counted once.
"""

from __future__ import annotations

import io

import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.core.group_commit import GroupCommit
from tests.helpers import execute, query
from tests.mailfactory import make_message
from tests.test_group_commit import _wait_pending

#: A fragment of the staging statement (storage.message_insert._PREPARE_DELIVERIES_SQL).
_STAGING = "ARRAY(SELECT key FROM b WHERE inserted)"


async def _setup(server, *names):
    _, key = await server.new_org()
    inboxes = [(await server.api.post("/api/v1/inboxes", {"username": n}, key=key)).json
               for n in names]
    gc = GroupCommit(server.core.db, reactor, max_batch=16, delay_s=0.0, parallel=2)
    server.core.ingest.group_commit = gc
    return inboxes, gc


async def _store(server, inbox, raw: bytes):
    target = await server.core.router.resolve(inbox["email"], "a@example.com")
    [stored] = await server.core.ingest.store([target], io.BytesIO(raw),
                                              envelope_from="a@example.com", group=True)
    return stored


def _row(db_dsn, stored) -> tuple:
    [row] = query(db_dsn, "SELECT folder_id, thread_id, uid, inbox_id FROM messages "
                          "WHERE org_id = %s AND id = %s", (stored.org_id, stored.message_id))
    return row


def _inbox_folder(db_dsn, inbox) -> int:
    [(folder,)] = query(db_dsn, "SELECT id FROM folders WHERE inbox_id = %s AND name = 'INBOX'",
                        (inbox["id"],))
    return folder


@pytest_twisted.ensureDeferred
async def test_the_second_delivery_to_a_folder_skips_the_staging(server, db_dsn, sent):
    [inbox], gc = await _setup(server, "guessed")
    first = await _store(server, inbox, make_message(subject="one", msgid="<g1@x>"))
    assert gc.guessed == 0  # nothing known yet: asked
    assert sum(_STAGING in m for m in sent) == 1
    sent.clear()
    later = [await _store(server, inbox, make_message(subject=f"n{n}", msgid=f"<g{n}@x>"))
             for n in range(2, 5)]
    assert (gc.guessed, gc.stale_guesses) == (3, 0)
    # no staging statement: each write carries the guess's check and its COMMIT
    assert not any(_STAGING in m for m in sent)
    writes = [m for m in sent if "agentpost: stale guess" in m]
    assert len(writes) == 3 and all("COMMIT" in m for m in writes)
    rows = [_row(db_dsn, s) for s in [first, *later]]
    assert [r[2] for r in rows] == [1, 2, 3, 4]  # UIDs in order
    assert {r[0] for r in rows} == {_inbox_folder(db_dsn, inbox)}
    assert len({r[1] for r in rows}) == 4  # each starts its own thread
    threads = query(db_dsn, "SELECT message_count FROM threads WHERE inbox_id = %s",
                    (inbox["id"],))
    assert sorted(t[0] for t in threads) == [1, 1, 1, 1]


@pytest_twisted.ensureDeferred
async def test_a_folder_replaced_behind_the_process_is_found_again(server, db_dsn):
    """Another process renamed INBOX away and a new INBOX took its name: the remembered
    row is refused by the write, and the message goes to the new folder."""
    [inbox], gc = await _setup(server, "replaced")
    await _store(server, inbox, make_message(subject="before", msgid="<r1@x>"))
    old = _inbox_folder(db_dsn, inbox)
    execute(db_dsn, "UPDATE folders SET name = 'Old' WHERE id = %s", (old,))
    execute(db_dsn, "INSERT INTO folders (org_id, environment_id, inbox_id, name, "
                    "special_use, created_at) SELECT org_id, environment_id, inbox_id, "
                    "'INBOX', special_use, now() FROM folders WHERE id = %s", (old,))
    new = _inbox_folder(db_dsn, inbox)
    stored = await _store(server, inbox, make_message(subject="after", msgid="<r2@x>"))
    assert (gc.guessed, gc.stale_guesses) == (1, 1)
    folder, _, uid, _ = _row(db_dsn, stored)
    assert (folder, uid) == (new, 1)
    assert query(db_dsn, "SELECT count(*) FROM messages WHERE folder_id = %s", (old,)) == [(1,)]
    again = await _store(server, inbox, make_message(subject="again", msgid="<r3@x>"))
    assert (gc.guessed, gc.stale_guesses) == (2, 1)  # the new row is remembered now
    assert _row(db_dsn, again)[:3:2] == (new, 2)


@pytest_twisted.ensureDeferred
async def test_a_folder_of_another_tenant_is_never_written(server, db_dsn):
    """A poisoned entry (another organization's folder under this inbox's key) only
    costs a round trip: the write checks organization, inbox, name and UIDVALIDITY."""
    [mine], gc = await _setup(server, "victim")
    [theirs], _ = await _setup(server, "other")
    server.core.ingest.group_commit = gc
    await _store(server, theirs, make_message(subject="theirs", msgid="<t1@x>"))
    foreign = _inbox_folder(db_dsn, theirs)
    [(uidnext, uidvalidity)] = query(db_dsn, "SELECT uidnext, uidvalidity FROM folders "
                                             "WHERE id = %s", (foreign,))
    target = await server.core.router.resolve(mine["email"], "a@example.com")
    server.core.ingest.known_folders.remember(
        target.org_id, target.inbox_id, "INBOX",
        {"id": foreign, "name": "INBOX", "uidvalidity": uidvalidity})
    stored = await _store(server, mine, make_message(subject="mine", msgid="<m1@x>"))
    assert gc.stale_guesses == 1
    folder, _, uid, inbox_id = _row(db_dsn, stored)
    assert (folder, uid, inbox_id) == (_inbox_folder(db_dsn, mine), 1, mine["id"])
    assert query(db_dsn, "SELECT uidnext FROM folders WHERE id = %s", (foreign,)) \
        == [(uidnext,)]
    assert query(db_dsn, "SELECT count(*) FROM messages WHERE folder_id = %s",
                 (foreign,)) == [(1,)]


@pytest_twisted.ensureDeferred
async def test_a_parent_arriving_after_its_reply_joins_the_reply_thread(server, db_dsn):
    """The reply came first and refers to <p@x>: the parent names no parent itself, so
    its thread is guessed new; the write finds the reply and it is looked up instead."""
    [inbox], gc = await _setup(server, "late-parent")
    reply = await _store(server, inbox, make_message(subject="Re: plan", msgid="<c@x>",
                                                     in_reply_to="<p@x>", references="<p@x>"))
    assert gc.guessed == 0  # a reply is never guessed
    parent = await _store(server, inbox, make_message(subject="plan", msgid="<p@x>"))
    assert (gc.guessed, gc.stale_guesses) == (1, 1)
    assert _row(db_dsn, parent)[1] == _row(db_dsn, reply)[1]
    assert query(db_dsn, "SELECT message_count FROM threads WHERE org_id = %s AND id = %s",
                 (reply.org_id, _row(db_dsn, reply)[1])) == [(2,)]


@pytest_twisted.ensureDeferred
async def test_the_same_bytes_twice_are_one_blob_counted_twice(server, db_dsn):
    [inbox], gc = await _setup(server, "dedup")
    raw = make_message(subject="same", msgid="<same@x>")
    await _store(server, inbox, make_message(subject="prime", msgid="<prime@x>"))
    first = await _store(server, inbox, raw)
    second = await _store(server, inbox, raw)
    assert gc.guessed == 2
    assert first.raw_blob_key == second.raw_blob_key
    assert query(db_dsn, "SELECT refcount, length(data) > 0 FROM blobs WHERE key = %s",
                 (first.raw_blob_key,)) == [(2, True)]


@pytest_twisted.ensureDeferred
async def test_a_batch_is_guessed_whole_and_asked_again_whole(server, db_dsn):
    """Deliveries gathered in one batch share the guess: when one of them would join an
    existing thread the whole batch is staged by asking, and every message lands where
    the staging puts it."""
    [inbox], _ = await _setup(server, "batched")
    clock = task.Clock()
    gc = GroupCommit(server.core.db, clock, max_batch=16, delay_s=1.0, parallel=1)
    server.core.ingest.group_commit = gc
    target = await server.core.router.resolve(inbox["email"], "a@example.com")

    async def batch(raws: list[bytes]) -> list:
        pending = [defer.ensureDeferred(server.core.ingest.store(
            [target], io.BytesIO(raw), envelope_from="a@example.com", group=True))
            for raw in raws]
        await _wait_pending(gc, len(raws))
        clock.advance(1.0)
        return [s for [s] in await defer.gatherResults(pending)]

    reply, _ = await batch([make_message(subject="Re: p", msgid="<c@b>", references="<p@b>"),
                            make_message(subject="prime", msgid="<q@b>")])
    assert (gc.guessed, gc.stale_guesses) == (0, 0)  # a reply in it: asked
    plain = await batch([make_message(subject=f"n{n}", msgid=f"<n{n}@b>") for n in range(4)])
    assert (gc.guessed, gc.stale_guesses) == (1, 0)
    assert [_row(db_dsn, s)[2] for s in plain] == [3, 4, 5, 6]
    before = gc.batches
    mixed = await batch([make_message(subject="p", msgid="<p@b>"),
                         make_message(subject="other", msgid="<o@b>")])
    assert (gc.guessed, gc.stale_guesses) == (2, 1)  # <p@b> has a reply stored
    assert gc.batches - before == 2  # guessed, then asked: together, not one by one
    assert _row(db_dsn, mixed[0])[1] == _row(db_dsn, reply)[1]
    assert _row(db_dsn, mixed[1])[1] not in {_row(db_dsn, reply)[1]}
    assert sorted(_row(db_dsn, s)[2] for s in mixed) == [7, 8]
    assert query(db_dsn, "SELECT count(*), count(DISTINCT uid) FROM messages "
                         "WHERE inbox_id = %s", (inbox["id"],)) == [(8, 8)]
