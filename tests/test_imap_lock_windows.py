"""Lock windows of IMAP writes (issue 10, speed under mixed load).

Every write to a folder locks its row (UIDNEXT, HIGHESTMODSEQ) until COMMIT. STORE,
EXPUNGE, COPY and MOVE send the statements that take it together with the COMMIT
(storage.imap_commits.commit_with), so no round trip to the server -- whose reactor may be busy
-- happens while the row is held. These tests pin that down on the SQL actually sent,
and check commit_with itself: its result crosses the COMMIT, a failure before the
COMMIT leaves nothing behind, and the connection goes back to the pool usable.
"""

from __future__ import annotations

import re

import pytest
import pytest_twisted

from agentpost.model.errors import InvalidRequest
from agentpost.storage import imap_commits, usage
from agentpost.storage.database import Txn
from tests.mailfactory import make_message

_FOLDER_WRITE = re.compile(r"UPDATE folders", re.IGNORECASE)


async def _account(server):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "windows"},
                                   key=owner)).json
    account = await server.core.imap_logins.authenticate(inbox["email"], owner, "127.0.0.1")
    for n in range(6):
        await server.deliver(make_message(subject=f"m{n}", msgid=f"<w{n}@x>"),
                             [inbox["email"]])
    return account



def _folder_writes(messages: list[str]) -> list[str]:
    return [m for m in messages if _FOLDER_WRITE.search(m)]


@pytest_twisted.ensureDeferred
async def test_store_expunge_copy_move_commit_with_their_folder_write(server, sent):
    account = await _account(server)
    await account.create_folder("Archive")
    folder, snap = await account.select("INBOX")
    uids = [m.uid for m in snap.messages]
    checks = {
        "store": lambda: folder.store(uids[:2], "+", frozenset({"\\Deleted", "$Work"}), None),
        "expunge": lambda: folder.expunge(None),
        "copy": lambda: folder.copy(uids[2:4], "Archive"),
        "move": lambda: folder.move(uids[4:], "Archive"),
    }
    for name, run in checks.items():
        sent.clear()
        await run()
        writes = _folder_writes(sent)
        assert writes, name
        for message in writes:  # the folder row's lock ends in the same message
            assert "; COMMIT; BEGIN; " in message, (name, message[:200])
    _, snap = await account.select("Archive")
    assert len(snap.messages) == 4
    assert [m.uid for m in snap.messages] == [1, 2, 3, 4]
    _, snap = await account.select("INBOX")
    assert [m.uid for m in snap.messages] == uids[2:4]  # expunged 1-2, moved 5-6


@pytest_twisted.ensureDeferred
async def test_commit_with_returns_its_result_past_the_commit(server):
    account = await _account(server)
    _, snap = await account.select("INBOX")
    org, db = account.principal.org_id, server.core.db
    hooks: list[str] = []

    async def bump(txn: Txn) -> int:
        txn.after_commit(hooks.append, "committed")
        return await imap_commits.commit_with(
            txn, "UPDATE folders SET highestmodseq = highestmodseq + 1 "
                 "WHERE org_id = %s AND name = 'INBOX'", [org],
            "SELECT highestmodseq FROM folders WHERE org_id = %s AND name = 'INBOX'", [org])

    modseq = await db.run_interaction("t.bump", bump)
    assert modseq == snap.highestmodseq + 1 and hooks == ["committed"]
    # Committed: another connection sees it; and the pooled connection is reusable.
    rows = await db.run_query("t.read", "SELECT highestmodseq FROM folders "
                              "WHERE org_id = %s AND name = 'INBOX'", (org,))
    assert rows[0]["highestmodseq"] == modseq
    assert await db.run_interaction("t.bump", bump) == modseq + 1


@pytest_twisted.ensureDeferred
async def test_commit_with_failure_before_the_commit_leaves_nothing(server):
    account = await _account(server)
    _, snap = await account.select("INBOX")
    org, db = account.principal.org_id, server.core.db
    hooks: list[str] = []

    async def broken(txn: Txn) -> None:
        txn.after_commit(hooks.append, "committed")
        await imap_commits.commit_with(
            txn, "UPDATE folders SET highestmodseq = highestmodseq + 1 "
                 "WHERE org_id = %s AND name = 'INBOX'; SELECT 1 / 0", [org])

    with pytest.raises(InvalidRequest):  # the translated DataError
        await db.run_interaction("t.broken", broken)
    assert hooks == []
    rows = await db.run_query("t.read", "SELECT highestmodseq FROM folders "
                              "WHERE org_id = %s AND name = 'INBOX'", (org,))
    assert rows[0]["highestmodseq"] == snap.highestmodseq


_EXPUNGE_WORK = ("DELETE FROM messages", "inbox_usage_deltas", "pg_advisory_xact_lock",
                 "UPDATE blobs", "DELETE FROM blobs", "UPDATE threads", "DELETE FROM threads",
                 "UPDATE folders")


@pytest_twisted.ensureDeferred
async def test_expunge_sends_its_whole_change_with_the_commit(server, sent):
    """EXPUNGE's deletions, blob releases, usage deltas, thread summaries and folder
    mark travel in ONE message with the COMMIT, with the same effects as before."""
    account = await _account(server)
    await account.create_folder("Keep")
    folder, snap = await account.select("INBOX")
    uids = [m.uid for m in snap.messages]
    await folder.copy(uids[:1], "Keep")  # its blob and thread stay in use
    await folder.store(uids[:3], "+", frozenset({"\\Deleted"}), None)
    org, db = account.principal.org_id, server.core.db
    gone = await db.run_query(
        "t.read", "SELECT m.raw_blob_key, m.thread_id, m.size, m.inbox_id, f.highestmodseq "
        "FROM messages m JOIN folders f ON f.org_id = m.org_id AND f.id = m.folder_id "
        "WHERE m.org_id = %s AND f.name = 'INBOX' AND m.uid = ANY(%s) ORDER BY m.uid",
        (org, uids[:3]))
    inbox_id, modseq = gone[0]["inbox_id"], gone[0]["highestmodseq"]
    used = await db.run_interaction("t.use", usage.inbox_usage, org, inbox_id)
    collected: list[str] = []
    real_collect = account._collector.collect

    async def spy_collect(keys):
        collected.extend(keys)
        await real_collect(keys)

    account._collector.collect = spy_collect
    sent.clear()
    assert sorted(await folder.expunge(None)) == uids[:3]

    commits = [m for m in sent if "; COMMIT; " in m]
    assert len(commits) == 1
    for part in _EXPUNGE_WORK:
        assert part in commits[0], part
    for message in sent[:sent.index(commits[0])]:  # (the blob GC runs after it)
        assert not any(part in message for part in _EXPUNGE_WORK), message[:200]
    # Blobs: the copied message's still referenced, the others released and collected.
    keys = [g["raw_blob_key"] for g in gone]
    rows = await db.run_query("t.read", "SELECT key, refcount FROM blobs WHERE key = ANY(%s)",
                              (keys,))
    assert [(r["key"], r["refcount"]) for r in rows] == [(keys[0], 1)]
    assert sorted(collected) == sorted(keys[1:])
    # Threads: the kept one summarized again, the emptied ones removed.
    rows = await db.run_query("t.read", "SELECT id, message_count FROM threads "
                              "WHERE org_id = %s AND id = ANY(%s)",
                              (org, [g["thread_id"] for g in gone]))
    assert [(r["id"], r["message_count"]) for r in rows] == [(gone[0]["thread_id"], 1)]
    # Usage given back; one new MODSEQ, remembered as the folder's last expunge.
    after = await db.run_interaction("t.use", usage.inbox_usage, org, inbox_id)
    assert used - after == sum(g["size"] for g in gone)
    rows = await db.run_query("t.read", "SELECT highestmodseq, expunged_modseq FROM folders "
                              "WHERE org_id = %s AND name = 'INBOX'", (org,))
    assert rows[0]["highestmodseq"] == rows[0]["expunged_modseq"] == modseq + 1
    _, snap = await account.select("INBOX")
    assert [m.uid for m in snap.messages] == uids[3:]
