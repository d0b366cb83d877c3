"""Submission's queue rows travel with the Sent copy's insert (issue 11, CPU per message).

The queue rows, their recipients and the raw blob's extra references are sent in the
same round trip as the Sent copy's insert; these tests check what that must keep: one
row per recipient domain, the blob counted once per row (plus the message's own
reference), everything in the one COMMIT, and a missing Message-ID:/Date: still added.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import query
from tests.test_smtp_submission import _dsn, _login, _setup, outbox, sub  # noqa: F401


@pytest_twisted.ensureDeferred
async def test_one_queue_row_per_domain_and_one_blob_reference_per_row(sub):  # noqa: F811
    _, sender, _, _, key = await _setup(sub)
    rcpts = ["a@one.example", "b@two.example", "c@one.example", "a@ONE.example"]
    raw = (f"From: {sender['email']}\r\nTo: a@one.example\r\nSubject: two domains\r\n"
           "\r\nbody\r\n").encode()

    def send():
        with _login(sub.submission_port, sender["email"], key) as smtp:
            return smtp.sendmail(sender["email"], rcpts, raw)

    refused = await deferToThread(send)
    assert refused == {}
    dsn = _dsn(sub)
    [(message_id, blob, head)] = query(
        dsn, "SELECT id, raw_blob_key, headers::text FROM messages "
             "WHERE direction = 'outbound'")
    assert "Message-ID" in head and "Date" in head  # added when missing
    rows = query(dsn, "SELECT q.domain, array_agg(r.address ORDER BY r.address) "
                      "FROM outbound_queue q JOIN outbound_recipients r ON r.queue_id = q.id "
                      "WHERE q.message_id = %s AND q.raw_blob_key = %s "
                      "GROUP BY q.domain ORDER BY q.domain", (message_id, blob))
    assert [r[0] for r in rows] == ["one.example", "two.example"]
    assert rows[1][1] == ["b@two.example"]
    # The same mailbox twice (its domain in another case) is queued once.
    assert rows[0][1] == ["a@one.example", "c@one.example"]
    # At most the two queue rows' references and the message's own (the queue may
    # already have handed a row off and let its reference go; never more, never less
    # than the message's own).
    [(refcount,)] = query(dsn, "SELECT refcount FROM blobs WHERE key = %s", (blob,))
    [(open_rows,)] = query(dsn, "SELECT count(*) FROM outbound_queue WHERE "
                                "raw_blob_key = %s AND status <> 'done'", (blob,))
    assert 1 + open_rows <= refcount <= 3
    [(events,)] = query(dsn, "SELECT count(*) FROM events WHERE type = 'message.sent'")
    assert events == 1
