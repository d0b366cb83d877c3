"""More conformance transcripts found by running Dovecot's imaptest scripts
(bench/imaptest_runner.py) side by side with Dovecot: a live CONTEXT=SEARCH result
follows this session's own STORE inside that STORE's reply (RFC 5267 §4.3.2), and
SORT takes its RETURN options after the charset as well as before the criteria (the
place RFC 5267 §3.1 gives them; imaptest's sort-partial uses the other one)."""

from __future__ import annotations

import pytest_twisted

from tests.imap_client import Client, message, new_inbox, session


def _esearch(lines: list[bytes]) -> list[bytes]:
    return [x for x in lines if x.startswith(b"* ESEARCH")]


@pytest_twisted.ensureDeferred
async def test_store_reply_carries_the_live_search_update(server):
    """The ADDTO/REMOVEFROM for the session's own STORE comes before that STORE's
    tagged OK, every time: not left to the poll after the command (which need not see
    the session's own change as new, so imaptest's search-context-update3 saw it late
    or never)."""
    inbox, key = await new_inbox(server, "ctxstore")

    def work(c: Client) -> list[list[bytes]]:
        for n in range(1, 7):
            c.append("INBOX", message(n, "s333" if n == 3 else f"s{n}"))
        c.ok("SELECT INBOX")
        c.ok("STORE 1 +FLAGS \\Deleted")
        c.ok("EXPUNGE")
        c.ok("STORE 1,2 +FLAGS \\Seen")
        lines = c.tagged("up", "UID SEARCH RETURN (UPDATE ALL) OR SEEN SUBJECT s33")
        assert lines[-1].startswith(b"up OK"), lines
        replies = [_esearch(lines)]
        for command in ("STORE 3:5 +FLAGS \\Seen", "STORE 1:5 -FLAGS \\Seen",
                        "UID STORE 4,5 +FLAGS \\Seen", "STORE 1:2 +FLAGS.SILENT \\Seen",
                        "STORE 1:5 -FLAGS \\Seen"):
            replies.append(_esearch(c.ok(command)))
        return replies

    # No change notices at all during the session: the update can then only come from
    # STORE's own reply, so this fails if that path is gone (with notices on, a notice
    # that beats the post-command poll could hide its absence).
    server.core.notifier.stop()
    try:
        replies = await session(server.imap_port, inbox["email"], key, work)
    finally:
        await server.core.notifier.start()
    # UIDs 2..6 are left; 2 and 3 are seen, 3 has the subject
    assert replies[0] == [b'* ESEARCH (TAG "up") UID ALL 2:3']
    assert replies[1] == [b'* ESEARCH (TAG "up") UID ADDTO (0 4:6)']
    assert replies[2] == [b'* ESEARCH (TAG "up") UID REMOVEFROM (0 2,4:6)']
    assert replies[3] == [b'* ESEARCH (TAG "up") UID ADDTO (0 4:5)']
    # .SILENT keeps the FETCH back (RFC 3501 §6.4.6), not the context's update
    assert replies[4] == [b'* ESEARCH (TAG "up") UID ADDTO (0 2)']
    assert replies[5] == [b'* ESEARCH (TAG "up") UID REMOVEFROM (0 2,4:5)']


@pytest_twisted.ensureDeferred
async def test_sort_return_options_after_the_charset(server):
    inbox, key = await new_inbox(server, "sortreturn")

    def work(c: Client) -> dict[str, list[bytes]]:
        for n in range(1, 6):
            c.append("INBOX", message(n, f"s{n}", day=n))
        c.ok("SELECT INBOX")
        return {q: c.cmd(q) for q in (
            "SORT (ARRIVAL) US-ASCII RETURN (PARTIAL 4:2) ALL",
            "SORT (REVERSE ARRIVAL) US-ASCII RETURN (PARTIAL 2:4) ALL",
            "SORT (ARRIVAL) US-ASCII RETURN (MIN MAX COUNT) 2:4",
            "UID SORT (REVERSE ARRIVAL) US-ASCII RETURN () ALL",
            "SORT (ARRIVAL) US-ASCII RETURN (PARTIAL 1) ALL",
            "SORT (ARRIVAL) US-ASCII RETURN (PARTIAL 1:*) ALL",
            "SORT RETURN (MIN) (ARRIVAL) US-ASCII RETURN (MAX) ALL",
            "SORT (ARRIVAL) US-ASCII RETURN ALL")}

    got = await session(server.imap_port, inbox["email"], key, work)

    def reply(q: str) -> bytes:
        lines = got[q]
        assert lines[-1].split(b" ")[1] == b"OK", lines
        [line] = _esearch(lines)
        return line.split(b") ", 1)[1]

    assert reply("SORT (ARRIVAL) US-ASCII RETURN (PARTIAL 4:2) ALL") == b"PARTIAL (2:4 2:4)"
    assert reply("SORT (REVERSE ARRIVAL) US-ASCII RETURN (PARTIAL 2:4) ALL") \
        == b"PARTIAL (2:4 4,3,2)"
    assert reply("SORT (ARRIVAL) US-ASCII RETURN (MIN MAX COUNT) 2:4") == b"MIN 2 MAX 4 COUNT 3"
    assert reply("UID SORT (REVERSE ARRIVAL) US-ASCII RETURN () ALL") == b"UID ALL 5,4,3,2,1"
    # a malformed PARTIAL is BAD in either place (RFC 9394 §3.1: low:high, no "*"); so
    # is RETURN twice, and RETURN without its list
    for bad in ("SORT (ARRIVAL) US-ASCII RETURN (PARTIAL 1) ALL",
                "SORT (ARRIVAL) US-ASCII RETURN (PARTIAL 1:*) ALL",
                "SORT RETURN (MIN) (ARRIVAL) US-ASCII RETURN (MAX) ALL",
                "SORT (ARRIVAL) US-ASCII RETURN ALL"):
        assert got[bad][-1].split(b" ")[1] == b"BAD", (bad, got[bad])
