"""NOTIFY (RFC 5465) in memory: the protocol on a string transport, the fake backend and
a task.Clock, for what real sockets cannot time: a change during a command waits for
its end (RFC 3501 §7.4.1), a client that stops reading ends in NOTIFICATIONOVERFLOW,
and a closed connection leaves no watch behind."""

from __future__ import annotations

from twisted.internet import defer

from agentpost.imap import notifier_state
from tests.test_imap_protocol import FakeStore, Session, _plain


def _store_with(count: int) -> FakeStore:
    store = FakeStore()
    for i in range(count):
        store.deliver("INBOX", _plain(i + 1))
    return store


def _expunge_elsewhere(store: FakeStore, uid: int) -> None:
    folder = store.folders["INBOX"]
    del folder.messages[uid]
    store.modseq += 1
    store.notify(folder.id)


def _watch_count(store: FakeStore) -> int:
    return sum(len(callbacks) for callbacks in store.watchers.values())


def test_an_expunge_during_fetch_waits_for_its_end_then_comes_unasked():
    """SELECTED MessageExpunge: an expunge signalled while FETCH runs is not written
    inside it; after the tagged OK it is pushed without any further command."""
    from tests.test_imap_protocol import FakeBackend

    store = _store_with(3)
    s = Session(FakeBackend(store)).selected()
    assert s.cmd("n NOTIFY SET (SELECTED (MessageNew MessageExpunge))") == \
        ["n OK NOTIFY completed"]
    gate: defer.Deferred[None] = defer.Deferred()
    s.account.gate = gate
    s.send(b"f FETCH 1:3 (FLAGS RFC822.SIZE)\r\n")  # a size the view cannot supply
    _expunge_elsewhere(store, 2)
    s.clock.advance(1.0)
    assert s.lines() == []  # FETCH is in progress: nothing, and no EXPUNGE inside it
    s.account.gate = None
    gate.callback(None)
    out = s.lines()
    # The FETCH says some are gone (as without NOTIFY), but sends no EXPUNGE.
    assert out[-1].startswith("f NO [EXPUNGEISSUED] ") and \
        not any(x.endswith(" EXPUNGE") for x in out), out
    s.clock.advance(notifier_state.COALESCE_S)
    assert s.lines() == ["* 2 EXPUNGE"]


def test_a_client_that_stops_reading_gets_notificationoverflow_and_nothing_more():
    """While the transport's buffer stays full, changes only mark mailboxes pending
    (a bounded set); after OVERFLOW_BLOCKED_S the session stops watching, and once the
    client reads again it is told * OK [NOTIFICATIONOVERFLOW]."""
    from tests.test_imap_protocol import FakeBackend

    store = FakeStore()
    s = Session(FakeBackend(store)).login()
    assert s.cmd("n NOTIFY SET (PERSONAL (MessageNew MessageExpunge))")[-1] == \
        "n OK NOTIFY completed"
    assert _watch_count(store) == 4  # INBOX, Sent, Trash and the folder list
    s.protocol.pauseProducing()
    for i in range(50):
        store.deliver("Sent", _plain(i + 1))
        s.clock.advance(1.0)
    assert s.lines() == []
    assert _watch_count(store) == 0  # overflowed: nothing is watched any more
    s.protocol.resumeProducing()
    s.clock.advance(notifier_state.RETRY_S)
    out = s.lines()
    assert len(out) == 1 and out[0].startswith("* OK [NOTIFICATIONOVERFLOW] "), out
    store.deliver("Sent", _plain(99))
    s.clock.advance(5.0)
    assert s.lines() == []
    assert s.protocol.notify is None


def test_a_closed_connection_leaves_no_watch_and_no_timer():
    """connectionLost stops NOTIFY: its watches are gone and a later change writes
    nothing."""
    from tests.test_imap_protocol import FakeBackend

    store = FakeStore()
    s = Session(FakeBackend(store)).selected()
    s.cmd("n NOTIFY SET (SELECTED (MessageNew MessageExpunge)) "
          "(PERSONAL (MessageNew MessageExpunge MailboxName))")
    store.deliver("Sent", _plain(1))
    s.protocol.connectionLost(None)
    assert _watch_count(store) == 0
    assert not any(isinstance(getattr(call.func, "__self__", None),
                              notifier_state.MailboxNotifier)
                   for call in s.clock.getDelayedCalls())
    s.clock.advance(10.0)
    assert s.raw() == b""
