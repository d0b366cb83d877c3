"""The inbox list, rendered by PostgreSQL (storage.inboxes.list_inbox_json), says exactly
what the Python view (http.views.inbox) says for every inbox: same keys, same values,
whatever the text holds (quotes, backslashes, control characters, U+2028, non-BMP
characters), with NULLs, a paused inbox, pending usage deltas and sub-millisecond
timestamps; and it pages and filters as before.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from typing import Any

import pytest_twisted
from twisted.internet import threads

from agentpost.http import views
from agentpost.http.site import SECURITY_HEADERS
from agentpost.storage import inboxes as inbox_store
from agentpost.storage.database import Txn
from tests.helpers import http_answers

_NAMES = ['quote " backslash \\ slash /', "tab\t nl\n cr\r nul-free \x01\x1f\x7f",
          "Zoë 東京 \u2028 \u2029 😀", "", "<script>&amp;</script>"]


async def _make_inboxes(server: Any, key: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        body: dict[str, Any] = {"username": f"list{i}"}
        if i % 2:
            body["client_id"] = f"client-{i}"
        answer = await server.api.post("/api/v1/inboxes", body, key=key)
        assert answer.status == 201, answer
        ids.append(answer.json["id"])
    return ids


async def _dress(server: Any, ids: list[str]) -> None:
    """Values the API would not let a client write, straight in SQL."""
    async def change(txn: Txn) -> None:
        for i, inbox_id in enumerate(ids):
            when = datetime(2026, 12, 3, 10, 0, i % 60, 999_999 if i % 3 else 1, tzinfo=UTC)
            await txn.execute(
                "UPDATE inboxes SET display_name = %s, send_paused = %s, used_bytes = %s, "
                "updated_at = %s WHERE id = %s",
                (_NAMES[i % len(_NAMES)], i % 2 == 0, 1000 * i, when, inbox_id))
            if i % 4 == 1:
                await txn.execute(
                    "INSERT INTO inbox_usage_deltas (org_id, inbox_id, bytes, created_at) "
                    "SELECT org_id, id, %s, now() FROM inboxes WHERE id = %s",
                    (-(i * 1000) - 5 if i % 8 == 1 else 4321, inbox_id))

    await server.core.db.run_interaction("test.dress", change)


@pytest_twisted.ensureDeferred
async def test_the_rendered_list_is_the_view_of_every_inbox(server):
    org, key = await server.new_org()
    ids = await _make_inboxes(server, key, 12)
    await _dress(server, ids)
    seen: list[dict[str, Any]] = []
    token = None
    while True:
        path = "/api/v1/inboxes?limit=5" + (f"&page_token={token}" if token else "")
        answer = await server.api.get(path, key=key)
        assert answer.status == 200, answer
        assert answer.headers.get("content-type") == "application/json; charset=utf-8"
        page = answer.json
        assert page["limit"] == 5 and len(page["data"]) <= 5
        seen += page["data"]
        token = page["next_page_token"]
        if token is None:
            break
    assert [inbox["id"] for inbox in seen] == sorted(ids, reverse=True)
    for inbox in seen:  # the single-inbox answer goes through views.inbox
        single = await server.api.get(f"/api/v1/inboxes/{inbox['id']}", key=key)
        assert single.json == inbox

    rows = await server.core.db.run_read(
        "test.rows", inbox_store.list_inboxes, org["id"], None, None, 100)
    rendered = await server.core.db.run_read(
        "test.json", inbox_store.list_inbox_json, org["id"], None, None, 100)
    assert [json.loads(r["json"]) for r in rendered] == [views.inbox(r) for r in rows]
    assert [r["id"] for r in rendered] == [r["id"] for r in rows]


@pytest_twisted.ensureDeferred
async def test_the_rendered_list_keeps_its_filters(server):
    _, key = await server.new_org()
    ids = await _make_inboxes(server, key, 3)
    other_env = (await server.api.post("/api/v1/environments", {"name": "Other"},
                                       key=key)).json["id"]
    there = await server.api.post("/api/v1/inboxes", {"username": "elsewhere",
                                                      "environment_id": other_env}, key=key)
    assert there.status == 201
    only = (await server.api.get(f"/api/v1/inboxes?environment_id={other_env}",
                                 key=key)).json
    assert [i["id"] for i in only["data"]] == [there.json["id"]]
    assert only["next_page_token"] is None and only["limit"] == 20
    everything = (await server.api.get("/api/v1/inboxes", key=key)).json
    assert {i["id"] for i in everything["data"]} == {*ids, there.json["id"]}
    _, stranger = await server.new_org("Other org")
    theirs = (await server.api.get("/api/v1/inboxes", key=stranger)).json
    assert theirs["data"] == []
    bad = await server.api.get("/api/v1/inboxes?page_token=!!", key=key)
    assert bad.status == 400 and bad.json["error"]["type"] == "invalid_request"


def _raw_exchange(port: int, requests: list[str], key: str) -> bytes:
    """Several GETs on one keep-alive connection, the last one closing it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for n, path in enumerate(requests):
            close = "Connection: close\r\n" if n == len(requests) - 1 else ""
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                         f"{close}\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_the_short_request_path_keeps_every_header_and_decodes_paths(server):
    """AgentPostRequest.process (Date from a per-second cache, no percent-decoding of a
    plain path) and the per-connection address cache: one Date, no Server, the security
    headers, on every answer of a keep-alive connection; an encoded path is still
    decoded (Twisted's own process) and a foreign or broken one still a JSON answer."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "paths"}, key=key)).json
    port = int(server.base_url.rsplit(":", 1)[1])
    encoded = "/api/v1/inboxes/" + "".join(f"%{b:02X}" for b in inbox["id"].encode())
    raw = await threads.deferToThread(_raw_exchange, port, [
        "/api/v1/inboxes", encoded, "/api/v1/inboxes?limit=1", "/api/v1/nothing-here",
        "/api/v1/inboxes/%FF"], key)
    answers = http_answers(raw)
    assert [status.split(b" ")[1] for status, _, _ in answers] == [
        b"200", b"200", b"200", b"404", b"400"]
    for _, fields, body in answers:
        assert len(fields[b"date"]) == 1 and fields[b"date"][0].endswith(b" GMT")
        assert b"server" not in fields
        for name, value in SECURITY_HEADERS.items():
            assert fields[name] == [value]
        json.loads(body)
    assert json.loads(answers[1][2]) == inbox
    assert json.loads(answers[0][2])["data"] == [inbox]
