"""Hostile review of the SMTP cork (agentpost.cork in smtp.server): replies to
pipelined commands are held and sent together. Against a real MX on a real socket: a
burst whose recipient checks wait on the database gets every reply, in order, without
more input; replies held when the error limit closes the session all leave before the
close, and nothing follows it."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.imap_client import new_inbox


def _replies(sock, count: int) -> list[str]:
    """``count`` complete SMTP replies (their last lines), read with a deadline."""
    buf = b""
    out: list[str] = []
    while len(out) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            if len(line) >= 4 and line[3:4] == b" ":
                out.append(line.decode())
    return out


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_waiting_on_the_database_are_all_sent_in_order(server):
    """A burst whose RCPTs wait on real database lookups, then more commands behind
    them: every reply arrives, in order, without the client sending anything more."""
    inbox, _ = await new_inbox(server, "cork-order")

    def client() -> list[str]:
        with socket.create_connection(("127.0.0.1", server.mx_port), timeout=20) as sock:
            _replies(sock, 1)
            sock.sendall(b"EHLO client.test\r\n")
            _replies(sock, 1)
            sock.sendall(b"MAIL FROM:<a@example.com>\r\n"
                         b"RCPT TO:<" + inbox["email"].encode() + b">\r\n"
                         b"RCPT TO:<nobody-here-at-all@" + inbox["email"].split("@")[1].encode()
                         + b">\r\nRSET\r\nNOOP\r\nMAIL FROM:<b@example.com>\r\n"
                         b"RCPT TO:<" + inbox["email"].encode() + b">\r\nDATA\r\n")
            got = _replies(sock, 8)
            sock.sendall(b"Subject: cork\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            return got + _replies(sock, 2)

    got = await deferToThread(client)
    codes = [r[:3] for r in got]
    assert codes[:2] == ["250", "250"] and codes[2][0] == "5", got
    assert codes[3:] == ["250", "250", "250", "250", "354", "250", "221"], got


@pytest_twisted.ensureDeferred
async def test_too_many_pipelined_errors_flush_every_reply_before_the_close(server):
    """Thirty bad commands in one packet: ten error replies, the 421, then the close --
    none of the held replies is lost to the close, none follows it."""
    def client() -> tuple[list[str], bytes]:
        with socket.create_connection(("127.0.0.1", server.mx_port), timeout=20) as sock:
            _replies(sock, 1)
            sock.sendall(b"EHLO client.test\r\n")
            _replies(sock, 1)
            sock.sendall(b"BOGUS\r\n" * 30)
            got = _replies(sock, 11)
            rest = b""
            while chunk := sock.recv(65536):
                rest += chunk
            return got, rest

    got, rest = await deferToThread(client)
    assert [r[0] for r in got[:10]] == ["5"] * 10, got
    assert len(got) == 11 and got[-1].startswith("421") and rest == b"", (got, rest)
