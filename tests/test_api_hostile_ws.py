"""The /ws door as a stranger meets it (hostile review, apihostile).

Every answer of the listener is JSON with the security headers, including the ones
autobahn used to write itself: the HTML status page for a GET without ``Upgrade`` (which
named autobahn's version, followed ``?redirect=`` anywhere and failed with a traceback
and a silent connection for a non-integer ``?after=``), and refused handshakes (a bare
status line whose reason phrase carried the message)."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import SECURITY_HEADERS, exchange
from tests.ws_client import WS

_UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {v}\r\n")


def _exchange(port: int, target: str, extra: str = "") -> bytes:
    """Send one request and read until the server closes (bounded by the timeout)."""
    return exchange(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body), answer
    return int(lines[0].split()[1]), headers, body


async def _answer(server, target: str, extra: str = "") -> tuple[int, dict[str, str], dict]:
    port = server.service.ports["http"].getHost().port
    raw = await deferToThread(_exchange, port, target, extra)
    status, headers, body = _parse(raw)
    for name in SECURITY_HEADERS:
        assert name in headers, (name, raw)
    assert "autobahn" not in raw.decode("latin-1").lower(), raw
    assert headers["content-type"].startswith("application/json"), raw
    return status, headers, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_plain_get_of_ws_is_a_json_426_never_a_status_page_or_redirect(server):
    for target in ("/ws", "/ws?redirect=https%3A%2F%2Fevil.example%2F",
                   "/ws?redirect=javascript%3Aalert(1)&after=0",
                   "/ws?redirect=https%3A%2F%2Fevil.example%2F&after=x"):
        status, headers, body = await _answer(server, target)
        assert status == 426, (target, status, body)
        assert headers["upgrade"].lower() == "websocket"
        assert "location" not in headers
        assert body["error"]["type"] == "upgrade_required"
        assert body["error"]["request_id"] == headers["x-request-id"]


def _exchange_head(port: int) -> bytes:
    return exchange(port, b"HEAD /ws HTTP/1.1\r\nHost: x\r\n" + _UPGRADE.format(v=13).encode()
                    + b"\r\n")


@pytest_twisted.ensureDeferred
async def test_head_of_ws_is_a_405_without_a_body(server):
    """HEAD reaches autobahn (werkzeug adds it to GET routes), which refuses it; the
    answer to a HEAD carries no body (RFC 9110 section 9.3.2) and says what is allowed."""
    port = server.service.ports["http"].getHost().port
    raw = await deferToThread(_exchange_head, port)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405"), raw
    assert body == b"", raw
    lowered = head.lower()
    assert b"\r\nallow: get" in lowered and b"\r\nx-frame-options: deny" in lowered


@pytest_twisted.ensureDeferred
async def test_refused_handshakes_are_json_with_the_security_headers(server):
    _, owner = await server.new_org()
    scoped = await server.api.post("/api/v1/api-keys", {"name": "r", "scopes": [
        "inboxes:read"]}, key=owner)
    cases = [
        ("/ws", _UPGRADE.format(v=13), 401, "unauthenticated"),
        ("/ws?token=ap_sk_wrong", _UPGRADE.format(v=13), 401, "unauthenticated"),
        (f"/ws?token={scoped.json['key']}", _UPGRADE.format(v=13), 403, "forbidden"),
        (f"/ws?token={owner}", _UPGRADE.format(v=99), 400, "invalid_request"),
    ]
    for target, extra, want, kind in cases:
        status, headers, body = await _answer(server, target, extra)
        assert (status, body["error"]["type"]) == (want, kind), (target, body)
        if want == 401:
            assert headers["www-authenticate"].startswith("Bearer")
        assert owner not in json.dumps(body)
    # RFC 6455 section 4.4: a version we do not speak is answered with the ones we do.
    _, headers, _ = await _answer(server, f"/ws?token={owner}", _UPGRADE.format(v=99))
    assert "13" in headers["sec-websocket-version"]


@pytest_twisted.ensureDeferred
async def test_subscribe_with_non_string_event_types_is_a_request_error(server):
    _, owner = await server.new_org()
    ws = await WS.open(server.base_url, owner)
    for bad in ([[1]], [{"a": 1}], [None], "message.received", [1.5]):
        ws.send({"type": "subscribe", "event_types": bad})
        frame = await ws.frame()
        assert frame["type"] == "error", (bad, frame)
        assert frame["error"]["type"] == "invalid_request", (bad, frame)
    for bad_inbox in ([1], {"x": 1}, "inb_" + "0" * 26):
        ws.send({"type": "subscribe", "inbox_id": bad_inbox})
        frame = await ws.frame()
        assert frame["error"]["type"] == "not_found", (bad_inbox, frame)
    ws.send({"type": "subscribe", "event_types": ["message.received"]})
    assert (await ws.frame())["type"] == "subscribed"
    ws.close()


@pytest_twisted.ensureDeferred
async def test_a_burst_of_simultaneous_handshakes_respects_the_per_key_cap(db_dsn,
                                                                           openapi_checker):
    """The cap used to count open sockets only: handshakes that passed the check and
    were still awaiting the key's registration were not counted, so a burst of them all
    opened, however many."""
    from twisted.internet import defer

    from tests.conftest import make_config, start_server

    server = await start_server(make_config(db_dsn, websocket={"max_connections_per_key": 2}),
                                openapi_checker)
    try:
        _, owner = await server.new_org()
        made = await server.api.post("/api/v1/api-keys", {"name": "ws", "scopes": [
            "events:read"]}, key=owner)
        key = made.json["key"]
        results = await defer.DeferredList(
            [defer.ensureDeferred(WS.open(server.base_url, key)) for _ in range(12)],
            consumeErrors=True)
        opened = [ws for ok, ws in results if ok]
        refusals = [str(failure.value) for ok, failure in results if not ok]
        assert len(opened) == 2, (len(opened), refusals)
        assert all("429" in text for text in refusals), refusals
        assert server.service.ws_hub.connections_of(made.json["id"]) == 2
        for ws in opened:
            ws.close()
            await ws.closed()
        # Every place was given back: the key can open its two again.
        again = [await WS.open(server.base_url, key) for _ in range(2)]
        for ws in again:
            ws.close()
            await ws.closed()
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_key_that_expires_while_its_socket_is_open_ends_the_stream(server):
    """Expiry, like revocation, ends an open stream (close code 4001) without waiting
    for the next ping, and the key opens no new one."""
    from datetime import UTC, datetime, timedelta

    from tests.ws_client import refused

    _, owner = await server.new_org()
    soon = (datetime.now(UTC) + timedelta(seconds=6)).isoformat()
    made = await server.api.post("/api/v1/api-keys", {
        "name": "brief", "scopes": ["events:read"], "expires_at": soon}, key=owner)
    assert made.status == 201, made
    ws = await WS.open(server.base_url, made.json["key"])
    assert await ws.closed() == 4001
    assert "401" in await refused(server.base_url, made.json["key"])
