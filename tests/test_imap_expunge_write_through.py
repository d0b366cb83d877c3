"""A session's own EXPUNGE goes into the process's mirror of the folder as it commits
(core.imap_poll.FolderMirror.expunged), as a STORE does (tests/test_imap_write_through):
the other sessions of the process learn of it without a catch-up query after it."""

import pytest_twisted

from agentpost.imap.interfaces import MessageMeta
from tests.mailfactory import make_message
from tests.test_imap_backend import _account
from tests.test_imap_write_through import _DELTA, _loaded, _settled, two_sessions


def test_expunged_takes_the_next_modseq_and_stays_current():
    mirror = _loaded()
    mark = mirror.mark()
    mirror.heard()  # one NOTIFY during the write: before it, or its own
    assert mirror.expunged(mark, 6, [3])
    assert mirror.highestmodseq == 6 and mirror.expunged_modseq == 6
    assert mirror.current_to == mirror.generation
    assert mirror.uids == [1, 2] and 3 not in mirror.meta
    seen = mirror.changes([1, 2, 3], 5)
    assert seen.expunged == [3] and seen.changed == [] and seen.highestmodseq == 6
    assert mirror.changes([1, 2], 6).expunged == []  # a session that already knows


def test_expunged_refuses_a_gap_or_an_unknown_message_and_knows_what_it_read():
    mirror = _loaded()
    assert not mirror.expunged(mirror.mark(), 8, [3])  # a change it has not read between
    assert not mirror.expunged(mirror.mark(), 6, [3, 9])  # a message it does not know
    assert mirror.uids == [1, 2, 3] and mirror.highestmodseq == 5  # untouched
    assert mirror.expunged(mirror.mark(), 5, [3])  # already read: nothing to do
    assert mirror.uids == [1, 2, 3]


def test_expunged_after_two_notifies_leaves_a_catch_up_owed():
    mirror = _loaded()
    mark = mirror.mark()
    mirror.heard()
    mirror.heard()  # the second may be of a change after ours
    assert mirror.expunged(mark, 6, [3])
    assert mirror.uids == [1, 2] and mirror.current_to < mirror.generation


@pytest_twisted.ensureDeferred
async def test_own_expunge_is_seen_by_another_session_without_a_query(server, sent):
    _, folder_a, folder_b, known, since = await two_sessions(server, "expungethrough")
    stored, _ = await folder_a.store([2], "+", frozenset({"\\Deleted"}), None)
    since = stored[0].modseq
    await _settled(folder_b, known, since)  # the mirror is current, nothing in flight
    assert await folder_a.expunge(None) == [2]
    sent.clear()
    seen = await folder_b.changes(known, since, fresh=False)
    assert seen.expunged == [2] and seen.changed == [] and seen.new == []
    assert seen.highestmodseq == since + 1
    assert not [m for m in sent if _DELTA in m]  # from memory
    # NOOP (fresh) still reads the database as it is now, and agrees.
    again = await folder_b.changes(known, since)
    assert again.expunged == seen.expunged


def test_appended_takes_the_next_modseq_and_the_next_uid():
    mirror = _loaded()
    mark = mirror.mark()
    new = MessageMeta(7, 6, frozenset({"\\Seen", "$Work"}))
    assert mirror.appended(mark, new)
    assert mirror.uids == [1, 2, 3, 7] and mirror.highestmodseq == 6
    assert mirror.current_to == mirror.generation
    seen = mirror.changes([1, 2, 3], 5)
    assert seen.new == [new] and seen.changed == [] and seen.highestmodseq == 6


def test_appended_refuses_a_gap_or_an_older_uid():
    mirror = _loaded()
    assert not mirror.appended(mirror.mark(), MessageMeta(7, 8, frozenset()))  # a gap
    assert not mirror.appended(mirror.mark(), MessageMeta(2, 6, frozenset()))  # not new
    assert mirror.uids == [1, 2, 3] and mirror.highestmodseq == 5
    assert mirror.appended(mirror.mark(), MessageMeta(3, 5, frozenset()))  # read it


@pytest_twisted.ensureDeferred
async def test_own_append_is_seen_by_another_session_without_a_query(server, sent):
    account_a, _, folder_b, known, since = await two_sessions(server, "appendthrough", 1)
    await _settled(folder_b, known, since)  # the mirror is current, nothing in flight
    raw = make_message(subject="a1", msgid="<a1@x>")
    _, uid = await account_a.append("INBOX", raw, frozenset({"\\Flagged", "$Work"}), None)
    sent.clear()
    seen = await folder_b.changes(known, since, fresh=False)
    assert [(m.uid, m.flags) for m in seen.new] == [(uid, frozenset({"\\Flagged", "$Work"}))]
    assert not [m for m in sent if _DELTA in m]  # from memory
    again = await folder_b.changes(known, since)  # NOOP: the database agrees
    assert [(m.uid, m.modseq, m.flags) for m in again.new] == \
        [(m.uid, m.modseq, m.flags) for m in seen.new]


@pytest_twisted.ensureDeferred
async def test_an_append_to_a_new_folder_under_a_selected_name_skips_the_old_mirror(server):
    """SELECT of "Work" left the name pointing at its folder; after a RENAME and a new
    "Work", an APPEND to the new folder must not land in the old folder's mirror."""
    account_a, inbox, owner = await _account(server, "appendrenamed")
    await account_a.create_folder("Work")
    account_b = await server.core.imap_logins.authenticate(inbox["email"], owner,
                                                           "127.0.0.1")
    folder_b, snap = await account_b.select("Work")
    await account_a.rename_folder("Work", "Old")
    await account_a.create_folder("Work")
    await account_a.append("Work", make_message(subject="w", msgid="<w@x>"), frozenset(),
                           None)
    seen = await folder_b.changes([m.uid for m in snap.messages], snap.highestmodseq,
                                  fresh=False)
    assert seen.new == [], seen  # the renamed folder ("Old") gained nothing
