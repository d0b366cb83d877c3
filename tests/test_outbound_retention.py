"""Finished outbound queue rows leave after retention.outbound_queue (counted from
their last change), with their recipients; rows still owed work stay whatever their
age. Without the sweep the queue kept every message ever sent."""

from __future__ import annotations

import datetime as dt

import pytest_twisted
from twisted.internet import defer, task

from agentpost.jobs.retention import RetentionSweep
from tests.helpers import execute as _execute
from tests.helpers import query
from tests.test_send_api import _dsn, _send_path, _setup, _wait_for, outbox, sub  # noqa: F401


async def _done(server, n: int) -> bool:
    return query(_dsn(server), "SELECT count(*) FROM outbound_queue WHERE status = 'done'"
                 " AND NOT bounce_pending")[0][0] >= n


@pytest_twisted.ensureDeferred
async def test_finished_rows_are_swept_after_their_retention(sub):  # noqa: F811
    _, sender, _, key = await _setup(sub)
    for n in range(2):
        made = await sub.api.post(_send_path(sender), {
            "to": f"r{n}@remote.example", "subject": f"s{n}", "text_body": "x"}, key=key)
        assert made.status in (200, 201), made.json
    assert await _wait_for(lambda: defer.ensureDeferred(_done(sub, 2)))
    # A third row that is still owed work (as if deferred), however old.
    _execute(_dsn(sub), "INSERT INTO outbound_queue (org_id, id, environment_id, inbox_id, "
             "message_id, raw_blob_key, size, mail_from, domain, status, next_attempt_at, "
             "expires_at, created_at, updated_at) SELECT org_id, 'obq_pending', "
             "environment_id, inbox_id, message_id, raw_blob_key, size, mail_from, domain, "
             "'deferred', now() + interval '1 day', now() + interval '4 days', "
             "now() - interval '2 years', now() - interval '2 years' FROM outbound_queue "
             "LIMIT 1")
    config = sub.service.config.retention
    clock = task.Clock()
    clock.advance(dt.datetime.now(dt.UTC).timestamp())
    sweep = RetentionSweep(sub.core.db, clock, config)
    await sweep.sweep_once()
    assert query(_dsn(sub), "SELECT count(*) FROM outbound_queue") == [(3,)]
    clock.advance(config.outbound_queue + 3600)
    await sweep.sweep_once()
    assert query(_dsn(sub), "SELECT id FROM outbound_queue") == [("obq_pending",)]
    # the swept rows' recipients went with them (the kept row was written without any)
    assert query(_dsn(sub), "SELECT count(*) FROM outbound_recipients") == [(0,)]
