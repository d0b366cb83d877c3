"""Slow clients cannot hold an SMTP session: deadlines, the minimum data rate, the close.

Transcripts on StringTransport + task.Clock: bytes trickle in on a fake clock and the
session must end with ``421 4.4.2``.  One real-socket test shows a TLS peer that never
answers close_notify is disconnected anyway, and one that the [smtp] settings reach
the MX.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from agentpost.smtp.deadlines import SessionDeadlines
from agentpost.smtp.listener import SMTPFactory, listen_smtp
from agentpost.smtp.server import SMTPLimits
from agentpost.tls import server_tls_options
from tests.conftest import _DEV_TLS, make_config, start_server
from tests.test_smtp_protocol import RecordingAgent, Session, starts


def _trickle(s: Session, data: bytes, every_s: float, until_closed_s: float) -> float:
    """Send ``data`` one byte every ``every_s``; return when the session closed."""
    start = s.clock.seconds()
    for byte in data:
        if s.closed or s.clock.seconds() - start > until_closed_s:
            break
        s.send(bytes([byte]))
        s.clock.advance(every_s)
    return s.clock.seconds() - start


def test_a_command_line_trickled_byte_by_byte_times_out():
    """One byte every 20 s never completes a command: 421 4.4.2 within the command
    timeout of our last reply (an idle timer reset by every byte never fired)."""
    s = Session(limits=SMTPLimits(command_timeout_s=300)).greeted()
    elapsed = _trickle(s, b"NOOP" * 100, every_s=20, until_closed_s=2000)
    assert s.closed and elapsed <= 320
    assert starts(s.codes(), "421 4.4.2")


def test_complete_commands_restart_the_command_clock():
    """A client that answers within the timeout is not cut off by it."""
    s = Session(limits=SMTPLimits(command_timeout_s=300, session_deadline_s=0)).greeted()
    for _ in range(10):
        s.clock.advance(250)
        s.send("NO")
        s.clock.advance(40)
        s.send("OP\r\n")
    assert not s.closed
    assert all(c.startswith("250") for c in s.codes())


def test_data_trickle_below_the_minimum_rate_is_cut_off():
    """In DATA, one byte every 20 s (far below 500 B/s) ends after the grace period,
    although every byte arrives well within the 180 s block timeout."""
    limits = SMTPLimits(min_data_rate_bytes_per_s=500, min_data_rate_grace_s=60)
    s = Session(limits=limits).ready_for_data()
    s.send("DATA\r\n")
    assert starts(s.codes(), "354")
    elapsed = _trickle(s, b"Subject: slow\r\n\r\n" + b"x" * 1000, every_s=20,
                       until_closed_s=10_000)
    assert s.closed and elapsed <= 80
    [reply] = s.codes()
    assert reply.startswith("421 4.4.2") and "too slow" in reply
    assert s.agent.deliveries == []


def test_a_body_at_a_good_rate_is_delivered():
    """1000 B every second for two minutes: above the rate, inside the deadline."""
    s = Session().ready_for_data()
    s.send("DATA\r\n")
    for _ in range(120):
        s.send(b"y" * 998 + b"\r\n")
        s.clock.advance(1)
    s.send(".\r\n")
    assert starts(s.codes(), "354", "250 2.0.0")
    assert len(s.agent.deliveries) == 1


def test_the_data_deadline_ends_a_body_that_keeps_the_rate_but_never_ends():
    """1000 B/s satisfies the rate, but one message may take data_deadline_s at most."""
    limits = SMTPLimits(data_deadline_s=300, session_deadline_s=0)
    s = Session(limits=limits).ready_for_data()
    s.send("DATA\r\n")
    s.codes()
    seconds = 0
    while not s.closed and seconds < 1000:
        s.send(b"z" * 998 + b"\r\n")
        s.clock.advance(1)
        seconds += 1
    assert s.closed and seconds == 300
    [reply] = s.codes()
    assert reply.startswith("421 4.4.2") and "time limit" in reply


def test_a_bdat_chunk_trickled_byte_by_byte_is_cut_off():
    """The same rate applies to BDAT octets."""
    limits = SMTPLimits(min_data_rate_bytes_per_s=500, min_data_rate_grace_s=30)
    s = Session(limits=limits).ready_for_data()
    s.send("BDAT 100000 LAST\r\n")
    elapsed = _trickle(s, b"b" * 1000, every_s=5, until_closed_s=10_000)
    assert s.closed and elapsed <= 40
    assert starts(s.codes(), "421 4.4.2")


def test_the_session_deadline_ends_a_session_of_timely_noops():
    """NOOP every 200 s is within every per-command timeout, but not forever."""
    s = Session(limits=SMTPLimits(session_deadline_s=600)).greeted()
    for _ in range(10):
        if s.closed:
            break
        s.clock.advance(200)
        s.send("NOOP\r\n")
    assert s.closed and s.clock.seconds() - 1_700_000_000 <= 600
    codes = s.codes()
    assert codes[-1].startswith("421 4.4.2") and "session time limit" in codes[-1]


def test_the_session_deadline_waits_for_a_delivery_in_flight():
    """A deadline passing during deliver never costs the client its 250: the reply
    goes out first, then 421."""
    agent = RecordingAgent()
    agent.hold_deliver = True
    s = Session(agent, limits=SMTPLimits(session_deadline_s=300)).ready_for_data()
    s.send("DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    s.clock.advance(400)  # past the session deadline, within the agent's 540 s
    assert not s.closed
    agent.hold_deliver = False
    agent.held_deliveries[0].callback(None)
    assert starts(s.codes(), "354", "250 2.0.0", "421 4.4.2")
    assert s.closed and len(agent.deliveries) == 1


def test_a_close_the_peer_does_not_complete_is_aborted_after_the_grace():
    """After QUIT (or any 421), a transport still open after close_grace_s is aborted;
    one that closes in time is not, and no timer outlives it."""
    s = Session(limits=SMTPLimits(close_grace_s=10)).greeted()
    aborted: list[bool] = []
    s.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    s.send("QUIT\r\n")
    assert s.closed and not aborted
    s.clock.advance(10)
    assert aborted == [True]

    t = Session(limits=SMTPLimits(close_grace_s=10))
    t.send("QUIT\r\n")
    t.protocol.connectionLost(None)
    assert t.clock.getDelayedCalls() == []


def test_zero_disables_the_deadlines_and_the_rate():
    """0 means no session deadline, no data deadline and no minimum rate."""
    limits = SMTPLimits(session_deadline_s=0, data_deadline_s=0, min_data_rate_bytes_per_s=0)
    deadlines = SessionDeadlines(limits, now=0.0)
    deadlines.body_begins(0.0)
    assert deadlines.next(in_body=True).reason == "data block timeout"
    assert deadlines.next(in_body=False).reason == "command timeout"


def test_body_octets_earn_time_at_the_minimum_rate():
    """Postfix's model: grace plus bytes / rate, never beyond the data deadline."""
    limits = SMTPLimits(min_data_rate_bytes_per_s=500, min_data_rate_grace_s=60,
                        data_deadline_s=300, data_block_timeout_s=1000,
                        session_deadline_s=0)
    deadlines = SessionDeadlines(limits, now=0.0)
    deadlines.body_begins(10.0)
    assert deadlines.next(in_body=True).at == 70.0
    deadlines.body_received(5000, 20.0)
    assert deadlines.next(in_body=True).at == 80.0
    deadlines.body_received(500_000, 30.0)
    assert deadlines.next(in_body=True).at == 310.0
    deadlines.body_ends()
    deadlines.replied(40.0)
    assert deadlines.next(in_body=False).at == 340.0


def _reference_next(d: SessionDeadlines, in_body: bool) -> tuple[float, str, str] | None:
    """The earliest deadline as first written: every candidate made, then min() (the
    first of equal ones wins). ``next`` now compares plain numbers; it must agree."""
    limits = d.limits
    candidates = []
    if d.session_ends is not None:
        candidates.append((d.session_ends, "session deadline",
                           "Error: session time limit exceeded"))
    if in_body:
        started = d.body_started if d.body_started is not None else d.last_body_at
        candidates.append((d.last_body_at + limits.data_block_timeout_s,
                           "data block timeout", "Error: timeout exceeded"))
        if limits.data_deadline_s:
            candidates.append((started + limits.data_deadline_s, "data deadline",
                               "Error: message transfer time limit exceeded"))
        if limits.min_data_rate_bytes_per_s:
            candidates.append((started + limits.min_data_rate_grace_s
                               + d.body_bytes / limits.min_data_rate_bytes_per_s,
                               "minimum data rate", "Error: data transfer too slow"))
    else:
        candidates.append((d.command_due, "command timeout", "Error: timeout exceeded"))
    return min(candidates, key=lambda c: c[0]) if candidates else None


def test_the_earliest_deadline_agrees_with_the_reference_on_random_sessions():
    """Ties included: values are drawn from a few round numbers so they often meet."""
    import random

    rng = random.Random(12)
    pick = [0, 0, 10, 60, 100, 300]
    for _ in range(3000):
        limits = SMTPLimits(session_deadline_s=rng.choice(pick),
                            command_timeout_s=rng.choice(pick[2:]),
                            data_block_timeout_s=rng.choice(pick[2:]),
                            data_deadline_s=rng.choice(pick),
                            min_data_rate_bytes_per_s=rng.choice([0, 1, 500]),
                            min_data_rate_grace_s=rng.choice(pick))
        d = SessionDeadlines(limits, now=float(rng.choice(pick)))
        d.replied(float(rng.choice(pick)))
        if rng.random() < 0.7:
            d.body_begins(float(rng.choice(pick)))
            d.body_received(rng.choice([0, 500, 5000, 30_000]), float(rng.choice(pick)))
        for in_body in (False, True):
            got = d.next(in_body)
            expected = _reference_next(d, in_body)
            assert (None if got is None else (got.at, got.reason, got.text)) == expected


# --------------------------------------------------------------------------- real sockets


def _quit_over_tls_and_stay_silent(port: int, answered: threading.Event) -> bool:
    """STARTTLS, QUIT, then never send close_notify: whether the server closed TCP (EOF
    or a reset) while the client waited (at most 8 s: a bound on the wait only).

    ``answered`` is set once the 221 has been read, so the test advances the clock
    only then: an abort that raced the read would reset the socket before the reply
    reached the client and fail the test for the wrong reason."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220 ")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ssl.create_default_context(cafile=_DEV_TLS["ca"]).wrap_bio(
            incoming, outgoing, server_hostname="localhost")
        _pump_handshake(sock, tls, incoming, outgoing)
        tls.write(b"QUIT\r\n")
        sock.sendall(outgoing.read())
        plain = b""
        while b"221 " not in plain:
            incoming.write(sock.recv(65536))
            try:
                plain += tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        answered.set()
        sock.settimeout(8)
        try:
            while sock.recv(65536):  # the server's close_notify, then EOF or a reset
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True
    finally:
        sock.close()


def _pump_handshake(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                    outgoing: ssl.MemoryBIO) -> None:
    while True:
        try:
            tls.do_handshake()
            sock.sendall(outgoing.read())
            return
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))


@pytest_twisted.ensureDeferred
async def test_quit_over_tls_closes_tcp_even_without_the_peers_close_notify():
    """A TLS client that never answers close_notify does not keep the connection: it
    is held until the close grace passes on the session clock (a task.Clock), then TCP
    is closed."""
    options = server_tls_options(_DEV_TLS["cert"], _DEV_TLS["key"])
    clock = task.Clock()
    clock.advance(reactor.seconds())
    factory = SMTPFactory(RecordingAgent(), hostname="localhost", clock=clock,
                          tls_options=options, limits=SMTPLimits(close_grace_s=1))
    port = await listen_smtp(reactor, factory, "127.0.0.1", 0)
    try:
        answered = threading.Event()
        client = deferToThread(_quit_over_tls_and_stay_silent, port.getHost().port,
                               answered)
        for _ in range(1000):  # until the client read the 221 and the close is under way
            if client.called or (answered.is_set() and any(
                    c.getTime() - clock.seconds() == pytest.approx(1)
                    for c in clock.getDelayedCalls())):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert not client.called, "closed before the grace passed (or the client failed)"
        [abort] = clock.getDelayedCalls()  # the close grace, and no other timer
        assert factory.connections == 1  # the silent peer still holds its slot
        clock.advance(0.5)
        assert abort.active() and factory.connections == 1
        clock.advance(abort.getTime() - clock.seconds())
        assert await client, "the server never closed TCP after the grace"
        assert factory.connections == 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_smtp_config_reaches_the_mx_limits(db_dsn: str, openapi_checker: Any):
    """[smtp] command_timeout, session_deadline, data_deadline, min_data_rate(_grace)."""
    config = make_config(db_dsn, smtp={
        "command_timeout": "4m", "session_deadline": "20m", "data_deadline": "7m",
        "min_data_rate": "1KiB", "min_data_rate_grace": "45s"})
    server = await start_server(config, openapi_checker)
    try:
        limits = server.service.smtp_factories["mx"].limits
        assert (limits.command_timeout_s, limits.session_deadline_s, limits.data_deadline_s,
                limits.min_data_rate_bytes_per_s, limits.min_data_rate_grace_s) == (
            240, 1200, 420, 1024, 45)
    finally:
        await server.service.stopService()


def test_pipelined_commands_do_not_run_after_the_session_deadline():
    """Commands queued behind a slow recipient check are not run once the deadline
    passed: the held reply goes out, then 421, and the rest is never executed."""
    agent = RecordingAgent()
    agent.hold_recipients = True
    s = Session(agent, limits=SMTPLimits(session_deadline_s=300)).greeted()
    s.clock.advance(100)
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r1@mx.test>\r\nRCPT TO:<r2@mx.test>\r\n")
    s.clock.advance(220)  # within the agent's 240 s, past the session deadline
    agent.release_recipients()
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5", "421 4.4.2")
    assert agent.recipients == ["r1@mx.test"]
    assert s.closed
