"""The send routes' own body limit ([http] max_send_body): inline base64 attachments
larger than [http] max_body (1 MiB) send through POST .../messages and the drafts
routes, while a body over the send limit -- or over max_body on any other route -- is
refused with a JSON 413 from its Content-Length, before a byte of it is read."""

from __future__ import annotations

import base64
import hashlib
import json
import socket

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import make_config, start_server

SEND_LIMIT = 6 * 1024 * 1024  # small enough to probe cheaply, above a 3 MiB attachment


@pytest_twisted.async_yield_fixture
async def big(db_dsn, openapi_checker):
    config = make_config(db_dsn, http={"max_send_body": "6MiB"})
    running = await start_server(config, openapi_checker)
    yield running
    await running.service.stopService()


_SEQ = iter(range(1_000_000))


async def _setup(server):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": f"big{next(_SEQ)}"},
                                   key=owner)).json
    return owner, inbox


def _announce(port: int, request_line: str, key: str, length: int) -> bytes:
    """Send only the head of a request declaring ``length`` bytes (never a body byte)
    and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall((f"{request_line} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {length}\r\n\r\n").encode("ascii"))
        answer = b""
        while b"\r\n\r\n" not in answer or not _complete(answer):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _port(server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


@pytest_twisted.ensureDeferred
async def test_a_3_mib_inline_attachment_sends(big):
    owner, inbox = await _setup(big)
    data = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)  # 3 MiB
    body = {"to": "bob@remote.example", "subject": "Inline", "text_body": "See attached.",
            "attachments": [{"filename": "data.bin", "mime_type": "application/octet-stream",
                             "content": base64.b64encode(data).decode("ascii")}]}
    assert len(json.dumps(body)) > 4 * 1024 * 1024  # far over [http] max_body
    resp = await big.api.post(f"/api/v1/inboxes/{inbox['id']}/messages", body, key=owner)
    assert resp.status == 201, resp
    [att] = resp.json["attachments"]
    got = await big.api.get(f"/api/v1/messages/{resp.json['id']}/attachments/{att['id']}",
                            key=owner)
    assert got.status == 200 and got.body == data


@pytest_twisted.ensureDeferred
async def test_drafts_take_inline_attachments_over_max_body(big):
    owner, inbox = await _setup(big)
    data = b"\x01\x02" * (1024 * 1024)  # 2 MiB
    content = base64.b64encode(data).decode("ascii")
    made = await big.api.post(f"/api/v1/inboxes/{inbox['id']}/drafts", {
        "to": "bob@remote.example", "subject": "Draft",
        "attachments": [{"filename": "a.bin", "content": content}]}, key=owner)
    assert made.status == 201, made
    changed = await big.api.patch(f"/api/v1/drafts/{made.json['id']}", {
        "attachments": [{"filename": "b.bin", "content": content}]}, key=owner)
    assert changed.status == 200, changed
    assert [a["filename"] for a in changed.json["attachments"]] == ["b.bin"]


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_send_limit_is_413_before_it_is_read(big):
    owner, inbox = await _setup(big)
    port = _port(big)
    for line in (f"POST /api/v1/inboxes/{inbox['id']}/messages",
                 "POST /api/v1/messages/msg_x/reply", "POST /api/v1/messages/msg_x/forward",
                 f"POST /api/v1/inboxes/{inbox['id']}/drafts", "PATCH /api/v1/drafts/drf_x"):
        # Only the head is sent: an answer proves the refusal came from Content-Length.
        answer = await deferToThread(_announce, port, line, owner, SEND_LIMIT + 1)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), (line, answer[:200])
        error = json.loads(payload)["error"]
        assert error["type"] == "payload_too_large" and str(SEND_LIMIT) in error["message"]


@pytest_twisted.ensureDeferred
async def test_without_an_api_key_a_send_route_keeps_max_body(big):
    """A stranger cannot make the server read send-sized bodies: the larger limit needs
    something shaped like an API key (it is checked once the body is read)."""
    _, inbox = await _setup(big)
    answer = await deferToThread(_announce, _port(big),
                                 f"POST /api/v1/inboxes/{inbox['id']}/messages",
                                 "not-a-key", 2 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"1048576" in answer


@pytest_twisted.ensureDeferred
async def test_other_routes_keep_max_body(big):
    owner, inbox = await _setup(big)
    port = _port(big)
    for line in ("POST /api/v1/inboxes", f"PATCH /api/v1/inboxes/{inbox['id']}",
                 "POST /api/v1/drafts/drf_x/send", "GET /api/v1/inboxes"):
        answer = await deferToThread(_announce, port, line, owner, 2 * 1024 * 1024)
        assert answer.startswith(b"HTTP/1.1 413"), (line, answer[:200])
    # Within the send limit but over max_body, a send route reads the body.
    resp = await big.api.request(
        "POST", f"/api/v1/inboxes/{inbox['id']}/messages", key=owner,
        data=json.dumps({"to": "bob@remote.example",
                         "text_body": "x" * (1536 * 1024)}).encode(),
        headers={"Content-Type": "application/json"})
    assert resp.status == 201, resp
