"""A FETCH of only UID, FLAGS and MODSEQ is answered from the session's view of the
selected mailbox, without a database read, byte for byte as the database path answers
the same state (UID first for UID FETCH, MODSEQ with FLAGS once CONDSTORE is on,
CHANGEDSINCE, VANISHED, a message expunged elsewhere); another session's flag change is
told by the tagged OK (issue 10, speed)."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap.commands import fetch as fetch_module
from tests.imap_client import Client, message, new_inbox, on_both_paths

#: storage.imap.fetch_rows, the database path's read.
_FETCH_ROWS = "AND uid = ANY(%s::bigint[]) ORDER BY uid"


def _reads(sent: list[str]) -> list[str]:
    return [sql for sql in sent if _FETCH_ROWS in sql]


def _both(client: Client, sent: list[str], command: str) -> tuple[list[bytes], list[bytes]]:
    """``command`` from the view, then from the database (tests.imap_client.on_both_paths)."""
    return on_both_paths(client, sent, command, fetch_module, _FETCH_ROWS)


def _filled(port: int, user: str, key: str, count: int = 3) -> Client:
    """A session on INBOX holding ``count`` messages: 1 \\Seen, 3 \\Flagged $Work."""
    client = Client(port, user, key)
    for n in range(1, count + 1):
        client.append("INBOX", message(n, f"m{n}"))
    client.ok("SELECT INBOX")
    client.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
    client.ok("STORE 3 +FLAGS.SILENT (\\Flagged $Work)")
    client.ok("NOOP")
    return client


def _modseq(lines: list[bytes]) -> int:
    for line in lines:
        found = re.search(rb"HIGHESTMODSEQ (\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError(lines)


@pytest_twisted.ensureDeferred
async def test_flags_and_uids_come_from_the_view_as_the_database_gives_them(
        server, sent, monkeypatch):
    monkeypatch.setattr(fetch_module, "FROM_VIEW", True)
    inbox, key = await new_inbox(server, "fetchview")

    def run() -> dict[str, tuple[list[bytes], list[bytes]]]:
        client = _filled(server.imap_port, inbox["email"], key)
        try:
            return {command: _both(client, sent, command) for command in (
                "FETCH 1:* (UID FLAGS)", "FETCH 3,1 FLAGS", "UID FETCH 2:* (FLAGS)",
                "FETCH 1:* (FLAGS UID FLAGS)", "UID FETCH 1:* UID")}
        finally:
            client.logout()

    got = await deferToThread(run)
    for view, db in got.values():
        assert view == db
    assert got["FETCH 1:* (UID FLAGS)"][0] == [
        b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))", b"* 2 FETCH (UID 2 FLAGS (\\Recent))",
        b"* 3 FETCH (UID 3 FLAGS ($Work \\Flagged \\Recent))", b"OK FETCH completed"]
    assert got["UID FETCH 2:* (FLAGS)"][0][:2] == [
        b"* 2 FETCH (UID 2 FLAGS (\\Recent))",
        b"* 3 FETCH (UID 3 FLAGS ($Work \\Flagged \\Recent))"]
    assert got["FETCH 1:* (FLAGS UID FLAGS)"][0][0] == \
        b"* 1 FETCH (FLAGS (\\Seen \\Recent) UID 1)"


@pytest_twisted.ensureDeferred
async def test_condstore_changedsince_and_vanished_from_the_view(server, sent, monkeypatch):
    monkeypatch.setattr(fetch_module, "FROM_VIEW", True)
    inbox, key = await new_inbox(server, "fetchviewcs")

    def run() -> tuple[int, dict[str, tuple[list[bytes], list[bytes]]]]:
        client = _filled(server.imap_port, inbox["email"], key, count=4)
        try:
            client.ok("ENABLE QRESYNC")
            since = _modseq(client.ok("SELECT INBOX"))
            client.ok("STORE 2 +FLAGS.SILENT (\\Answered)")
            client.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
            client.ok("UID EXPUNGE 3")
            return since, {command.format(since=since): _both(
                client, sent, command.format(since=since)) for command in (
                "FETCH 1:* (FLAGS) (CHANGEDSINCE {since})",
                "UID FETCH 1:* (FLAGS) (CHANGEDSINCE {since})",
                "UID FETCH 1:* (FLAGS) (CHANGEDSINCE {since} VANISHED)",
                "FETCH 1:* (UID FLAGS)", "FETCH 1:* (MODSEQ)")}
        finally:
            client.logout()

    since, got = await deferToThread(run)
    for view, db in got.values():
        assert view == db
    [changed, done] = got[f"FETCH 1:* (FLAGS) (CHANGEDSINCE {since})"][0]
    assert re.fullmatch(rb"\* 2 FETCH \(FLAGS \(\\Answered\) MODSEQ \((\d+)\)\)", changed)
    assert int(changed.split(b"MODSEQ (")[1].rstrip(b"))")) > since
    assert done == b"OK FETCH completed"
    [changed, done] = got[f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {since})"][0]
    assert changed.startswith(b"* 2 FETCH (UID 2 FLAGS (\\Answered) MODSEQ (")
    vanished = got[f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {since} VANISHED)"][0]
    assert vanished[0] == b"* VANISHED (EARLIER) 3" and vanished[1] == changed
    every = got["FETCH 1:* (UID FLAGS)"][0]
    assert every[0].startswith(b"* 1 FETCH (UID 1 FLAGS (\\Seen) MODSEQ (")
    assert len(every) == 4  # three messages and OK
    assert all(line.startswith(b"* %d FETCH (MODSEQ (" % n)
               for n, line in enumerate(got["FETCH 1:* (MODSEQ)"][0][:3], 1))


@pytest_twisted.ensureDeferred
async def test_a_message_expunged_elsewhere_is_described_from_the_view(
        server, sent, monkeypatch):
    """The client still holds message 2: its UID and flags are told from the view and
    the FETCH is OK, as the database path told them; the EXPUNGE comes at NOOP."""
    monkeypatch.setattr(fetch_module, "FROM_VIEW", True)
    inbox, key = await new_inbox(server, "fetchviewexp")

    def run() -> tuple[tuple[list[bytes], list[bytes]], list[bytes]]:
        reader = _filled(server.imap_port, inbox["email"], key)
        writer = Client(server.imap_port, inbox["email"], key)
        try:
            writer.ok("SELECT INBOX")
            writer.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
            writer.ok("EXPUNGE")
            writer.logout()
            answers = _both(reader, sent, "FETCH 1:3 (UID FLAGS)")
            return answers, reader.ok("NOOP")
        finally:
            reader.close()

    (view, db), noop = await deferToThread(run)
    assert view == db
    assert view[1] == b"* 2 FETCH (UID 2 FLAGS (\\Recent))"
    assert view[-1] == b"OK FETCH completed"
    assert noop == [b"* 2 EXPUNGE"]


@pytest_twisted.ensureDeferred
async def test_another_sessions_flag_change_is_told_by_the_tagged_ok(server, sent):
    """B's STORE is in this process's mirror of the folder at its OK, before its NOTIFY
    wakes A: A's FETCH answers from A's view, then reports B's change before its OK."""
    inbox, key = await new_inbox(server, "fetchviewother")

    def run() -> list[list[bytes]]:
        a = _filled(server.imap_port, inbox["email"], key)
        b = Client(server.imap_port, inbox["email"], key)
        try:
            b.ok("SELECT INBOX")
            seen = []
            for flag in ("\\Flagged", "$Later", "\\Answered"):
                b.ok(f"STORE 2 +FLAGS.SILENT ({flag})")
                sent.clear()
                seen.append(a.cmd("FETCH 1:* (UID FLAGS)"))
                assert not _reads(sent), sent
            b.logout()
            return seen
        finally:
            a.close()

    seen = await deferToThread(run)
    for lines, flags in zip(seen, (b"\\Flagged", b"$Later \\Flagged",
                                   b"$Later \\Answered \\Flagged"), strict=True):
        assert lines[-1].endswith(b" OK FETCH completed"), lines
        about_2 = [line for line in lines if line.startswith(b"* 2 FETCH ")]
        assert about_2[-1] == b"* 2 FETCH (UID 2 FLAGS (" + flags + b" \\Recent))", lines
