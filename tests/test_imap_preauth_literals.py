"""Before login no literal may be message-sized: ``APPEND {64 MiB+}`` from a stranger
is refused (and its bytes skipped) under the 64 KiB small-literal limit, never held or
spooled. The mailbox-name literal of an APPEND after login is small-limited too."""

import socket

import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap.reader import MAX_SMALL_LITERAL_BYTES


def _exchange(port: int, payload: bytes, until: bytes) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    f = sock.makefile("rb")
    f.readline()  # greeting
    sock.sendall(payload)
    out = b""
    while until not in out:
        line = f.readline()
        if not line:
            break
        out += line
    sock.close()
    return out


@pytest_twisted.ensureDeferred
async def test_a_stranger_cannot_send_a_message_sized_literal(server):
    big = MAX_SMALL_LITERAL_BYTES + 1
    payload = (f"a APPEND {{{big}+}}\r\n".encode() + b"x" * big + b"\r\nb NOOP\r\n")
    out = await deferToThread(_exchange, server.imap_port, payload, b"b OK")
    assert b"a NO [TOOBIG]" in out, out
    assert b"b OK" in out  # the refused literal was skipped, the session goes on


@pytest_twisted.ensureDeferred
async def test_a_stranger_is_not_invited_to_send_a_big_synchronizing_literal(server):
    big = MAX_SMALL_LITERAL_BYTES + 1
    out = await deferToThread(_exchange, server.imap_port,
                              f"a APPEND INBOX {{{big}}}\r\n".encode(), b"a ")
    assert b"+ " not in out and b"a NO [TOOBIG]" in out, out
