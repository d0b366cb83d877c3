"""Unit tests of the SMTP server protocol: StringTransport + task.Clock, no sockets.

The delivery agent here is a recording fake: it is the boundary the protocol talks
to, so scripting it (sync answers, Deferreds fired later, domain errors, bugs) is
how every reply path of the state machine is reached.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from agentpost import cork
from agentpost.model import errors
from agentpost.smtp import parser
from agentpost.smtp.interfaces import Envelope, SessionInfo
from agentpost.smtp.listener import SMTPFactory
from agentpost.smtp.parser import CommandError, DataDecoder
from agentpost.smtp.replies import Reply, reply_for_error
from agentpost.smtp.server import SMTPLimits, SMTPServerProtocol, State

# --------------------------------------------------------------------------- fakes


class RecordingAgent:
    """A DeliveryAgent that records calls and answers as each test scripts it."""

    def __init__(self) -> None:
        self.senders: list[str] = []
        self.recipients: list[str] = []
        self.deliveries: list[tuple[Envelope, bytes, int, SessionInfo]] = []
        self.sender_error: BaseException | None = None
        self.recipient_errors: dict[str, BaseException] = {}
        self.deliver_error: BaseException | None = None
        self.hold_recipients = False  # answer check_recipient with unfired Deferreds
        self.held: list[tuple[defer.Deferred, str]] = []
        self.hold_deliver = False
        self.held_deliveries: list[defer.Deferred] = []

    async def check_sender(self, session: SessionInfo, mail_from: str) -> None:
        self.senders.append(mail_from)
        if self.sender_error is not None:
            raise self.sender_error

    def check_recipient(self, session: SessionInfo, mail_from: str, rcpt: str) -> Any:
        self.recipients.append(rcpt)
        if rcpt in self.recipient_errors:
            return defer.fail(self.recipient_errors[rcpt])
        if self.hold_recipients:
            d: defer.Deferred = defer.Deferred()
            self.held.append((d, rcpt))
            return d
        return defer.succeed(f"token:{rcpt}")

    async def deliver(self, session: SessionInfo, envelope: Envelope, message: Any,
                      size: int) -> None:
        data = message.read()
        assert len(data) == size
        if self.hold_deliver:
            d: defer.Deferred = defer.Deferred()
            self.held_deliveries.append(d)
            await d
        if self.deliver_error is not None:
            raise self.deliver_error
        self.deliveries.append((envelope, data, size, session))

    def release_recipients(self) -> None:
        """Fire the held check_recipient Deferreds, in order."""
        held, self.held = self.held, []
        for d, rcpt in held:
            d.callback(f"token:{rcpt}")


@implementer(ITLSTransport)
class TLSCapableTransport(StringTransport):
    """A StringTransport that records startTLS and fakes the pyOpenSSL connection."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_started_with: Any = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started_with = contextFactory
        self.written_before_tls = self.value()

    def getHandle(self) -> Any:
        return FakeTLSConnection()


class RecordingTransport(StringTransport):
    """A StringTransport that keeps each write apart, and whether the connection was
    already being closed when it came."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[bytes, bool]] = []

    def write(self, data: bytes) -> None:
        self.writes.append((data, bool(self.disconnecting)))
        super().write(data)

    def take(self) -> list[bytes]:
        """The writes since the last call."""
        out, self.writes = [data for data, _ in self.writes], []
        return out


class FakeTLSConnection:
    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"


class Session:
    """One protocol instance on a string transport, with helpers to talk to it."""

    def __init__(self, agent: RecordingAgent | None = None, *, tls: bool = False,
                 transport: StringTransport | None = None, **kwargs: Any) -> None:
        self.agent = agent or RecordingAgent()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # 2023-11-14T22:13:20Z
        self.transport = transport or (TLSCapableTransport() if tls else StringTransport())
        if tls:
            kwargs.setdefault("tls_options", object())
        self.protocol = SMTPServerProtocol(self.agent, hostname="mx.test", clock=self.clock,
                                           **kwargs)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes | str) -> None:
        self.protocol.dataReceived(data.encode() if isinstance(data, str) else data)

    def lines(self) -> list[str]:
        """Reply lines written since the last call."""
        out = self.transport.value().decode("ascii")
        self.transport.clear()
        return [line for line in out.split("\r\n") if line]

    def codes(self) -> list[str]:
        """The final line of each reply written since the last call, e.g. '250 2.1.0 ...'."""
        return [line for line in self.lines() if line[3:4] == " "]

    def greeted(self) -> Session:
        self.lines()
        self.send("EHLO client.example\r\n")
        self.lines()
        return self

    def ready_for_data(self, *rcpts: str, mail_params: str = "") -> Session:
        self.greeted()
        self.send(f"MAIL FROM:<sender@example.org>{mail_params}\r\n")
        for rcpt in rcpts or ("rcpt@mx.test",):
            self.send(f"RCPT TO:<{rcpt}>\r\n")
        assert all(c.startswith("250") for c in self.codes())
        return self

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def starts(codes: list[str], *prefixes: str) -> bool:
    """Do the replies start, one for one, with these prefixes?"""
    return len(codes) == len(prefixes) and all(
        c.startswith(p) for c, p in zip(codes, prefixes, strict=True))


# --------------------------------------------------------------------------- greeting


def test_greeting_is_220_with_hostname():
    """The first thing a client sees is 220 and our name."""
    s = Session()
    assert s.lines() == ["220 mx.test ESMTP AgentPost"]


def test_ehlo_advertises_the_extensions_without_starttls_when_tls_is_not_configured():
    """EHLO lists PIPELINING, SIZE <max>, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8, CHUNKING."""
    s = Session()
    s.lines()
    s.send("EHLO client.example\r\n")
    lines = s.lines()
    assert lines[0] == "250-mx.test"
    keywords = [line[4:] for line in lines[1:]]
    assert keywords == ["PIPELINING", "SIZE 10485760", "8BITMIME", "ENHANCEDSTATUSCODES",
                        "SMTPUTF8", "CHUNKING", "BINARYMIME"]
    assert lines[-1].startswith("250 ") and all(x.startswith("250-") for x in lines[:-1])
    assert "AUTH" not in " ".join(keywords)


def test_ehlo_advertises_starttls_when_tls_is_configured_and_transport_supports_it():
    """STARTTLS appears only when we could actually start TLS."""
    s = Session(tls=True)
    s.lines()
    s.send("EHLO client.example\r\n")
    assert "250 STARTTLS" in s.lines()


def test_helo_answers_one_line_and_disables_esmtp_parameters():
    """HELO gets a plain 250; MAIL parameters then are 555 (they need EHLO)."""
    s = Session()
    s.lines()
    s.send("HELO client.example\r\n")
    assert s.lines() == ["250 mx.test"]
    s.send("MAIL FROM:<a@example.org> SIZE=10\r\n")
    assert starts(s.codes(), "555 5.5.4")


def test_ehlo_without_domain_is_501():
    """EHLO needs an argument."""
    s = Session()
    s.lines()
    s.send("EHLO\r\n")
    assert starts(s.codes(), "501 5.5.4")


# --------------------------------------------------------------------------- simple commands


def test_noop_vrfy_help_expn_auth_and_quit_replies():
    """NOOP 250, VRFY 252 2.5.0, HELP 214, EXPN 502, AUTH 503 on MX, QUIT 221 and close."""
    s = Session().greeted()
    s.send("NOOP\r\nVRFY someone\r\nHELP\r\nEXPN list\r\nAUTH PLAIN AGZvbwBiYXI=\r\n")
    codes = s.codes()
    assert starts(codes, "250 2.0.0", "252 2.5.0", "214 2.0.0", "502 5.5.1", "503 5.5.1")
    s.send("QUIT\r\nNOOP\r\n")
    assert s.lines() == ["221 2.0.0 mx.test closing connection"]
    assert s.closed
    assert s.protocol.state is State.CLOSED


def test_help_is_multiline_214_with_enhanced_codes():
    """Every line of a multi-line reply carries the enhanced code (RFC 2034)."""
    s = Session().greeted()
    s.send("HELP\r\n")
    lines = s.lines()
    assert len(lines) == 2
    assert lines[0].startswith("214-2.0.0 ") and lines[1].startswith("214 2.0.0 ")


def test_vrfy_without_argument_is_501():
    """VRFY needs a string to verify."""
    s = Session().greeted()
    s.send("VRFY\r\n")
    assert starts(s.codes(), "501 5.5.4")


def test_unknown_command_is_500_5_5_2():
    """An unrecognised verb, or garbage, is 500 5.5.2."""
    s = Session().greeted()
    s.send("FROB x\r\n\xff\r\n".encode("latin-1"))
    assert starts(s.codes(), "500 5.5.2", "500 5.5.2")


def test_over_long_command_line_is_500_and_its_tail_is_not_executed():
    """A command line over the limit is answered once; the rest of it up to LF is skipped."""
    s = Session().greeted()
    s.send(b"NOOP " + b"x" * 3000)
    assert starts(s.codes(), "500 5.5.2 Line too long")
    s.send(b"xxQUIT\r\nNOOP\r\n")  # "QUIT" is the tail of the long line
    assert starts(s.codes(), "250 2.0.0")  # only the NOOP after the long line
    assert not s.closed


def test_command_line_with_lf_only_terminator_is_accepted():
    """Commands may end in bare LF (lenient); bodies may not (see the DATA tests)."""
    s = Session()
    s.lines()
    s.send("EHLO client.example\nNOOP\n")
    assert s.codes()[-1].startswith("250 2.0.0")


# --------------------------------------------------------------------------- sequence


def test_mail_before_ehlo_is_503():
    """A transaction needs a greeting first."""
    s = Session()
    s.lines()
    s.send("MAIL FROM:<a@example.org>\r\n")
    assert starts(s.codes(), "503 5.5.1")


def test_rcpt_before_mail_and_data_before_mail_are_503():
    """RCPT and DATA outside a transaction are bad sequence."""
    s = Session().greeted()
    s.send("RCPT TO:<a@mx.test>\r\nDATA\r\n")
    assert starts(s.codes(), "503 5.5.1", "503 5.5.1")


def test_nested_mail_is_503():
    """A second MAIL inside a transaction is refused; the first stands."""
    s = Session().greeted()
    s.send("MAIL FROM:<a@example.org>\r\nMAIL FROM:<b@example.org>\r\n")
    assert starts(s.codes(), "250 2.1.0", "503 5.5.1")


def test_data_without_valid_recipients_is_554_and_following_lines_are_commands():
    """With every RCPT refused, DATA is 554 5.5.1 (RFC 2920) and no body mode starts."""
    agent = RecordingAgent()
    agent.recipient_errors["nobody@mx.test"] = errors.UnknownRecipient()
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<nobody@mx.test>\r\nDATA\r\nNOOP\r\n")
    assert starts(s.codes(), "250", "550 5.1.1", "554 5.5.1", "250 2.0.0")
    assert s.protocol.state is State.MAIL


def test_rset_resets_the_transaction_but_keeps_the_greeting():
    """After RSET, RCPT is 503 and a new MAIL is accepted."""
    s = Session().greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r@mx.test>\r\nRSET\r\n"
           "RCPT TO:<r@mx.test>\r\nMAIL FROM:<b@example.org>\r\n")
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "250 2.1.0")


def test_ehlo_inside_a_transaction_resets_it():
    """EHLO is an implicit RSET (RFC 5321 §4.1.4)."""
    s = Session().greeted()
    s.send("MAIL FROM:<a@example.org>\r\nEHLO again.example\r\nRCPT TO:<r@mx.test>\r\n")
    codes = s.codes()
    assert codes[-1].startswith("503 5.5.1")


def test_require_tls_refuses_mail_with_530_before_starttls():
    """With require_tls, a transaction needs STARTTLS first."""
    s = Session(tls=True, require_tls=True).greeted()
    s.send("MAIL FROM:<a@example.org>\r\n")
    assert starts(s.codes(), "530 5.7.0")


# --------------------------------------------------------------------------- MAIL / RCPT


def test_mail_syntax_errors_are_501():
    """Missing brackets, missing colon, bad address: 501 with a fitting enhanced code."""
    s = Session().greeted()
    s.send("MAIL FROM:a@example.org\r\nMAIL TO:<a@example.org>\r\nMAIL FROM:<a@@b>\r\n"
           "MAIL FROM:<a@example.org>junk\r\n")
    assert starts(s.codes(), "501 5.5.4", "501 5.5.4", "501 5.1.7", "501 5.5.4")


def test_null_reverse_path_is_accepted_as_empty_sender():
    """MAIL FROM:<> (bounces) reaches the agent as ''."""
    s = Session().greeted()
    s.send("MAIL FROM:<>\r\n")
    assert starts(s.codes(), "250 2.1.0")
    assert s.agent.senders == [""]


def test_unknown_mail_parameter_is_555_and_rcpt_parameters_are_555():
    """We support no DSN: RET= on MAIL and NOTIFY= on RCPT are 555 5.5.4."""
    s = Session().greeted()
    s.send("MAIL FROM:<a@example.org> RET=HDRS\r\nMAIL FROM:<a@example.org>\r\n"
           "RCPT TO:<r@mx.test> NOTIFY=NEVER\r\n")
    assert starts(s.codes(), "555 5.5.4", "250 2.1.0", "555 5.5.4")


def test_mail_body_and_size_parameters_are_validated():
    """BODY must be one we know; SIZE must be a number."""
    s = Session().greeted()
    s.send("MAIL FROM:<a@example.org> BODY=9BIT\r\nMAIL FROM:<a@example.org> SIZE=ten\r\n"
           "MAIL FROM:<a@example.org> SMTPUTF8=yes\r\n"
           "MAIL FROM:<a@example.org> SIZE=1 SIZE=2\r\n"
           "MAIL FROM:<a@example.org> BODY=8bitmime SIZE=100\r\n")
    assert starts(s.codes(), "501 5.5.4", "501 5.5.4", "501 5.5.4", "501 5.5.4", "250 2.1.0")
    assert s.protocol._txn.envelope.body_8bitmime is True


def test_declared_size_over_the_limit_is_552_at_mail():
    """RFC 1870: a declared SIZE over our maximum is refused before any data is sent."""
    s = Session(limits=SMTPLimits(max_message_size_bytes=1000)).greeted()
    s.send("MAIL FROM:<a@example.org> SIZE=1001\r\nMAIL FROM:<a@example.org> SIZE=1000\r\n")
    assert starts(s.codes(), "552 5.3.4", "250 2.1.0")


def test_non_ascii_address_without_smtputf8_is_553_5_6_7():
    """RFC 6531 §3.4: a UTF-8 address needs the SMTPUTF8 parameter."""
    s = Session().greeted()
    s.send("MAIL FROM:<jöran@exämple.org>\r\nMAIL FROM:<a@example.org>\r\n"
           "RCPT TO:<ünïcode@mx.test>\r\n")
    assert starts(s.codes(), "553 5.6.7", "250 2.1.0", "553 5.6.7")


def test_utf8_addresses_with_smtputf8_are_accepted_and_flag_the_envelope():
    """With SMTPUTF8 the UTF-8 addresses pass through (domain lower-cased)."""
    s = Session().greeted()
    s.send("MAIL FROM:<jöran@EXÄMPLE.org> SMTPUTF8\r\nRCPT TO:<ünïcode@mx.test>\r\n")
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5")
    assert s.agent.senders == ["jöran@exämple.org"]
    assert s.agent.recipients == ["ünïcode@mx.test"]
    assert s.protocol._txn.envelope.smtputf8 is True


def test_unknown_recipient_is_550_5_1_1_and_relay_denied_is_550_5_7_1():
    """The agent's domain errors map through the one table."""
    agent = RecordingAgent()
    agent.recipient_errors["ghost@mx.test"] = errors.UnknownRecipient()
    agent.recipient_errors["someone@elsewhere.example"] = errors.RelayDenied("internal detail")
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<ghost@mx.test>\r\n"
           "RCPT TO:<someone@elsewhere.example>\r\nRCPT TO:<ok@mx.test>\r\n")
    codes = s.codes()
    assert starts(codes, "250 2.1.0", "550 5.1.1", "550 5.7.1", "250 2.1.5")
    assert codes[2] == "550 5.7.1 Relaying denied"
    assert s.protocol._txn.envelope.recipient_addresses == ["ok@mx.test"]


def test_sender_blocked_is_550_5_7_1_at_mail():
    """A refusing check_sender leaves no transaction open."""
    agent = RecordingAgent()
    agent.sender_error = errors.SenderBlocked()
    s = Session(agent).greeted()
    s.send("MAIL FROM:<spam@example.org>\r\nRCPT TO:<r@mx.test>\r\n")
    assert starts(s.codes(), "550 5.7.1", "503 5.5.1")


def test_temporary_failure_in_check_recipient_is_451_4_3_0():
    """A database outage while checking a recipient is retryable, never 5xx."""
    agent = RecordingAgent()
    agent.recipient_errors["r@mx.test"] = errors.TemporaryFailure()
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r@mx.test>\r\n")
    assert starts(s.codes(), "250", "451 4.3.0")


def test_rate_limited_is_451_4_7_0():
    """RateLimited from the agent asks the client to come back later."""
    agent = RecordingAgent()
    agent.sender_error = errors.RateLimited(30)
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\n")
    assert starts(s.codes(), "451 4.7.0")


def test_unexpected_exception_in_check_recipient_is_451_with_reference_and_no_traceback(caplog):
    """A bug answers 451 4.3.0 quoting a log reference; the client sees no internals."""
    agent = RecordingAgent()
    agent.recipient_errors["r@mx.test"] = ZeroDivisionError("secret internals")
    s = Session(agent).greeted()
    with caplog.at_level(logging.ERROR, logger="agentpost.smtp.replies"):
        s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r@mx.test>\r\n")
    codes = s.codes()
    assert starts(codes, "250", "451 4.3.0")
    assert "secret" not in codes[1] and "Traceback" not in codes[1]
    ref = codes[1].split("(ref ")[1].rstrip(")")
    assert ref in caplog.text and "ZeroDivisionError" in caplog.text


def test_too_many_recipients_is_452_4_5_3():
    """Past max_recipients, RCPT is 452 4.5.3 (RFC 5321 §4.5.3.1.10)."""
    s = Session(limits=SMTPLimits(max_recipients=2)).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r1@mx.test>\r\nRCPT TO:<r2@mx.test>\r\n"
           "RCPT TO:<r3@mx.test>\r\n")
    assert starts(s.codes(), "250", "250", "250", "452 4.5.3")


def test_duplicate_recipient_is_accepted_once():
    """The same recipient twice is delivered once."""
    s = Session().greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r@mx.test>\r\nRCPT TO:<r@MX.TEST>\r\n")
    assert starts(s.codes(), "250", "250 2.1.5", "250 2.1.5")
    assert s.protocol._txn.envelope.recipient_addresses == ["r@mx.test"]


# --------------------------------------------------------------------------- DATA


def test_data_delivers_with_return_path_and_received_headers_and_replies_after_deliver():
    """The body is stored with our trace headers; 250 OK <id> comes after deliver()."""
    s = Session().ready_for_data()
    s.send("DATA\r\n")
    assert starts(s.codes(), "354")
    s.send("Subject: hi\r\n\r\nbody\r\n.\r\n")
    codes = s.codes()
    assert starts(codes, "250 2.0.0 OK ")
    queue_id = codes[0].split()[-1]
    (envelope, data, size, _), = s.agent.deliveries
    assert envelope.mail_from == "sender@example.org"
    assert envelope.recipients == ["token:rcpt@mx.test"]
    assert size == len(data)
    assert data == (
        b"Return-Path: <sender@example.org>\r\n"
        b"Received: from client.example ([192.168.1.1])\r\n"
        b"\tby mx.test (AgentPost) with ESMTP\r\n"
        b"\tid " + queue_id.encode() + b"\r\n"
        b"\tfor <rcpt@mx.test>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"Subject: hi\r\n\r\nbody\r\n"
    )
    assert s.protocol.state is State.READY


def test_received_header_omits_for_clause_with_several_recipients():
    """'for <addr>' would leak the other recipients' addresses, so it needs exactly one."""
    s = Session().ready_for_data("a@mx.test", "b@mx.test")
    s.send("DATA\r\nx\r\n.\r\n")
    (_, data, _, _), = s.agent.deliveries
    assert b"for <" not in data
    assert b"with ESMTP\r\n\tid " in data


def test_dot_unstuffing_and_empty_message():
    """Leading dots are removed once; '.' alone ends the body; an empty body is valid."""
    s = Session().ready_for_data()
    s.send("DATA\r\n..leading\r\n...\r\n. space\r\nmid.dle\r\n.\r\n")
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r@mx.test>\r\nDATA\r\n.\r\n")
    first, second = s.agent.deliveries
    assert first[1].endswith(b"+0000\r\n.leading\r\n..\r\n space\r\nmid.dle\r\n")
    assert second[1].endswith(b"+0000\r\n")
    assert second[2] == len(second[1])


def test_body_split_into_single_bytes_decodes_identically():
    """The end marker and stuffed dots are found across any packet boundary."""
    s = Session().ready_for_data()
    s.send("DATA\r\n")
    for byte in b"..a\r\n.\r\r\nb\r\n.\r\nNOOP\r\n":
        s.send(bytes([byte]))
    codes = s.codes()
    assert starts(codes, "354", "250 2.0.0", "250 2.0.0")
    assert s.agent.deliveries[0][1].endswith(b"+0000\r\n.a\r\n\r\r\nb\r\n")


def test_bare_lf_dot_lf_does_not_end_data():
    """'<LF>.<LF>' and '<LF>.<CR><LF>' are body bytes, not the end (SMTP smuggling)."""
    s = Session().ready_for_data()
    s.send("DATA\r\nhello\n.\nMAIL FROM:<evil@example.org>\n"
           "x\n.\r\nRCPT TO:<victim@mx.test>\r\n.\r\n")
    codes = s.codes()
    assert starts(codes, "354", "250 2.0.0")
    (_, data, _, _), = s.agent.deliveries
    assert data.endswith(b"hello\n.\nMAIL FROM:<evil@example.org>\nx\n.\r\n"
                         b"RCPT TO:<victim@mx.test>\r\n")
    assert s.agent.senders == ["sender@example.org"]


def test_overlong_data_line_does_not_smuggle_the_rest_of_the_body_as_commands():
    """After a >16 KiB line, command-looking body lines stay body; one 500 at the end."""
    s = Session().ready_for_data()
    s.send("DATA\r\n")
    assert starts(s.codes(), "354")
    s.send(b"Subject: x\r\n\r\n" + b"A" * 17_000 + b"\r\n")
    s.send(b"RSET\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@mx.test>\r\n"
           b"DATA\r\nforged\r\n")
    assert s.codes() == []  # nothing answered: still reading the body
    s.send(b".\r\n")
    assert starts(s.codes(), "500 5.5.2 Line too long")
    assert s.agent.deliveries == []
    assert s.agent.senders == ["sender@example.org"]
    assert s.agent.recipients == ["rcpt@mx.test"]
    assert s.protocol.state is State.READY


def test_line_of_exactly_1000_octets_is_accepted():
    """998 characters + CRLF = 1000 octets is the RFC 5321 maximum, so it passes."""
    s = Session().ready_for_data()
    s.send(b"DATA\r\n" + b"x" * 998 + b"\r\n.\r\n")
    assert starts(s.codes(), "354", "250 2.0.0")
    s.ready_for_data()
    s.send(b"DATA\r\n" + b"x" * 999 + b"\r\n.\r\n")
    assert starts(s.codes(), "354", "500 5.5.2")


def test_message_of_exactly_the_size_limit_is_accepted_and_one_more_octet_is_552():
    """The limit counts body octets after dot-unstuffing, excluding our headers."""
    limit = 100
    body = b".x" + b"y" * 95 + b"\r\n"  # 99 octets on the wire, 98 after unstuffing
    s = Session(limits=SMTPLimits(max_message_size_bytes=limit)).ready_for_data()
    s.send(b"DATA\r\n" + body + b"zz\r\n.\r\n")  # 98 + 4 = 102 > 100
    assert starts(s.codes(), "354", "552 5.3.4")
    s.ready_for_data()
    s.send(b"DATA\r\n" + body + b"\r\n.\r\n")  # 98 + 2 = 100
    assert starts(s.codes(), "354", "250 2.0.0")
    (_, data, size, _), = s.agent.deliveries
    assert data.endswith(b"+0000\r\nx" + b"y" * 95 + b"\r\n\r\n")
    assert size == len(data)


def test_oversize_data_keeps_reading_to_the_end_then_552_and_following_commands_run():
    """Overflow never switches back to command mode early; after the end, commands work."""
    s = Session(limits=SMTPLimits(max_message_size_bytes=50)).ready_for_data()
    s.send("DATA\r\n" + "z" * 70 + "\r\nNOOP\r\nQUIT\r\n")
    assert starts(s.codes(), "354")
    s.send(".\r\nNOOP\r\n")
    assert starts(s.codes(), "552 5.3.4", "250 2.0.0")
    assert s.agent.deliveries == []


def test_temporary_failure_on_deliver_is_451_4_3_0_and_the_transaction_ends():
    """A storage outage during deliver() is 451 4.3.0: the sender retries, nothing bounces."""
    agent = RecordingAgent()
    agent.deliver_error = errors.StorageFailure()
    s = Session(agent).ready_for_data()
    s.send("DATA\r\nx\r\n.\r\nRCPT TO:<r@mx.test>\r\n")
    assert starts(s.codes(), "354", "451 4.3.0", "503 5.5.1")


def test_unexpected_exception_in_deliver_is_451_4_3_0_not_5xx():
    """A bug in the ingest path is never a permanent refusal."""
    agent = RecordingAgent()
    agent.deliver_error = KeyError("boom")
    s = Session(agent).ready_for_data()
    s.send("DATA\r\nx\r\n.\r\n")
    codes = s.codes()
    assert starts(codes, "354", "451 4.3.0")
    assert "boom" not in codes[1]


def test_message_too_large_from_deliver_is_552_5_3_4():
    """A domain MessageTooLarge maps to 552 5.3.4."""
    agent = RecordingAgent()
    agent.deliver_error = errors.MessageTooLarge()
    s = Session(agent).ready_for_data()
    s.send("DATA\r\nx\r\n.\r\n")
    assert starts(s.codes(), "354", "552 5.3.4")


def test_data_with_arguments_is_501_and_binarymime_requires_bdat():
    """'DATA x' is a syntax error; BODY=BINARYMIME cannot use DATA (RFC 3030)."""
    s = Session().ready_for_data()
    s.send("DATA now\r\n")
    assert starts(s.codes(), "501 5.5.4")
    s.ready_for_data(mail_params=" BODY=BINARYMIME")
    s.send("DATA\r\n")
    assert starts(s.codes(), "503 5.5.1")


def test_8bit_body_bytes_pass_through_unchanged():
    """8BITMIME: any octet except the CRLF structure is kept as received."""
    s = Session().ready_for_data(mail_params=" BODY=8BITMIME")
    s.send(b"DATA\r\nSubject: caf\xc3\xa9\r\n\r\n\x80\xff\x00bin\r\n.\r\n")
    assert starts(s.codes(), "354", "250 2.0.0")
    (envelope, data, _, _), = s.agent.deliveries
    assert data.endswith(b"Subject: caf\xc3\xa9\r\n\r\n\x80\xff\x00bin\r\n")
    assert envelope.body_8bitmime is True


# --------------------------------------------------------------------------- pipelining


def test_pipelined_transaction_with_async_recipient_checks_replies_in_order():
    """MAIL/RCPT/RCPT/DATA+body in one packet: nothing runs ahead of a pending check."""
    agent = RecordingAgent()
    agent.hold_recipients = True
    s = Session(agent).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r1@mx.test>\r\nRCPT TO:<r2@mx.test>\r\n"
           "DATA\r\nSubject: pipelined\r\n\r\nRSET\r\nQUIT\r\n.\r\nNOOP\r\n")
    assert starts(s.codes(), "250 2.1.0")  # waiting on the first RCPT check
    assert agent.recipients == ["r1@mx.test"]
    agent.release_recipients()
    assert starts(s.codes(), "250 2.1.5")
    assert agent.recipients == ["r1@mx.test", "r2@mx.test"]
    agent.release_recipients()
    assert starts(s.codes(), "250 2.1.5", "354", "250 2.0.0", "250 2.0.0")
    (envelope, data, _, _), = agent.deliveries
    assert envelope.recipient_addresses == ["r1@mx.test", "r2@mx.test"]
    assert data.endswith(b"Subject: pipelined\r\n\r\nRSET\r\nQUIT\r\n")
    assert not s.closed


def test_replies_to_one_packet_of_pipelined_commands_go_out_in_one_write():
    """RFC 2920 section 3.1: the replies to a group of pipelined commands are sent as
    a unit (one write, so one send and one wake-up of the client), in order."""
    transport = RecordingTransport()
    s = Session(transport=transport).greeted()
    transport.take()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r1@mx.test>\r\nRCPT TO:<bad address>\r\n"
           "DATA\r\n")
    writes = transport.take()
    assert len(writes) == 1
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5", "501", "354")
    s.send("x\r\n.\r\nNOOP\r\nRSET\r\n")
    assert len(transport.take()) == 1
    assert starts(s.codes(), "250 2.0.0 OK", "250 2.0.0", "250 2.0.0")


def test_a_reply_waiting_for_the_agent_goes_out_with_the_replies_after_it():
    """What is answered before a pending check goes out when the protocol starts
    waiting (never held for more input); the pending reply and those of the commands
    pipelined behind it go out together once it is known."""
    transport = RecordingTransport()
    agent = RecordingAgent()
    agent.hold_recipients = True
    s = Session(agent, transport=transport).greeted()
    transport.take()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r1@mx.test>\r\nRCPT TO:<r2@mx.test>\r\n"
           "DATA\r\n")
    assert transport.take() == [b"250 2.1.0 Sender OK\r\n"]
    agent.release_recipients()
    assert len(transport.take()) == 1  # the first RCPT's; the second is pending
    agent.release_recipients()
    writes = transport.take()
    assert len(writes) == 1 and writes[0].startswith(b"250 2.1.5") and b"\r\n354 " in writes[0]
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5", "250 2.1.5", "354")


def test_held_replies_go_out_in_bounded_writes_when_a_client_pipelines_thousands():
    """A flood of pipelined commands does not pile its replies up unsent: past
    cork.MAX_HELD_BYTES they go out, so the transport's flow control still works."""
    transport = RecordingTransport()
    s = Session(transport=transport).greeted()
    transport.take()
    s.send("NOOP\r\n" * 12000)
    writes = transport.take()
    reply = b"250 2.0.0 OK\r\n"
    assert b"".join(writes) == reply * 12000
    assert len(writes) >= 12000 * len(reply) // cork.MAX_HELD_BYTES
    assert max(len(w) for w in writes) <= cork.MAX_HELD_BYTES + len(reply)


def test_pipelined_quit_and_too_many_errors_send_their_last_replies_before_closing():
    """The 221 (and the 421 after the error limit) leave before the close begins."""
    transport = RecordingTransport()
    s = Session(transport=transport).greeted()
    transport.take()
    s.send("NOOP\r\nQUIT\r\nNOOP\r\n")
    assert transport.writes == [(b"250 2.0.0 OK\r\n221 2.0.0 mx.test closing connection\r\n",
                                 False)]
    assert s.closed
    transport = RecordingTransport()
    s = Session(transport=transport, limits=SMTPLimits(max_errors=3)).greeted()
    transport.take()
    s.send("BOGUS\r\n" * 5)
    (data, closing), = transport.writes
    assert not closing and data.count(b"500 5.5.2") == 3 and b"421 4.7.0" in data
    assert s.closed


def test_a_spool_that_cannot_be_flushed_is_a_temporary_failure_of_that_message():
    """A disk full under a spooled body: 451 for that message, the session goes on."""
    s = Session().ready_for_data()
    s.send("DATA\r\nSubject: spooled\r\n\r\nbody\r\n")
    spool = s.protocol._txn.spool

    def full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    spool.flush = full
    s.send(".\r\n")
    assert starts(s.codes(), "354", "451 4.3.0")
    assert spool.closed and not s.closed and s.agent.deliveries == []
    s.send("MAIL FROM:<a@example.org>\r\n")
    assert starts(s.codes(), "250 2.1.0")


def test_reply_to_data_waits_for_a_slow_deliver_and_later_commands_wait_too():
    """While deliver() is pending, pipelined commands after the body are held."""
    agent = RecordingAgent()
    agent.hold_deliver = True
    s = Session(agent).ready_for_data()
    s.send("DATA\r\nx\r\n.\r\nNOOP\r\n")
    assert starts(s.codes(), "354")
    agent.held_deliveries[0].callback(None)
    assert starts(s.codes(), "250 2.0.0 OK", "250 2.0.0")


def test_transport_is_paused_when_input_piles_up_during_a_pending_command():
    """Back-pressure: over the buffer bound with a command in flight, reading pauses."""
    agent = RecordingAgent()
    agent.hold_recipients = True
    s = Session(agent, limits=SMTPLimits(max_buffered_input_bytes=1000)).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r@mx.test>\r\n")
    s.send("NOOP\r\n" * 300)
    assert s.transport.producerState == "paused"
    agent.release_recipients()
    assert s.transport.producerState == "producing"
    assert len(s.codes()) == 2 + 300


def test_commands_wait_and_reading_pauses_while_the_client_does_not_read_our_replies():
    """We are the transport's producer: with its write buffer full, commands queue up
    unanswered, and past the input bound reading pauses; all resumes once it drains."""
    s = Session(limits=SMTPLimits(max_buffered_input_bytes=1000)).greeted()
    assert s.transport.producer is s.protocol and s.transport.streaming
    s.protocol.pauseProducing()  # what the transport does when its write buffer is full
    s.send("NOOP\r\n")
    assert s.codes() == []
    assert s.transport.producerState == "producing"
    s.send("NOOP\r\n" * 200)
    assert s.transport.producerState == "paused"
    s.protocol.resumeProducing()
    assert len(s.codes()) == 201
    assert s.transport.producerState == "producing"


def test_closing_unregisters_the_producer_so_the_close_can_complete():
    """A still-registered paused producer would keep Twisted from finishing the close."""
    s = Session().greeted()
    s.protocol.pauseProducing()  # the client stopped reading...
    s.send("QUIT\r\n")
    s.clock.advance(300)  # ...so the idle timeout ends the session
    assert starts(s.codes(), "421 4.4.2")
    assert s.transport.producer is None
    assert s.closed


def test_connection_lost_during_deliver_writes_nothing_later():
    """A client that hangs up mid-delivery must not make us write to a dead transport."""
    agent = RecordingAgent()
    agent.hold_deliver = True
    s = Session(agent).ready_for_data()
    s.send("DATA\r\nx\r\n.\r\n")
    s.lines()
    s.protocol.connectionLost(None)
    agent.held_deliveries[0].callback(None)
    assert s.lines() == []


# --------------------------------------------------------------------------- BDAT


def test_bdat_chunks_are_concatenated_and_last_delivers():
    """BDAT n reads exactly n octets (no dot-stuffing); LAST ends the message."""
    s = Session().ready_for_data()
    s.send(b"BDAT 5\r\n.a\r\nbBDAT 3 LAST\r\n.\r\n")
    codes = s.codes()
    assert starts(codes, "250 2.0.0 5 octets", "250 2.0.0 OK")
    (_, data, _, _), = s.agent.deliveries
    assert data.endswith(b"+0000\r\n.a\r\nb.\r\n")


def test_bdat_zero_last_finishes_the_message_and_pipelined_commands_follow():
    """BDAT 0 LAST ends a chunked message; the next command in the packet then runs."""
    s = Session().ready_for_data()
    s.send(b"BDAT 4\r\nabcdBDAT 0 LAST\r\nNOOP\r\n")
    assert starts(s.codes(), "250 2.0.0 4 octets", "250 2.0.0 OK", "250 2.0.0")
    assert s.agent.deliveries[0][1].endswith(b"abcd")


def test_bdat_without_transaction_consumes_its_octets_then_503():
    """The chunk octets are read and discarded whatever the verdict: no smuggling."""
    s = Session().greeted()
    s.send(b"BDAT 10\r\nRSET\r\nQUITBDAT 0 LAST\r\n")
    assert starts(s.codes(), "503 5.5.1", "503 5.5.1")
    assert not s.closed


def test_bdat_over_the_size_limit_is_552_and_fails_the_transaction():
    """A chunk that overflows is consumed and refused; later chunks get 503."""
    s = Session(limits=SMTPLimits(max_message_size_bytes=10)).ready_for_data()
    s.send(b"BDAT 8\r\n12345678BDAT 3\r\n9abBDAT 1 LAST\r\nc")
    assert starts(s.codes(), "250 2.0.0", "552 5.3.4", "503 5.5.1")
    assert s.agent.deliveries == []


def test_bdat_exactly_at_the_size_limit_is_accepted():
    """Chunk octets are what is counted."""
    s = Session(limits=SMTPLimits(max_message_size_bytes=10)).ready_for_data()
    s.send(b"BDAT 10 LAST\r\n0123456789")
    assert starts(s.codes(), "250 2.0.0 OK")


def test_data_after_bdat_is_503_and_bdat_syntax_error_is_501():
    """A chunked transaction cannot switch to DATA; BDAT needs a size."""
    s = Session().ready_for_data()
    s.send(b"BDAT 1\r\nxDATA\r\nBDAT x\r\nBDAT 1 NOTLAST\r\n")
    assert starts(s.codes(), "250 2.0.0", "503 5.5.1", "501 5.5.4", "501 5.5.4")


def test_bdat_binarymime_is_accepted():
    """BODY=BINARYMIME with BDAT carries bare LF and NUL untouched."""
    s = Session().ready_for_data(mail_params=" BODY=BINARYMIME")
    s.send(b"BDAT 6 LAST\r\na\nb\x00\r\n")
    assert starts(s.codes(), "250 2.0.0 OK")
    assert s.agent.deliveries[0][1].endswith(b"a\nb\x00\r\n")


# --------------------------------------------------------------------------- STARTTLS


def test_starttls_discards_pipelined_plaintext_and_resets_state():
    """Bytes after STARTTLS in the same packet are dropped; EHLO is needed again."""
    s = Session(tls=True).greeted()
    s.send("MAIL FROM:<a@example.org>\r\n")
    s.lines()
    s.send("STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<v@mx.test>\r\n")
    assert s.lines() == ["220 2.0.0 Ready to start TLS"]
    assert s.transport.tls_started_with is s.protocol.tls_options
    assert s.transport.written_before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert s.agent.senders == ["a@example.org"]
    assert s.protocol.session.helo is None
    s.protocol.handshakeCompleted()
    assert s.protocol.session.tls_version == "TLSv1.3"
    s.send("MAIL FROM:<a@example.org>\r\n")
    assert starts(s.codes(), "503 5.5.1")
    s.send("EHLO client.example\r\n")
    lines = s.lines()
    assert lines[0] == "250-mx.test"
    assert "250-STARTTLS" not in lines and "250 STARTTLS" not in lines


def test_after_starttls_received_header_says_esmtps_with_tls_version_and_cipher():
    """RFC 3848 'with ESMTPS' plus the negotiated version and cipher."""
    s = Session(tls=True).greeted()
    s.send("STARTTLS\r\n")
    s.protocol.handshakeCompleted()
    s.ready_for_data()
    s.send("DATA\r\nx\r\n.\r\n")
    (_, data, _, session), = s.agent.deliveries
    assert (b"with ESMTPS\r\n\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)\r\n"
            in data)
    assert session.tls_cipher == "TLS_AES_256_GCM_SHA384"


def test_starttls_twice_is_503_and_without_tls_config_is_454():
    """STARTTLS inside TLS is bad sequence; without TLS settings it is 454 4.7.0."""
    s = Session(tls=True).greeted()
    s.send("STARTTLS\r\n")
    s.lines()
    s.send("STARTTLS\r\n")
    assert starts(s.codes(), "503 5.5.1")
    plain = Session().greeted()
    plain.send("STARTTLS\r\nSTARTTLS now\r\n")
    assert starts(plain.codes(), "454 4.7.0", "501 5.5.4")


def test_utf8smtps_with_protocol_in_received_for_smtputf8_over_tls():
    """RFC 6531: UTF8SMTPS when the transaction used SMTPUTF8 over TLS."""
    s = Session(tls=True).greeted()
    s.send("STARTTLS\r\n")
    s.protocol.handshakeCompleted()
    s.ready_for_data("ü@mx.test", mail_params=" SMTPUTF8")
    s.send("DATA\r\nx\r\n.\r\n")
    (_, data, _, _), = s.agent.deliveries
    assert b"with UTF8SMTPS" in data
    assert "for <ü@mx.test>".encode() in data


# --------------------------------------------------------------------------- limits


def test_too_many_errors_closes_with_421_4_7_0():
    """The max_errors-th error reply is followed by 421 and a hang-up."""
    s = Session(limits=SMTPLimits(max_errors=3)).greeted()
    s.send("FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    codes = s.codes()
    assert starts(codes, "500", "500", "500", "421 4.7.0")
    assert s.closed


def test_idle_command_timeout_is_421_4_4_2():
    """No command for command_timeout_s: 421 4.4.2 and close; activity restarts the clock."""
    s = Session().greeted()
    s.clock.advance(299)
    s.send("NOOP\r\n")
    s.clock.advance(299)
    assert not s.closed
    s.clock.advance(1)
    assert starts(s.codes(), "250", "421 4.4.2")
    assert s.closed
    s.protocol.connectionLost(None)
    assert s.clock.getDelayedCalls() == []


def test_data_block_timeout_is_shorter_than_the_command_timeout():
    """Inside DATA the client has data_block_timeout_s between blocks."""
    s = Session().ready_for_data()
    s.send("DATA\r\npartial")
    s.clock.advance(180)
    assert starts(s.codes(), "354", "421 4.4.2")
    assert s.closed


def test_no_timeout_fires_while_the_agent_is_working_but_the_agent_has_a_deadline():
    """The idle timer is off while we are busy; a hung agent becomes 451 after its deadline."""
    agent = RecordingAgent()
    agent.hold_recipients = True
    limits = SMTPLimits(check_timeout_s=240, command_timeout_s=100)
    s = Session(agent, limits=limits).greeted()
    s.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<r@mx.test>\r\n")
    s.clock.advance(239)
    assert starts(s.codes(), "250 2.1.0")
    s.clock.advance(1)
    assert starts(s.codes(), "451 4.3.0")
    assert not s.closed


def test_timer_is_cancelled_when_the_connection_is_lost():
    """No delayed calls outlive the session."""
    s = Session().greeted()
    s.protocol.connectionLost(None)
    assert s.clock.getDelayedCalls() == []


def _connect(factory: SMTPFactory, host: str) -> StringTransport:
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    protocol.makeConnection(transport)
    transport.protocol = protocol
    return transport


def test_factory_caps_connections_per_ip_and_in_total_with_421_4_7_0():
    """Over either cap a client gets 421 4.7.0 and is hung up on; closing frees the slot."""
    factory = SMTPFactory(RecordingAgent(), hostname="mx.test", clock=Clock(),
                          max_connections_per_ip=2, max_connections=3)
    a1, a2, a3 = (_connect(factory, "192.0.2.1") for _ in range(3))
    assert a1.value().startswith(b"220 ") and a2.value().startswith(b"220 ")
    assert a3.value().startswith(b"421 4.7.0 mx.test Too many connections from your address")
    assert a3.disconnecting
    b1 = _connect(factory, "192.0.2.2")
    assert b1.value().startswith(b"220 ")
    c1 = _connect(factory, "192.0.2.3")
    assert c1.value().startswith(b"421 4.7.0 mx.test Too many connections;")
    assert factory.connections == 3
    a1.protocol.connectionLost(None)
    assert factory.connections_by_ip == {"192.0.2.1": 1, "192.0.2.2": 1}
    assert _connect(factory, "192.0.2.3").value().startswith(b"220 ")


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(("path", "expected"), [
    ("user@Example.COM", "user@example.com"),
    ('"user"@example.com', "user@example.com"),
    ('"john doe"@example.com', '"john doe"@example.com'),
    ('"a\\"b"@example.com', '"a\\"b"@example.com'),
    ("@relay.example,@other.example:user@example.com", "user@example.com"),
    ("user@[192.0.2.1]", "user@[192.0.2.1]"),
    ("user@[IPv6:2001:DB8::1]", "user@[IPv6:2001:db8::1]"),
    ("first.last+tag@example.com.", "first.last+tag@example.com"),
    ("用户@例子.广告", "用户@例子.广告"),
])
def test_parse_path_accepts_rfc5321_forms_and_normalises(path, expected):
    """Quoted local parts, source routes, address literals and UTF-8 all parse."""
    assert parser.parse_path(path, kind="recipient") == expected


@pytest.mark.parametrize("path", [
    "user", "@example.com", "user@", "a..b@example.com", ".a@example.com",
    "user@-bad.example", "user@[300.1.1.1]", '"unterminated@example.com',
    "user@exa mple.com", "@relay:", "x" * 300 + "@example.com",
])
def test_parse_path_rejects_malformed_addresses(path):
    """Malformed paths raise CommandError carrying a 501."""
    with pytest.raises(CommandError) as info:
        parser.parse_path(path, kind="recipient")
    assert info.value.reply.code == 501


def test_parse_rcpt_accepts_bare_postmaster_and_rejects_null_path():
    """RCPT TO:<Postmaster> is always valid; RCPT TO:<> is not."""
    assert parser.parse_rcpt_to("TO:<Postmaster>") == ("postmaster", {})
    with pytest.raises(CommandError):
        parser.parse_rcpt_to("TO:<>")


def test_parse_mail_from_splits_params_and_allows_a_quoted_bracket():
    """A '>' inside a quoted local part does not end the path."""
    address, params = parser.parse_mail_from('FROM:<"a>b"@example.com> size=10 BODY=8BITMIME')
    assert address == '"a>b"@example.com'
    assert params == {"SIZE": "10", "BODY": "8BITMIME"}


def test_data_decoder_flags_long_lines_and_returns_the_bytes_after_the_end():
    """The decoder reports over-long lines and hands back pipelined bytes."""
    decoder = DataDecoder(max_line_bytes=10)
    body, rest = decoder.feed(b"12345678\r\n123456789\r\n.\r\nNOOP\r\n")
    assert body == b"12345678\r\n123456789\r\n"
    assert rest == b"NOOP\r\n"
    assert decoder.line_too_long


# --------------------------------------------------------------------------- replies


def test_reply_renders_multiline_and_strips_line_breaks_from_text():
    """Text cannot inject a second reply line."""
    reply = Reply(250, "2.0.0", ["one", "two\r\n250 forged"])
    assert reply.render() == b"250-2.0.0 one\r\n250 2.0.0 two??250 forged\r\n"


def test_a_reply_is_rendered_once_and_stays_a_plain_value():
    """The wire form is kept on the reply (constant replies go with every message); the
    kept bytes are no field: equality and hashing are those of a fresh reply."""
    reply = Reply(250, "2.1.5", "Recipient OK")
    wire = reply.render()
    assert wire == b"250 2.1.5 Recipient OK\r\n"
    assert reply.render() is wire
    fresh = Reply(250, "2.1.5", "Recipient OK")
    assert reply == fresh and hash(reply) == hash(fresh)
    assert str(reply) == "250 2.1.5 Recipient OK"


def test_a_cork_batch_holds_until_the_outermost_ends_even_on_an_error():
    sent: list[bytes] = []
    out = cork.Cork(sent.append)
    with pytest.raises(RuntimeError):
        with out.batch():
            out.write(b"a")
            with out.batch():
                out.write(b"b")
            assert sent == []  # the inner batch's end does not flush
            raise RuntimeError("a bug in a command")
    assert sent == [b"ab"]  # flushed on the way out, and the error went on
    out.write(b"c")
    assert sent == [b"ab", b"c"]  # no batch left open: at once


def test_commands_answered_at_once_keep_the_session_timer():
    """A MAIL and a RCPT whose checks answer synchronously (a cached route) are sent as
    plain replies: the session's one timer is moved, never cancelled and replaced, and
    the next command is due a command timeout after the last reply."""
    s = Session().greeted()
    timer = s.protocol._timer
    assert timer is not None and timer.active()
    s.clock.advance(5)
    s.send("MAIL FROM:<a@example.org>\r\n")
    s.clock.advance(5)
    s.send("RCPT TO:<r1@mx.test>\r\n")
    assert starts(s.codes(), "250 2.1.0", "250 2.1.5")
    assert s.protocol._timer is timer and timer.active()
    assert timer.getTime() == s.clock.seconds() + SMTPLimits().command_timeout_s
    assert not s.protocol._busy
    s.clock.advance(SMTPLimits().command_timeout_s)
    assert starts(s.codes(), "421 4.4.2") and s.closed


def test_reply_rejects_enhanced_code_class_mismatch():
    """A 5xx reply cannot carry a 2.x.x enhanced code."""
    with pytest.raises(ValueError, match="disagrees"):
        Reply(550, "2.0.0", "no")


@pytest.mark.parametrize(("error", "code", "enhanced"), [
    (errors.UnknownRecipient(), 550, "5.1.1"),
    (errors.RelayDenied(), 550, "5.7.1"),
    (errors.SenderBlocked(), 550, "5.7.1"),
    (errors.MessageTooLarge(), 552, "5.3.4"),
    (errors.TemporaryFailure(), 451, "4.3.0"),
    (errors.StorageFailure(), 451, "4.3.0"),
    (errors.RateLimited(5), 451, "4.7.0"),
    (errors.Conflict(), 451, "4.3.0"),  # unmapped domain error: temporary, never 5xx
    (RuntimeError("x"), 451, "4.3.0"),
])
def test_error_table(error, code, enhanced):
    """The one translation table from domain errors to SMTP replies."""
    reply = reply_for_error(error)
    assert (reply.code, reply.enhanced) == (code, enhanced)
