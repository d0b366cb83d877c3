"""NOTIFY (RFC 5465) end to end: real sockets, the real store, two sessions.

One session sets NOTIFY and then only reads; the other session (or the API, or
delivery) changes the inbox. What the watcher reads arrives without any command of
its own: EXISTS and the MessageNew fetch attributes, EXPUNGE, FETCH FLAGS, STATUS for
other mailboxes, LIST for mailbox names and subscriptions.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap import notifier_state
from tests.imap_client import Client, new_inbox
from tests.mailfactory import make_message

SUPPORTED = b"[BADEVENT (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange)]"


async def _connect(server, inbox, key) -> Client:
    return await deferToThread(Client, server.imap_port, inbox["email"], key)


@asynccontextmanager
async def _watcher_and_actor(server, name: str, *subjects: str
                             ) -> AsyncIterator[tuple[dict, Client, Client]]:
    """(inbox, watcher, actor): a fresh inbox holding a delivery per subject, and two
    sessions on it, closed at the end."""
    inbox, key = await new_inbox(server, name)
    for subject in subjects:
        await _deliver(server, inbox, subject)
    watcher = await _connect(server, inbox, key)
    actor = await _connect(server, inbox, key)
    try:
        yield inbox, watcher, actor
    finally:
        watcher.close()
        actor.close()


async def _deliver(server, inbox, subject: str) -> None:
    raw = make_message(to=inbox["email"], subject=subject, msgid=f"<{subject}@x>")
    await server.deliver(raw, [inbox["email"]])


async def _ok(client: Client, text: str) -> list[bytes]:
    """The untagged lines of a command that must succeed."""
    return await deferToThread(client.ok, text)


@pytest_twisted.ensureDeferred
async def test_message_new_with_fetch_attributes_arrives_without_a_command(server):
    """SELECTED MessageNew (UID BODY.PEEK[HEADER.FIELDS (From Subject)]): a delivery
    is told as EXISTS and a FETCH with those attributes while the client says nothing;
    the message stays unseen."""
    inbox, key = await new_inbox(server, "notify-new")
    watcher = await _connect(server, inbox, key)
    try:
        await _ok(watcher, "SELECT INBOX")
        reply = await deferToThread(
            watcher.cmd, "NOTIFY SET (SELECTED (MessageNew (UID BODY.PEEK[HEADER.FIELDS "
            "(From Subject)]) MessageExpunge))")
        assert reply == [b"t3 OK NOTIFY completed"]
        await _deliver(server, inbox, "pushed")
        lines = await deferToThread(watcher.until, b"FETCH")
        assert lines[0] == b"* 1 EXISTS", lines
        fetch = lines[-1]
        assert fetch.upper().startswith(b"* 1 FETCH (UID 1 BODY[HEADER.FIELDS (FROM SUBJECT)] {"), \
            fetch
        assert b"Subject: pushed\r\n" in fetch and b"From: " in fetch
        flags = await deferToThread(watcher.cmd, "UID FETCH 1 (FLAGS)")
        assert b"\\Seen" not in flags[0], flags
    finally:
        watcher.close()


@pytest_twisted.ensureDeferred
async def test_status_for_other_mailboxes_after_delivery_and_another_sessions_append(server):
    """NOTIFY SET STATUS (PERSONAL ...): a STATUS per mailbox before the tagged OK, then
    one when mail is delivered to INBOX and when another session APPENDs to Sent."""
    async with _watcher_and_actor(server, "notify-status") as (inbox, watcher, actor):
        reply = await _ok(watcher, "NOTIFY SET STATUS (PERSONAL (MessageNew MessageExpunge))")
        names = sorted(re.match(rb'\* STATUS "?([^" ]+)"? ', line).group(1) for line in reply)
        assert names == [b"Drafts", b"INBOX", b"Junk", b"Sent", b"Trash"], reply
        assert b'* STATUS "INBOX" (MESSAGES 0 UIDNEXT 1 ' in b"".join(reply)
        await _deliver(server, inbox, "counted")
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "INBOX" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY '), \
            lines
        assert b" UNSEEN 1)" in lines[-1]
        await _ok(actor, "APPEND Sent (\\Seen) {12+}\r\nSubject: x\r\n")
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "Sent" (MESSAGES 1 UIDNEXT 2 '), lines
        assert b" UNSEEN 0)" in lines[-1]
        assert await deferToThread(watcher.quiet, 0.8) == []  # once, not once per wake-up


@pytest_twisted.ensureDeferred
async def test_flag_change_and_expunge_in_the_selected_mailbox(server):
    """FlagChange and MessageExpunge for the selected mailbox: FETCH (UID FLAGS) and
    EXPUNGE as they happen; FlagChange elsewhere: STATUS with the new UNSEEN."""
    async with _watcher_and_actor(server, "notify-flags", "one", "two") as (_, watcher, actor):
        await _ok(watcher, "SELECT INBOX")
        await _ok(watcher, "NOTIFY SET (SELECTED (MessageNew MessageExpunge FlagChange)) "
                  "(INBOXES (MessageNew MessageExpunge)) (PERSONAL (MessageNew MessageExpunge "
                  "FlagChange))")
        await _ok(actor, "SELECT INBOX")
        await _ok(actor, "UID STORE 1 +FLAGS.SILENT (\\Flagged)")
        lines = await deferToThread(watcher.until, b"FETCH")
        assert lines == [b"* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent))"], lines
        await _ok(actor, "UID STORE 2 +FLAGS.SILENT (\\Deleted)")
        await _ok(actor, "EXPUNGE")
        lines = await deferToThread(watcher.until, b"EXPUNGE")
        assert lines[-1] == b"* 2 EXPUNGE", lines
        await _ok(actor, "APPEND Trash {12+}\r\nSubject: x\r\n")
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "Trash" (MESSAGES 1 '), lines
        # FlagChange is watched there: HIGHESTMODSEQ comes too (RFC 5465 §5.2)
        assert re.search(rb"UNSEEN 1 HIGHESTMODSEQ \d+\)$", lines[-1]), lines
        await _ok(actor, "SELECT Trash")
        await _ok(actor, "UID STORE 1 +FLAGS.SILENT (\\Seen)")
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "Trash" (MESSAGES 1 ') and \
            re.search(rb"UNSEEN 0 HIGHESTMODSEQ \d+\)$", lines[-1]), lines


@pytest_twisted.ensureDeferred
async def test_selected_delayed_holds_expunges_until_a_command_allows_them(server):
    """SELECTED-DELAYED: an expunge by another session is not pushed; NOOP reports it."""
    async with _watcher_and_actor(server, "notify-delayed", "doomed") as (_, watcher, actor):
        await _ok(watcher, "SELECT INBOX")
        await _ok(watcher, "NOTIFY SET (SELECTED-DELAYED (MessageNew MessageExpunge))")
        await _ok(actor, "SELECT INBOX")
        await _ok(actor, "UID STORE 1 +FLAGS.SILENT (\\Deleted)")
        await _ok(actor, "EXPUNGE")
        pushed = await deferToThread(watcher.quiet, 1.0)
        assert not any(b"EXPUNGE" in line for line in pushed), pushed
        noop = await deferToThread(watcher.cmd, "NOOP")
        assert b"* 1 EXPUNGE" in noop, noop


@pytest_twisted.ensureDeferred
async def test_mailbox_name_and_subscription_changes_are_listed(server):
    """MailboxName: LIST on CREATE, LIST with OLDNAME on RENAME, \\NonExistent on
    DELETE; SubscriptionChange: LIST with \\Subscribed exactly when subscribed."""
    async with _watcher_and_actor(server, "notify-names") as (_, watcher, actor):
        await _ok(watcher, "NOTIFY SET (PERSONAL (MailboxName SubscriptionChange))")
        await _ok(actor, "CREATE Projects")
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\HasNoChildren) "/" "Projects"'], lines
        await _ok(actor, "RENAME Projects Archive")
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\HasNoChildren) "/" "Archive" ("OLDNAME" ("Projects"))'], \
            lines
        # CREATE does not subscribe (RFC 3501 §6.3.3; clients subscribe themselves)
        await _ok(actor, "SUBSCRIBE Archive")
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\HasNoChildren \\Subscribed) "/" "Archive"'], lines
        await _ok(actor, "UNSUBSCRIBE Archive")
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\HasNoChildren) "/" "Archive"'], lines
        await _ok(actor, "DELETE Archive")
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == [b'* LIST (\\NonExistent) "/" "Archive"'], lines


@pytest_twisted.ensureDeferred
async def test_an_imap4rev2_watcher_gets_names_in_utf8(server):
    """After ENABLE IMAP4rev2 every mailbox name NOTIFY sends or reads is UTF-8
    (RFC 9051 §5.1): the unsolicited LIST and STATUS too, and MAILBOXES arguments."""
    async with _watcher_and_actor(server, "notify-rev2") as (_, watcher, actor):
        await _ok(watcher, "ENABLE IMAP4rev2")
        await _ok(actor, "CREATE &BB4EQgRHBFEEQgRL-")  # Отчёты
        await _ok(watcher, 'NOTIFY SET (MAILBOXES "Отчёты" (MessageNew MessageExpunge)) '
                  "(PERSONAL (MailboxName))")
        await _ok(actor, "CREATE &BB8EQAQ+BDUEOgRC-")  # Проект
        lines = await deferToThread(watcher.until, b"LIST")
        assert lines == ['* LIST (\\HasNoChildren) "/" "Проект"'.encode()], lines
        await _ok(actor, "APPEND &BB4EQgRHBFEEQgRL- {18+}\r\nSubject: x\r\n\r\nbody")
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith('* STATUS "Отчёты" (MESSAGES 1 '.encode()), lines


@pytest_twisted.ensureDeferred
async def test_notify_none_stops_notifications(server):
    """After NOTIFY NONE nothing is pushed: neither STATUS nor LIST."""
    async with _watcher_and_actor(server, "notify-none") as (inbox, watcher, actor):
        await _ok(watcher, "NOTIFY SET (PERSONAL (MessageNew MessageExpunge MailboxName))")
        await _deliver(server, inbox, "first")
        await deferToThread(watcher.until, b"STATUS")
        assert await deferToThread(watcher.cmd, "NOTIFY NONE") == \
            [b"t3 OK NOTIFY completed"]
        await _deliver(server, inbox, "second")
        await _ok(actor, "CREATE Quiet")
        assert await deferToThread(watcher.quiet, 1.0) == []


@pytest_twisted.ensureDeferred
async def test_status_during_idle(server):
    """NOTIFY's events arrive during IDLE too: STATUS for another mailbox, and the
    selected mailbox's EXISTS with its fetch attributes."""
    async with _watcher_and_actor(server, "notify-idle") as (inbox, watcher, actor):
        await _ok(watcher, "SELECT INBOX")
        await _ok(watcher, "NOTIFY SET (SELECTED (MessageNew (UID) MessageExpunge)) "
                  "(PERSONAL (MessageNew MessageExpunge))")
        await deferToThread(watcher.send, b"i IDLE\r\n")
        assert (await deferToThread(watcher.line)).startswith(b"+")
        await _ok(actor, "APPEND Drafts {12+}\r\nSubject: x\r\n")
        lines = await deferToThread(watcher.until, b"STATUS")
        assert lines[-1].startswith(b'* STATUS "Drafts" (MESSAGES 1 '), lines
        await _deliver(server, inbox, "idle")
        lines = await deferToThread(watcher.until, b"FETCH")
        assert lines == [b"* 1 EXISTS", b"* 1 RECENT", b"* 1 FETCH (UID 1)"], lines
        await deferToThread(watcher.send, b"DONE\r\n")
        assert await deferToThread(watcher.line) == b"i OK IDLE terminated"


@pytest_twisted.ensureDeferred
async def test_refusals_are_bad_or_badevent_as_rfc5465_says(server):
    """§5: MessageNew without MessageExpunge and FlagChange alone are BAD; §6.1 mailbox
    events for SELECTED, SELECTED with SELECTED-DELAYED, unknown filters: BAD;
    AnnotationChange, metadata and unknown events: NO [BADEVENT (every supported)]."""
    inbox, key = await new_inbox(server, "notify-bad")
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
            reply = await deferToThread(client.cmd, text)
            assert reply[-1].split(b" ")[1] == b"BAD", (text, reply)
        refused = ["NOTIFY SET (PERSONAL (MessageNew MessageExpunge AnnotationChange))",
                   "NOTIFY SET (PERSONAL (MailboxMetadataChange))",
                   "NOTIFY SET (INBOXES (ServerMetadataChange MailboxName))",
                   "NOTIFY SET (MAILBOXES (INBOX Sent) (SomethingNew))"]
        for text in refused:
            reply = await deferToThread(client.cmd, text)
            assert reply[-1].split(b" ", 3)[1:3] == [b"NO", SUPPORTED.split(b" ")[0]], reply
            assert SUPPORTED in reply[-1], reply
        ok = ["NOTIFY SET (SUBTREE INBOX (MessageNew MessageExpunge FlagChange))",
              "notify set (mailboxes (INBOX Sent) (messagenew messageexpunge)) "
              "(subscribed none)",
              "NOTIFY SET STATUS (SELECTED NONE)", "NOTIFY NONE"]
        for text in ok:
            await _ok(client, text)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_notify_is_advertised_and_needs_a_login(server):
    """NOTIFY is in the capabilities; before LOGIN it is BAD, like every
    authenticated-state command."""

    def attempt() -> tuple[bytes, bytes]:
        client = Client(server.imap_port, tls="none")
        try:
            return client.greeting, client.tagged("a", "NOTIFY NONE")[-1]
        finally:
            client.close()

    greeting, reply = await deferToThread(attempt)
    assert b" NOTIFY " in greeting or b" NOTIFY]" in greeting, greeting
    assert reply.startswith(b"a BAD "), reply


@pytest_twisted.ensureDeferred
async def test_too_many_mailboxes_overflow(server, monkeypatch):
    """More mailboxes than the session may watch: NO [NOTIFICATIONOVERFLOW] at SET; a
    CREATE past the bound later: * OK [NOTIFICATIONOVERFLOW], then silence."""
    monkeypatch.setattr(notifier_state, "MAX_WATCHED_MAILBOXES", 6)
    async with _watcher_and_actor(server, "notify-overflow") as (inbox, watcher, actor):
        await _ok(watcher, "NOTIFY SET (PERSONAL (MessageNew MessageExpunge))")
        await _ok(actor, "CREATE One")
        await _ok(actor, "CREATE Two")
        lines = await deferToThread(watcher.until, b"NOTIFICATIONOVERFLOW")
        assert lines[-1].startswith(b"* OK [NOTIFICATIONOVERFLOW] "), lines
        await _deliver(server, inbox, "unheard")
        assert await deferToThread(watcher.quiet, 1.0) == []
        reply = await deferToThread(
            watcher.cmd, "NOTIFY SET (PERSONAL (MessageNew MessageExpunge))")
        assert reply[-1].startswith(b"t3 NO [NOTIFICATIONOVERFLOW] "), reply
        # the selected mailbox alone is always fine
        await _ok(watcher, "NOTIFY SET (SELECTED (MessageNew MessageExpunge))")


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
            await _ok(client, "NOTIFY SET (PERSONAL (MessageNew MessageExpunge MailboxName))")
        logout = await deferToThread(leaver.cmd, "LOGOUT")
        assert logout[0].startswith(b"* BYE") and logout[-1] == b"t3 OK LOGOUT completed"
        assert await deferToThread(leaver.quiet, 0.5) == []
        revoked = await server.api.delete(f"/api/v1/api-keys/{made['id']}", key=owner)
        assert revoked.status == 200
        lines = await deferToThread(watcher.quiet, 3.0)
        assert lines and lines[-1].startswith(b"* BYE The API key was revoked"), lines
    finally:
        watcher.close()
        leaver.close()
