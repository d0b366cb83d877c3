"""Mailbox-level IMAP conformance on the real store over real sockets: MOVE into the
selected mailbox announces the new message (RFC 6851 §4.3), NOTIFY's initial STATUS
carries HIGHESTMODSEQ when FlagChange is watched (RFC 5465 §5.2), and CREATE with a
trailing hierarchy separator (RFC 3501 §6.3.3)."""

from __future__ import annotations

import pytest_twisted

from tests.imap_client import Client, message, new_inbox, session


@pytest_twisted.ensureDeferred
async def test_move_into_the_selected_mailbox_expunges_then_announces_the_copy(server):
    inbox, key = await new_inbox(server, "moveself")

    def work(c: Client) -> list[bytes]:
        c.append("INBOX", message(1, "one"))
        c.ok("SELECT INBOX")
        return c.cmd("MOVE 1 INBOX")

    got = await session(server.imap_port, inbox["email"], key, work)
    assert got[0].startswith(b"* OK [COPYUID "), got
    assert got.index(b"* 1 EXPUNGE") < got.index(b"* 1 EXISTS"), got
    assert got[-1].endswith(b"OK MOVE completed"), got


@pytest_twisted.ensureDeferred
async def test_copy_into_the_selected_mailbox_announces_the_copy(server):
    inbox, key = await new_inbox(server, "copyself")

    def work(c: Client) -> list[bytes]:
        c.append("INBOX", message(1, "one"))
        c.ok("SELECT INBOX")
        return c.cmd("COPY 1 INBOX")

    got = await session(server.imap_port, inbox["email"], key, work)
    assert b"* 2 EXISTS" in got, got


@pytest_twisted.ensureDeferred
async def test_notify_initial_status_has_highestmodseq_only_when_flagchange_is_watched(
        server):
    inbox, key = await new_inbox(server, "notifyhms")

    def work(c: Client) -> tuple[list[bytes], list[bytes]]:
        c.ok("CREATE Other")
        c.append("Other", message(1, "one"))
        without = c.ok("NOTIFY SET STATUS (MAILBOXES Other (MessageNew MessageExpunge))")
        with_flags = c.ok("NOTIFY SET STATUS (MAILBOXES Other "
                          "(MessageNew MessageExpunge FlagChange))")
        return without, with_flags

    without, with_flags = await session(server.imap_port, inbox["email"], key, work)
    status = [line for line in without if line.startswith(b'* STATUS "Other"')]
    assert len(status) == 1 and b"HIGHESTMODSEQ" not in status[0], without
    status = [line for line in with_flags if line.startswith(b'* STATUS "Other"')]
    assert len(status) == 1 and b"HIGHESTMODSEQ " in status[0], with_flags


@pytest_twisted.ensureDeferred
async def test_create_with_trailing_separator_creates_the_name_and_inbox_slash_is_ok(
        server):
    inbox, key = await new_inbox(server, "createsep")

    def work(c: Client) -> tuple[list[bytes], list[bytes], list[bytes], list[bytes]]:
        return (c.cmd("CREATE INBOX/"), c.cmd("CREATE INBOX"), c.cmd("CREATE Trips/"),
                c.ok('LIST "" Trips*'))

    inbox_slash, inbox_plain, trips, listed = await session(
        server.imap_port, inbox["email"], key, work)
    assert inbox_slash[-1].split(b" ")[1] == b"OK", inbox_slash
    assert inbox_plain[-1].startswith(b"t3 NO [ALREADYEXISTS]"), inbox_plain
    assert trips[-1].split(b" ")[1] == b"OK", trips
    assert listed == [b'* LIST (\\HasNoChildren) "/" "Trips"'], listed
