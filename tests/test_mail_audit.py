"""One audit trail whichever door: IMAP changes and SMTP deliveries leave rows a tenant
reads through GET /api/v1/audit-logs, written in the change's own transaction, and an
IMAP flag change is the very operation the API's label change is."""

import re

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import query
from tests.mailfactory import make_message
from tests.test_imap_e2e import _starttls
from tests.test_mx import _send


async def _tenant(server, name, org_name="Org"):
    """An organization with an inbox in a non-default environment, an IMAP key confined
    to that environment and an audit:read key, as a tenant would set them up."""
    _, owner = await server.new_org(org_name)
    env = (await server.api.post("/api/v1/environments", {"name": "Staging"},
                                 key=owner)).json
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name,
                                                       "environment_id": env["id"]},
                                   key=owner)).json
    assert inbox["environment_id"] == env["id"]
    imap_key = (await server.api.post("/api/v1/api-keys", {
        "scopes": ["messages:read", "messages:write"], "environment_ids": [env["id"]]},
        key=owner)).json
    auditor = (await server.api.post("/api/v1/api-keys", {"scopes": ["audit:read"]},
                                     key=owner)).json
    return {"owner": owner, "env": env["id"], "inbox": inbox, "imap": imap_key,
            "audit": auditor["key"]}


async def _audit(server, tenant, action):
    """The tenant's audit rows for ``action`` (a prefix with *), oldest first."""
    resp = await server.api.get(f"/api/v1/audit-logs?action={action}&limit=100",
                                key=tenant["audit"])
    assert resp.status == 200, resp
    return list(reversed(resp.json["data"]))


async def _messages(server, tenant):
    resp = await server.api.get(f"/api/v1/inboxes/{tenant['inbox']['id']}/messages",
                                key=tenant["owner"])
    return {m["subject"]: m["id"] for m in resp.json["data"]}


def _same_transaction(dsn, audit_id, table, row_id):
    """Whether an audit row and a changed row were written by one transaction (xmin)."""
    [(audit_xmin,)] = query(dsn, "SELECT xmin::text FROM audit_log WHERE id = %s", (audit_id,))
    [(row_xmin,)] = query(dsn, f"SELECT xmin::text FROM {table} WHERE id = %s", (row_id,))
    return audit_xmin == row_xmin


@pytest_twisted.ensureDeferred
async def test_imap_store_append_copy_move_expunge_are_audited(server, db_dsn):
    """Each IMAP change over a real imaplib session (a FETCH that marks a message read
    included) leaves one row per command, in the
    inbox's organization and environment, with the key as actor; commands that change
    nothing (or fail) leave none."""
    tenant = await _tenant(server, "imap-audited")
    other = await _tenant(server, "bystander", "Other")
    email, key = tenant["inbox"]["email"], tenant["imap"]["key"]
    assert (await deferToThread(_send, server.mx_port, "a@example.com", [email],
                                make_message(to=email, subject="delivered"),
                                starttls=False)) == ("ok", {})

    def session():
        imap = _starttls(server.imap_port, email, key)
        assert imap.append("INBOX", "(\\Flagged later)", None,
                           make_message(to=email, subject="appended"))[0] == "OK"
        assert imap.create("Archive")[0] == "OK"
        imap.select("INBOX")
        assert imap.uid("FETCH", "1", "(BODY[])")[0] == "OK"  # sets \Seen: a change
        assert imap.uid("FETCH", "1", "(BODY[])")[0] == "OK"  # already seen: none
        assert imap.uid("STORE", "1:2", "+FLAGS", "(\\Seen urgent)")[0] == "OK"
        assert imap.uid("STORE", "1:2", "+FLAGS", "(\\Seen)")[0] == "OK"  # no change
        assert imap.uid("COPY", "1", "Archive")[0] == "OK"
        assert imap.uid("COPY", "1", "Missing")[0] == "NO"  # TRYCREATE: nothing done
        assert imap.uid("MOVE", "2", "Archive")[0] == "OK"
        assert imap.expunge()[0] == "OK"  # nothing is \Deleted yet: no change
        assert imap.uid("STORE", "1", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert imap.expunge()[0] == "OK"
        imap.logout()

    await deferToThread(session)
    left = query(db_dsn, "SELECT m.id, f.name, m.subject, m.uid FROM messages m JOIN folders f "
                 "ON f.id = m.folder_id ORDER BY f.name, m.uid")
    assert [r[1:] for r in left] == [("Archive", "delivered", 1), ("Archive", "appended", 2)]
    copy_id, moved_id = left[0][0], left[1][0]

    rows = await _audit(server, tenant, "imap.*")
    actions = sorted(r["action"] for r in rows if r["action"] != "imap.login")
    assert actions == sorted(["imap.append", "imap.create", "imap.fetch", "imap.store",
                              "imap.copy", "imap.move", "imap.store", "imap.expunge"])
    for row in rows:
        if row["action"] == "imap.login":
            continue
        assert row["environment_id"] == tenant["env"], row
        assert row["actor"] == {"type": "api_key", "id": tenant["imap"]["id"]}, row
        assert (row["outcome"], row["status"]) == ("allowed", 200), row
    by_action = {r["action"]: r for r in rows}
    assert by_action["imap.append"]["target_id"] == moved_id  # the appended message
    assert by_action["imap.move"]["target_id"] == moved_id
    assert by_action["imap.expunge"]["target_id"] not in (None, moved_id, copy_id)
    # The many-message STORE names the inbox; the detail holds the count and UIDs.
    store_many = next(r for r in rows if r["action"] == "imap.store"
                      and r["target_id"] == tenant["inbox"]["id"])
    details = dict(query(db_dsn, "SELECT a.action, a.details FROM audit_log a JOIN inboxes i "
                         "ON i.org_id = a.org_id WHERE i.id = %s "
                         "AND a.action IN ('imap.copy', 'imap.move', 'imap.expunge')",
                         (tenant["inbox"]["id"],)))
    assert (details["imap.copy"]["count"], details["imap.copy"]["uids"],
            details["imap.copy"]["to_uids"]) == (1, "1", "1")
    assert (details["imap.move"]["uids"], details["imap.move"]["to_uids"]) == ("2", "2")
    assert details["imap.expunge"]["uids"] == "1"
    [(store_details,)] = query(db_dsn, "SELECT details FROM audit_log WHERE id = %s",
                               (store_many["id"],))
    assert (store_details["count"], store_details["uids"]) == (2, "1:2")
    assert _same_transaction(db_dsn, by_action["imap.move"]["id"], "messages", moved_id)
    # The other organization sees none of it.
    assert await _audit(server, other, "imap.*") == []


@pytest_twisted.ensureDeferred
async def test_smtp_delivery_is_audited_per_recipient_inbox_in_its_transaction(server,
                                                                              db_dsn):
    """One message to inboxes of two organizations: each organization reads one
    smtp.deliver row for its own copy (actor: the envelope sender, address: the peer),
    written by the transaction that stored the copy; a refused recipient leaves none."""
    first = await _tenant(server, "mx-one")
    second = await _tenant(server, "mx-two", "Second")
    rcpts = [first["inbox"]["email"], second["inbox"]["email"], "nobody@agents.test"]
    raw = make_message(to=", ".join(rcpts[:2]), subject="to both")
    outcome = await deferToThread(_send, server.mx_port, "alice@example.com", rcpts, raw,
                                  starttls=False)
    assert outcome[0] == "ok" and list(outcome[1]) == ["nobody@agents.test"]
    for tenant in (first, second):
        [row] = await _audit(server, tenant, "smtp.*")
        [message_id] = (await _messages(server, tenant)).values()
        assert row["action"] == "smtp.deliver" and row["target_id"] == message_id
        assert row["actor"] == {"type": "smtp_sender", "id": "alice@example.com"}
        assert row["environment_id"] == tenant["env"]
        assert row["remote_addr"] == "127.0.0.1" and row["outcome"] == "allowed"
        assert _same_transaction(db_dsn, row["id"], "messages", message_id)
        [(details,)] = query(db_dsn, "SELECT details FROM audit_log WHERE id = %s",
                             (row["id"],))
        assert details["inbox_id"] == tenant["inbox"]["id"] and details["folder"] == "INBOX"


@pytest_twisted.ensureDeferred
async def test_imap_store_and_api_label_change_are_one_core_operation(server, db_dsn,
                                                                     monkeypatch):
    """IMAP STORE and the API's label change both call mail_changes.change_flags: their
    audit rows have one shape, both refresh the thread's labels and bump the folder's
    MODSEQ, and both emit the same events (the API emits none for a label change)."""
    from agentpost.core import mail_changes

    tenant = await _tenant(server, "one-path")
    email, key = tenant["inbox"]["email"], tenant["imap"]["key"]
    for subject in ("by imap", "by api"):
        assert (await deferToThread(_send, server.mx_port, "a@example.com", [email],
                                    make_message(to=email, subject=subject),
                                    starttls=False)) == ("ok", {})
    ids = await _messages(server, tenant)
    events_before = query(db_dsn, "SELECT type, count(*) FROM events GROUP BY type")
    calls = []
    real = mail_changes.change_flags

    async def spy(txn, ctx, changes, **kw):
        calls.append((ctx.action, [row["id"] for row, _ in changes]))
        return await real(txn, ctx, changes, **kw)

    monkeypatch.setattr(mail_changes, "change_flags", spy)

    def store():
        imap = _starttls(server.imap_port, email, key)
        imap.select("INBOX")
        assert imap.uid("STORE", "1", "+FLAGS", "(urgent)")[0] == "OK"
        imap.logout()

    await deferToThread(store)
    resp = await server.api.post(f"/api/v1/messages/{ids['by api']}/labels",
                                 {"labels": ["urgent"]}, key=key)
    assert resp.status == 200 and resp.json["labels"] == ["urgent"]
    assert calls == [("imap.store", [ids["by imap"]]),
                     ("messages.labels.add", [ids["by api"]])]

    imap_row = (await _audit(server, tenant, "imap.store"))[0]
    api_row = (await _audit(server, tenant, "messages.labels.add"))[0]
    shape = ("actor", "environment_id", "outcome", "status")
    assert {k: imap_row[k] for k in shape} == {k: api_row[k] for k in shape}
    assert (imap_row["target_id"], api_row["target_id"]) == (ids["by imap"], ids["by api"])
    for row, message_id in ((imap_row, ids["by imap"]), (api_row, ids["by api"])):
        assert _same_transaction(db_dsn, row["id"], "messages", message_id)
    labels = query(db_dsn, "SELECT m.subject, t.labels FROM messages m JOIN threads t "
                   "ON t.id = m.thread_id ORDER BY m.subject")
    assert labels == [("by api", ["urgent"]), ("by imap", ["urgent"])]
    assert query(db_dsn, "SELECT type, count(*) FROM events GROUP BY type") == events_before


@pytest_twisted.ensureDeferred
async def test_imap_keywords_keep_the_api_label_cap(server):
    """The 50-label cap of the API holds for IMAP STORE and APPEND keywords too (it
    used to be an API-only rule, bypassed by any IMAP client)."""
    tenant = await _tenant(server, "capped")
    email, key = tenant["inbox"]["email"], tenant["imap"]["key"]
    too_many = "(" + " ".join(f"k{i}" for i in range(51)) + ")"
    fifty = "(" + " ".join(f"k{i}" for i in range(50)) + ")"

    def session():
        imap = _starttls(server.imap_port, email, key)
        appended = imap.append("INBOX", too_many, None, make_message(to=email))
        assert imap.append("INBOX", fifty, None, make_message(to=email))[0] == "OK"
        imap.select("INBOX")
        stored = imap.uid("STORE", "1", "+FLAGS", "(one-more)")
        flags = imap.uid("FETCH", "1", "(FLAGS)")[1][0]
        imap.logout()
        return appended, stored[0], flags

    appended, stored, flags = await deferToThread(session)
    assert appended[0] == "NO" and b"labels" in appended[1][0], appended
    assert stored == "NO"
    assert b"one-more" not in flags and len(re.findall(rb"\bk\d+\b", flags)) == 50
