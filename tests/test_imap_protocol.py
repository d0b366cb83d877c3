"""Unit tests of the IMAP server protocol and parser: StringTransport + task.Clock, no sockets.

The account/backend here is an in-memory fake: it is the boundary the protocol talks
to (``agentpost.imap.interfaces``), so scripting it (slow answers, domain errors,
other sessions' changes) reaches every response path of the state machine.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from agentpost.imap import parser, search_grammar
from agentpost.imap.interfaces import (
    Changes,
    FetchRow,
    FetchWants,
    FolderInfo,
    FolderSnapshot,
    FolderStatus,
    MessageMeta,
)
from agentpost.imap.listener import IMAPFactory
from agentpost.imap.parser import ParseError
from agentpost.imap.server import IMAP4ServerProtocol, State
from agentpost.mail import imapformat
from agentpost.model import errors

# --------------------------------------------------------------------------- fakes

MSG_UTF8 = (
    b"Received: from a\r\n"
    b"Subject: =?utf-8?q?first?=\r\n"
    b"From: Ann <ann@example.org>\r\n"
    b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
    b"To: bob@example.com\r\n"
    b"Received: from b\r\n\tfolded\r\n"
    b"\r\n"
    b"Hello \xc3\xa9 world\r\nsecond line\r\n"
)


def _plain(n: int) -> bytes:
    return (f"From: s{n}@example.org\r\nTo: t@example.com\r\nSubject: msg {n}\r\n"
            f"Message-ID: <{n}@example.org>\r\n\r\nbody {n}\r\n").encode()


@dataclass
class Msg:
    raw: bytes
    flags: frozenset[str]
    modseq: int
    internaldate: datetime


@dataclass
class Folder:
    id: int
    name: str
    special_use: str | None = None
    subscribed: bool = True
    uidvalidity: int = 1000
    uidnext: int = 1
    recent_uid: int = 0
    messages: dict[int, Msg] = field(default_factory=dict)


class FakeStore:
    """Folders shared by every session of the fake backend."""

    def __init__(self) -> None:
        self.folders: dict[str, Folder] = {}
        self.modseq = 10
        self.watchers: dict[int, list[Callable[[], None]]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.quota_limit = 0
        for name, su in (("INBOX", None), ("Sent", "\\Sent"), ("Trash", "\\Trash")):
            self.add_folder(name, su)

    def add_folder(self, name: str, special_use: str | None = None) -> Folder:
        folder = Folder(len(self.folders) + 1, name, special_use)
        self.folders[name] = folder
        return folder

    def by_id(self, folder_id: int) -> Folder:
        return next(f for f in self.folders.values() if f.id == folder_id)

    def deliver(self, name: str, raw: bytes, flags: frozenset[str] = frozenset()) -> int:
        folder = self.folders[name]
        self.modseq += 1
        uid = folder.uidnext
        folder.uidnext += 1
        folder.messages[uid] = Msg(raw, frozenset(flags), self.modseq,
                                   datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
        self.notify(folder.id)
        return uid

    def notify(self, folder_id: int) -> None:
        for callback in list(self.watchers.get(folder_id, [])):
            callback()


class FakeAccount:
    def __init__(self, store: FakeStore, address: str, can_write: bool = True) -> None:
        self.shared = store
        self.address = address
        self.can_write = can_write
        self.gate: defer.Deferred | None = None  # when set, select/fetch wait for it
        self.fail_with: BaseException | None = None
        self.range_gate: defer.Deferred | None = None  # when set, read_range waits for it

    async def _maybe_wait(self, what: str, arg: Any = None) -> None:
        self.shared.calls.append((what, arg))
        if self.fail_with is not None:
            raise self.fail_with
        if self.gate is not None:
            await self.gate

    def _folder(self, name: str) -> Folder:
        if name not in self.shared.folders:
            raise errors.NotFound("No such mailbox")
        return self.shared.folders[name]

    async def list_folders(self) -> list[FolderInfo]:
        names = sorted(self.shared.folders)
        return [FolderInfo(n, self.shared.folders[n].special_use, self.shared.folders[n].subscribed,
                           any(o.startswith(n + "/") for o in names)) for n in names]

    async def create_folder(self, name: str) -> None:
        if name in self.shared.folders:
            raise errors.Conflict("Mailbox exists")
        parts = name.split("/")
        for i in range(1, len(parts)):  # parents too, as the real account does
            if "/".join(parts[:i]) not in self.shared.folders:
                self.shared.add_folder("/".join(parts[:i]))
        self.shared.add_folder(name)

    async def delete_folder(self, name: str) -> None:
        self._folder(name)
        del self.shared.folders[name]

    async def rename_folder(self, old: str, new: str) -> None:
        folder = self._folder(old)
        if new in self.shared.folders:
            raise errors.Conflict("Mailbox exists")
        folder.name = new
        self.shared.folders[new] = self.shared.folders.pop(old)

    async def set_subscribed(self, name: str, subscribed: bool) -> None:
        self._folder(name).subscribed = subscribed

    async def list_subscriptions(self) -> list[str]:
        return sorted(n for n, f in self.shared.folders.items() if f.subscribed)

    async def select(self, name: str) -> tuple[FakeFolder, FolderSnapshot]:
        await self._maybe_wait("select", name)
        f = self._folder(name)
        metas = [MessageMeta(u, m.modseq, m.flags) for u, m in sorted(f.messages.items())]
        unseen = [m.uid for m in metas if "\\Seen" not in m.flags]
        return FakeFolder(self, f.id, f.name), FolderSnapshot(
            f.name, f.uidvalidity, f.uidnext, self.shared.modseq, metas,
            unseen[0] if unseen else None)

    async def status(self, name: str) -> FolderStatus:
        await self._maybe_wait("status", name)
        f = self._folder(name)
        unseen = sum(1 for m in f.messages.values() if "\\Seen" not in m.flags)
        return FolderStatus(len(f.messages), f.uidnext, f.uidvalidity, unseen, self.shared.modseq,
                            sum(1 for u in f.messages if u > f.recent_uid),
                            sum(len(m.raw) for m in f.messages.values()),
                            deleted=sum(1 for m in f.messages.values() if "\\Deleted" in m.flags))

    async def statuses(self, names: list[str]) -> dict[str, FolderStatus]:
        return {name: await self.status(name) for name in names
                if name in self.shared.folders}

    async def fetch(self, folder_id: int, uids: list[int], wants: FetchWants) -> list[FetchRow]:
        await self._maybe_wait("fetch", wants)
        f = self.shared.by_id(folder_id)
        rows = []
        for uid in uids:
            m = f.messages.get(uid)
            if m is None:
                continue
            row = FetchRow(uid, m.modseq, m.flags)
            if wants.internaldate:
                row.internaldate = m.internaldate
            if wants.size:
                row.size = len(m.raw)
            if wants.envelope:
                row.envelope = imapformat.envelope(m.raw)
            if wants.content:
                row.size = len(m.raw)
                row.blob_ref = f"{folder_id}/{uid}"
                row.sections = imapformat.section_map(m.raw)
            rows.append(row)  # bodystructure left None: the server computes it
        return rows

    async def check_folder(self, name: str) -> None:
        await self._maybe_wait("check_folder", name)
        self._folder(name)

    async def quota(self) -> tuple[int, int]:
        used = sum(len(m.raw) for f in self.shared.folders.values()
                   for m in f.messages.values())
        return used, self.shared.quota_limit

    async def claim_recent(self, folder_id: int, up_to_uid: int, claim: bool) -> int:
        folder = self.shared.by_id(folder_id)
        old = folder.recent_uid
        if claim:
            folder.recent_uid = max(old, up_to_uid)
        return old

    async def read_blob(self, raw_key: str) -> bytes:
        self.shared.calls.append(("read_blob", raw_key))
        if self.range_gate is not None:
            await self.range_gate
        folder_id, uid = (int(x) for x in raw_key.split("/"))
        m = self.shared.by_id(folder_id).messages.get(uid)
        if m is None:
            raise KeyError(raw_key)
        return m.raw

    async def read_range(self, raw_key: str, start: int, length: int) -> bytes:
        self.shared.calls.append(("read_range", (raw_key, start, length)))
        if self.range_gate is not None:
            await self.range_gate
        folder_id, uid = (int(x) for x in raw_key.split("/"))
        m = self.shared.by_id(folder_id).messages.get(uid)
        if m is None:
            raise errors.StorageFailure()
        return m.raw[start:start + length]

    async def fetch_raw(self, folder_id: int, uid: int) -> bytes:
        self.shared.calls.append(("fetch_raw", uid))
        m = self.shared.by_id(folder_id).messages.get(uid)
        if m is None:
            raise errors.NotFound()
        return m.raw

    def _set(self, folder: Folder, uid: int, flags: frozenset[str]) -> MessageMeta:
        m = folder.messages[uid]
        if flags != m.flags:
            self.shared.modseq += 1
            m.flags = flags
            m.modseq = self.shared.modseq
        return MessageMeta(uid, m.modseq, m.flags)

    async def set_seen(self, folder_id: int, uids: list[int]) -> list[MessageMeta]:
        self.shared.calls.append(("set_seen", uids))
        f = self.shared.by_id(folder_id)
        out = [self._set(f, u, f.messages[u].flags | {"\\Seen"}) for u in uids
               if u in f.messages]
        self.shared.notify(folder_id)
        return out

    async def store(self, folder_id: int, uids: list[int], mode: str, flags: frozenset[str],
                    unchangedsince: int | None) -> tuple[list[MessageMeta], list[int]]:
        f = self.shared.by_id(folder_id)
        out, failed = [], []
        for uid in uids:
            m = f.messages.get(uid)
            if m is None:
                continue
            if unchangedsince is not None and m.modseq > unchangedsince:
                failed.append(uid)
                continue
            new = m.flags | flags if mode == "+" else m.flags - flags if mode == "-" else flags
            out.append(self._set(f, uid, frozenset(new)))
        self.shared.notify(folder_id)
        return out, failed

    async def append(self, folder: str, message: Any, flags: frozenset[str],
                     internaldate: datetime | None) -> tuple[int, int]:
        f = self._folder(folder)
        if not isinstance(message, bytes):  # a spool file
            self.shared.calls.append(("append_spooled", type(message).__name__))
            message = message.read()
        return f.uidvalidity, self.shared.deliver(folder, message, flags)

    async def append_many(self, folder: str, messages: list[Any]) -> tuple[int, list[int]]:
        """MULTIAPPEND: all or nothing, like the real store's one transaction."""
        f = self._folder(folder)
        raws = [m.message if isinstance(m.message, bytes) else m.message.read()
                for m in messages]
        return f.uidvalidity, [self.shared.deliver(folder, raw, m.flags)
                               for raw, m in zip(raws, messages, strict=True)]

    async def open_folder(self, name: str) -> tuple[FakeFolder, int]:
        f = self._folder(name)
        return FakeFolder(self, f.id, f.name), f.uidvalidity

    async def copy(self, folder_id: int, uids: list[int], dest: str,
                   move: bool = False) -> tuple[int, list[tuple[int, int]]]:
        d = self._folder(dest)
        src = self.shared.by_id(folder_id)
        pairs = []
        for uid in uids:
            m = src.messages[uid]
            pairs.append((uid, self.shared.deliver(dest, m.raw, m.flags)))
            if move:
                del src.messages[uid]
        self.shared.notify(folder_id)
        return d.uidvalidity, pairs

    async def move(self, folder_id: int, uids: list[int],
                   dest: str) -> tuple[int, list[tuple[int, int]]]:
        return await self.copy(folder_id, uids, dest, move=True)

    async def expunge(self, folder_id: int, uids: list[int] | None) -> list[int]:
        f = self.shared.by_id(folder_id)
        gone = [u for u, m in f.messages.items()
                if "\\Deleted" in m.flags and (uids is None or u in uids)]
        for u in gone:
            del f.messages[u]
        self.shared.notify(folder_id)
        return gone

    async def search(self, folder_id: int, key: tuple[Any, ...],
                     sort: list[tuple[str, bool]] | None = None) -> list[int]:
        self.shared.calls.append(("search", key) if sort is None else ("sort", (key, sort)))
        f = self.shared.by_id(folder_id)
        found = [u for u, m in sorted(f.messages.items()) if _matches(key, u, m)]
        for name, reverse in reversed(sort or []):  # SIZE only: the SQL is tested end to end
            assert name == "SIZE"
            found.sort(key=lambda u: len(f.messages[u].raw), reverse=reverse)
        return found

    async def thread_fields(self, folder_id: int, key: tuple[Any, ...]) -> list[Any]:
        """THREAD's inputs, from the raw headers (the real store reads its columns)."""
        from email.parser import BytesHeaderParser
        from email.utils import parsedate_to_datetime

        from agentpost.imap.interfaces import ThreadFields

        self.shared.calls.append(("thread", key))
        f = self.shared.by_id(folder_id)
        out = []
        for u in await self.search(folder_id, key):
            headers = BytesHeaderParser().parsebytes(f.messages[u].raw)
            try:
                sent = parsedate_to_datetime(headers["Date"]) if headers["Date"] else None
            except (TypeError, ValueError):
                sent = None
            out.append(ThreadFields(u, headers["Message-ID"],
                                    tuple(str(headers["References"] or "").split()),
                                    headers["In-Reply-To"], str(headers["Subject"] or ""),
                                    sent, f.messages[u].internaldate))
        return out

    async def changes(self, folder_id: int, known_uids: list[int],
                      since_modseq: int) -> Changes:
        f = self.shared.by_id(folder_id)
        top = max(known_uids, default=0)
        return Changes(
            new=[MessageMeta(u, m.modseq, m.flags) for u, m in sorted(f.messages.items())
                 if u > top],
            changed=[MessageMeta(u, f.messages[u].modseq, f.messages[u].flags)
                     for u in known_uids if u in f.messages
                     and f.messages[u].modseq > since_modseq],
            expunged=[u for u in known_uids if u not in f.messages],
            highestmodseq=self.shared.modseq)

    def watch(self, folder_id: int, callback: Callable[[], None]) -> Callable[[], None]:
        self.shared.watchers.setdefault(folder_id, []).append(callback)
        return lambda: self.shared.watchers[folder_id].remove(callback)

    def watch_folder(self, key: str, callback: Callable[[], None]) -> Callable[[], None]:
        """NOTIFY: keys are folder names here (list_folders gives none)."""
        folder = self.shared.folders.get(key)
        return self.watch(folder.id, callback) if folder is not None else (lambda: None)

    def watch_folder_list(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self.watch(0, callback)  # id 0: the folder list (no folder has it)


class FakeFolder:
    """The selected folder's handle (agentpost.imap.interfaces.IMAPFolder): like the
    real one, the account's folder operations with the folder id filled in (so a test
    may script the account's methods)."""

    def __init__(self, account: FakeAccount, folder_id: int, name: str) -> None:
        self.account = account
        self.folder_id = folder_id
        self.name = name

    async def fetch(self, uids: list[int], wants: FetchWants) -> list[FetchRow]:
        return await self.account.fetch(self.folder_id, uids, wants)

    async def read_message(self, row: FetchRow) -> bytes:
        if row.blob_ref is not None:
            return await self.account.read_blob(row.blob_ref)
        return await self.account.fetch_raw(self.folder_id, row.uid)

    async def read_range(self, row: FetchRow, start: int, length: int) -> bytes:
        return await self.account.read_range(row.blob_ref, start, length)

    async def claim_recent(self, up_to_uid: int, claim: bool) -> int:
        return await self.account.claim_recent(self.folder_id, up_to_uid, claim)

    async def set_seen(self, uids: list[int]) -> list[MessageMeta]:
        return await self.account.set_seen(self.folder_id, uids)

    async def store(self, uids: list[int], mode: str, flags: frozenset[str],
                    unchangedsince: int | None) -> tuple[list[MessageMeta], list[int]]:
        return await self.account.store(self.folder_id, uids, mode, flags, unchangedsince)

    async def copy(self, uids: list[int], dest: str) -> tuple[int, list[tuple[int, int]]]:
        return await self.account.copy(self.folder_id, uids, dest)

    async def move(self, uids: list[int], dest: str) -> tuple[int, list[tuple[int, int]]]:
        return await self.account.move(self.folder_id, uids, dest)

    async def expunge(self, uids: list[int] | None) -> list[int]:
        return await self.account.expunge(self.folder_id, uids)

    async def search(self, key: tuple[Any, ...],
                     sort: list[tuple[str, bool]] | None = None) -> list[int]:
        return await self.account.search(self.folder_id, key, sort)

    async def thread_fields(self, key: tuple[Any, ...]) -> list[Any]:
        return await self.account.thread_fields(self.folder_id, key)

    async def changes(self, known_uids: list[int], since_modseq: int,
                      fresh: bool = True) -> Changes:
        return await self.account.changes(self.folder_id, known_uids, since_modseq)

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self.account.watch(self.folder_id, callback)


def _matches(key: tuple[Any, ...], uid: int, m: Msg) -> bool:
    kind = key[0]
    if kind == "all":
        return True
    if kind == "uid":
        return uid in key[1]
    if kind == "and":
        return all(_matches(k, uid, m) for k in key[1])
    if kind == "or":
        return _matches(key[1], uid, m) or _matches(key[2], uid, m)
    if kind == "not":
        return not _matches(key[1], uid, m)
    if kind == "flag":
        return (key[1] in m.flags) == key[2]
    if kind == "header":
        return key[2].lower().encode() in imapformat.section(
            m.raw, f"HEADER.FIELDS ({key[1]})").lower()
    if kind == "modseq":
        return m.modseq >= key[1]
    raise AssertionError(f"unexpected key {key}")


class FakeBackend:
    def __init__(self, store: FakeStore | None = None) -> None:
        self.shared = store or FakeStore()
        self.accounts: dict[str, FakeAccount] = {}
        self.attempts: list[tuple[str, str, str]] = []

    async def authenticate(self, username: str, password: str, peer: str) -> FakeAccount:
        self.attempts.append((username, password, peer))
        if username == "throttled@example.com":
            raise errors.RateLimited(5)
        if password not in ("secret", "readonly"):
            raise errors.Unauthenticated()
        account = FakeAccount(self.shared, username, can_write=password == "secret")
        self.accounts[username] = account
        return account


@implementer(ITLSTransport)
class TLSCapableTransport(StringTransport):
    def __init__(self, peer: str = "127.0.0.1") -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer, 40000))
        self.tls_started_with: Any = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started_with = contextFactory


class Session:
    """One protocol instance on a string transport."""

    def __init__(self, backend: FakeBackend | None = None, *, clock: Clock | None = None,
                 tls: bool = False, **kwargs: Any) -> None:
        self.backend = backend or FakeBackend()
        self.clock = clock or Clock()
        self.transport = TLSCapableTransport(kwargs.pop("peer", "127.0.0.1"))
        if tls:
            kwargs.setdefault("tls_options", object())
        kwargs.setdefault("allow_plaintext_login", not tls)
        self.protocol = IMAP4ServerProtocol(self.backend, hostname="imap.test", clock=self.clock,
                                            **kwargs)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes | str) -> None:
        self.protocol.dataReceived(data.encode() if isinstance(data, str) else data)

    def raw(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def lines(self) -> list[str]:
        return [line for line in self.raw().decode("utf-8").split("\r\n") if line]

    def cmd(self, text: str | bytes) -> list[str]:
        self.send((text if isinstance(text, bytes) else text.encode()) + b"\r\n")
        return self.lines()

    def login(self, password: str = "secret") -> Session:  # noqa: S107
        self.lines()
        assert self.cmd(f"l LOGIN agent@example.com {password}")[-1].startswith("l OK")
        return self

    def selected(self, name: str = "INBOX") -> Session:
        self.login()
        assert self.cmd(f"s SELECT {name}")[-1].startswith("s OK")
        return self

    @property
    def account(self) -> FakeAccount:
        return self.backend.accounts["agent@example.com"]


@pytest.fixture
def store() -> FakeStore:
    s = FakeStore()
    s.deliver("INBOX", _plain(1), frozenset({"\\Seen"}))
    s.deliver("INBOX", MSG_UTF8)
    s.deliver("INBOX", _plain(3), frozenset({"\\Flagged", "project"}))
    s.folders["INBOX"].recent_uid = 3  # an earlier session saw these (no \\Recent)
    return s


# --------------------------------------------------------------------------- parser


def test_parser_literals_lists_and_strings():
    cmd = parser.parse_command(b'a1 LOGIN {4}\r\nuser "pa\\"ss"')
    assert (cmd.tag, cmd.name, cmd.args) == ("a1", "LOGIN", [b"user", 'pa"ss'])
    cmd = parser.parse_command(b"t UID STORE 1:*,7 (UNCHANGEDSINCE 5) +FLAGS.SILENT (\\Seen x)")
    assert cmd.uid and cmd.name == "STORE"
    assert parser.parse_seqset(cmd.args[0]) == [(1, None), (7, 7)]
    assert parser.parse_flags(cmd.args[3]) == {"\\Seen", "x"}
    for bad in (b"", b"a", b"a FETCH (1", b'a LOGIN "x', b"a LOGIN {3}\r\nab", b"(x NOOP"):
        with pytest.raises(ParseError):
            parser.parse_command(bad)


def test_parser_fetch_items_and_macros():
    items = parser.parse_fetch_items(parser.tokenize(b"ALL")[0])
    assert [i.name for i in items] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
    items = parser.parse_fetch_items(parser.tokenize(
        b"(UID BODY.PEEK[1.2.HEADER.FIELDS.NOT (X-A Y)]<10.20> BODY[] rfc822.size)")[0])
    spec = items[1].section
    assert items[1].peek and spec.part == (1, 2) and spec.text == "HEADER.FIELDS.NOT"
    assert spec.fields == ("X-A", "Y") and spec.partial == (10, 20)
    assert not items[2].peek and items[3].name == "RFC822.SIZE"
    for bad in (b"BODY[0]", b"BODY[HEADER.FIELDS]", b"BODY[]<1.0>", b"NOPE", b"BODY[1.BOGUS]"):
        with pytest.raises(ParseError):
            parser.parse_fetch_items(parser.tokenize(bad)[0])


def test_parser_search_tree():
    cmd = parser.parse_command(
        b"s SEARCH CHARSET UTF-8 OR FROM {3}\r\nbob SUBJECT \"h i\" NOT SEEN 2:4 UID 9:* "
        b"SINCE 1-Feb-2026 LARGER 10 (KEYWORD x DELETED) NEW")
    charset, key = search_grammar.parse_search(cmd.args)
    assert charset == "UTF-8"
    assert key[0] == "and"
    parts = key[1]
    assert parts[0] == ("or", ("header", "from", "bob"), ("header", "subject", "h i"))
    assert parts[1] == ("not", ("flag", "\\Seen", True))
    assert parts[2] == ("seq", [(2, 4)])
    assert parts[3] == ("uidset", [(9, None)])
    assert parts[4][0] == "since" and parts[4][1].isoformat() == "2026-02-01"
    assert parts[5] == ("larger", 10)
    assert parts[6] == ("and", [("keyword", "x", True), ("flag", "\\Deleted", True)])
    assert parts[7] == ("and", [("recent",), ("flag", "\\Seen", False)])
    for bad in (b"s SEARCH", b"s SEARCH FROM", b"s SEARCH OR SEEN", b"s SEARCH BOGUS",
                b"s SEARCH SINCE 31-Foo-2026"):
        with pytest.raises(ParseError):
            search_grammar.parse_search(parser.parse_command(bad).args)


def test_mailbox_names_modified_utf7():
    assert parser.encode_mailbox("Entwürfe & Co") == "Entw&APw-rfe &- Co"
    assert parser.decode_mailbox("Entw&APw-rfe &- Co") == "Entwürfe & Co"
    assert parser.decode_mailbox("inbox") == "INBOX"


# --------------------------------------------------------------------------- greeting, TLS


def test_greeting_and_capability_before_and_after_starttls():
    s = Session(tls=True)
    greeting = s.lines()[0]
    assert greeting.startswith("* OK [CAPABILITY IMAP4rev1")
    assert "LOGINDISABLED" in greeting and "AUTH=PLAIN" not in greeting
    caps = s.cmd("c CAPABILITY")
    assert "STARTTLS" in caps[0] and "LOGINDISABLED" in caps[0]
    assert caps[1] == "c OK CAPABILITY completed"
    assert s.cmd("l LOGIN a b")[-1].startswith("l NO [PRIVACYREQUIRED]")
    assert s.cmd("a AUTHENTICATE PLAIN")[-1].startswith("a NO [PRIVACYREQUIRED]")
    assert s.cmd("l LOGIN agent {6}") == [
        "l NO [PRIVACYREQUIRED] Use STARTTLS before logging in"]
    assert s.cmd("t STARTTLS") == ["t OK Begin TLS negotiation now"]
    assert s.transport.tls_started_with is not None
    caps = s.cmd("c CAPABILITY")[0].split()
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps
    assert "AUTH=PLAIN" in caps and "SASL-IR" in caps and "IDLE" in caps and "MOVE" in caps
    assert s.cmd("t STARTTLS")[-1].startswith("t BAD")


def test_starttls_discards_pipelined_commands():
    s = Session(tls=True)
    s.lines()
    s.send("t STARTTLS\r\nx LOGIN agent@example.com secret\r\ny SELECT INBOX\r\n")
    assert s.lines() == ["t OK Begin TLS negotiation now"]
    assert s.backend.attempts == []
    assert s.protocol.state is State.NOT_AUTHENTICATED
    assert s.cmd("n NOOP") == ["n OK NOOP completed"]


def test_no_starttls_without_tls_options():
    s = Session()
    assert "STARTTLS" not in s.lines()[0]
    assert s.cmd("t STARTTLS")[-1].startswith("t NO")


# --------------------------------------------------------------------------- login


def test_login_failures_and_success():
    s = Session()
    s.lines()
    assert s.cmd("a LOGIN agent@example.com wrong") == [
        "a NO [AUTHENTICATIONFAILED] Authentication failed"]
    assert s.cmd("b LOGIN throttled@example.com secret")[-1].startswith("b NO [UNAVAILABLE]")
    assert s.cmd("c LOGIN onlyone")[-1].startswith("c BAD")
    assert s.cmd("d SELECT INBOX")[-1].startswith("d BAD")
    ok = s.cmd('e LOGIN "agent@example.com" {6+}\r\nsecret')
    assert ok[-1].startswith("e OK [CAPABILITY IMAP4rev1") and "LOGIN completed" in ok[-1]
    assert s.backend.attempts[-1] == ("agent@example.com", "secret", "127.0.0.1")
    assert s.cmd("f LOGIN x y")[-1].startswith("f BAD")


def test_authenticate_plain_with_and_without_initial_response():
    token = base64.b64encode(b"\0agent@example.com\0secret").decode()
    s = Session()
    s.lines()
    assert s.cmd(f"a AUTHENTICATE PLAIN {token}")[-1].startswith("a OK")
    s = Session()
    s.lines()
    assert s.cmd("a AUTHENTICATE PLAIN") == ["+ "]
    assert s.cmd(token)[-1].startswith("a OK")
    s = Session()
    s.lines()
    s.cmd("a AUTHENTICATE PLAIN")
    assert s.cmd("*") == ["a BAD Authentication cancelled"]
    bad = base64.b64encode(b"\0agent@example.com\0nope").decode()
    assert s.cmd(f"b AUTHENTICATE PLAIN {bad}") == [
        "b NO [AUTHENTICATIONFAILED] Authentication failed"]
    assert s.cmd("c AUTHENTICATE CRAM-MD5")[-1].startswith("c NO")


def test_garbage_is_bad_and_the_connection_survives():
    s = Session()
    s.lines()
    assert s.cmd("")[:1] == []
    assert s.cmd("(((")[0].startswith("* BAD")
    assert s.cmd("a FROBNICATE")[0] == "a BAD Unknown command FROBNICATE"
    assert s.cmd('a LOGIN "unterminated')[0].startswith("a BAD")
    assert s.cmd("a UID NOOP")[0].startswith("a BAD")
    s.send(b"a \xff\xfe\x00\r\n")
    assert s.lines()[0].startswith(("a BAD", "* BAD"))
    assert s.cmd("z NOOP") == ["z OK NOOP completed"]


def test_long_command_line_accepted_and_overlong_rejected(store):
    s = Session(FakeBackend(store)).selected()
    long_set = ",".join(["1"] * 30000)  # ~60 KiB
    out = s.cmd(f"f FETCH {long_set} (UID)")
    assert out[-1] == "f OK FETCH completed" and len(out) == 2
    s.send(b"x NOOP " + b"A" * 300_000)
    assert s.lines() == ["* BAD Command line too long"]
    s.send(b"AAAA\r\nn NOOP\r\n")
    # once the refused line ends, its command is completed with its own tag
    assert s.lines() == ["x BAD [TOOBIG] Command line too long", "n OK NOOP completed"]
    s.send(b"y APPEND INBOX {3}\r\n")  # an over-long line after a literal: same tag
    s.send(b"abc" + b"B" * 300_000)
    s.send(b"\r\nm NOOP\r\n")
    assert s.lines()[-2:] == ["y BAD [TOOBIG] Command line too long", "m OK NOOP completed"]


def test_autologout_and_login_timeout():
    s = Session()
    s.lines()
    s.clock.advance(119)
    assert s.lines() == []
    s.clock.advance(2)
    assert s.lines() == ["* BYE Autologout; idle for too long"]
    assert s.transport.disconnecting
    s = Session().login()
    s.clock.advance(29 * 60)
    assert s.cmd("n NOOP") == ["n OK NOOP completed"]
    s.clock.advance(29 * 60)
    assert s.lines() == []
    s.clock.advance(61)
    assert s.lines() == ["* BYE Autologout; idle for too long"]


# --------------------------------------------------------------------------- ordering


def test_pipelined_commands_answered_in_order_with_slow_backend(store):
    s = Session(FakeBackend(store)).login()
    gate: defer.Deferred = defer.Deferred()
    s.account.gate = gate
    s.send("a SELECT INBOX\r\nb FETCH 1 (UID)\r\nc NOOP\r\n")
    assert s.lines() == []  # SELECT waits; nothing after it has run
    s.account.gate = None
    gate.callback(None)
    lines = s.lines()
    tagged = [line.split()[0] for line in lines if not line.startswith("*")]
    assert tagged == ["a", "b", "c"]
    assert "* 1 FETCH (UID 1)" in lines


# --------------------------------------------------------------------------- SELECT, LIST


def test_select_response(store):
    s = Session(FakeBackend(store)).login()
    lines = s.cmd("s SELECT INBOX")
    assert lines == [
        "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft project)",
        "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft project \\*)] "
        "Flags permitted",
        "* 3 EXISTS",
        "* 0 RECENT",
        "* OK [UNSEEN 2] First unseen",
        "* OK [UIDVALIDITY 1000] UIDs valid",
        "* OK [UIDNEXT 4] Predicted next UID",
        f"* OK [HIGHESTMODSEQ {store.modseq}] Highest",
        "s OK [READ-WRITE] SELECT completed",
    ]
    assert s.cmd("e EXAMINE Sent")[-1] == "e OK [READ-ONLY] EXAMINE completed"
    assert s.cmd("x SELECT Nope")[-1] == "x NO [NONEXISTENT] No such mailbox"
    assert s.protocol.state is State.AUTHENTICATED


def test_list_lsub_status_create_delete_rename(store):
    s = Session(FakeBackend(store)).login()
    assert s.cmd('l LIST "" *') == [
        '* LIST (\\HasNoChildren) "/" "INBOX"',
        '* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
        '* LIST (\\HasNoChildren \\Trash) "/" "Trash"',
        "l OK LIST completed"]
    assert s.cmd('l LIST "" ""')[0] == '* LIST (\\Noselect) "/" ""'
    assert s.cmd("c CREATE Projects/2026")[-1] == "c OK CREATE completed"
    assert s.cmd("c CREATE Projects/2026")[-1].startswith("c NO [ALREADYEXISTS]")
    assert s.cmd("c CREATE Entw&APw-rfe")[-1] == "c OK CREATE completed"
    assert "Entwürfe" in store.folders
    assert '"Entw&APw-rfe"' in s.cmd('l LIST "" Entw*')[0]
    assert s.cmd('l LIST "" %')[-1] == "l OK LIST completed"
    assert s.cmd("d DELETE Nope")[-1].startswith("d NO [NONEXISTENT]")
    assert s.cmd("d DELETE INBOX")[-1].startswith("d NO [CANNOT]")
    assert s.cmd("r RENAME Projects/2026 Sent")[-1].startswith("r NO [ALREADYEXISTS]")
    assert s.cmd("r RENAME Projects/2026 Old")[-1] == "r OK RENAME completed"
    assert s.cmd("u UNSUBSCRIBE Old")[-1] == "u OK UNSUBSCRIBE completed"
    assert all("Old" not in line for line in s.cmd('l LSUB "" *'))
    assert s.cmd("st STATUS INBOX (MESSAGES UNSEEN UIDNEXT UIDVALIDITY)") == [
        '* STATUS "INBOX" (MESSAGES 3 UNSEEN 2 UIDNEXT 4 UIDVALIDITY 1000)',
        "st OK STATUS completed"]
    assert s.cmd("st STATUS INBOX (BOGUS)")[-1].startswith("st BAD")
    size = sum(len(m.raw) for m in store.folders["INBOX"].messages.values())
    assert s.cmd("st STATUS INBOX (SIZE RECENT)")[0] == \
        f'* STATUS "INBOX" (SIZE {size} RECENT 0)'
    caps = s.cmd("c CAPABILITY")[0].split()
    assert "STATUS=SIZE" in caps and f"APPENDLIMIT={64 * 1024 * 1024}" in caps
    assert s.cmd("n NAMESPACE")[0] == '* NAMESPACE (("" "/")) NIL NIL'
    assert s.cmd("i ID NIL")[0] == '* ID ("name" "AgentPost")'
    assert s.cmd("e ENABLE CONDSTORE")[0] == "* ENABLED CONDSTORE"


def test_readonly_key_gets_noperm(store):
    s = Session(FakeBackend(store)).login("readonly")
    assert s.cmd("s SELECT INBOX")[-1] == "s OK [READ-ONLY] SELECT completed"
    assert s.cmd("c CREATE X")[-1].startswith("c NO [NOPERM]")
    assert s.cmd("t STORE 1 +FLAGS (\\Deleted)")[-1].startswith("t NO [NOPERM]")
    assert s.cmd("a APPEND INBOX {3}")[-1].startswith("a NO [NOPERM]")
    # A body fetch on a read-only key acts like PEEK.
    out = s.cmd("f FETCH 2 BODY[]")
    assert "FLAGS" not in out[0]
    assert not any(c[0] == "set_seen" for c in store.calls)


# --------------------------------------------------------------------------- FETCH


def test_fetch_items(store):
    s = Session(FakeBackend(store)).selected()
    store.calls.clear()
    out = s.cmd("f FETCH 1:3 (FLAGS UID)")
    assert out == ["* 1 FETCH (FLAGS (\\Seen) UID 1)", "* 2 FETCH (FLAGS () UID 2)",
                   "* 3 FETCH (FLAGS (\\Flagged project) UID 3)", "f OK FETCH completed"]
    assert store.calls == []  # FLAGS and UID: answered from the session's view
    out = s.cmd("f FETCH 1 (INTERNALDATE RFC822.SIZE ENVELOPE)")
    assert out[0] == (
        f'* 1 FETCH (INTERNALDATE "02-Jan-2026 03:04:05 +0000" RFC822.SIZE {len(_plain(1))} '
        'ENVELOPE (NIL "msg 1" ((NIL NIL "s1" "example.org")) ((NIL NIL "s1" "example.org")) '
        '((NIL NIL "s1" "example.org")) ((NIL NIL "t" "example.com")) NIL NIL NIL '
        '"<1@example.org>"))')
    out = s.cmd("u UID FETCH 3 (BODYSTRUCTURE BODY)")
    assert out[0] == ('* 3 FETCH (UID 3 BODYSTRUCTURE ("text" "plain" ("charset" "us-ascii") '
                      'NIL NIL "7bit" 8 1 NIL NIL NIL NIL) BODY ("text" "plain" '
                      '("charset" "us-ascii") NIL NIL "7bit" 8 1))')
    assert s.cmd("f FETCH 4 UID")[-1].startswith("f BAD")
    assert s.cmd("f FETCH 1 (BOGUS)")[-1].startswith("f BAD")
    assert s.cmd("u UID FETCH 99:* UID")[0] == "* 3 FETCH (UID 3)"


def test_fetch_partial_and_byte_exact_headers(store):
    s = Session(FakeBackend(store)).selected()
    s.send(b"p FETCH 2 (BODY.PEEK[]<0.10>)\r\n")
    assert s.raw() == b"* 2 FETCH (BODY[]<0> {10}\r\nReceived: )\r\np OK FETCH completed\r\n"
    s.send(b"p FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
    expected = (b"Subject: =?utf-8?q?first?=\r\n"
                b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n\r\n")
    assert s.raw() == (b"* 2 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {%d}\r\n" % len(expected)
                       + expected + b")\r\np OK FETCH completed\r\n")
    header = MSG_UTF8[:MSG_UTF8.index(b"\r\n\r\n") + 4]
    s.send(b"p FETCH 2 (BODY.PEEK[HEADER])\r\n")
    assert s.raw() == (b"* 2 FETCH (BODY[HEADER] {%d}\r\n" % len(header) + header
                       + b")\r\np OK FETCH completed\r\n")
    s.send(b"p FETCH 2 (BODY.PEEK[])\r\n")
    assert s.raw() == (b"* 2 FETCH (BODY[] {%d}\r\n" % len(MSG_UTF8) + MSG_UTF8
                       + b")\r\np OK FETCH completed\r\n")
    s.send(b"p FETCH 2 (BODY.PEEK[TEXT]<6.100>)\r\n")
    rest = MSG_UTF8[len(header) + 6:]
    assert s.raw() == (b"* 2 FETCH (BODY[TEXT]<6> {%d}\r\n" % len(rest) + rest
                       + b")\r\np OK FETCH completed\r\n")
    s.send(b"p FETCH 2 (BODY.PEEK[]<9999.10>)\r\n")
    assert s.raw() == b"* 2 FETCH (BODY[]<9999> {0}\r\n)\r\np OK FETCH completed\r\n"
    assert store.folders["INBOX"].messages[2].flags == frozenset()


def test_non_peek_fetch_sets_seen(store):
    s = Session(FakeBackend(store)).selected()
    s.send(b"f FETCH 2 (BODY[TEXT])\r\n")
    out = s.raw()
    body = MSG_UTF8[MSG_UTF8.index(b"\r\n\r\n") + 4:]
    assert out == (b"* 2 FETCH (BODY[TEXT] {%d}\r\n" % len(body) + body
                   + b" FLAGS (\\Seen))\r\nf OK FETCH completed\r\n")
    assert "\\Seen" in store.folders["INBOX"].messages[2].flags
    s.send(b"f FETCH 2 RFC822.HEADER\r\n")
    assert b"FLAGS" not in s.raw()  # already seen, RFC822.HEADER does not set it
    e = Session(FakeBackend(store)).login()
    e.cmd("e EXAMINE INBOX")
    store.calls.clear()
    e.cmd("f FETCH 3 BODY[]")
    assert not any(c[0] == "set_seen" for c in store.calls)


# --------------------------------------------------------------------------- STORE, SEARCH


def test_store_and_unchangedsince(store):
    s = Session(FakeBackend(store)).selected()
    assert s.cmd("t STORE 2 +FLAGS (\\Answered x)") == [
        "* 2 FETCH (FLAGS (\\Answered x))", "t OK STORE completed"]
    assert s.cmd("t STORE 2 -FLAGS.SILENT \\Answered") == ["t OK STORE completed"]
    assert store.folders["INBOX"].messages[2].flags == {"x"}
    modseq1 = store.folders["INBOX"].messages[1].modseq
    highest = store.modseq
    out = s.cmd(f"t UID STORE 1,3 (UNCHANGEDSINCE {modseq1}) FLAGS (\\Deleted)")
    assert out[0] == f"* OK [HIGHESTMODSEQ {highest}] Highest"  # first enabling command
    assert out[1] == f"* 1 FETCH (UID 1 FLAGS (\\Deleted) MODSEQ ({store.modseq}))"
    assert out[-1] == "t OK [MODIFIED 3] Conditional STORE failed"
    assert s.cmd("t STORE 1 FLAGS (\\Bogus)")[-1].startswith("t BAD")
    out = s.cmd("f FETCH 1 (MODSEQ)")
    assert out[0] == f"* 1 FETCH (MODSEQ ({store.modseq}))"


def test_search(store):
    s = Session(FakeBackend(store)).selected()
    assert s.cmd("s SEARCH UNSEEN") == ["* SEARCH 2 3", "s OK SEARCH completed"]
    assert s.cmd("s UID SEARCH 2:* FROM s3") == ["* SEARCH 3", "s OK SEARCH completed"]
    assert store.calls[-1] == ("search", ("and", [("uid", [2, 3]), ("header", "from", "s3")]))
    assert s.cmd("s SEARCH CHARSET KOI8-R ALL")[-1].startswith("s NO [BADCHARSET")
    assert s.cmd("s SEARCH FLAGGED OR")[-1].startswith("s BAD")
    out = s.cmd("s SEARCH MODSEQ 1")
    assert out[0] == f"* OK [HIGHESTMODSEQ {store.modseq}] Highest"  # CONDSTORE enabled
    assert out[1] == f"* SEARCH 1 2 3 (MODSEQ {store.folders['INBOX'].messages[3].modseq})"


# --------------------------------------------------------------------------- APPEND


def test_append_trycreate_before_literal(store):
    s = Session(FakeBackend(store)).login()
    assert s.cmd("a APPEND Nope (\\Seen) {12}") == [
        "a NO [TRYCREATE] Mailbox does not exist"]
    assert s.cmd("n NOOP") == ["n OK NOOP completed"]  # the literal was never expected
    # LITERAL+: the octets come anyway and must be consumed before answering.
    s.send(b"b APPEND Nope {12+}\r\nn NOOP\r\nxyz\r\n")
    assert s.lines() == ["b NO [TRYCREATE] Mailbox does not exist"]
    assert s.cmd("n NOOP") == ["n OK NOOP completed"]


def test_append_with_flags_and_date(store):
    s = Session(FakeBackend(store)).login()
    msg = b"Subject: hi\r\n\r\nbody\r\n"
    assert s.cmd(b'a APPEND Sent (\\Seen \\Draft) "05-Mar-2026 10:00:00 +0100" {%d}'
                 % len(msg)) == ["+ Ready for literal data"]
    assert s.cmd(msg) == ["a OK [APPENDUID 1000 1] APPEND completed"]
    assert store.folders["Sent"].messages[1].raw == msg
    assert store.folders["Sent"].messages[1].flags == {"\\Seen", "\\Draft"}
    s.send(b"b APPEND Sent {%d+}\r\n" % len(msg) + msg + b"\r\n")
    assert s.lines() == ["b OK [APPENDUID 1000 2] APPEND completed"]


def test_oversize_literal_is_consumed_and_refused(store):
    s = Session(FakeBackend(store), max_append_bytes=100).login()
    assert s.cmd("a APPEND INBOX {101}") == ["a NO [TOOBIG] Literal too large"]
    s.send(b"b APPEND INBOX {200+}\r\n" + b"x" * 150)
    assert s.lines() == ["b NO [TOOBIG] Literal too large"]
    s.send(b"y" * 50 + b" trailing\r\nn NOOP\r\n")
    assert s.lines() == ["n OK NOOP completed"]
    assert s.cmd("l LOGIN {70000}")[-1].startswith("l NO [TOOBIG]")


# --------------------------------------------------------------------------- COPY, MOVE, EXPUNGE


def test_copy_move_expunge(store):
    s = Session(FakeBackend(store)).selected()
    assert s.cmd("c COPY 1:2 Trash") == ["c OK [COPYUID 1000 1:2 1:2] COPY completed"]
    assert s.cmd("c COPY 1 Nope")[-1] == "c NO [TRYCREATE] Mailbox does not exist"
    assert s.cmd("m UID MOVE 2 Sent") == ["* OK [COPYUID 1000 2 1] Moved", "* 2 EXPUNGE",
                                         "m OK MOVE completed"]
    assert s.cmd("t STORE 1:2 +FLAGS.SILENT (\\Deleted)") == ["t OK STORE completed"]
    assert s.cmd("e EXPUNGE") == ["* 2 EXPUNGE", "* 1 EXPUNGE", "e OK EXPUNGE completed"]
    assert s.cmd("f FETCH 1:* UID") == ["f OK FETCH completed"]
    assert s.cmd("f FETCH 1 UID")[-1] == "f BAD Invalid message sequence number"


def test_uid_expunge_only_given_uids(store):
    s = Session(FakeBackend(store)).selected()
    s.cmd("t STORE 1:3 +FLAGS.SILENT (\\Deleted)")
    assert s.cmd("e UID EXPUNGE 3") == ["* 3 EXPUNGE", "e OK EXPUNGE completed"]
    assert sorted(store.folders["INBOX"].messages) == [1, 2]
    assert s.cmd("c CLOSE") == ["c OK CLOSE completed"]
    assert store.folders["INBOX"].messages == {}


# --------------------------------------------------------------------------- other sessions


def test_changes_pushed_to_another_session(store):
    backend = FakeBackend(store)
    a = Session(backend).selected()
    b = Session(backend, clock=a.clock).selected()
    a.cmd("t STORE 3 +FLAGS.SILENT (\\Deleted)")
    a.cmd("e EXPUNGE")
    store.deliver("INBOX", _plain(9))
    a.cmd("t STORE 1 +FLAGS.SILENT (\\Answered)")
    # FETCH (no UID) must not report the expunge; the flag change and EXISTS may come.
    out = b.cmd("f FETCH 1 (FLAGS)")
    assert not any("EXPUNGE" in line for line in out)
    assert out[-1] == "f OK FETCH completed"
    out = b.cmd("n NOOP")
    assert "* 3 EXPUNGE" in out and out[-1] == "n OK NOOP completed"
    full = b.cmd("f FETCH 1:* UID")
    assert full[:-1] == ["* 1 FETCH (UID 1)", "* 2 FETCH (UID 2)", "* 3 FETCH (UID 4)"]


def test_idle_wakes_on_change(store):
    backend = FakeBackend(store)
    s = Session(backend).selected()
    assert s.cmd("i IDLE") == ["+ idling"]
    store.deliver("INBOX", _plain(7))
    assert s.lines() == ["* 4 EXISTS", "* 1 RECENT"]
    other = Session(backend, clock=s.clock).selected()
    other.cmd("t STORE 2 +FLAGS.SILENT (\\Flagged)")
    assert s.lines() == ["* 2 FETCH (UID 2 FLAGS (\\Flagged))"]
    assert s.cmd("DONE") == ["i OK IDLE terminated"]
    assert s.cmd("n NOOP") == ["n OK NOOP completed"]
    assert s.cmd("f FETCH 4 FLAGS") == ["* 4 FETCH (FLAGS (\\Recent))", "f OK FETCH completed"]


def test_unexpected_backend_errors_are_no_unavailable(store, caplog):
    s = Session(FakeBackend(store)).selected()
    s.account.fail_with = errors.TemporaryFailure()
    assert s.cmd("f FETCH 1 RFC822.SIZE")[-1].startswith("f NO [UNAVAILABLE]")
    s.account.fail_with = RuntimeError("boom")
    out = s.cmd("f FETCH 1 RFC822.SIZE")
    assert out[-1].startswith("f NO [UNAVAILABLE] Internal error (ref ")
    assert "boom" in caplog.text
    s.account.fail_with = None
    assert s.cmd("n NOOP") == ["n OK NOOP completed"]


def test_logout_and_unselect(store):
    s = Session(FakeBackend(store)).selected()
    assert s.cmd("u UNSELECT") == ["u OK UNSELECT completed"]
    assert s.cmd("f FETCH 1 FLAGS")[-1] == "f BAD No mailbox selected"
    assert s.cmd("o LOGOUT") == ["* BYE Logging out", "o OK LOGOUT completed"]
    assert s.transport.disconnecting


def test_nothing_but_the_tagged_ok_follows_bye(store):
    """Changes pending for a selected session (another session's EXPUNGE, a new message,
    a flag change) are not reported after LOGOUT's BYE: RFC 3501 §7.1.5 allows only the
    tagged completion there (issue 10, item 2)."""
    backend = FakeBackend(store)
    a = Session(backend).selected()
    b = Session(backend, clock=a.clock).selected()
    a.cmd("t STORE 3 +FLAGS.SILENT (\\Deleted)")
    a.cmd("e EXPUNGE")
    store.deliver("INBOX", _plain(9))
    a.cmd("t STORE 1 +FLAGS.SILENT (\\Answered)")
    assert b.cmd("o LOGOUT") == ["* BYE Logging out", "o OK LOGOUT completed"]
    assert b.transport.disconnecting


def test_factory_connection_caps():
    from twisted.internet.address import IPv4Address
    factory = IMAPFactory(FakeBackend(), hostname="imap.test", clock=Clock(),
                          max_connections_per_ip=1)
    first = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    assert isinstance(first, IMAP4ServerProtocol)
    second = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 2))
    t = StringTransport()
    second.makeConnection(t)
    assert t.value().startswith(b"* BYE [UNAVAILABLE]")
    first.makeConnection(StringTransport())
    first.connectionLost(None)
    assert factory.connections == 0


def test_append_mailbox_check_waits_for_slow_backend(store):
    s = Session(FakeBackend(store)).login()
    gate: defer.Deferred = defer.Deferred()
    s.account.gate = gate
    s.send(b"a APPEND INBOX {3}\r\n")
    assert s.lines() == []  # no "+" until the mailbox is known to exist
    s.account.gate = None
    gate.callback(None)
    assert s.lines() == ["+ Ready for literal data"]
    assert s.cmd("abc") == ["a OK [APPENDUID 1000 4] APPEND completed"]


def test_idle_done_pipelined_with_next_command(store):
    s = Session(FakeBackend(store)).selected()
    s.send("i IDLE\r\nDONE\r\nn NOOP\r\n")
    assert s.lines() == ["+ idling", "i OK IDLE terminated", "n OK NOOP completed"]
    s.send("i IDLE\r\nnope\r\n")
    assert s.lines() == ["+ idling", "i BAD Expected DONE"]


def test_condstore_select_and_changedsince(store):
    s = Session(FakeBackend(store)).login()
    assert s.cmd("s SELECT INBOX (CONDSTORE)")[-1] == "s OK [READ-WRITE] SELECT completed"
    before = store.modseq
    s.cmd("t STORE 3 +FLAGS.SILENT (\\Seen)")
    out = s.cmd(f"f FETCH 1:* (FLAGS) (CHANGEDSINCE {before})")
    assert out == [f"* 3 FETCH (FLAGS (\\Flagged \\Seen project) MODSEQ ({store.modseq}))",
                   "f OK FETCH completed"]
    assert s.cmd("e EXAMINE Sent")[0] == "* OK [CLOSED] Previous mailbox closed"


def test_condstore_enabled_modseq_rides_with_every_flags_response(store):
    s = Session(FakeBackend(store)).login()
    # ENABLE before SELECT: nothing is selected, so no HIGHESTMODSEQ yet.
    assert s.cmd("e ENABLE CONDSTORE") == ["* ENABLED CONDSTORE", "e OK ENABLE completed"]
    assert f"* OK [HIGHESTMODSEQ {store.modseq}] Highest" in s.cmd("s SELECT INBOX")
    inbox = store.folders["INBOX"]
    # STORE (not UID STORE): UID and MODSEQ come along (RFC 7162 §3.1).
    assert s.cmd("t STORE 2 +FLAGS (\\Flagged)") == [
        f"* 2 FETCH (UID 2 FLAGS (\\Flagged) MODSEQ ({store.modseq}))", "t OK STORE completed"]
    # .SILENT still reports the new mod-sequence, without FLAGS (as Dovecot does).
    assert s.cmd("t STORE 2 -FLAGS.SILENT (\\Flagged)") == [
        f"* 2 FETCH (UID 2 MODSEQ ({store.modseq}))", "t OK STORE completed"]
    assert inbox.messages[2].modseq == store.modseq
    # A FETCH of FLAGS carries MODSEQ; one without FLAGS does not.
    assert s.cmd("f FETCH 2 (FLAGS)") == [
        f"* 2 FETCH (FLAGS () MODSEQ ({store.modseq}))", "f OK FETCH completed"]
    assert s.cmd("f FETCH 2 (UID RFC822.SIZE)")[0] == \
        f"* 2 FETCH (UID 2 RFC822.SIZE {len(MSG_UTF8)})"
    assert s.cmd("f FETCH 2 (FLAGS MODSEQ)") == [
        f"* 2 FETCH (FLAGS () MODSEQ ({store.modseq}))", "f OK FETCH completed"]
    # The implicit \Seen of a non-PEEK body fetch: UID, FLAGS and the new MODSEQ.
    s.send(b"f FETCH 2 (BODY[TEXT])\r\n")
    body = MSG_UTF8[MSG_UTF8.index(b"\r\n\r\n") + 4:]
    assert s.raw() == (b"* 2 FETCH (UID 2 BODY[TEXT] {%d}\r\n" % len(body) + body
                       + b" FLAGS (\\Seen) MODSEQ (%d))\r\nf OK FETCH completed\r\n"
                       % store.modseq)
    assert inbox.messages[2].modseq == store.modseq
    # EXAMINE/SELECT keep reporting HIGHESTMODSEQ, never NOMODSEQ.
    out = s.cmd("x EXAMINE INBOX")
    assert f"* OK [HIGHESTMODSEQ {store.modseq}] Highest" in out
    assert not any("NOMODSEQ" in line for line in out)


@pytest.mark.parametrize("command", [
    "e ENABLE CONDSTORE", "e ENABLE QRESYNC", "f FETCH 1 (MODSEQ)", "f UID FETCH 1 (FLAGS) "
    "(CHANGEDSINCE 1)", "t STORE 1 (UNCHANGEDSINCE 99) +FLAGS.SILENT (x)",
    "s SEARCH MODSEQ 1", "s UID SORT (SIZE) UTF-8 MODSEQ 1", "t STATUS Sent (HIGHESTMODSEQ)"])
def test_first_condstore_enabling_command_while_selected_sends_highestmodseq(store, command):
    s = Session(FakeBackend(store)).selected()
    highest = f"* OK [HIGHESTMODSEQ {store.modseq}] Highest"
    out = s.cmd(command)
    assert out.count(highest) == 1, out
    assert out[-1].split()[1] == "OK", out
    assert highest not in s.cmd(command)  # only the first one
    # ... and from then on FLAGS travel with MODSEQ.
    assert s.cmd("f FETCH 3 (FLAGS)")[0] == \
        f"* 3 FETCH (FLAGS (\\Flagged project) MODSEQ ({_inbox_modseq(store, 3)}))"
    assert s.cmd("t STORE 3 +FLAGS (y)")[0] == \
        f"* 3 FETCH (UID 3 FLAGS (\\Flagged project y) MODSEQ ({store.modseq}))"


def _inbox_modseq(store: FakeStore, uid: int) -> int:
    return store.folders["INBOX"].messages[uid].modseq


def test_fetch_rfc822_and_body_parts(store):
    s = Session(FakeBackend(store)).selected()
    s.send(b"f FETCH 1 (RFC822.HEADER BODY.PEEK[1] BODY.PEEK[1.MIME] RFC822.SIZE)\r\n")
    raw = _plain(1)
    header, body = raw[:raw.index(b"\r\n\r\n") + 4], raw[raw.index(b"\r\n\r\n") + 4:]
    assert s.raw() == (b"* 1 FETCH (RFC822.HEADER {%d}\r\n" % len(header) + header
                       + b" BODY[1] {%d}\r\n" % len(body) + body
                       + b" BODY[1.MIME] {%d}\r\n" % len(header) + header
                       + b" RFC822.SIZE %d)\r\nf OK FETCH completed\r\n" % len(raw))
    s.send(b"f FETCH 2 RFC822\r\n")
    assert s.raw() == (b"* 2 FETCH (RFC822 {%d}\r\n" % len(MSG_UTF8) + MSG_UTF8
                       + b" FLAGS (\\Seen))\r\nf OK FETCH completed\r\n")


def _big_multipart(size: int) -> bytes:
    blob = base64.encodebytes(bytes(range(256)) * (size // 256 + 1))[:size]
    return (b"From: Big <big@example.org>\r\nTo: agent@example.com\r\nSubject: big\r\n"
            b"X-Dup: one\r\nX-Dup: two\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\npreamble\r\n'
            b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
            b"--b1\r\nContent-Type: message/rfc822\r\n\r\n"
            b"Subject: inner\r\nFrom: in@example.org\r\n\r\ninner body\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + blob + b"\r\n--b1--\r\n")


STREAM_FETCHES = [
    "BODY.PEEK[]", "BODY.PEEK[]<0.10>", "BODY.PEEK[]<300000.700000>", "BODY.PEEK[]<99999999.5>",
    "BODY.PEEK[HEADER]", "BODY.PEEK[HEADER.FIELDS (X-DUP SUBJECT)]",
    "BODY.PEEK[HEADER.FIELDS.NOT (X-DUP)]<3.20>", "BODY.PEEK[TEXT]<5.100>", "BODY.PEEK[1]",
    "BODY.PEEK[1.MIME]", "BODY.PEEK[2.HEADER]", "BODY.PEEK[2.TEXT]", "BODY.PEEK[2.1]",
    "BODY.PEEK[3]", "BODY.PEEK[3]<1.262144>", "BODY.PEEK[4]", "BODY.PEEK[9.9.TEXT]",
    "RFC822.HEADER", "BODY.PEEK[3.MIME]",
]


@pytest.mark.parametrize("items", STREAM_FETCHES)
def test_streamed_sections_equal_sliced_sections(store, items):
    """Above the threshold a section is a range of the blob (from the section map); the
    bytes on the wire are the same as slicing the loaded message."""
    raw = _big_multipart(900_000)
    uid = store.deliver("INBOX", raw)
    sliced = Session(FakeBackend(store), stream_threshold=10**9).selected()
    sliced.raw()
    sliced.send(f"f UID FETCH {uid} ({items})\r\n".encode())
    expected = sliced.raw()
    assert expected.endswith(b"f OK FETCH completed\r\n")
    store.calls.clear()
    streamed = Session(FakeBackend(store), stream_threshold=1000).selected()
    streamed.raw()
    streamed.send(f"f UID FETCH {uid} ({items})\r\n".encode())
    assert streamed.raw() == expected
    assert ("fetch_raw", uid) not in store.calls and ("read_blob", f"1/{uid}") not in store.calls
    reads = [arg for what, arg in store.calls if what == "read_range"]
    assert all(length <= 256 * 1024 for _, _, length in reads)


class SmallBufferTransport(TLSCapableTransport):
    """Pauses its producer once 64 KiB are unread, as a full socket buffer does."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > 64 * 1024 and self.producer is not None:
            self.producer.pauseProducing()


def test_streamed_body_waits_for_the_client(store):
    """Back-pressure: while the client does not read, no further chunk is read."""
    raw = _big_multipart(2_000_000)
    uid = store.deliver("INBOX", raw)
    s = Session(FakeBackend(store), stream_threshold=1000).selected()
    s.raw()
    s.transport = SmallBufferTransport()
    s.protocol.transport = s.transport
    s.transport.registerProducer(s.protocol, True)
    store.calls.clear()
    s.send(f"f UID FETCH {uid} BODY.PEEK[]\r\n".encode())
    received = b""
    rounds = 0
    while not received.endswith(b"f OK FETCH completed\r\n"):
        reads = sum(1 for c in store.calls if c[0] == "read_range")
        assert reads == min(rounds + 1, 8)  # one chunk each time the client drained
        received += s.raw()
        rounds += 1
        s.protocol.resumeProducing()
    assert sum(1 for c in store.calls if c[0] == "read_range") == 8  # ceil(2 MB / 256 KiB)
    literal = received[received.index(b"}\r\n") + 3:]
    assert literal[:len(raw)] == raw


def test_streaming_failure_mid_literal_hangs_up(store):
    """A blob that vanishes mid-literal cannot be answered with NO: the session ends."""
    raw = _big_multipart(1_000_000)
    uid = store.deliver("INBOX", raw)
    s = Session(FakeBackend(store), stream_threshold=1000).selected()
    s.raw()
    s.account.range_gate = defer.Deferred()
    s.send(f"f UID FETCH {uid} BODY.PEEK[]\r\n".encode())
    del store.folders["INBOX"].messages[uid]  # expunged and collected meanwhile
    gate, s.account.range_gate = s.account.range_gate, None
    gate.callback(None)
    out = s.raw()
    assert b"f OK" not in out and b"f NO" not in out
    assert s.transport.disconnecting


def test_list_extended_status_and_special_use(store):
    s = Session(FakeBackend(store)).login()
    caps = s.cmd("c CAPABILITY")[0]
    assert all(c in caps.split() for c in ("LIST-EXTENDED", "LIST-STATUS", "ESEARCH"))
    assert s.cmd('l LIST "" (INBOX Sent) RETURN (STATUS (MESSAGES UNSEEN))') == [
        '* LIST (\\HasNoChildren) "/" "INBOX"',
        '* STATUS "INBOX" (MESSAGES 3 UNSEEN 2)',
        '* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
        '* STATUS "Sent" (MESSAGES 0 UNSEEN 0)',
        "l OK LIST completed"]
    assert s.cmd('l LIST (SPECIAL-USE) "" *') == [
        '* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
        '* LIST (\\HasNoChildren \\Trash) "/" "Trash"',
        "l OK LIST completed"]
    assert s.cmd("c CREATE Projects/2026")[-1] == "c OK CREATE completed"
    assert s.cmd("u UNSUBSCRIBE Projects")[-1] == "u OK UNSUBSCRIBE completed"
    assert s.cmd("u UNSUBSCRIBE Trash")[-1] == "u OK UNSUBSCRIBE completed"
    subscribed = s.cmd('l LIST (SUBSCRIBED) "" *')
    assert '* LIST (\\HasNoChildren \\Subscribed) "/" "Projects/2026"' in subscribed
    assert not any('"Trash"' in line or '"Projects"' in line for line in subscribed)
    recursive = s.cmd('l LIST (SUBSCRIBED RECURSIVEMATCH) "" %')
    assert '* LIST (\\HasChildren) "/" "Projects" ("CHILDINFO" ("SUBSCRIBED"))' in recursive
    assert s.cmd('l LIST "" Sent RETURN (SUBSCRIBED)')[0] == \
        '* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" "Sent"'
    assert s.cmd('l LIST (RECURSIVEMATCH) "" *')[-1].startswith("l BAD")
    assert s.cmd('l LIST (BOGUS) "" *')[-1].startswith("l BAD")
    assert s.cmd('l LIST "" * RETURN (STATUS (NOPE))')[-1].startswith("l BAD")


def test_esearch_return_options(store):
    s = Session(FakeBackend(store)).selected()
    assert s.cmd("a SEARCH RETURN (MIN MAX COUNT) UNSEEN") == [
        '* ESEARCH (TAG "a") MIN 2 MAX 3 COUNT 2', "a OK SEARCH completed"]
    assert s.cmd("b UID SEARCH RETURN () ALL") == [
        '* ESEARCH (TAG "b") UID ALL 1:3', "b OK SEARCH completed"]
    assert s.cmd("c SEARCH RETURN (COUNT ALL) UID 99") == [
        '* ESEARCH (TAG "c") COUNT 0', "c OK SEARCH completed"]
    assert s.cmd("d SEARCH RETURN (BOGUS) ALL")[-1].startswith("d BAD")
    assert s.cmd("e SEARCH UNSEEN") == ["* SEARCH 2 3", "e OK SEARCH completed"]


def test_qresync_select_vanished_and_fetch(store):
    store.deliver("INBOX", _plain(4))
    store.deliver("INBOX", _plain(5))  # UIDs 1..5, MODSEQ 11..15
    del store.folders["INBOX"].messages[2]
    s = Session(FakeBackend(store)).login()
    assert s.cmd("s SELECT INBOX (QRESYNC (1000 12))")[-1].startswith("s BAD")
    assert s.cmd("e ENABLE QRESYNC") == ["* ENABLED QRESYNC", "e OK ENABLE completed"]
    lines = s.cmd("s SELECT INBOX (QRESYNC (1000 12 1:5))")
    assert "* VANISHED (EARLIER) 2" in lines
    fetched = [line for line in lines if " FETCH " in line]
    assert fetched == ["* 2 FETCH (UID 3 FLAGS (\\Flagged project) MODSEQ (13))",
                       "* 3 FETCH (UID 4 FLAGS (\\Recent) MODSEQ (14))",
                       "* 4 FETCH (UID 5 FLAGS (\\Recent) MODSEQ (15))"]
    assert lines[-1] == "s OK [READ-WRITE] SELECT completed"
    lines = s.cmd("s SELECT INBOX (QRESYNC (1000 14 4:5))")
    assert lines[0] == "* OK [CLOSED] Previous mailbox closed"
    assert not any("VANISHED" in line for line in lines)
    assert [line for line in lines if " FETCH " in line] == [
        "* 4 FETCH (UID 5 FLAGS () MODSEQ (15))"]
    lines = s.cmd("s SELECT INBOX (QRESYNC (999 1))")  # UIDVALIDITY changed: full resync
    assert not any("VANISHED" in line or " FETCH " in line for line in lines)
    assert s.cmd("f UID FETCH 1:* (FLAGS) (CHANGEDSINCE 13 VANISHED)") == [
        "* VANISHED (EARLIER) 2",
        "* 3 FETCH (UID 4 FLAGS () MODSEQ (14))",
        "* 4 FETCH (UID 5 FLAGS () MODSEQ (15))",
        "f OK FETCH completed"]
    assert s.cmd("f FETCH 1:* (FLAGS) (CHANGEDSINCE 13 VANISHED)")[-1].startswith("f BAD")
    assert s.cmd("f UID FETCH 1:* (FLAGS) (VANISHED)")[-1].startswith("f BAD")
    s.cmd("st STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert s.cmd("x EXPUNGE") == ["* VANISHED 3", "x OK EXPUNGE completed"]
    store.deliver("INBOX", _plain(6))
    del store.folders["INBOX"].messages[4]  # another session expunges
    store.notify(store.folders["INBOX"].id)
    assert "* VANISHED 4" in s.cmd("n NOOP")


def test_qresync_known_uids_never_expand(store):
    """A client may claim 1:4000000000; the answer is gaps, computed without a list."""
    s = Session(FakeBackend(store)).login()
    s.cmd("e ENABLE QRESYNC")
    lines = s.cmd("s SELECT INBOX (QRESYNC (1000 1 1:4000000000))")
    assert not any("VANISHED" in line for line in lines)  # UIDs 1..3 all exist
    del store.folders["INBOX"].messages[1]
    lines = s.cmd("s SELECT INBOX (QRESYNC (1000 100 1:4000000000))")
    assert "* VANISHED (EARLIER) 1" in lines


def test_append_literals_are_spooled_not_buffered(store):
    """The message literal goes to a spool file (the command keeps an empty literal);
    a literal mailbox name stays a name; LITERAL+ works the same; bytes are exact."""
    s = Session(FakeBackend(store)).login()
    big = _big_multipart(3_000_000)
    s.send(b"a APPEND {5}\r\n")
    assert s.lines() == ["+ Ready for literal data"]
    s.send(b"INBOX (\\Seen) {%d}\r\n" % len(big))
    assert s.lines() == ["+ Ready for literal data"]
    for i in range(0, len(big), 65536):
        s.send(big[i:i + 65536])
        assert len(s.protocol._pending) < 100  # never accumulates the message
    s.send(b"\r\n")
    assert s.lines()[-1].startswith("a OK [APPENDUID 1000 4]")
    assert store.folders["INBOX"].messages[4].raw == big
    assert ("append_spooled", "SpooledTemporaryFile") in store.calls
    assert s.protocol._spools == []
    small = _plain(9)
    s.send(b"b APPEND Sent {%d+}\r\n%s\r\nc NOOP\r\n" % (len(small), small))
    assert s.lines() == ["b OK [APPENDUID 1000 1] APPEND completed", "c OK NOOP completed"]
    assert store.folders["Sent"].messages[1].raw == small
    assert s.cmd(b"d APPEND INBOX {0+}\r\n")[-1].startswith("d NO [CANNOT]")
    s.send(b"e APPEND INBOX (\\Bogus {3+}\r\nabc\r\n")  # syntax error after the literal
    assert s.lines()[-1].startswith("e BAD")
    assert s.protocol._spools == []


def test_small_bodies_are_read_ahead_and_answered_in_order(store):
    """FETCH reads the next bodies while one is pending; responses stay in order."""
    s = Session(FakeBackend(store)).selected()
    s.raw()
    s.account.range_gate = gate = defer.Deferred()
    s.send(b"f FETCH 1:3 BODY.PEEK[]\r\n")
    assert [c[1] for c in store.calls if c[0] == "read_blob"] == ["1/1", "1/2", "1/3"]
    assert s.raw() == b""  # nothing sent before the first body is there
    s.account.range_gate = None
    gate.callback(None)
    out = s.raw()
    assert [out.index(b"* %d FETCH" % n) for n in (1, 2, 3)] == sorted(
        out.index(b"* %d FETCH" % n) for n in (1, 2, 3))
    assert out.endswith(b"f OK FETCH completed\r\n") and MSG_UTF8 in out


def test_expunge_reported_once_by_the_account_is_not_lost_during_fetch(store):
    """The real account reports an expunge once (its folder mark); when it arrives during
    FETCH it must wait in the session and come out at the next NOOP."""
    s = Session(FakeBackend(store)).selected()
    account = s.account
    reported: set[int] = set()
    plain_changes = account.changes

    async def once(folder_id, known, since):
        found = await plain_changes(folder_id, known, since)
        found.expunged = [u for u in found.expunged if u not in reported]
        reported.update(found.expunged)
        return found

    account.changes = once
    del store.folders["INBOX"].messages[2]
    store.notify(store.folders["INBOX"].id)
    lines = s.cmd("f FETCH 1 (FLAGS)")
    assert not any("EXPUNGE" in line for line in lines) and reported == {2}
    assert s.cmd("n NOOP") == ["* 2 EXPUNGE", "n OK NOOP completed"]
    assert s.cmd("n NOOP") == ["n OK NOOP completed"]


def test_plaintext_login_switch_is_for_loopback_clients_only():
    """allow_plaintext_login never offers LOGIN in cleartext to another machine."""
    local = Session(allow_plaintext_login=True)
    assert "LOGINDISABLED" not in local.lines()[0]
    assert local.cmd("l LOGIN agent@example.com secret")[-1].startswith("l OK")
    remote = Session(allow_plaintext_login=True, peer="192.0.2.7")
    greeting = remote.lines()[0]
    assert "LOGINDISABLED" in greeting and "AUTH=PLAIN" not in greeting
    assert remote.cmd("l LOGIN agent@example.com secret")[-1].startswith(
        "l NO [PRIVACYREQUIRED]")
    mapped = Session(allow_plaintext_login=True, peer="::ffff:127.0.0.1")
    assert "LOGINDISABLED" not in mapped.lines()[0]


def test_recent_belongs_to_the_first_session_that_selects(store):
    """RFC 3501 \\Recent: EXAMINE looks without claiming; the first SELECT claims;
    a later SELECT sees none; a new arrival is recent in exactly one session."""
    store.folders["INBOX"].recent_uid = 0  # nobody has looked yet
    looker = Session(FakeBackend(store)).login()
    assert "* 3 RECENT" in looker.cmd("e EXAMINE INBOX")
    first = Session(FakeBackend(store)).login()
    assert "* 3 RECENT" in first.cmd("s SELECT INBOX")
    assert first.cmd("r SEARCH RECENT") == ["* SEARCH 1 2 3", "r OK SEARCH completed"]
    second = Session(FakeBackend(store)).login()
    assert "* 0 RECENT" in second.cmd("s SELECT INBOX")
    assert second.cmd("st STATUS Sent (RECENT)")[0] == '* STATUS "Sent" (RECENT 0)'
    store.deliver("INBOX", _plain(4))
    got = [first.cmd("n NOOP"), second.cmd("n NOOP")]
    assert sorted(next(line for line in lines if line.endswith("RECENT"))
                  for lines in got) == ["* 0 RECENT", "* 4 RECENT"]
    assert all("* 4 EXISTS" in lines for lines in got)


def test_quota_roots_usage_and_overquota_before_the_literal(store):
    """RFC 9208: no limit, no quota root; with one, root "" in KiB; an APPEND that cannot
    fit is refused before the client sends it; SETQUOTA belongs to the administrator."""
    s = Session(FakeBackend(store)).login()
    assert {"QUOTA", "QUOTA=RES-STORAGE"} <= set(s.cmd("c CAPABILITY")[0].split())
    assert s.cmd("q GETQUOTAROOT INBOX") == ['* QUOTAROOT "INBOX"', "q OK GETQUOTAROOT completed"]
    assert s.cmd('q GETQUOTA ""')[-1].startswith("q NO [NONEXISTENT]")
    store.quota_limit = 10 * 1024
    used = sum(len(m.raw) for m in store.folders["INBOX"].messages.values())
    assert s.cmd("q GETQUOTAROOT INBOX") == [
        '* QUOTAROOT "INBOX" ""', f'* QUOTA "" (STORAGE {-(-used // 1024)} 10)',
        "q OK GETQUOTAROOT completed"]
    assert s.cmd('q GETQUOTA ""')[0] == f'* QUOTA "" (STORAGE {-(-used // 1024)} 10)'
    assert s.cmd("q GETQUOTA other")[-1].startswith("q NO [NONEXISTENT]")
    assert s.cmd("q GETQUOTAROOT Nope")[-1].startswith("q NO [NONEXISTENT]")
    assert s.cmd('q SETQUOTA "" (STORAGE 1)')[-1].startswith("q NO [NOPERM]")
    assert s.cmd(b"a APPEND INBOX {20000}") == ["a NO [OVERQUOTA] The mailbox is full."]
    assert s.cmd(b"n NOOP") == ["n OK NOOP completed"]  # no literal was awaited


class Deflated:
    """The client's side of COMPRESS=DEFLATE over a Session."""

    def __init__(self, session: Session) -> None:
        import zlib

        self.s = session
        self.out = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)
        self.zlib = zlib

    def send(self, data: bytes) -> None:
        self.s.send(self.out.compress(data) + self.out.flush(self.zlib.Z_SYNC_FLUSH))

    def raw(self) -> bytes:
        return self.inflate.decompress(self.s.raw())

    def cmd(self, text: bytes) -> list[str]:
        self.send(text + b"\r\n")
        return [line for line in self.raw().decode().split("\r\n") if line]


def test_compress_deflate_both_ways_with_pipelining_and_a_literal(store):
    """RFC 4978: after the (uncompressed) tagged OK everything is raw DEFLATE; commands
    pipelined behind COMPRESS are read compressed; a second COMPRESS is refused."""
    s = Session(FakeBackend(store)).selected()
    assert "COMPRESS=DEFLATE" in s.cmd("c CAPABILITY")[0]
    assert s.cmd("z COMPRESS LZW")[-1].startswith("z BAD")
    assert s.cmd("z COMPRESS DEFLATE") == ["z OK DEFLATE active"]
    z = Deflated(s)
    assert z.cmd(b"n NOOP") == ["n OK NOOP completed"]
    out = z.cmd(b"f FETCH 2 BODY.PEEK[]")
    assert out[-1] == "f OK FETCH completed"
    z.send(b"a APPEND INBOX {5+}\r\nhello\r\nb NOOP\r\n")
    lines = [line for line in z.raw().decode().split("\r\n") if line and line[0] != "*"]
    assert lines[0].startswith("a OK [APPENDUID") and lines[1] == "b OK NOOP completed"
    assert store.folders["INBOX"].messages[4].raw == b"hello"
    assert z.cmd(b"z COMPRESS DEFLATE")[-1].startswith("z NO [COMPRESSIONACTIVE]")


def test_compressed_bomb_is_inflated_a_step_at_a_time(store):
    """50 MB of one long line in ~50 KB compressed: refused as too long, the buffer
    never holds more than a command line plus one step, the session lives on."""
    from agentpost.imap.server import INFLATE_STEP, MAX_LINE_BYTES

    s = Session(FakeBackend(store)).selected()
    s.cmd("z COMPRESS DEFLATE")
    z = Deflated(s)
    peak = [0]
    original = s.protocol._inflate_more

    def watched() -> bool:
        result = original()
        peak[0] = max(peak[0], len(s.protocol._buffer))
        return result

    s.protocol._inflate_more = watched
    chunk = b"x" * (1 << 20)
    for _ in range(50):
        z.s.send(z.out.compress(chunk))
    z.send(b"\r\nn NOOP\r\n")
    lines = [line for line in z.raw().decode().split("\r\n") if line]
    assert "* BAD Command line too long" in lines and lines[-1] == "n OK NOOP completed"
    assert peak[0] <= MAX_LINE_BYTES + INFLATE_STEP


def test_corrupt_compressed_input_ends_the_session(store):
    s = Session(FakeBackend(store)).selected()
    s.cmd("z COMPRESS DEFLATE")
    s.send(b"\xff\xff\xff\xff garbage")
    assert s.transport.disconnecting


def test_sort_syntax_and_sequence_numbers(store):
    s = Session(FakeBackend(store)).selected()
    sizes = {u: len(m.raw) for u, m in store.folders["INBOX"].messages.items()}
    by_size = sorted(sizes, key=lambda u: sizes[u], reverse=True)
    assert s.cmd("s SORT (REVERSE SIZE) UTF-8 ALL") == [
        "* SORT " + " ".join(str(u) for u in by_size), "s OK SORT completed"]
    assert ("sort", (("all",), [("SIZE", True)])) in store.calls
    assert s.cmd("s UID SORT (SIZE) US-ASCII UID 1:2")[0].startswith("* SORT")
    for bad in ("s SORT (REVERSE) UTF-8 ALL", "s SORT () UTF-8 ALL", "s SORT SIZE UTF-8 ALL",
                "s SORT (SIZE) UTF-8", "s SORT (BOGUS) UTF-8 ALL",
                "s SORT (REVERSE REVERSE SIZE) UTF-8 ALL"):
        assert s.cmd(bad)[-1].startswith("s BAD"), bad
    assert s.cmd("s SORT (SIZE) KOI8-R ALL")[-1].startswith("s NO [BADCHARSET")
    assert "SORT" in s.cmd("c CAPABILITY")[0].split()


def test_command_table_declares_uid_and_sequence_number_rules():
    """The dispatcher's rules come from the table: UID may prefix exactly the commands
    RFC 3501/4315/6851/5256 allow, and EXPUNGE waits during the commands that use
    sequence numbers (RFC 3501 §7.4.1)."""
    from agentpost.imap.commands.table import COMMANDS

    assert {n for n, spec in COMMANDS.items() if spec.uid_ok} == {
        "FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE", "SORT", "THREAD"}
    assert {n for n, spec in COMMANDS.items() if spec.uses_sequence_numbers} == {
        "FETCH", "STORE", "SEARCH", "SORT", "THREAD"}
    assert all(name == spec.name for name, spec in COMMANDS.items())
    s = Session().login()
    assert s.cmd("u UID LIST \"\" *") == ["u BAD UID LIST is not a command"]
    assert s.cmd("u FROB") == ["u BAD Unknown command FROB"]


class _Broken(BaseException):
    """Escapes the APPEND mailbox check's own ``except Exception``."""


def test_a_broken_append_mailbox_check_still_answers_the_tag(store, caplog):
    """When the check before a synchronizing literal breaks outright, the APPEND gets
    its tagged NO (an untagged one left the client waiting for its tag forever), and
    the session goes on."""
    s = Session(FakeBackend(store)).selected()
    s.account.fail_with = _Broken("check broke")
    assert s.cmd("a APPEND INBOX {20}") == ["a NO [UNAVAILABLE] Temporary failure; try again"]
    assert "check broke" in caplog.text
    s.account.fail_with = None
    assert s.cmd("n NOOP") == ["n OK NOOP completed"]
