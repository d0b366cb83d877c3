"""Hostile review of the send API's outbound machinery (issue 11) over real HTTP:
idempotency keys across inboxes and tenants, and send_at values at the edges of what
a clock or the database can hold. Every answer is a clean JSON error or the right
replay, never another tenant's answer, a second send or a 500."""

from __future__ import annotations

import pytest_twisted

from tests.helpers import query
from tests.test_drafts_api import _draft, _inbox


def _queued(db_dsn: str, inbox_id: str) -> int:
    return query(db_dsn, "SELECT count(*) FROM outbound_queue WHERE inbox_id = %s",
                 (inbox_id,))[0][0]


@pytest_twisted.ensureDeferred
async def test_one_idempotency_key_never_answers_for_another_inbox_or_tenant(server,
                                                                             db_dsn):
    _, key = await server.new_org()
    _, stranger = await server.new_org()
    first = await _inbox(server, key, "first")
    second = await _inbox(server, key, "second")
    theirs = await _inbox(server, stranger, "theirs")
    body = {"to": "a@remote.example", "subject": "once", "text_body": "hi"}
    hdr = {"Idempotency-Key": "same-key"}
    sent = await server.api.post(f"/api/v1/inboxes/{first['id']}/messages", body, key=key,
                                 headers=hdr)
    assert sent.status == 201, sent
    again = await server.api.post(f"/api/v1/inboxes/{first['id']}/messages", body, key=key,
                                  headers=hdr)
    assert again.status == 201 and again.json == sent.json
    other_inbox = await server.api.post(f"/api/v1/inboxes/{second['id']}/messages", body,
                                        key=key, headers=hdr)
    assert other_inbox.status == 409, other_inbox
    assert other_inbox.json["error"]["type"] == "idempotency_conflict"
    other_org = await server.api.post(f"/api/v1/inboxes/{theirs['id']}/messages", body,
                                      key=stranger, headers=hdr)
    assert other_org.status == 201 and other_org.json["id"] != sent.json["id"]
    # The stranger's own key names its own request (409 on another path); a fresh one
    # aimed at the first tenant's inbox is a 404, and no answer is kept for it.
    aimed = await server.api.post(f"/api/v1/inboxes/{first['id']}/messages", body,
                                  key=stranger, headers={"Idempotency-Key": "fresh"})
    assert aimed.status == 404, aimed
    assert query(db_dsn, "SELECT count(*) FROM idempotency_keys WHERE key = 'fresh'") \
        == [(0,)]
    assert (_queued(db_dsn, first["id"]), _queued(db_dsn, second["id"]),
            _queued(db_dsn, theirs["id"])) == (1, 0, 1)


@pytest_twisted.ensureDeferred
async def test_send_at_at_the_edges_of_time_is_a_400(server, db_dsn):
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "edges")
    draft = await _draft(server, key, inbox["id"])
    path = f"/api/v1/drafts/{draft['id']}/send"
    for value in ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00",
                  "9999-12-31T23:59:59-23:59", "2030-02-30T00:00:00Z", "2030-01-01T00:00:00",
                  "1e308", 1e308, -1, True, "2030-01-01T00:00:00+24:00", "\u0000"):
        resp = await server.api.post(path, {"send_at": value}, key=key)
        assert resp.status == 400, (value, resp)
        assert resp.json["error"]["field"] == "send_at", (value, resp.json)
    patched = await server.api.patch(f"/api/v1/inboxes/{inbox['id']}/drafts/{draft['id']}",
                                     {"send_at": "9999-12-31T23:59:59-23:59"}, key=key)
    assert patched.status in (400, 404), patched
    assert _queued(db_dsn, inbox["id"]) == 0
    still = await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)
    assert still.status == 200 and still.json["status"] == "draft", still
