"""The GET path's latency work (issue 12): buffered audit rows leave in slices, a page
of inboxes is joined by PostgreSQL with the same cursor semantics, and a response goes
to the socket when it is finished, also on keep-alive and pipelined connections."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import task, threads

from agentpost.core.audit import FLUSH_SLICE, AuditTrail
from agentpost.core.context import RequestContext
from tests.helpers import query


@pytest_twisted.ensureDeferred
async def test_audit_rows_leave_in_slices_without_waiting_for_the_timer(db_dsn):
    from twisted.internet import reactor

    from agentpost.storage.database import Database

    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=2)
    clock = task.Clock()  # never advanced: only the slice size can start a drain
    trail = AuditTrail(db, clock, 0.2, max_buffer=1000)
    for i in range(FLUSH_SLICE - 1):
        trail.enqueue(RequestContext(f"req_s{i}", "127.0.0.1", "test.slice"), "allowed", 200)
    assert trail.pending == FLUSH_SLICE - 1  # below a slice: waits for the timer
    trail.enqueue(RequestContext("req_last", "127.0.0.1", "test.slice"), "allowed", 200)
    assert trail.pending == 0  # the slice went to a drain at once
    for i in range(3):  # rows arriving during the drain are picked up by it
        trail.enqueue(RequestContext(f"req_t{i}", "127.0.0.1", "test.slice"), "allowed", 200)
    await trail.stop()
    await db.close()
    rows = query(db_dsn, "SELECT count(*), count(DISTINCT id) FROM audit_log "
                 "WHERE action = 'test.slice'")
    assert rows == [(FLUSH_SLICE + 3, FLUSH_SLICE + 3)]


@pytest_twisted.ensureDeferred
async def test_a_page_ends_exactly_where_the_inboxes_do(server):
    _, key = await server.new_org()
    made = []
    for name in ("first", "second", "third"):
        answer = await server.api.post("/api/v1/inboxes", {"username": name}, key=key)
        assert answer.status == 201
        made.append(answer.json["id"])
    newest_first = sorted(made, reverse=True)
    whole = (await server.api.get("/api/v1/inboxes?limit=3", key=key)).json
    assert [i["id"] for i in whole["data"]] == newest_first
    assert whole["next_page_token"] is None and whole["limit"] == 3
    seen, token, pages = [], None, 0
    while True:
        path = "/api/v1/inboxes?limit=2" + (f"&page_token={token}" if token else "")
        page = (await server.api.get(path, key=key)).json
        pages += 1
        seen += [i["id"] for i in page["data"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == newest_first and pages == 2
    _, stranger = await server.new_org("Empty org")
    empty = await server.api.get("/api/v1/inboxes?limit=1", key=stranger)
    assert empty.status == 200 and empty.body == (
        b'{"data":[],"limit":1,"next_page_token":null}')


def _pipelined(port: int, key: str, count: int) -> bytes:
    """``count`` GETs written at once on one connection, the last one closing it."""
    requests = []
    for n in range(count):
        close = "Connection: close\r\n" if n == count - 1 else ""
        requests.append(f"GET /api/v1/inboxes HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Bearer {key}\r\n{close}\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall("".join(requests).encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_pipelined_answers_all_arrive_in_order_then_the_connection_closes(server):
    _, key = await server.new_org()
    await server.api.post("/api/v1/inboxes", {"username": "pipe"}, key=key)
    port = int(server.base_url.rsplit(":", 1)[1])
    raw = await threads.deferToThread(_pipelined, port, key, 20)
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 20
    assert raw.count(b'"username":"pipe"') == 20
    assert raw.endswith(b"}")


@pytest_twisted.ensureDeferred
async def test_the_joined_page_is_the_rendered_rows_joined(server):
    from agentpost.storage import inboxes as inbox_store

    org, key = await server.new_org()
    for i in range(5):
        assert (await server.api.post("/api/v1/inboxes", {"username": f"j{i}"},
                                      key=key)).status == 201
    db = server.core.db
    rows = await db.run_read("test.rows", inbox_store.list_inbox_json, org["id"], None,
                             None, 100)
    for limit in (1, 2, 4, 5, 6):
        for after in (None, rows[1]["id"]):
            expected = [r for r in rows if after is None or r["id"] < after]
            text, last = await db.run_read("test.page", inbox_store.list_inbox_page,
                                           org["id"], None, after, limit)
            assert text == ",".join(r["json"] for r in expected[:limit])
            assert last == (expected[limit - 1]["id"] if len(expected) > limit else None)
