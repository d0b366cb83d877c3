"""The SMTP server protocol (RFC 5321) on a Twisted transport: an explicit state machine.

Why not ``twisted.mail.smtp.ESMTP``: see DESIGN.md §7.  In short, it offers AUTH in
cleartext, runs plaintext pipelined after STARTTLS inside the TLS session, answers a
permanent 550 when the database is down, runs body lines as commands when
validation is asynchronous, and after an over-long DATA line executes the rest of
the body as SMTP commands.  This module is built so that each of those cannot
happen:

- **One command at a time.**  Input is buffered; a command is parsed only when the
  previous one has been answered, however long the delivery agent takes.  Replies
  therefore come out in order (RFC 2920), those to a burst of pipelined commands
  in one send (:mod:`agentpost.cork`), and bytes after ``DATA`` are read as body
  only if ``DATA`` was actually accepted.  If the buffer grows past a bound
  while a command is in flight, the transport is paused.
- **Bodies are consumed to their real end.**  DATA ends only at ``CRLF.CRLF``;
  BDAT consumes exactly its announced octets.  Over-size messages and over-long
  lines are answered only after that end, never by falling back to command mode.
- **STARTTLS discards everything buffered after it** and resets all state
  including HELO (RFC 3207 §4.2), so nothing injected in cleartext survives.
- **Deadlines, not only idle timers** (:mod:`agentpost.smtp.deadlines`): a command
  line must be complete within its timeout however its bytes trickle in, a body must
  keep a minimum rate and end within its deadline, and a session ends after its total
  deadline; a close that does not complete (TLS close_notify unanswered) is aborted.
- **No permanent reply for a failure that is not permanent.**  Replies for domain
  errors come from the one table in :mod:`agentpost.smtp.replies`; anything
  unexpected is logged with an id and answered ``451 4.3.0``.

Message bodies are spooled to a :class:`tempfile.SpooledTemporaryFile` (memory up
to 1 MiB, then disk), prefixed with ``Return-Path:`` and ``Received:``, and handed
to :meth:`DeliveryAgent.deliver`; ``250`` is sent only after it returns.

What each verb does lives in :mod:`agentpost.smtp.commands` (mixed in here); this
module owns the connection: input loop, flow control, deadlines, output and spooling.

**What is counted against the size limit**: the message octets after
dot-unstuffing (DATA) or the chunk octets (BDAT), including every line's CRLF but
neither the terminating ``.CRLF`` nor the headers this server prepends.  A message
of exactly ``max_message_size_bytes`` is accepted; one octet more is ``552 5.3.4``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from agentpost.cork import Cork
from agentpost.listening import no_delay, send_direct
from agentpost.model import errors
from agentpost.smtp import replies
from agentpost.smtp.commands import SASLExchange, SMTPCommands
from agentpost.smtp.deadlines import Expiry, SessionDeadlines
from agentpost.smtp.interfaces import DeliveryAgent, SessionInfo
from agentpost.smtp.parser import CommandError, DataDecoder, parse_command
from agentpost.smtp.policy import ListenerPolicy
from agentpost.smtp.replies import Reply
from agentpost.smtp.session import (
    BODY_STATES,
    Chunk,
    Result,
    SMTPLimits,
    State,
    Transaction,
)

log = logging.getLogger(__name__)

__all__ = ["SMTPLimits", "SMTPServerProtocol", "State"]


@implementer(IHandshakeListener, IPushProducer)
class SMTPServerProtocol(SMTPCommands, Protocol):
    """One SMTP session.  Build it through :class:`agentpost.smtp.listener.SMTPFactory`.

    Arguments:
        agent: decides on senders and recipients and stores messages.
        hostname: our name, used in the greeting and the ``Received:`` header.
        clock: the reactor's time (``task.Clock`` in tests); every timer uses it.
        limits: sizes, counts and timeouts.
        tls_options: server TLS settings; STARTTLS is offered only if given.
        listener: ``"mx"`` here; ``"submission"`` when AUTH arrives.
        require_tls: refuse MAIL/RCPT/DATA/BDAT with ``530 5.7.0`` before TLS.
        policy: the listener's rules (:mod:`agentpost.smtp.policy`); when given it
            replaces ``listener`` and ``require_tls``.
        implicit_tls: the transport is already TLS (port 465-style listeners).
        spool_dir: where large bodies go; the system temp directory by default.
        on_close: called once when the connection is gone (connection accounting).
    """

    def __init__(
        self,
        agent: DeliveryAgent,
        *,
        hostname: str,
        clock: IReactorTime,
        limits: SMTPLimits | None = None,
        tls_options: Any = None,
        listener: str = "mx",
        require_tls: bool = False,
        implicit_tls: bool = False,
        spool_dir: str | None = None,
        on_close: Callable[[], None] | None = None,
        policy: ListenerPolicy | None = None,
    ) -> None:
        if policy is None:
            policy = ListenerPolicy(listener, require_tls=require_tls)
        self.policy = policy
        listener, require_tls = policy.name, policy.require_tls
        self.agent = agent
        self.hostname = hostname
        self.clock = clock
        self.limits = limits or SMTPLimits()
        self.tls_options = tls_options
        self.listener = listener
        self.require_tls = require_tls
        self.spool_dir = spool_dir
        self._on_close = on_close
        self.session_id = secrets.token_hex(4)
        self.session = SessionInfo(peer_host="", peer_port=0, listener=listener)
        self.state = State.GREETING
        self.tls_active = implicit_tls
        self._buffer = bytearray()
        self._busy = False  # a command is waiting for the delivery agent
        self._processing = False  # re-entrancy guard for _process
        self._paused = False  # we paused the transport's reading
        self._output_blocked = False  # the transport's write buffer is full
        self._discarding_line = False  # skipping the rest of an over-long command line
        self._errors = 0
        self._timer: Any = None  # the one timer: the earliest deadline of the phase
        self._abort_timer: Any = None  # hangs up if a close does not complete
        self._deadlines = SessionDeadlines(self.limits, clock.seconds())
        self._txn: Transaction | None = None
        self._decoder: DataDecoder | None = None
        self._out = Cork(self._emit)  # replies to pipelined commands leave together
        self._chunk: Chunk | None = None
        self._sasl: SASLExchange | None = None  # an AUTH exchange awaiting a response
        self._ending: str | None = None  # the key died while a command was in flight

    # ------------------------------------------------------------------ Twisted hooks

    def connectionMade(self) -> None:
        """Greet, and start the clock (the session deadline runs from here)."""
        no_delay(self.transport)
        peer = self.transport.getPeer()
        self.session.peer_host = str(getattr(peer, "host", "") or "")
        self.session.peer_port = int(getattr(peer, "port", 0) or 0)
        # As the transport's producer we hear when its write buffer is full, so a
        # client that pipelines commands but never reads replies stops being read.
        self.transport.registerProducer(self, True)
        self._write(Reply(220, None, f"{self.hostname} ESMTP AgentPost"))
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        """Queue the bytes, then process as much as the state machine allows."""
        if self.state is State.CLOSED:
            return
        self._buffer += data
        self._process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Drop timers and spooled data; tell the factory the slot is free."""
        self.state = State.CLOSED
        self._cancel_timer()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        self._buffer.clear()
        self._out.discard()
        if self._txn is not None:
            self._txn.discard()
            self._txn = None
        self._release_account()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def handshakeCompleted(self) -> None:
        """TLS is up (after STARTTLS or on an implicit-TLS port): record what was agreed."""
        try:
            connection = self.transport.getHandle()
            self.session.tls_version = connection.get_protocol_version_name()
            self.session.tls_cipher = connection.get_cipher_name()
        except Exception:  # a transport without pyOpenSSL details: keep going
            log.debug("smtp %s: could not read TLS parameters", self.session_id, exc_info=True)
        log.info("smtp %s: TLS established %s %s", self.session_id,
                 self.session.tls_version, self.session.tls_cipher)

    def pauseProducing(self) -> None:
        """The transport cannot take more output: stop executing commands until it can.

        Input keeps being buffered (and reading pauses past the bound, as while a
        command is in flight).  We must not simply stop reading here: a TLS layer
        holds our output during its handshake, and the handshake needs reading.
        """
        self._output_blocked = True

    def resumeProducing(self) -> None:
        """Output drained: carry on with the buffered commands."""
        self._output_blocked = False
        if self.state is not State.CLOSED:
            self._process()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the cleanup."""

    # ------------------------------------------------------------------ input loop

    def _process(self) -> None:
        """Consume buffered input until a command is in flight or input runs out."""
        if self._processing:
            return  # called from a reply fired synchronously inside the loop
        self._processing = True
        try:
            with self._out.batch():
                self._process_input()
        finally:
            self._processing = False
        if not self._busy:
            self._arm_timer()  # restart the clock for whatever we now wait for
        self._update_flow_control()

    def _process_input(self) -> None:
        """The loop of :meth:`_process`, its replies held by the caller."""
        try:
            while not self._busy and not self._output_blocked and self.state is not State.CLOSED:
                if self.state is State.DATA:
                    if not self._buffer:
                        break
                    self._consume_data()
                elif self.state is State.BDAT:
                    if not self._consume_bdat():
                        break
                elif not self._consume_command_line():
                    break
        except Exception as exc:
            # A bug in the input handling itself: the session state cannot be
            # trusted, so say goodbye instead of guessing.
            error_id = replies.new_error_id()
            log.error("smtp %s: internal error %s", self.session_id, error_id,
                      exc_info=(type(exc), exc, exc.__traceback__))
            self._send(replies.closing(self.hostname, "4.3.0",
                                       f"Internal error (ref {error_id}); closing connection"))

    def _consume_command_line(self) -> bool:
        """Run one complete command line; False when more input is needed."""
        limit = self.limits.max_command_line_bytes
        if self._discarding_line:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                self._buffer.clear()
                return False
            del self._buffer[: newline + 1]
            self._discarding_line = False
            return True
        newline = self._buffer.find(b"\n", 0, limit)
        if newline < 0:
            if len(self._buffer) >= limit:
                # Too long already: answer now and skip up to the line's end, so
                # the tail of the line is never read as a command.  The end may be
                # buffered already: then only the line goes, not what follows it (the
                # next command would be swallowed, and the client wait for its reply).
                reply = self._line_too_long_reply()
                end = self._buffer.find(b"\n", limit)
                if end >= 0:
                    del self._buffer[: end + 1]
                else:
                    self._buffer.clear()
                    self._discarding_line = True
                self._send(reply)
                return True
            return False
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        self._run_command(line)
        return True

    def _consume_data(self) -> None:
        assert self._decoder is not None
        data = bytes(self._buffer)
        self._buffer.clear()
        body, rest = self._decoder.feed(data)
        self._deadlines.body_received(len(data) - len(rest or b""), self.clock.seconds())
        if body:
            self._write_body(body)
        if rest is not None:
            self._buffer += rest  # pipelined commands after the end of data
            self._handle_result(self._end_of_data())

    def _consume_bdat(self) -> bool:
        chunk = self._chunk
        assert chunk is not None
        if chunk.remaining:
            if not self._buffer:
                return False
            take = min(chunk.remaining, len(self._buffer))
            data = bytes(self._buffer[:take])
            del self._buffer[:take]
            chunk.remaining -= take
            self._deadlines.body_received(take, self.clock.seconds())
            if chunk.verdict is None:
                self._write_body(data)
        if chunk.remaining == 0:
            self._handle_result(self._end_of_chunk())
        return True

    def _run_command(self, line: bytes) -> None:
        if self._sasl is not None:  # the line is an AUTH response, not a command
            try:
                sasl_result = self._sasl_line(line)
            except Exception as exc:
                self._sasl = None
                sasl_result = replies.reply_for_error(exc, context=self.session_id)
            self._handle_result(sasl_result)
            return
        try:
            command = parse_command(line)
        except CommandError as exc:
            self._send(exc.reply)
            return
        if command.verb not in self.VERBS:
            self._send(replies.UNRECOGNIZED)
            return
        handler = getattr(self, f"_cmd_{command.verb.lower()}")
        try:
            result = handler(command.args)
        except CommandError as exc:
            result = exc.reply
        except Exception as exc:
            result = replies.reply_for_error(exc, context=self.session_id)
        self._handle_result(result)

    def _handle_result(self, result: Result) -> None:
        """Send a reply now, or wait for a Deferred one while holding further input."""
        if result is None:
            return
        if isinstance(result, Reply):
            self._send(result)
            return
        if result.called and not result.paused and isinstance(result.result, Reply):
            # Answered already (a RCPT whose route was cached, a MAIL with nothing to
            # look up): its reply goes out as a plain one would, without holding input,
            # cancelling the command timer and arming it again (~10 us each).
            self._send(result.result)
            return
        self._busy = True
        self._cancel_timer()
        result.addErrback(self._reply_for_failure)
        result.addCallback(self._command_finished)
        result.addErrback(self._reply_failed)

    def _reply_for_failure(self, failure: Failure) -> Reply:
        exc = failure.value
        assert exc is not None  # an errback's Failure always carries its exception
        expected = isinstance(exc, errors.AgentPostError)
        return replies.reply_for_error(
            exc, context=self.session_id,
            traceback_text=None if expected else failure.getTraceback())

    def _command_finished(self, reply: Reply) -> None:
        self._busy = False
        if self.state is State.CLOSED:
            return
        with self._out.batch():  # with the replies of the commands pipelined after it
            self._send(reply)
            if self._ending is not None:
                self._send(replies.closing(self.hostname, "4.7.0", self._ending))
            # A deadline that passed while the agent worked ends the session now,
            # before any pipelined command runs (each of which could keep us busy again).
            self._arm_timer()
            self._process()

    def _reply_failed(self, failure: Failure) -> None:
        log.error("smtp %s: failed to send a reply: %s", self.session_id, failure.getTraceback())
        self._busy = False
        self._send(replies.closing(self.hostname, "4.3.0", "Internal error; closing connection"))

    # ------------------------------------------------------------------ output

    def _emit(self, data: bytes) -> None:
        send_direct(self.transport, data)

    def _write(self, reply: Reply) -> None:
        """Put a reply on the wire; the client's time for its next command starts now.
        Straight to the socket when nothing waits before it (listening.send_direct)."""
        self._out.write(reply.render())
        self._deadlines.replied(self.clock.seconds())

    def _send(self, reply: Reply) -> None:
        """Write a reply; enforce the error limit; close after any 421."""
        if self.state is State.CLOSED:
            return
        self._write(reply)
        if reply.code == 421:
            self._close()
            return
        if reply.is_error:
            self._errors += 1
            if self._errors >= self.limits.max_errors:
                self._write(replies.closing(self.hostname, "4.7.0",
                                            "Too many errors; closing connection"))
                self._close()

    def _credential_ended(self, reason: str) -> None:
        """The authenticated key was revoked, expired or narrowed: ``421 4.7.0`` and
        close -- now, or right after the reply of a command in flight."""
        if self.state is State.CLOSED:
            return
        log.info("smtp %s: ending the session: %s", self.session_id, reason)
        if self._busy:
            self._ending = reason
            return
        self._send(replies.closing(self.hostname, "4.7.0", reason))

    def _release_account(self) -> None:
        account, self.session.principal = self.session.principal, None
        if account is not None and hasattr(account, "close"):
            account.close()

    def _close(self) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._release_account()
        self._cancel_timer()
        self._buffer.clear()
        if self._txn is not None:
            self._txn.discard()
            self._txn = None
        self._out.flush()  # the last replies (221, 421) before the close
        # Unregister first: a paused streaming producer would keep Twisted from
        # completing loseConnection once the write buffer drains.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        # Over TLS, loseConnection waits for the peer's close_notify, and any close
        # waits for the peer to read what we wrote: neither may hold the slot forever.
        if self.limits.close_grace_s:
            self._abort_timer = self.clock.callLater(self.limits.close_grace_s, self._abort)

    def _abort(self) -> None:
        """The close did not complete within the grace period: drop the connection."""
        self._abort_timer = None
        log.info("smtp %s: close not completed; aborting the connection", self.session_id)
        self.transport.abortConnection()

    # ------------------------------------------------------------------ timers, flow

    def _arm_timer(self) -> None:
        """Keep one timer, at the earliest deadline of the current phase.

        It is off while the delivery agent works (the agent has its own deadline, and
        a reply must never be lost to a 421); a deadline that passed meanwhile
        fires as soon as that reply is out.
        """
        if self.state is State.CLOSED or self._busy:
            self._cancel_timer()
            return
        now = self.clock.seconds()
        in_body = self.state in BODY_STATES
        if in_body:
            self._deadlines.body_begins(now)
        expiry = self._deadlines.next(in_body)
        if expiry is None or expiry.at <= now:
            self._cancel_timer()
            if expiry is not None:
                self._timed_out(expiry)
            return
        timer = self._timer
        if timer is not None and timer.active():
            if expiry.at >= timer.getTime():
                # Moved, not replaced: pushing a timer later is O(1) for the reactor,
                # where a cancel and a new callLater churned its heap on every read.
                timer.args = (expiry,)
                timer.reset(expiry.at - now)
                return
            # Sooner (the body's deadline gives way to the command's): the reactor
            # would look for the timer in its whole heap, one step per timer of every
            # connection; a new timer costs a push.
            timer.cancel()
        self._timer = self.clock.callLater(expiry.at - now, self._timed_out, expiry)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self, expiry: Expiry) -> None:
        self._timer = None
        log.info("smtp %s: %s in state %s", self.session_id, expiry.reason, self.state.value)
        self._send(replies.closing(self.hostname, "4.4.2", expiry.text))

    def _update_flow_control(self) -> None:
        """Pause reading while input piles up unprocessed: behind a command in flight,
        or because the client does not read our replies.  Resume once it drains."""
        if self.state is State.CLOSED:
            return
        bound = self.limits.max_buffered_input_bytes
        stalled = self._busy or self._output_blocked
        if not self._paused and stalled and len(self._buffer) > bound:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and (not stalled or len(self._buffer) <= bound // 2):
            self._paused = False
            self.transport.resumeProducing()

    # ------------------------------------------------------------------ helpers

    def _agent_call(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> defer.Deferred:
        """Call the delivery agent (coroutine, Deferred or plain value) with a deadline.

        A call that answered at once (submission's MAIL check is in memory) gets no
        deadline: arming and cancelling a reactor timer for it was pure overhead."""
        deferred = defer.maybeDeferred(fn, *args)
        if not deferred.called:
            deferred.addTimeout(timeout_s, self.clock)
        return deferred

    def _reset_transaction(self) -> None:
        self._deadlines.body_ends()
        if self._txn is not None:
            self._txn.discard()
            self._txn = None
        self._decoder = None
        self._chunk = None
        if self.state in (State.MAIL, State.RCPT, State.DATA, State.BDAT):
            self.state = State.READY

    def _open_spool(self, txn: Transaction) -> None:
        """Start the spooled message with our Return-Path: and Received: headers."""
        txn.queue_id = secrets.token_hex(8).upper()  # named in the Received: field
        txn.open_spool(self._trace_headers(txn), self.limits.spool_memory_bytes,
                       self.spool_dir)

    def _write_body(self, data: bytes) -> None:
        if self._txn is not None:
            self._txn.add_body(data, self.limits.max_message_size_bytes)

    def _deliver(self, txn: Transaction) -> defer.Deferred[Reply]:
        """Hand the spooled message to the agent; 250 only once it has committed.
        Callbacks rather than a coroutine: one Deferred and one resumption less for
        every message (the agent's own call is one already)."""
        spool = txn.spool
        assert spool is not None
        txn.spool = None  # from here on this method's callbacks own (and close) the file
        try:
            spool.flush()  # a full disk under a large spool: a 451 for this message
            spool.seek(0)
        except Exception:
            spool.close()
            return defer.fail()
        handed = self._agent_call(
            self.agent.deliver, self.session, txn.envelope, spool,
            txn.header_bytes + txn.body_bytes, timeout_s=self.limits.deliver_timeout_s)

        def closed(result: Any) -> Any:
            spool.close()
            return result

        return handed.addBoth(closed).addCallback(self._delivered, txn)

    def _delivered(self, queued_as: object, txn: Transaction) -> Reply:
        log.info("smtp %s: delivered %s from=<%s> rcpts=%d size=%d", self.session_id,
                 txn.queue_id, txn.envelope.mail_from, len(txn.envelope.recipients),
                 txn.body_bytes)
        if isinstance(queued_as, str):  # submission: the stored message's id
            return Reply(250, "2.0.0", f"Ok: queued as {queued_as}")
        return Reply(250, "2.0.0", f"OK {txn.queue_id}")

    def _finish_message(self, txn: Transaction, line_too_long: bool) -> Result:
        """The body is complete: refuse it, or deliver it."""
        self._deadlines.body_ends()
        self._txn = None
        self._decoder = None
        self.state = State.READY
        if txn.too_large:
            txn.discard()
            return replies.TOO_LARGE
        if line_too_long:
            txn.discard()
            return replies.LINE_TOO_LONG
        return self._deliver(txn)

    def _end_of_data(self) -> Result:
        assert self._txn is not None and self._decoder is not None
        return self._finish_message(self._txn, self._decoder.line_too_long)

    def _end_of_chunk(self) -> Result:
        chunk = self._chunk
        assert chunk is not None
        self._chunk = None
        if chunk.verdict is not None:
            self.state = chunk.resume_state
            if self._txn is None or not self._txn.chunked:
                self._deadlines.body_ends()  # octets of no transaction's body
            return chunk.verdict
        txn = self._txn
        assert txn is not None
        self.state = State.RCPT
        if txn.too_large:
            # RFC 3030 §2: a failed chunk fails the transaction; later chunks get 503.
            self._reset_transaction()
            return replies.TOO_LARGE
        if not chunk.last:
            return Reply(250, "2.0.0", f"{chunk.size} octets received")
        return self._finish_message(txn, line_too_long=False)
