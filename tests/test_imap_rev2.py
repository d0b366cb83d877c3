"""IMAP4rev2 (RFC 9051) beside IMAP4rev1, as transcripts over real sockets on the real
store: what a client gets after ``ENABLE IMAP4rev2`` (no \\Recent, ESEARCH for SEARCH,
UTF-8 mailbox names, LIST at SELECT, OK [CLOSED]), and that a client that never enables
it sees exactly the IMAP4rev1 server it always saw."""

from __future__ import annotations

import unicodedata
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap import rev2
from agentpost.imap.parser import encode_mailbox
from tests.imap_client import Client
from tests.mailfactory import make_message
from tests.test_imap_protocol import FakeBackend, FakeStore, Session, _plain


@pytest.fixture
def offer_rev2(monkeypatch):
    """The IMAP4rev2 switch on (its default), with BINARY and SEARCHRES offered: RFC 9051
    requires both, and IMAP4rev2 is advertised only beside them."""
    monkeypatch.setattr(rev2, "OFFER_IMAP4REV2", True)


def _ok(client: Client, text: str) -> list[str]:
    """The untagged lines of a command that must succeed, decoded as UTF-8."""
    return [line.decode("utf-8") for line in client.ok(text)]


def _cmd(client: Client, text: str) -> list[str]:
    """Every line of a command's response, decoded as UTF-8."""
    return [line.decode("utf-8") for line in client.cmd(text)]


def _esearch(client: Client, text: str) -> list[str]:
    """The untagged lines of a search, its tag in ESEARCH written ``T``."""
    lines = _ok(client, text)
    return [line.replace(f'(TAG "{client.tag}")', '(TAG "T")') for line in lines]


async def _inbox(server, name: str, messages: int = 2):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    for n in range(messages):
        raw = make_message(to=inbox["email"], subject=f"m{n}", msgid=f"<{name}{n}@x>")
        await server.deliver(raw, [inbox["email"]])
    return inbox["email"], key


def _rev2(server, user: str, key: str) -> Client:
    client = Client(server.imap_port, user, key)
    assert _ok(client, "ENABLE IMAP4rev2") == ["* ENABLED IMAP4rev2"]
    return client


@pytest_twisted.ensureDeferred
async def test_enable_imap4rev2_select_has_no_recent_and_a_list_and_reselect_is_closed(
        server, offer_rev2):
    """RFC 9051: SELECT sends no RECENT and no UNSEEN code but a LIST for the mailbox;
    FETCH FLAGS never carry \\Recent; a new arrival is EXISTS alone; a SELECT that
    replaces the selected mailbox first says OK [CLOSED]."""
    user, key = await _inbox(server, "rev2-select")

    def session():
        client = Client(server.imap_port, user, key)
        caps = _ok(client, "CAPABILITY")[0].split()
        enabled = _ok(client, "ENABLE IMAP4rev2")
        select = _ok(client, "SELECT INBOX")
        flags = _ok(client, "FETCH 1:* (FLAGS)")
        return client, caps, enabled, select, flags

    client, caps, enabled, select, flags = await deferToThread(session)
    assert caps[2:4] == ["IMAP4rev1", "IMAP4rev2"]
    assert {"BINARY", "SEARCHRES"} <= set(caps)  # RFC 9051 folds both in
    assert enabled == ["* ENABLED IMAP4rev2"]
    assert "* 2 EXISTS" in select and '* LIST (\\HasNoChildren) "/" "INBOX"' in select
    assert not any("RECENT" in line or "UNSEEN" in line for line in select), select
    assert flags == ["* 1 FETCH (FLAGS ())", "* 2 FETCH (FLAGS ())"]
    await server.deliver(make_message(to=user, subject="late"), [user])

    def later():
        noop = _ok(client, "NOOP")
        reselect = _ok(client, "EXAMINE INBOX")
        client.logout()
        return noop, reselect

    noop, reselect = await deferToThread(later)
    assert noop == ["* 3 EXISTS"]
    assert reselect[0] == "* OK [CLOSED] Previous mailbox closed"
    assert not any("RECENT" in line for line in reselect)


@pytest_twisted.ensureDeferred
async def test_search_and_uid_search_answer_esearch_after_enable(server, offer_rev2):
    """RFC 9051 §6.4.4: SEARCH answers ``* ESEARCH (TAG ...) [UID] ALL ...``, never
    ``* SEARCH``; nothing found is the bare ESEARCH; RETURN options still work; RECENT,
    NEW and OLD are not IMAP4rev2 search keys."""
    user, key = await _inbox(server, "rev2-search", messages=3)

    def session():
        client = _rev2(server, user, key)
        _ok(client, "SELECT INBOX")
        _ok(client, "STORE 2 +FLAGS.SILENT (\\Flagged)")
        out = {
            "all": _esearch(client, "SEARCH ALL"),
            "uid": _esearch(client, "UID SEARCH UNFLAGGED"),
            "none": _esearch(client, "SEARCH DRAFT"),
            "count": _esearch(client, "SEARCH RETURN (COUNT) ALL"),
            "charset": _esearch(client, "SEARCH CHARSET UTF-8 SUBJECT m1"),
            "new": _cmd(client, "SEARCH NEW")[-1],
            "old": _cmd(client, "UID SEARCH NOT OLD")[-1],
            "save": _esearch(client, "SEARCH RETURN (SAVE) FLAGGED"),
            "saved": _ok(client, "FETCH $ (UID)"),
        }
        client.logout()
        return out

    out = await deferToThread(session)
    assert out["all"] == ['* ESEARCH (TAG "T") ALL 1:3']
    assert out["uid"] == ['* ESEARCH (TAG "T") UID ALL 1,3']
    assert out["none"] == ['* ESEARCH (TAG "T")']
    assert out["count"] == ['* ESEARCH (TAG "T") COUNT 3']
    assert out["charset"] == ['* ESEARCH (TAG "T") ALL 2']
    assert out["new"].split()[1] == "BAD" and out["old"].split()[1] == "BAD"
    assert out["save"] == [] and out["saved"] == ["* 2 FETCH (UID 2)"]  # SEARCHRES


@pytest_twisted.ensureDeferred
async def test_status_deleted_and_size_and_list_return_status(server, offer_rev2):
    """STATUS DELETED (RFC 9051 §6.3.11) counts \\Deleted messages and SIZE their
    bytes, also through LIST ... RETURN (STATUS ...); RECENT is no STATUS item in
    IMAP4rev2 (BAD)."""
    user, key = await _inbox(server, "rev2-status")

    def session():
        client = _rev2(server, user, key)
        _ok(client, "SELECT INBOX")
        sizes = _ok(client, "FETCH 1:* (RFC822.SIZE)")
        _ok(client, "STORE 1 +FLAGS.SILENT (\\Deleted)")
        status = _ok(client, "STATUS INBOX (MESSAGES DELETED SIZE)")
        listed = _ok(client, 'LIST "" "INBOX" RETURN (STATUS (DELETED))')
        recent = _cmd(client, "STATUS INBOX (RECENT)")[-1]
        client.logout()
        return sizes, status, listed, recent

    sizes, status, listed, recent = await deferToThread(session)
    total = sum(int(line.split("RFC822.SIZE ")[1].rstrip(")")) for line in sizes)
    assert status == [f'* STATUS "INBOX" (MESSAGES 2 DELETED 1 SIZE {total})']
    assert listed[-1] == '* STATUS "INBOX" (DELETED 1)'
    assert recent.split()[1] == "BAD"


@pytest_twisted.ensureDeferred
async def test_utf8_mailbox_names_round_trip_and_rev1_sees_modified_utf7(server, offer_rev2):
    """RFC 9051 §5.1: after ENABLE IMAP4rev2 names travel in UTF-8 both ways (an "&"
    is just an ampersand); the same folders appear to an IMAP4rev1 session in modified
    UTF-7, and names it creates that way come back to the rev2 session in UTF-8."""
    user, key = await _inbox(server, "rev2-names", messages=0)

    def session():
        new = _rev2(server, user, key)
        create = _ok(new, 'CREATE "Отчёты"')
        _ok(new, 'CREATE "R&D"')
        old = Client(server.imap_port, user, key)
        _ok(old, f'CREATE "{encode_mailbox("Ärger")}"')
        old_list = _ok(old, 'LIST "" "*"')
        old_status = _ok(old, f'STATUS "{encode_mailbox("Отчёты")}" (MESSAGES)')
        old.logout()
        new_list = _ok(new, 'LIST "" "*"')
        select = _ok(new, 'SELECT "Отчёты"')
        status = _ok(new, 'STATUS "Ärger" (MESSAGES)')
        append = _cmd(new, 'APPEND "R&D" {12+}\r\nSubject: x\r\n')[-1]
        _ok(new, 'SELECT "R&D"')
        copy = _cmd(new, 'COPY 1 "Нет"')[-1]
        pattern = _ok(new, 'LIST "" "От%"')
        new.logout()
        return (create, old_list, old_status, new_list, select, status, append, copy,
                pattern)

    (create, old_list, old_status, new_list, select, status, append, copy,
     pattern) = await deferToThread(session)
    assert create == []  # the name needed no normalization: no LIST
    assert f'* LIST (\\HasNoChildren) "/" "{encode_mailbox("Отчёты")}"' in old_list
    assert '* LIST (\\HasNoChildren) "/" "R&-D"' in old_list
    assert old_status == [f'* STATUS "{encode_mailbox("Отчёты")}" (MESSAGES 0)']
    for name in ("Отчёты", "R&D", "Ärger"):
        assert f'* LIST (\\HasNoChildren) "/" "{name}"' in new_list, new_list
    assert '* LIST (\\HasNoChildren) "/" "Отчёты"' in select
    assert status == ['* STATUS "Ärger" (MESSAGES 0)']
    assert append.split()[1] == "OK"
    assert copy.split()[1:3] == ["NO", "[TRYCREATE]"]
    assert pattern == ['* LIST (\\HasNoChildren) "/" "Отчёты"']


@pytest_twisted.ensureDeferred
async def test_denormalized_utf8_names_are_normalized_and_reported_with_oldname(
        server, offer_rev2):
    """RFC 9051 §5.1, §6.3.9.7: a name not in NFC is created in NFC, and CREATE, SELECT
    and DELETE with the denormalized form answer a LIST with OLDNAME; bytes that are
    not UTF-8 are refused."""
    user, key = await _inbox(server, "rev2-nfc", messages=0)
    decomposed = "Cafe\u0301"
    composed = unicodedata.normalize("NFC", decomposed)

    def session():
        client = _rev2(server, user, key)
        out = {
            "create": _ok(client, f'CREATE "{decomposed}"'),
            "list": _ok(client, 'LIST "" "Caf*"'),
            "select": _ok(client, f'SELECT "{decomposed}"'),
            "unselect": _ok(client, "UNSELECT"),
            "delete": _ok(client, f'DELETE "{decomposed}"'),
        }
        client.send(b't90 CREATE "bad\xff"\r\n')
        out["invalid"] = client.line().decode("utf-8", "replace")
        client.logout()
        return out

    out = await deferToThread(session)
    oldname = f'("OLDNAME" ("{decomposed}"))'
    assert out["create"] == [f'* LIST (\\HasNoChildren) "/" "{composed}" {oldname}']
    assert out["list"] == [f'* LIST (\\HasNoChildren) "/" "{composed}"']
    assert f'* LIST (\\HasNoChildren) "/" "{composed}" {oldname}' in out["select"]
    assert out["delete"] == [f'* LIST (\\NonExistent) "/" "{composed}" {oldname}']
    assert out["invalid"].startswith("t90 NO")


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_enables_rev2_sees_the_imap4rev1_server(
        server, offer_rev2):
    """Appendix A: without ENABLE IMAP4rev2 nothing changes: RECENT, \\Recent, UNSEEN,
    ``* SEARCH``, no LIST at SELECT, no OK [CLOSED], modified UTF-7 names."""
    user, key = await _inbox(server, "rev1-client")

    def session():
        client = Client(server.imap_port, user, key)
        _ok(client, f'CREATE "{encode_mailbox("Отчёты")}"')
        out = {
            "select": _ok(client, "SELECT INBOX"),
            "flags": _ok(client, "FETCH 1 (FLAGS)"),
            "search": _ok(client, "SEARCH ALL"),
            "new": _ok(client, "SEARCH NEW"),
            "status": _ok(client, "STATUS INBOX (RECENT DELETED)"),
            "reselect": _ok(client, "SELECT INBOX"),
            "list": _ok(client, 'LIST "" "*"'),
        }
        client.logout()
        return out

    out = await deferToThread(session)
    assert "* 2 RECENT" in out["select"] and "* OK [UNSEEN 1] First unseen" in out["select"]
    assert not any(line.startswith("* LIST") for line in out["select"])
    assert out["flags"] == ["* 1 FETCH (FLAGS (\\Recent))"]
    assert out["search"] == ["* SEARCH 1 2"] and out["new"] == ["* SEARCH 1 2"]
    assert out["status"] == ['* STATUS "INBOX" (RECENT 0 DELETED 0)']
    assert not any("CLOSED" in line for line in out["reselect"])
    assert f'* LIST (\\HasNoChildren) "/" "{encode_mailbox("Отчёты")}"' in out["list"]


@pytest_twisted.ensureDeferred
async def test_imap4rev2_is_neither_advertised_nor_enabled_while_switched_off(
        server, monkeypatch):
    """Until the switch is on (and BINARY and SEARCHRES are offered), CAPABILITY has
    no IMAP4rev2 and ENABLE IMAP4rev2 enables nothing (RFC 5161 §3.1)."""
    monkeypatch.setattr(rev2, "OFFER_IMAP4REV2", False)
    user, key = await _inbox(server, "rev2-off", messages=1)

    def session():
        client = Client(server.imap_port, user, key)
        caps = _ok(client, "CAPABILITY")[0].split()
        enabled = _ok(client, "ENABLE IMAP4rev2")
        _ok(client, "SELECT INBOX")
        search = _ok(client, "SEARCH ALL")
        client.logout()
        return caps, enabled, search

    caps, enabled, search = await deferToThread(session)
    assert "IMAP4rev2" not in caps and "IMAP4rev1" in caps
    assert enabled == ["* ENABLED"]
    assert search == ["* SEARCH 1"]


# ------------------------------------------------- in memory, the fake backend

def _rev2_in_memory(store):
    session = Session(FakeBackend(store)).login()
    assert session.cmd("e ENABLE IMAP4rev2") == ["* ENABLED IMAP4rev2", "e OK ENABLE completed"]
    return session


@pytest.fixture
def fresh_store():
    store = FakeStore()
    store.deliver("INBOX", _plain(1))
    store.deliver("INBOX", _plain(2))
    return store


def test_enable_while_selected_drops_recent_from_flags_and_arrivals(offer_rev2, fresh_store):
    """ENABLE belongs before SELECT (RFC 9051 §6.3.1), but a client that enables
    IMAP4rev2 while selected gets no \\Recent from then on: in FETCH, STORE and IDLE."""
    session = Session(FakeBackend(fresh_store)).selected()
    assert session.cmd("f FETCH 1 (FLAGS)")[0] == "* 1 FETCH (FLAGS (\\Recent))"
    assert session.cmd("e ENABLE IMAP4rev2")[0] == "* ENABLED IMAP4rev2"
    assert session.cmd("f FETCH 1 (FLAGS)")[0] == "* 1 FETCH (FLAGS ())"
    assert session.cmd("s STORE 2 +FLAGS (\\Seen)")[0] == "* 2 FETCH (FLAGS (\\Seen))"
    assert session.cmd("i IDLE") == ["+ idling"]
    fresh_store.deliver("INBOX", _plain(3))
    assert session.lines() == ["* 3 EXISTS"]
    assert session.cmd("DONE") == ["i OK IDLE terminated"]


def test_rev2_names_in_quotaroot_copy_move_and_subscriptions(offer_rev2, fresh_store):
    """Every command that takes or returns a mailbox name speaks UTF-8 after ENABLE
    IMAP4rev2: GETQUOTAROOT, COPY, MOVE, SUBSCRIBE, LSUB."""
    session = _rev2_in_memory(fresh_store)
    assert session.cmd('c CREATE "Ünïcode"')[-1].startswith("c OK")
    assert session.cmd('q GETQUOTAROOT "Ünïcode"')[0] == '* QUOTAROOT "Ünïcode"'
    assert session.cmd('u SUBSCRIBE "Ünïcode"')[-1].startswith("u OK")
    assert '* LSUB (\\HasNoChildren) "/" "Ünïcode"' in session.cmd('l LSUB "" "*"')
    session.cmd("s SELECT INBOX")
    assert session.cmd('c COPY 1 "Ünïcode"')[-1].startswith("c OK [COPYUID")
    assert session.cmd('m MOVE 2 "Ünïcode"')[-1].startswith("m OK")
    assert session.cmd('t STATUS "Ünïcode" (MESSAGES)')[0] == \
        '* STATUS "Ünïcode" (MESSAGES 2)'


def test_mailbox_wire_quotes_utf8_and_falls_back_to_a_literal():
    """UTF-8 quoted strings only after ENABLE IMAP4rev2 (Appendix A); control
    characters never travel in a quoted string."""
    rev1, new = SimpleNamespace(imap4rev2=False), SimpleNamespace(imap4rev2=True)
    assert rev2.mailbox_wire(rev1, "Отчёты") == f'"{encode_mailbox("Отчёты")}"'
    assert rev2.mailbox_wire(new, "Отчёты") == '"Отчёты"'
    assert rev2.mailbox_wire(new, 'a"b\\c') == '"a\\"b\\\\c"'
    assert rev2.mailbox_wire(new, "a\x85b") == "{4}\r\na\x85b"
    assert rev2.mailbox_text(new, "inbox/Sub") == "INBOX/Sub"
    assert rev2.mailbox_text(new, "R&D") == "R&D" and rev2.mailbox_text(rev1, "R&-D") == "R&D"
    assert rev2.normalized(new, "inbox") is None  # INBOX's case is no normalization
    assert rev2.normalized(new, "Cafe\u0301") == "Cafe\u0301"
    assert rev2.normalized(rev1, "Cafe\u0301") is None
