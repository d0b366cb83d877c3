"""The IMAP output cork (agentpost.cork) on real sockets: a command's responses
are collected and leave in one send, straight to the socket on plain TCP.

What must not change with it: pipelined commands are answered in order and completely,
continuation requests leave at once (the client waits for them), a large FETCH streams
under the producer's flow control, COMPRESS=DEFLATE compresses what leaves, LOGOUT's BYE
and OK arrive before the close. The server allows plaintext login on loopback so the
direct-to-socket path is the one under test (over TLS it falls back to the transport).
"""

from __future__ import annotations

import socket
import time
import zlib

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import make_config, start_server
from tests.imap_client import Client, Lit, new_login
from tests.mailfactory import make_message
from tests.test_imap_e2e import _big_message

_READ_ONLY = ["EXAMINE INBOX", "NOOP", "FETCH 1:* (FLAGS UID RFC822.SIZE)",
              "UID SEARCH ALL", 'STATUS "INBOX" (MESSAGES UIDNEXT)', "CAPABILITY",
              "FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])", 'LIST "" "*"', "ID NIL",
              "UID FETCH 1:* (FLAGS)", "NAMESPACE"]


@pytest_twisted.async_yield_fixture
async def plain_server(db_dsn, openapi_checker):
    """A server whose IMAP port allows LOGIN in the clear from loopback."""
    running = await start_server(make_config(db_dsn, imap={"allow_plaintext_login": True}),
                                 openapi_checker)
    yield running
    await running.service.stopService()


async def _filled_login(server, name: str, count: int = 5) -> tuple[str, str]:
    user, key = await new_login(server, name)
    for n in range(count):
        raw = make_message(to=user, subject=f"cork {n}", msgid=f"<cork{n}.{name}@x>")
        await server.deliver(raw, [user])
    return user, key


def _read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest_twisted.ensureDeferred
async def test_a_pipelined_burst_is_answered_in_order_byte_for_byte(plain_server):
    """Sixty read-only commands in one send: the transcript equals the one of the same
    commands sent one at a time, tag by tag."""
    user, key = await _filled_login(plain_server, "cork-burst")
    commands = [(f"p{i}", _READ_ONLY[i % len(_READ_ONLY)]) for i in range(60)]

    def run() -> tuple[bytes, bytes]:
        one = Client(plain_server.imap_port, user, key, tls="none")
        burst = Client(plain_server.imap_port, user, key, tls="none")
        try:
            sequential = b"".join(line + b"\r\n" for tag, text in commands
                                  for line in one.tagged(tag, text))
            burst.send(b"".join(f"{tag} {text}\r\n".encode() for tag, text in commands))
            pipelined = b"".join(line + b"\r\n" for tag, _ in commands
                                 for line in burst.response(tag))
            assert burst.quiet(0.3) == []
            return sequential, pipelined
        finally:
            one.close()
            burst.close()

    sequential, pipelined = await deferToThread(run)
    assert pipelined == sequential
    tags = [line.split(b" ")[0] for line in pipelined.split(b"\r\n")
            if line and not line.startswith((b"*", b"+")) and b" OK " in line]
    assert tags == [tag.encode() for tag, _ in commands]


@pytest_twisted.ensureDeferred
async def test_continuation_requests_leave_while_pipelined_answers_are_held(plain_server):
    """A command and an APPEND with a synchronizing literal in one send: the first one's
    answer and the ``+`` arrive without the client sending anything more; so does
    AUTHENTICATE's ``+`` and IDLE's."""
    user, key = await _filled_login(plain_server, "cork-cont", count=1)
    message = make_message(to=user, subject="appended", msgid="<cork-app@x>")

    def run() -> list[list[bytes]]:
        client = Client(plain_server.imap_port, user, key, tls="none")
        stranger = Client(plain_server.imap_port, tls="none")
        try:
            client.send(b"c1 SELECT INBOX\r\nc2 APPEND INBOX {%d}\r\n" % len(message))
            head = client.response("c1")
            invited = client.line()
            client.send(message + b"\r\n")
            appended = client.response("c2")
            client.send(b"c3 NOOP\r\nc4 IDLE\r\n")
            idle = [*client.response("c3"), client.line()]
            client.send(b"DONE\r\n")
            idle += client.response("c4")
            stranger.send(b"s1 CAPABILITY\r\ns2 AUTHENTICATE PLAIN\r\n")
            auth = [*stranger.response("s1"), stranger.line()]
            stranger.send(b"*\r\n")
            auth += stranger.response("s2")
            return [head, [invited], appended, idle, auth]
        finally:
            client.close()
            stranger.close()

    head, invited, appended, idle, auth = await deferToThread(run)
    assert head[-1].startswith(b"c1 OK [READ-WRITE]"), head
    assert invited[0].startswith(b"+ "), invited
    assert appended[-1].startswith(b"c2 OK [APPENDUID "), appended
    assert idle[-3].startswith(b"c3 OK") and idle[-2].startswith(b"+ "), idle
    assert idle[-1].startswith(b"c4 OK"), idle
    assert auth[1] == b"s1 OK CAPABILITY completed" and auth[2].startswith(b"+"), auth
    assert auth[-1].startswith(b"s2 BAD"), auth


@pytest_twisted.ensureDeferred
async def test_a_large_fetch_streams_to_a_slow_reader_then_logout_closes(plain_server):
    """An 8 MB body to a client that does not read at first: more than the kernel's
    buffers of both sides hold (a send buffer grows to 4 MB at most, the client's
    receive buffer is 0.5 MB here), so the producer pauses. Byte-exact, followed by the
    pipelined NOOP, BYE and LOGOUT's OK, then the close."""
    user, key = await new_login(plain_server, "cork-big")
    raw = _big_message(user, 8_000_000)
    await plain_server.deliver(raw, [user])

    def run() -> bytes:
        client = Client(plain_server.imap_port, user, key, tls="none")
        try:
            client.ok("SELECT INBOX")
            # A small window, but not under one loopback segment (64 KiB): below that
            # the sender only probes a zero window on its persist timer (a 4 KiB
            # buffer made 4 MB take ~100 s).
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            client.send(b"f FETCH 1 BODY.PEEK[]\r\nn NOOP\r\nq LOGOUT\r\n")
            time.sleep(1.0)  # not reading: the server's output backs up
            return bytes(client.buffer) + _read_until_closed(client.sock)
        finally:
            client.close()

    received = await deferToThread(run)
    _, after = _around_body(received, raw)
    tail = after.split(b"\r\n")
    assert tail[0] == b")" and tail[1].startswith(b"f OK"), tail[:3]
    assert tail[2].startswith(b"n OK") and tail[3].startswith(b"* BYE"), tail
    assert tail[4].startswith(b"q OK") and tail[5:] == [b""], tail


def _around_body(received: bytes, raw: bytes) -> tuple[bytes, bytes]:
    """What came before and after the BODY[] literal, which must be ``raw`` exactly."""
    marker = b"BODY[] {%d}\r\n" % len(raw)
    start = received.index(marker) + len(marker)
    assert received[start:start + len(raw)] == raw
    return received[:start], received[start + len(raw):]


@pytest_twisted.ensureDeferred
async def test_compress_deflate_in_the_clear_with_a_burst_and_logout(plain_server):
    """COMPRESS=DEFLATE on plain TCP: the OK uncompressed, then a pipelined burst (a
    1 MB body among small answers) and LOGOUT inflate to every answer in order, BYE and
    the last OK before the close."""
    user, key = await new_login(plain_server, "cork-zip")
    raw = _big_message(user, 1_000_000)
    await plain_server.deliver(raw, [user])
    burst = [("s", "SELECT INBOX"), ("a", "NOOP"), ("f", "FETCH 1 BODY.PEEK[]"),
             ("b", "UID SEARCH ALL"), ("c", "FETCH 1 (FLAGS)"), ("q", "LOGOUT")]

    def run() -> bytes:
        client = Client(plain_server.imap_port, user, key, tls="none")
        try:
            assert client.tagged("z", "COMPRESS DEFLATE") == [b"z OK DEFLATE active"]
            assert not client.buffer
            out, inflate = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
            text = b"".join(f"{tag} {cmd}\r\n".encode() for tag, cmd in burst)
            client.send(out.compress(text) + out.flush(zlib.Z_SYNC_FLUSH))
            return inflate.decompress(_read_until_closed(client.sock))
        finally:
            client.close()

    received = await deferToThread(run)
    before, after = _around_body(received, raw)
    lines = (before + after).split(b"\r\n")
    tagged = [line.split(b" ")[0] for line in lines if line[:1].isalpha()]
    assert tagged == [tag.encode() for tag, _ in burst]
    assert all(line.split(b" ")[1] == b"OK" for line in lines if line[:1].isalpha())
    assert lines[-3].startswith(b"* BYE") and lines[-1] == b"", lines[-3:]


@pytest_twisted.ensureDeferred
async def test_literal_plus_burst_of_appends_then_fetch(plain_server):
    """APPENDs with LITERAL+ literals pipelined with a FETCH: every APPENDUID in order,
    and the FETCH sees every message."""
    user, key = await new_login(plain_server, "cork-lit")
    messages = [make_message(to=user, subject=f"m{n}", msgid=f"<cork-lit{n}@x>")
                for n in range(8)]

    def run() -> list[bytes]:
        client = Client(plain_server.imap_port, user, key, tls="none")
        try:
            data = b"".join(b"a%d APPEND INBOX " % n + Lit(m, sync=False).marker() + m
                            + b"\r\n" for n, m in enumerate(messages))
            client.send(data + b"s SELECT INBOX\r\nf FETCH 1:* (UID)\r\n")
            lines: list[bytes] = []
            for tag in [f"a{n}" for n in range(len(messages))] + ["s", "f"]:
                lines += client.response(tag)
            return lines
        finally:
            client.close()

    lines = await deferToThread(run)
    uids = [int(line.split(b"]")[0].split()[-1]) for line in lines
            if line.startswith(b"a") and b"APPENDUID" in line]
    assert len(uids) == len(messages) and uids == sorted(uids)
    fetched = [int(line.split(b"UID ")[1].rstrip(b")")) for line in lines
               if line.startswith(b"* ") and b"FETCH (UID" in line]
    assert fetched == uids
