"""The outbound queue on a real PostgreSQL: hand-off once, retries on the injected
clock, bounces with an RFC 3464 DSN and a message.bounced event, lease take-over after
a crash, and two workers draining one queue with every row handed off exactly once."""

from __future__ import annotations

import email
import email.policy
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.core.blobrefs import BlobCollector
from agentpost.outbound.bounces import InboxBounceSink
from agentpost.outbound.queue import QueuedMessage, RetryPolicy, enqueue
from agentpost.outbound.transports import DEFERRED, FAILED, SENT, Envelope, HandOff, Outcome
from agentpost.outbound.worker import OutboundWorker
from agentpost.storage import outbound as store
from agentpost.storage.database import Database
from tests.helpers import query
from tests.mailfactory import make_message

POLICY = RetryPolicy(schedule=(60.0, 300.0), lifetime_s=1000.0)


@pytest.fixture
def server(server):
    """The running service without its own queue worker: these tests drive workers of
    their own (with their own clocks and transports) against its database."""
    pytest_twisted.blockon(defer.ensureDeferred(server.core.outbound.stop()))
    return server


class Sink:
    """A test-owned transport: records every hand-off, answers as scripted."""

    name = "sink"

    def __init__(self, answer=None) -> None:
        self.handoffs: list[Envelope] = []
        self.answer = answer or (lambda env: {r: SENT for r in env.recipients})

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        assert raw.startswith(b"Return-Path:") or b"Subject:" in raw
        self.handoffs.append(envelope)
        verdicts = self.answer(envelope)
        if isinstance(verdicts, Exception):
            raise verdicts
        return HandOff([Outcome(r, v, 550 if v == FAILED else 250,
                                "5.1.1" if v == FAILED else "2.0.0",
                                "no such user" if v == FAILED else "ok")
                        for r, v in verdicts.items()])


def _dsn(server) -> str:
    return server.service.config.database.url


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(time.time() + 1)
    return clock


def _worker(server, transport, clock, *, db=None, worker_id="w1", **kw) -> OutboundWorker:
    core = server.core
    return OutboundWorker(db or core.db, core.blobs, BlobCollector(core.db, core.blobs),
                          transport, clock,
                          worker_id=worker_id, hostname="mx.test",
                          bounce_sink=InboxBounceSink(core.db, core.ingest), policy=POLICY,
                          **kw)


async def _sent_message(server, username="sender"):
    """A stored message of an inbox (standing in for its Sent copy) and the inbox."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username},
                                   key=key)).json
    [stored] = await server.deliver(make_message(to="x@example.com", subject="outbound",
                                                 msgid=f"<{username}@x>"), [inbox["email"]])
    [(blob, size)] = query(_dsn(server), "SELECT raw_blob_key, size FROM messages WHERE id = %s",
                           (stored.message_id,))
    message = QueuedMessage(stored.org_id, inbox["environment_id"], inbox["id"],
                            stored.message_id, blob, size, inbox["email"])
    return message, inbox, key


async def _enqueue(server, message, recipients):
    return await server.core.db.run_interaction(
        "test.enqueue", lambda txn: enqueue(txn, message, recipients, policy=POLICY))


def _recipients(server, queue_id):
    return dict(query(_dsn(server), "SELECT address, status FROM outbound_recipients "
                      "WHERE queue_id = %s", (queue_id,)))


def _refcount(server, blob):
    return query(_dsn(server), "SELECT refcount FROM blobs WHERE key = %s", (blob,))[0][0]


@pytest_twisted.ensureDeferred
async def test_each_domain_is_one_hand_off_and_the_queue_lets_go_of_the_blob(server):
    message, _, _ = await _sent_message(server)
    ids = await _enqueue(server, message, ["a@one.test", "b@one.test", "c@two.test",
                                           "a@one.test"])
    assert len(ids) == 2 and _refcount(server, message.raw_blob_key) == 3
    sink = Sink()
    assert await _worker(server, sink, _clock()).drain() == 2
    assert sorted(e.recipients for e in sink.handoffs) == [("a@one.test", "b@one.test"),
                                                           ("c@two.test",)]
    assert all(set(_recipients(server, q).values()) == {"sent"} for q in ids)
    assert _refcount(server, message.raw_blob_key) == 1  # only the stored message now
    assert await _worker(server, sink, _clock()).drain() == 0  # nothing is sent twice


@pytest_twisted.ensureDeferred
async def test_deferrals_follow_the_schedule_then_bounce_with_a_dsn_and_an_event(server):
    message, inbox, key = await _sent_message(server, "retrier")
    [queue_id] = await _enqueue(server, message, ["slow@far.test"])
    sink = Sink(lambda env: {r: DEFERRED for r in env.recipients})
    clock = _clock()
    worker = _worker(server, sink, clock)
    assert await worker.drain_once() == 1
    assert await worker.drain_once() == 0  # not due yet
    clock.advance(59)
    assert await worker.drain_once() == 0
    clock.advance(1)
    assert await worker.drain_once() == 1  # after 1 minute
    clock.advance(299)
    assert await worker.drain_once() == 0
    clock.advance(1)
    assert await worker.drain_once() == 1  # after 5 more
    assert _recipients(server, queue_id) == {"slow@far.test": "deferred"}
    clock.advance(1000)  # past the lifetime: the next attempt's deferral is final
    assert await worker.drain_once() == 1
    assert _recipients(server, queue_id) == {"slow@far.test": "bounced"}
    assert len(sink.handoffs) == 4

    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                   key=key)).json["data"]
    dsn = [m for m in listed if m["subject"] == "Undelivered Mail Returned to Sender"]
    assert len(dsn) == 1
    raw = (await server.api.get(f"/api/v1/messages/{dsn[0]['id']}/raw", key=key)).body
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    status = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status[0].get_payload()
    assert blocks[1]["Final-Recipient"] == "rfc822; slow@far.test"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "4.4.7"
    [(data,)] = query(_dsn(server), "SELECT data FROM events WHERE type = 'message.bounced' "
                      "AND inbox_id = %s", (inbox["id"],))
    assert data["message_id"] == message.message_id
    assert data["recipients"][0]["address"] == "slow@far.test"
    assert await worker.drain_once() == 0  # and only one DSN


@pytest_twisted.ensureDeferred
async def test_a_permanent_refusal_bounces_at_once_and_others_still_go(server):
    message, inbox, _ = await _sent_message(server, "mixed")
    [queue_id] = await _enqueue(server, message, ["good@d.test", "gone@d.test"])
    sink = Sink(lambda env: {r: (FAILED if r.startswith("gone") else SENT)
                             for r in env.recipients})
    await _worker(server, sink, _clock()).drain()
    assert _recipients(server, queue_id) == {"good@d.test": "sent", "gone@d.test": "bounced"}
    [(count,)] = query(_dsn(server), "SELECT count(*) FROM messages WHERE inbox_id = %s AND "
                       "subject = 'Undelivered Mail Returned to Sender'", (inbox["id"],))
    assert count == 1


@pytest_twisted.ensureDeferred
async def test_a_transport_crash_is_a_deferral_not_a_loss(server):
    message, _, _ = await _sent_message(server, "crashy")
    [queue_id] = await _enqueue(server, message, ["a@d.test"])
    sink = Sink(lambda env: RuntimeError("boom"))
    clock = _clock()
    await _worker(server, sink, clock).drain()
    assert _recipients(server, queue_id) == {"a@d.test": "deferred"}
    [(error,)] = query(_dsn(server), "SELECT last_error FROM outbound_queue WHERE id = %s",
                       (queue_id,))
    assert "RuntimeError" in error


@pytest_twisted.ensureDeferred
async def test_a_dead_workers_lease_runs_out_and_another_takes_over(server):
    message, _, _ = await _sent_message(server, "leased")
    [queue_id] = await _enqueue(server, message, ["a@d.test"])
    clock = _clock()
    now = datetime.fromtimestamp(clock.seconds(), UTC)
    # The dead worker claimed the row (and maybe handed it off) but never recorded.
    claimed = await server.core.db.run_interaction(
        "test.claim", store.claim_due, now, now + timedelta(seconds=300), "dead", 10)
    assert [r["id"] for r in claimed] == [queue_id]
    sink = Sink()
    worker = _worker(server, sink, clock, lease_s=300)
    assert await worker.drain_once() == 0  # leased: skipped, not waited for
    clock.advance(301)
    assert await worker.drain_once() == 1
    assert _recipients(server, queue_id) == {"a@d.test": "sent"}
    late = await server.core.db.run_interaction(
        "test.late", store.record_results, claimed[0]["org_id"], queue_id, "dead",
        [{"address": "a@d.test", "status": "deferred", "smtp_code": None,
          "status_code": None, "diagnostic": None, "transport_id": None}])
    assert late is False  # the lost lease may not overwrite the outcome
    assert _recipients(server, queue_id) == {"a@d.test": "sent"}


@pytest_twisted.ensureDeferred
async def test_two_workers_on_one_database_hand_each_row_off_exactly_once(server):
    """Each worker has its own connection pool, as two processes would."""
    message, _, _ = await _sent_message(server, "busy")
    for n in range(60):
        await _enqueue(server, message, [f"r{n}@domain{n}.test"])
    sink = Sink()
    pools = [Database(_dsn(server), clock=reactor, reactor=reactor, pool_size=3)
             for _ in range(2)]
    try:
        workers = [_worker(server, sink, _clock(), db=db, worker_id=f"w{i}", batch=7)
                   for i, db in enumerate(pools)]
        counts = await defer.gatherResults(
            [defer.ensureDeferred(w.drain()) for w in workers])
    finally:
        for db in pools:
            await db.close()
    handed = Counter(e.queue_id for e in sink.handoffs)
    assert len(handed) == 60 and set(handed.values()) == {1}
    assert sum(counts) == 60
    assert query(_dsn(server), "SELECT DISTINCT status FROM outbound_queue") == [("done",)]


@pytest_twisted.ensureDeferred
async def test_the_running_service_is_woken_by_an_enqueue_and_logs_the_message(
        db_dsn, openapi_checker, tmp_path):
    """The service's worker LISTENs: an enqueue committed anywhere is handed off at
    once (not at the next poll), here to the development log transport's directory."""
    from tests.conftest import make_config, start_server

    config = make_config(db_dsn, outbound={"log_dir": str(tmp_path / "out"),
                                           "poll_interval": "1h"})
    running = await start_server(config, openapi_checker)
    try:
        message, _, _ = await _sent_message(running, "woken")
        [queue_id] = await _enqueue(running, message, ["friend@example.org"])
        path = tmp_path / "out" / f"{queue_id}.eml"
        for _ in range(200):
            if path.exists():
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        written = path.read_bytes()
        assert written.startswith(b"X-AgentPost-Envelope-From: <woken@agents.test>\r\n"
                                  b"X-AgentPost-Envelope-To: <friend@example.org>\r\n")
        assert b"Subject: outbound" in written
        assert await _settled(running, queue_id)
    finally:
        await running.service.stopService()


async def _settled(server, queue_id) -> bool:
    for _ in range(100):
        if _recipients(server, queue_id) == {"friend@example.org": "sent"}:
            return True
        await task.deferLater(reactor, 0.05, lambda: None)
    return False


@pytest_twisted.ensureDeferred
async def test_the_queue_keeps_the_bytes_when_the_sent_copy_is_deleted_first(server):
    """The queue row's reference keeps the blob; once delivered, the last release
    removes it (and recording that outcome does not fail)."""
    message, _inbox, key = await _sent_message(server, "early-delete")
    [queue_id] = await _enqueue(server, message, ["a@d.test"])
    deleted = await server.api.delete(f"/api/v1/messages/{message.message_id}", key=key)
    assert deleted.status in (200, 204), deleted
    assert _refcount(server, message.raw_blob_key) == 1  # only the queue's reference
    sink = Sink()
    assert await _worker(server, sink, _clock()).drain() == 1
    assert _recipients(server, queue_id) == {"a@d.test": "sent"}
    assert query(_dsn(server), "SELECT count(*) FROM blobs WHERE key = %s",
                 (message.raw_blob_key,)) == [(0,)]
    assert not await server.core.blobs.exists(message.raw_blob_key)


@pytest_twisted.ensureDeferred
async def test_a_dsn_that_cannot_be_stored_does_not_hold_up_or_repeat_the_others(server):
    failing, _, _ = await _sent_message(server, "dsn-fails")
    fine, _, _ = await _sent_message(server, "dsn-fine")
    await _enqueue(server, failing, ["gone@d.test"])
    await _enqueue(server, fine, ["gone@e.test"])
    stored: list[str] = []
    broken = {failing.inbox_id}
    real = InboxBounceSink(server.core.db, server.core.ingest)

    async def sink(org_id, env_id, inbox_id, raw):
        if inbox_id in broken:
            raise RuntimeError("blob store down")
        stored.append(inbox_id)
        await real(org_id, env_id, inbox_id, raw)

    core = server.core
    worker = OutboundWorker(core.db, core.blobs, BlobCollector(core.db, core.blobs),
                            Sink(lambda env: {r: FAILED for r in env.recipients}), _clock(),
                            worker_id="w", hostname="mx.test", bounce_sink=sink,
                            policy=POLICY)
    await worker.drain()
    assert stored == [fine.inbox_id]  # the other tenant's DSN, once
    await worker.drain()
    assert stored == [fine.inbox_id]  # still owed, not repeated for anyone
    broken.clear()
    await worker.drain()
    assert sorted(stored) == sorted([fine.inbox_id, failing.inbox_id])
    assert query(_dsn(server), "SELECT count(*) FROM outbound_queue WHERE bounce_pending") \
        == [(0,)]
