"""Fan-out across processes, the per-key cap and the slow-client cut-off.

The cross-process test starts a real second ``agentpost serve`` (tests/second_process)
on the same database: mail accepted by SMTP on this process must reach a WebSocket
and an IMAP IDLE session held by the other one, through LISTEN/NOTIFY (the
notification carries only ids).
"""

from __future__ import annotations

import re
import smtplib
import socket

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import make_config, start_server
from tests.mailfactory import make_message
from tests.second_process import SecondProcess
from tests.test_workers import _wait
from tests.ws_client import WS, refused


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _smtp(port: int, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        smtp.sendmail("alice@example.com", [rcpt], make_message(subject=subject, body="x\n"))


def _idle(port: int, user: str, key: str) -> tuple[socket.socket, object]:
    """A plain IMAP session on ``port`` in IDLE on INBOX (the socket and its reader)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    lines = raw.makefile("rb")
    lines.readline()
    raw.sendall(b'b LOGIN "%s" "%s"\r\nc SELECT INBOX\r\nd IDLE\r\n'
                % (user.encode(), key.encode()))
    while not lines.readline().startswith(b"+"):
        pass
    return raw, lines


def _until_exists(raw: socket.socket, lines) -> list[bytes]:
    """Untagged lines up to the first EXISTS (the socket's timeout bounds the wait)."""
    seen: list[bytes] = []
    while not seen or b"EXISTS" not in seen[-1]:
        line = lines.readline()
        if not line:
            break
        seen.append(line)
    raw.sendall(b"DONE\r\ne LOGOUT\r\n")
    raw.close()
    return seen


async def _key(server, owner: str) -> str:
    made = await server.api.post("/api/v1/api-keys", {"scopes": ["events:read"]}, key=owner)
    assert made.status == 201, made
    return made.json["key"]


@pytest_twisted.ensureDeferred
async def test_smtp_on_process_a_reaches_a_websocket_and_idle_on_process_b(server, db_dsn,
                                                                           tmp_path):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "fan"}, key=owner)).json
    _, owner_b = await server.new_org("Other")
    inbox_b = (await server.api.post("/api/v1/inboxes", {"username": "nope"},
                                     key=owner_b)).json
    key = await _key(server, owner)
    second = SecondProcess(tmp_path, db_dsn, server)
    http_port = int(re.search(r"\[http\]\nport = (\d+)", second.config.read_text())[1])
    try:
        assert await deferToThread(second.ready), "second process did not start"
        assert await deferToThread(_wait, lambda: _accepting(http_port), timeout=30)
        ws = await WS.open(f"http://127.0.0.1:{http_port}", key)
        idle = await deferToThread(_idle, second.imap_port, inbox["email"], owner)
        await deferToThread(_smtp, server.mx_port, inbox_b["email"], "other org")
        await deferToThread(_smtp, server.mx_port, inbox["email"], "across processes")
        [event] = await ws.events(1)
        assert event["type"] == "message.received"
        assert event["org_id"] == inbox["org_id"] if "org_id" in inbox else True
        assert await ws.quiet() == []  # the other organization's mail never arrives
        seen = await deferToThread(_until_exists, *idle)  # the same delivery, over IMAP
        assert b"* 1 EXISTS\r\n" in seen, seen
        ws.close()
        await ws.closed()
    except BaseException:
        print(second.stop())
        raise
    out = second.stop()
    assert "Traceback" not in out, out


@pytest_twisted.ensureDeferred
async def test_per_key_connection_cap(db_dsn, openapi_checker):
    server = await start_server(make_config(db_dsn, websocket={"max_connections_per_key": 2}),
                                openapi_checker)
    try:
        _, owner = await server.new_org()
        key = await _key(server, owner)
        held = [await WS.open(server.base_url, key) for _ in range(2)]
        assert "429" in await refused(server.base_url, key)
        held[0].close()
        await held[0].closed()
        held.append(await WS.open(server.base_url, key))  # a slot came free
        for ws in held[1:]:
            ws.close()
            await ws.closed()
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_is_disconnected(server, monkeypatch):
    """The transport's backlog over send_buffer_cap closes the socket with 4008 (the
    backlog is simulated: loopback kernel buffers would need megabytes of events)."""
    from agentpost.ws import protocol

    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "slow"}, key=owner)).json
    ws = await WS.open(server.base_url, await _key(server, owner))
    monkeypatch.setattr(protocol, "pending_bytes", lambda transport: 10 * 1024 * 1024)
    await server.deliver(make_message(subject="too much", body="x\n"), [inbox["email"]])
    assert await ws.closed() == 4008


@pytest_twisted.ensureDeferred
async def test_guessed_keys_spend_the_failed_login_allowance(db_dsn, openapi_checker):
    """Unknown keys at /ws count like unknown keys at the API: a source that keeps
    guessing is refused (429) before its key is even looked at."""
    server = await start_server(make_config(db_dsn, login={"source_failures_per_minute": 3,
                                                           "pair_failures_per_minute": 3}),
                                openapi_checker)
    try:
        answers = [await refused(server.base_url, f"ap_sk_guess{n}") for n in range(6)]
        assert "401" in answers[0]
        assert any("429" in a for a in answers[3:]), answers
    finally:
        await server.service.stopService()


def _silent_client(port: int, key: str) -> list[tuple[int, bytes]]:
    """A raw WebSocket client that never answers pings: the frames it gets until the
    server closes (opcode, payload)."""
    import base64
    import os

    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?token={key} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, data = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    frames = []
    while True:
        while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:  # the server gave up on our close reply
                chunk = b""
            if not chunk:
                sock.close()
                return frames
            data += chunk
        length = data[1] & 0x7F
        frames.append((data[0] & 0x0F, data[2:2 + length]))
        data = data[2 + length:]


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_answer_pings_is_closed(db_dsn, openapi_checker):
    server = await start_server(make_config(db_dsn, websocket={"ping_interval": "200ms"}),
                                openapi_checker)
    try:
        _, owner = await server.new_org()
        key = await _key(server, owner)
        port = server.service.ports["http"].getHost().port
        frames = await deferToThread(_silent_client, port, key)
    finally:
        await server.service.stopService()
    opcodes = [op for op, _ in frames]
    assert 0x9 in opcodes and opcodes[-1] == 0x8, frames  # pinged, then closed
    assert int.from_bytes(frames[-1][1][:2], "big") == 4009
