"""The IMAP backend over the real store: folders, UIDs, flags, copy/move/expunge, search,
change detection, and wake-ups across processes (LISTEN/NOTIFY)."""

from datetime import date

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.imap.interfaces import FetchWants
from agentpost.model.errors import Conflict, NotFound, Unauthenticated
from agentpost.storage import imap as imap_store
from agentpost.storage.mail import MAIL_CHANNEL
from agentpost.storage.notify import Notifier
from tests.mailfactory import make_message


async def _account(server, username="imapper", scopes=None):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username},
                                   key=owner)).json
    key = owner
    if scopes is not None:
        key = (await server.api.post("/api/v1/api-keys", {"scopes": scopes},
                                     key=owner)).json["key"]
    account = await server.core.imap_logins.authenticate(inbox["email"], key, "127.0.0.1")
    return account, inbox, owner


@pytest_twisted.ensureDeferred
async def test_login_rules(server):
    """Right key logs in; other orgs' keys, unknown inboxes and keys without
    messages:read are refused alike; repeated failures are throttled."""
    account, inbox, owner = await _account(server)
    assert account.address == inbox["email"] and account.can_write
    _, other_key = await server.new_org("Other")
    for user, password in ((inbox["email"], other_key), ("ghost@agents.test", owner),
                           (inbox["email"], "ap_sk_" + "x" * 43)):
        with pytest.raises(Unauthenticated):
            await server.core.imap_logins.authenticate(user, password, "10.9.9.9")
    no_read = (await server.api.post("/api/v1/api-keys", {"scopes": ["inboxes:read"]},
                                     key=owner)).json["key"]
    with pytest.raises(Unauthenticated):
        await server.core.imap_logins.authenticate(inbox["email"], no_read, "127.0.0.2")
    read_only = (await server.api.post("/api/v1/api-keys", {"scopes": ["messages:read"]},
                                       key=owner)).json["key"]
    ro = await server.core.imap_logins.authenticate(inbox["email"], read_only, "127.0.0.3")
    assert ro.can_write is False


@pytest_twisted.ensureDeferred
async def test_folders_uids_flags_copy_move_expunge(server):
    """The mail model end to end on the real store."""
    account, inbox, key = await _account(server)
    names = {f.name: f.special_use for f in await account.list_folders()}
    assert names == {"INBOX": None, "Sent": "\\Sent", "Drafts": "\\Drafts",
                     "Trash": "\\Trash", "Junk": "\\Junk"}
    for i in range(3):
        await server.deliver(make_message(subject=f"m{i}", msgid=f"<m{i}@x>"),
                             [inbox["email"]])
    folder, snap = await account.select("inbox")
    assert [m.uid for m in snap.messages] == [1, 2, 3] and snap.uidnext == 4
    assert all("\\Seen" not in m.flags for m in snap.messages)

    rows = await folder.fetch([1, 2, 3], FetchWants())
    assert [r.size for r in rows] == [None, None, None]  # FLAGS-only fetch reads no more
    assert [r.blob_ref for r in rows] == [None, None, None]
    rows = await folder.fetch([2], FetchWants(size=True, internaldate=True))
    raw = await folder.read_message(rows[0])  # no content fetched: looked up by UID
    assert rows[0].size == len(raw) and b"Subject: m1" in raw
    [with_content] = await folder.fetch([2], FetchWants(content=True))
    assert await folder.read_message(with_content) == raw  # by the row's own blob
    assert await folder.read_range(with_content, 0, 8) == raw[:8]

    changed, failed = await folder.store([1, 2], "+", frozenset({"\\Flagged", "urgent"}),
                                         None)
    assert failed == [] and all({"\\Flagged", "urgent"} <= m.flags for m in changed)
    api_msg = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?labels=urgent",
                                    key=key)).json["data"]
    assert len(api_msg) == 2 and all(m["flagged"] for m in api_msg)  # keywords are labels
    stale, failed = await folder.store([1], "-", frozenset({"\\Flagged"}), unchangedsince=1)
    assert failed == [1] and stale == []

    await account.create_folder("Projects/2026")
    assert {"Projects", "Projects/2026"} <= {f.name for f in await account.list_folders()}
    with pytest.raises(Conflict):
        await account.create_folder("Projects")
    validity, pairs = await folder.copy([1], "Projects/2026")
    assert pairs == [(1, 1)]
    validity, pairs = await folder.move([3], "Projects")
    assert pairs == [(3, 1)]
    _, moved = await account.select("Projects")
    assert moved.uidvalidity == validity and [m.uid for m in moved.messages] == [1]

    await folder.store([2], "+", frozenset({"\\Deleted"}), None)
    assert await folder.expunge(None) == [2]
    _, after = await account.select("INBOX")
    assert [m.uid for m in after.messages] == [1]
    with pytest.raises(NotFound):
        await account.append("Nowhere", b"Subject: x\r\n\r\nx\r\n", frozenset(), None)
    uidvalidity, uid = await account.append("Drafts", b"Subject: draft\r\n\r\nbody\r\n",
                                            frozenset({"\\Draft", "\\Seen"}), None)
    _, drafts = await account.select("Drafts")
    assert drafts.uidvalidity == uidvalidity and drafts.messages[0].uid == uid
    assert {"\\Draft", "\\Seen"} <= drafts.messages[0].flags
    await account.rename_folder("Projects", "Archive")
    assert "Archive/2026" in {f.name for f in await account.list_folders()}
    await account.delete_folder("Archive/2026")
    assert "Archive/2026" not in {f.name for f in await account.list_folders()}


@pytest_twisted.ensureDeferred
async def test_search_translates_to_sql(server):
    """SEARCH keys become SQL conditions over the stored fields."""
    account, inbox, _ = await _account(server)
    await server.deliver(make_message(subject="Invoice 42", body="pay now\n",
                                      frm="Billing <billing@shop.example>"), [inbox["email"]])
    await server.deliver(make_message(subject="Hello", body="just saying hi\n",
                                      extra_headers=[("X-Priority", "1")]), [inbox["email"]])
    folder, _ = await account.select("INBOX")
    await folder.store([2], "+", frozenset({"\\Seen"}), None)
    cases = [
        (("all",), [1, 2]),
        (("header", "subject", "invoice"), [1]),
        (("header", "from", "shop.example"), [1]),
        (("header", "x-priority", "1"), [2]),
        (("body", "SAYING"), [2]),
        (("text", "billing"), [1]),
        (("flag", "\\Seen", True), [2]),
        (("flag", "\\Seen", False), [1]),
        (("not", ("flag", "\\Seen", True)), [1]),
        (("or", ("uid", [1]), ("header", "subject", "hello")), [1, 2]),
        (("since", date(2000, 1, 1)), [1, 2]),
        (("before", date(2000, 1, 1)), []),
        (("senton", date(2026, 11, 29)), [1, 2]),
        (("larger", 1), [1, 2]),
        (("smaller", 10), []),
        (("and", [("keyword", "x", False), ("modseq", 1)]), [1, 2]),
    ]
    for key, expected in cases:
        assert await folder.search(key) == expected, key


@pytest_twisted.ensureDeferred
async def test_search_dates_in_their_own_zone_whole_address_fields_and_present_headers(server):
    """SENT* compare the Date field's own calendar date; FROM/TO/CC match display names,
    comments, every address and group names (decoded); HEADER x "" needs the field.
    Copies keep what SEARCH compares."""
    account, inbox, _ = await _account(server)
    messages = [
        ("From: =?utf-8?q?J=C3=B6rg?= <joerg@z.de> (the boss)\r\n"
         "To: Team: a@x.org, Second <second@y.org>;, third@w.org\r\n"
         "Date: Mon, 1 Jan 2024 23:30:00 -0500\r\n"
         "Subject: late evening\r\n"),
        ("From: plain@z.de\r\n"
         "To: other@x.org\r\n"
         "Cc: \"Carbon, Copy\" <cc@x.org>\r\n"
         "Date: Tue, 2 Jan 2024 00:30:00 +0200\r\n"
         "Subject:\r\n"),
        ("From: nodate@z.de\r\n"
         "To: other@x.org\r\n"),
    ]
    for head in messages:
        await server.deliver(f"{head}\r\nbody\r\n".encode(), [inbox["email"]])
    folder, _ = await account.select("INBOX")
    cases = [
        (("senton", date(2024, 1, 1)), [1]),  # 2024-01-02 04:30 UTC
        (("senton", date(2024, 1, 2)), [2]),  # 2024-01-01 22:30 UTC
        (("sentbefore", date(2024, 1, 2)), [1]),
        (("sentsince", date(2024, 1, 2)), [2]),
        (("not", ("senton", date(2024, 1, 1))), [2, 3]),
        (("header", "from", "j\u00f6rg"), [1]),  # a decoded display name
        (("header", "from", "THE BOSS"), [1]),  # a comment
        (("header", "to", "second"), [1]),  # a later address of the list
        (("header", "to", "third@w.org"), [1]),
        (("header", "to", "team"), [1]),  # a group name
        (("header", "cc", "carbon, copy"), [2]),
        (("header", "from", "email"), []),  # not the JSON the addresses are kept in
        (("header", "from", "%"), []),  # wildcards are text
        (("not", ("header", "cc", "x.org")), [1, 3]),  # no Cc field: NOT matches it
        (("header", "subject", ""), [1, 2]),  # an empty Subject field is a field
        (("header", "date", ""), [1, 2]),
        (("header", "cc", ""), [2]),
        (("header", "bcc", ""), []),
        (("header", "x-none", ""), []),
        (("not", ("header", "subject", "")), [3]),
    ]
    for key, expected in cases:
        assert await folder.search(key) == expected, key
    await account.create_folder("Copies")
    await folder.copy([1, 2, 3], "Copies")
    copies, _ = await account.select("Copies")
    for key, expected in cases:
        assert await copies.search(key) == expected, key


@pytest_twisted.ensureDeferred
async def test_changes_reach_other_sessions_across_processes(server, db_dsn):
    """A second notifier (standing in for another process) is woken by a delivery and a
    flag change; changes() then reports EXISTS and FETCH material."""
    account, inbox, key = await _account(server)
    await server.deliver(make_message(msgid="<c1@x>"), [inbox["email"]])
    folder, snap = await account.select("INBOX")
    other = Notifier(db_dsn, MAIL_CHANNEL, reactor=reactor, clock=reactor)
    await other.start()
    woken = []
    cancel = other.watch(str(folder.folder_id), lambda: woken.append(1))
    try:
        await server.deliver(make_message(msgid="<c2@x>"), [inbox["email"]])
        for _ in range(100):
            if woken:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert woken, "no notification arrived"
        msg_id = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                       key=key)).json["data"][-1]["id"]
        await server.api.patch(f"/api/v1/messages/{msg_id}", {"read": True}, key=key)
        got = await folder.changes([m.uid for m in snap.messages], snap.highestmodseq)
        assert [m.uid for m in got.new] == [2]
        assert [m.uid for m in got.changed] == [1] and "\\Seen" in got.changed[0].flags
        await server.api.delete(f"/api/v1/messages/{msg_id}", key=key)
        gone = await folder.changes([1, 2], got.highestmodseq)
        assert gone.expunged == [1]
    finally:
        cancel()
        other.stop()


@pytest_twisted.ensureDeferred
async def test_notifier_reconnects_after_database_restart(server, pg, db_dsn):
    """After PostgreSQL restarts, the listener comes back and wakes everyone once."""
    clock = task.Clock()
    notifier = Notifier(db_dsn, MAIL_CHANNEL, reactor=reactor, clock=clock)
    await notifier.start()
    woken = []
    notifier.watch("7", lambda: woken.append(1))
    try:
        pg.stop()
        for _ in range(100):
            if not notifier.connected:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert not notifier.connected
        pg.start()
        for _ in range(20):
            clock.advance(10)
            await task.deferLater(reactor, 0.05, lambda: None)
            if notifier.connected:
                break
        assert notifier.connected and woken
    finally:
        notifier.stop()
    await defer.succeed(None)


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_throttled_per_address_never_per_account(server):
    """After the allowance of failures, even the right key waits — from that client
    address; the owner from another address is not refused (strangers cannot lock an
    inbox); the buckets are shared by processes and refill with (injected) time.
    More in tests/test_login_guard.py."""
    from agentpost.auth.cred import build_portal
    from agentpost.core.blobrefs import BlobCollector
    from agentpost.core.imap_logins import IMAPLogins
    from agentpost.model.errors import RateLimited

    core = server.core
    clock = task.Clock()
    logins = IMAPLogins(build_portal(core.db), core.db, core.blobs, core.ingest,
                        BlobCollector(core.db, core.blobs), core.audit, clock, None,
                        failures_per_minute=3)
    _, inbox, key = await _account(server, "throttled")
    _, other_inbox, other_key = await _account(server, "bystander")
    for password in ("wrong-1", "wrong-2", "ap_sk_" + "y" * 43):
        with pytest.raises(Unauthenticated):
            await logins.authenticate(inbox["email"], password, "10.0.0.1")
    with pytest.raises(RateLimited):  # same address, right key
        await logins.authenticate(inbox["email"], key, "10.0.0.1")
    ok = await logins.authenticate(inbox["email"], key, "10.0.0.2")  # same account
    assert ok.address == inbox["email"]
    ok = await logins.authenticate(other_inbox["email"], other_key, "10.0.0.3")
    assert ok.address == other_inbox["email"]  # other accounts and addresses are unaffected
    # Another process (its own IMAPLogins) draws from the same allowance: PostgreSQL.
    elsewhere = IMAPLogins(build_portal(core.db), core.db, core.blobs, core.ingest,
                           BlobCollector(core.db, core.blobs), core.audit, clock, None,
                           failures_per_minute=3)
    with pytest.raises(RateLimited):
        await elsewhere.authenticate(inbox["email"], key, "10.0.0.1")
    clock.advance(60)
    assert (await logins.authenticate(inbox["email"], key, "10.0.0.1")).address == \
        inbox["email"]


@pytest_twisted.ensureDeferred
async def test_changes_check_known_uids_only_after_something_left(server):
    """The folder's expunge mark: flag changes and arrivals report no expunges without
    checking every known UID; an API delete, an IMAP expunge and a MOVE out all do."""
    account, inbox, key = await _account(server, "marks")
    for i in range(4):
        await server.deliver(make_message(subject=f"x{i}", msgid=f"<x{i}@x>"),
                             [inbox["email"]])
    folder, snap = await account.select("INBOX")
    known, since = [1, 2, 3, 4], snap.highestmodseq
    quiet = await folder.changes(known, since)
    assert (quiet.new, quiet.changed, quiet.expunged) == ([], [], [])

    async def raw_changes(since_modseq):  # the storage answer behind folder.changes
        return await server.core.db.run_interaction(
            "t", imap_store.changes, account.principal.org_id, folder.folder_id, 4, known,
            since_modseq)

    assert (await raw_changes(since))["present"] is None  # no UID check was made
    await folder.store([1], "+", frozenset({"\\Flagged"}), None)
    flagged = await folder.changes(known, since)
    assert [m.uid for m in flagged.changed] == [1] and flagged.expunged == []
    assert (await raw_changes(since))["present"] is None  # a flag change is no expunge
    since = flagged.highestmodseq
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                   key=key)).json["data"]
    victim = next(m for m in listed if m["subject"] == "x1")
    assert (await server.api.delete(f"/api/v1/messages/{victim['id']}", key=key)).status \
        == 204
    assert (await raw_changes(since))["present"] == {1, 3, 4}  # now the UIDs are checked
    deleted = await folder.changes(known, since)
    assert deleted.expunged == [2]
    since, known = deleted.highestmodseq, [1, 3, 4]
    await folder.move([3], "Trash")
    moved = await folder.changes(known, since)
    assert moved.expunged == [3]
    since, known = moved.highestmodseq, [1, 4]
    await folder.store([4], "+", frozenset({"\\Deleted"}), None)
    assert await folder.expunge(None) == [4]
    assert (await folder.changes(known, since)).expunged == [4]


@pytest_twisted.ensureDeferred
async def test_recent_marks_are_claimed_once_in_the_database(server):
    """\\Recent lives in the folder row: whichever session (or process) claims first."""
    account, inbox, _ = await _account(server, "recent")
    for i in range(2):
        await server.deliver(make_message(subject=f"r{i}", msgid=f"<r{i}@x>"),
                             [inbox["email"]])
    folder, _ = await account.select("INBOX")
    status = await account.status("INBOX")
    assert status.recent == 2
    rows = await folder.fetch([1, 2], FetchWants(content=True))
    sizes = [len(await folder.read_message(row)) for row in rows]
    assert status.size == sum(sizes)  # STATUS=SIZE: the stored bytes
    assert await folder.claim_recent(2, False) == 0  # EXAMINE: look only
    assert await folder.claim_recent(2, True) == 0  # first SELECT
    assert await folder.claim_recent(2, True) == 2  # anyone later
    assert (await account.status("INBOX")).recent == 0
    await server.deliver(make_message(subject="r2", msgid="<r2@x>"), [inbox["email"]])
    assert (await account.status("INBOX")).recent == 1
