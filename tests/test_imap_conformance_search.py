"""SEARCH and SORT conformance on the real store over real sockets: address searches
find a normalised addr-spec whatever CFWS the field spells it with (RFC 3501 §6.4.4),
rows stored before that are re-derived by the background job, RFC 5267 §4.4 PARTIAL
ranges are echoed normalised, low:high, and an ESEARCH MODSEQ with MIN/MAX alone is
that of the returned messages (RFC 4731 §3.2)."""

from __future__ import annotations

import psycopg2
import pytest_twisted
from twisted.internet import reactor, task

from agentpost.core.ingest import RENDER_VERSION
from agentpost.jobs.rerender import RenderRefresh
from agentpost.mail.searchkeys import (
    MAX_ADDRESS_PARSE_CHARS,
    MAX_SEARCH_TEXT_CHARS,
    display_key,
    search_text,
)
from tests.helpers import query
from tests.imap_client import Client, message, new_inbox, session

_ADDRESSED = [
    ("user-from@domain.org", "user-to@domain.org"),
    ("RealFrom <user-from@domain.org>", "RealTo <user-to@domain.org>"),
    ("<user-from (comment)@ (comment)\r\n domain.org>", "<user-to@domain.org>"),
    ("user-from@domain.org (RealFrom)",
     "team: member1@domain.org, member2@domain.org;,\r\n  other: member3@domain.org;"),
]


def _addressed(n: int, sender: str, to: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: s{n}\r\n"
            f"Message-ID: <a{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


def _search(c: Client, criteria: str) -> bytes:
    [line] = [x for x in c.ok(f"SEARCH {criteria}") if x.startswith(b"* SEARCH")]
    return line


def test_search_text_adds_each_addr_spec_the_text_does_not_show():
    assert (search_text(["<u (c)@ (c) d.org>"])
            == "<u (c)@ (c) d.org>, u@d.org")
    assert search_text(["Real <U@D.org>", "x@y.org"]) == "Real <U@D.org>, x@y.org"
    assert (search_text(["g: a@b.c, <a (x)@b.c>;"])
            == "g: a@b.c, <a (x)@b.c>;")  # a@b.c is there already, once is enough
    assert search_text([]) is None
    # a folded field is unfolded before parsing: the domain after the fold counts
    assert search_text(["<u (c)@\r\n d.org>"]) == "<u (c)@ d.org>, u@d.org"
    assert display_key(["<u (c)@\r\n d.org>"]) == "u@d.org"


def test_search_text_stays_bounded_and_keeps_the_addr_specs():
    huge = "<a (c)@ (c) b.org>, " + "x" * (2 * MAX_SEARCH_TEXT_CHARS)
    text = search_text([huge])
    assert text is not None and len(text) <= MAX_SEARCH_TEXT_CHARS
    assert text.endswith(", a@b.org")
    # the parser sees only the first MAX_ADDRESS_PARSE_CHARS: later addresses are
    # searchable as the field spells them, not normalised
    late = "y" * MAX_ADDRESS_PARSE_CHARS + ", <late (c)@ z.org>"
    assert "late@z.org" not in (search_text([late]) or "")


@pytest_twisted.ensureDeferred
async def test_search_address_matches_the_addr_spec_through_comments_and_folding(server):
    inbox, key = await new_inbox(server, "searchaddr")

    def work(c: Client) -> dict[str, bytes]:
        for n, (sender, to) in enumerate(_ADDRESSED, 1):
            c.append("INBOX", _addressed(n, sender, to))
        c.ok("SELECT INBOX")
        return {q: _search(c, q) for q in (
            "FROM user-from@domain.org", "FROM ser-from@domain", "FROM realfrom",
            "FROM comment", "TO user-to@domain.org", "TO team", "TO other",
            "TO member3@domain.org", "FROM nobody@domain.org")}

    got = await session(server.imap_port, inbox["email"], key, work)
    assert got["FROM user-from@domain.org"] == b"* SEARCH 1 2 3 4"
    assert got["FROM ser-from@domain"] == b"* SEARCH 1 2 3 4"
    assert got["FROM realfrom"] == b"* SEARCH 2 4"
    assert got["FROM comment"] == b"* SEARCH 3"  # comments stay searchable
    assert got["TO user-to@domain.org"] == b"* SEARCH 1 2 3"
    assert got["TO team"] == got["TO other"] == b"* SEARCH 4"  # group names too
    assert got["TO member3@domain.org"] == b"* SEARCH 4"
    assert got["FROM nobody@domain.org"] == b"* SEARCH"


def _age_to_version_1(dsn: str) -> None:
    """A row as version 1 stored it: the field's text alone, no addr-spec."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("UPDATE messages SET render_version = 1, "
                    "from_text = '<user-from (comment)@ (comment) domain.org>'")
    conn.close()


@pytest_twisted.ensureDeferred
async def test_rows_of_render_version_1_get_the_addr_spec_from_the_job(server, db_dsn):
    assert RENDER_VERSION >= 2
    inbox, key = await new_inbox(server, "searchaged")

    def append(c: Client) -> None:
        c.append("INBOX", _addressed(1, _ADDRESSED[2][0], "x@y.org"))

    def search(c: Client) -> bytes:
        c.ok("SELECT INBOX")
        return _search(c, "FROM user-from@domain.org")

    await session(server.imap_port, inbox["email"], key, append)
    _age_to_version_1(db_dsn)
    assert await session(server.imap_port, inbox["email"], key, search) == b"* SEARCH"

    job = RenderRefresh(server.core.db, server.core.blobs, task.Clock(), reactor, batch=5)
    assert await job.run_once() == 1
    [(text, version)] = query(db_dsn, "SELECT from_text, render_version FROM messages")
    assert version == RENDER_VERSION
    assert text.endswith(", user-from@domain.org"), text
    assert await session(server.imap_port, inbox["email"], key, search) == b"* SEARCH 1"
    # the stale index's predicate moved on with the version (migration 0016)
    [(indexdef,)] = query(db_dsn, "SELECT indexdef FROM pg_indexes "
                                  "WHERE indexname = 'messages_render_stale'")
    assert f"render_version < {RENDER_VERSION}" in indexdef, indexdef


@pytest_twisted.ensureDeferred
async def test_partial_ranges_are_echoed_low_to_high(server):
    inbox, key = await new_inbox(server, "searchpartial")

    def work(c: Client) -> dict[str, list[bytes]]:
        for n in range(1, 6):
            c.append("INBOX", message(n, f"s{n}", day=n))
        c.ok("SELECT INBOX")
        return {q: c.cmd(q) for q in (
            "SEARCH RETURN (PARTIAL 4:2) ALL", "SEARCH RETURN (PARTIAL 1:6) ALL",
            "SEARCH RETURN (PARTIAL 7:9) ALL", "SEARCH RETURN (PARTIAL -1:-3) ALL",
            "SEARCH RETURN (PARTIAL -3:-1) ALL",
            "SORT RETURN (PARTIAL 4:2) (REVERSE DATE) US-ASCII ALL",
            "SORT RETURN (PARTIAL 1:6) (REVERSE DATE) US-ASCII ALL",
            "SORT (ARRIVAL) US-ASCII RETURN (PARTIAL 1:1) ALL")}

    got = await session(server.imap_port, inbox["email"], key, work)

    def partial(q: str) -> bytes:
        lines = got[q]
        assert lines[-1].split(b" ")[1] == b"OK", lines
        [line] = [x for x in lines if x.startswith(b"* ESEARCH")]
        return line.split(b" PARTIAL ", 1)[1]

    assert partial("SEARCH RETURN (PARTIAL 4:2) ALL") == b"(2:4 2:4)"
    assert partial("SEARCH RETURN (PARTIAL 1:6) ALL") == b"(1:6 1:5)"
    assert partial("SEARCH RETURN (PARTIAL 7:9) ALL") == b"(7:9 NIL)"
    # RFC 9394 §3.1: -1 is the last result; either order means the same range
    assert partial("SEARCH RETURN (PARTIAL -1:-3) ALL") == b"(-1:-3 3:5)"
    assert partial("SEARCH RETURN (PARTIAL -3:-1) ALL") == b"(-1:-3 3:5)"
    assert partial("SORT RETURN (PARTIAL 4:2) (REVERSE DATE) US-ASCII ALL") \
        == b"(2:4 4,3,2)"
    assert partial("SORT RETURN (PARTIAL 1:6) (REVERSE DATE) US-ASCII ALL") \
        == b"(1:6 5,4,3,2,1)"
    # RFC 5267 §3.1 puts RETURN before the sort criteria; imaptest's sort-partial sends
    # it after the charset, and no search key is named RETURN, so that is taken too
    assert partial("SORT (ARRIVAL) US-ASCII RETURN (PARTIAL 1:1) ALL") == b"(1:1 1)"


@pytest_twisted.ensureDeferred
async def test_esearch_modseq_with_min_or_max_alone_is_that_of_the_returned_messages(
        server):
    """RFC 4731 §3.2: the MODSEQ item is the highest mod-sequence of the messages the
    response returns; with MIN and/or MAX alone, only those."""
    inbox, key = await new_inbox(server, "searchmodseq")

    def work(c: Client) -> tuple[dict[int, bytes], dict[str, bytes]]:
        for n in range(1, 4):
            c.append("INBOX", message(n, f"s{n}"))
        c.ok("SELECT INBOX (CONDSTORE)")
        modseqs = {}
        for n in (1, 3, 2):  # message 2 changes last: the highest mod-sequence
            [line] = c.ok(f"STORE {n} +FLAGS \\Seen")
            modseqs[n] = line.split(b"MODSEQ (")[1].split(b")")[0]
        got = {}
        for returns in ("MIN", "MAX", "MIN MAX", "COUNT"):
            [line] = [x for x in c.ok(f"SEARCH RETURN ({returns}) MODSEQ 1 1:3")
                      if x.startswith(b"* ESEARCH")]
            got[returns] = line.split(b" MODSEQ ")[1]
        # ESORT: MIN is the first in sort order (message 3 here), MAX the last (1)
        for returns in ("MIN", "MAX"):
            [line] = [x for x in c.ok(f"SORT RETURN ({returns}) (REVERSE ARRIVAL) "
                                      "US-ASCII MODSEQ 1 1,3")
                      if x.startswith(b"* ESEARCH")]
            got["SORT " + returns] = line.split(b" MODSEQ ")[1]
        return modseqs, got

    modseqs, got = await session(server.imap_port, inbox["email"], key, work)
    assert got["MIN"] == modseqs[1]
    assert got["MAX"] == modseqs[3]
    assert got["MIN MAX"] == max(modseqs[1], modseqs[3], key=int)
    assert got["COUNT"] == modseqs[2]
    assert got["SORT MIN"] == modseqs[3] and got["SORT MAX"] == modseqs[1]
