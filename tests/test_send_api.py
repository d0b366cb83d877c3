"""The send API end to end: real HTTP, real PostgreSQL, the real queue and the log
transport's .eml files, IMAP for the Sent folder; replies, reply-all and forwards with
their headers and threads; Idempotency-Key; the refusals (400/403/404/409/413)."""

from __future__ import annotations

import base64
import email
import email.policy
import imaplib
import ssl
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS, make_config, start_server
from tests.helpers import query
from tests.mailfactory import make_message


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbound"


@pytest_twisted.async_yield_fixture
async def sub(db_dsn, openapi_checker, outbox):
    """A server whose log transport writes .eml files, polling the queue often, with a
    small message size limit (64 KiB) for the 413 test."""
    config = make_config(db_dsn, outbound={"log_dir": str(outbox), "poll_interval": "200ms"},
                         smtp={"max_message_size": "64KiB"})
    running = await start_server(config, openapi_checker)
    yield running
    await running.service.stopService()


def _dsn(server) -> str:
    return server.service.config.database.url


async def _wait_for(predicate, timeout_s: float = 15.0):
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await task.deferLater(reactor, 0.1, lambda: None)


_SEQ = iter(range(1_000_000))


async def _setup(server, scopes=("messages:send", "messages:read")):
    """An org with a sending inbox, a second (local) inbox, and a key with ``scopes``."""
    _, owner = await server.new_org()
    n = next(_SEQ)
    sender = (await server.api.post("/api/v1/inboxes", {"username": f"sender{n}"},
                                    key=owner)).json
    other = (await server.api.post("/api/v1/inboxes", {"username": f"other{n}"},
                                   key=owner)).json
    made = await server.api.post("/api/v1/api-keys", {"name": "send", "scopes": list(scopes)},
                                 key=owner)
    assert made.status == 201, made
    return owner, sender, other, made.json["key"]


def _send_path(inbox) -> str:
    return f"/api/v1/inboxes/{inbox['id']}/messages"


async def _raw(server, message_id, key) -> email.message.EmailMessage:
    raw = (await server.api.get(f"/api/v1/messages/{message_id}/raw", key=key)).body
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore


# ---------------------------------------------------------------------------- sending


@pytest_twisted.ensureDeferred
async def test_send_to_an_external_address_stores_queues_and_leaves_without_bcc(sub, outbox):
    """201 with the Sent copy; listed over the API and in IMAP's Sent; one queue row;
    the log transport's .eml has no Bcc."""
    _, sender, _, key = await _setup(sub)
    resp = await sub.api.post(_send_path(sender), {
        "to": ["Bob <bob@remote.example>"], "cc": [{"email": "cc@remote.example"}],
        "bcc": "hidden@remote.example", "subject": "Quarterly numbers",
        "text_body": "See attached.", "html_body": "<p>See attached.</p>",
        "labels": ["campaign"],
        "attachments": [{"content": base64.b64encode(b"a,b\n1,2\n").decode(),
                         "filename": "numbers.csv", "mime_type": "text/csv"}]}, key=key)
    assert resp.status == 201, resp
    sent = resp.json
    assert sent["direction"] == "outbound" and sent["folder"] == "Sent"
    assert sent["send_status"] == "queued" and len(sent["queue_ids"]) == 1
    assert sent["labels"] == ["campaign"] and sent["read"] is True
    assert [a["filename"] for a in sent["attachments"]] == ["numbers.csv"]
    assert [a["email"] for a in sent["bcc_addresses"]] == ["hidden@remote.example"]
    listed = (await sub.api.get(_send_path(sender) + "?folder=Sent", key=key)).json
    assert [m["id"] for m in listed["data"]] == [sent["id"]]
    queued = query(_dsn(sub), "SELECT array_agg(r.address ORDER BY r.address) FROM "
                   "outbound_queue q JOIN outbound_recipients r ON r.queue_id = q.id "
                   "WHERE q.message_id = %s", (sent["id"],))
    assert queued == [(["bob@remote.example", "cc@remote.example",
                        "hidden@remote.example"],)]

    async def emls():
        return sorted(outbox.glob("*.eml")) if outbox.exists() else []
    files = await _wait_for(emls)
    assert files, "the log transport never wrote the message"
    data = files[0].read_bytes()
    assert b"Bcc:" not in data and b"Subject: Quarterly numbers" in data
    assert b"numbers.csv" in data

    def imap_sent():
        ctx = ssl.create_default_context(cafile=_DEV_TLS["ca"])
        imap = imaplib.IMAP4_SSL("127.0.0.1", sub.imaps_port, ssl_context=ctx, timeout=20)
        imap.login(sender["email"], key)
        status, count = imap.select("Sent", readonly=True)
        _, fetched = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT BCC)] FLAGS)")
        imap.logout()
        return status, count, fetched

    status, count, fetched = await deferToThread(imap_sent)
    assert status == "OK" and count == [b"1"]
    assert b"Quarterly numbers" in fetched[0][1] and b"hidden@remote.example" in fetched[0][1]
    flags = b"".join(part if isinstance(part, bytes) else part[0] for part in fetched)
    assert b"campaign" in flags and b"\\Seen" in flags


@pytest_twisted.ensureDeferred
async def test_send_to_a_hosted_inbox_is_delivered_through_the_local_path(sub):
    _, sender, other, key = await _setup(sub)
    resp = await sub.api.post(_send_path(sender), {
        "to": other["email"], "subject": "Local hop", "text_body": "hi"}, key=key)
    assert resp.status == 201, resp

    async def arrived():
        got = (await sub.api.get(_send_path(other), key=key)).json
        return got["data"]
    [msg] = await _wait_for(arrived)
    assert msg["subject"] == "Local hop" and msg["direction"] == "inbound"
    assert msg["from_address"]["email"] == sender["email"]


@pytest_twisted.ensureDeferred
async def test_non_ascii_subject_and_names_are_encoded_and_parse_back(sub):
    _, sender, _, key = await _setup(sub)
    resp = await sub.api.post(_send_path(sender), {
        "to": [{"email": "jorg@remote.example", "name": "Jörg Müller"}],
        "subject": "Grüße ☕", "text_body": "Schöne Grüße"}, key=key)
    assert resp.status == 201, resp
    assert resp.json["subject"] == "Grüße ☕"
    raw = (await sub.api.get(f"/api/v1/messages/{resp.json['id']}/raw", key=key)).body
    assert raw.split(b"\r\n\r\n")[0].isascii()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "Grüße ☕"
    assert msg["To"].addresses[0].display_name == "Jörg Müller"
    assert "Schöne Grüße" in msg.get_content()


# ---------------------------------------------------------------------------- refusals


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("body, field", [
    ({"to": "bob@remote.example", "subject": "Hi\r\nBcc: evil@remote.example"}, "subject"),
    ({"to": [{"email": "bob@remote.example", "name": "Bob\nBcc: x@y.example"}]}, "to"),
    ({"to": "bob@remote.example\r\nBcc: evil@remote.example"}, "to"),
    ({"to": "bob@remote.example", "headers": {"X-Tag": "a\r\nBcc: evil@remote.example"}},
     "headers"),
    ({"to": "bob@remote.example", "headers": {"From": "ceo@remote.example"}}, "headers"),
    ({"to": "not an address"}, "to"),
    ({"subject": "nobody"}, "to"),
])
async def test_header_injection_and_bad_addresses_are_400_and_nothing_is_sent(sub, body, field):
    _, sender, _, key = await _setup(sub)
    resp = await sub.api.post(_send_path(sender), body, key=key)
    assert resp.status == 400, resp
    assert resp.json["error"]["field"] == field
    assert query(_dsn(sub), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                 (sender["id"],)) == [(0,)]


@pytest_twisted.ensureDeferred
async def test_too_many_recipients_is_400(sub):
    _, sender, _, key = await _setup(sub)
    to = [f"r{i}@remote.example" for i in range(51)]
    resp = await sub.api.post(_send_path(sender), {"to": to, "text_body": "x"}, key=key)
    assert resp.status == 400 and resp.json["error"]["type"] == "too_many_recipients", resp
    ok = await sub.api.post(_send_path(sender), {"to": to[:50], "text_body": "x"}, key=key)
    assert ok.status == 201, ok


@pytest_twisted.ensureDeferred
async def test_a_message_over_the_size_limit_is_413(sub):
    _, sender, _, key = await _setup(sub)
    blob = base64.b64encode(b"x" * 70_000).decode()
    resp = await sub.api.post(_send_path(sender), {
        "to": "bob@remote.example",
        "attachments": [{"content": blob, "filename": "big.bin"}]}, key=key)
    assert resp.status == 413 and resp.json["error"]["type"] == "message_too_large", resp


@pytest_twisted.ensureDeferred
async def test_foreign_inbox_is_404_and_a_key_without_send_is_403(sub):
    _, sender, _, _ = await _setup(sub)
    _, _, _, stranger_key = await _setup(sub)
    resp = await sub.api.post(_send_path(sender), {"to": "a@remote.example"},
                              key=stranger_key)
    assert resp.status == 404, resp
    _, mine, _, reader = await _setup(sub, scopes=("messages:read",))
    resp = await sub.api.post(_send_path(mine), {"to": "a@remote.example"}, key=reader)
    assert resp.status == 403 and resp.json["error"]["missing_scope"] == "messages:send"


@pytest_twisted.ensureDeferred
async def test_a_paused_inbox_and_a_send_rule_refuse_like_smtp(sub):
    owner, sender, _, key = await _setup(sub)
    made = await sub.api.post("/api/v1/filter-rules", {
        "direction": "send", "action": "block", "match_type": "domain",
        "value": "blocked.example", "inbox_id": sender["id"]}, key=owner)
    assert made.status == 201, made
    resp = await sub.api.post(_send_path(sender), {"to": "x@blocked.example"}, key=key)
    assert resp.status == 403 and resp.json["error"]["type"] == "recipient_blocked"
    await sub.api.patch(f"/api/v1/inboxes/{sender['id']}", {"send_paused": True}, key=owner)
    resp = await sub.api.post(_send_path(sender), {"to": "x@remote.example"}, key=key)
    assert resp.status == 403 and resp.json["error"]["type"] == "sending_paused"


# ---------------------------------------------------------------------------- replies


async def _inbound(sub, sender, other, *, subject="Hello", attachments=None):
    raw = make_message(frm="Alice <alice@example.com>",
                       to=f"{sender['email']}, Bob <bob@example.com>",
                       subject=subject, msgid="<orig@example.com>",
                       references="<root@example.com>", body="Original text.\n",
                       extra_headers=[("Cc", f"carol@example.com, {other['email']}, "
                                             f"ALICE@example.com")],
                       attachments=attachments)
    [stored] = await sub.deliver(raw, [sender["email"]])
    return stored


@pytest_twisted.ensureDeferred
async def test_reply_sets_in_reply_to_references_re_once_and_stays_in_the_thread(sub):
    _, sender, other, key = await _setup(sub)
    orig = await _inbound(sub, sender, other, subject="Re: Hello")
    resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/reply",
                              {"text_body": "Thanks!", "quote": True}, key=key)
    assert resp.status == 201, resp
    reply = resp.json
    assert reply["subject"] == "Re: Hello"
    assert reply["in_reply_to"] == "orig@example.com"
    assert reply["references"] == ["root@example.com", "orig@example.com"]
    assert [a["email"] for a in reply["to_addresses"]] == ["alice@example.com"]
    assert reply["cc_addresses"] == []
    assert reply["thread_id"] == orig.thread_id
    msg = await _raw(sub, reply["id"], key)
    assert msg["In-Reply-To"] == "<orig@example.com>"
    assert msg["References"] == "<root@example.com> <orig@example.com>"
    assert "> Original text." in msg.get_content()


@pytest_twisted.ensureDeferred
async def test_reply_all_adds_to_and_cc_without_the_inbox_and_without_repeats(sub):
    _, sender, other, key = await _setup(sub)
    orig = await _inbound(sub, sender, other)
    resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/reply-all",
                              {"text_body": "All of you."}, key=key)
    assert resp.status == 201, resp
    reply = resp.json
    assert [a["email"] for a in reply["to_addresses"]] == ["alice@example.com"]
    assert [a["email"] for a in reply["cc_addresses"]] == [
        "bob@example.com", "carol@example.com", other["email"]]
    assert reply["subject"] == "Re: Hello" and reply["thread_id"] == orig.thread_id


@pytest_twisted.ensureDeferred
async def test_forward_quotes_the_original_and_carries_its_attachments(sub):
    _, sender, other, key = await _setup(sub)
    orig = await _inbound(sub, sender, other,
                          attachments=[("plan.txt", "text/plain", b"the plan")])
    resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/forward",
                              {"to": "dave@remote.example", "text_body": "FYI"}, key=key)
    assert resp.status == 201, resp
    fwd = resp.json
    assert fwd["subject"] == "Fwd: Hello" and fwd["thread_id"] == orig.thread_id
    assert [a["email"] for a in fwd["to_addresses"]] == ["dave@remote.example"]
    assert fwd["text_body"].startswith("FYI")
    assert "Forwarded message" in fwd["text_body"] and "Original text." in fwd["text_body"]
    assert "From: Alice <alice@example.com>" in fwd["text_body"]
    assert [a["filename"] for a in fwd["attachments"]] == ["plan.txt"]
    bare = await sub.api.post(f"/api/v1/messages/{orig.message_id}/forward",
                              {"to": "dave@remote.example", "include_attachments": False},
                              key=key)
    assert bare.status == 201 and bare.json["attachments"] == []


@pytest_twisted.ensureDeferred
async def test_replying_to_a_foreign_or_unknown_message_is_404(sub):
    _, sender, other, key = await _setup(sub)
    orig = await _inbound(sub, sender, other)
    _, _, _, stranger = await _setup(sub)
    for path in ("reply", "reply-all", "forward"):  # as the tenancy matrix asks: body {}
        resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/{path}", {},
                                  key=stranger)
        assert resp.status == 404, resp
    resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/forward", {}, key=key)
    assert resp.status == 400 and resp.json["error"]["field"] == "to", resp
    resp = await sub.api.post("/api/v1/messages/msg_01ARZ3NDEKTSV4RRFFQ69G5FAV/forward",
                              {"to": "x@remote.example"}, key=key)
    assert resp.status == 404, resp


# ---------------------------------------------------------------------------- idempotency


@pytest_twisted.ensureDeferred
async def test_idempotency_key_replays_the_first_answer_and_refuses_another_body(sub):
    _, sender, _, key = await _setup(sub)
    body = {"to": "bob@remote.example", "subject": "Once", "text_body": "only once"}
    hdr = {"Idempotency-Key": "order-1234"}
    first = await sub.api.post(_send_path(sender), body, key=key, headers=hdr)
    assert first.status == 201, first
    again = await sub.api.post(_send_path(sender), dict(reversed(body.items())), key=key,
                               headers=hdr)
    assert again.status == 201 and again.json == first.json
    assert again.headers.get("idempotent-replayed") == "true"
    other = await sub.api.post(_send_path(sender), {**body, "subject": "Twice"}, key=key,
                               headers=hdr)
    assert other.status == 409 and other.json["error"]["type"] == "idempotency_conflict"
    assert query(_dsn(sub), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                 (sender["id"],)) == [(1,)]
    assert query(_dsn(sub), "SELECT count(*) FROM outbound_queue WHERE inbox_id = %s",
                 (sender["id"],)) == [(1,)]
    # A failed request is not replayed: after a 400 the same key can still be used.
    bad = await sub.api.post(_send_path(sender), {"to": "nope"}, key=key,
                             headers={"Idempotency-Key": "k2"})
    assert bad.status == 400
    good = await sub.api.post(_send_path(sender), body, key=key,
                              headers={"Idempotency-Key": "k2"})
    assert good.status == 201, good  # the failed attempt released its claim
