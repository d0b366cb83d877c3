"""Drafts are the IMAP Drafts folder: what the API writes, imaplib sees, and back."""

import imaplib
import ssl

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS
from tests.helpers import query
from tests.mailfactory import make_message


def _imap(server, user, key):
    imap = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=20)
    imap.starttls(ssl_context=ssl.create_default_context(cafile=_DEV_TLS["ca"]))
    imap.login(user, key)
    return imap


def _folder(server, user, key, name):
    """[(flags, subject header)] of every message in a folder, in UID order."""
    imap = _imap(server, user, key)
    try:
        typ, data = imap.select(name, readonly=True)
        assert typ == "OK", data
        if data == [b"0"]:
            return []
        typ, rows = imap.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out = []
        for item in rows:
            if isinstance(item, tuple):
                flags = item[0].decode()
                out.append((flags, item[1].decode().strip()))
        return out
    finally:
        imap.logout()


async def _setup(server, username):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username}, key=key)).json
    return inbox, key


@pytest_twisted.ensureDeferred
async def test_patch_replaces_the_imap_copy_and_keeps_the_id(server):
    """After an edit IMAP sees exactly one message in Drafts, the new one, \\Draft."""
    inbox, key = await _setup(server, "drafter")
    draft = (await server.api.post(f"/api/v1/inboxes/{inbox['id']}/drafts", {
        "to": "bob@example.com", "subject": "First take", "text_body": "v1"},
        key=key)).json
    [(flags, subject)] = await deferToThread(_folder, server, inbox["email"], key, "Drafts")
    assert "\\Draft" in flags and subject == "Subject: First take"
    edited = (await server.api.patch(f"/api/v1/drafts/{draft['id']}",
                                     {"subject": "Second take"}, key=key)).json
    assert edited["id"] == draft["id"]
    [(flags, subject)] = await deferToThread(_folder, server, inbox["email"], key, "Drafts")
    assert "\\Draft" in flags and subject == "Subject: Second take"


@pytest_twisted.ensureDeferred
async def test_imap_appended_draft_is_listed_and_sent_from_the_api(server, db_dsn):
    """A client APPENDs a reply draft to Drafts; the API lists it (fields read back,
    in_reply_to found), sends it; IMAP then sees it in Sent and Drafts empty."""
    inbox, key = await _setup(server, "thunder")
    [original] = await server.deliver(make_message(to=inbox["email"], subject="Question",
                                                   msgid="<q1@example.com>"),
                                      [inbox["email"]])
    raw = make_message(frm=inbox["email"], to="Alice <alice@example.com>",
                       subject="Re: Question", body="Here is my answer.\n",
                       msgid="<d1@agents.test>", in_reply_to="<q1@example.com>",
                       references="<q1@example.com>",
                       extra_headers=[("Cc", "carol@example.org")])

    def append():
        imap = _imap(server, inbox["email"], key)
        try:
            typ, data = imap.append("Drafts", "(\\Draft \\Seen)", None, raw)
            assert typ == "OK", data
        finally:
            imap.logout()

    await deferToThread(append)
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/drafts", key=key)).json
    [draft] = listed["data"]
    assert draft["subject"] == "Re: Question" and draft["status"] == "draft"
    assert draft["to"] == [{"email": "alice@example.com", "name": "Alice"}]
    assert draft["cc"] == [{"email": "carol@example.org", "name": None}]
    assert "text_body" not in draft and draft["preview"].startswith("Here is my answer")
    full = (await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)).json
    assert full["text_body"].strip() == "Here is my answer."
    assert draft["in_reply_to"] == original.message_id
    assert draft["thread_id"] == original.thread_id
    # Listing again adopts nothing twice.
    again = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/drafts", key=key)).json
    assert [d["id"] for d in again["data"]] == [draft["id"]]

    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {}, key=key)
    assert resp.status == 200, resp
    message = resp.json["message"]
    assert message["in_reply_to"] == "q1@example.com"
    assert message["thread_id"] == original.thread_id
    assert await deferToThread(_folder, server, inbox["email"], key, "Drafts") == []
    [(flags, subject)] = await deferToThread(_folder, server, inbox["email"], key, "Sent")
    assert subject == "Subject: Re: Question" and "\\Draft" not in flags
    assert query(db_dsn, "SELECT count(*) FROM drafts") == [(0,)]
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(2,)]  # two domains


@pytest_twisted.ensureDeferred
async def test_expunge_or_move_out_of_drafts_ends_the_draft(server, db_dsn):
    """An IMAP client expunging a draft's copy deletes the draft (and its schedule);
    moving it out of Drafts makes it an ordinary message, no longer a draft."""
    inbox, key = await _setup(server, "cleaner")
    path = f"/api/v1/inboxes/{inbox['id']}/drafts"
    first = (await server.api.post(path, {"subject": "one", "to": "a@example.com"},
                                   key=key)).json
    second = (await server.api.post(path, {"subject": "two", "to": "a@example.com"},
                                    key=key)).json

    def expunge_first_move_second():
        imap = _imap(server, inbox["email"], key)
        try:
            imap.select("Drafts")
            typ, data = imap.uid("SEARCH", None, "SUBJECT", "one")
            imap.uid("STORE", data[0].decode(), "+FLAGS", "(\\Deleted)")
            imap.expunge()
            typ, data = imap.uid("SEARCH", None, "SUBJECT", "two")
            typ, moved = imap.uid("MOVE", data[0].decode(), "Trash")
            assert typ == "OK", moved
        finally:
            imap.logout()

    await deferToThread(expunge_first_move_second)
    assert (await server.api.get(f"/api/v1/drafts/{first['id']}", key=key)).status == 404
    assert (await server.api.get(f"/api/v1/drafts/{second['id']}", key=key)).status == 404
    assert (await server.api.get(path, key=key)).json["data"] == []
    assert query(db_dsn, "SELECT count(*) FROM drafts") == [(1,)]  # the moved one's row
    trash = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?folder=Trash",
                                  key=key)).json["data"]
    assert [m["subject"] for m in trash] == ["two"]
    # The moved message is an ordinary message now; sending its old draft is a 404.
    resp = await server.api.post(f"/api/v1/drafts/{second['id']}/send", {}, key=key)
    assert resp.status == 404
