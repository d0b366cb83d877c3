"""Send API calls without labels or an Idempotency-Key share a group commit (issue 11,
CPU per message): the Sent copy and its queue rows still commit together, nothing is
answered before that COMMIT, and the answer (read once committed) is the message's own
view, attachments included, with its queue ids.

The batch is driven by a ``task.Clock`` (``delay_s``), as in tests/test_group_commit.py.
"""

from __future__ import annotations

import base64

import pytest_twisted
from twisted.internet import defer, task

from agentpost.core.group_commit import GroupCommit
from tests.helpers import query
from tests.test_group_commit import _wait_pending
from tests.test_send_api import _dsn, _send_path, _setup, outbox, sub  # noqa: F401


@pytest_twisted.ensureDeferred
async def test_api_sends_arriving_together_share_one_commit(sub):  # noqa: F811
    _, sender, _, key = await _setup(sub)
    clock = task.Clock()
    gc = GroupCommit(sub.core.db, clock, max_batch=16, delay_s=1.0, parallel=1)
    sub.core.ingest.group_commit = gc
    bodies = [{"to": [f"r{n}@remote{n}.example"], "subject": f"batched {n}",
               "text_body": f"body {n}"} for n in range(3)]
    bodies[1]["attachments"] = [{"content": base64.b64encode(b"a,b\n").decode(),
                                 "filename": "n.csv", "mime_type": "text/csv"}]
    pending = [defer.ensureDeferred(sub.api.post(_send_path(sender), body, key=key))
               for body in bodies]
    await _wait_pending(gc, 3)
    assert not any(d.called for d in pending)  # no 201 before the COMMIT
    assert query(_dsn(sub), "SELECT count(*) FROM messages") == [(0,)]
    clock.advance(1.0)
    answers = [await d for d in pending]
    assert [a.status for a in answers] == [201, 201, 201], answers
    assert gc.batches == 1
    for n, answer in enumerate(answers):
        sent = answer.json
        shown = (await sub.api.get(f"/api/v1/messages/{sent['id']}", key=key)).json
        assert sent.pop("send_status") == "queued"
        queue_ids = sent.pop("queue_ids")
        assert sent == shown
        assert query(_dsn(sub), "SELECT q.id, r.address FROM outbound_queue q "
                                "JOIN outbound_recipients r ON r.queue_id = q.id "
                                "WHERE q.message_id = %s", (sent["id"],)) \
            == [(queue_ids[0], f"r{n}@remote{n}.example")]
    assert [a["filename"] for a in answers[1].json["attachments"]] == ["n.csv"]


@pytest_twisted.ensureDeferred
async def test_a_small_message_is_composed_inline_a_large_one_in_the_pool(sub, monkeypatch):  # noqa: F811
    """A small plain send is written on the reactor thread (no pool handoff); a large
    body, or a custom header, still goes to the pool. Both are sent alike."""
    from agentpost.core import sending as sending_module

    pooled = []
    real = sending_module.threads.deferToThreadPool

    def counting(reactor, pool, fn, *args, **kwargs):
        if "Sending._compose" in getattr(fn, "__qualname__", ""):  # (the module is shared)
            pooled.append(fn)
        return real(reactor, pool, fn, *args, **kwargs)

    monkeypatch.setattr(sending_module.threads, "deferToThreadPool", counting)
    _, sender, _, key = await _setup(sub)
    small = {"to": ["a@remote.example"], "subject": "small", "text_body": "hi"}
    large = {**small, "subject": "large", "text_body": "x " * 20_000}
    custom = {**small, "subject": "custom", "headers": {"X-Campaign": "q4"}}
    resp = await sub.api.post(_send_path(sender), small, key=key)
    assert resp.status == 201 and pooled == []
    for body in (large, custom):
        resp = await sub.api.post(_send_path(sender), body, key=key)
        assert resp.status == 201, resp
    assert len(pooled) == 2
    raw = (await sub.api.get(f"/api/v1/messages/{resp.json['id']}/raw", key=key)).body
    assert b"X-Campaign: q4" in raw
