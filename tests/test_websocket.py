"""GET /ws end to end: a real autobahn client on real sockets against the real server."""

from __future__ import annotations

import pytest_twisted

from tests.mailfactory import make_message
from tests.ws_client import WS, refused


async def _setup(server, scopes=("events:read",), env_ids=None):
    org, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "bot"}, key=owner)).json
    body = {"name": "ws", "scopes": list(scopes)}
    if env_ids is not None:
        body["environment_ids"] = env_ids
    made = await server.api.post("/api/v1/api-keys", body, key=owner)
    assert made.status == 201, made
    return org, owner, inbox, made.json


async def _mail(server, inbox, subject="hi"):
    return await server.deliver(make_message(subject=subject, body="x\n"), [inbox["email"]])


@pytest_twisted.ensureDeferred
async def test_token_and_header_auth_then_live_events(server):
    _, _, inbox, key = await _setup(server)
    by_token = await WS.open(server.base_url, key["key"])
    by_header = await WS.open(server.base_url, key["key"], header=True)
    await _mail(server, inbox)
    for ws in (by_token, by_header):
        [event] = await ws.events(1)
        assert event["type"] == "message.received" and event["id"].startswith("evt_")
        assert set(event) == {"id", "type", "timestamp", "org_id", "env_id", "data"}
        ws.close()


@pytest_twisted.ensureDeferred
async def test_refusals(server):
    _, _, _, key = await _setup(server, scopes=("messages:read",))
    assert "401" in await refused(server.base_url, None)
    assert "401" in await refused(server.base_url, "ap_sk_wrong")
    assert "403" in await refused(server.base_url, key["key"])


@pytest_twisted.ensureDeferred
async def test_revoking_the_key_closes_the_socket_with_4001(server):
    _, owner, _, key = await _setup(server)
    ws = await WS.open(server.base_url, key["key"])
    assert (await server.api.delete(f"/api/v1/api-keys/{key['id']}", key=owner)).status == 200
    assert await ws.closed() == 4001
    assert "401" in await refused(server.base_url, key["key"])


@pytest_twisted.ensureDeferred
async def test_subscribe_filters_types_and_inbox(server):
    _, owner, inbox, key = await _setup(server)
    other = (await server.api.post("/api/v1/inboxes", {"username": "other"}, key=owner)).json
    ws = await WS.open(server.base_url, key["key"])
    ws.send({"type": "subscribe", "event_types": ["message.received"],
             "inbox_id": inbox["id"]})
    sub = await ws.frame()
    assert sub["type"] == "subscribed" and sub["inbox_id"] == inbox["id"]
    await _mail(server, other, "not for you")
    await _mail(server, inbox, "for you")
    [event] = await ws.events(1)
    assert event["data"].get("inbox_id", inbox["id"]) == inbox["id"]
    assert await ws.quiet() == []
    ws.send({"type": "subscribe", "event_types": ["domain.verified"]})
    assert (await ws.frame())["type"] == "subscribed"
    await _mail(server, inbox)
    assert await ws.quiet() == []
    ws.close()


@pytest_twisted.ensureDeferred
async def test_foreign_inbox_and_environment_are_errors(server):
    _, _, _, key = await _setup(server)
    org_b, owner_b = await server.new_org("B")
    inbox_b = (await server.api.post("/api/v1/inboxes", {"username": "b"}, key=owner_b)).json
    ws = await WS.open(server.base_url, key["key"])
    ws.send({"type": "subscribe", "inbox_id": inbox_b["id"]})
    assert (await ws.frame())["error"]["type"] == "not_found"
    ws.send({"type": "subscribe", "environment_ids": [org_b["default_environment_id"]]})
    assert (await ws.frame())["error"]["type"] == "not_found"
    await _mail(server, inbox_b)  # another org's mail never arrives
    assert await ws.quiet() == []
    ws.close()


@pytest_twisted.ensureDeferred
async def test_environment_restricted_key_never_sees_other_environments(server):
    org, owner = await server.new_org()
    env_a = org["default_environment_id"]
    env_b = (await server.api.post("/api/v1/environments", {"name": "B"}, key=owner)).json["id"]
    inbox_a = (await server.api.post("/api/v1/inboxes", {"username": "ay"}, key=owner)).json
    inbox_b = (await server.api.post("/api/v1/inboxes", {"username": "bee",
                                                          "environment_id": env_b},
                                     key=owner)).json
    key_a = (await server.api.post("/api/v1/api-keys", {
        "scopes": ["events:read"], "environment_ids": [env_a]}, key=owner)).json
    ws = await WS.open(server.base_url, key_a["key"])
    ws.send({"type": "subscribe", "environment_ids": [env_b]})
    assert (await ws.frame())["error"]["type"] == "not_found"
    await _mail(server, inbox_b, "b")
    await _mail(server, inbox_a, "a")
    [event] = await ws.events(1)
    assert event["env_id"] == env_a
    ws.send({"type": "resume", "after": "evt_00000000000000000000000000"})  # replay all
    replayed = [f for f in await ws.quiet(1.0) if f["type"] == "event"]
    assert all(e["data"]["env_id"] == env_a for e in replayed)
    assert await ws.quiet() == []
    ws.close()


@pytest_twisted.ensureDeferred
async def test_resume_after_disconnect_misses_nothing(server):
    _, _, inbox, key = await _setup(server)
    ws = await WS.open(server.base_url, key["key"])
    await _mail(server, inbox, "one")
    [first] = await ws.events(1)
    ws.close()
    await ws.closed()
    for n in range(3):  # while nobody listens
        await _mail(server, inbox, f"missed {n}")
    again = await WS.open(server.base_url, key["key"])
    again.send({"type": "resume", "after": first["id"]})
    missed = await again.events(3)
    assert len({e["id"] for e in missed}) == 3 and first["id"] not in {e["id"] for e in missed}
    await _mail(server, inbox, "live")
    [live] = await again.events(1)
    assert live["id"] not in {e["id"] for e in missed}
    again.close()


@pytest_twisted.ensureDeferred
async def test_malformed_frames_get_error_frames(server):
    _, _, inbox, key = await _setup(server)
    ws = await WS.open(server.base_url, key["key"])
    for bad in (b"not json", b"[1,2]", b'{"type":"dance"}', b'{"type":"resume"}',
                b'{"type":"subscribe","event_types":["nope"]}', b"x" * 20000,
                b"[" * 6000, b'{"type":"subscribe","inbox_id":"inb_\u0000"}'):
        ws.send(bad)
        frame = await ws.frame()
        assert frame["type"] == "error" and frame["error"]["message"], (bad[:20], frame)
    ws.send_binary(b"\x00\x01")
    assert (await ws.frame())["type"] == "error"
    await _mail(server, inbox)  # still alive
    assert len(await ws.events(1)) == 1
    ws.close()


@pytest_twisted.ensureDeferred
async def test_wss_when_http_tls_is_on(server, db_dsn, openapi_checker):
    """The same listener, TLS on: the stream is wss:// and works like ws:// (a second
    service on the same database serves HTTPS; the key and the mail come from the
    first)."""
    from tests.conftest import _DEV_TLS, make_config, start_server

    _, _, inbox, key = await _setup(server)
    tls_server = await start_server(make_config(db_dsn, http={"tls": True}), openapi_checker)
    try:
        port = tls_server.service.ports["http"].getHost().port
        ws = await WS.open(f"https://localhost:{port}", key["key"], ca=_DEV_TLS["ca"])
        await _mail(server, inbox)
        [event] = await ws.events(1)
        assert event["type"] == "message.received"
        ws.close()
        await ws.closed()
    finally:
        await tls_server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_lost_listen_connection_catches_up_from_the_log(server):
    """Notifications sent while the hub was not listening are not lost: when LISTEN
    comes back, every socket re-reads the log after the last event it delivered."""
    _, _, inbox, key = await _setup(server)
    ws = await WS.open(server.base_url, key["key"])
    await _mail(server, inbox, "before")
    [before] = await ws.events(1)
    hub = server.service.ws_hub
    hub.listener.stop()  # the link is down: these notifications go nowhere
    await _mail(server, inbox, "missed 1")
    await _mail(server, inbox, "missed 2")
    assert await ws.quiet() == []
    await hub.listener.start()  # reconnected: catch up
    missed = await ws.events(2)
    assert before["id"] not in {e["id"] for e in missed} and len({e["id"] for e in missed}) == 2
    ws.close()


def _raw_upgrade(port: int, token: str) -> bytes:
    """The head of the answer to a hand-written upgrade request."""
    import base64
    import os
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        nonce = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /ws?token={token} HTTP/1.1\r\nHost: x\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                     .encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


@pytest_twisted.ensureDeferred
async def test_upgrade_answers_do_not_disclose_a_server_version(server):
    """Like every other answer of the listener: no Server header (autobahn's default
    would say AutobahnPython/<version>), neither on the 101 nor on a refusal."""
    from twisted.internet.threads import deferToThread

    _, _, _, key = await _setup(server)
    port = server.service.ports["http"].getHost().port
    accepted = await deferToThread(_raw_upgrade, port, key["key"])
    refused_head = await deferToThread(_raw_upgrade, port, "ap_sk_wrong")
    api = await server.api.get("/api/v1/events", key=key["key"])
    assert accepted.startswith(b"HTTP/1.1 101"), accepted
    assert refused_head.startswith(b"HTTP/1.1 401"), refused_head
    for head in (accepted, refused_head):
        lowered = head.lower()
        assert b"autobahn" not in lowered and b"\r\nserver:" not in lowered, head
    assert "server" not in {k.lower() for k in api.headers}
