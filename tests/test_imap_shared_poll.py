"""One change poll per folder per process (core.imap_poll): sessions of one process
that have the same folder selected are answered from one reading of it, taken after
the wake-up (LISTEN/NOTIFY) that made them look; each still hears of other sessions'
flag changes, new mail and expunges at the moments RFC 3501 allows (never an EXPUNGE
during FETCH, STORE or SEARCH by sequence number)."""

import time

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from agentpost.core.imap_poll import FolderMirror
from agentpost.imap.interfaces import MessageMeta
from tests.mailfactory import make_message
from tests.test_imap_backend import _account
from tests.test_imap_e2e import _inbox, _starttls

_DELTA = "AS present FROM f"  # storage.imap.folder_delta, the shared poll


async def _wait_for(predicate, what):
    """Until ``predicate()`` (a NOTIFY crossing the LISTEN link); a bounded number of
    reactor turns, no timing assertion."""
    for _ in range(500):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"never happened: {what}")


@pytest_twisted.ensureDeferred
async def test_one_query_serves_two_sessions_of_the_process(server, sent):
    account_a, inbox, owner = await _account(server, "sharedpoll")
    for i in range(3):
        await server.deliver(make_message(subject=f"s{i}", msgid=f"<s{i}@x>"),
                             [inbox["email"]])
    account_b = await server.core.imap_logins.authenticate(inbox["email"], owner,
                                                           "127.0.0.1")
    writer = await server.core.imap_logins.authenticate(inbox["email"], owner, "127.0.0.1")
    folder_a, snap = await account_a.select("INBOX")
    folder_b, _ = await account_b.select("INBOX")
    woken = {"a": 0, "b": 0}
    unwatch_a = folder_a.watch(lambda: woken.__setitem__("a", woken["a"] + 1))
    unwatch_b = folder_b.watch(lambda: woken.__setitem__("b", woken["b"] + 1))
    known, since = [m.uid for m in snap.messages], snap.highestmodseq
    try:
        # A flag change by another session of the process, then new mail from SMTP
        # (whose only signal is its NOTIFY); both sessions are woken once it arrives.
        wfolder, _ = await writer.select("INBOX")
        await wfolder.store([1], "+", frozenset({"\\Flagged", "$Shared"}), None)
        await server.deliver(make_message(subject="s3", msgid="<s3@x>"), [inbox["email"]])
        await _wait_for(lambda: woken["a"] >= 2 and woken["b"] >= 2, "both woken")
        sent.clear()
        seen_a = await folder_a.changes(known, since, fresh=False)
        seen_b = await folder_b.changes(known, since, fresh=False)
        assert len([m for m in sent if _DELTA in m]) == 1  # one query for both
        assert not [m for m in sent if "unnest" in m]  # no per-session poll either
        for seen in (seen_a, seen_b):
            assert [(m.uid, m.flags) for m in seen.changed] == \
                [(1, frozenset({"\\Flagged", "$Shared"}))]
            assert [m.uid for m in seen.new] == [4] and seen.expunged == []
            assert seen.highestmodseq > since
        assert seen_a == seen_b
        # Nothing happened since: answered from memory, no query at all.
        sent.clear()
        quiet = await folder_a.changes([*known, 4], seen_a.highestmodseq, fresh=False)
        assert (quiet.new, quiet.changed, quiet.expunged) == ([], [], [])
        assert not [m for m in sent if _DELTA in m]
        # NOOP and CHECK (fresh) read the database as it is now.
        await folder_a.changes([*known, 4], seen_a.highestmodseq)
        assert len([m for m in sent if _DELTA in m]) == 1
    finally:
        unwatch_a()
        unwatch_b()


@pytest_twisted.ensureDeferred
async def test_expunge_elsewhere_reaches_both_sessions_from_the_shared_reading(server, sent):
    account_a, inbox, owner = await _account(server, "sharedgone")
    for i in range(4):
        await server.deliver(make_message(subject=f"g{i}", msgid=f"<g{i}@x>"),
                             [inbox["email"]])
    account_b = await server.core.imap_logins.authenticate(inbox["email"], owner,
                                                           "127.0.0.1")
    folder_a, snap = await account_a.select("INBOX")
    folder_b, _ = await account_b.select("INBOX")
    woken = [0]
    unwatch = folder_b.watch(lambda: woken.__setitem__(0, woken[0] + 1))
    known, since = [m.uid for m in snap.messages], snap.highestmodseq
    try:
        first = await folder_a.changes(known, since, fresh=False)  # the mirror is loaded
        assert (first.new, first.changed, first.expunged) == ([], [], [])
        listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                       key=owner)).json["data"]
        victim = next(m for m in listed if m["subject"] == "g2")
        assert (await server.api.delete(f"/api/v1/messages/{victim['id']}",
                                        key=owner)).status == 204
        await _wait_for(lambda: woken[0] >= 1, "the delete's NOTIFY")
        sent.clear()
        gone_a = await folder_a.changes(known, since, fresh=False)
        gone_b = await folder_b.changes(known, since, fresh=False)
        assert gone_a.expunged == gone_b.expunged == [3]
        assert len([m for m in sent if _DELTA in m]) == 1
        # a session that already knows (MODSEQ past the expunge) is not told again
        again = await folder_b.changes([1, 2, 4], gone_b.highestmodseq, fresh=False)
        assert again.expunged == []
    finally:
        unwatch()


def test_mirror_answers_like_the_per_session_query():
    """The change log and the comparison with the mirror (a session behind the log)
    give the same answers."""
    mirror = FolderMirror("org", "inbox", 1)

    def rows(*spec):
        return [{"uid": u, "modseq": ms, "seen": False, "flagged": fl, "answered": False,
                 "draft": False, "deleted": False, "labels": [], "keyword_spellings": None}
                for u, ms, fl in spec]

    mirror._apply({"highestmodseq": 5, "expunged_modseq": 0, "recent_uid": 0,
                   "present": None, "messages": rows((1, 1, False), (2, 2, False),
                                                     (3, 5, False))})
    mirror._apply({"highestmodseq": 8, "expunged_modseq": 8, "recent_uid": 0,
                   "present": [1, 3, 4], "messages": rows((1, 7, True), (4, 6, False))})
    flagged = MessageMeta(1, 7, frozenset({"\\Flagged"}))
    by_log = mirror.changes([1, 2, 3], 5)  # since >= the log's floor: from the log
    assert by_log.changed == [flagged] and by_log.expunged == [2]
    assert [m.uid for m in by_log.new] == [4] and by_log.highestmodseq == 8
    by_scan = mirror.changes([1, 2, 3], 1)  # behind the log: compared with the mirror
    assert by_scan.changed == [MessageMeta(1, 7, frozenset({"\\Flagged"})),
                               MessageMeta(3, 5, frozenset())]
    assert by_scan.expunged == [2]
    assert mirror.changes([1, 3, 4], 8).changed == []
    mirror._apply(None)  # the folder was deleted
    assert mirror.changes([1, 3, 4], 8).expunged == [1, 3, 4]


def _expect_fetch(imap, flag):
    """UID FETCH of message 2 until the session has been told, unasked, of ``flag`` on
    message 1 and of the new message (the changes reached it through the shared poll
    after their NOTIFY)."""
    told, exists = False, None
    for _ in range(200):
        _, fetched = imap.uid("FETCH", "2", "(UID)")  # its answer and unsolicited ones
        told = told or any(f.startswith(b"1 (") and flag.encode() in f
                           for f in fetched if isinstance(f, bytes))
        exists = (imap.untagged_responses.pop("EXISTS", None) or [exists])[-1]
        if told and exists == b"3":
            return exists
        time.sleep(0.01)
    raise AssertionError("the change never reached the session")


async def _inbox_with(server, name: str, prefix: str, count: int):
    """A new inbox holding ``count`` delivered messages."""
    inbox, key = await _inbox(server, name)
    for n in range(count):
        await server.deliver(make_message(to=inbox["email"], subject=f"{prefix}{n}",
                                          msgid=f"<{prefix}{n}@x>"), [inbox["email"]])
    return inbox, key


def _selected(server, inbox, key, count: int) -> list:
    """``count`` imaplib sessions (STARTTLS, logged in) with INBOX selected."""
    sessions = [_starttls(server.imap_port, inbox["email"], key) for _ in range(count)]
    for s in sessions:
        s.select("INBOX")
    return sessions


@pytest_twisted.ensureDeferred
async def test_two_imap_sessions_see_flags_and_new_mail_of_a_third(server):
    inbox, key = await _inbox_with(server, "sharedwire", "w", 2)

    def sessions():
        a, b, c = _selected(server, inbox, key, 3)
        c.store("1", "+FLAGS", "($Wire \\Flagged)")
        c.append("INBOX", "", None, make_message(subject="w2", msgid="<w2@x>"))
        c.logout()
        out = [_expect_fetch(s, "$Wire") for s in (a, b)]
        for s in (a, b):
            s.logout()
        return out

    seen = await deferToThread(sessions)
    assert seen == [b"3", b"3"]


@pytest_twisted.ensureDeferred
async def test_no_expunge_during_fetch_store_search_with_a_shared_poll(server):
    inbox, key = await _inbox_with(server, "sharedexp", "x", 3)

    def sessions():
        a, b, c = _selected(server, inbox, key, 3)
        c.store("2", "+FLAGS", "(\\Deleted)")
        c.expunge()
        c.logout()
        for _ in range(200):  # b hears of it (UID FETCH may report an expunge)
            b.uid("FETCH", "1", "(FLAGS)")
            if b.untagged_responses.pop("EXPUNGE", None) == [b"2"]:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("b never heard of the expunge")
        early = []
        a.fetch("1", "(FLAGS)")
        early.append(a.untagged_responses.pop("EXPUNGE", None))
        a.store("1", "+FLAGS", "(\\Seen)")
        early.append(a.untagged_responses.pop("EXPUNGE", None))
        _, found = a.search(None, "ALL")
        early.append(a.untagged_responses.pop("EXPUNGE", None))
        a.noop()
        late = a.untagged_responses.pop("EXPUNGE", None)
        after = a.fetch("1:2", "(UID)")
        for s in (a, b):
            s.logout()
        return early, found, late, after

    early, found, late, after = await deferToThread(sessions)
    assert early == [None, None, None]  # RFC 3501 §7.4.1
    assert found == [b"1 3"]  # sequence numbers of the view, which still has 3
    assert late == [b"2"]
    assert after == ("OK", [b"1 (UID 1)", b"2 (UID 3)"])


@pytest_twisted.ensureDeferred
async def test_a_session_newer_than_the_mirror_makes_it_catch_up(server):
    """A session that selected after a change the mirror has not heard of yet must not
    be answered from the older reading (it could not tell what left the folder)."""
    account_a, inbox, owner = await _account(server, "sharedbehind")
    for i in range(2):
        await server.deliver(make_message(subject=f"b{i}", msgid=f"<b{i}@x>"),
                             [inbox["email"]])
    folder_a, snap_a = await account_a.select("INBOX")
    await folder_a.changes([1, 2], snap_a.highestmodseq, fresh=False)  # mirror at snap_a
    await server.deliver(make_message(subject="b2", msgid="<b2@x>"), [inbox["email"]])
    account_b = await server.core.imap_logins.authenticate(inbox["email"], owner,
                                                           "127.0.0.1")
    folder_b, snap_b = await account_b.select("INBOX")
    assert snap_b.highestmodseq > snap_a.highestmodseq
    seen = await folder_b.changes([1, 2, 3], snap_b.highestmodseq, fresh=False)
    assert (seen.new, seen.changed, seen.expunged) == ([], [], [])
    mirror = account_b._mirrors.get(account_b._org, account_b._inbox_id,
                                    folder_b.folder_id)
    assert mirror.highestmodseq >= snap_b.highestmodseq


@pytest_twisted.ensureDeferred
async def test_select_takes_the_messages_from_a_mirror_at_the_folders_modseq(server,
                                                                           monkeypatch):
    """SELECT reads only the messages that changed after the mirror's MODSEQ (none
    when the folder is there); either way the snapshot is the folder as it is."""
    from agentpost.storage import imap as imap_store

    returned = []
    original = imap_store.select_folder

    async def spy(*args, **kwargs):
        folder, rows = await original(*args, **kwargs)
        returned.append(len(rows))
        return folder, rows

    monkeypatch.setattr(imap_store, "select_folder", spy)
    account_a, inbox, owner = await _account(server, "sharedselect")
    for i in range(3):
        await server.deliver(make_message(subject=f"q{i}", msgid=f"<q{i}@x>"),
                             [inbox["email"]])
    folder_a, snap_a = await account_a.select("INBOX")
    await folder_a.changes([1, 2, 3], snap_a.highestmodseq, fresh=False)  # loads it
    account_b = await server.core.imap_logins.authenticate(inbox["email"], owner,
                                                           "127.0.0.1")
    returned.clear()
    _, snap_b = await account_b.select("inbox")
    assert returned == [0]  # the messages came from the mirror
    assert snap_b == snap_a
    await folder_a.store([2], "+", frozenset({"\\Seen", "Work"}), None)
    returned.clear()
    _, snap_c = await account_b.select("INBOX")
    assert returned == [0]  # the store went into the mirror as it committed (wrote)
    assert snap_c.highestmodseq > snap_a.highestmodseq
    assert [m.flags for m in snap_c.messages] == \
        [frozenset(), frozenset({"\\Seen", "Work"}), frozenset()]
    assert snap_c.first_unseen_uid == 1
    # something left: the UIDs still there come with the changes
    await folder_a.store([3], "+", frozenset({"\\Deleted"}), None)
    assert await folder_a.expunge(None) == [3]
    returned.clear()
    _, snap_d = await account_b.select("INBOX")
    assert [m.uid for m in snap_d.messages] == [1, 2] and returned == [0]
    _, fresh_read = await account_b.select("Trash")  # another folder: read whole
    assert fresh_read.messages == [] and returned == [0, 0]
    # new mail (another path): the folder moved on, what changed is read, no more
    await server.deliver(make_message(subject="q3", msgid="<q3@x>"), [inbox["email"]])
    returned.clear()
    _, snap_e = await account_b.select("INBOX")
    assert [m.uid for m in snap_e.messages] == [1, 2, 4] and returned == [1]


@pytest_twisted.ensureDeferred
async def test_the_shared_reading_of_a_foreign_folder_id_is_nothing(server):
    """The catch-up and SELECT's delta are scoped by the asking organization: naming
    another organization's folder id reads nothing of it."""
    from agentpost.storage import imap as imap_store

    account, inbox, _ = await _account(server, "sharedowner")
    await server.deliver(make_message(subject="secret", msgid="<secret@x>"),
                         [inbox["email"]])
    folder, _ = await account.select("INBOX")
    other, other_inbox, _ = await _account(server, "sharedthief")
    db = server.core.db
    own = await db.run_read("t", imap_store.folder_delta, account.principal.org_id,
                            folder.folder_id, -1, False)
    assert [r["uid"] for r in own["messages"]] == [1]
    assert await db.run_read("t", imap_store.folder_delta, other.principal.org_id,
                             folder.folder_id, -1, True) is None
    # SELECT of the thief's own INBOX with the victim's folder id as its "mirror"
    found, rows = await db.run_read("t", imap_store.select_folder,
                                    other.principal.org_id, other_inbox["id"], "INBOX",
                                    (folder.folder_id, 0))
    assert found["id"] != folder.folder_id and not found["delta"] and rows == []
    mirror = other._mirrors.get(other.principal.org_id, other_inbox["id"],
                                folder.folder_id)
    await mirror.current(db, True)
    assert mirror.deleted and mirror.meta == {}
    assert mirror.changes([1], 0).new == []
