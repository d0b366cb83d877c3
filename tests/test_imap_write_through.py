"""A session's own flag change goes into the process's mirror of the folder as it
commits (core.imap_poll.FolderMirror.wrote), so neither the writer nor the other
sessions of the process wait for a catch-up query on its account; a write of one folder
no longer sends the sessions of the inbox's other folders to the database
(FolderMirrors.touched); an EXPUNGE with nothing to remove costs one unlocked read; a
STORE that changes nothing ends without a WAL flush (issue 10, speed)."""

import pytest_twisted
from twisted.internet import reactor, task

from agentpost.core.imap_poll import FolderMirror
from agentpost.imap.interfaces import MessageMeta
from agentpost.storage import mail as mail_store
from agentpost.storage.database import Txn
from tests.mailfactory import make_message
from tests.test_imap_backend import _account

_DELTA = "AS present FROM f"  # storage.imap.folder_delta, the shared poll


def _loaded(highestmodseq: int = 5) -> FolderMirror:
    mirror = FolderMirror("org", "inbox", 1)
    mirror._apply({"highestmodseq": highestmodseq, "expunged_modseq": 0, "recent_uid": 0,
                   "present": None, "messages": [
                       {"uid": u, "modseq": u, "seen": False, "flagged": False,
                        "answered": False, "draft": False, "deleted": u == 3, "labels": [],
                        "keyword_spellings": None} for u in (1, 2, 3)]})
    mirror.current_to = mirror.generation
    return mirror


def test_wrote_takes_the_next_modseq_and_stays_current():
    mirror = _loaded()
    mark = mirror.mark()
    mirror.heard()  # one NOTIFY during the write: before it, or its own
    flagged = MessageMeta(2, 6, frozenset({"\\Flagged"}))
    assert mirror.wrote(mark, 6, [flagged])
    assert mirror.highestmodseq == 6 and mirror.current_to == mirror.generation
    seen = mirror.changes([1, 2, 3], 5)
    assert seen.changed == [flagged] and seen.highestmodseq == 6


def test_wrote_leaves_a_catch_up_owed_after_two_notifies_or_a_forced_poll():
    for disturb in ("two notifies", "forced poll"):
        mirror = _loaded()
        mark = mirror.mark()
        mirror.heard()
        if disturb == "two notifies":
            mirror.heard()  # the second may be of a change after ours
        else:
            mirror.generation += 1  # a NOOP wants the database as it is now
        assert mirror.wrote(mark, 6, [MessageMeta(2, 6, frozenset({"\\Seen"}))])
        assert mirror.highestmodseq == 6  # held, but not current
        assert mirror.current_to < mirror.generation


def test_wrote_refuses_a_gap_and_knows_what_it_read():
    mirror = _loaded()
    assert not mirror.wrote(mirror.mark(), 8, [MessageMeta(2, 8, frozenset())])
    assert mirror.highestmodseq == 5 and mirror.meta[2].modseq == 2  # untouched
    assert mirror.wrote(mirror.mark(), 4, [MessageMeta(2, 4, frozenset())])  # read it
    assert not mirror.wrote(mirror.mark(), 6, [MessageMeta(9, 6, frozenset())])  # unknown


def test_any_flagged_is_the_expunge_hint():
    mirror = _loaded()
    assert mirror.any_flagged("\\Deleted", None)
    assert mirror.any_flagged("\\Deleted", [2, 3])
    assert not mirror.any_flagged("\\Deleted", [1, 2, 7])


async def _settled(folder, known, since) -> None:
    """The folder's mirror has heard every NOTIFY committed so far and caught up: a
    marker NOTIFY of our own is heard last (PostgreSQL delivers them in commit order).
    Without it a delivery's late NOTIFY could land during the write under test, which by
    design leaves a catch-up owed, and the test would fail for a reason it does not test."""
    account = folder.account
    mirror = account._mirrors.get(account._org, account._inbox_id, folder.folder_id)
    heard = mirror.notified
    await account._db.run_interaction(
        "test", lambda txn: mail_store.notify_folder(txn, folder.folder_id))
    for _ in range(500):
        if mirror.notified > heard:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    else:
        raise AssertionError("the marker NOTIFY never arrived")
    await folder.changes(known, since, fresh=False)


async def two_sessions(server, name: str, messages: int = 3):
    """Two sessions of one process with INBOX selected (``messages`` delivered first):
    (account A, A's folder, B's folder, the UIDs known, the MODSEQ known)."""
    account_a, inbox, owner = await _account(server, name)
    for i in range(messages):
        await server.deliver(make_message(subject=f"t{i}", msgid=f"<t{i}.{name}@x>"),
                             [inbox["email"]])
    account_b = await server.core.imap_logins.authenticate(inbox["email"], owner,
                                                           "127.0.0.1")
    folder_a, snap = await account_a.select("INBOX")
    folder_b, _ = await account_b.select("INBOX")
    return account_a, folder_a, folder_b, [m.uid for m in snap.messages], snap.highestmodseq


@pytest_twisted.ensureDeferred
async def test_own_store_is_seen_by_another_session_without_a_query(server, sent):
    _, folder_a, folder_b, known, since = await two_sessions(server, "writethrough")
    await _settled(folder_b, known, since)  # the mirror is current, nothing in flight
    stored, failed = await folder_a.store([2], "+", frozenset({"\\Flagged", "$Mine"}), None)
    assert failed == [] and [m.uid for m in stored] == [2]
    sent.clear()
    seen = await folder_b.changes(known, since, fresh=False)
    assert [(m.uid, m.flags) for m in seen.changed] == \
        [(2, frozenset({"\\Flagged", "$Mine"}))]
    assert seen.highestmodseq == stored[0].modseq
    assert not [m for m in sent if _DELTA in m]  # from memory
    # NOOP (fresh) still reads the database as it is now, and agrees.
    again = await folder_b.changes(known, since)
    assert again.changed == seen.changed


@pytest_twisted.ensureDeferred
async def test_store_that_changes_nothing_rolls_back(server, monkeypatch):
    account, inbox, _ = await _account(server, "storenothing")
    await server.deliver(make_message(subject="n", msgid="<n@x>"), [inbox["email"]])
    folder, _ = await account.select("INBOX")
    await folder.store([1], "+", frozenset({"\\Seen"}), None)
    by_txn: list[tuple[int, str]] = []  # (transaction, message): the process's timers
    original = Txn._send  # (usage fold, audit flush) commit meanwhile in theirs

    async def spy(self, sql, params):
        by_txn.append((id(self), sql))
        return await original(self, sql, params)

    monkeypatch.setattr(Txn, "_send", spy)
    stored, _ = await folder.store([1], "+", frozenset({"\\Seen"}), None)
    assert [m.flags for m in stored] == [frozenset({"\\Seen"})]
    [store_txn] = {t for t, sql in by_txn if sql.strip() == "ROLLBACK"}
    assert not any("COMMIT" in sql for t, sql in by_txn if t == store_txn)


@pytest_twisted.ensureDeferred
async def test_expunge_with_nothing_deleted_reads_once_without_a_lock(server, sent):
    account, inbox, _ = await _account(server, "expungenothing")
    for i in range(2):
        await server.deliver(make_message(subject=f"e{i}", msgid=f"<e{i}@x>"),
                             [inbox["email"]])
    folder, snap = await account.select("INBOX")
    await _settled(folder, [m.uid for m in snap.messages], snap.highestmodseq)
    sent.clear()
    assert await folder.expunge(None) == []
    # the expunge's own statements (the process's timers may send theirs meanwhile)
    mine = [m for m in sent if "FROM messages" in m and "deleted" in m]
    assert len(mine) == 1
    assert not any(w in mine[0] for w in ("FOR UPDATE", "FOR NO KEY UPDATE", "BEGIN"))
    # \\Deleted the mirror does not show (it has not heard yet): the read finds it
    await folder.store([1], "+", frozenset({"\\Deleted"}), None)
    mirror = account._mirrors.get(account._org, account._inbox_id, folder.folder_id)
    mirror.meta[1] = MessageMeta(1, mirror.meta[1].modseq, frozenset())
    assert await folder.expunge([1, 2]) == [1]
