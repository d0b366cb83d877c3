"""Keyword spellings on IMAP flag reads without a per-row subquery (issue 10).

Flag reads (SELECT, FETCH, the catch-ups, STORE's locked read) return keywords folded;
the spelling each is shown in comes from the process's cache of recorded spellings
(core.imap_spellings), and a keyword the process has not seen for the inbox yet is read
in ONE extra statement. Pinned down here: a spelling recorded elsewhere (another process,
simulated by writing it with SQL and forgetting what this process knows, and by a real
second process) shows as recorded on every path; an inbox with more keywords than the
cache keeps still shows every one; once the cache is warm, FETCH and SELECT send nothing
about spellings.
"""

from __future__ import annotations

import imaplib
import re
import time

import psycopg2
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.core.imap_spellings import RECORDED_SPELLINGS
from agentpost.imap.interfaces import FetchWants
from tests.mailfactory import make_message
from tests.test_imap_e2e import _starttls


async def _inbox(server, name, messages=3):
    org, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    for n in range(messages):
        await server.deliver(make_message(subject=f"s{n}", msgid=f"<{name}{n}@x>"),
                             [inbox["email"]])
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    by_subject = {m["subject"]: m["id"] for m in listed.json["data"]}
    ids = [by_subject[f"s{n}"] for n in range(messages)]
    account = await server.core.imap_logins.authenticate(inbox["email"], key, "127.0.0.1")
    return org["id"], inbox, key, ids, account


def _record_elsewhere(dsn, org_id, inbox_id, spelling):
    """What another process's first STORE of ``spelling`` leaves behind: its row in
    keyword_spellings, committed, which this process never heard of."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO keyword_spellings (org_id, inbox_id, keyword, spelling, "
                        "created_at) VALUES (%s, %s, %s, %s, now())",
                        (org_id, inbox_id, spelling.lower(), spelling))
    finally:
        conn.close()


async def _label(server, key, message_id, label):
    """Add an API label: the API finds the spelling already recorded and keeps it."""
    resp = await server.api.post(f"/api/v1/messages/{message_id}/labels",
                                 {"labels": [label]}, key=key)
    assert resp.status == 200, resp


def _forget():
    """This process no longer knows any spelling (a fresh process would not)."""
    RECORDED_SPELLINGS._known.clear()


def _spelling_reads(sent):
    return [m for m in sent if "keyword_spellings" in m]


@pytest_twisted.ensureDeferred
async def test_spelling_recorded_elsewhere_shows_on_every_flag_read(server, db_dsn, sent):
    org_id, inbox, key, ids, account = await _inbox(server, "spell-elsewhere")
    await deferToThread(_record_elsewhere, db_dsn, org_id, inbox["id"], "Urgent")
    await _label(server, key, ids[0], "urgent")
    _forget()

    # SELECT: one statement without spellings, then ONE read of the unknown keyword.
    sent.clear()
    folder, snap = await account.select("INBOX")
    uids = [m.uid for m in snap.messages]
    assert [sorted(m.flags) for m in snap.messages] == [["Urgent"], [], []]
    selects = [m for m in sent if "FROM folders f" in m]
    assert len(selects) == 1 and "keyword_spellings" not in selects[0]
    assert len(_spelling_reads(sent)) == 1

    # FETCH: a miss reads the spelling once; warm, the FETCH is the rows alone.
    _forget()
    sent.clear()
    rows = await folder.fetch(uids, FetchWants())
    assert [sorted(r.flags) for r in rows] == [["Urgent"], [], []]
    assert len(_spelling_reads(sent)) == 1
    sent.clear()
    rows = await folder.fetch(uids, FetchWants())
    assert [sorted(r.flags) for r in rows] == [["Urgent"], [], []]
    fetches = [m for m in sent if "FROM messages" in m]
    assert len(fetches) == 1 and _spelling_reads(sent) == []

    # Catch-up: a keyword recorded elsewhere a moment ago, on a message changed since.
    await deferToThread(_record_elsewhere, db_dsn, org_id, inbox["id"], "LATER")
    await _label(server, key, ids[1], "later")
    _forget()
    changes = await folder.changes(uids, snap.highestmodseq)
    assert {m.uid: sorted(m.flags) for m in changes.changed} == {uids[1]: ["LATER"]}

    # STORE's answer: the rows' keywords as recorded, with one it adds.
    _forget()
    changed, _ = await folder.store([uids[0]], "+", frozenset({"\\Flagged", "$Mine"}), None)
    assert sorted(changed[0].flags) == ["$Mine", "Urgent", "\\Flagged"]
    _forget()  # a STORE that changes nothing answers with the rows as they are
    same, _ = await folder.store([uids[1]], "+", frozenset({"\\Seen"}), None)
    again, _ = await folder.store([uids[1]], "+", frozenset({"\\Seen"}), None)
    assert sorted(same[0].flags) == sorted(again[0].flags) == ["LATER", "\\Seen"]

    # COPY: the destination's first SELECT in a process that knows nothing.
    await account.create_folder("Kept")
    await folder.copy([uids[0], uids[1]], "Kept")
    _forget()
    other = await server.core.imap_logins.authenticate(inbox["email"], key, "127.0.0.1")
    _, kept = await other.select("Kept")
    assert [sorted(m.flags) for m in kept.messages] == [
        ["$Mine", "Urgent", "\\Flagged"], ["LATER", "\\Seen"]]


@pytest_twisted.ensureDeferred
async def test_inbox_with_more_keywords_than_the_cache_keeps_shows_them_all(
        server, sent, monkeypatch):
    """Past ``max_keywords`` the cache stops learning; the rest are read every time."""
    monkeypatch.setattr(RECORDED_SPELLINGS, "_max_keywords", 2)
    _forget()
    _, inbox, key, _, account = await _inbox(server, "spell-many", messages=2)
    folder, snap = await account.select("INBOX")
    uids = [m.uid for m in snap.messages]
    spelled = ["$One", "$TWO", "$tHree", "$FouR"]
    changed, _ = await folder.store([uids[0]], "+", frozenset(spelled), None)
    assert sorted(changed[0].flags) == sorted(spelled)
    await folder.store([uids[1]], "+", frozenset({"$two", "$Five"}), None)
    everything = [sorted(spelled), ["$Five", "$TWO"]]
    for _ in range(2):
        sent.clear()
        rows = await folder.fetch(uids, FetchWants())
        assert [sorted(r.flags) for r in rows] == everything
        assert len(_spelling_reads(sent)) == 1  # read again: the cache cannot hold them
        other = await server.core.imap_logins.authenticate(inbox["email"], key,
                                                           "127.0.0.1")
        _, snap = await other.select("INBOX")
        assert [sorted(m.flags) for m in snap.messages] == everything
    assert len(RECORDED_SPELLINGS._known[account._spell_key]) <= 2


def _flags(line: bytes) -> set[str]:
    match = re.search(rb"FLAGS \(([^)]*)\)", line)
    assert match, line
    return set(match.group(1).decode().split()) - {"\\Recent"}


@pytest_twisted.ensureDeferred
async def test_keyword_first_stored_by_another_process_shows_as_spelled(server, db_dsn,
                                                                         tmp_path):
    """A real second ``agentpost serve`` stores a keyword nobody had seen; a session
    here hears it (catch-up), FETCHes it and a new SELECT shows it, all as spelled."""
    from tests.second_process import SecondProcess

    _, inbox, key, _, _ = await _inbox(server, "spell-procs", messages=2)
    second = SecondProcess(tmp_path, db_dsn, server)

    def sessions():
        here = _starttls(server.imap_port, inbox["email"], key)
        here.select("INBOX")
        here.fetch("1:*", "(FLAGS)")
        assert second.ready(), "second process did not start"
        other = imaplib.IMAP4("127.0.0.1", second.imap_port, timeout=20)
        other.login(inbox["email"], key)
        other.select("INBOX")
        other.store("1", "+FLAGS", "($FromAfar)")
        other.logout()
        heard: list[bytes] = []
        start = time.monotonic()
        while time.monotonic() - start < 15 and not any(b"$FromAfar" in x for x in heard):
            here.noop()
            heard = [x for x in here.untagged_responses.pop("FETCH", [])
                     if isinstance(x, bytes)] or heard
            time.sleep(0.05)
        fetched = here.fetch("1", "(FLAGS)")[1][0]
        here.logout()
        fresh = _starttls(server.imap_port, inbox["email"], key)
        fresh.select("INBOX")
        selected = fresh.fetch("1", "(FLAGS)")[1][0]
        fresh.logout()
        return heard, fetched, selected

    try:
        heard, fetched, selected = await deferToThread(sessions)
    finally:
        second.stop()
    assert any("$FromAfar" in _flags(x) for x in heard), heard
    assert "$FromAfar" in _flags(fetched) and "$FromAfar" in _flags(selected)
