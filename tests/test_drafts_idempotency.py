"""Idempotency-Key on POST /inboxes/{id}/drafts: a create with ``send_at`` is a POST
that sends (the timer sends it later), so a client that lost the answer and retries
must get the first answer back, not a second scheduled draft and a second mail."""

from datetime import UTC, datetime, timedelta

import pytest_twisted

from tests.helpers import query


async def _inbox(server, key, username):
    resp = await server.api.post("/api/v1/inboxes", {"username": username}, key=key)
    assert resp.status == 201, resp
    return resp.json


def _drafts_of(db_dsn, inbox_id):
    return query(db_dsn, "SELECT id, status FROM drafts WHERE inbox_id = %s ORDER BY id",
                 (inbox_id,))


@pytest_twisted.ensureDeferred
async def test_a_retried_scheduling_create_replays_and_another_body_conflicts(server,
                                                                              db_dsn):
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "planner")
    path = f"/api/v1/inboxes/{inbox['id']}/drafts"
    soon = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"to": "bob@example.com", "subject": "Later", "text_body": "in two hours",
            "send_at": soon}
    hdr = {"Idempotency-Key": "plan-1"}
    first = await server.api.post(path, body, key=key, headers=hdr)
    assert first.status == 201, first
    assert first.json["status"] == "scheduled"
    again = await server.api.post(path, dict(reversed(body.items())), key=key, headers=hdr)
    assert again.status == 201 and again.json == first.json
    assert again.headers.get("idempotent-replayed") == "true"
    assert _drafts_of(db_dsn, inbox["id"]) == [(first.json["id"], "scheduled")]
    in_drafts = (await server.api.get(
        f"/api/v1/inboxes/{inbox['id']}/messages?folder=Drafts", key=key)).json["data"]
    assert [m["id"] for m in in_drafts] == [first.json["message_id"]]

    other = await server.api.post(path, {**body, "subject": "Sooner"}, key=key, headers=hdr)
    assert other.status == 409 and other.json["error"]["type"] == "idempotency_conflict"
    assert len(_drafts_of(db_dsn, inbox["id"])) == 1


@pytest_twisted.ensureDeferred
async def test_a_refused_create_frees_the_key_and_no_key_means_no_replay(server, db_dsn):
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "retrier")
    path = f"/api/v1/inboxes/{inbox['id']}/drafts"
    hdr = {"Idempotency-Key": "fix-then-retry"}
    bad = await server.api.post(path, {"to": "not an address"}, key=key, headers=hdr)
    assert bad.status == 400, bad
    good = await server.api.post(path, {"to": "bob@example.com"}, key=key, headers=hdr)
    assert good.status == 201, good
    assert good.headers.get("idempotent-replayed") is None
    # Without the header every POST is a new draft, as before.
    for _ in range(2):
        made = await server.api.post(path, {"to": "bob@example.com"}, key=key)
        assert made.status == 201, made
    assert len(_drafts_of(db_dsn, inbox["id"])) == 3


@pytest_twisted.ensureDeferred
async def test_a_scheduling_send_is_recorded_so_another_body_under_its_key_is_409(server,
                                                                                   db_dsn):
    """POST /drafts/{id}/send with a future send_at answers the first answer to a retry;
    the same key then asking to send now (another body) is refused, not sent."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "scheduler")
    draft = (await server.api.post(f"/api/v1/inboxes/{inbox['id']}/drafts",
                                   {"to": "bob@example.com", "subject": "Plan"},
                                   key=key)).json
    path = f"/api/v1/drafts/{draft['id']}/send"
    soon = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    hdr = {"Idempotency-Key": "schedule-1"}
    first = await server.api.post(path, {"send_at": soon}, key=key, headers=hdr)
    assert first.status == 200 and first.json["status"] == "scheduled", first
    assert first.json["draft"]["subject"] == "Plan"  # rendered as the API shows drafts
    again = await server.api.post(path, {"send_at": soon}, key=key, headers=hdr)
    assert again.status == 200 and again.json == first.json
    assert again.headers.get("idempotent-replayed") == "true"
    now = await server.api.post(path, {}, key=key, headers=hdr)
    assert now.status == 409 and now.json["error"]["type"] == "idempotency_conflict", now
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]
    assert _drafts_of(db_dsn, inbox["id"]) == [(draft["id"], "scheduled")]
    # Another key sends it now, once.
    sent = await server.api.post(path, {}, key=key, headers={"Idempotency-Key": "now-1"})
    assert sent.status == 200 and sent.json["status"] == "sent", sent
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(1,)]
