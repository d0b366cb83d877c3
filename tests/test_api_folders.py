"""The messages API shows where a message is (``folder``), how to find it again after a
client moved it (``message_id``, ``thread_id``), and keeps IMAP clients' own keywords
out of the agent's labels (``imap_keywords``). Over HTTP on the real store."""

from __future__ import annotations

import io

import pytest_twisted

from agentpost.mail import keywords
from agentpost.storage import imap as imap_store
from agentpost.storage import keywords as keyword_store
from agentpost.storage import mail as mail_store
from tests.mailfactory import make_message


async def _inbox(server, username):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username}, key=key)).json
    return inbox, key


async def _store(server, inbox, subject, *, folder="INBOX", flags=frozenset(), labels=(),
                 msgid=None):
    target = await server.core.router.resolve(inbox["email"], "a@example.com")
    raw = make_message(to=inbox["email"], subject=subject, msgid=msgid)
    [stored] = await server.core.ingest.store(
        [target], io.BytesIO(raw), envelope_from=None, folder=folder, flags=flags,
        labels=labels, require_folder=folder != "INBOX")
    return stored


async def _list(server, inbox, key, query=""):
    resp = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages{query}", key=key)
    assert resp.status == 200, resp
    return resp.json["data"]


@pytest_twisted.ensureDeferred
async def test_folder_and_role_in_message_json_and_the_folder_filter(server):
    """Archived, trashed and draft messages no longer look alike: each shows its folder
    and special use, and ``folder=`` lists one folder (INBOX in any case)."""
    inbox, key = await _inbox(server, "foldered")
    await _store(server, inbox, "new mail")
    await server.core.db.run_interaction(
        "test.create", imap_store.create_folder, await _org_of(server, inbox),
        inbox["environment_id"], inbox["id"], "Archive")
    await _store(server, inbox, "kept", folder="Archive")
    await _store(server, inbox, "binned", folder="Trash")
    await _store(server, inbox, "unfinished", folder="Drafts", flags=frozenset({"\\Draft"}))

    seen = {m["subject"]: (m["folder"], m["folder_role"]) for m in await _list(server, inbox,
                                                                                key)}
    assert seen == {"new mail": ("INBOX", "inbox"), "kept": ("Archive", None),
                    "binned": ("Trash", "trash"), "unfinished": ("Drafts", "drafts")}
    assert [m["subject"] for m in await _list(server, inbox, key, "?folder=Trash")] == [
        "binned"]
    assert [m["subject"] for m in await _list(server, inbox, key, "?folder=inbox")] == [
        "new mail"]
    assert await _list(server, inbox, key, "?folder=archive") == []  # other names: exact
    assert await _list(server, inbox, key, "?folder=Nowhere") == []
    [archived] = await _list(server, inbox, key, "?folder=Archive")
    one = (await server.api.get(f"/api/v1/messages/{archived['id']}", key=key)).json
    assert (one["folder"], one["folder_role"]) == ("Archive", None)
    bad = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?folder=", key=key)
    assert bad.status == 400 and bad.json["error"]["type"] == "invalid_request"


async def _org_of(server, inbox):
    rows = await server.core.db.run_interaction(
        "test.org", lambda txn: txn.fetchall("SELECT org_id FROM inboxes WHERE id = %s",
                                             (inbox["id"],)))
    return rows[0]["org_id"]


@pytest_twisted.ensureDeferred
async def test_message_id_filter_finds_every_copy_of_a_message(server):
    """``message_id=`` (with or without <>) lists the copies of one RFC 5322 message,
    whatever folder and API id each has (two deliveries of it here; IMAP copies are in
    tests/test_imap_keywords.py)."""
    inbox, key = await _inbox(server, "correlated")
    await _store(server, inbox, "original", msgid="<corr-1@example.com>")
    await _store(server, inbox, "copy", folder="Trash", msgid="<corr-1@example.com>")
    await _store(server, inbox, "other", msgid="<corr-2@example.com>")
    for value in ("corr-1@example.com", "%3Ccorr-1@example.com%3E"):
        found = await _list(server, inbox, key, f"?message_id={value}")
        assert sorted(m["folder"] for m in found) == ["INBOX", "Trash"]
        assert {m["message_id"] for m in found} == {"corr-1@example.com"}
        assert len({m["id"] for m in found}) == 2
    both = await _list(server, inbox, key, "?message_id=corr-1@example.com&folder=Trash")
    assert [m["subject"] for m in both] == ["copy"]
    bad = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?message_id=a%20b",
                               key=key)
    assert bad.status == 400 and bad.json["error"]["field"] == "message_id"


@pytest_twisted.ensureDeferred
async def test_imap_only_keywords_are_shown_apart_from_labels(server):
    """Keywords IMAP clients set for themselves ($MDNSent, mutt's Old, NonJunk, $Label1)
    are stored with the labels but shown as ``imap_keywords``; labels, thread labels and
    the label filter see only labels; the API cannot make a client keyword a label, and
    removing labels leaves the client's keywords alone."""
    inbox, key = await _inbox(server, "kwapi")
    # What APPEND stores: its keywords, folded (agentpost.mail.keywords).
    stored = await _store(server, inbox, "from mutt", labels=tuple(sorted(
        keywords.parse(["$MDNSent", "Old", "NonJunk", "$Label1", "Urgent"]))))
    [msg] = await _list(server, inbox, key)
    assert msg["labels"] == ["urgent"]
    assert msg["imap_keywords"] == ["$label1", "$mdnsent", "nonjunk", "old"]
    thread = (await server.api.get(f"/api/v1/threads/{msg['thread_id']}", key=key)).json
    assert thread["labels"] == ["urgent"]
    threads = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/threads",
                                    key=key)).json["data"]
    assert threads[0]["labels"] == ["urgent"]

    refused = await server.api.post(f"/api/v1/messages/{msg['id']}/labels",
                                    {"labels": ["old"]}, key=key)
    assert refused.status == 400 and refused.json["error"]["type"] == "invalid_request"
    assert "IMAP clients" in refused.json["error"]["message"]
    filtered = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?labels=old",
                                    key=key)
    assert filtered.status == 400
    removed = await server.api.request("DELETE", f"/api/v1/messages/{msg['id']}/labels",
                                       json_body={"labels": ["urgent"]}, key=key)
    assert removed.json["labels"] == [] and removed.json["imap_keywords"] == msg[
        "imap_keywords"]
    assert stored.uid == 1


@pytest_twisted.ensureDeferred
async def test_label_cap_counts_labels_only(server):
    """50 labels fit beside 50 IMAP-only keywords; the 51st label does not."""
    inbox, key = await _inbox(server, "kwcap")
    await _store(server, inbox, "busy", labels=tuple(f"$k{i}" for i in range(50)))
    [msg] = await _list(server, inbox, key)
    fifty = [f"l{i}" for i in range(50)]
    ok = await server.api.post(f"/api/v1/messages/{msg['id']}/labels", {"labels": fifty},
                               key=key)
    assert ok.status == 200 and len(ok.json["labels"]) == 50
    assert len(ok.json["imap_keywords"]) == 50
    over = await server.api.post(f"/api/v1/messages/{msg['id']}/labels",
                                 {"labels": ["one-more"]}, key=key)
    assert over.status == 400 and "50 labels" in over.json["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_keywords_show_in_imap_in_their_first_seen_spelling(server):
    """The store side IMAP reads: a keyword keeps the case an inbox first saw it in
    (an API label is seen in lowercase), SEARCH KEYWORD ignores case, and flags_of
    renders the folded labels of a row in the spellings recorded() reads (and a
    keyword a change has just added from remember()'s answer)."""
    inbox, key = await _inbox(server, "kwspell")
    stored = await _store(server, inbox, "spelled", labels=("$label1", "$mdnsent"))
    [msg] = await _list(server, inbox, key)
    await server.api.post(f"/api/v1/messages/{msg['id']}/labels", {"labels": ["urgent"]},
                          key=key)
    org = await _org_of(server, inbox)
    db = server.core.db

    first = await db.run_interaction("test.remember", keyword_store.remember, org,
                                     inbox["id"], ["$Label1", "\\Seen", "URGENT", "$MDNSent"])
    again = await db.run_interaction("test.remember", keyword_store.remember, org,
                                     inbox["id"], ["$LABEL1", "$New"])
    assert first == {"$label1": "$Label1", "urgent": "urgent", "$mdnsent": "$MDNSent"}
    assert again == {"$label1": "$Label1", "$new": "$New"}

    async def meta(txn):
        folder = await mail_store.folder_by_name(txn, org, inbox["id"], "INBOX")
        rows = await imap_store.folder_meta(txn, org, folder["id"])
        locked = await imap_store.message_ids_for_uids(txn, org, folder["id"],
                                                       [stored.uid], for_update=True)
        found = await imap_store.search(txn, org, folder["id"],
                                        ("keyword", "$MdnSENT", True))
        missing = await imap_store.search(txn, org, folder["id"], ("keyword", "$New", True))
        return rows, locked, found, missing

    rows, locked, found, missing = await db.run_interaction("test.meta", meta)
    recorded = await db.run_read("test.recorded", keyword_store.recorded, org,
                                 inbox["id"], rows[0]["labels"])
    assert recorded == {"$label1": "$Label1", "urgent": "urgent", "$mdnsent": "$MDNSent"}
    assert imap_store.flags_of(rows[0]) == {"$label1", "$mdnsent", "urgent"}  # folded
    assert imap_store.flags_of(rows[0], recorded) == {"$Label1", "$MDNSent", "urgent"}
    assert imap_store.flags_of(locked[0], recorded) == {"$Label1", "$MDNSent", "urgent"}
    assert found == [stored.uid] and missing == []
    just_added = {**locked[0], "labels": [*locked[0]["labels"], "$new"]}
    assert "$New" in imap_store.flags_of(just_added, {**recorded, **again})
    assert "$new" in imap_store.flags_of(just_added, recorded)  # not known: folded
