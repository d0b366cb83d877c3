"""The ingest path and the read side of the messages API, end to end over HTTP."""

import hashlib

import pytest_twisted

from tests.helpers import query
from tests.mailfactory import make_message


async def _inbox(server, key, username):
    resp = await server.api.post("/api/v1/inboxes", {"username": username}, key=key)
    assert resp.status == 201, resp
    return resp.json


@pytest_twisted.ensureDeferred
async def test_stored_message_fields_raw_and_attachments(server, db_dsn):
    """Parsed fields, byte-exact raw, attachment bytes, and the message.received event."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "bot")
    pdf = bytes(range(256)) * 40
    raw = make_message(subject="Quarterly numbers", body="See attached.\n",
                       html="<p>See <b>attached</b>.</p>", msgid="<q1@example.com>",
                       attachments=[("report.pdf", "application/pdf", pdf)],
                       extra_headers=[("X-Dup", "one"), ("X-Dup", "two")])
    stored = await server.deliver(raw, [inbox["email"]])
    assert len(stored) == 1

    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    assert listed.status == 200
    [summary] = listed.json["data"]
    assert summary["subject"] == "Quarterly numbers" and summary["read"] is False
    assert "text_body" not in summary and summary["has_attachments"] is True
    msg = (await server.api.get(f"/api/v1/messages/{summary['id']}", key=key)).json
    assert msg["from_address"] == {"email": "alice@example.com", "name": "Alice"}
    assert msg["to_addresses"] == [{"email": "bot@agents.test", "name": ""}]
    assert msg["text_body"].strip() == "See attached."
    assert "<b>attached</b>" in msg["html_body"]
    assert msg["message_id"] == "q1@example.com" and msg["direction"] == "inbound"
    [att] = msg["attachments"]
    assert (att["filename"], att["mime_type"], att["size"]) == ("report.pdf",
                                                                "application/pdf", len(pdf))

    raw_resp = await server.api.get(f"/api/v1/messages/{msg['id']}/raw", key=key)
    assert raw_resp.status == 200 and raw_resp.body == raw
    assert raw_resp.headers["content-type"] == "message/rfc822"
    att_resp = await server.api.get(f"/api/v1/messages/{msg['id']}/attachments/{att['id']}",
                                    key=key)
    assert att_resp.status == 200 and att_resp.body == pdf
    assert 'filename="report.pdf"' in att_resp.headers["content-disposition"]

    events = query(db_dsn, "SELECT type, data->>'message_id' FROM events")
    assert events == [("message.received", msg["id"])]
    sha = query(db_dsn, "SELECT sha256 FROM attachments")[0][0]
    assert sha == hashlib.sha256(pdf).hexdigest()


@pytest_twisted.ensureDeferred
async def test_threading_by_headers_without_subject_fallback(server):
    """Replies join their parent's thread (even out of order); equal subjects alone do not."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "threads")
    to = [inbox["email"]]
    await server.deliver(make_message(subject="Plan", msgid="<a@x>"), to)
    await server.deliver(make_message(subject="Re: Plan", msgid="<c@x>", in_reply_to="<b@x>",
                                      references="<a@x> <b@x>",
                                      frm="Carol <carol@example.org>"), to)
    await server.deliver(make_message(subject="Re: Plan", msgid="<b@x>", in_reply_to="<a@x>",
                                      references="<a@x>", frm="Bob <bob@example.net>"), to)
    await server.deliver(make_message(subject="Plan", msgid="<z@x>"), to)
    threads = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/threads", key=key)).json
    counts = sorted(t["message_count"] for t in threads["data"])
    assert counts == [1, 3]
    big = next(t for t in threads["data"] if t["message_count"] == 3)
    assert big["subject"] == "Plan"
    assert {"alice@example.com", "bob@example.net", "carol@example.org"} <= set(
        big["participants"])
    full = (await server.api.get(f"/api/v1/threads/{big['id']}", key=key)).json
    assert [m["message_id"] for m in full["messages"]] == ["a@x", "c@x", "b@x"]
    only = await server.api.get(
        f"/api/v1/inboxes/{inbox['id']}/messages?thread_id={big['id']}", key=key)
    assert len(only.json["data"]) == 3


@pytest_twisted.ensureDeferred
async def test_one_message_to_two_inboxes_is_stored_once_per_inbox(server, db_dsn):
    """Each inbox gets its own copy; the raw blob is shared and freed only when unused."""
    _, key = await server.new_org()
    a = await _inbox(server, key, "first")
    b = await _inbox(server, key, "second")
    raw = make_message(to="first@agents.test, second@agents.test")
    stored = await server.deliver(raw, [a["email"], b["email"]])
    assert len({s.message_id for s in stored}) == 2
    [(blob_key, refcount)] = query(db_dsn, "SELECT key, refcount FROM blobs")
    assert refcount == 2
    assert await server.core.blobs.exists(blob_key)
    await server.api.delete(f"/api/v1/messages/{stored[0].message_id}", key=key)
    assert query(db_dsn, "SELECT refcount FROM blobs") == [(1,)]
    assert await server.core.blobs.exists(blob_key)
    await server.api.delete(f"/api/v1/messages/{stored[1].message_id}", key=key)
    assert query(db_dsn, "SELECT count(*) FROM blobs") == [(0,)]
    assert not await server.core.blobs.exists(blob_key)
    assert query(db_dsn, "SELECT count(*) FROM threads") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_read_state_labels_and_list_filters(server):
    """PATCH read, labels on messages and threads, and the list filters."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "labels")
    first = (await server.deliver(make_message(msgid="<l1@x>"), [inbox["email"]]))[0]
    second = (await server.deliver(make_message(msgid="<l2@x>", in_reply_to="<l1@x>"),
                                   [inbox["email"]]))[0]
    base = f"/api/v1/inboxes/{inbox['id']}/messages"
    read = await server.api.patch(f"/api/v1/messages/{first.message_id}", {"read": True},
                                  key=key)
    assert read.status == 200 and read.json["read"] is True
    unread = await server.api.get(base + "?unread=true", key=key)
    assert [m["id"] for m in unread.json["data"]] == [second.message_id]
    labelled = await server.api.post(f"/api/v1/messages/{second.message_id}/labels",
                                     {"labels": ["urgent", "billing"]}, key=key)
    assert labelled.json["labels"] == ["billing", "urgent"]
    bad = await server.api.post(f"/api/v1/messages/{second.message_id}/labels",
                                {"labels": ["Not Lowercase"]}, key=key)
    assert bad.status == 400
    by_label = await server.api.get(base + "?labels=urgent", key=key)
    assert [m["id"] for m in by_label.json["data"]] == [second.message_id]
    thread = await server.api.post(f"/api/v1/threads/{first.thread_id}/labels",
                                   {"labels": ["project-x"]}, key=key)
    assert thread.json["labels"] == ["billing", "project-x", "urgent"]
    removed = await server.api.request("DELETE", f"/api/v1/messages/{second.message_id}/labels",
                                       json_body={"labels": ["urgent"]}, key=key)
    assert removed.json["labels"] == ["billing", "project-x"]
    page = await server.api.get(base + "?limit=1", key=key)
    nxt = await server.api.get(base + f"?limit=1&page_token={page.json['next_page_token']}",
                               key=key)
    assert [page.json["data"][0]["id"], nxt.json["data"][0]["id"]] == [second.message_id,
                                                                      first.message_id]
    future = await server.api.get(base + "?after=2999-01-01T00:00:00Z", key=key)
    assert future.json["data"] == []


@pytest_twisted.ensureDeferred
async def test_message_scopes(server):
    """messages:read is needed to read, messages:write to change."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "scoped")
    stored = (await server.deliver(make_message(), [inbox["email"]]))[0]
    ro = (await server.api.post("/api/v1/api-keys", {"scopes": ["messages:read"]},
                                key=key)).json["key"]
    none = (await server.api.post("/api/v1/api-keys", {"scopes": ["inboxes:read"]},
                                  key=key)).json["key"]
    assert (await server.api.get(f"/api/v1/messages/{stored.message_id}", key=ro)).status == 200
    denied = await server.api.patch(f"/api/v1/messages/{stored.message_id}", {"read": True},
                                    key=ro)
    assert denied.status == 403 and denied.json["error"]["missing_scope"] == "messages:write"
    assert (await server.api.get(f"/api/v1/messages/{stored.message_id}",
                                 key=none)).status == 403


@pytest_twisted.ensureDeferred
async def test_large_text_body_derives_extracted_text_on_read(server):
    """Bodies over 64 KiB keep no stored copy of the extracted text; the API still
    answers it, computed from the body."""
    from agentpost.core.ingest import STORE_EXTRACTED_MAX_CHARS
    from agentpost.mail.reply import extract_new_text
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "big-text"},
                                   key=key)).json
    body = "new words here\n" * (STORE_EXTRACTED_MAX_CHARS // 10) + \
        "On Mon, Ann <a@b> wrote:\n> old\n"
    await server.deliver(make_message(to=inbox["email"], body=body), [inbox["email"]])
    [summary] = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                      key=key)).json["data"]
    msg = (await server.api.get(f"/api/v1/messages/{summary['id']}", key=key)).json
    assert msg["extracted_text"] == extract_new_text(msg["text_body"])
    assert "wrote:" not in msg["extracted_text"] and len(msg["extracted_text"]) > 90_000
    rows = await server.core.db.run_query(
        "t", "SELECT extracted_text FROM messages WHERE id = %s", (summary["id"],))
    assert rows[0]["extracted_text"] is None


@pytest_twisted.ensureDeferred
async def test_extracted_text_is_stored_only_when_it_differs_from_the_body(server):
    """Most mail has no quoted history: its new text is the whole body, and a second
    copy of it is not stored; the API answers the same either way."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "extracted"},
                                   key=key)).json
    plain = "Just a note, nothing quoted.\n"
    reply = "Yes, Thursday works.\n\nOn Mon, Ann <a@b> wrote:\n> Does Thursday work?\n"
    for subject, body in (("plain", plain), ("reply", reply)):
        await server.deliver(make_message(to=inbox["email"], subject=subject, body=body),
                             [inbox["email"]])
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                   key=key)).json["data"]
    got = {}
    for summary in listed:
        msg = (await server.api.get(f"/api/v1/messages/{summary['id']}", key=key)).json
        [[stored]] = [list(r.values()) for r in await server.core.db.run_query(
            "t", "SELECT extracted_text FROM messages WHERE id = %s", (summary["id"],))]
        got[msg["subject"]] = (msg["text_body"], msg["extracted_text"], stored)
    text_body, extracted, stored = got["plain"]
    assert extracted == "Just a note, nothing quoted." and stored is None
    assert text_body.startswith(extracted)
    text_body, extracted, stored = got["reply"]
    assert extracted == stored and "Thursday works" in extracted
    assert "wrote:" not in extracted and "wrote:" in text_body


@pytest_twisted.ensureDeferred
async def test_incremental_thread_summary_equals_a_full_recompute(server, db_dsn):
    """Ingest folds each message into its thread; the result is what recomputing the
    thread from all its messages gives."""
    from agentpost.storage import threads as thread_store
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "fold"}, key=key)).json
    to = inbox["email"]
    await server.deliver(make_message(to=to, frm="Ann <ANN@x.org>", msgid="<r@x>"), [to])
    await server.deliver(make_message(to=f"{to}, bob@y.org", frm="carol@z.org",
                                      msgid="<c1@x>", in_reply_to="<r@x>"), [to])
    await server.deliver(make_message(to=to, frm="ann@x.org", msgid="<c2@x>",
                                      references="<r@x> <c1@x>",
                                      extra_headers=[("Cc", "Dave <dave@w.org>")]), [to])
    # An APPEND-like store with an old date and keywords starts a thread of its own.
    import io
    from datetime import UTC, datetime
    target = await server.core.router.resolve(to, "")
    await server.core.ingest.store(
        [target], io.BytesIO(make_message(to=to, msgid="<old@x>", subject="Old")),
        envelope_from=None, labels=("project", "b-label"),
        received_at=datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC))
    cols = "message_count, last_message_at, participants, labels"
    before = query(db_dsn, f"SELECT id, {cols} FROM threads WHERE inbox_id = %s ORDER BY id",
                   (inbox["id"],))
    assert sorted(r[1] for r in before) == [1, 3]
    for thread_id, *_ in before:
        [(org_id,)] = query(db_dsn, "SELECT org_id FROM threads WHERE id = %s", (thread_id,))
        await server.core.db.run_interaction("recompute", thread_store.refresh_thread, org_id,
                                             thread_id)
    after = query(db_dsn, f"SELECT id, {cols} FROM threads WHERE inbox_id = %s ORDER BY id",
                  (inbox["id"],))
    assert after == before
    big = next(r for r in before if r[1] == 3)
    assert sorted(big[3]) == ["ann@x.org", "bob@y.org", "carol@z.org", "dave@w.org",
                              to.lower()]
    old = next(r for r in before if r[1] == 1)
    assert old[2].year == 2020 and old[4] == ["b-label", "project"]
