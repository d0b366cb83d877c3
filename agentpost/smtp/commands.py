"""What each SMTP verb does: the command half of the SMTP server.

:class:`SMTPCommands` is mixed into :class:`agentpost.smtp.server.SMTPServerProtocol`,
which owns the connection (input loop, flow control, deadlines, output).  Each
``_cmd_<verb>`` gets the argument text and returns a :data:`Result`: a reply now, a
Deferred reply (the delivery agent is asked), or None when the reply comes later
(BDAT) or was already written (QUIT, STARTTLS).  Replies for domain errors come from
the one table in :mod:`agentpost.smtp.replies`.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import ipaddress
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, ITLSTransport

from agentpost.cork import Cork
from agentpost.smtp import replies
from agentpost.smtp.interfaces import DeliveryAgent, Envelope, SessionInfo
from agentpost.smtp.parser import (
    DataDecoder,
    MailParams,
    parse_bdat,
    parse_mail_from,
    parse_rcpt_to,
    validate_mail_params,
    validate_rcpt_params,
)
from agentpost.smtp.policy import ListenerPolicy
from agentpost.smtp.replies import Reply
from agentpost.smtp.session import Chunk, Result, SMTPLimits, State, Transaction

__all__ = ["SMTPCommands"]

_HELP = Reply(214, "2.0.0", [
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
    "See RFC 5321",
])
_HELO_TOKEN_RE = re.compile(r"^[A-Za-z0-9.\-_:\[\]]{1,255}\Z")


# The trace header's parts are cached: a client sends message after message from one
# address, many within a second (issue 12: they were ~2% of an MX delivery's CPU).
@functools.lru_cache(maxsize=256)
def _address_literal(peer: str) -> str:
    """The ``Received:`` address literal of the peer (RFC 5321 §4.1.3)."""
    try:
        return f"[IPv6:{peer}]" if ipaddress.ip_address(peer).version == 6 else f"[{peer}]"
    except ValueError:
        return "[unknown]"


@functools.lru_cache(maxsize=4)
def _date_text(seconds: int) -> str:
    """RFC 5322 date-time of a whole second (all the header shows), in UTC."""
    return email.utils.format_datetime(datetime.fromtimestamp(seconds, UTC))
_LOGIN_USERNAME = base64.b64encode(b"Username:").decode("ascii")
_LOGIN_PASSWORD = base64.b64encode(b"Password:").decode("ascii")


class SASLExchange:
    """An AUTH exchange waiting for the client's next response line."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.username: str | None = None  # LOGIN, once the first response arrived


class SMTPCommands:
    """The verbs, and the Received: header they determine (mixed into the protocol)."""

    # Provided by the protocol class this is mixed into.
    agent: DeliveryAgent
    hostname: str
    clock: IReactorTime
    limits: SMTPLimits
    tls_options: Any
    transport: Any
    session: SessionInfo
    state: State
    tls_active: bool
    require_tls: bool
    policy: ListenerPolicy
    session_id: str
    _sasl: SASLExchange | None
    _buffer: bytearray
    _discarding_line: bool
    _txn: Transaction | None
    _decoder: DataDecoder | None
    _chunk: Chunk | None
    _out: Cork
    _send: Callable[[Reply], None]
    _write: Callable[[Reply], None]
    _close: Callable[[], None]
    _reset_transaction: Callable[[], None]
    _open_spool: Callable[[Transaction], None]
    _agent_call: Callable[..., defer.Deferred]
    _credential_ended: Callable[[str], None]

    #: The commands we know; ``VERB`` is handled by method ``_cmd_verb``.  A
    #: subclass (submission) adds verbs by extending this set.
    VERBS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP",
                       "QUIT", "VRFY", "EXPN", "HELP", "AUTH", "STARTTLS"})

    def _needs_greeting_or_tls(self) -> Reply | None:
        if self.state is State.GREETING:
            return replies.SEND_EHLO_FIRST
        if self.require_tls and not self.tls_active:
            return replies.TLS_REQUIRED
        if self.policy.requires_auth and self.session.principal is None:
            return replies.AUTH_REQUIRED
        return None

    def _with_protocol(self, txn: Transaction) -> str:
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

    def _trace_headers(self, txn: Transaction) -> bytes:
        """``Return-Path:`` and ``Received:`` (RFC 5321 §4.4), CRLF-terminated."""
        helo = self.session.helo or ""
        helo_token = helo if _HELO_TOKEN_RE.match(helo) else "unknown"
        literal = _address_literal(self.session.peer_host)
        lines = [f"Received: from {helo_token} ({literal})",
                 f"\tby {self.hostname} (AgentPost) with {self._with_protocol(txn)}"]
        if self.tls_active:
            version = self.session.tls_version or "TLS"
            cipher = self.session.tls_cipher or "unknown"
            lines.append(f"\t(version={version} cipher={cipher})")
        stamp = _date_text(int(self.clock.seconds()))
        if len(txn.envelope.recipient_addresses) == 1:
            lines.append(f"\tid {txn.queue_id}")
            lines.append(f"\tfor <{txn.envelope.recipient_addresses[0]}>; {stamp}")
        else:
            lines.append(f"\tid {txn.queue_id}; {stamp}")
        if self.policy.return_path:
            lines.insert(0, f"Return-Path: <{txn.envelope.mail_from}>")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    # ------------------------------------------------------------------ commands

    def _cmd_ehlo(self, args: str) -> Result:
        return self._greet(args, esmtp=True)

    def _cmd_helo(self, args: str) -> Result:
        return self._greet(args, esmtp=False)

    def _greet(self, args: str, *, esmtp: bool) -> Result:
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
        """``AUTH PLAIN LOGIN`` where the policy offers it, and only once TLS is up."""
        if self.policy.offers_auth and self.tls_active:
            return ["AUTH PLAIN LOGIN"]
        return []

    def _can_starttls(self) -> bool:
        return (self.tls_options is not None and not self.tls_active
                and ITLSTransport.providedBy(self.transport))

    def _cmd_mail(self, args: str) -> Result:
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
        checked = self._agent_call(self.agent.check_sender, self.session, address,
                                   timeout_s=self.limits.check_timeout_s)
        # A callback, not a coroutine (one Deferred and one resumption less per
        # command); a check that answered at once has fired it already, and the
        # protocol sends its reply as a plain one (server._handle_result).
        return checked.addCallback(self._mail_checked, address, raw_params, params)

    def _mail_checked(self, _: object, address: str, raw_params: dict[str, str | None],
                      params: MailParams) -> Reply:
        if self.state is not State.READY:  # the connection went away meanwhile
            return Reply(451, "4.3.0", "Session ended")
        envelope = Envelope(
            mail_from=address,
            mail_params=raw_params,
            smtputf8=params.smtputf8,
            body_8bitmime=params.body in ("8BITMIME", "BINARYMIME"),
        )
        self._txn = Transaction(envelope=envelope, params=params)
        self.state = State.MAIL
        return replies.SENDER_OK

    def _cmd_rcpt(self, args: str) -> Result:
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
        checked = self._agent_call(self.agent.check_recipient, self.session,
                                   txn.envelope.mail_from, address,
                                   timeout_s=self.limits.check_timeout_s)
        return checked.addCallback(self._rcpt_checked, txn, address)

    def _rcpt_checked(self, token: Any, txn: Transaction, address: str) -> Reply:
        if self._txn is txn:
            txn.envelope.recipients.append(token)
            txn.envelope.recipient_addresses.append(address)
            self.state = State.RCPT
        return replies.RECIPIENT_OK

    def _cmd_data(self, args: str) -> Result:
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
        return replies.START_DATA

    def _cmd_bdat(self, args: str) -> Result:
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
        self._chunk = Chunk(remaining=size, size=size, last=last, verdict=verdict,
                             resume_state=self.state)
        self.state = State.BDAT
        return None  # the reply comes once the chunk's octets are consumed

    def _cmd_rset(self, args: str) -> Result:
        if args:
            return replies.SYNTAX_ERROR
        self._reset_transaction()
        return replies.OK

    def _cmd_noop(self, args: str) -> Result:
        return replies.OK

    def _cmd_quit(self, args: str) -> Result:
        self._write(Reply(221, "2.0.0", f"{self.hostname} closing connection"))
        self._close()
        return None

    def _cmd_vrfy(self, args: str) -> Result:
        if not args:
            return replies.SYNTAX_ERROR
        return replies.VRFY_CANNOT

    def _cmd_expn(self, args: str) -> Result:
        return replies.NOT_IMPLEMENTED

    def _cmd_help(self, args: str) -> Result:
        return _HELP

    def _cmd_auth(self, args: str) -> Result:
        """RFC 4954 AUTH PLAIN / LOGIN, with an optional initial response (``=`` for an
        empty one); only where the policy offers it and only inside TLS."""
        if not self.policy.offers_auth:
            return replies.AUTH_NOT_OFFERED
        if self.state is State.GREETING:
            return replies.SEND_EHLO_FIRST
        if not self.tls_active:
            return replies.ENCRYPTION_REQUIRED
        if self.session.principal is not None:
            return Reply(503, "5.5.1", "Already authenticated")
        if self.state is not State.READY:
            return Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
        parts = args.split()
        if not 1 <= len(parts) <= 2:
            return replies.SYNTAX_ERROR
        mechanism = parts[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            return Reply(504, "5.5.4", "Unrecognized authentication mechanism")
        self._sasl = SASLExchange(mechanism)
        if len(parts) == 2:
            return self._sasl_response(parts[1])
        return Reply(334, None, "" if mechanism == "PLAIN" else _LOGIN_USERNAME)

    def _line_too_long_reply(self) -> Reply:
        """An over-long AUTH line (a response, or the command with its initial response)
        ends the exchange with ``500 5.5.6`` (RFC 4954 §4): the client's next line is
        then a command again, not a response read as base64."""
        if self._sasl is not None or self._buffer[:5].upper() == b"AUTH ":
            self._sasl = None
            return replies.AUTH_LINE_TOO_LONG
        return replies.LINE_TOO_LONG

    def _sasl_line(self, line: bytes) -> Result:
        """A client response line while an AUTH exchange is in progress."""
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            self._sasl = None
            return Reply(501, "5.5.2", "Invalid base64 data")
        return self._sasl_response(text)

    def _sasl_response(self, text: str) -> Result:
        exchange = self._sasl
        assert exchange is not None
        if text == "*":
            self._sasl = None
            return replies.AUTH_CANCELLED
        try:
            decoded = b"" if text == "=" else base64.b64decode(text, validate=True)
            value = decoded.decode("utf-8")
        except (binascii.Error, ValueError):
            self._sasl = None
            return Reply(501, "5.5.2", "Invalid base64 data")
        if exchange.mechanism == "LOGIN" and exchange.username is None:
            exchange.username = value
            return Reply(334, None, _LOGIN_PASSWORD)
        self._sasl = None
        if exchange.mechanism == "LOGIN":
            assert exchange.username is not None
            username, password = exchange.username, value
        else:
            fields = value.split("\0")
            if len(fields) != 3:
                return Reply(501, "5.5.2", "Malformed PLAIN response")
            authzid, username, password = fields
            if authzid and authzid != username:  # no proxy authorization
                return replies.AUTH_FAILED
        return defer.Deferred.fromCoroutine(self._authenticate(username, password))

    async def _authenticate(self, username: str, password: str) -> Reply:
        try:
            account = await self._agent_call(
                self.agent.authenticate, self.session, username, password,  # type: ignore[attr-defined]
                self._credential_ended, timeout_s=self.limits.check_timeout_s)
        except Exception as exc:
            return replies.reply_for_auth_error(exc, context=self.session_id)
        if self.state is State.CLOSED:  # the client left meanwhile
            account.close()
            return replies.AUTH_SUCCEEDED
        self.session.principal = account
        return replies.AUTH_SUCCEEDED

    def _cmd_starttls(self, args: str) -> Result:
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
        self._out.flush()  # the 220 in the clear, before the handshake
        self.transport.startTLS(self.tls_options)
        return None  # _process resumes reading if it was paused: the buffer is empty

