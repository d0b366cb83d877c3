"""Submission's queue rows travel with the Sent copy's insert (issue 11, CPU per message).

The queue rows, their recipients and the raw blob's extra references are sent in the
same round trip as the Sent copy's insert; these tests check what that must keep: one
row per recipient domain, the blob counted once per row (plus the message's own
reference), everything in the one COMMIT, and a missing Message-ID:/Date: still added.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer
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


async def _batched(sub, n: int):  # noqa: F811
    """A group commit that waits for the test's clock, installed in the server."""
    from twisted.internet import task

    from agentpost.core.group_commit import GroupCommit

    clock = task.Clock()
    gc = GroupCommit(sub.core.db, clock, max_batch=16, delay_s=1.0, parallel=1)
    sub.core.ingest.group_commit = gc
    return clock, gc


def _send_one(port: int, sender: str, key: str, rcpt: str, n: int):
    raw = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: batched {n}\r\n"
           f"Message-ID: <batched{n}@client.test>\r\n\r\nbody {n}\r\n").encode()
    with _login(port, sender, key) as smtp:
        smtp.mail(sender)
        smtp.rcpt(rcpt)
        return smtp.data(raw)


@pytest_twisted.ensureDeferred
async def test_submissions_arriving_together_share_one_commit_with_their_queue_rows(sub):  # noqa: F811
    """Sends that arrive together go in one group-commit transaction (one COMMIT for the
    batch): nothing is stored or answered before it, and each Sent copy still has its own
    queue row, recipient and message.sent event."""
    from tests.test_group_commit import _wait_pending

    _, sender, _, _, key = await _setup(sub)
    clock, gc = await _batched(sub, 3)
    pending = [deferToThread(_send_one, sub.submission_port, sender["email"], key,
                             f"r{n}@remote{n}.example", n) for n in range(3)]
    await _wait_pending(gc, 3)
    assert not any(d.called for d in pending)  # no 250 before the COMMIT
    dsn = _dsn(sub)
    assert query(dsn, "SELECT count(*) FROM messages") == [(0,)]
    assert query(dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]
    clock.advance(1.0)
    answers = [await d for d in pending]
    assert all(code == 250 for code, _ in answers), answers
    assert gc.batches == 1
    rows = query(dsn, "SELECT m.subject, q.domain, r.address, q.raw_blob_key = m.raw_blob_key "
                      "FROM messages m JOIN outbound_queue q ON q.message_id = m.id "
                      "JOIN outbound_recipients r ON r.queue_id = q.id ORDER BY m.subject")
    assert rows == [(f"batched {n}", f"remote{n}.example", f"r{n}@remote{n}.example", True)
                    for n in range(3)]
    assert query(dsn, "SELECT count(*) FROM events WHERE type = 'message.sent'") == [(3,)]


@pytest_twisted.ensureDeferred
async def test_a_failing_send_in_a_batch_leaves_no_queue_row_and_fails_no_other(sub):  # noqa: F811
    """One send of a batch cannot be stored (its inbox went away since RCPT): the others
    commit with their queue rows, and the failed one leaves neither message nor queue row."""
    from tests.test_group_commit import _wait_pending

    owner, sender, _, _, key = await _setup(sub)
    doomed = (await sub.api.post("/api/v1/inboxes", {"username": "doomed"},
                                 key=owner)).json
    clock, gc = await _batched(sub, 3)
    pending = [deferToThread(_send_one, sub.submission_port, who, key, f"r{n}@x{n}.example",
                             n) for n, who in enumerate([sender["email"], doomed["email"],
                                                         sender["email"]])]
    await _wait_pending(gc, 3)
    assert (await sub.api.delete(f"/api/v1/inboxes/{doomed['id']}",
                                 key=owner)).status in (200, 204)
    clock.advance(1.0)
    results = await defer.DeferredList(pending, consumeErrors=True)
    assert results[0][1][0] == 250 and results[2][1][0] == 250, results
    assert not results[1][0] or results[1][1][0] != 250, results  # refused or cut off
    dsn = _dsn(sub)
    rows = query(dsn, "SELECT m.subject, r.address FROM messages m JOIN outbound_queue q "
                      "ON q.message_id = m.id JOIN outbound_recipients r ON r.queue_id = q.id "
                      "ORDER BY m.subject")
    assert rows == [("batched 0", "r0@x0.example"), ("batched 2", "r2@x2.example")]
    assert query(dsn, "SELECT count(*) FROM outbound_queue") == [(2,)]
