"""The SMTP server protocol (RFC 5321) on a Twisted transport: an explicit state machine.

Why not ``twisted.mail.smtp.ESMTP``: see DESIGN.md §7.  In short, it offers AUTH in
cleartext, runs plaintext pipelined after STARTTLS inside the TLS session, answers a
permanent 550 when the database is down, runs body lines as commands when
validation is asynchronous, and after an over-long DATA line executes the rest of
the body as SMTP commands.  This module is built so that each of those cannot
happen:

- **One command at a time.**  Input is buffered; a command is parsed only when the
  previous one has been answered, however long the delivery agent takes.  Replies
  therefore come out in order (RFC 2920), and bytes after ``DATA`` are read as
  body only if ``DATA`` was actually accepted.  If the buffer grows past a bound
  while a command is in flight, the transport is paused.
- **Bodies are consumed to their real end.**  DATA ends only at ``CRLF.CRLF``;
  BDAT consumes exactly its announced octets.  Over-size messages and over-long
  lines are answered only after that end, never by falling back to command mode.
- **STARTTLS discards everything buffered after it** and resets all state
  including HELO (RFC 3207 §4.2), so nothing injected in cleartext survives.
- **No permanent reply for a failure that is not permanent.**  Replies for domain
  errors come from the one table in :mod:`agentpost.smtp.replies`; anything
  unexpected is logged with an id and answered ``451 4.3.0``.

Message bodies are spooled to a :class:`tempfile.SpooledTemporaryFile` (memory up
to 1 MiB, then disk), prefixed with ``Return-Path:`` and ``Received:``, and handed
to :meth:`DeliveryAgent.deliver`; ``250`` is sent only after it returns.

**What is counted against the size limit**: the message octets after
dot-unstuffing (DATA) or the chunk octets (BDAT), including every line's CRLF but
neither the terminating ``.CRLF`` nor the headers this server prepends.  A message
of exactly ``max_message_size_bytes`` is accepted; one octet more is ``552 5.3.4``.
"""

from __future__ import annotations

import email.utils
import enum
import ipaddress
import logging
import re
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.interfaces import (
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from agentpost.listening import no_delay
from agentpost.model import errors
from agentpost.smtp import replies
from agentpost.smtp.interfaces import DeliveryAgent, Envelope, SessionInfo
from agentpost.smtp.parser import (
    MAX_COMMAND_LINE_BYTES,
    MAX_DATA_LINE_BYTES,
    CommandError,
    DataDecoder,
    MailParams,
    parse_bdat,
    parse_command,
    parse_mail_from,
    parse_rcpt_to,
    validate_mail_params,
    validate_rcpt_params,
)
from agentpost.smtp.replies import Reply

log = logging.getLogger(__name__)

__all__ = ["SMTPLimits", "SMTPServerProtocol", "State"]


@dataclass(frozen=True)
class SMTPLimits:
    """Per-session limits.  Timeouts follow RFC 5321 §4.5.3.2.

    The server waits ``command_timeout_s`` (§4.5.3.2.7: at least 5 minutes) for the
    next command and ``data_block_timeout_s`` (§4.5.3.2.5: 3 minutes) for each
    block of a message body; on expiry it answers ``421 4.4.2`` and closes.  The
    delivery agent gets less time than the client waits for our reply (5 minutes
    for MAIL/RCPT, 10 for the end of data, §4.5.3.2.2-6) so a hung dependency
    becomes a ``451`` the client sees, not a client-side timeout.
    """

    max_message_size_bytes: int = 10_485_760
    max_recipients: int = 100
    max_errors: int = 10
    command_timeout_s: float = 300.0
    data_block_timeout_s: float = 180.0
    check_timeout_s: float = 240.0
    deliver_timeout_s: float = 540.0
    #: While a command is in flight, pause reading once this much input is queued.
    max_buffered_input_bytes: int = 256 * 1024
    max_command_line_bytes: int = MAX_COMMAND_LINE_BYTES
    max_data_line_bytes: int = MAX_DATA_LINE_BYTES
    #: Bodies up to this size stay in memory while spooled; larger ones go to disk.
    spool_memory_bytes: int = 1024 * 1024


class State(enum.Enum):
    """Where the session is.  Transitions are made only by the command handlers."""

    GREETING = "greeting"  # connected (or just after STARTTLS): EHLO/HELO needed
    READY = "ready"  # greeted, no mail transaction
    MAIL = "mail"  # MAIL FROM accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted (also between BDAT chunks)
    DATA = "data"  # reading a DATA body
    BDAT = "bdat"  # reading the octets of one BDAT chunk
    CLOSED = "closed"  # QUIT or 421 sent, or the connection is gone


@dataclass
class _Transaction:
    """One MAIL transaction in progress."""

    envelope: Envelope
    params: MailParams
    spool: IO[bytes] | None = None
    queue_id: str = ""
    header_bytes: int = 0
    body_bytes: int = 0
    too_large: bool = False
    chunked: bool = False  # BDAT has been used: DATA is no longer allowed

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


@dataclass
class _Chunk:
    """The BDAT chunk being read."""

    remaining: int
    size: int
    last: bool
    verdict: Reply | None  # an error to answer once the octets are consumed
    resume_state: State


_HELP = Reply(214, "2.0.0", [
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
    "See RFC 5321",
])
_HELO_TOKEN_RE = re.compile(r"^[A-Za-z0-9.\-_:\[\]]{1,255}$")
_Result = Reply | defer.Deferred | None


@implementer(IHandshakeListener, IPushProducer)
class SMTPServerProtocol(Protocol):
    """One SMTP session.  Build it through :class:`agentpost.smtp.listener.SMTPFactory`.

    Arguments:
        agent: decides on senders and recipients and stores messages.
        hostname: our name, used in the greeting and the ``Received:`` header.
        clock: the reactor's time (``task.Clock`` in tests); every timer uses it.
        limits: sizes, counts and timeouts.
        tls_options: server TLS settings; STARTTLS is offered only if given.
        listener: ``"mx"`` here; ``"submission"`` when AUTH arrives.
        require_tls: refuse MAIL/RCPT/DATA/BDAT with ``530 5.7.0`` before TLS.
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
    ) -> None:
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
        self._timer: Any = None
        self._txn: _Transaction | None = None
        self._decoder: DataDecoder | None = None
        self._chunk: _Chunk | None = None

    #: The commands we know; ``VERB`` is handled by method ``_cmd_verb``.  A
    #: subclass (submission) adds verbs by extending this set.
    VERBS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP",
                       "QUIT", "VRFY", "EXPN", "HELP", "AUTH", "STARTTLS"})

    # ------------------------------------------------------------------ Twisted hooks

    def connectionMade(self) -> None:
        """Greet, and start the idle timer."""
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
        self._buffer.clear()
        if self._txn is not None:
            self._txn.discard()
            self._txn = None
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
        finally:
            self._processing = False
        if not self._busy:
            self._arm_timer()  # restart the clock for whatever we now wait for
        self._update_flow_control()

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
                # the tail of the line is never read as a command.
                self._buffer.clear()
                self._discarding_line = True
                self._send(replies.LINE_TOO_LONG)
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
            if chunk.verdict is None:
                self._write_body(data)
        if chunk.remaining == 0:
            self._handle_result(self._end_of_chunk())
        return True

    def _run_command(self, line: bytes) -> None:
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

    def _handle_result(self, result: _Result) -> None:
        """Send a reply now, or wait for a Deferred one while holding further input."""
        if result is None:
            return
        if isinstance(result, Reply):
            self._send(result)
            return
        self._busy = True
        self._cancel_timer()
        result.addErrback(self._reply_for_failure)
        result.addCallback(self._command_finished)
        result.addErrback(self._reply_failed)

    def _reply_for_failure(self, failure: Failure) -> Reply:
        expected = isinstance(failure.value, errors.AgentPostError)
        return replies.reply_for_error(
            failure.value, context=self.session_id,
            traceback_text=None if expected else failure.getTraceback())

    def _command_finished(self, reply: Reply) -> None:
        self._busy = False
        if self.state is State.CLOSED:
            return
        self._send(reply)
        self._process()

    def _reply_failed(self, failure: Failure) -> None:
        log.error("smtp %s: failed to send a reply: %s", self.session_id, failure.getTraceback())
        self._busy = False
        self._send(replies.closing(self.hostname, "4.3.0", "Internal error; closing connection"))

    # ------------------------------------------------------------------ output

    def _write(self, reply: Reply) -> None:
        self.transport.write(reply.render())

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

    def _close(self) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._cancel_timer()
        self._buffer.clear()
        if self._txn is not None:
            self._txn.discard()
            self._txn = None
        # Unregister first: a paused streaming producer would keep Twisted from
        # completing loseConnection once the write buffer drains.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # ------------------------------------------------------------------ timers, flow

    def _arm_timer(self) -> None:
        self._cancel_timer()
        if self.state is State.CLOSED or self._busy:
            return
        in_body = self.state in (State.DATA, State.BDAT)
        timeout = self.limits.data_block_timeout_s if in_body else self.limits.command_timeout_s
        self._timer = self.clock.callLater(timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        log.info("smtp %s: timeout in state %s", self.session_id, self.state.value)
        self._send(replies.closing(self.hostname, "4.4.2", "Timeout; closing connection"))

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
        """Call the delivery agent (coroutine, Deferred or plain value) with a deadline."""
        deferred = defer.maybeDeferred(fn, *args)
        deferred.addTimeout(timeout_s, self.clock)
        return deferred

    def _reset_transaction(self) -> None:
        if self._txn is not None:
            self._txn.discard()
            self._txn = None
        self._decoder = None
        self._chunk = None
        if self.state in (State.MAIL, State.RCPT, State.DATA, State.BDAT):
            self.state = State.READY

    def _needs_greeting_or_tls(self) -> Reply | None:
        if self.state is State.GREETING:
            return replies.SEND_EHLO_FIRST
        if self.require_tls and not self.tls_active:
            return replies.TLS_REQUIRED
        return None

    def _open_spool(self, txn: _Transaction) -> None:
        """Start the spooled message with our Return-Path: and Received: headers."""
        txn.queue_id = secrets.token_hex(8).upper()
        spool = tempfile.SpooledTemporaryFile(  # closed by the transaction
            max_size=self.limits.spool_memory_bytes, dir=self.spool_dir)
        headers = self._trace_headers(txn)
        spool.write(headers)
        txn.spool = spool
        txn.header_bytes = len(headers)
        txn.body_bytes = 0

    def _write_body(self, data: bytes) -> None:
        """Count body octets against the limit; keep them only while under it."""
        txn = self._txn
        if txn is None:
            return
        txn.body_bytes += len(data)
        if txn.too_large:
            return
        if txn.body_bytes > self.limits.max_message_size_bytes:
            txn.too_large = True
            txn.discard()  # free the memory/disk now; the rest is only counted
            return
        assert txn.spool is not None
        txn.spool.write(data)

    def _with_protocol(self, txn: _Transaction) -> str:
        """RFC 3848 / RFC 6531 "with" keyword for the Received: header."""
        if txn.envelope.smtputf8:
            base = "UTF8SMTP"
        elif self.session.esmtp:
            base = "ESMTP"
        else:
            base = "SMTP"
        if base == "SMTP" and (self.tls_active or self.session.principal is not None):
            base = "ESMTP"  # RFC 3848 only defines the S/A suffixes on ESMTP
        suffix = ("S" if self.tls_active else "") + (
            "A" if self.session.principal is not None else "")
        return base + suffix

    def _trace_headers(self, txn: _Transaction) -> bytes:
        """``Return-Path:`` and ``Received:`` (RFC 5321 §4.4), CRLF-terminated."""
        helo = self.session.helo or ""
        helo_token = helo if _HELO_TOKEN_RE.match(helo) else "unknown"
        peer = self.session.peer_host
        try:
            literal = (f"[IPv6:{peer}]" if ipaddress.ip_address(peer).version == 6
                       else f"[{peer}]")
        except ValueError:
            literal = "[unknown]"
        lines = [f"Received: from {helo_token} ({literal})",
                 f"\tby {self.hostname} (AgentPost) with {self._with_protocol(txn)}"]
        if self.tls_active:
            version = self.session.tls_version or "TLS"
            cipher = self.session.tls_cipher or "unknown"
            lines.append(f"\t(version={version} cipher={cipher})")
        stamp = email.utils.format_datetime(datetime.fromtimestamp(self.clock.seconds(), UTC))
        if len(txn.envelope.recipient_addresses) == 1:
            lines.append(f"\tid {txn.queue_id}")
            lines.append(f"\tfor <{txn.envelope.recipient_addresses[0]}>; {stamp}")
        else:
            lines.append(f"\tid {txn.queue_id}; {stamp}")
        return_path = f"Return-Path: <{txn.envelope.mail_from}>"
        return ("\r\n".join([return_path, *lines]) + "\r\n").encode("utf-8")

    async def _deliver(self, txn: _Transaction) -> Reply:
        """Hand the spooled message to the agent; 250 only once it has committed."""
        spool = txn.spool
        assert spool is not None
        txn.spool = None  # from here on this coroutine owns (and closes) the file
        try:
            spool.flush()
            spool.seek(0)
            await self._agent_call(self.agent.deliver, self.session, txn.envelope, spool,
                                   txn.header_bytes + txn.body_bytes,
                                   timeout_s=self.limits.deliver_timeout_s)
        finally:
            spool.close()
        log.info("smtp %s: delivered %s from=<%s> rcpts=%d size=%d", self.session_id,
                 txn.queue_id, txn.envelope.mail_from, len(txn.envelope.recipients),
                 txn.body_bytes)
        return Reply(250, "2.0.0", f"OK {txn.queue_id}")

    def _finish_message(self, txn: _Transaction, line_too_long: bool) -> _Result:
        """The body is complete: refuse it, or deliver it."""
        self._txn = None
        self._decoder = None
        self.state = State.READY
        if txn.too_large:
            txn.discard()
            return replies.TOO_LARGE
        if line_too_long:
            txn.discard()
            return replies.LINE_TOO_LONG
        return defer.Deferred.fromCoroutine(self._deliver(txn))

    def _end_of_data(self) -> _Result:
        assert self._txn is not None and self._decoder is not None
        return self._finish_message(self._txn, self._decoder.line_too_long)

    def _end_of_chunk(self) -> _Result:
        chunk = self._chunk
        assert chunk is not None
        self._chunk = None
        if chunk.verdict is not None:
            self.state = chunk.resume_state
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

    # ------------------------------------------------------------------ commands

    def _cmd_ehlo(self, args: str) -> _Result:
        return self._greet(args, esmtp=True)

    def _cmd_helo(self, args: str) -> _Result:
        return self._greet(args, esmtp=False)

    def _greet(self, args: str, *, esmtp: bool) -> _Result:
        if not args:
            return Reply(501, "5.5.4", "EHLO/HELO requires a domain or address literal")
        self._reset_transaction()  # EHLO mid-transaction is an implicit RSET
        self.session.helo = args.split()[0]
        self.session.esmtp = esmtp
        self.state = State.READY
        if not esmtp:
            return Reply(250, None, self.hostname)
        return Reply(250, None, [self.hostname, *self.capabilities()])

    def capabilities(self) -> list[str]:
        """The EHLO keywords, in the order we advertise them."""
        caps = [
            "PIPELINING",
            f"SIZE {self.limits.max_message_size_bytes}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "BINARYMIME",
        ]
        if self._can_starttls():
            caps.append("STARTTLS")
        caps.extend(self.auth_capabilities())
        return caps

    def auth_capabilities(self) -> list[str]:
        """Hook for submission: the ``AUTH ...`` keywords to advertise (none on MX)."""
        return []

    def _can_starttls(self) -> bool:
        return (self.tls_options is not None and not self.tls_active
                and ITLSTransport.providedBy(self.transport))

    def _cmd_mail(self, args: str) -> _Result:
        refusal = self._needs_greeting_or_tls()
        if refusal is not None:
            return refusal
        if self.state is not State.READY:
            return Reply(503, "5.5.1", "Nested MAIL command")
        address, raw_params = parse_mail_from(args)
        if raw_params and not self.session.esmtp:
            return replies.UNSUPPORTED_PARAM  # parameters need EHLO (RFC 5321 §4.1.1.2)
        params = validate_mail_params(
            raw_params, max_size_bytes=self.limits.max_message_size_bytes, chunking=True)
        if not address.isascii() and not params.smtputf8:
            return replies.NON_ASCII_NEEDS_SMTPUTF8
        return defer.Deferred.fromCoroutine(self._mail(address, raw_params, params))

    async def _mail(self, address: str, raw_params: dict[str, str | None],
                    params: MailParams) -> Reply:
        await self._agent_call(self.agent.check_sender, self.session, address,
                               timeout_s=self.limits.check_timeout_s)
        if self.state is not State.READY:  # the connection went away meanwhile
            return Reply(451, "4.3.0", "Session ended")
        envelope = Envelope(
            mail_from=address,
            mail_params=raw_params,
            smtputf8=params.smtputf8,
            body_8bitmime=params.body in ("8BITMIME", "BINARYMIME"),
        )
        self._txn = _Transaction(envelope=envelope, params=params)
        self.state = State.MAIL
        return Reply(250, "2.1.0", "Sender OK")

    def _cmd_rcpt(self, args: str) -> _Result:
        refusal = self._needs_greeting_or_tls()
        if refusal is not None:
            return refusal
        if self.state not in (State.MAIL, State.RCPT) or self._txn is None:
            return Reply(503, "5.5.1", "Need MAIL before RCPT")
        txn = self._txn
        if txn.chunked:
            return Reply(503, "5.5.1", "RCPT not allowed after BDAT")
        address, raw_params = parse_rcpt_to(args)
        validate_rcpt_params(raw_params)
        if not address.isascii() and not txn.params.smtputf8:
            return replies.NON_ASCII_NEEDS_SMTPUTF8
        if address in txn.envelope.recipient_addresses:
            return Reply(250, "2.1.5", "Recipient OK (duplicate)")
        if len(txn.envelope.recipients) >= self.limits.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        return defer.Deferred.fromCoroutine(self._rcpt(txn, address))

    async def _rcpt(self, txn: _Transaction, address: str) -> Reply:
        token = await self._agent_call(self.agent.check_recipient, self.session,
                                       txn.envelope.mail_from, address,
                                       timeout_s=self.limits.check_timeout_s)
        if self._txn is txn:
            txn.envelope.recipients.append(token)
            txn.envelope.recipient_addresses.append(address)
            self.state = State.RCPT
        return Reply(250, "2.1.5", "Recipient OK")

    def _cmd_data(self, args: str) -> _Result:
        refusal = self._needs_greeting_or_tls()
        if refusal is not None:
            return refusal
        if args:
            return replies.SYNTAX_ERROR
        if self.state is State.READY or self._txn is None:
            return Reply(503, "5.5.1", "Need MAIL command")
        txn = self._txn
        if self.state is State.MAIL:
            return replies.NO_VALID_RECIPIENTS
        if txn.chunked:
            return Reply(503, "5.5.1", "DATA not allowed after BDAT")
        if txn.params.body == "BINARYMIME":
            return Reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT")
        self._open_spool(txn)
        self._decoder = DataDecoder(self.limits.max_data_line_bytes)
        self.state = State.DATA
        return Reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _cmd_bdat(self, args: str) -> _Result:
        size, last = parse_bdat(args)  # on a syntax error no octets can be consumed
        verdict = self._needs_greeting_or_tls()
        if verdict is None:
            if self.state is State.READY or self._txn is None:
                verdict = Reply(503, "5.5.1", "Need MAIL command")
            elif self.state is State.MAIL:
                verdict = replies.NO_VALID_RECIPIENTS
        if verdict is None:
            assert self._txn is not None
            if not self._txn.chunked:
                self._txn.chunked = True
                self._open_spool(self._txn)
        self._chunk = _Chunk(remaining=size, size=size, last=last, verdict=verdict,
                             resume_state=self.state)
        self.state = State.BDAT
        return None  # the reply comes once the chunk's octets are consumed

    def _cmd_rset(self, args: str) -> _Result:
        if args:
            return replies.SYNTAX_ERROR
        self._reset_transaction()
        return replies.OK

    def _cmd_noop(self, args: str) -> _Result:
        return replies.OK

    def _cmd_quit(self, args: str) -> _Result:
        self._write(Reply(221, "2.0.0", f"{self.hostname} closing connection"))
        self._close()
        return None

    def _cmd_vrfy(self, args: str) -> _Result:
        if not args:
            return replies.SYNTAX_ERROR
        return replies.VRFY_CANNOT

    def _cmd_expn(self, args: str) -> _Result:
        return replies.NOT_IMPLEMENTED

    def _cmd_help(self, args: str) -> _Result:
        return _HELP

    def _cmd_auth(self, args: str) -> _Result:
        """Not offered on MX; the submission listener will override this."""
        return replies.AUTH_NOT_OFFERED

    def _cmd_starttls(self, args: str) -> _Result:
        if args:
            return replies.SYNTAX_ERROR
        if self.tls_active:
            return Reply(503, "5.5.1", "TLS already active")
        if not self._can_starttls():
            return replies.TLS_UNAVAILABLE
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        # RFC 3207 §4.2: forget everything learnt in cleartext, and anything the
        # client pipelined after STARTTLS: it must not run inside the TLS session.
        self._buffer.clear()
        self._discarding_line = False
        self._reset_transaction()
        self.session.helo = None
        self.session.esmtp = False
        self.state = State.GREETING
        self.tls_active = True
        self.transport.startTLS(self.tls_options)
        return None  # _process resumes reading if it was paused: the buffer is empty


