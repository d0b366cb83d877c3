"""ESORT, CONTEXT=SEARCH and CONTEXT=SORT (RFC 5267) on the real store, over real
sockets: raw transcripts against a running server on a fresh database, a second
session changing the mailbox under a live UPDATE context."""

from __future__ import annotations

from collections.abc import Callable

import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap.commands.contexts import MAX_UPDATE_CONTEXTS
from tests.imap_client import Client, message, new_login, session
from tests.test_imap_protocol import FakeBackend, FakeStore, Session


def _five(c: Client) -> None:
    """UIDs 2-6 as sequence numbers 1-5 (a first message expunged); sizes grow with
    the number, subjects run backwards (e5 ... a1)."""
    c.append("INBOX", message(0, "gone"))
    for n, subject in zip(range(1, 6), ("e", "d", "c", "b", "a"), strict=True):
        c.append("INBOX", message(n, f"{subject}{n}", day=n, size=100 * n))
    assert c.tagged("s", "SELECT INBOX")[-1].startswith(b"s OK")
    c.tagged("d", "UID STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert c.tagged("e", "EXPUNGE")[0] == b"* 1 EXPUNGE"


async def _after_five(server, name: str, commands: list[tuple[str, str]]) -> list[list[bytes]]:
    """The responses to ``(tag, command)`` after :func:`_five`, in a fresh inbox."""
    user, key = await new_login(server, name)

    def work(c: Client) -> list[list[bytes]]:
        _five(c)
        return [c.tagged(tag, command) for tag, command in commands]

    return await session(server.imap_port, user, key, work)


async def _two_sessions(server, name: str,
                        work: Callable[[Client, Client], dict[str, list[bytes]]]
                        ) -> dict[str, list[bytes]]:
    """``work(a, b)``: ``a`` after :func:`_five`, ``b`` a second session with INBOX
    selected, both on a fresh inbox."""
    user, key = await new_login(server, name)

    def run() -> dict[str, list[bytes]]:
        a = Client(server.imap_port, user, key)
        try:
            _five(a)
            b = Client(server.imap_port, user, key)
            try:
                b.tagged("s", "SELECT INBOX")
                return work(a, b)
            finally:
                b.close()
        finally:
            a.close()

    return await deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_esort_min_max_count_all_in_sort_order(server):
    """RFC 5267 §3: MIN/MAX are the first and last in sort order, ALL is in sort order
    with ranges only where it ascends (§3.2), RETURN () means ALL; a SORT without
    RETURN still answers * SORT."""
    out = await _after_five(server, "esort", [
        ("a", "UID SORT RETURN (MIN MAX COUNT) (SUBJECT) UTF-8 ALL"),
        ("b", "SORT RETURN () (REVERSE ARRIVAL) UTF-8 ALL"),
        ("c", "UID SORT RETURN (ALL) (SIZE) UTF-8 ALL"),
        ("d", "SORT RETURN (COUNT MIN) (SIZE) UTF-8 SUBJECT nothing"),
        ("e", "SORT (SUBJECT) UTF-8 ALL"),
        ("g", "SORT RETURN (MIN) (SIZE) ISO-8859-1 ALL"),
        ("h", "SORT RETURN (MIN (SIZE) UTF-8 ALL")])
    assert out[0] == [b'* ESEARCH (TAG "a") UID MIN 6 MAX 2 COUNT 5', b"a OK SORT completed"]
    assert out[1][0] == b'* ESEARCH (TAG "b") ALL 5,4,3,2,1'
    assert out[2][0] == b'* ESEARCH (TAG "c") UID ALL 2:6'
    assert out[3][0] == b'* ESEARCH (TAG "d") COUNT 0'
    assert out[4][0] == b"* SORT 5 4 3 2 1"
    assert out[5] == [b"g NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset"]
    assert out[6][-1].startswith(b"h BAD")


@pytest_twisted.ensureDeferred
async def test_partial_pages_search_and_sort_results(server):
    """RFC 5267 §4.4: PARTIAL low:high returns that window of the results (mailbox order
    for SEARCH, sort order for SORT), echoing the range; past the end is short or NIL;
    the range's order does not matter; from the end with negative numbers (RFC 9394)."""
    out = await _after_five(server, "partial", [
        ("a", "SEARCH RETURN (PARTIAL 1:2) ALL"),
        ("b", "UID SEARCH RETURN (PARTIAL 4:10 COUNT) ALL"),
        ("c", "SEARCH RETURN (PARTIAL 100:200) ALL"),
        ("d", "SEARCH RETURN (PARTIAL 3:2 MIN) ALL"),
        ("e", "UID SEARCH RETURN (PARTIAL -1:-2) ALL"),
        ("f", "UID SORT RETURN (PARTIAL 1:2) (REVERSE ARRIVAL) UTF-8 ALL"),
        ("g", "SORT RETURN (PARTIAL 2:4 COUNT) (SUBJECT) UTF-8 ALL"),
        ("h", "SEARCH RETURN (CONTEXT COUNT) ALL"),
        ("i", "SEARCH RETURN (PARTIAL 1:4294967295) ALL")])
    assert out[0] == [b'* ESEARCH (TAG "a") PARTIAL (1:2 1:2)', b"a OK SEARCH completed"]
    assert out[1][0] == b'* ESEARCH (TAG "b") UID COUNT 5 PARTIAL (4:10 5:6)'
    assert out[2][0] == b'* ESEARCH (TAG "c") PARTIAL (100:200 NIL)'
    assert out[3][0] == b'* ESEARCH (TAG "d") MIN 1 PARTIAL (2:3 2:3)'
    assert out[4][0] == b'* ESEARCH (TAG "e") UID PARTIAL (-1:-2 5:6)'
    assert out[5][0] == b'* ESEARCH (TAG "f") UID PARTIAL (1:2 6,5)'
    assert out[6][0] == b'* ESEARCH (TAG "g") COUNT 5 PARTIAL (2:4 4,3,2)'
    assert out[7][0] == b'* ESEARCH (TAG "h") COUNT 5'
    assert out[8][0] == b'* ESEARCH (TAG "i") PARTIAL (1:4294967295 1:5)'


@pytest_twisted.ensureDeferred
async def test_partial_refuses_malformed_ranges(server):
    """BAD: zero, beyond 32 bits, mixed signs, no range, twice, or with ALL (§4.4)."""
    bad = ["SEARCH RETURN (PARTIAL 0:5) ALL", "SEARCH RETURN (PARTIAL 1:4294967296) ALL",
           "SEARCH RETURN (PARTIAL 1:99999999999) ALL", "SEARCH RETURN (PARTIAL -1:5) ALL",
           "SEARCH RETURN (PARTIAL) ALL", "SEARCH RETURN (PARTIAL 1:*) ALL",
           "SEARCH RETURN (PARTIAL 1:2 PARTIAL 3:4) ALL",
           "SEARCH RETURN (PARTIAL 1:2 ALL) ALL", "SORT RETURN (ALL PARTIAL 1:2) (SIZE) UTF-8 ALL",
           "SEARCH RETURN (PARTIAL (1:2)) ALL", "SEARCH RETURN (PARTIAL 1:2,4:5) ALL"]
    out = await _after_five(server, "partial-bad",
                            [(f"b{i}", command) for i, command in enumerate(bad)]
                            + [("ok", "NOOP")])
    for i, lines in enumerate(out[:-1]):
        assert lines[-1].startswith(f"b{i} BAD".encode()), (bad[i], lines)
    assert out[-1][-1] == b"ok OK NOOP completed"


@pytest_twisted.ensureDeferred
async def test_update_reports_messages_another_session_appends_and_expunges(server):
    """RFC 5267 §4.3: ADDTO after the EXISTS, REMOVEFROM before the EXPUNGE (while its
    number is valid); SEARCH contexts use position 0, SORT contexts positions."""

    def work(a: Client, b: Client) -> dict[str, list[bytes]]:
        out = {"search": a.tagged("u1", "UID SEARCH RETURN (UPDATE) SUBJECT hit"),
               "sort": a.tagged("u2", "UID SORT RETURN (UPDATE ALL) (REVERSE ARRIVAL) UTF-8 "
                                      "UNDELETED"),
               "seq": a.tagged("u3", "SEARCH RETURN (UPDATE COUNT) SUBJECT hit")}
        hit = b.append("INBOX", message(6, "hit6"))
        b.append("INBOX", message(7, "miss7"))
        out["added"] = a.tagged("n1", "NOOP")
        b.tagged("x", f"UID STORE {hit} +FLAGS.SILENT (\\Deleted)")
        b.tagged("y", f"UID EXPUNGE {hit}")
        out["removed"] = a.tagged("n2", "NOOP")
        out["quiet"] = a.tagged("n3", "NOOP")
        return out

    out = await _two_sessions(server, "update", work)
    assert out["search"] == [b'* ESEARCH (TAG "u1") UID', b"u1 OK SEARCH completed"]
    assert out["sort"][0] == b'* ESEARCH (TAG "u2") UID ALL 6,5,4,3,2'
    assert out["seq"][0] == b'* ESEARCH (TAG "u3") COUNT 0'
    added = out["added"]
    assert added[0] == b"* 7 EXISTS"
    assert set(added[1:-1]) >= {b'* ESEARCH (TAG "u1") UID ADDTO (0 7)',
                                b'* ESEARCH (TAG "u2") UID ADDTO (1 8,7)',
                                b'* ESEARCH (TAG "u3") ADDTO (0 6)'}
    assert added[-1] == b"n1 OK NOOP completed"
    removed = out["removed"]
    expunge = removed.index(b"* 6 EXPUNGE")
    assert set(removed[:expunge]) == {b'* ESEARCH (TAG "u1") UID REMOVEFROM (0 7)',
                                      b'* ESEARCH (TAG "u2") UID REMOVEFROM (2 7)',
                                      b'* ESEARCH (TAG "u3") REMOVEFROM (0 6)'}
    assert out["quiet"] == [b"n3 OK NOOP completed"]


@pytest_twisted.ensureDeferred
async def test_update_follows_flag_changes_and_arrives_during_idle(server):
    """A message that stops (or starts) matching after a flag change is removed (added);
    during IDLE the notification comes without a command."""

    def work(a: Client, b: Client) -> dict[str, list[bytes]]:
        out = {"start": a.tagged("u", "SEARCH RETURN (UPDATE ALL) UNSEEN")}
        b.tagged("x", "STORE 2 +FLAGS.SILENT (\\Seen)")
        out["seen"] = a.tagged("n1", "NOOP")
        a.send(b"i IDLE\r\n")
        assert a.line().startswith(b"+")
        b.tagged("y", "STORE 2 -FLAGS.SILENT (\\Seen)")
        out["idle"] = a.until(b"ESEARCH")
        a.send(b"DONE\r\n")
        out["done"] = a.response("i")
        return out

    out = await _two_sessions(server, "update-flags", work)
    assert out["start"][0] == b'* ESEARCH (TAG "u") ALL 1:5'
    assert b'* ESEARCH (TAG "u") REMOVEFROM (0 2)' in out["seen"]
    assert out["idle"][-1] == b'* ESEARCH (TAG "u") ADDTO (0 2)'
    assert out["done"][-1] == b"i OK IDLE terminated"


@pytest_twisted.ensureDeferred
async def test_cancelupdate_tag_reuse_noupdate_and_unselect(server):
    """CANCELUPDATE stops a context (NO for an unknown tag, BAD without one); UPDATE
    under a live context's tag is BAD; past the limit an untagged NO [NOUPDATE] and
    the other return options still answered; contexts end with the selection."""

    def work(a: Client, b: Client) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for i in range(MAX_UPDATE_CONTEXTS):
            a.tagged(f"c{i}", "UID SEARCH RETURN (UPDATE) SUBJECT hit")
        out["reuse"] = a.tagged("c0", "UID SEARCH RETURN (UPDATE) ALL")
        out["over"] = a.tagged("c9", "UID SEARCH RETURN (UPDATE COUNT) ALL")
        out["cancel"] = a.tagged("x1", 'CANCELUPDATE "c0" "c1"')
        out["unknown"] = a.tagged("x2", 'CANCELUPDATE "c2" "nope"')
        out["empty"] = a.tagged("x3", "CANCELUPDATE")
        b.append("INBOX", message(6, "hit6"))
        out["after"] = a.tagged("n1", "NOOP")
        a.tagged("r", "SELECT INBOX")
        b.append("INBOX", message(7, "hit7"))
        out["reselected"] = a.tagged("n2", "NOOP")
        out["again"] = a.tagged("c2", "UID SEARCH RETURN (UPDATE) SUBJECT hit")
        a.tagged("u", "UNSELECT")
        out["authenticated"] = a.tagged("x4", 'CANCELUPDATE "c2"')
        return out

    out = await _two_sessions(server, "cancel", work)
    assert out["reuse"][-1].startswith(b"c0 BAD")
    assert out["over"] == [b'* NO [NOUPDATE "c9"] Too many contexts; at most 5 '
                           b"(CANCELUPDATE one)",
                           b'* ESEARCH (TAG "c9") UID COUNT 5', b"c9 OK SEARCH completed"]
    assert out["cancel"] == [b"x1 OK CANCELUPDATE completed"]
    assert out["unknown"][-1].startswith(b"x2 NO")
    assert out["empty"][-1].startswith(b"x3 BAD")
    notes = [line for line in out["after"] if b"ESEARCH" in line]
    assert sorted(notes) == [b'* ESEARCH (TAG "c%d") UID ADDTO (0 7)' % i
                             for i in range(2, MAX_UPDATE_CONTEXTS)]
    assert not any(b"ESEARCH" in line for line in out["reselected"])
    assert out["again"][-1] == b"c2 OK SEARCH completed"
    assert out["authenticated"][-1].startswith(b"x4 BAD")


@pytest_twisted.ensureDeferred
async def test_capabilities_advertise_thread_esort_and_contexts(server):
    user, key = await new_login(server, "caps")
    caps = (await session(server.imap_port, user, key,
                          lambda c: c.tagged("c", "CAPABILITY")[0])).split()
    for cap in (b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES", b"ESORT", b"CONTEXT=SEARCH",
                b"CONTEXT=SORT"):
        assert cap in caps


# ---------------------------------------------------------------- in memory (fake backend)


def _session() -> tuple[FakeStore, Session]:
    store = FakeStore()
    for n in (1, 2, 3):
        store.deliver("INBOX", message(n, f"m{n}", size=10 * n))
    return store, Session(FakeBackend(store)).selected()


def test_removefrom_comes_during_fetch_while_the_expunge_waits():
    """RFC 3501 §7.4.1 holds the EXPUNGE back during FETCH; RFC 5267 §4.3.2 lets the
    REMOVEFROM go at once (its sequence number is still valid), and only once."""
    store, s = _session()
    assert s.cmd("u SEARCH RETURN (UPDATE) ALL") == ['* ESEARCH (TAG "u")',
                                                    "u OK SEARCH completed"]
    inbox = store.folders["INBOX"]
    del inbox.messages[2]  # another session expunged it
    store.notify(inbox.id)
    out = s.cmd("f FETCH 1 (UID)")
    assert '* ESEARCH (TAG "u") REMOVEFROM (0 2)' in out
    assert not any("EXPUNGE" in line for line in out)
    assert s.cmd("n NOOP") == ["* 2 EXPUNGE", "n OK NOOP completed"]


def test_own_expunge_sends_removefrom_first_and_sort_contexts_keep_positions():
    """The session's own EXPUNGE: REMOVEFROM (with the number before the removal) and
    then the EXPUNGE; a SORT context names the position in its order."""
    _, s = _session()
    s.cmd("a UID SEARCH RETURN (UPDATE) ALL")
    assert s.cmd("b SORT RETURN (UPDATE ALL) (REVERSE SIZE) UTF-8 ALL")[0] == \
        '* ESEARCH (TAG "b") ALL 3,2,1'
    s.cmd("c STORE 2 +FLAGS.SILENT (\\Deleted)")
    out = s.cmd("d EXPUNGE")
    assert out[-2:] == ["* 2 EXPUNGE", "d OK EXPUNGE completed"]
    assert sorted(out[:-2]) == ['* ESEARCH (TAG "a") UID REMOVEFROM (0 2)',
                                '* ESEARCH (TAG "b") REMOVEFROM (2 2)']


def test_thread_over_the_fake_backend():
    """THREAD reads the folder's thread_fields once and renders sequence numbers."""
    store = FakeStore()
    store.deliver("INBOX", message(1, "Hi"))
    store.deliver("INBOX", message(2, "Re: Hi", reply_to="<1@example.com>", day=2))
    store.deliver("INBOX", message(3, "Alone", day=3))
    s = Session(FakeBackend(store)).selected()
    assert s.cmd("t THREAD REFERENCES UTF-8 ALL") == ["* THREAD (1 2)(3)",
                                                      "t OK THREAD completed"]
    assert s.cmd("u UID THREAD ORDEREDSUBJECT UTF-8 NOT 3") == ["* THREAD (1 2)",
                                                               "u OK THREAD completed"]
