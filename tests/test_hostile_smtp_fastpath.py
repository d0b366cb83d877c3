"""Hostile review of the SMTP fast paths and of the route cache's settle.

The SMTP half drives the real protocol on a StringTransport with a task.Clock (the
harness of tests/test_smtp_protocol.py): a client that pipelines MAIL/RCPT/DATA/RSET/
QUIT while the agent answers at once, later or not at all; sessions that end while a
check or a delivery is in flight; failed checks on both paths; error counting, the
recipient limit, the command timer after a reply sent on the fast path; spools closed
on every path (counted in /proc/self/fd). The route cache half runs the real server
on a real PostgreSQL: settle is bounded, concurrent changes answer, and a notice that
came in before the API began to wait does not cost the client the whole timeout.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from agentpost.cork import Cork
from agentpost.model import errors
from agentpost.smtp import replies
from agentpost.smtp.replies import Reply
from agentpost.smtp.server import SMTPLimits, State
from tests.test_key_cache import _until
from tests.test_route_cache import _rcpt
from tests.test_smtp_protocol import RecordingAgent, Session, starts

# --------------------------------------------------------------------------- helpers


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class SpoolWatchingAgent(RecordingAgent):
    """Records every spool handed to deliver, to check each is closed afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.spools: list[Any] = []

    async def deliver(self, session: Any, envelope: Any, message: Any, size: int) -> None:
        self.spools.append(message)
        await super().deliver(session, envelope, message, size)


class HeldSenderAgent(RecordingAgent):
    """check_sender answers with a Deferred the test fires (or fails) later."""

    def __init__(self) -> None:
        super().__init__()
        self.held_senders: list[defer.Deferred] = []

    def check_sender(self, session: Any, mail_from: str) -> Any:
        self.senders.append(mail_from)
        d: defer.Deferred = defer.Deferred()
        self.held_senders.append(d)
        return d


class PlainSenderAgent(RecordingAgent):
    """check_sender as a plain function (the MX's, since the change), raising or not."""

    def check_sender(self, session: Any, mail_from: str) -> Any:
        self.senders.append(mail_from)
        if self.sender_error is not None:
            raise self.sender_error
        return None


MSG = "Subject: hi\r\n\r\nbody\r\n.\r\n"


# --------------------------------------------------------------------------- pipelining


def test_pipelined_burst_with_synchronous_checks_keeps_order_and_transactions():
    """MAIL RCPT RCPT DATA body RSET MAIL RCPT QUIT in one send, every check answered
    at once: replies in order, in one write, each message with its own recipients."""
    s = Session(PlainSenderAgent()).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\nRCPT TO:<y@mx.test>\r\n"
           "DATA\r\n" + MSG + "MAIL FROM:<b@example.org>\r\nRCPT TO:<z@mx.test>\r\n"
           "RSET\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<w@mx.test>\r\nDATA\r\n" + MSG
           + "QUIT\r\n")
    codes = s.codes()
    assert starts(codes, "250 2.1.0", "250 2.1.5", "250 2.1.5", "354", "250 2.0.0",
                  "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.1.0", "250 2.1.5", "354",
                  "250 2.0.0", "221"), codes
    delivered = [(e.mail_from, list(e.recipient_addresses)) for e, *_ in s.agent.deliveries]
    assert delivered == [("a@example.org", ["x@mx.test", "y@mx.test"]),
                         ("c@example.org", ["w@mx.test"])]
    assert s.closed


def test_rcpt_after_rset_while_a_check_is_in_flight_lands_in_no_transaction():
    """RCPT a (held), RSET, RCPT b pipelined: b needs MAIL (503), a goes nowhere."""
    agent = RecordingAgent()
    agent.hold_recipients = True
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<a@mx.test>\r\nRSET\r\nRCPT TO:<b@mx.test>"
           "\r\nDATA\r\n")
    assert starts(s.codes(), "250 2.1.0")  # RSET waits behind the held RCPT
    assert agent.recipients == ["a@mx.test"]
    agent.release_recipients()
    assert starts(s.codes(), "250 2.1.5", "250 2.0.0", "503 5.5.1", "503 5.5.1")
    assert s.protocol._txn is None and s.protocol.state is State.READY
    assert agent.recipients == ["a@mx.test"]  # b was never checked


def test_mixed_sync_and_async_recipients_keep_reply_order():
    """Alternate held and at-once recipients: the replies leave in command order and
    the envelope holds them in that order."""

    class Alternating(RecordingAgent):
        def check_recipient(self, session: Any, mail_from: str, rcpt: str) -> Any:
            self.hold_recipients = rcpt.startswith("held")
            return super().check_recipient(session, mail_from, rcpt)

    agent = Alternating()
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<fast1@mx.test>\r\nRCPT TO:<held1@mx.test>"
           "\r\nRCPT TO:<fast2@mx.test>\r\nRCPT TO:<held2@mx.test>\r\nRCPT TO:<fast3@mx.test>"
           "\r\nDATA\r\n")
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5")
    while agent.held:
        agent.release_recipients()
    s.send(MSG)
    assert starts(s.codes(), "250 2.1.5", "250 2.1.5", "250 2.1.5", "250 2.1.5", "354",
                  "250 2.0.0")
    envelope = agent.deliveries[0][0]
    assert envelope.recipient_addresses == ["fast1@mx.test", "held1@mx.test",
                                            "fast2@mx.test", "held2@mx.test",
                                            "fast3@mx.test"]
    assert envelope.recipients == [f"token:{a}" for a in envelope.recipient_addresses]


def test_held_mail_check_then_connection_lost_makes_no_transaction():
    """MAIL whose sender check is in flight, then the client leaves: the late answer
    writes nothing and opens no transaction."""
    agent = HeldSenderAgent()
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\n")
    assert s.codes() == []
    s.protocol.connectionLost(None)
    agent.held_senders[0].callback(None)
    assert s.transport.value() == b""
    assert s.protocol._txn is None and s.protocol.state is State.CLOSED
    assert agent.recipients == []


def test_held_rcpt_check_then_quit_pipelined_keeps_order_then_closes():
    """RCPT (held) then QUIT: QUIT waits for the RCPT's reply, then 221."""
    agent = RecordingAgent()
    agent.hold_recipients = True
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\nQUIT\r\n")
    assert starts(s.codes(), "250 2.1.0")
    assert not s.closed
    agent.release_recipients()
    assert starts(s.codes(), "250 2.1.5", "221 2.0.0")
    assert s.closed


def test_held_rcpt_then_connection_lost_appends_nothing():
    """The late token of a RCPT whose session ended is not added to any envelope."""
    agent = RecordingAgent()
    agent.hold_recipients = True
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\n")
    s.codes()
    txn = s.protocol._txn
    assert txn is not None
    s.protocol.connectionLost(None)
    agent.release_recipients()
    assert txn.envelope.recipients == [] and s.transport.value() == b""


# --------------------------------------------------------------------------- failures


def test_failed_checks_on_both_paths_answer_and_count_errors():
    """A plain check_sender raising, a recipient check failing at once and one failing
    later: each answered from the table, each counted towards max_errors (the third
    5xx closes with 421)."""
    agent = PlainSenderAgent()
    agent.sender_error = errors.SenderNotAllowed("no")
    agent.recipient_errors["bad@mx.test"] = errors.UnknownRecipient("who?")
    s = Session(agent, limits=SMTPLimits(max_errors=3)).greeted()
    s.send("MAIL FROM:<a@example.org>\r\n")
    assert starts(s.codes(), "553 5.7.1")
    agent.sender_error = None
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<bad@mx.test>\r\n")
    assert starts(s.codes(), "250 2.1.0", "550 5.1.1")
    assert s.protocol._txn is not None and s.protocol._txn.envelope.recipients == []
    agent.hold_recipients = True
    s.send("RCPT TO:<later@mx.test>\r\nNOOP\r\n")
    assert s.codes() == []
    agent.held[0][0].errback(errors.UnknownRecipient("later"))
    agent.held.clear()
    codes = s.codes()
    assert starts(codes, "550 5.1.1", "421 4.7.0"), codes
    assert s.closed


def test_unexpected_exception_in_a_synchronous_check_is_451_not_a_traceback():
    """A bug in the agent that raises at once: 451 with a reference, session goes on."""

    class Buggy(PlainSenderAgent):
        def check_recipient(self, session: Any, mail_from: str, rcpt: str) -> Any:
            raise ZeroDivisionError("boom")

    s = Session(Buggy()).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\nNOOP\r\n")
    lines = s.lines()
    assert starts([x for x in lines if x[3:4] == " "], "250 2.1.0", "451 4.3.0", "250 2.0.0")
    assert not any("Traceback" in x or "boom" in x for x in lines)


def test_check_timeout_answers_451_and_session_continues():
    """A recipient check that never answers: 451 after check_timeout_s, then the
    command timer runs again from that reply."""
    agent = RecordingAgent()
    agent.hold_recipients = True
    limits = SMTPLimits(check_timeout_s=10, command_timeout_s=300)
    s = Session(agent, limits=limits).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\n")
    assert starts(s.codes(), "250 2.1.0")
    s.clock.advance(10.5)
    assert starts(s.codes(), "451 4.3.0")
    txn = s.protocol._txn
    assert txn is not None and txn.envelope.recipients == []
    s.clock.advance(299)
    assert not s.closed
    s.clock.advance(2)
    assert starts(s.codes(), "421 4.4.2")


def test_max_recipients_with_synchronous_checks_in_one_burst():
    """max_recipients=2 and four pipelined RCPTs answered at once: 250 250 452 452."""
    s = Session(limits=SMTPLimits(max_recipients=2)).greeted()
    s.send("MAIL FROM:<a@example.org>\r\n" + "".join(
        f"RCPT TO:<r{i}@mx.test>\r\n" for i in range(4)))
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3")
    txn = s.protocol._txn
    assert txn is not None and len(txn.envelope.recipients) == 2


# --------------------------------------------------------------------------- timers


def test_command_timer_runs_from_a_fast_path_reply():
    """After a reply sent on the fast path the client has command_timeout_s from that
    reply, not from the one before (nor forever)."""
    s = Session(PlainSenderAgent(), limits=SMTPLimits(command_timeout_s=300,
                                                      session_deadline_s=10_000)).greeted()
    s.clock.advance(200)
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\n")
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5")
    s.clock.advance(299)
    assert not s.closed, "timed out from the earlier reply"
    s.clock.advance(2)
    assert starts(s.codes(), "421 4.4.2") and s.closed


def test_data_deadlines_after_a_synchronous_delivery():
    """A message delivered at once, then a second DATA trickled: the block timeout
    applies in the body, and the command timeout once it ended."""
    limits = SMTPLimits(command_timeout_s=300, data_block_timeout_s=30,
                        data_deadline_s=10_000, min_data_rate_bytes_per_s=0,
                        session_deadline_s=100_000)
    s = Session(PlainSenderAgent(), limits=limits).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n" + MSG)
    assert starts(s.codes(), "250", "250", "354", "250 2.0.0")
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\nSubject: x\r\n")
    s.codes()
    s.clock.advance(29)
    assert not s.closed
    s.send("more\r\n")
    s.clock.advance(29)
    assert not s.closed
    s.clock.advance(2)
    assert starts(s.codes(), "421 4.4.2") and s.closed


def test_session_deadline_passes_during_fast_path_burst():
    """The session deadline is enforced even when every reply is on the fast path."""
    limits = SMTPLimits(session_deadline_s=50, command_timeout_s=300)
    s = Session(PlainSenderAgent(), limits=limits).greeted()
    for _ in range(4):
        s.clock.advance(10)
        s.send("MAIL FROM:<a@example.org>\r\nRSET\r\n")
    s.codes()
    s.clock.advance(11)
    assert any(c.startswith("421 4.4.2") for c in s.codes()) and s.closed


# --------------------------------------------------------------------------- spools


@pytest.mark.parametrize("path", ["sync-ok", "sync-fail", "held-ok", "held-fail",
                                  "held-lost", "timeout", "bdat", "too-large"])
def test_every_spool_is_closed(path: str, tmp_path: Any):
    """Disk spools (spool_memory_bytes=1) on every path of the delivery: the file the
    agent got is closed, and no descriptor is left once the session is over."""
    agent = SpoolWatchingAgent()
    limits = SMTPLimits(spool_memory_bytes=1, deliver_timeout_s=30,
                        max_message_size_bytes=200 if path == "too-large" else 10_485_760)
    before = _fds()
    s = Session(agent, limits=limits, spool_dir=str(tmp_path)).ready_for_data()
    if path in ("sync-fail", "held-fail"):
        agent.deliver_error = errors.TemporaryFailure("disk")
    if path in ("held-ok", "held-fail", "held-lost", "timeout"):
        agent.hold_deliver = True
    body = "Subject: x\r\n\r\n" + "y" * 400 + "\r\n"
    if path == "bdat":
        raw = body.encode()
        s.send(f"BDAT {len(raw)} LAST\r\n".encode() + raw)
    else:
        s.send("DATA\r\n" + body + ".\r\n")
    if path == "held-lost":
        s.protocol.connectionLost(None)
    if path.startswith("held"):
        agent.held_deliveries[0].callback(None)
    if path == "timeout":
        s.clock.advance(31)
    codes = s.codes()
    expected = {"sync-ok": "250 2.0.0", "sync-fail": "451", "held-ok": "250 2.0.0",
                "held-fail": "451", "timeout": "451", "bdat": "250 2.0.0",
                "too-large": "552"}.get(path)
    if expected is not None:
        assert codes and codes[-1].startswith(expected), codes
    assert all(sp.closed for sp in agent.spools)
    s.protocol.connectionLost(None)
    assert _fds() == before


def test_spool_of_a_discarded_transaction_is_closed(tmp_path: Any):
    """DATA begun, then RSET is impossible (it is body), so: DATA begun and the client
    leaves; or BDAT chunk then RSET: the spool goes with the transaction."""
    before = _fds()
    s = Session(limits=SMTPLimits(spool_memory_bytes=1),
                spool_dir=str(tmp_path)).ready_for_data()
    s.send(b"BDAT 50\r\n" + b"z" * 50 + b"RSET\r\n")
    assert starts(s.codes(), "250 2.0.0", "250 2.0.0")
    s2 = Session(limits=SMTPLimits(spool_memory_bytes=1),
                 spool_dir=str(tmp_path)).ready_for_data()
    s2.send("DATA\r\nSubject: x\r\n\r\n" + "q" * 300 + "\r\n")
    s2.protocol.connectionLost(None)
    s.protocol.connectionLost(None)
    assert _fds() == before


# --------------------------------------------------------------------------- replies, cork


def test_constant_replies_render_the_same_as_fresh_ones():
    """The cached bytes of SENDER_OK & co equal a fresh rendering, and the cache does
    not leak between equal replies."""
    for constant in (replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA,
                     replies.OK):
        fresh = Reply(constant.code, constant.enhanced, constant.text)
        assert constant.render() == fresh._render() == fresh.render()
        assert constant.render() is constant.render()
    injected = Reply(250, "2.0.0", "ok\r\n250 forged")
    injected.render()
    assert injected.render() == b"250 2.0.0 ok??250 forged\r\n"


def test_reply_with_a_mutable_list_renders_what_it_holds():
    """A Reply is frozen but its text may be a list: rendered, then the list changes
    (e.g. an EHLO keyword list built and extended), the wire must show the change, as
    str(), == and the text field do."""
    lines = ["mx.test", "PIPELINING"]
    reply = Reply(250, None, lines)
    first = reply.render()
    lines.append("SIZE 10")
    assert reply == Reply(250, None, ["mx.test", "PIPELINING", "SIZE 10"])
    assert reply.render() != first
    assert reply.render().endswith(b"250 SIZE 10\r\n")


def test_cork_batch_nested_and_with_exceptions():
    """One shared batch context: nesting counted, an exception in an inner batch does
    not leave the cork holding, and the outer end flushes once."""
    sent: list[bytes] = []
    c = Cork(sent.append)
    with c.batch():
        c.write(b"a")
        with pytest.raises(RuntimeError):
            with c.batch():
                c.write(b"b")
                raise RuntimeError("x")
        assert sent == []
        with c.batch():
            c.write(b"c")
        assert sent == []
    assert b"".join(sent) == b"abc"
    assert c._batches == 0
    c.write(b"d")  # no batch, no command: straight out
    assert b"".join(sent) == b"abcd"


def test_replies_to_a_pipelined_burst_leave_in_one_write():
    """The fast path keeps the cork: a burst answered at once is one write."""
    from tests.test_smtp_protocol import RecordingTransport

    t = RecordingTransport()
    s = Session(PlainSenderAgent(), transport=t).greeted()
    t.take()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\nRCPT TO:<y@mx.test>\r\n"
           "DATA\r\n")
    writes = t.take()
    assert len(writes) == 1 and writes[0].count(b"\r\n") == 4


# --------------------------------------------------------------------------- submission


def test_credential_ended_during_held_rcpt_then_fast_path_commands_do_not_run():
    """The key dies while a RCPT is in flight, with DATA and a body pipelined: the
    RCPT's reply, then 421, and nothing pipelined is run or delivered."""
    from agentpost.smtp.policy import ListenerPolicy

    class Account:
        closed = False

        def close(self) -> None:
            self.closed = True

    agent = RecordingAgent()
    agent.hold_recipients = True
    policy = ListenerPolicy("submission", offers_auth=True, requires_auth=True)
    s = Session(agent, policy=policy, implicit_tls=True).greeted()
    account = Account()
    s.protocol.session.principal = account
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n" + MSG)
    assert starts(s.codes(), "250 2.1.0")
    s.protocol._credential_ended("API key revoked")
    agent.release_recipients()
    codes = s.codes()
    assert starts(codes, "250 2.1.5", "421 4.7.0"), codes
    assert s.closed and agent.deliveries == [] and account.closed


def test_credential_ended_inside_a_synchronous_check_sends_nothing_after_421():
    """An agent that ends the session from inside its (synchronous) recipient check:
    421 is the last thing written; the RCPT's 250 and the pipelined DATA never are."""
    from agentpost.smtp.policy import ListenerPolicy

    class Ending(RecordingAgent):
        protocol: Any = None

        def check_recipient(self, session: Any, mail_from: str, rcpt: str) -> Any:
            self.protocol._credential_ended("API key revoked")
            return defer.succeed("token")

    agent = Ending()
    policy = ListenerPolicy("submission", offers_auth=True, requires_auth=True)
    s = Session(agent, policy=policy, implicit_tls=True).greeted()
    agent.protocol = s.protocol
    s.protocol.session.principal = object()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n")
    codes = s.codes()
    assert starts(codes, "250 2.1.0", "421 4.7.0"), codes
    assert s.closed and s.protocol._txn is None


# --------------------------------------------------------------------------- route settle

async def _org_inbox(server, name: str) -> tuple[str, dict]:
    _, key = await server.new_org(name)
    resp = await server.api.post("/api/v1/inboxes", {"username": name}, key=key)
    assert resp.status == 201, resp
    return key, resp.json


def _rule(inbox: dict, value: str) -> dict:
    return {"direction": "receive", "action": "block", "match_type": "domain",
            "value": value, "inbox_id": inbox["id"]}


class _NoticeFirstDB:
    """The store's Database, except that a transaction's result is handed back only
    once the route notice of its COMMIT has been dispatched by this process: the order
    in which the reactor reads two sockets that became readable together (the notice
    is signalled at COMMIT, before the committing backend answers). Everything else is
    the real database."""

    def __init__(self, db: Any, cache: Any) -> None:
        self._db = db
        self._cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def run_interaction(self, desc: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        cache = self._cache
        before = cache.generation

        async def run() -> Any:
            result = await self._db.run_interaction(desc, fn, *args, **kwargs)
            assert await _until(lambda: cache._listener.poll() and cache.generation != before,
                                timeout=5)
            return result
        return defer.Deferred.fromCoroutine(run())


@pytest_twisted.ensureDeferred
async def test_a_notice_read_before_settle_does_not_cost_the_timeout(server):
    """A receive rule created, then deleted, then an inbox deleted through the API, each
    COMMIT's notice dispatched before the transaction's result reached the API (as the
    reactor does whenever the LISTEN socket is read first; without any help it happened
    to 1 in 6 to 1 in 2 of 30 sequential rule changes here). Each answers promptly, and
    its change is in force at the next RCPT."""
    key, inbox = await _org_inbox(server, "hsf-order")
    cache = server.core.route_cache
    assert await _until(lambda: cache.usable)
    filters, inboxes = server.core.filters, server.core.inboxes
    filters._db = _NoticeFirstDB(filters._db, cache)
    inboxes._db = _NoticeFirstDB(inboxes._db, cache)
    try:
        created: dict = {}

        async def create() -> None:
            r = await server.api.post("/api/v1/filter-rules", _rule(inbox, "example.org"),
                                      key=key)
            assert r.status == 201, r
            created.update(r.json)

        async def delete_rule() -> None:
            r = await server.api.delete(f"/api/v1/filter-rules/{created['id']}", key=key)
            assert r.status == 204, r

        async def delete_inbox() -> None:
            r = await server.api.delete(f"/api/v1/inboxes/{inbox['id']}", key=key)
            assert r.status in (200, 204), r

        timeouts = cache.waiters.timeouts
        await create()
        assert await _rcpt(server.mx_port, inbox["email"]) == 550
        await delete_rule()
        assert await _rcpt(server.mx_port, inbox["email"]) == 250
        await delete_inbox()
        assert await _rcpt(server.mx_port, inbox["email"]) == 550
    finally:
        filters._db = filters._db._db
        inboxes._db = inboxes._db._db
    # Each wait was ended by the notice counted since its ticket, none by its timeout
    # (before the tickets, each of the three ran into the 5 s timeout).
    assert cache.waiters.timeouts == timeouts


@pytest_twisted.ensureDeferred
async def test_settle_is_bounded_when_no_notice_ever_comes(server):
    """A settle whose notice never arrives (nothing was committed) fires after its
    timeout plus the grace: it cannot hang the API, and leaves nothing waiting after
    the next notice."""
    cache = server.core.route_cache
    assert await _until(lambda: cache.usable)
    timeouts = cache.waiters.timeouts
    await cache.settle(cache.ticket(), timeout_s=0.3)
    assert cache.waiters.timeouts == timeouts + 1  # ended by its timeout, not a notice


@pytest_twisted.ensureDeferred
async def test_settle_in_flight_is_released_when_the_listen_link_dies(server, db_dsn):
    """The LISTEN link is killed while an API call waits for its notice: the wait ends
    with the link (the cache is off then), well before the timeout."""
    from tests.test_key_cache import _commit

    cache = server.core.route_cache
    assert await _until(lambda: cache.usable)
    timeouts = cache.waiters.timeouts
    waiting = cache.settle(cache.ticket(), timeout_s=30)
    await _commit(db_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE pid = %s", (server.core.notify_link.backend_pid,))
    finished: list[bool] = []
    waiting.addCallback(lambda _: finished.append(True))
    assert await _until(lambda: bool(finished), timeout=15), "settle still waiting"
    assert cache.waiters.timeouts == timeouts  # released with the link, not timed out
    assert await _until(lambda: cache.usable, timeout=30)


@pytest_twisted.ensureDeferred
async def test_api_rule_change_with_the_link_down_is_prompt_and_in_force(server, db_dsn):
    """With the LISTEN link gone, a rule change does not wait for a notice that cannot
    come (bounded), and RCPT (reading the database) sees it at once."""
    from tests.test_key_cache import _commit

    key, inbox = await _org_inbox(server, "hsf-down")
    cache = server.core.route_cache
    assert await _until(lambda: cache.usable)
    await _commit(db_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE pid = %s", (server.core.notify_link.backend_pid,))
    assert await _until(lambda: not cache.usable, timeout=10)

    async def create() -> None:
        r = await server.api.post("/api/v1/filter-rules", _rule(inbox, "example.org"),
                                  key=key)
        assert r.status == 201, r

    timeouts = cache.waiters.timeouts
    await create()
    assert cache.waiters.timeouts == timeouts  # nothing to wait for: the cache is off
    assert await _rcpt(server.mx_port, inbox["email"]) == 550


@pytest_twisted.ensureDeferred
async def test_concurrent_rule_changes_of_many_tenants_all_answer_and_take_effect(server):
    """Twelve tenants change a receive rule at the same time while one churns: every
    call answers, ended by a notice (none by the timeout), and each block is in force at
    its next RCPT."""
    cache = server.core.route_cache
    assert await _until(lambda: cache.usable)
    tenants = [await _org_inbox(server, f"hsf-c{i}") for i in range(12)]
    churn_key, churn_inbox = await _org_inbox(server, "hsf-churn")
    stop: list[bool] = []

    async def churn() -> None:
        i = 0
        while not stop:
            r = await server.api.post("/api/v1/filter-rules",
                                      _rule(churn_inbox, f"c{i}.example"), key=churn_key)
            assert r.status == 201
            await server.api.delete(f"/api/v1/filter-rules/{r.json['id']}", key=churn_key)
            i += 1

    churning = defer.ensureDeferred(churn())

    async def change(key: str, inbox: dict) -> int:
        r = await server.api.post("/api/v1/filter-rules", _rule(inbox, "example.org"),
                                  key=key)
        assert r.status == 201, r
        return r.status

    timeouts = cache.waiters.timeouts
    try:
        answered = await defer.gatherResults(
            [defer.ensureDeferred(change(k, ib)) for k, ib in tenants], consumeErrors=True)
    finally:
        stop.append(True)
        await churning
    assert answered == [201] * len(tenants)
    assert cache.waiters.timeouts == timeouts
    codes = await defer.gatherResults(
        [defer.ensureDeferred(_rcpt(server.mx_port, ib["email"])) for _, ib in tenants])
    assert codes == [550] * len(tenants)


# --------------------------------------------------------------------------- real MX


def _pipelined_session(port: int, steps: list[tuple[bytes, int]]) -> list[list[str]]:
    """Raw socket: the greeting and EHLO, then each chunk in one write, reading as many
    replies as the step says. The reply lines of each step."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    buffer = b""

    def replies_(count: int) -> list[str]:
        nonlocal buffer
        out: list[str] = []
        while len(out) < count:
            while b"\r\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError(f"closed after {out!r}")
                buffer += data
            line, buffer = buffer.split(b"\r\n", 1)
            text = line.decode("ascii")
            if text[3:4] == " ":
                out.append(text)
        return out

    try:
        replies_(1)
        sock.sendall(b"EHLO client.test\r\n")
        replies_(1)
        result = []
        for chunk, count in steps:
            sock.sendall(chunk)
            result.append(replies_(count))
        return result
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_real_mx_pipelined_bursts_with_cached_and_unknown_routes(server):
    """Against the running MX: a cached route (RCPT answered at once), an unknown one
    (read from the database) and a duplicate in one burst, a message, then RSET and a
    second transaction pipelined behind the first body, and QUIT. Replies in order;
    exactly the two accepted messages stored, each once; no descriptor left behind."""
    key, inbox = await _org_inbox(server, "hsf-pipe")
    address = inbox["email"]
    domain = address.split("@", 1)[1]
    assert await _until(lambda: server.core.route_cache.usable)
    assert await _rcpt(server.mx_port, address) == 250
    assert await _rcpt(server.mx_port, address) == 250  # cached now

    def body(subject: str) -> bytes:
        return (f"From: a@example.org\r\nTo: {address}\r\nSubject: {subject}\r\n"
                f"Message-ID: <{subject}@example.org>\r\n\r\nhello\r\n.\r\n").encode()

    steps = [
        (f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{address}>\r\nRCPT TO:<nobody-hsf@{domain}>"
         f"\r\nRCPT TO:<{address}>\r\nDATA\r\n".encode(), 5),
        (body("hsf-one") + f"RSET\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<nobody2@{domain}>"
         f"\r\nRSET\r\nRCPT TO:<{address}>\r\nMAIL FROM:<c@example.org>\r\n"
         f"RCPT TO:<{address}>\r\nDATA\r\n".encode(), 9),
        (body("hsf-two") + b"QUIT\r\n", 2),
    ]
    await threads.deferToThread(_pipelined_session, server.mx_port, steps)  # warm-up
    before = _fds()
    got = await threads.deferToThread(_pipelined_session, server.mx_port, steps)
    codes = [[line[:3] for line in step] for step in got]
    assert codes[0] == ["250", "250", "550", "250", "354"], got
    assert codes[1] == ["250", "250", "250", "550", "250", "503", "250", "250", "354"], got
    assert codes[2] == ["250", "221"], got
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    subjects = sorted(m["subject"] for m in listed.json["data"])
    assert subjects == ["hsf-one", "hsf-one", "hsf-two", "hsf-two"]
    assert await _until(lambda: _fds() <= before, timeout=5), (_fds(), before)



class _KeyNoticeFirstDB(_NoticeFirstDB):
    """As :class:`_NoticeFirstDB` for the key cache: the result comes back once the
    notice naming ``key_id`` has been dispatched."""

    def __init__(self, db: Any, cache: Any, key_id: str) -> None:
        super().__init__(db, cache)
        self.seen: list[str] = []
        original = cache._noticed

        def noticed(payload: str) -> None:
            self.seen.append(payload)
            original(payload)
        cache._noticed = noticed
        self._key_id = key_id

    def run_interaction(self, desc: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def run() -> Any:
            result = await self._db.run_interaction(desc, fn, *args, **kwargs)
            assert await _until(lambda: self._cache._drain() and self._key_id in self.seen,
                                timeout=5)
            return result
        return defer.Deferred.fromCoroutine(run())


@pytest_twisted.ensureDeferred
async def test_same_class_key_revocation_whose_notice_came_first_answers_promptly(server):
    """The other door of the same pattern (auth.key_cache, api_keys.revoke): without
    help, 4 of 8 sequential revocations here took 5.03 s instead of 0.03 s."""
    _, owner = await server.new_org("hsf-keys")
    cache = server.core.key_cache
    assert await _until(lambda: cache.usable)
    created = await server.api.post("/api/v1/api-keys", {"name": "victim"}, key=owner)
    assert created.status == 201
    keys = server.core.api_keys
    keys._db = _KeyNoticeFirstDB(keys._db, cache, created.json["id"])
    try:
        timeouts = cache.waiters.timeouts
        revoked = await server.api.delete(f"/api/v1/api-keys/{created.json['id']}",
                                          key=owner)
    finally:
        keys._db = keys._db._db
        del cache._noticed
    assert revoked.status == 200
    assert (await server.api.get("/api/v1/inboxes",
                                 key=created.json["key"])).status == 401
    assert cache.waiters.timeouts == timeouts  # ended by its notice, not the timeout
