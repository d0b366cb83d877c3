"""Hostile input at the HTTP edge: every one answers a JSON 4xx, never a 500.

NUL bytes, lone surrogates, absurd nesting, offsets PostgreSQL cannot store, duplicate ids,
huge integers and forged cursors are refused before they reach PostgreSQL; anything that
still trips a database constraint is translated in one place (409 or 400).
"""

from __future__ import annotations

import base64
import json

import pytest_twisted

from tests.helpers import SECURITY_HEADERS, query


def _assert_json_4xx(resp, status: int = 400, type_: str = "invalid_request") -> None:
    assert resp.status == status, resp
    assert resp.headers["content-type"].startswith("application/json"), resp
    error = resp.json["error"]
    assert error["type"] == type_, resp
    assert error["request_id"].startswith("req_")
    assert error["request_id"] == resp.headers["x-request-id"]
    for name in SECURITY_HEADERS:
        assert name in resp.headers, (name, resp)
    assert "Traceback" not in resp.body.decode("utf-8", "replace")


async def _all_refused(api, key: str, cases: list[tuple[str, str, object]]) -> None:
    """Send every case (a dict is JSON, bytes are sent raw as JSON); each must be a JSON
    400. Every failing case is reported, not just the first."""
    wrong = []
    for method, path, body in cases:
        kwargs: dict = {}
        if isinstance(body, bytes):
            kwargs = {"data": body, "headers": {"Content-Type": "application/json"}}
        elif body is not None:
            kwargs = {"json_body": body}
        try:
            _assert_json_4xx(await api.request(method, path, key=key, **kwargs))
        except AssertionError as exc:
            wrong.append((method, path, str(body)[:40], str(exc)[:120]))
    assert not wrong, "\n".join(map(str, wrong))


async def _member_and_env(server, owner: str) -> tuple[str, str]:
    member = await server.api.post("/api/v1/members", {"email": "m@hardening.test"}, key=owner)
    env = await server.api.post("/api/v1/environments", {"name": "Staging"}, key=owner)
    assert member.status == 201 and env.status == 201, (member, env)
    return member.json["user_id"], env.json["id"]


@pytest_twisted.ensureDeferred
async def test_the_thirteen_reported_inputs_answer_400_not_500(server, db_dsn):
    """Each input from the security review gets a JSON 400 with the security headers."""
    _, owner = await server.new_org()
    user_id, env_id = await _member_and_env(server, owner)
    api = server.api
    deep = b"[" * 100_000 + b"]" * 100_000
    dup_envs = {"environments": [{"environment_id": env_id, "role": "admin"},
                                 {"environment_id": env_id, "role": "member"}]}
    cases = [
        ("POST", "/api/v1/inboxes", {"display_name": "a\u0000b"}),
        ("POST", "/api/v1/filter-rules", {"direction": "receive", "action": "block",
                                          "match_type": "address",
                                          "value": "x\u0000@example.com"}),
        ("POST", "/api/v1/environments", {"name": "Stag\u0000ing"}),
        ("POST", "/api/v1/api-keys", {"name": "key\u0000name"}),
        ("POST", "/api/v1/members", {"email": "a\u0000b@example.com"}),
        ("GET", "/api/v1/inboxes/inb_%00x", None),
        ("GET", "/api/v1/messages/msg_%00x", None),
        ("GET", "/api/v1/inboxes?environment_id=%00", None),
        ("GET", "/api/v1/audit-logs?actor_id=key_%00", None),
        ("POST", "/api/v1/inboxes", deep),
        ("POST", "/api/v1/api-keys", {"expires_at": "2031-01-01T00:00:00-18:18"}),
        ("POST", "/api/v1/api-keys", {"expires_at": "2031-01-01T00:00:00+23:59"}),
        ("PATCH", f"/api/v1/members/{user_id}", dup_envs),
    ]
    await _all_refused(api, owner, cases)
    # Nothing was created by any of them, every refusal is audited, and the audit buffer
    # is not stuck behind any of them.
    assert (await api.get("/api/v1/inboxes", key=owner)).json["data"] == []
    assert len((await api.get("/api/v1/api-keys", key=owner)).json["data"]) == 1
    await server.core.audit.flush()
    assert server.core.audit.pending == 0
    assert query(db_dsn, "SELECT count(*) FROM audit_log WHERE status = 400")[0][0] >= 13


@pytest_twisted.ensureDeferred
async def test_more_of_the_same_class_answers_400(server):
    """Lone surrogates, control characters in names, huge numbers, forged cursors, bad dates,
    wrong JSON types and invalid UTF-8 anywhere on the HTTP API."""
    _, owner = await server.new_org()
    api = server.api
    forged = base64.urlsafe_b64encode(b"c1:key_\x00").decode().rstrip("=")
    thread_cursor = base64.urlsafe_b64encode(
        b"t1:2030-01-01T00:00:00-18:18|thr_01HZZZZZZZZZZZZZZZZZZZZZZZ").decode().rstrip("=")
    raw_bodies = [
        b'{"display_name": "\\ud800"}',  # a lone surrogate PostgreSQL cannot encode
        b'{"display_name": "ok", "display_name": "a\\u0000"}',
        b'{"username": "a", "\\u0000": 1}',
        b'{"display_name": "\xc3\x28"}',  # invalid UTF-8
        b'{"display_name": 1e999999}',
        b"[" * 33 + b"]" * 33,
        b'{"a":' * 40 + b"1" + b"}" * 40,
    ]
    await _all_refused(api, owner, [("POST", "/api/v1/inboxes", raw) for raw in raw_bodies])
    bodies = [
        ("/api/v1/environments", {"name": "tab\there"}),
        ("/api/v1/environments", {"name": "bell\u0007"}),
        ("/api/v1/api-keys", {"name": "esc\u001b[31m"}),
        ("/api/v1/api-keys", {"expires_at": "10000-01-01T00:00:00Z"}),
        ("/api/v1/api-keys", {"expires_at": "0001-01-01T00:00:00+01:00"}),
        ("/api/v1/api-keys", {"expires_at": "9999-12-31T23:59:59-01:00"}),
        ("/api/v1/api-keys", {"expires_at": "2031-01-01T00:00:00+05:30:15"}),
        ("/api/v1/api-keys", {"scopes": "inboxes:read"}),
        ("/api/v1/inboxes", {"display_name": ["list"]}),
        ("/api/v1/inboxes", {"environment_id": "env_\u0000"}),
    ]
    await _all_refused(api, owner, [("POST", path, body) for path, body in bodies])
    await _all_refused(api, owner, [("GET", path, None) for path in (
        "/api/v1/inboxes?limit=" + "9" * 5000,
        "/api/v1/inboxes?limit=%C2%B2",  # a superscript two: isdigit() but not an int
        "/api/v1/inboxes?limit=-1",
        f"/api/v1/inboxes?page_token={forged}",
        "/api/v1/inboxes?page_token=%00",
        "/api/v1/inboxes?environment_id=%FF",
        "/api/v1/audit-logs?since=2030-01-01T00:00:00-18:18",
        "/api/v1/audit-logs?until=0001-01-01T00:00:00%2B01:00",
        "/api/v1/audit-logs?action=%01",
        "/api/v1/inboxes/inb_%ED%A0%80",
    )])
    inbox = (await api.post("/api/v1/inboxes", {"username": "cursor"}, key=owner)).json
    await _all_refused(api, owner, [("GET", path, None) for path in (
        f"/api/v1/inboxes/{inbox['id']}/threads?page_token={thread_cursor}",
        f"/api/v1/inboxes/{inbox['id']}/messages?before=2030-01-01T00:00:00-18:18",
        f"/api/v1/inboxes/{inbox['id']}/messages?labels=a%00b",
    )])
    # A valid offset is accepted and stored normalised to UTC.
    ok = await api.post("/api/v1/api-keys", {"expires_at": "2031-01-01T00:00:00-15:59"},
                        key=owner)
    assert ok.status == 201, ok
    assert ok.json["expires_at"] == "2031-01-01T15:59:00.000Z"


@pytest_twisted.ensureDeferred
async def test_a_database_constraint_is_a_4xx_in_one_place(server):
    """Anything the edge lets through and PostgreSQL refuses is 409 or 400, not 500."""
    from agentpost.model.errors import Conflict, InvalidRequest
    from agentpost.storage.database import Txn

    db = server.core.db

    async def unique(txn: Txn) -> None:
        await txn.execute("CREATE TEMP TABLE t_unique (id text PRIMARY KEY)")
        await txn.execute("INSERT INTO t_unique VALUES ('a'), ('a')")

    async def bad_data(txn: Txn) -> None:
        await txn.execute("SELECT %s::timestamptz", ("2030-01-01T00:00:00-18:18",))

    async def nul(txn: Txn) -> None:
        await txn.execute("SELECT %s::text", ("a\x00b",))

    async def too_big(txn: Txn) -> None:
        await txn.execute("SELECT %s::int", (10**30,))

    for fn, expected in ((unique, Conflict), (bad_data, InvalidRequest),
                         (nul, InvalidRequest), (too_big, InvalidRequest)):
        try:
            await db.run_interaction("test.constraint", fn)
        except Exception as exc:
            assert type(exc) is expected, (fn.__name__, exc)
        else:
            raise AssertionError(f"{fn.__name__} did not fail")
    try:
        await db.run_query("test.read", "SELECT %s::text", ("a\x00",))
    except InvalidRequest:
        pass
    else:
        raise AssertionError("a NUL in a read passed")
    # The pool is still healthy afterwards.
    assert await db.ping()


def test_json_depth_check_is_not_recursive():
    """A million brackets are measured without recursion and in linear time."""
    from agentpost.http.validation import json_too_deep

    assert json_too_deep(b"[" * 1_000_000, 32)
    assert not json_too_deep(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', 32)
    assert not json_too_deep(b'{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', 32)
    assert json_too_deep(json.dumps([[[[[]]]]]).encode(), 4)
    assert not json_too_deep(json.dumps([[[[]]]]).encode(), 4)


def test_json_depth_check_is_linear_on_unterminated_strings():
    """An unterminated string of escaped quotes made the string-stripping regex restart
    at every quote (quadratic: 80 KB took 43 s on the reactor; this 1 MB body would
    take hours). Brackets after an unterminated quote are string content, not depth."""
    from agentpost.http.validation import json_too_deep

    assert not json_too_deep(b'"' + b'\\"' * 500_000, 32)
    assert not json_too_deep(b'"' + b'\\"' * 500_000 + b"\\", 32)
    assert not json_too_deep(b'{"a": "' + b"[" * 100, 32)
    assert json_too_deep(b'["\\"", ' * 10 + b"[" * 40, 32)
