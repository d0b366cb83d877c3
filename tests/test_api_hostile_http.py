"""The HTTP API as a hostile tenant or stranger uses it (hostile review, apihostile)."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import exchange, http_answers, read_until_closed


@pytest_twisted.ensureDeferred
async def test_two_authorization_headers_are_refused_whichever_comes_first(server):
    """Authorization is not a list field: a proxy judging the first and the server the
    last would act on different keys. The server used to take the last one."""
    _, owner = await server.new_org()
    port = server.service.ports["http"].getHost().port
    for first, second in ((b"ap_sk_wrong", owner.encode()), (owner.encode(), owner.encode())):
        request = (b"GET /api/v1/inboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"Authorization: Bearer " + first + b"\r\n"
                   b"Authorization: Bearer " + second + b"\r\n\r\n")
        [(status, headers, body)] = http_answers(await deferToThread(exchange, port, request))
        assert status.startswith(b"HTTP/1.1 401"), (status, body)
        assert b'"unauthenticated"' in body and b"exactly one" in body
        assert headers[b"www-authenticate"][0].startswith(b"Bearer")
    # One header, in the spellings RFC 9110 allows (scheme case, extra spaces), works.
    for value in (b"Bearer " + owner.encode(), b"bearer " + owner.encode(),
                  b"Bearer   " + owner.encode()):
        request = (b"GET /api/v1/inboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"Authorization: " + value + b"\r\n\r\n")
        [(status, _, body)] = http_answers(await deferToThread(exchange, port, request))
        assert status.startswith(b"HTTP/1.1 200"), (value, body)


@pytest_twisted.ensureDeferred
async def test_webhook_filters_naming_another_tenants_ids_are_refused(server):
    """A webhook's inbox and environment filters used to take any id, another
    organization's included: an endpoint that silently never fires."""
    _, a_key = await server.new_org("A")
    _, b_key = await server.new_org("B")
    b_inbox = (await server.api.post("/api/v1/inboxes", {"username": "bb"}, key=b_key)).json
    a_inbox = (await server.api.post("/api/v1/inboxes", {"username": "aa"}, key=a_key)).json
    staging = (await server.api.post("/api/v1/environments", {"name": "staging"},
                                     key=a_key)).json
    confined = (await server.api.post("/api/v1/api-keys", {
        "name": "c", "environment_ids": [staging["id"]]}, key=a_key)).json["key"]
    url = "https://hooks.example/in"
    refused = [
        (a_key, {"url": url, "inbox_id": b_inbox["id"]}, "inbox_id"),
        (a_key, {"url": url, "inbox_id": "inb_" + "0" * 26}, "inbox_id"),
        (a_key, {"url": url, "environment_ids": [b_inbox["environment_id"]]},
         "environment_ids"),
        (confined, {"url": url, "inbox_id": a_inbox["id"]}, "inbox_id"),  # not its env
    ]
    for key, body, field in refused:
        answer = await server.api.post("/api/v1/webhooks", body, key=key)
        assert answer.status == 404, (body, answer)
        assert answer.json["error"]["field"] == field
    hook = await server.api.post("/api/v1/webhooks", {"url": url}, key=a_key)
    assert hook.status == 201, hook
    path = f"/api/v1/webhooks/{hook.json['id']}"
    for body, _ in ((b, f) for _, b, f in refused[:3]):
        changed = await server.api.patch(path, {k: v for k, v in body.items() if k != "url"},
                                         key=a_key)
        assert changed.status == 404, (body, changed)
    # Its own inbox and environment are taken, on create and on update.
    ok = await server.api.patch(path, {"inbox_id": a_inbox["id"],
                                       "environment_ids": [a_inbox["environment_id"]]},
                                key=a_key)
    assert ok.status == 200, ok
    assert ok.json["inbox_id"] == a_inbox["id"]
    made = await server.api.post("/api/v1/webhooks", {"url": url, "inbox_id": a_inbox["id"]},
                                 key=a_key)
    assert made.status == 201, made


def _trickle(port: int, head: bytes, then: bytes, pause_s: float, limit: int) -> bytes:
    """Send ``head`` at once, then ``then`` a byte per ``pause_s`` (at most ``limit``
    bytes); everything the server answers, until it closes (bounded by the timeout)."""
    import select

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        for i in range(limit):
            ready, _, _ = select.select([sock], [], [], pause_s)
            if ready:
                break
            try:
                sock.sendall(then[i % len(then):i % len(then) + 1])
            except OSError:
                break
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return answer
            if not chunk:
                return answer
            answer += chunk


@pytest_twisted.async_yield_fixture
async def slow_server(db_dsn, openapi_checker):
    """Short request deadlines, so that a trickle meets them soon."""
    from tests.conftest import make_config, start_server

    running = await start_server(make_config(db_dsn, http={
        "header_timeout": "1s", "body_min_rate": 1000}), openapi_checker)
    yield running
    await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_trickled_request_head_is_cut_off_with_408(slow_server):
    """A byte every 0.3 s resets the idle timer every time: without a deadline on the
    head as a whole the connection lived as long as the client liked (slowloris)."""
    _, owner = await slow_server.new_org()
    port = slow_server.service.ports["http"].getHost().port
    head = b"GET /api/v1/inboxes HTTP/1.1\r\nHost: x\r\n"
    answer = await deferToThread(_trickle, port, head, b"X-Padding: aaaaaaaaaaaaa\r\n",
                                 0.3, 200)
    [(status, headers, body)] = http_answers(answer)
    assert status.startswith(b"HTTP/1.1 408"), answer
    assert b'"request_timeout"' in body
    assert b"x-content-type-options" in headers
    # A request sent at once still works on that server.
    request = (b"GET /api/v1/inboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Authorization: Bearer " + owner.encode() + b"\r\n\r\n")
    [(status, _, _)] = http_answers(await deferToThread(exchange, port, request))
    assert status.startswith(b"HTTP/1.1 200")


@pytest_twisted.ensureDeferred
async def test_a_trickled_body_is_cut_off_with_408(slow_server):
    """The body of a request must keep up [http] body_min_rate."""
    _, owner = await slow_server.new_org()
    port = slow_server.service.ports["http"].getHost().port
    head = (b"POST /api/v1/inboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + owner.encode() + b"\r\nContent-Length: 100000\r\n\r\n")
    answer = await deferToThread(_trickle, port, head, b" ", 0.3, 200)
    [(status, _, body)] = http_answers(answer)
    assert status.startswith(b"HTTP/1.1 408"), answer
    assert b'"request_timeout"' in body
    # Nothing was created from the half-sent body.
    listed = await slow_server.api.get("/api/v1/inboxes", key=owner)
    assert listed.json["data"] == []


@pytest_twisted.ensureDeferred
async def test_keep_alive_and_pipelined_requests_are_not_mistaken_for_slow_ones(slow_server):
    """The head deadline starts with a request's first byte: a connection idle between
    requests (within the idle timeout) and requests pipelined behind a slow answer are
    not cut off."""
    _, owner = await slow_server.new_org()
    port = slow_server.service.ports["http"].getHost().port
    one = (b"GET /api/v1/inboxes HTTP/1.1\r\nHost: x\r\n"
           b"Authorization: Bearer " + owner.encode() + b"\r\n\r\n")

    def session() -> bytes:
        import time as _time

        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(one + one)  # pipelined
            _time.sleep(1.5)  # idle past header_timeout, within the idle timeout
            sock.sendall(one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            return read_until_closed(sock)

    answers = http_answers(await deferToThread(session))
    assert [a[0][:12] for a in answers] == [b"HTTP/1.1 200"] * 3, answers


@pytest_twisted.ensureDeferred
async def test_leading_double_slashes_are_an_unknown_path(server):
    """werkzeug strips leading slashes, so "//api/v1/inboxes" used to be served: a path a
    proxy in front judged by its prefix (say, "not under /admin/") still reached the
    route. Like "/api/v1//inboxes", it is an unknown path now."""
    _, owner = await server.new_org()
    admin = await server.admin_key()
    for path, key in (("//api/v1/inboxes", owner), ("///api/v1/inboxes", owner),
                      ("//admin/v1/organizations", admin), ("//healthz", None)):
        answer = await server.api.get(path, key=key)
        assert answer.status == 404, (path, answer)
        assert answer.json["error"]["type"] == "not_found"
        assert answer.headers["x-frame-options"] == "DENY"
    assert (await server.api.get("/api/v1/inboxes/", key=owner)).status == 200
    assert (await server.api.get("/admin/v1/organizations", key=admin)).status == 200


@pytest_twisted.ensureDeferred
async def test_the_audit_action_filter_is_text_not_a_like_pattern(server):
    """``action`` is documented as exact, or a prefix ending in ``*``; it used to be a
    LIKE pattern either way: ``%`` listed everything, ``_`` any character, and a trailing
    backslash failed the statement."""
    from twisted.internet import reactor, task

    _, owner = await server.new_org()
    made = await server.api.post("/api/v1/api-keys", {"name": "k"}, key=owner)
    assert made.status == 201
    await server.api.post("/api/v1/inboxes", {"username": "audited"}, key=owner)

    async def actions(value: str) -> list[str]:
        answer = await server.api.get(f"/api/v1/audit-logs?action={value}", key=owner)
        assert answer.status == 200, (value, answer)
        return [row["action"] for row in answer.json["data"]]

    async def flushed() -> bool:
        return "inboxes.create" in await actions("inboxes.create")

    for _ in range(200):  # the audit buffer is written shortly after the answer
        if await flushed():
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert await actions("api_keys.create") == ["api_keys.create"]
    assert await actions("api_keys.*") == ["api_keys.create"]
    assert await actions("inboxes.*") == ["inboxes.create"]
    for literal in ("%25", "_%25", "api_keys_create", "api_keys_*", "i%5C", "%25%5C",
                    "_%5C", "%5C*", "inboxes.create%5C"):
        assert await actions(literal) == [], literal
