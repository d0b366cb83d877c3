"""NOTIFY (RFC 5465) end to end: real sockets, the real store, two sessions.

One session sets NOTIFY and then only reads; the other session (or the API, or
delivery) changes the inbox. What the watcher reads arrives without any command of
its own: EXISTS and the MessageNew fetch attributes, EXPUNGE, FETCH FLAGS, STATUS for
other mailboxes, LIST for mailbox names and subscriptions.
"""

from __future__ import annotations

import re
import socket
import ssl
import time

import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap import notifier_state
from tests.conftest import _DEV_TLS
from tests.mailfactory import make_message

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")
SUPPORTED = b"[BADEVENT (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange)]"


class Client:
    """A blocking IMAP client over STARTTLS that keeps every line it reads (a literal
    is read into the line that announced it). Used from threads."""

    def __init__(self, port: int, user: str, key: str) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"s STARTTLS\r\n")
        reader.readline()
        context = ssl.create_default_context(cafile=_DEV_TLS["ca"])
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""
        self.tags = 0
        reply = self.command(f'LOGIN "{user}" "{key}"')
        assert reply[-1].split(b" ")[1] == b"OK", reply

    def _read(self, size: int | None) -> bytes:
        """A line (``size`` None) or ``size`` bytes; b"" at the end of the stream."""
        while True:
            end = self.buffer.find(b"\n") + 1 if size is None else \
                (size if len(self.buffer) >= size else 0)
            if end:
                out, self.buffer = self.buffer[:end], self.buffer[end:]
                return out
            data = self.sock.recv(65536)
            if not data:
                out, self.buffer = self.buffer, b""
                return out
            self.buffer += data

    def response(self) -> bytes:
        line = self._read(None)
        while True:
            m = _LITERAL.search(line)
            if m is None:
                return line
            line += self._read(int(m.group(1)))
            line += self._read(None)

    def command(self, text: str) -> list[bytes]:
        """Send a tagged command; every line up to and with its completion."""
        self.tags += 1
        tag = f"t{self.tags}".encode()
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        lines = []
        while True:
            line = self.response()
            assert line, lines
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def until(self, needle: bytes, timeout_s: float = 10.0) -> list[bytes]:
        """Read unsolicited lines until one contains ``needle``."""
        lines = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.response()
            assert line, lines
            lines.append(line)
            if needle in line:
                return lines
        raise AssertionError(f"{needle!r} not seen in {lines}")

    def quiet(self, seconds: float = 1.0) -> list[bytes]:
        """Whatever arrives within ``seconds`` (nothing, when all is well)."""
        self.sock.settimeout(seconds)
        lines = []
        try:
            while line := self.response():
                lines.append(line)
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(10)
        return lines

    def close(self) -> None:
        self.sock.close()


async def _inbox(server, name):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    return inbox, key


async def _connect(server, inbox, key) -> Client:
    return await deferToThread(Client, server.imap_port, inbox["email"], key)


async def _deliver(server, inbox, subject: str) -> None:
    raw = make_message(to=inbox["email"], subject=subject, msgid=f"<{subject}@x>")
    await server.deliver(raw, [inbox["email"]], mail_from="sender@example.org")


def _ok(lines: list[bytes]) -> None:
    assert lines[-1].split(b" ")[1] == b"OK", lines


@pytest_twisted.ensureDeferred
async def test_message_new_with_fetch_attributes_arrives_without_a_command(server):
    """SELECTED MessageNew (UID BODY.PEEK[HEADER.FIELDS (From Subject)]): a delivery
    is told as EXISTS and a FETCH with those attributes while the client says nothing;
    the message stays unseen."""
    inbox, key = await _inbox(server, "notify-new")
    watcher = await _connect(server, inbox, key)
    try:
        _ok(await deferToThread(watcher.command, "SELECT INBOX"))
        reply = await deferToThread(
            watcher.command, "NOTIFY SET (SELECTED (MessageNew (UID BODY.PEEK[HEADER.FIELDS "
            "(From Subject)]) MessageExpunge))")
        assert reply == [b"t3 OK NOTIFY completed\r\n"]
        await _deliver(server, inbox, "pushed")
        lines = await deferToThread(watcher.until, b"FETCH")
        assert lines[0] == b"* 1 EXISTS\r\n", lines
        fetch = lines[-1]
        assert fetch.upper().startswith(b"* 1 FETCH (UID 1 BODY[HEADER.FIELDS (FROM SUBJECT)] {"), \
            fetch
        assert b"Subject: pushed\r\n" in fetch and b"From: " in fetch
        flags = await deferToThread(watcher.command, "UID FETCH 1 (FLAGS)")
        assert b"\\Seen" not in flags[0], flags
    finally:
        watcher.close()


@pytest_twisted.ensureDeferred
async def test_status_for_other_mailboxes_after_delivery_and_another_sessions_append(server):
    """NOTIFY SET STATUS (PERSONAL ...): a STATUS per mailbox before the tagged OK, then
    one when mail is delivered to INBOX and when another session APPENDs to Sent."""
    inbox, key = await _inbox(server, "notify-status")
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        reply = await deferToThread(
            watcher.command, "NOTIFY SET STATUS (PERSONAL (MessageNew MessageExpunge))")
        _ok(reply)
        names = sorted(re.match(rb'\* STATUS "?([^" ]+)"? ', line).group(1)
                       for line in reply[:-1])
        assert names == [b"Drafts", b"INBOX", b"Junk", b"Sent", b"Trash"], reply
        assert b'* STATUS "INBOX" (MESSAGES 0 UIDNEXT 1 ' in b"".join(reply)
        await _deliver(server, inbox, "counted")
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "INBOX" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY '), \
            lines
        assert b" UNSEEN 1)" in lines[-1]
        _ok(await deferToThread(actor.command, "APPEND Sent (\\Seen) {12+}\r\nSubject: x\r\n"))
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "Sent" (MESSAGES 1 UIDNEXT 2 '), lines
        assert b" UNSEEN 0)" in lines[-1]
        assert await deferToThread(watcher.quiet, 0.8) == []  # once, not once per wake-up
    finally:
        watcher.close()
        actor.close()


@pytest_twisted.ensureDeferred
async def test_flag_change_and_expunge_in_the_selected_mailbox(server):
    """FlagChange and MessageExpunge for the selected mailbox: FETCH (UID FLAGS) and
    EXPUNGE as they happen; FlagChange elsewhere: STATUS with the new UNSEEN."""
    inbox, key = await _inbox(server, "notify-flags")
    for subject in ("one", "two"):
        await _deliver(server, inbox, subject)
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        _ok(await deferToThread(watcher.command, "SELECT INBOX"))
        _ok(await deferToThread(
            watcher.command, "NOTIFY SET (SELECTED (MessageNew MessageExpunge FlagChange)) "
            "(INBOXES (MessageNew MessageExpunge)) (PERSONAL (MessageNew MessageExpunge "
            "FlagChange))"))
        _ok(await deferToThread(actor.command, "SELECT INBOX"))
        _ok(await deferToThread(actor.command, "UID STORE 1 +FLAGS.SILENT (\\Flagged)"))
        lines = await deferToThread(watcher.until, b"FETCH")
        assert lines == [b"* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent))\r\n"], lines
        _ok(await deferToThread(actor.command, "UID STORE 2 +FLAGS.SILENT (\\Deleted)"))
        _ok(await deferToThread(actor.command, "EXPUNGE"))
        lines = await deferToThread(watcher.until, b"EXPUNGE")
        assert lines[-1] == b"* 2 EXPUNGE\r\n", lines
        _ok(await deferToThread(actor.command, "APPEND Trash {12+}\r\nSubject: x\r\n"))
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "Trash" (MESSAGES 1 '), lines
        assert b"UNSEEN 1)" in lines[-1]
        _ok(await deferToThread(actor.command, "SELECT Trash"))
        _ok(await deferToThread(actor.command, "UID STORE 1 +FLAGS.SILENT (\\Seen)"))
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "Trash" (MESSAGES 1 ') and \
            b"UNSEEN 0)" in lines[-1], lines
    finally:
        watcher.close()
        actor.close()


@pytest_twisted.ensureDeferred
async def test_selected_delayed_holds_expunges_until_a_command_allows_them(server):
    """SELECTED-DELAYED: an expunge by another session is not pushed; NOOP reports it."""
    inbox, key = await _inbox(server, "notify-delayed")
    await _deliver(server, inbox, "doomed")
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        _ok(await deferToThread(watcher.command, "SELECT INBOX"))
        _ok(await deferToThread(
            watcher.command, "NOTIFY SET (SELECTED-DELAYED (MessageNew MessageExpunge))"))
        _ok(await deferToThread(actor.command, "SELECT INBOX"))
        _ok(await deferToThread(actor.command, "UID STORE 1 +FLAGS.SILENT (\\Deleted)"))
        _ok(await deferToThread(actor.command, "EXPUNGE"))
        pushed = await deferToThread(watcher.quiet, 1.0)
        assert not any(b"EXPUNGE" in line for line in pushed), pushed
        noop = await deferToThread(watcher.command, "NOOP")
        assert b"* 1 EXPUNGE\r\n" in noop, noop
    finally:
        watcher.close()
        actor.close()


@pytest_twisted.ensureDeferred
async def test_mailbox_name_and_subscription_changes_are_listed(server):
    """MailboxName: LIST on CREATE, LIST with OLDNAME on RENAME, \\NonExistent on
    DELETE; SubscriptionChange: LIST with \\Subscribed exactly when subscribed."""
    inbox, key = await _inbox(server, "notify-names")
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        _ok(await deferToThread(
            watcher.command, "NOTIFY SET (PERSONAL (MailboxName SubscriptionChange))"))
        _ok(await deferToThread(actor.command, "CREATE Projects"))
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\HasNoChildren) "/" "Projects"\r\n'], lines
        _ok(await deferToThread(actor.command, "RENAME Projects Archive"))
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\HasNoChildren) "/" "Archive" ("OLDNAME" ("Projects"))'
                         b"\r\n"], lines
        _ok(await deferToThread(actor.command, "UNSUBSCRIBE Archive"))
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\HasNoChildren) "/" "Archive"\r\n'], lines
        _ok(await deferToThread(actor.command, "SUBSCRIBE Archive"))
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\HasNoChildren \\Subscribed) "/" "Archive"\r\n'], lines
        _ok(await deferToThread(actor.command, "DELETE Archive"))
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\NonExistent) "/" "Archive"\r\n'], lines
    finally:
        watcher.close()
        actor.close()


@pytest_twisted.ensureDeferred
async def test_an_imap4rev2_watcher_gets_names_in_utf8(server):
    """After ENABLE IMAP4rev2 every mailbox name NOTIFY sends or reads is UTF-8
    (RFC 9051 §5.1): the unsolicited LIST and STATUS too, and MAILBOXES arguments."""
    inbox, key = await _inbox(server, "notify-rev2")
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        _ok(await deferToThread(watcher.command, "ENABLE IMAP4rev2"))
        _ok(await deferToThread(actor.command, "CREATE &BB4EQgRHBFEEQgRL-"))  # Отчёты
        _ok(await deferToThread(
            watcher.command,
            'NOTIFY SET (MAILBOXES "Отчёты" (MessageNew MessageExpunge)) '
            "(PERSONAL (MailboxName))"))
        _ok(await deferToThread(actor.command, "CREATE &BB8EQAQ+BDUEOgRC-"))  # Проект
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == ['* LIST (\\HasNoChildren) "/" "Проект"\r\n'.encode()], lines
        _ok(await deferToThread(actor.command,
                                "APPEND &BB4EQgRHBFEEQgRL- {18+}\r\nSubject: x\r\n\r\nbody"))
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith('* STATUS "Отчёты" (MESSAGES 1 '.encode()), lines
    finally:
        watcher.close()
        actor.close()


@pytest_twisted.ensureDeferred
async def test_notify_none_stops_notifications(server):
    """After NOTIFY NONE nothing is pushed: neither STATUS nor LIST."""
    inbox, key = await _inbox(server, "notify-none")
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        _ok(await deferToThread(
            watcher.command, "NOTIFY SET (PERSONAL (MessageNew MessageExpunge MailboxName))"))
        await _deliver(server, inbox, "first")
        await deferToThread(watcher.until, b"STATUS")
        assert await deferToThread(watcher.command, "NOTIFY NONE") == \
            [b"t3 OK NOTIFY completed\r\n"]
        await _deliver(server, inbox, "second")
        _ok(await deferToThread(actor.command, "CREATE Quiet"))
        assert await deferToThread(watcher.quiet, 1.0) == []
    finally:
        watcher.close()
        actor.close()


@pytest_twisted.ensureDeferred
async def test_status_during_idle(server):
    """NOTIFY's events arrive during IDLE too: STATUS for another mailbox, and the
    selected mailbox's EXISTS with its fetch attributes."""
    inbox, key = await _inbox(server, "notify-idle")
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        _ok(await deferToThread(watcher.command, "SELECT INBOX"))
        _ok(await deferToThread(
            watcher.command, "NOTIFY SET (SELECTED (MessageNew (UID) MessageExpunge)) "
            "(PERSONAL (MessageNew MessageExpunge))"))
        await deferToThread(watcher.sock.sendall, b"i IDLE\r\n")
        assert (await deferToThread(watcher.response)).startswith(b"+")
        _ok(await deferToThread(actor.command, "APPEND Drafts {12+}\r\nSubject: x\r\n"))
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "Drafts" (MESSAGES 1 '), lines
        await _deliver(server, inbox, "idle")
        lines = await deferToThread(watcher.until, b"FETCH")
        assert lines == [b"* 1 EXISTS\r\n", b"* 1 RECENT\r\n", b"* 1 FETCH (UID 1)\r\n"], lines
        await deferToThread(watcher.sock.sendall, b"DONE\r\n")
        assert await deferToThread(watcher.response) == b"i OK IDLE terminated\r\n"
    finally:
        watcher.close()
        actor.close()


@pytest_twisted.ensureDeferred
async def test_refusals_are_bad_or_badevent_as_rfc5465_says(server):
    """§5: MessageNew without MessageExpunge and FlagChange alone are BAD; §6.1 mailbox
    events for SELECTED, SELECTED with SELECTED-DELAYED, unknown filters: BAD;
    AnnotationChange, metadata and unknown events: NO [BADEVENT (every supported)]."""
    inbox, key = await _inbox(server, "notify-bad")
    client = await _connect(server, inbox, key)
    try:
        bad = ["NOTIFY", "NOTIFY SET", "NOTIFY NONE extra", "NOTIFY LATER",
               "NOTIFY SET (SELECTED (MessageNew))",
               "NOTIFY SET (PERSONAL (MessageExpunge))",
               "NOTIFY SET (SELECTED (FlagChange))",
               "NOTIFY SET (SELECTED (MessageNew MessageExpunge MailboxName))",
               "NOTIFY SET (SELECTED (MessageNew MessageExpunge)) "
               "(SELECTED-DELAYED (MessageNew MessageExpunge))",
               "NOTIFY SET (ELSEWHERE (MessageNew MessageExpunge))",
               "NOTIFY SET (SUBTREE (MessageNew MessageExpunge))",
               "NOTIFY SET (PERSONAL MessageNew)",
               "NOTIFY SET (SELECTED (MessageNew (RFC822) MessageExpunge))",
               "NOTIFY SET (SELECTED (MessageNew (NOSUCHATT) MessageExpunge))"]
        for text in bad:
            reply = await deferToThread(client.command, text)
            assert reply[-1].split(b" ")[1] == b"BAD", (text, reply)
        refused = ["NOTIFY SET (PERSONAL (MessageNew MessageExpunge AnnotationChange))",
                   "NOTIFY SET (PERSONAL (MailboxMetadataChange))",
                   "NOTIFY SET (INBOXES (ServerMetadataChange MailboxName))",
                   "NOTIFY SET (MAILBOXES (INBOX Sent) (SomethingNew))"]
        for text in refused:
            reply = await deferToThread(client.command, text)
            assert reply[-1].split(b" ", 3)[1:3] == [b"NO", SUPPORTED.split(b" ")[0]], reply
            assert SUPPORTED in reply[-1], reply
        ok = ["NOTIFY SET (SUBTREE INBOX (MessageNew MessageExpunge FlagChange))",
              "notify set (mailboxes (INBOX Sent) (messagenew messageexpunge)) "
              "(subscribed none)",
              "NOTIFY SET STATUS (SELECTED NONE)", "NOTIFY NONE"]
        for text in ok:
            _ok(await deferToThread(client.command, text))
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_notify_is_advertised_and_needs_a_login(server):
    """NOTIFY is in the capabilities; before LOGIN it is BAD, like every
    authenticated-state command."""

    def attempt() -> tuple[bytes, bytes]:
        sock = socket.create_connection(("127.0.0.1", server.imap_port), timeout=10)
        reader = sock.makefile("rb")
        greeting = reader.readline()
        sock.sendall(b"a NOTIFY NONE\r\n")
        reply = reader.readline()
        sock.close()
        return greeting, reply

    greeting, reply = await deferToThread(attempt)
    assert b" NOTIFY " in greeting or b" NOTIFY]" in greeting, greeting
    assert reply.startswith(b"a BAD "), reply


@pytest_twisted.ensureDeferred
async def test_too_many_mailboxes_overflow(server, monkeypatch):
    """More mailboxes than the session may watch: NO [NOTIFICATIONOVERFLOW] at SET; a
    CREATE past the bound later: * OK [NOTIFICATIONOVERFLOW], then silence."""
    monkeypatch.setattr(notifier_state, "MAX_WATCHED_MAILBOXES", 6)
    inbox, key = await _inbox(server, "notify-overflow")
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        _ok(await deferToThread(
            watcher.command, "NOTIFY SET (PERSONAL (MessageNew MessageExpunge))"))
        _ok(await deferToThread(actor.command, "CREATE One"))
        _ok(await deferToThread(actor.command, "CREATE Two"))
        lines = await deferToThread(watcher.until, b"NOTIFICATIONOVERFLOW")
        assert lines[-1].startswith(b"* OK [NOTIFICATIONOVERFLOW] "), lines
        await _deliver(server, inbox, "unheard")
        assert await deferToThread(watcher.quiet, 1.0) == []
        reply = await deferToThread(
            watcher.command, "NOTIFY SET (PERSONAL (MessageNew MessageExpunge))")
        assert reply[-1].startswith(b"t3 NO [NOTIFICATIONOVERFLOW] "), reply
        _ok(await deferToThread(  # the selected mailbox alone is always fine
            watcher.command, "NOTIFY SET (SELECTED (MessageNew MessageExpunge))"))
    finally:
        watcher.close()
        actor.close()


@pytest_twisted.ensureDeferred
async def test_revoked_key_still_ends_a_notifying_session_and_logout_ends_quietly(server):
    """A session with NOTIFY on gets BYE when its key is revoked; another's LOGOUT has
    nothing after its BYE but the tagged OK."""
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "notify-revoked"},
                                   key=owner)).json
    made = (await server.api.post("/api/v1/api-keys", {
        "name": "imap", "scopes": ["messages:read", "messages:write"]}, key=owner)).json
    watcher = await _connect(server, inbox, made["key"])
    leaver = await _connect(server, inbox, owner)
    try:
        for client in (watcher, leaver):
            _ok(await deferToThread(
                client.command, "NOTIFY SET (PERSONAL (MessageNew MessageExpunge MailboxName))"))
        logout = await deferToThread(leaver.command, "LOGOUT")
        assert logout[0].startswith(b"* BYE") and logout[-1] == b"t3 OK LOGOUT completed\r\n"
        assert await deferToThread(leaver.quiet, 0.5) == []
        revoked = await server.api.delete(f"/api/v1/api-keys/{made['id']}", key=owner)
        assert revoked.status == 200
        lines = await deferToThread(watcher.quiet, 3.0)
        assert lines and lines[-1].startswith(b"* BYE The API key was revoked"), lines
    finally:
        watcher.close()
        leaver.close()
