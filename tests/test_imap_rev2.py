"""IMAP4rev2 (RFC 9051) beside IMAP4rev1, as transcripts over real sockets on the real
store: what a client gets after ``ENABLE IMAP4rev2`` (no \\Recent, ESEARCH for SEARCH,
UTF-8 mailbox names, LIST at SELECT, OK [CLOSED]), and that a client that never enables
it sees exactly the IMAP4rev1 server it always saw."""

from __future__ import annotations

import socket
import ssl
import unicodedata
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap import rev2
from agentpost.imap.parser import encode_mailbox
from tests.conftest import _DEV_TLS
from tests.mailfactory import make_message
from tests.test_imap_protocol import FakeBackend, FakeStore, Session, _plain


@pytest.fixture
def offer_rev2(monkeypatch):
    """The IMAP4rev2 switch on (its default), with BINARY and SEARCHRES offered: RFC 9051
    requires both, and IMAP4rev2 is advertised only beside them."""
    monkeypatch.setattr(rev2, "OFFER_IMAP4REV2", True)


class Client:
    """A raw IMAP client over STARTTLS: each command returns every line up to and
    including its tagged response, decoded as UTF-8."""

    def __init__(self, port: int, user: str, key: str) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"s STARTTLS\r\n")
        assert reader.readline().startswith(b"s OK")
        context = ssl.create_default_context(cafile=_DEV_TLS["ca"])
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.reader = self.sock.makefile("rb")
        self.count = 0
        self.tag = ""
        assert self.cmd(f'LOGIN "{user}" "{key}"')[-1].split()[1] == "OK"

    def cmd(self, text: str) -> list[str]:
        self.count += 1
        tag = self.tag = f"t{self.count}"
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        lines = []
        while True:
            line = self.reader.readline().decode("utf-8").rstrip("\r\n")
            lines.append(line)
            if line.startswith(tag + " "):
                return lines

    def ok(self, text: str) -> list[str]:
        """The untagged lines of a command that must succeed."""
        lines = self.cmd(text)
        assert lines[-1].split()[1] == "OK", lines
        return lines[:-1]

    def esearch(self, text: str) -> list[str]:
        """The untagged lines of a search, its tag in ESEARCH written ``T``."""
        lines = self.ok(text)
        return [line.replace(f'(TAG "{self.tag}")', '(TAG "T")') for line in lines]

    def close(self) -> None:
        self.cmd("LOGOUT")
        self.sock.close()


async def _inbox(server, name: str, messages: int = 2):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    for n in range(messages):
        raw = make_message(to=inbox["email"], subject=f"m{n}", msgid=f"<{name}{n}@x>")
        await server.deliver(raw, [inbox["email"]])
    return inbox["email"], key


def _rev2(server, user: str, key: str) -> Client:
    client = Client(server.imap_port, user, key)
    assert client.ok("ENABLE IMAP4rev2") == ["* ENABLED IMAP4rev2"]
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
        caps = client.ok("CAPABILITY")[0].split()
        enabled = client.ok("ENABLE IMAP4rev2")
        select = client.ok("SELECT INBOX")
        flags = client.ok("FETCH 1:* (FLAGS)")
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
        noop = client.ok("NOOP")
        reselect = client.ok("EXAMINE INBOX")
        client.close()
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
        client.ok("SELECT INBOX")
        client.ok("STORE 2 +FLAGS.SILENT (\\Flagged)")
        out = {
            "all": client.esearch("SEARCH ALL"),
            "uid": client.esearch("UID SEARCH UNFLAGGED"),
            "none": client.esearch("SEARCH DRAFT"),
            "count": client.esearch("SEARCH RETURN (COUNT) ALL"),
            "charset": client.esearch("SEARCH CHARSET UTF-8 SUBJECT m1"),
            "new": client.cmd("SEARCH NEW")[-1],
            "old": client.cmd("UID SEARCH NOT OLD")[-1],
            "save": client.esearch("SEARCH RETURN (SAVE) FLAGGED"),
            "saved": client.ok("FETCH $ (UID)"),
        }
        client.close()
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
        client.ok("SELECT INBOX")
        sizes = client.ok("FETCH 1:* (RFC822.SIZE)")
        client.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        status = client.ok("STATUS INBOX (MESSAGES DELETED SIZE)")
        listed = client.ok('LIST "" "INBOX" RETURN (STATUS (DELETED))')
        recent = client.cmd("STATUS INBOX (RECENT)")[-1]
        client.close()
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
        create = new.ok('CREATE "Отчёты"')
        new.ok('CREATE "R&D"')
        old = Client(server.imap_port, user, key)
        old.ok(f'CREATE "{encode_mailbox("Ärger")}"')
        old_list = old.ok('LIST "" "*"')
        old_status = old.ok(f'STATUS "{encode_mailbox("Отчёты")}" (MESSAGES)')
        old.close()
        new_list = new.ok('LIST "" "*"')
        select = new.ok('SELECT "Отчёты"')
        status = new.ok('STATUS "Ärger" (MESSAGES)')
        append = new.cmd('APPEND "R&D" {12+}\r\nSubject: x\r\n')[-1]
        new.ok('SELECT "R&D"')
        copy = new.cmd('COPY 1 "Нет"')[-1]
        pattern = new.ok('LIST "" "От%"')
        new.close()
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
            "create": client.ok(f'CREATE "{decomposed}"'),
            "list": client.ok('LIST "" "Caf*"'),
            "select": client.ok(f'SELECT "{decomposed}"'),
            "unselect": client.ok("UNSELECT"),
            "delete": client.ok(f'DELETE "{decomposed}"'),
        }
        client.sock.sendall(b't90 CREATE "bad\xff"\r\n')
        out["invalid"] = client.reader.readline().decode("utf-8", "replace")
        client.close()
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
        client.ok(f'CREATE "{encode_mailbox("Отчёты")}"')
        out = {
            "select": client.ok("SELECT INBOX"),
            "flags": client.ok("FETCH 1 (FLAGS)"),
            "search": client.ok("SEARCH ALL"),
            "new": client.ok("SEARCH NEW"),
            "status": client.ok("STATUS INBOX (RECENT DELETED)"),
            "reselect": client.ok("SELECT INBOX"),
            "list": client.ok('LIST "" "*"'),
        }
        client.close()
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
        caps = client.ok("CAPABILITY")[0].split()
        enabled = client.ok("ENABLE IMAP4rev2")
        client.ok("SELECT INBOX")
        search = client.ok("SEARCH ALL")
        client.close()
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
