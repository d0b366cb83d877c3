"""THREAD (RFC 5256) on the real store, over real sockets: raw transcripts against a
running server on a fresh database, threads built from APPENDed messages with
References and In-Reply-To."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap.commands import threading as imap_threading
from tests.imap_client import Client, message, new_login, session

#: Nine messages (sequence numbers 1-9; UIDs 2-10, a first message was expunged):
#: 2 and 4 answer 1 (In-Reply-To, References), 3 answers 2; 6 answers a message that
#: is not there; 7 and 8 answer the same missing one; 9 is "Re: Other" without
#: references (REFERENCES step 5 files it under 5 by subject).
THREAD_MESSAGES = [
    message(1, "Hello", day=1),
    message(2, "Re: Hello", reply_to="<1@example.com>", day=2),
    message(3, "Re: Hello", refs="<1@example.com> <2@example.com>", day=3),
    message(4, "Re: Hello", refs="<1@example.com>", day=4),
    message(5, "Other", day=5),
    message(6, "Lost parent", refs="<missing@example.com>", day=6),
    message(7, "Twins", refs="<missing2@example.com>", day=7),
    message(8, "Re: Twins", refs="<missing2@example.com>", day=8),
    message(9, "Re: Other", day=9),
]


def _fill(c: Client) -> None:
    """The messages above, after one expunged message: sequence numbers are UIDs - 1."""
    c.append("INBOX", message(0, "gone"))
    for raw in THREAD_MESSAGES:
        c.append("INBOX", raw)
    assert c.tagged("s1", "SELECT INBOX")[-1].startswith(b"s1 OK")
    c.tagged("d1", "UID STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert c.tagged("e1", "EXPUNGE")[0] == b"* 1 EXPUNGE"


@pytest_twisted.ensureDeferred
async def test_thread_references_and_orderedsubject_by_sequence_number_and_uid(server):
    """RFC 5256 §4: REFERENCES links by References/In-Reply-To, promotes the lone
    child of a missing parent, keeps a dummy over two, files "Re: Other" under
    "Other"; ORDEREDSUBJECT groups by base subject. UID THREAD answers UIDs."""
    user, key = await new_login(server, "threads")

    def work(c: Client) -> dict[str, list[bytes]]:
        _fill(c)
        return {
            "refs": c.tagged("t1", "THREAD REFERENCES UTF-8 ALL"),
            "subject": c.tagged("t2", "THREAD ORDEREDSUBJECT US-ASCII ALL"),
            "uid": c.tagged("t3", "UID THREAD REFERENCES UTF-8 ALL"),
            "search": c.tagged("t4", "THREAD REFERENCES UTF-8 SUBJECT hello"),
            "lower": c.tagged("t5", "thread references utf-8 ALL"),
            "none": c.tagged("t6", "THREAD REFERENCES UTF-8 SUBJECT nothing-matches"),
            "seqset": c.tagged("t7", "THREAD ORDEREDSUBJECT UTF-8 OR 2:4 OR 6 7"),
        }

    out = await session(server.imap_port, user, key, work)
    assert out["refs"] == [b"* THREAD (1 (2 3)(4))(5 9)(6)((7)(8))",
                           b"t1 OK THREAD completed"]
    assert out["subject"][0] == b"* THREAD (1 (2)(3)(4))(5 9)(6)(7 8)"
    assert out["uid"][0] == b"* THREAD (2 (3 4)(5))(6 10)(7)((8)(9))"
    assert out["search"][0] == b"* THREAD (1 (2 3)(4))"
    assert out["lower"][0] == out["refs"][0]
    assert out["none"] == [b"* THREAD", b"t6 OK THREAD completed"]
    assert out["seqset"][0] == b"* THREAD (2 (3)(4))(6)(7)"


@pytest_twisted.ensureDeferred
async def test_thread_refuses_bad_charset_algorithm_and_state(server):
    """BADCHARSET lists what is supported; an unknown algorithm or missing arguments
    are BAD; THREAD needs a selected mailbox."""
    user, key = await new_login(server, "thread-errors")

    def work(c: Client) -> list[list[bytes]]:
        out = [c.tagged("a", "THREAD REFERENCES UTF-8 ALL")]
        c.tagged("s", "SELECT INBOX")
        out += [c.tagged("b", "THREAD REFERENCES ISO-8859-1 ALL"),
                c.tagged("c", "THREAD X-SMART UTF-8 ALL"),
                c.tagged("d", "THREAD REFERENCES UTF-8"),
                c.tagged("e", "THREAD (REFERENCES) UTF-8 ALL"),
                c.tagged("f", "THREAD REFERENCES UTF-8 NOSUCHKEY"),
                c.tagged("g", "THREAD REFERENCES UTF-8 ALL")]
        return out

    out = await session(server.imap_port, user, key, work)
    assert out[0][-1].startswith(b"a BAD")
    assert out[1] == [b"b NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset"]
    assert out[2][-1].startswith(b"c BAD Unknown THREAD algorithm")
    assert out[3][-1].startswith(b"d BAD")
    assert out[4][-1].startswith(b"e BAD")
    assert out[5][-1].startswith(b"f BAD")
    assert out[6] == [b"* THREAD", b"g OK THREAD completed"]  # an empty mailbox


@pytest_twisted.ensureDeferred
async def test_thread_sees_only_its_own_inbox_and_survives_hostile_references(server):
    """Another organization's inbox with the same Message-IDs threads apart; reference
    loops, self references and a long reply chain thread without error."""
    user, key = await new_login(server, "thread-mine")
    other, other_key = await new_login(server, "thread-theirs")
    chain = 60

    def sessions() -> tuple[list[bytes], list[bytes], list[bytes]]:
        theirs = Client(server.imap_port, other, other_key)
        theirs.append("INBOX", message(1, "Hello", day=1))  # the parent of my 2
        mine = Client(server.imap_port, user, key)
        mine.append("INBOX", message(2, "Re: Hello", reply_to="<1@example.com>", day=2))
        mine.append("INBOX", message("a", "loop", refs="<b@example.com>", day=3))
        mine.append("INBOX", message("b", "loop", refs="<a@example.com>", day=4))
        mine.append("INBOX", message("self", "me", refs="<self@example.com>", day=5))
        refs = ""
        for i in range(chain):
            mine.append("INBOX", message(f"c{i}", "chain", refs=refs, day=6))
            refs = (refs + f" <c{i}@example.com>").strip()
        mine.tagged("s", "SELECT INBOX")
        theirs.tagged("s", "SELECT INBOX")
        out = (mine.tagged("t", "THREAD REFERENCES UTF-8 ALL"),
               mine.tagged("u", "UID THREAD ORDEREDSUBJECT UTF-8 ALL"),
               theirs.tagged("t", "THREAD REFERENCES UTF-8 ALL"))
        mine.close()
        theirs.close()
        return out

    refs, subject, theirs = await deferToThread(sessions)
    assert refs[-1] == b"t OK THREAD completed"
    flat = refs[0].replace(b"(", b" ").replace(b")", b" ").split()[2:]
    assert sorted(int(n) for n in flat) == list(range(1, 5 + chain))  # each message once
    assert refs[0].startswith(b"* THREAD (1)")  # its parent is not in this inbox
    assert b" ".join(str(n).encode() for n in range(5, 5 + chain)) in refs[0]  # the chain
    assert subject[-1] == b"u OK THREAD completed"
    assert theirs[0] == b"* THREAD (1)"


@pytest_twisted.ensureDeferred
async def test_large_threads_are_computed_off_the_reactor_thread(server, monkeypatch):
    """Above the inline limit the threading runs in the thread pool: same answer."""
    monkeypatch.setattr(imap_threading, "INLINE_MESSAGES", 0)
    user, key = await new_login(server, "thread-pool")

    def work(c: Client) -> list[bytes]:
        _fill(c)
        return c.tagged("t", "THREAD REFERENCES UTF-8 ALL")

    out = await session(server.imap_port, user, key, work)
    assert out[0] == b"* THREAD (1 (2 3)(4))(5 9)(6)((7)(8))"
