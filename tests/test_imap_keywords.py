"""IMAP keywords end to end: imaplib over real sockets against the real store.

Any RFC 3501/9051 flag-keyword works (case-insensitively, shown as first seen in the
inbox); label-shaped ones are the API's labels, the rest (client bookkeeping such as
``$Forwarded``, mutt's ``Old``, ``NonJunk``) stay IMAP-only, shown by the API apart as
``imap_keywords`` (agentpost.mail.keywords). Also what an API id means across a MOVE
and a client's COPY+EXPUNGE move.
"""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.mailfactory import make_message
from tests.test_imap_e2e import _inbox, _starttls


def _flags(fetched) -> set[str]:
    """The FLAGS of one imaplib FETCH answer (\\Recent aside: it is the session's)."""
    line = fetched[0] if isinstance(fetched[0], bytes) else fetched[0][0]
    match = re.search(rb"FLAGS \(([^)]*)\)", line)
    assert match, line
    return set(match.group(1).decode().split()) - {"\\Recent"}


async def _messages(server, inbox, key, query=""):
    resp = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages{query}", key=key)
    assert resp.status == 200, resp
    return resp.json["data"]


@pytest_twisted.ensureDeferred
async def test_any_keyword_atom_is_stored_case_insensitively_as_first_seen(server):
    """What the conformance suite sends: STORE FLAGS ($hello), $Label1, $Forwarded,
    $Junk; FETCH shows them as first spelled, another spelling is the same keyword,
    SEARCH KEYWORD ignores case, and SELECT lists them in FLAGS with \\* permitted."""
    inbox, key = await _inbox(server, "kw-suite")
    for i in range(2):
        await server.deliver(make_message(to=inbox["email"], subject=f"k{i}"),
                             [inbox["email"]])

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX")
        out = {"set": imap.store("1", "FLAGS", "($hello)"),
               "add": imap.store("1", "+FLAGS", "($Label1 $Forwarded $Junk)"),
               "other_case": imap.store("2", "+FLAGS", "($LABEL1 $HELLO)"),
               "search": imap.search(None, "KEYWORD", "$label1"),
               "unsearch": imap.search(None, "UNKEYWORD", "$JUNK")}
        out["f1"] = imap.fetch("1", "(FLAGS)")[1]
        out["f2"] = imap.fetch("2", "(FLAGS)")[1]
        imap.store("1", "-FLAGS", "($FORWARDED)")
        out["removed"] = imap.fetch("1", "(FLAGS)")[1]
        imap.close()
        imap.select("INBOX")
        out["untagged"] = dict(imap.untagged_responses)
        imap.logout()
        return out

    out = await deferToThread(session)
    assert out["set"][0] == "OK" and out["add"][0] == "OK", out
    assert out["other_case"][0] == "OK"
    assert _flags(out["f1"]) == {"$hello", "$Label1", "$Forwarded", "$Junk"}
    assert _flags(out["f2"]) == {"$hello", "$Label1"}  # first seen spellings
    assert out["search"] == ("OK", [b"1 2"]) and out["unsearch"] == ("OK", [b"2"])
    assert _flags(out["removed"]) == {"$hello", "$Label1", "$Junk"}
    flags = out["untagged"]["FLAGS"][0].decode()
    assert "$Label1" in flags and "$hello" in flags and "$Junk" in flags
    assert any(b"\\*" in r for r in out["untagged"]["OK"])
    msgs = {m["subject"]: m for m in await _messages(server, inbox, key)}
    assert msgs["k0"]["labels"] == [] and msgs["k0"]["imap_keywords"] == [
        "$hello", "$junk", "$label1"]


@pytest_twisted.ensureDeferred
async def test_client_bookkeeping_stays_imap_only_and_words_become_labels(server):
    """APPEND with mutt's Old, $MDNSent, NonJunk and a plain word: the word is an API
    label (lowercase), the rest is imap_keywords; IMAP round-trips all of them in the
    client's spelling, and an API label shows in IMAP as its lowercase keyword."""
    inbox, key = await _inbox(server, "kw-clients")
    raw = make_message(to=inbox["email"], subject="appended")

    def append():
        imap = _starttls(server.imap_port, inbox["email"], key)
        typ, _ = imap.append("INBOX", "(\\Seen Old $MDNSent NonJunk Urgent)", None, raw)
        assert typ == "OK"
        imap.logout()

    await deferToThread(append)
    [msg] = await _messages(server, inbox, key)
    assert msg["labels"] == ["urgent"] and msg["read"] is True
    assert msg["imap_keywords"] == ["$mdnsent", "nonjunk", "old"]
    by_label = await _messages(server, inbox, key, "?labels=urgent")
    assert [m["id"] for m in by_label] == [msg["id"]]
    added = await server.api.post(f"/api/v1/messages/{msg['id']}/labels",
                                  {"labels": ["billing"]}, key=key)
    assert added.json["labels"] == ["billing", "urgent"]

    def fetch():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX")
        imap.store("1", "+FLAGS", "(BILLING)")  # seen first through the API: stays lower
        flags = imap.fetch("1", "(FLAGS)")[1]
        imap.logout()
        return flags

    assert _flags(await deferToThread(fetch)) == {
        "\\Seen", "Old", "$MDNSent", "NonJunk", "Urgent", "billing"}


@pytest_twisted.ensureDeferred
async def test_what_is_not_a_keyword_is_refused_and_caps_count_apart(server):
    """An overlong atom is NO; 50 IMAP-only keywords do not use up the 50 labels."""
    inbox, key = await _inbox(server, "kw-limits")
    await server.deliver(make_message(to=inbox["email"]), [inbox["email"]])
    client_kws = "(" + " ".join(f"$c{i}" for i in range(50)) + ")"
    labels = "(" + " ".join(f"l{i}" for i in range(50)) + ")"

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX")
        out = {"long": imap.store("1", "+FLAGS", "(" + "x" * 200 + ")"),
               "client": imap.store("1", "+FLAGS", client_kws),
               "labels": imap.store("1", "+FLAGS", labels),
               "one_more": imap.store("1", "+FLAGS", "(one-more)"),
               "one_more_kw": imap.store("1", "+FLAGS", "($more)")}
        imap.logout()
        return out

    out = await deferToThread(session)
    assert out["long"][0] == "NO"
    assert out["client"][0] == "OK" and out["labels"][0] == "OK", out
    assert out["one_more"][0] == "NO" and out["one_more_kw"][0] == "NO"
    [msg] = await _messages(server, inbox, key)
    assert len(msg["labels"]) == 50 and len(msg["imap_keywords"]) == 50


@pytest_twisted.ensureDeferred
async def test_move_keeps_the_api_id_and_copy_expunge_changes_it(server):
    """MOVE re-homes the message: same API id, new folder. A client's COPY+EXPUNGE
    move deletes it and stores a copy with a new id: same message_id and thread_id,
    which is how an agent follows it (``message_id=`` filter)."""
    inbox, key = await _inbox(server, "mover")
    raw = make_message(to=inbox["email"], subject="wanderer", msgid="<wander@x>")
    await server.deliver(raw, [inbox["email"]])
    [before] = await _messages(server, inbox, key)
    assert before["folder"] == "INBOX"

    def move():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.create("Archive")
        imap.select("INBOX")
        assert imap.uid("MOVE", "1", "Archive")[0] == "OK"
        imap.logout()

    await deferToThread(move)
    [moved] = await _messages(server, inbox, key)
    assert moved["id"] == before["id"] and moved["folder"] == "Archive"
    assert moved["folder_role"] is None

    def copy_expunge():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("Archive")
        assert imap.copy("1", "Trash")[0] == "OK"
        imap.store("1", "+FLAGS", "(\\Deleted)")
        imap.expunge()
        imap.logout()

    await deferToThread(copy_expunge)
    [trashed] = await _messages(server, inbox, key)
    assert trashed["id"] != before["id"] and trashed["folder"] == "Trash"
    assert trashed["folder_role"] == "trash"
    assert (trashed["message_id"], trashed["thread_id"]) == ("wander@x", before["thread_id"])
    gone = await server.api.get(f"/api/v1/messages/{before['id']}", key=key)
    assert gone.status == 404
    found = await _messages(server, inbox, key, "?message_id=wander@x")
    assert [m["id"] for m in found] == [trashed["id"]]


@pytest_twisted.ensureDeferred
async def test_store_of_labels_moves_the_thread_labels_and_nothing_else(server):
    """A STORE changes flags and labels only, so only the thread's labels are summarized
    again (storage.threads.relabel_threads_sql): added and removed labels follow, while
    the thread's count, participants and last activity stay as ingest made them."""
    inbox, key = await _inbox(server, "kw-thread")
    to = [inbox["email"]]
    await server.deliver(make_message(to=inbox["email"], subject="Plan", msgid="<p1@x>"), to)
    await server.deliver(make_message(to=inbox["email"], subject="Re: Plan", msgid="<p2@x>",
                                      in_reply_to="<p1@x>", references="<p1@x>",
                                      frm="Bob <bob@example.net>"), to)

    async def thread():
        threads = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/threads",
                                        key=key)).json["data"]
        assert len(threads) == 1
        return threads[0]

    before = await thread()

    def store(*commands):
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX")
        answers = [imap.store(*command) for command in commands]
        imap.logout()
        return answers

    answers = await deferToThread(store, ("1", "+FLAGS", "(urgent $Forwarded)"),
                                  ("2", "+FLAGS", "(billing \\Seen)"))
    assert all(a[0] == "OK" for a in answers), answers
    labelled = await thread()
    assert labelled["labels"] == ["billing", "urgent"]
    for field in ("message_count", "participants", "last_message_at", "subject"):
        assert labelled[field] == before[field], field
    await deferToThread(store, ("1", "-FLAGS", "(urgent)"))
    assert (await thread())["labels"] == ["billing"]
