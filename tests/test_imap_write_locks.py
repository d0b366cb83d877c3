"""Concurrent writes to one mailbox (issue 10, speed under mixed load): the lock order of
core.mail_changes holds on every path at once, and MODSEQs still rise in commit order.

STORE, EXPUNGE and COPY now take the hot inbox and folder rows in their last statement;
APPEND (ingest), COPY, MOVE and the API's read changes run against them here, on one
thread of messages, so thread rows, blob references, the inbox and both folders are all
contended. None may deadlock (PostgreSQL would abort one; the retry would hide it, so
the log is checked), and an observer polling for changes with the highest MODSEQ it has
seen must never miss a change (RFC 7162 §3.1.2: a later-committed change never gets a
lower MODSEQ).
"""

from __future__ import annotations

import logging

import pytest_twisted
from twisted.internet import defer

from agentpost.imap.interfaces import FetchWants
from agentpost.storage import usage
from tests.mailfactory import make_message


async def _account(server):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "locks"},
                                   key=owner)).json
    account = await server.core.imap_logins.authenticate(inbox["email"], owner, "127.0.0.1")
    return account, inbox, owner


def _reply(n: int) -> bytes:
    return make_message(subject=f"Re: plan {n}", msgid=f"<r{n}@x>", in_reply_to="<root@x>",
                        references="<root@x>")


@pytest_twisted.ensureDeferred
async def test_every_write_path_at_once_on_one_thread_never_deadlocks(server, caplog):
    account, inbox, key = await _account(server)
    await server.deliver(make_message(subject="plan", msgid="<root@x>"), [inbox["email"]])
    for n in range(12):
        await server.deliver(_reply(n), [inbox["email"]])
    await account.create_folder("Work")
    folder, snap = await account.select("INBOX")
    work, _ = await account.select("Work")
    uids = [m.uid for m in snap.messages]
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?limit=50",
                                   key=key)).json["data"]
    thread_id = listed[0]["thread_id"]
    assert {m["thread_id"] for m in listed} == {thread_id}

    async def stores(part: list[int]) -> None:
        for uid in part:
            await folder.store([uid], "+", frozenset({"\\Flagged", "$Label1", "todo"}), None)
            await folder.store([uid], "-", frozenset({"todo"}), None)

    async def appends() -> None:
        for n in range(100, 106):
            await account.append("INBOX", _reply(n), frozenset({"\\Seen", "urgent"}), None)

    async def expunges(part: list[int]) -> None:
        for uid in part:
            await folder.store([uid], "+", frozenset({"\\Deleted"}), None)
            await folder.expunge([uid])

    async def copies_and_moves() -> None:
        for uid in uids[8:10]:
            await folder.copy([uid], "Work")
        for uid in uids[10:12]:
            await folder.move([uid], "Work")
        for m in (await work.fetch(list(range(1, 10)), FetchWants()))[:2]:
            await work.move([m.uid], "INBOX")

    async def api_reads() -> None:
        for m in listed[:4]:
            await server.api.patch(f"/api/v1/messages/{m['id']}", {"read": True}, key=key)

    caplog.set_level(logging.INFO, logger="agentpost.storage.database")
    await defer.gatherResults([
        defer.ensureDeferred(stores(uids[:4])), defer.ensureDeferred(stores(uids[4:8])),
        defer.ensureDeferred(appends()), defer.ensureDeferred(expunges(uids[1:3])),
        defer.ensureDeferred(copies_and_moves()), defer.ensureDeferred(api_reads()),
    ], consumeErrors=True)
    assert not [r for r in caplog.records if "Deadlock" in r.getMessage()]

    # The thread's summary and the inbox's storage use are what the rows say.
    thread = (await server.api.get(f"/api/v1/threads/{thread_id}", key=key)).json
    assert thread["message_count"] == len(thread["messages"]) == 13 + 6 + 2 - 2
    assert "urgent" in thread["labels"] and "todo" not in thread["labels"]
    in_inbox, _ = await account.select("INBOX")
    in_work, _ = await account.select("Work")
    sizes = [r.size for f in (in_inbox, in_work)
             for r in await f.fetch(list(range(1, 100)), FetchWants(size=True))]
    used = await server.core.db.run_read(
        "used", lambda txn: txn.fetchval(  # the folded use plus pending deltas (issue 12)
            f"SELECT {usage.used_sql('i')} FROM inboxes i WHERE i.id = %s", (inbox["id"],)))
    assert used == sum(s or 0 for s in sizes)


@pytest_twisted.ensureDeferred
async def test_concurrent_stores_modseqs_follow_commit_order(server):
    """Four sessions STORE into one folder at once while a fifth polls for changes with
    the highest MODSEQ it has seen: it must see every change, each with the MODSEQ its
    STORE returned, and the MODSEQs must all differ."""
    account, inbox, _ = await _account(server)
    for n in range(16):
        await server.deliver(make_message(subject=f"m{n}", msgid=f"<m{n}@x>"),
                             [inbox["email"]])
    folder, snap = await account.select("INBOX")
    uids = [m.uid for m in snap.messages]
    returned: dict[tuple[int, int], None] = {}
    done = False

    async def writer(part: list[int]) -> None:
        for uid in part:
            for flag in ("\\Flagged", "$Label2", "\\Answered"):
                [meta], _ = await folder.store([uid], "+", frozenset({flag}), None)
                returned[(meta.uid, meta.modseq)] = None

    seen: set[tuple[int, int]] = set()
    highest = snap.highestmodseq

    async def observer() -> None:
        nonlocal highest
        while True:
            finished = done  # read before polling: the last poll sees everything
            changes = await folder.changes(uids, highest)
            seen.update((m.uid, m.modseq) for m in changes.changed)
            highest = max(highest, changes.highestmodseq)
            if finished:
                return

    watching = defer.ensureDeferred(observer())
    await defer.gatherResults([defer.ensureDeferred(writer(uids[i::4])) for i in range(4)],
                              consumeErrors=True)
    done = True
    await watching
    modseqs = [m for _, m in returned]
    assert len(modseqs) == len(set(modseqs)) == 16 * 3
    # Each message's last change is what a poller must have seen (earlier ones of the
    # same message may be folded into it); none may have been skipped over.
    last = {}
    for uid, modseq in returned:
        last[uid] = max(last.get(uid, 0), modseq)
    assert set(last.items()) <= seen
    assert highest == max(modseqs)
