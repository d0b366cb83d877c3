"""IMAP under mixed load (issue 10): what each command sends, and what it waits for.

Pinned down on the SQL actually sent: writes release the folder row before the WAL
flush yet are durable before they answer; SELECT is one statement; the \\Recent mark
has a row of its own, so claiming arrivals never queues behind a writer of the folder;
keyword spellings an inbox already has are not recorded again; UID lists travel as one
array literal.
"""

from __future__ import annotations

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from agentpost.core.imap_messages import RECORDED_SPELLINGS, RecordedSpellings
from tests.mailfactory import make_message


async def _account(server, username="mixed", messages=4):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username},
                                   key=owner)).json
    for n in range(messages):
        await server.deliver(make_message(subject=f"m{n}", msgid=f"<{username}{n}@x>"),
                             [inbox["email"]])

    async def login():
        return await server.core.imap_logins.authenticate(inbox["email"], owner, "127.0.0.1")

    return await login(), login



@pytest_twisted.ensureDeferred
async def test_store_commits_async_then_flushes_in_a_transaction_of_its_own(server, sent):
    """The folder row goes at COMMIT without waiting for the fsync; the trailing
    transaction takes an xid, so its COMMIT is synchronous and flushes the WAL (ours
    included) before the client hears OK. The write, both COMMITs and the result travel
    in one message (storage.database.Txn.commit_with)."""
    account, _ = await _account(server)
    folder, snap = await account.select("INBOX")
    sent.clear()
    changed, failed = await folder.store([snap.messages[0].uid], "+",
                                         frozenset({"\\Flagged"}), None)
    assert failed == [] and "\\Flagged" in changed[0].flags
    [write] = [m for m in sent if "UPDATE folders" in m]
    head, _, tail = write.partition("; COMMIT; BEGIN; ")
    assert "SET LOCAL synchronous_commit TO OFF" in head
    assert "synchronous_commit" not in tail and "pg_current_xact_id()" in tail
    # ...and the synchronous COMMIT of the xid transaction is in the same message.
    assert tail.split("pg_current_xact_id()", 1)[1].startswith("; COMMIT")
    assert changed[0].modseq > snap.highestmodseq


@pytest_twisted.ensureDeferred
async def test_select_is_one_statement_and_its_claim_needs_no_read(server, sent):
    account, login = await _account(server)

    def ours() -> list[str]:  # not the background writers' (audit log, webhooks...)
        return [m for m in sent if "folder" in m]

    sent.clear()
    folder, snap = await account.select("INBOX")
    assert len(ours()) == 1 and "BEGIN" not in ours()[0]  # one snapshot, no transaction
    top = snap.messages[-1].uid
    assert await folder.claim_recent(top, True) == 0  # all four were never claimed
    assert len(ours()) == 2 and "folder_recent" in ours()[1]
    # Another session: the mark SELECT read says all are claimed, nothing more is sent.
    other = await login()
    sent.clear()
    folder2, snap2 = await other.select("inbox")
    assert [m.uid for m in snap2.messages] == [m.uid for m in snap.messages]
    assert await folder2.claim_recent(top, True) == top
    assert len(ours()) == 1
    with pytest.raises(Exception, match="No such folder"):
        await other.select("Nope")


@pytest_twisted.ensureDeferred
async def test_recent_claim_does_not_wait_for_a_writer_of_the_folder(server, db_dsn):
    """A transaction holding the folder row (as every write does until COMMIT) does not
    delay a claim: the mark has its own row (migration 0029)."""
    account, login = await _account(server, "claims")
    folder, snap = await account.select("INBOX")
    top = snap.messages[-1].uid
    conn = psycopg2.connect(db_dsn)
    try:
        with conn.cursor() as cur:  # a writer holding the folder row, uncommitted
            cur.execute("UPDATE folders SET highestmodseq = highestmodseq + 1 "
                        "WHERE id = %s", (folder.folder_id,))
        claim = defer.ensureDeferred(folder.claim_recent(top - 1, True))
        claim.addTimeout(30, reactor)  # a safety net against a hang, not a speed check
        assert await claim == 0
        # The mark only rises, and each UID is claimed once.
        assert await folder.claim_recent(top, True) == top - 1
        assert await folder.claim_recent(top - 2, True) == top
    finally:
        conn.rollback()
        conn.close()
    status = await (await login()).status("INBOX")
    assert status.recent == 0
    await account.create_folder("Gone")
    gone, _ = await account.select("Gone")
    await gone.claim_recent(5, True)
    await account.delete_folder("Gone")  # its mark goes with it (ON DELETE CASCADE)
    assert await gone.claim_recent(6, True) == 0
    rows = await server.core.db.run_query(
        "t.recent", "SELECT count(*) AS n FROM folder_recent WHERE folder_id = %s",
        (gone.folder_id,))
    assert rows[0]["n"] == 0


@pytest_twisted.ensureDeferred
async def test_known_keyword_spellings_are_not_recorded_again(server, sent):
    account, _ = await _account(server, "spell", messages=1)
    folder, snap = await account.select("INBOX")
    sent.clear()
    await account.append("INBOX", make_message(subject="a"), frozenset({"$Work"}), None)
    assert sum("INSERT INTO keyword_spellings" in m for m in sent) == 1
    sent.clear()
    await account.append("INBOX", make_message(subject="b"), frozenset({"$WORK"}), None)
    assert not any("INSERT INTO keyword_spellings" in m for m in sent)
    sent.clear()
    changed, _ = await folder.store([snap.messages[0].uid], "+", frozenset({"$work"}), None)
    assert "$Work" in changed[0].flags  # the first spelling, from the cache
    assert not any("INSERT INTO keyword_spellings" in m for m in sent)
    # A new keyword in the same STORE is recorded, in the STORE's own round trip.
    sent.clear()
    changed, _ = await folder.store([snap.messages[0].uid], "+",
                                    frozenset({"$work", "Todo"}), None)
    assert {"$Work", "Todo"} <= changed[0].flags
    assert any("INSERT INTO keyword_spellings" in m for m in sent)
    _, snap = await account.select("INBOX")
    assert [sorted(m.flags) for m in snap.messages] == [["$Work", "Todo"], ["$Work"],
                                                        ["$Work"]]


def test_recorded_spellings_are_bounded_and_all_or_nothing():
    cache = RecordedSpellings(max_inboxes=2, max_keywords=2)
    a, b, c = ("org", "a"), ("org", "b"), ("org", "c")
    assert cache.lookup(a, []) == {}
    assert cache.lookup(a, ["$x"]) is None
    cache.learn(a, {"$x": "$X"})
    cache.learn(b, {"$y": "$y"})
    assert cache.lookup(a, ["$x"]) == {"$x": "$X"}
    assert cache.lookup(a, ["$x", "$z"]) is None
    assert cache.lookup(("other-org", "a"), ["$x"]) is None
    cache.learn(c, {"$z": "$Z"})  # b was the least recently used
    assert cache.lookup(b, ["$y"]) is None and cache.lookup(a, ["$x"]) is not None
    cache.learn(a, {"$p": "$p", "$q": "$q"})  # at most two per inbox
    assert cache.lookup(a, ["$x", "$p"]) is not None and cache.lookup(a, ["$q"]) is None
    assert isinstance(RECORDED_SPELLINGS, RecordedSpellings)


@pytest_twisted.ensureDeferred
async def test_uid_lists_travel_as_one_array_literal(server, sent):
    account, _ = await _account(server, "arrays", messages=5)
    folder, snap = await account.select("INBOX")
    uids = [m.uid for m in snap.messages]
    sent.clear()
    changes = await folder.changes(uids, 0)
    assert [m.uid for m in changes.changed] == uids and changes.expunged == []
    await folder.store(uids[:2], "+", frozenset({"\\Deleted"}), None)
    assert await folder.expunge(None) == uids[:2]
    changes = await folder.changes(uids, changes.highestmodseq)
    assert changes.expunged == uids[:2]
    by_uid = [m for m in sent if "uid = ANY" in m]
    assert by_uid and not any("ARRAY[" in m for m in by_uid)
