"""The shortcuts a GET takes since the issue-12 CPU work say exactly what they said before.

JSON bodies (ujson) decode to the payload, keep non-ASCII text as UTF-8 and still fall
back to ASCII escapes for a lone surrogate; the audit batch (ujson) holds the same rows
as the stdlib encoding; the realm builds a key row's Principal once per row object and
afresh for a row read again; ``scrub_row`` skips only values that cannot hold text; the
security headers set straight into the header store, and the header block written in
one piece, reach the client exactly once each, on answers of every kind.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from typing import Any

import pytest_twisted
from twisted.internet import threads
from twisted.web.test.requesthelper import DummyRequest

from agentpost.auth import cred
from agentpost.core.audit import scrub_row
from agentpost.http.framework import render
from agentpost.http.site import SECURITY_HEADERS
from agentpost.storage import audit as audit_store


def _rendered(payload: Any) -> tuple[bytes, DummyRequest]:
    request = DummyRequest([b""])
    return render(request, 200, payload), request


def test_json_bodies_decode_to_the_payload_as_utf8():
    payload = {"name": "Zoë / 東京", "n": 2**70, "f": 0.1, "none": None, "ok": True,
               "list": [1, {"nested": "a/b"}], "line": "\u2028\t\"\\"}
    body, request = _rendered(payload)
    assert json.loads(body) == payload
    assert "Zoë / 東京".encode() in body  # UTF-8 as is, "/" not escaped
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"%d" % len(body)]
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"application/json; charset=utf-8"]


def test_a_lone_surrogate_is_escaped_not_a_failure():
    body, _ = _rendered({"name": "a\ud800b", "other": "é"})
    assert body.isascii()
    assert json.loads(body) == {"name": "a\ud800b", "other": "é"}


def test_what_is_not_json_still_fails_loudly():
    for bad in (b"bytes", datetime.now(UTC), object()):
        try:
            _rendered({"x": bad})
        except TypeError:
            continue
        raise AssertionError(f"{bad!r} was encoded")


def _audit_rows() -> list[dict[str, Any]]:
    when = datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=UTC)
    return [
        {"id": "aud_1", "occurred_at": when, "org_id": "org_1", "environment_id": None,
         "actor_type": "api_key", "actor_id": "key_1", "action": "inboxes.list",
         "target_id": None, "outcome": "allowed", "status": 200,
         "remote_addr": "127.0.0.1", "request_id": "req_1", "details": {}},
        {"id": "aud_2", "occurred_at": when, "org_id": None, "environment_id": None,
         "actor_type": "anonymous", "actor_id": None, "action": "inboxes.get",
         "target_id": "inb_é/1", "outcome": "denied", "status": 401,
         "remote_addr": None, "request_id": "req_2",
         "details": {"at": when, "note": "Zoë \u2028"}},
    ]


def test_the_audit_batch_holds_what_the_stdlib_would_write():
    rows = _audit_rows()
    stdlib = json.JSONEncoder(default=audit_store._json_value).encode(rows)
    assert json.loads(audit_store._batch_json(rows)) == json.loads(stdlib)
    assert rows == _audit_rows()  # the buffer's rows are left as they were


def _key_row(role: str = "owner") -> dict[str, Any]:
    return {"id": "key_1", "org_id": "org_1", "role": role, "scopes": ["inboxes:read"],
            "env_restricted": False, "environment_ids": [], "user_id": None,
            "org_has_owner": False, "tier": "free", "expires_at": None}


def _avatar(realm: cred.AgentPostRealm, row: dict[str, Any]) -> Any:
    _, avatar, _ = realm.requestAvatar(cred.KeyIdentity(row), None, cred.IPrincipal)
    return avatar


def test_the_realm_builds_a_rows_principal_once_and_a_new_rows_afresh(monkeypatch):
    realm = cred.AgentPostRealm()
    row = _key_row("owner")
    first = _avatar(realm, row)
    assert _avatar(realm, row) is first
    assert first == cred.principal_from_key(row)
    # The key cache hands out a new row object once anything changed (a role cut by
    # SQL, a revocation): it is judged again, never served the old Principal.
    demoted = _avatar(realm, _key_row("member"))
    assert demoted.role == "member" and demoted is not first
    # Bounded: a full memo starts over, and its answers stay right.
    monkeypatch.setattr(cred, "_PRINCIPAL_MEMO_MAX", 2)
    rows = [_key_row(role) for role in ("owner", "admin", "member", "admin")]
    assert [_avatar(realm, r).role for r in rows] == ["owner", "admin", "member", "admin"]
    assert len(realm._memo) <= 2


def test_scrub_row_cleans_text_wherever_it_is_and_skips_the_rest():
    when = datetime.now(UTC)
    row = {"a": None, "b": 0, "c": False, "d": when, "e": {}, "f": [], "g": "plain",
           "h": "é", "i": "x\x00", "j": {"k": "\ud800"}, "l": ["\x00"], "m": ("y\x00",)}
    assert scrub_row(row) is True
    assert row == {"a": None, "b": 0, "c": False, "d": when, "e": {}, "f": [], "g": "plain",
                   "h": "é", "i": "x\ufffd", "j": {"k": "\ufffd"}, "l": ["\ufffd"],
                   "m": ("y\ufffd",)}
    assert scrub_row({"a": None, "b": 1, "c": "ok", "d": {}, "e": when}) is False


def _raw_get(port: int, path: str, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
                     .encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_every_answer_carries_each_security_header_once(server):
    _, owner = await server.new_org()
    port = int(server.base_url.rsplit(":", 1)[1])
    for path, key, status in (("/api/v1/inboxes", owner, 200),
                              ("/api/v1/inboxes", None, 401),
                              ("/api/v1/no-such-thing", owner, 404),
                              ("/healthz", None, 200)):
        raw = await threads.deferToThread(_raw_get, port, path, key)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 %d " % status), lines[0]
        names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
        fields = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip()
                  for line in lines[1:]}
        for name, value in SECURITY_HEADERS.items():
            assert names.count(name) == 1, (path, name)
            assert fields[name] == value
        assert names.count(b"x-request-id") == 1
        assert fields[b"x-request-id"].startswith(b"req_")
        assert b"server" not in names
        assert int(fields[b"content-length"]) == len(body)
        json.loads(body)


@pytest_twisted.ensureDeferred
async def test_a_change_made_here_is_in_force_before_its_notice_arrives(server, monkeypatch):
    """A role change through the API is in force on this process's next request even if
    the triggers' NOTIFY is late (here: never handled at all). The cache used to keep
    serving the old row until the notice came, and a quick client could get in first."""
    from tests.test_key_power import _add, _forbidden, _hand_over, _org_with_owner

    cache = server.core.key_cache
    org = await _org_with_owner(server, "alice@late-notice.test")
    bob = await _add(server, org.owner_key, "bob@late-notice.test")
    bob_key = await _hand_over(server, org, bob)
    alice = org.owner_key
    staging = (await server.api.post("/api/v1/environments", {"name": "Staging"},
                                      key=bob_key)).json["id"]
    path = f"/api/v1/members/{org.owner_id}"
    changed = await server.api.patch(path, {"role": "member", "environments": [
        {"environment_id": staging, "role": "admin"}]}, key=bob_key)
    assert changed.status == 200, changed
    for _ in range(3):  # an environment admin reads the audit log
        assert (await server.api.get("/api/v1/audit-logs", key=alice)).status == 200
    hits = cache.hits
    assert (await server.api.get("/api/v1/audit-logs", key=alice)).status == 200
    assert cache.hits == hits + 1  # served from the cache

    monkeypatch.setattr(cache, "_noticed", lambda payload: None)  # every notice lost
    demoted = await server.api.patch(path, {"environments": [
        {"environment_id": staging, "role": "member"}]}, key=bob_key)
    assert demoted.status == 200, demoted
    _forbidden(await server.api.get("/api/v1/audit-logs", key=alice))
