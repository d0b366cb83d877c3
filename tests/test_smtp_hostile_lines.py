"""Hostile-client review of the SMTP listeners' line handling (smtphostile): each test
is an attack or a conformance probe that failed before its fix.

- An over-long command line whose end was already buffered took the *next* command
  with it: the server skipped to the following line end, so a pipelining client (or
  one that simply sent both lines in one packet) never got a reply to that command and
  waited until a timeout.
- An over-long line in an AUTH exchange (RFC 4954 §4) answered ``500 5.5.2`` and left
  the exchange open: the client's next command was read as a base64 response.  It now
  answers ``500 5.5.6`` and ends the exchange.

Real server, real sockets, raw bytes (smtplib would not send these).
"""

from __future__ import annotations

import base64
import socket
import ssl

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS

LONG = 3000  # over the 1536-octet command line limit


class Wire:
    """A raw SMTP client: send bytes, read whole replies (a list of lines)."""

    def __init__(self, port: int, *, tls: bool = False) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=20)
        if tls:
            self.starttls()
        self.buf = b""
        self.greeting = self.reply()

    def starttls(self) -> None:
        context = ssl.create_default_context(cafile=_DEV_TLS["ca"])
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError(self.buf)
                self.buf += data
            line, _, self.buf = self.buf.partition(b"\r\n")
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def cmd(self, line: bytes | str) -> list[bytes]:
        data = line.encode() if isinstance(line, str) else line
        self.sock.sendall(data + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def _sender(server) -> tuple[str, str]:
    """A sending inbox's address and a key that may send as it."""
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "lines"}, key=owner)).json
    made = await server.api.post("/api/v1/api-keys", {"name": "smtp",
                                                      "scopes": ["messages:send"]}, key=owner)
    assert made.status == 201, made
    return inbox["email"], made.json["key"]


@pytest_twisted.ensureDeferred
async def test_an_over_long_line_sent_with_the_next_command_does_not_swallow_it(server):
    def session():
        wire = Wire(server.mx_port)
        try:
            wire.cmd("EHLO client.test")
            # One packet: the long line, its CRLF, and a NOOP.
            too_long = wire.cmd(b"EHLO " + b"a" * LONG + b"\r\nNOOP")
            noop = wire.reply()
            # And a long line that arrives in pieces still skips only itself.
            wire.sock.sendall(b"HELO " + b"b" * LONG)
            second = wire.reply()
            wire.sock.sendall(b"b" * LONG + b"\r\nRSET\r\n")
            rset = wire.reply()
            return too_long, noop, second, rset
        finally:
            wire.close()

    too_long, noop, second, rset = await deferToThread(session)
    assert too_long == [b"500 5.5.2 Line too long"]
    assert noop == [b"250 2.0.0 OK"]
    assert second == [b"500 5.5.2 Line too long"]
    assert rset == [b"250 2.0.0 OK"]


@pytest_twisted.ensureDeferred
async def test_an_over_long_auth_response_ends_the_exchange_with_5_5_6(server):
    address, key = await _sender(server)

    def session():
        wire = Wire(server.submissions_port, tls=True)
        try:
            wire.cmd("EHLO client.test")
            login = [wire.cmd("AUTH LOGIN"), wire.cmd("A" * LONG), wire.cmd("NOOP")]
            plain = [wire.cmd("AUTH PLAIN " + "A" * LONG), wire.cmd("NOOP")]
            pipelined = wire.cmd("AUTH PLAIN " + "A" * LONG + "\r\nNOOP")
            after = wire.reply()
            # The session is sound: a proper AUTH still works.
            ok = wire.cmd("AUTH PLAIN " + _b64(f"\0{address}\0{key}"))
            return login, plain, pipelined, after, ok
        finally:
            wire.close()

    login, plain, pipelined, after, ok = await deferToThread(session)
    too_long = [b"500 5.5.6 Authentication Exchange line is too long"]
    assert login == [[b"334 VXNlcm5hbWU6"], too_long, [b"250 2.0.0 OK"]]
    assert plain == [too_long, [b"250 2.0.0 OK"]]
    assert pipelined == too_long and after == [b"250 2.0.0 OK"]
    assert ok == [b"235 2.7.0 Authentication successful"]


@pytest_twisted.ensureDeferred
async def test_auth_pipelined_with_starttls_on_submission_is_discarded(server):
    """CVE-2011-0411 class on the port that takes credentials: a valid AUTH sent in the
    same packet as STARTTLS must not authenticate the TLS session (a man in the middle
    could otherwise prefix commands of his own)."""
    address, key = await _sender(server)

    def session():
        wire = Wire(server.submission_port)
        try:
            wire.cmd("EHLO client.test")
            auth = "AUTH PLAIN " + _b64(f"\0{address}\0{key}")
            ready = wire.cmd(f"STARTTLS\r\n{auth}\r\nMAIL FROM:<{address}>")
            wire.starttls()
            ehlo = wire.cmd("EHLO client.test")
            mail = wire.cmd(f"MAIL FROM:<{address}>")
            return ready, ehlo, mail
        finally:
            wire.close()

    ready, ehlo, mail = await deferToThread(session)
    assert ready == [b"220 2.0.0 Ready to start TLS"]
    assert b"250 AUTH PLAIN LOGIN" in ehlo or b"250-AUTH PLAIN LOGIN" in ehlo
    assert mail == [b"530 5.7.0 Authentication required"]
