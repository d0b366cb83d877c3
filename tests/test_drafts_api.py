"""Drafts over the API: CRUD, tenancy, scopes, paging and hostile fields."""

import base64
from datetime import UTC, datetime, timedelta

import pytest_twisted

from tests.helpers import query


async def _inbox(server, key, username, **extra):
    resp = await server.api.post("/api/v1/inboxes", {"username": username, **extra}, key=key)
    assert resp.status == 201, resp
    return resp.json


async def _draft(server, key, inbox_id, **fields):
    body = {"to": ["Bob <bob@example.com>"], "subject": "Hello", "text_body": "Hi Bob\n",
            **fields}
    resp = await server.api.post(f"/api/v1/inboxes/{inbox_id}/drafts", body, key=key)
    assert resp.status == 201, resp
    return resp.json


@pytest_twisted.ensureDeferred
async def test_create_get_update_delete_keeps_one_copy_in_drafts(server, db_dsn):
    """A draft is a row plus one \\Draft message in Drafts; PATCH keeps the id and
    swaps the copy; DELETE removes both."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "writer")
    pdf = b"%PDF-1.4 " + bytes(range(256))
    draft = await _draft(server, key, inbox["id"], cc=[{"email": "carol@example.org",
                                                        "name": "Carol"}],
                         labels=["outbox"], html_body="<p>Hi <b>Bob</b></p>",
                         attachments=[{"filename": "a.pdf", "mime_type": "application/pdf",
                                       "content": base64.b64encode(pdf).decode()}])
    assert draft["id"].startswith("drf_") and draft["status"] == "draft"
    assert draft["to"] == [{"email": "bob@example.com", "name": "Bob"}]
    assert draft["cc"] == [{"email": "carol@example.org", "name": "Carol"}]
    assert draft["labels"] == ["outbox"] and draft["send_at"] is None
    [att] = draft["attachments"]
    assert (att["filename"], att["mime_type"], att["size"]) == ("a.pdf", "application/pdf",
                                                                len(pdf))
    copy = (await server.api.get(f"/api/v1/messages/{draft['message_id']}", key=key)).json
    assert copy["folder"] == "Drafts" and copy["folder_role"] == "drafts"
    assert copy["subject"] == "Hello" and copy["labels"] == ["outbox"]
    assert query(db_dsn, "SELECT draft FROM messages WHERE id = %s",
                 (draft["message_id"],)) == [(True,)]

    got = await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)
    assert got.status == 200 and got.json == draft

    changed = await server.api.patch(f"/api/v1/drafts/{draft['id']}",
                                     {"subject": "Hello again"}, key=key)
    assert changed.status == 200, changed
    new = changed.json
    assert new["id"] == draft["id"] and new["subject"] == "Hello again"
    assert new["message_id"] != draft["message_id"]
    assert new["to"] == draft["to"] and new["labels"] == ["outbox"]
    assert [a["filename"] for a in new["attachments"]] == ["a.pdf"]  # carried over
    old = await server.api.get(f"/api/v1/messages/{draft['message_id']}", key=key)
    assert old.status == 404
    in_drafts = (await server.api.get(
        f"/api/v1/inboxes/{inbox['id']}/messages?folder=Drafts", key=key)).json["data"]
    assert [m["id"] for m in in_drafts] == [new["message_id"]]

    assert (await server.api.delete(f"/api/v1/drafts/{draft['id']}", key=key)).status == 204
    assert (await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)).status == 404
    assert query(db_dsn, "SELECT count(*) FROM drafts") == [(0,)]
    assert query(db_dsn, "SELECT count(*) FROM messages") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_list_is_paginated_newest_first(server):
    """Lists answer {data, limit, next_page_token} like every other list."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "pager")
    ids = [(await _draft(server, key, inbox["id"], subject=f"n{i}"))["id"] for i in range(3)]
    first = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/drafts?limit=2",
                                  key=key)).json
    assert [d["id"] for d in first["data"]] == ids[::-1][:2]
    token = first["next_page_token"]
    second = (await server.api.get(
        f"/api/v1/inboxes/{inbox['id']}/drafts?limit=2&page_token={token}", key=key)).json
    assert [d["id"] for d in second["data"]] == [ids[0]]
    assert second["next_page_token"] is None


@pytest_twisted.ensureDeferred
async def test_foreign_drafts_and_inboxes_are_not_found(server):
    """Another organization's draft or inbox, or an inbox outside a key's environments,
    is a 404 for every verb; a read-only key cannot write."""
    _, key = await server.new_org("Mine")
    _, other_key = await server.new_org("Theirs")
    mine = await _inbox(server, key, "mine")
    theirs = await _inbox(server, other_key, "theirs")
    draft = await _draft(server, other_key, theirs["id"])
    for method, path, body in (
            ("GET", f"/api/v1/drafts/{draft['id']}", None),
            ("PATCH", f"/api/v1/drafts/{draft['id']}", {"subject": "x"}),
            ("DELETE", f"/api/v1/drafts/{draft['id']}", None),
            ("POST", f"/api/v1/drafts/{draft['id']}/send", {}),
            ("POST", f"/api/v1/drafts/{draft['id']}/cancel", None),
            ("GET", f"/api/v1/inboxes/{theirs['id']}/drafts", None),
            ("POST", f"/api/v1/inboxes/{theirs['id']}/drafts", {"subject": "x"})):
        resp = await server.api.request(method, path, key=key, json_body=body)
        assert resp.status == 404, (method, path, resp)
    # A reply to another tenant's message is refused the same way.
    theirs_msg = (await server.api.get(f"/api/v1/drafts/{draft['id']}",
                                       key=other_key)).json["message_id"]
    resp = await server.api.post(f"/api/v1/inboxes/{mine['id']}/drafts",
                                 {"in_reply_to": theirs_msg}, key=key)
    assert resp.status == 404

    env = (await server.api.post("/api/v1/environments", {"name": "Side"}, key=key)).json
    side = await _inbox(server, key, "side", environment_id=env["id"])
    side_draft = await _draft(server, key, side["id"])
    restricted = (await server.api.post("/api/v1/api-keys", {
        "scopes": ["messages:read", "messages:write"],
        "environment_ids": [env["id"]]}, key=key)).json["key"]
    home_draft = await _draft(server, key, mine["id"])
    assert (await server.api.get(f"/api/v1/drafts/{side_draft['id']}",
                                 key=restricted)).status == 200
    assert (await server.api.get(f"/api/v1/drafts/{home_draft['id']}",
                                 key=restricted)).status == 404
    assert (await server.api.get(f"/api/v1/inboxes/{mine['id']}/drafts",
                                 key=restricted)).status == 404
    # Scopes: write without send may not schedule; read-only may not write.
    resp = await server.api.patch(f"/api/v1/drafts/{side_draft['id']}",
                                  {"send_at": "2030-01-01T00:00:00Z"}, key=restricted)
    assert resp.status == 403 and resp.json["error"]["missing_scope"] == "messages:send"
    reader = (await server.api.post("/api/v1/api-keys", {"scopes": ["messages:read"]},
                                    key=key)).json["key"]
    resp = await server.api.patch(f"/api/v1/drafts/{home_draft['id']}", {"subject": "x"},
                                  key=reader)
    assert resp.status == 403


@pytest_twisted.ensureDeferred
async def test_header_injection_and_bad_fields_are_400(server, db_dsn):
    """CR/LF in anything that becomes a header, bad addresses, NUL in bodies, unknown
    fields, a bad attachment: 400 naming the field, nothing stored."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "guarded")
    path = f"/api/v1/inboxes/{inbox['id']}/drafts"
    cases = [
        ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject"),
        ({"to": ["bob@example.com\r\nBcc: victim@example.com"]}, "to"),
        ({"to": [{"email": "bob@example.com", "name": "Bob\nBcc: v@example.com"}]}, "to"),
        ({"cc": "not an address"}, "cc"),
        ({"reply_to": [{"email": "x@example.com", "extra": 1}]}, "reply_to"),
        ({"headers": {"X-Tag": "a\r\nBcc: v@example.com"}}, "headers"),
        ({"headers": {"From": "evil@example.com"}}, "headers"),
        ({"text_body": "nul \x00 here"}, "text_body"),
        ({"text_body": "lone \ud800 surrogate"}, None),
        ({"subject": "lone \udfff surrogate"}, None),
        ({"to": "a" * 70 + "@example.com"}, "to"),
        ({"attachments": [{"filename": "../../etc/passwd", "content": "AAAA"}]}, None),
        ({"attachments": [{"filename": "a\r\nX: y", "content": "AAAA"}]}, None),
        ({"attachments": [{"filename": "a.bin", "content": "not base64!"}]}, None),
        ({"attachments": [{"filename": "a.bin", "mime_type": "text/plain\r\nX: y",
                           "content": "AAAA"}]}, None),
        ({"labels": ["Bad Label"]}, "labels"),
        ({"nonsense": 1}, "nonsense"),
        ({"send_at": "tomorrow"}, "send_at"),
        ({"send_at": "2999-01-01T00:00:00Z"}, "send_at"),  # beyond the schedule limit
    ]
    for body, field in cases:
        resp = await server.api.post(path, body, key=key)
        assert resp.status == 400, (body, resp)
        if field is not None:
            assert resp.json["error"]["field"].startswith(field), (body, resp.json)
    draft = await _draft(server, key, inbox["id"])
    resp = await server.api.patch(f"/api/v1/drafts/{draft['id']}",
                                  {"subject": "x\ny"}, key=key)
    assert resp.status == 400
    assert (await server.api.patch(f"/api/v1/drafts/{draft['id']}", {}, key=key)).status == 400
    assert query(db_dsn, "SELECT count(*) FROM drafts") == [(1,)]
    assert (await server.api.get("/api/v1/drafts/drf_nonsense", key=key)).status == 404


@pytest_twisted.ensureDeferred
async def test_schedule_and_cancel_through_patch_and_cancel(server):
    """send_at schedules (status scheduled); PATCH null or /cancel returns it to draft."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "planner")
    draft = await _draft(server, key, inbox["id"])
    resp = await server.api.patch(f"/api/v1/drafts/{draft['id']}",
                                  {"send_at": "2099-01-01T00:00:00Z"}, key=key)
    assert resp.status == 400  # beyond the 30-day limit
    soon = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    scheduled = (await server.api.patch(f"/api/v1/drafts/{draft['id']}",
                                        {"send_at": soon}, key=key)).json
    assert scheduled["status"] == "scheduled" and scheduled["send_at"].startswith(soon[:19])
    assert scheduled["message_id"] == draft["message_id"]  # no new copy for a plan change
    cancelled = (await server.api.patch(f"/api/v1/drafts/{draft['id']}",
                                        {"send_at": None}, key=key)).json
    assert cancelled["status"] == "draft" and cancelled["send_at"] is None
    again = (await server.api.patch(f"/api/v1/drafts/{draft['id']}",
                                    {"send_at": soon, "subject": "edited"}, key=key)).json
    assert again["status"] == "scheduled" and again["subject"] == "edited"
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/cancel", key=key)
    assert resp.status == 200 and resp.json["status"] == "draft"
    # A key that may only send can schedule and take it back, not edit.
    sender = (await server.api.post("/api/v1/api-keys", {"scopes": ["messages:send"]},
                                    key=key)).json["key"]
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {"send_at": soon},
                                 key=sender)
    assert resp.status == 200 and resp.json["status"] == "scheduled"
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/cancel", key=sender)
    assert resp.status == 200 and resp.json["status"] == "draft"
    resp = await server.api.patch(f"/api/v1/drafts/{draft['id']}", {"subject": "x"},
                                  key=sender)
    assert resp.status == 403


@pytest_twisted.ensureDeferred
async def test_send_now_stores_sent_copy_queues_and_deletes_the_draft(server, db_dsn):
    """POST /drafts/{id}/send: the Sent copy, its queue row and the draft's removal
    commit together; an Idempotency-Key replays the answer instead of a second send."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "sender")
    draft = await _draft(server, key, inbox["id"], labels=["followup"],
                         attachments=[{"filename": "n.txt", "mime_type": "text/plain",
                                       "content": base64.b64encode(b"notes").decode()}])
    path = f"/api/v1/drafts/{draft['id']}/send"
    resp = await server.api.request("POST", path, key=key, json_body={},
                                    headers={"Idempotency-Key": "k-1"})
    assert resp.status == 200, resp
    sent = resp.json
    assert sent["status"] == "sent" and sent["draft"] is None
    message = sent["message"]
    assert message["folder"] == "Sent" and message["direction"] == "outbound"
    assert message["subject"] == "Hello" and message["labels"] == ["followup"]
    assert [a["filename"] for a in message["attachments"]] == ["n.txt"]
    assert (await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)).status == 404
    assert (await server.api.get(f"/api/v1/messages/{draft['message_id']}",
                                 key=key)).status == 404
    again = await server.api.request("POST", path, key=key, json_body={},
                                     headers={"Idempotency-Key": "k-1"})
    assert again.status == 200 and again.json == sent
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(1,)]
    assert query(db_dsn, "SELECT count(*) FROM drafts") == [(0,)]
    # Without a key, a second send of a sent draft is simply not found.
    assert (await server.api.post(path, {}, key=key)).status == 404


@pytest_twisted.ensureDeferred
async def test_send_refused_keeps_the_draft(server, db_dsn):
    """A refused send (no recipient, paused inbox) leaves the draft as it was."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "paused")
    empty = await _draft(server, key, inbox["id"], to=[])
    resp = await server.api.post(f"/api/v1/drafts/{empty['id']}/send", {}, key=key)
    assert resp.status == 400 and resp.json["error"]["field"] == "to"
    draft = await _draft(server, key, inbox["id"])
    await server.api.patch(f"/api/v1/inboxes/{inbox['id']}", {"send_paused": True}, key=key)
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {}, key=key)
    assert resp.status == 403 and resp.json["error"]["type"] == "sending_paused"
    kept = (await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)).json
    assert kept["status"] == "draft" and kept["message_id"] == draft["message_id"]
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_send_with_send_at_schedules_and_past_send_at_sends_now(server, db_dsn):
    """send_at in the future schedules (cancellable); in the past it sends at once."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "timer")
    draft = await _draft(server, key, inbox["id"])
    soon = (datetime.now(UTC) + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {"send_at": soon},
                                 key=key)
    assert resp.status == 200, resp
    assert resp.json["status"] == "scheduled" and resp.json["message"] is None
    assert resp.json["draft"]["status"] == "scheduled"
    far = (datetime.now(UTC) + timedelta(days=31)).strftime("%Y-%m-%dT%H:%M:%SZ")
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {"send_at": far},
                                 key=key)
    assert resp.status == 400 and resp.json["error"]["field"] == "send_at"
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {"send_at": past},
                                 key=key)
    assert resp.status == 200 and resp.json["status"] == "sent", resp
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_uploaded_attachment_by_key_and_foreign_key(server):
    """{key} attachments come from the organization's uploads; another's key is 404."""
    from urllib.parse import urlsplit

    import treq

    _, key = await server.new_org()
    _, other = await server.new_org("Other")
    inbox = await _inbox(server, key, "uploader")
    data = b"uploaded bytes " * 100
    ticket = (await server.api.post("/api/v1/attachments", {
        "filename": "up.bin", "mime_type": "application/octet-stream", "size": len(data)},
        key=key)).json
    parts = urlsplit(ticket["upload_url"])
    put = await treq.request("PUT", server.base_url + parts.path + "?" + parts.query,
                             data=data, persistent=False)
    await treq.content(put)
    assert put.code in (200, 201, 204), put.code
    draft = await _draft(server, key, inbox["id"],
                         attachments=[{"key": ticket["key"], "filename": "renamed.bin"}])
    [att] = draft["attachments"]
    assert (att["filename"], att["size"]) == ("renamed.bin", len(data))
    theirs = await _inbox(server, other, "thief")
    resp = await server.api.post(f"/api/v1/inboxes/{theirs['id']}/drafts",
                                 {"attachments": [{"key": ticket["key"]}]}, key=other)
    assert resp.status == 404


@pytest_twisted.ensureDeferred
async def test_concurrent_edits_never_leave_two_copies(server, db_dsn):
    """Racing PATCHes: each is applied or answered 409 (based on a copy that is gone);
    one copy remains in Drafts, and it is the row's."""
    from twisted.internet import defer

    _, key = await server.new_org()
    inbox = await _inbox(server, key, "racer")
    draft = await _draft(server, key, inbox["id"])
    results = await defer.gatherResults([
        defer.ensureDeferred(server.api.patch(f"/api/v1/drafts/{draft['id']}",
                                              {"subject": f"take {i}"}, key=key))
        for i in range(4)])
    assert {r.status for r in results} <= {200, 409}
    assert any(r.status == 200 for r in results)
    final = (await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)).json
    copies = query(db_dsn, "SELECT m.id, m.subject FROM messages m JOIN folders f "
                           "ON f.id = m.folder_id WHERE f.name = 'Drafts'")
    assert copies == [(final["message_id"], final["subject"])]


@pytest_twisted.ensureDeferred
async def test_reply_draft_joins_the_thread_and_sends_with_reply_headers(server):
    """in_reply_to (a msg_ id of the inbox) gives the draft the parent's thread, and
    the sent message In-Reply-To/References."""
    from tests.mailfactory import make_message

    _, key = await server.new_org()
    inbox = await _inbox(server, key, "replier")
    [parent] = await server.deliver(make_message(to=inbox["email"], msgid="<p1@example.com>",
                                                 references="<p0@example.com>"),
                                    [inbox["email"]])
    draft = await _draft(server, key, inbox["id"], in_reply_to=parent.message_id,
                         subject="Re: Hello")
    assert draft["in_reply_to"] == parent.message_id
    assert draft["thread_id"] == parent.thread_id
    sent = (await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {},
                                  key=key)).json["message"]
    assert sent["in_reply_to"] == "p1@example.com"
    assert sent["references"] == ["p0@example.com", "p1@example.com"]
    assert sent["thread_id"] == parent.thread_id
