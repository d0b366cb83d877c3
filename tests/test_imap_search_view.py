"""A SEARCH whose criteria the view holds (flags, keywords, MODSEQ, sequence and UID
sets, ``$``, RECENT/NEW/OLD, NOT/OR/lists) is answered from the session's view without a
database read, byte for byte as the database path answers the same state: SEARCH,
UID SEARCH, ESEARCH RETURN (MIN MAX COUNT ALL SAVE), CONDSTORE's MODSEQ; a message
another session expunged is left out as the database path leaves it out; another
session's flag change is taken in before the answer (issue 10, speed)."""

from __future__ import annotations

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread

from agentpost.imap.commands import search as search_module
from tests.imap_client import Client, Lit, message, new_inbox, on_both_paths

#: storage.imap.search, the database path's read.
_SEARCH_SQL = "SELECT uid FROM messages WHERE org_id = %s AND folder_id = %s AND"

#: (flags at APPEND) of the folder's messages: keywords in several spellings.
_APPENDED = ["\\Seen $Label1", "", "\\Flagged \\Seen", "$LABEL1 Work", "\\Answered",
             "\\Draft $label2", "\\Deleted \\Seen", "wOrK $Label1 \\Flagged",
             "\\Seen \\Answered $Label2", "Junk"]


def _reads(sent: list[str]) -> list[str]:
    return [sql for sql in sent if _SEARCH_SQL in sql]


def _both(client: Client, sent: list[str], command: str) -> tuple[list[bytes], list[bytes]]:
    """``command`` from the view, then from the database (tests.imap_client.on_both_paths)."""
    return on_both_paths(client, sent, command, search_module, _SEARCH_SQL, reads_only_if_ok=True)


def _append(client: Client, flags: str, n: int) -> None:
    done = client.tagged("ap", f"APPEND INBOX ({flags}) ", Lit(message(n, f"m{n}"),
                                                                 sync=False))
    assert done[-1].startswith(b"ap OK"), done


def _folder(port: int, user: str, key: str) -> tuple[Client, Client]:
    """(reader, writer): the reader has INBOX selected with CONDSTORE on and knows all of
    it; the first messages were claimed \\Recent by an earlier session, the last two
    arrived (from the writer) while the reader was selected, so they are its \\Recent."""
    first = Client(port, user, key)
    for n, flags in enumerate(_APPENDED, 1):
        _append(first, flags, n)
    first.ok("SELECT INBOX")  # claims \Recent for the first ten
    first.logout()
    reader = Client(port, user, key)
    reader.ok("SELECT INBOX (CONDSTORE)")
    writer = Client(port, user, key)
    _append(writer, "$Label1 \\Seen", 11)
    _append(writer, "", 12)
    reader.ok("NOOP")  # claims \Recent for 11 and 12 before the writer's SELECT could
    writer.ok("SELECT INBOX")
    writer.ok("STORE 2 +FLAGS.SILENT (\\Flagged $LaBeL2)")
    writer.ok("STORE 4 -FLAGS.SILENT (work)")
    writer.ok("UID STORE 12 +FLAGS.SILENT (\\Deleted)")
    reader.ok("NOOP")
    return reader, writer


_KEYS = [
    "ALL", "UNSEEN", "SEEN", "OR SEEN FLAGGED", "FLAGGED", "UNFLAGGED", "ANSWERED",
    "UNANSWERED", "DELETED", "UNDELETED", "DRAFT", "UNDRAFT", "KEYWORD $Label1",
    "KEYWORD $LABEL1", "KEYWORD $label2", "UNKEYWORD $label1", "NOT KEYWORD x",
    "KEYWORD x", "KEYWORD WORK", "UNKEYWORD work", "KEYWORD junk", 'KEYWORD "\\\\Seen"',
    "RECENT", "NEW", "OLD", "NOT RECENT", "2:4,7", "*", "5:*", "1:100", "20:30",
    "UID 3:*", "UID 1,5,9:10", "UID 100:200", "NOT (SEEN FLAGGED)",
    "OR (UNSEEN KEYWORD $Label1) NOT OR DELETED DRAFT", "(OR RECENT 1:2) UNDELETED",
    "NOT NOT ANSWERED", "OR OR SEEN DRAFT OR DELETED KEYWORD junk", "UNSEEN UNDELETED",
    "MODSEQ 1", "MODSEQ {high}", "MODSEQ {mid}", "NOT MODSEQ {mid}",
    'MODSEQ "/flags/\\\\seen" all {mid}', "OR MODSEQ {high} SEEN", "$", "OR $ SEEN",
    "NOT $", "UID $",
]
_FORMS = ["SEARCH {key}", "UID SEARCH {key}", "SEARCH RETURN (MIN MAX COUNT ALL) {key}",
          "UID SEARCH RETURN (COUNT) {key}", "SEARCH RETURN () {key}",
          "SEARCH RETURN (MIN MAX) {key}", "SEARCH RETURN (SAVE COUNT) {key}",
          "SEARCH RETURN (MIN MAX COUNT ALL SAVE) {key}", "UID SEARCH RETURN (SAVE MIN) {key}"]


def _highest(client: Client) -> int:
    [line] = [x for x in client.ok("STATUS INBOX (HIGHESTMODSEQ)") if b"STATUS" in x]
    return int(line.rsplit(b" ", 1)[1].rstrip(b")"))


@pytest_twisted.ensureDeferred
async def test_view_answers_as_the_database_does(server, sent, monkeypatch):
    monkeypatch.setattr(search_module, "FROM_VIEW", True)
    inbox, key = await new_inbox(server, "searchview")

    def run() -> dict[str, tuple[list[bytes], list[bytes]]]:
        reader, writer = _folder(server.imap_port, inbox["email"], key)
        writer.logout()
        try:
            high = _highest(reader)
            reader.ok("SEARCH RETURN (SAVE) OR FLAGGED 3:5")
            got = {}
            for form in _FORMS:
                for text in _KEYS:
                    if "SAVE" in form and "$" in text:
                        continue  # each path would read the "$" the other saved
                    command = form.format(key=text.format(high=high, mid=high - 3))
                    got[command] = _both(reader, sent, command)
            return got
        finally:
            reader.logout()

    got = await deferToThread(run)
    for command, (view, db) in got.items():
        assert view == db, command
        assert view[-1].startswith(b"OK "), (command, view)
    # Not vacuous: the folder is varied, and each answer has its own matches.
    assert got["SEARCH ALL"][0] == [b"* SEARCH 1 2 3 4 5 6 7 8 9 10 11 12",
                                    b"OK SEARCH completed"]
    assert got["SEARCH KEYWORD $LABEL1"][0][0] == b"* SEARCH 1 4 8 11"
    assert got["SEARCH KEYWORD $label2"][0][0] == b"* SEARCH 2 6 9"
    assert got["SEARCH KEYWORD WORK"][0][0] == b"* SEARCH 8"
    assert got["SEARCH RECENT"][0][0] == b"* SEARCH 11 12"
    assert got["SEARCH NEW"][0][0] == b"* SEARCH 12"
    assert got["SEARCH DELETED"][0][0] == b"* SEARCH 7 12"
    assert got["SEARCH $"][0][0] == b"* SEARCH 2 3 4 5 8"
    assert got['SEARCH KEYWORD "\\\\Seen"'][0][0] == b"* SEARCH"
    assert got["SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN"][0][0] == \
        b'* ESEARCH (TAG TAG) MIN 2 MAX 12 ALL 2,4:6,8,10,12 COUNT 7'
    assert all(b"(MODSEQ " in view[0] for command, (view, _) in got.items()
               if command.startswith("SEARCH MODSEQ"))


def _key_tree() -> st.SearchStrategy[str]:
    leaves = st.sampled_from([
        "ALL", "SEEN", "UNSEEN", "FLAGGED", "ANSWERED", "DELETED", "DRAFT", "UNDRAFT",
        "KEYWORD $Label1", "KEYWORD $LABEL2", "UNKEYWORD Work", "KEYWORD nothere",
        "RECENT", "NEW", "OLD", "1:3", "4,6:*", "*", "UID 2:5", "UID 9:*", "$",
        "MODSEQ 5", "MODSEQ 14"])
    return st.recursive(leaves, lambda inner: st.one_of(
        st.builds(lambda k: f"NOT {k}", inner),
        st.builds(lambda a, b: f"OR {a} {b}", inner, inner),
        st.builds(lambda ks: "(" + " ".join(ks) + ")", st.lists(inner, min_size=1,
                                                                max_size=3))),
        max_leaves=8)


@pytest_twisted.ensureDeferred
async def test_random_key_trees_agree(server, sent, monkeypatch):
    monkeypatch.setattr(search_module, "FROM_VIEW", True)
    inbox, key = await new_inbox(server, "searchviewprop")

    def run() -> int:
        reader, writer = _folder(server.imap_port, inbox["email"], key)
        writer.logout()
        tried = []
        try:
            reader.ok("SEARCH RETURN (SAVE) OR SEEN 2")

            @settings(max_examples=150, deadline=None, database=None)
            @given(tree=_key_tree(), uid=st.booleans())
            def agree(tree: str, uid: bool) -> None:
                command = f"{'UID ' if uid else ''}SEARCH RETURN (MIN MAX COUNT ALL) {tree}"
                view, db = _both(reader, sent, command)
                assert view == db, command
                tried.append(command)

            agree()
            return len(tried)
        finally:
            reader.logout()

    assert await deferToThread(run) > 0


@pytest_twisted.ensureDeferred
async def test_a_message_expunged_elsewhere_is_left_out_as_the_database_leaves_it(
        server, sent, monkeypatch):
    """Another session expunged message 3 (UID 3): this session's view still holds it
    (no EXPUNGE during SEARCH, RFC 3501 §7.4.1). The database cannot find the row; the
    view path hears of the expunge from the folder's mirror before it answers and
    leaves the message out too. Its sequence number stays until NOOP tells it."""
    monkeypatch.setattr(search_module, "FROM_VIEW", True)
    inbox, key = await new_inbox(server, "searchviewexp")

    def run() -> tuple[dict[str, tuple[list[bytes], list[bytes]]], list[bytes],
                       list[bytes]]:
        reader, writer = _folder(server.imap_port, inbox["email"], key)
        try:
            writer.ok("UID STORE 3 +FLAGS.SILENT (\\Deleted)")
            writer.ok("UID EXPUNGE 3")
            writer.logout()
            got = {command: _both(reader, sent, command) for command in (
                "SEARCH ALL", "SEARCH DELETED", "SEARCH NOT SEEN", "SEARCH 1:5",
                "SEARCH RETURN (COUNT ALL) OR FLAGGED DELETED", "SEARCH FLAGGED")}
            noop = reader.ok("NOOP")
            after = reader.ok("SEARCH ALL")
            return got, noop, after
        finally:
            reader.logout()

    got, noop, after = await deferToThread(run)
    for command, (view, db) in got.items():
        assert view == db, command
    assert got["SEARCH ALL"][0][0] == b"* SEARCH 1 2 4 5 6 7 8 9 10 11 12"
    assert got["SEARCH 1:5"][0][0] == b"* SEARCH 1 2 4 5"
    assert got["SEARCH FLAGGED"][0][0] == b"* SEARCH 2 8"
    assert noop == [b"* 3 EXPUNGE"]
    assert after == [b"* SEARCH 1 2 3 4 5 6 7 8 9 10 11"]


@pytest_twisted.ensureDeferred
async def test_another_sessions_change_is_taken_in_before_the_answer(server, sent):
    """The writer's STORE and APPEND are in this process's mirror at their OK: the
    reader's SEARCH from the view tells them first (FETCH, EXISTS, RECENT), then answers
    with them taken into account, without a query."""
    inbox, key = await new_inbox(server, "searchviewother")

    def run() -> tuple[list[bytes], list[bytes]]:
        reader, writer = _folder(server.imap_port, inbox["email"], key)
        try:
            writer.ok("UID STORE 2 +FLAGS.SILENT (\\Seen)")
            sent.clear()
            unseen = reader.ok("SEARCH UNSEEN")
            assert not _reads(sent), sent
            appender = Client(server.imap_port, inbox["email"], key)
            _append(appender, "", 13)  # not selected: the reader claims its \Recent
            appender.logout()
            sent.clear()
            every = reader.ok("UID SEARCH UNSEEN")
            assert not _reads(sent), sent
            return unseen, every
        finally:
            writer.logout()
            reader.logout()

    unseen, every = await deferToThread(run)
    assert unseen[0].startswith(b"* 2 FETCH (UID 2 FLAGS (") and b"\\Seen" in unseen[0]
    assert unseen[-1] == b"* SEARCH 4 5 6 8 10 12"
    assert every == [b"* 13 EXISTS", b"* 3 RECENT", b"* SEARCH 4 5 6 8 10 12 13"]


@pytest_twisted.ensureDeferred
async def test_modseq_turns_condstore_on_on_both_paths(server, monkeypatch):
    """The first MODSEQ key is a CONDSTORE enabling command (RFC 7162 §3.1): HIGHESTMODSEQ
    is told once, and the SEARCH answer carries (MODSEQ n), from the view as from the
    database."""
    monkeypatch.setattr(search_module, "FROM_VIEW", True)
    inbox, key = await new_inbox(server, "searchviewcs")

    def run() -> list[list[bytes]]:
        first = Client(server.imap_port, inbox["email"], key)
        for n in range(1, 4):
            _append(first, "\\Seen" if n == 2 else "", n)
        first.logout()
        out = []
        for from_view in (True, False):
            client = Client(server.imap_port, inbox["email"], key)
            try:
                client.ok("SELECT INBOX")
                search_module.FROM_VIEW = from_view
                out.append(client.ok("SEARCH MODSEQ 1 UNSEEN"))
                out.append(client.ok("SEARCH MODSEQ 1 SEEN"))
            finally:
                search_module.FROM_VIEW = True
                client.logout()
        return out

    view_first, view_second, db_first, db_second = await deferToThread(run)
    assert view_first == db_first and view_second == db_second
    assert view_first[0].startswith(b"* OK [HIGHESTMODSEQ ")
    assert view_first[1].startswith(b"* SEARCH 1 3 (MODSEQ ")
    assert len(view_second) == 1 and view_second[0].startswith(b"* SEARCH 2 (MODSEQ ")


@pytest_twisted.ensureDeferred
async def test_a_key_too_costly_for_the_reactor_goes_to_the_database(server, sent,
                                                                      monkeypatch):
    """keys x messages above view_search.MAX_EVALUATIONS: the database decides (a
    thousand ORs over a large mailbox must not hold the reactor), with the same answer."""
    from agentpost.imap import view_search

    monkeypatch.setattr(search_module, "FROM_VIEW", True)
    monkeypatch.setattr(view_search, "MAX_EVALUATIONS", 30)
    inbox, key = await new_inbox(server, "searchbudget")
    costly = "SEARCH OR OR FLAGGED SEEN OR DELETED DRAFT"  # 7 criteria x 12 messages

    def run() -> tuple[list[bytes], list[str], list[bytes], list[str], list[bytes]]:
        reader, writer = _folder(server.imap_port, inbox["email"], key)
        writer.logout()
        try:
            sent.clear()
            cheap = reader.cmd("SEARCH FLAGGED")  # 1 x 12: still the view's
            cheap_reads = _reads(sent)
            sent.clear()
            by_db = reader.cmd(costly)
            costly_reads = _reads(sent)
            monkeypatch.setattr(view_search, "MAX_EVALUATIONS", 10_000)
            by_view = reader.cmd(costly)
            return cheap, cheap_reads, by_db, costly_reads, by_view
        finally:
            reader.logout()

    cheap, cheap_reads, by_db, costly_reads, by_view = await deferToThread(run)
    assert cheap[-1].split(b" ", 2)[1] == b"OK" and cheap_reads == []
    assert costly_reads, "the costly key was not sent to the database"
    assert by_db[0].startswith(b"* SEARCH ") and by_db[:-1] == by_view[:-1]
