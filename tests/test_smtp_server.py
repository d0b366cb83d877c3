"""Integration tests of the SMTP listener: real sockets on 127.0.0.1, real TLS, real clients.

Blocking clients (smtplib, raw sockets) run in threads via ``deferToThread`` so the
reactor keeps serving them.  The delivery agent is an in-test recorder: this file
tests the SMTP door, not the ingest path behind it.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from agentpost.dev.tls import ensure_dev_tls
from agentpost.smtp.interfaces import Envelope, SessionInfo
from agentpost.smtp.listener import SMTPFactory, listen_smtp
from agentpost.tls import server_tls_options

MAX_SIZE = 10_485_760


class RecordingAgent:
    """Accepts every sender and recipient and keeps what was delivered."""

    def __init__(self) -> None:
        self.senders: list[str] = []
        self.deliveries: list[tuple[Envelope, bytes, int, SessionInfo]] = []

    async def check_sender(self, session: SessionInfo, mail_from: str) -> None:
        self.senders.append(mail_from)

    async def check_recipient(self, session: SessionInfo, mail_from: str, rcpt: str) -> str:
        return rcpt

    async def deliver(self, session: SessionInfo, envelope: Envelope, message: Any,
                      size: int) -> None:
        data = message.read()
        assert len(data) == size
        self.deliveries.append((envelope, data, size, session))


class Running:
    """A listener started for one test."""

    def __init__(self, agent: RecordingAgent, factory: SMTPFactory, port: int) -> None:
        self.agent = agent
        self.factory = factory
        self.port = port


@pytest.fixture(scope="module")
def dev_tls(tmp_path_factory):
    """The development CA and a server certificate for localhost/127.0.0.1."""
    return ensure_dev_tls(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture
def client_context(dev_tls):
    """A verifying client context that trusts only the dev CA."""
    return ssl.create_default_context(cafile=str(dev_tls.ca_cert))


@pytest_twisted.async_yield_fixture
async def serve(dev_tls):
    """Start SMTP listeners on 127.0.0.1:0; stop them after the test."""
    ports = []

    async def start(*, starttls: bool = True, implicit_tls: bool = False,
                    **kwargs: Any) -> Running:
        agent = RecordingAgent()
        options = server_tls_options(str(dev_tls.cert), str(dev_tls.key))
        factory = SMTPFactory(agent, hostname="localhost", clock=reactor,
                              tls_options=options if starttls else None,
                              implicit_tls=options if implicit_tls else None, **kwargs)
        port = await listen_smtp(reactor, factory, "127.0.0.1", 0)
        ports.append(port)
        return Running(agent, factory, port.getHost().port)

    yield start
    for port in ports:
        await port.stopListening()


class RawClient:
    """A line-reading SMTP client on a plain socket that can switch to TLS."""

    def __init__(self, port: int) -> None:
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        """Read one complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}, buffer {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] == b" ":
                return lines

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.buffer == b"", f"cleartext bytes after the 220: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def at_eof(self) -> bool:
        return self.buffer == b"" and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def _lines_of(size: int) -> bytes:
    """A message of exactly ``size`` octets in CRLF lines, some starting with a dot."""
    head = b"Subject: size test\r\n\r\n.dot-stuffed on the wire\r\n"
    line = b"x" * 76 + b"\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size - 2:
        body += line
    filler = size - len(body) - 2
    body += b"." * filler + b"\r\n"  # the last line starts with dots, too
    assert len(body) == size
    return bytes(body)


# --------------------------------------------------------------------------- tests


@pytest_twisted.ensureDeferred
async def test_smtplib_starttls_verifies_the_certificate_and_delivers_with_tls_in_received(
        serve, client_context):
    """EHLO → STARTTLS (verified against the dev CA) → EHLO → MAIL/RCPT/DATA → 250."""
    server = await serve()

    def client() -> tuple[str, str, dict[str, str]]:
        with smtplib.SMTP("localhost", server.port, local_hostname="client.example",
                          timeout=10) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("starttls")
            code, _ = smtp.starttls(context=client_context)
            assert code == 220
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            features = dict(smtp.esmtp_features)
            refused = smtp.sendmail("sender@example.org", ["rcpt@localhost"],
                                    b"Subject: over TLS\r\n\r\nhello\r\n")
            assert refused == {}
            version, cipher = smtp.sock.version(), smtp.sock.cipher()[0]
        return version, cipher, features

    version, cipher, features = await deferToThread(client)
    assert features["size"] == str(MAX_SIZE)
    assert {"pipelining", "8bitmime", "enhancedstatuscodes", "smtputf8", "chunking"} <= set(
        features)
    (envelope, data, _, session), = server.agent.deliveries
    assert envelope.recipient_addresses == ["rcpt@localhost"]
    assert session.tls_version == version and session.tls_cipher == cipher
    assert f"with ESMTPS\r\n\t(version={version} cipher={cipher})".encode() in data
    assert data.startswith(b"Return-Path: <sender@example.org>\r\nReceived: from client.example")
    assert data.endswith(b"Subject: over TLS\r\n\r\nhello\r\n")


@pytest_twisted.ensureDeferred
async def test_plaintext_pipelined_after_starttls_is_discarded_over_a_real_tls_socket(
        serve, client_context):
    """'STARTTLS\\r\\nRSET\\r\\nMAIL…' in one packet: the injected commands never run."""
    server = await serve()

    def client() -> list[list[str]]:
        c = RawClient(server.port)
        try:
            seen = [c.reply()]
            c.send(b"EHLO client.example\r\n")
            seen.append(c.reply())
            c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n")
            seen.append(c.reply())
            c.starttls(client_context)
            c.send(b"MAIL FROM:<honest@example.org>\r\n")
            seen.append(c.reply())
            c.send(b"NOOP\r\nQUIT\r\n")
            seen.append(c.reply())
            seen.append(c.reply())
            assert c.at_eof()
            return seen
        finally:
            c.close()

    seen = await deferToThread(client)
    assert seen[2] == ["220 2.0.0 Ready to start TLS"]
    assert seen[3][0].startswith("503 5.5.1")  # not 250 to RSET: EHLO is needed again
    assert seen[4][0].startswith("250 2.0.0")
    assert seen[5][0].startswith("221 2.0.0")
    assert server.agent.senders == []


@pytest_twisted.ensureDeferred
async def test_message_of_exactly_10_mib_is_accepted_and_one_octet_more_is_552(serve):
    """The limit counts message octets after dot-unstuffing, not our added headers."""
    server = await serve(starttls=False)
    exact = _lines_of(MAX_SIZE)
    over = _lines_of(MAX_SIZE + 1)

    def client() -> tuple[Any, Any, Any]:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            # sendmail declares SIZE=len(message): exactly the limit is fine.
            accepted = smtp.sendmail("a@example.org", ["r@localhost"], exact)
            # Undeclared, one octet over: refused after the body, with 552 5.3.4.
            smtp.mail("a@example.org")
            smtp.rcpt("r@localhost")
            counted = smtp.data(over)
            # Declared one octet over: refused at MAIL before any body is sent.
            declared = smtp.mail("a@example.org", [f"SIZE={MAX_SIZE + 1}"])
            smtp.rset()
        return accepted, counted, declared

    accepted, counted, declared = await deferToThread(client)
    assert accepted == {}
    assert counted[0] == 552 and counted[1].startswith(b"5.3.4")
    assert declared[0] == 552 and declared[1].startswith(b"5.3.4")
    (_, data, size, _), = server.agent.deliveries
    assert data.endswith(exact)
    assert size == len(data) > MAX_SIZE  # our headers come on top of the limit
    assert data[: -len(exact)].startswith(b"Return-Path: <a@example.org>\r\nReceived: ")


@pytest_twisted.ensureDeferred
async def test_smtputf8_addresses_and_8bit_utf8_headers_via_smtplib(serve):
    """RFC 6531: UTF-8 envelope addresses with SMTPUTF8; UTF-8 headers pass byte-exact."""
    server = await serve(starttls=False)
    message = ("From: Jöran <jöran@exämple.org>\r\nTo: Ünï <ünïcode@localhost>\r\n"
               "Subject: Grüße, 你好\r\n\r\nKörper\r\n").encode()

    def client() -> Any:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
            refused = smtp.sendmail("jöran@EXÄMPLE.org", ["ünïcode@localhost"], message,
                                    mail_options=["SMTPUTF8", "BODY=8BITMIME"])
            # Without SMTPUTF8 the same sender is refused with 553 5.6.7.
            smtp.command_encoding = "utf-8"
            plain = smtp.mail("jöran@exämple.org")
        return refused, plain

    refused, plain = await deferToThread(client)
    assert refused == {}
    assert plain[0] == 553 and plain[1].startswith(b"5.6.7")
    (envelope, data, _, _), = server.agent.deliveries
    assert envelope.mail_from == "jöran@exämple.org"
    assert envelope.recipient_addresses == ["ünïcode@localhost"]
    assert envelope.smtputf8 and envelope.body_8bitmime
    assert data.endswith(message)
    assert "Return-Path: <jöran@exämple.org>".encode() in data
    assert b"with UTF8SMTP\r\n" in data


@pytest_twisted.ensureDeferred
async def test_pipelined_commands_on_a_real_socket_are_answered_in_order(serve):
    """RFC 2920: one packet of MAIL/RCPT/RCPT/DATA gets four replies in order."""
    server = await serve(starttls=False)

    def client() -> list[list[str]]:
        c = RawClient(server.port)
        try:
            c.reply()
            c.send(b"EHLO client.example\r\n")
            c.reply()
            c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@localhost>\r\n"
                   b"RCPT TO:<bad address>\r\nDATA\r\n")
            replies = [c.reply() for _ in range(4)]
            c.send(b"pipelined body\r\n.\r\nQUIT\r\n")
            replies += [c.reply(), c.reply()]
            return replies
        finally:
            c.close()

    replies = await deferToThread(client)
    codes = [r[-1][:3] for r in replies]
    assert codes == ["250", "250", "501", "354", "250", "221"]
    assert server.agent.deliveries[0][1].endswith(b"pipelined body\r\n")


@pytest_twisted.ensureDeferred
async def test_thousands_of_pipelined_commands_are_all_answered_in_order(serve):
    """A client that pipelines 20,000 commands before reading a reply (sent from its own
    thread, so neither side waits on the other's buffer) gets every reply, in order:
    replies held to go out together are never held back for good, whatever the
    transport's flow control does meanwhile."""
    server = await serve(starttls=False)
    count = 20_000

    def client() -> tuple[list[str], list[str]]:
        c = RawClient(server.port)
        try:
            c.reply()
            c.send(b"EHLO client.example\r\n")
            c.reply()
            flood = b"".join(b"NOOP\r\n" if i % 7 else b"RSET\r\n" for i in range(count))
            sender = threading.Thread(target=c.send, args=(flood + b"QUIT\r\n",))
            sender.start()
            replies = [c.reply()[-1] for _ in range(count)]
            last = c.reply()
            sender.join(30)
            return replies, last
        finally:
            c.close()

    replies, last = await deferToThread(client)
    assert replies == ["250 2.0.0 OK"] * count
    assert last[0].startswith("221 2.0.0")


@pytest_twisted.ensureDeferred
async def test_connections_over_the_per_ip_cap_get_421_and_a_freed_slot_is_reusable(serve):
    """The factory refuses the third connection from one address with 421 4.7.0."""
    server = await serve(starttls=False, max_connections_per_ip=2)

    def client() -> tuple[list[str], list[str], list[str], bool]:
        first, second = RawClient(server.port), RawClient(server.port)
        third = None
        try:
            greetings = [first.reply()[0], second.reply()[0]]
            third = RawClient(server.port)
            refusal = third.reply()
            closed = third.at_eof()
            first.send(b"QUIT\r\n")
            first.reply()
            first.close()
            deadline = time.monotonic() + 5
            while True:  # the server frees the slot when it sees the close
                again = RawClient(server.port)
                answer = again.reply()
                again.close()
                if answer[0].startswith("220") or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            return greetings, refusal, answer, closed
        finally:
            for c in (first, second, third):
                if c is not None:
                    c.close()

    greetings, refusal, answer, closed = await deferToThread(client)
    assert all(g.startswith("220 ") for g in greetings)
    assert refusal[0].startswith("421 4.7.0")
    assert closed
    assert answer[0].startswith("220 ")


@pytest_twisted.ensureDeferred
async def test_implicit_tls_listener_serves_smtp_inside_tls_without_offering_starttls(
        serve, client_context):
    """The implicit-TLS hook (port 465 style): TLS from the first byte, ESMTPS in Received."""
    server = await serve(starttls=False, implicit_tls=True)

    def client() -> tuple[bool, str]:
        with smtplib.SMTP_SSL("localhost", server.port, context=client_context,
                              timeout=10) as smtp:
            smtp.ehlo()
            offers_starttls = smtp.has_extn("starttls")
            smtp.sendmail("a@example.org", ["r@localhost"], b"Subject: tls\r\n\r\nx\r\n")
            return offers_starttls, smtp.sock.version()

    offers_starttls, version = await deferToThread(client)
    assert not offers_starttls
    (_, data, _, _), = server.agent.deliveries
    assert f"with ESMTPS\r\n\t(version={version} ".encode() in data
