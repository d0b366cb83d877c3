"""Hostile review of the guessed staging (issue 12) on the submission door: a Sent copy
whose remembered folder went stale is staged again, and its queue rows and their blob
references are written once, by the transaction that commits."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from agentpost.core.group_commit import GroupCommit
from tests.helpers import execute, query
from tests.test_smtp_submission import _dsn, _login, _setup, outbox, sub  # noqa: F401


def _send(port: int, sender: str, key: str, n: int) -> dict:
    raw = (f"From: {sender}\r\nTo: x@one.example\r\nSubject: s{n}\r\n"
           f"Message-ID: <rev1-{n}@client.test>\r\n\r\nbody {n}\r\n").encode()
    with _login(port, sender, key) as smtp:
        return smtp.sendmail(sender, ["x@one.example", "y@two.example"], raw)


@pytest_twisted.ensureDeferred
async def test_a_stale_sent_folder_queues_each_send_once(sub):  # noqa: F811
    _, sender, _, _, key = await _setup(sub)
    gc = GroupCommit(sub.core.db, reactor, max_batch=16, delay_s=0.0, parallel=2)
    sub.core.ingest.group_commit = gc
    dsn = _dsn(sub)
    assert await deferToThread(_send, sub.submission_port, sender["email"], key, 1) == {}
    [(old,)] = query(dsn, "SELECT id FROM folders WHERE inbox_id = %s AND name = 'Sent'",
                     (sender["id"],))
    execute(dsn, "UPDATE folders SET name = 'Sent-old' WHERE id = %s", (old,))
    execute(dsn, "INSERT INTO folders (org_id, environment_id, inbox_id, name, "
                 "special_use, created_at) SELECT org_id, environment_id, inbox_id, "
                 "'Sent', special_use, now() FROM folders WHERE id = %s", (old,))
    assert await deferToThread(_send, sub.submission_port, sender["email"], key, 2) == {}
    assert (gc.guessed, gc.stale_guesses) == (1, 1)
    [(message_id, blob, folder)] = query(
        dsn, "SELECT m.id, m.raw_blob_key, f.name FROM messages m JOIN folders f "
             "ON f.id = m.folder_id WHERE m.message_id_header LIKE %s",
        ("%rev1-2@client.test%",))
    assert folder == "Sent"
    [(rows,)] = query(dsn, "SELECT count(*) FROM outbound_queue WHERE message_id = %s",
                      (message_id,))
    assert rows == 2
    [(refcount,)] = query(dsn, "SELECT refcount FROM blobs WHERE key = %s", (blob,))
    [(open_rows,)] = query(dsn, "SELECT count(*) FROM outbound_queue WHERE "
                                "raw_blob_key = %s AND status <> 'done'", (blob,))
    assert 1 + open_rows <= refcount <= 3
