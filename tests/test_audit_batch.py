"""Buffered audit rows go to PostgreSQL as one JSON parameter (storage.audit.
insert_audit_batch): every value comes back as it went in, whatever its text."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import task

from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from tests.helpers import query


@pytest_twisted.ensureDeferred
async def test_a_batch_stores_every_value_as_given(db_dsn):
    from twisted.internet import reactor

    from agentpost.storage.database import Database

    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=1)
    trail = AuditTrail(db, task.Clock(), 0.1, 100)
    texts = ["plain", "é ü ß", "😀 emoji", "漢字", 'quote " back\\slash', "tab\tnew\nline",
             "x\x00y"]
    for i, text in enumerate(texts):
        trail.enqueue(RequestContext(f"req_{i}", "::1" if i % 2 else None, "test.batch",
                                     target_id=text,
                                     details={"text": text, "n": i, "nested": {"l": [1, text]}}),
                      "denied" if i % 2 else "allowed", None if i == 0 else 400 + i)
    await trail.stop()
    await db.close()
    rows = query(db_dsn, "SELECT request_id, target_id, remote_addr, outcome, status, "
                 "details::text, occurred_at IS NOT NULL, actor_type FROM audit_log "
                 "WHERE action = 'test.batch' ORDER BY request_id")
    assert len(rows) == len(texts)
    for i, (request_id, target, addr, outcome, status, details, when, actor) in enumerate(rows):
        text = texts[i].replace("\x00", "\ufffd")
        assert request_id == f"req_{i}" and target == text and actor == "anonymous"
        assert addr == ("::1" if i % 2 else None) and when
        assert (outcome, status) == (("denied" if i % 2 else "allowed"),
                                     None if i == 0 else 400 + i)
        assert json.loads(details) == {"text": text, "n": i, "nested": {"l": [1, text]}}
    assert trail.sanitised == 1 and trail.quarantined == 0
