"""Throughput work on the outbound side keeps its guarantees: outcomes recorded together
(one transaction for many hand-offs) still honour the lease, a batch that cannot be
written is recorded one outcome at a time, one enqueue writes every domain's row and
blob reference at once, and a send checks all its recipients in one read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted
from twisted.internet import defer

from agentpost.core.submission import Sender
from agentpost.model.errors import RecipientBlocked, SuppressedRecipient
from agentpost.outbound.transports import DEFERRED, SENT
from agentpost.storage import outbound as store
from tests.helpers import query
from tests.test_outbound_queue import (
    Sink,
    _clock,
    _dsn,
    _enqueue,
    _recipients,
    _refcount,
    _sent_message,
    _worker,
)
from tests.test_outbound_queue import server as server  # the fixture: no service worker


class Gate:
    """A transport that holds every hand-off until released, so that many outcomes
    reach the recorder at the same moment."""

    name = "gate"

    def __init__(self) -> None:
        self.waiting: list[tuple[defer.Deferred, object]] = []
        self.sink = Sink()

    async def send(self, envelope, raw):
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((d, envelope))
        await d
        return await self.sink.send(envelope, raw)

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, _ in waiting:
            d.callback(None)


def _write(server, sql: str, params: tuple = ()) -> None:
    """Change the database directly (committed)."""
    import psycopg2

    conn = psycopg2.connect(_dsn(server))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
    finally:
        conn.close()


async def _until(predicate, tries=200):
    from twisted.internet import reactor, task

    for _ in range(tries):
        if predicate():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached")


@pytest_twisted.ensureDeferred
async def test_outcomes_that_finish_together_are_recorded_in_one_transaction(server):
    message, _, _ = await _sent_message(server, "together")
    ids = []
    for n in range(12):
        ids += await _enqueue(server, message, [f"r{n}@d{n}.test"])
    gate = Gate()
    worker = _worker(server, gate, _clock(), batch=12, concurrency=12)
    round_ = defer.ensureDeferred(worker.drain_once())
    await _until(lambda: len(gate.waiting) == 12)
    gate.release()
    assert await round_ == 12
    assert worker._recorder.transactions < 12  # one per hand-off before
    statuses = query(_dsn(server), "SELECT status, count(*) FROM outbound_queue "
                     "WHERE id = ANY(%s) GROUP BY 1", (ids,))
    assert statuses == [("done", 12)]
    for n, queue_id in enumerate(ids):
        assert _recipients(server, queue_id) == {f"r{n}@d{n}.test": "sent"}
    assert _refcount(server, message.raw_blob_key) == 1  # only the Sent copy's


@pytest_twisted.ensureDeferred
async def test_a_batch_records_only_the_rows_this_worker_still_leases(server):
    message, _, _ = await _sent_message(server, "leases")
    mine = await _enqueue(server, message, ["a@one.test"])
    lost = await _enqueue(server, message, ["b@two.test"])
    now = datetime.now(UTC)
    await server.core.db.run_interaction(
        "test.claim", store.claim_due, now, now + timedelta(minutes=5), "w1", 10)
    # Another worker took the second row over (as after our lease ran out).
    _write(server, "UPDATE outbound_queue SET leased_by = 'w2' WHERE id = %s", (lost[0],))
    attempts = [
        store.Attempt(message.org_id, qid, [{"address": a, "status": SENT, "smtp_code": 250,
                                             "status_code": "2.0.0", "diagnostic": "ok\x00",
                                             "transport_id": None}], None, False, None)
        for qid, a in ((mine[0], "a@one.test"), (lost[0], "b@two.test"))]
    held, released = await server.core.db.run_interaction(
        "test.record", store.record_attempts, "w1", attempts)
    assert held == {mine[0]} and released == []
    assert _recipients(server, mine[0]) == {"a@one.test": "sent"}
    assert _recipients(server, lost[0]) == {"b@two.test": "queued"}
    assert query(_dsn(server), "SELECT status, leased_by FROM outbound_queue WHERE id = %s",
                 (lost[0],)) == [("sending", "w2")]
    assert query(_dsn(server), "SELECT diagnostic FROM outbound_recipients "
                 "WHERE queue_id = %s", (mine[0],)) == [("ok",)]  # NUL dropped


@pytest_twisted.ensureDeferred
async def test_a_batch_that_cannot_be_written_is_recorded_one_by_one(server):
    """PostgreSQL refuses one row's outcome (a trigger stands in for whatever a database
    may refuse): the batch's shared write fails, each outcome is then written alone, and
    only that row is left to its lease."""
    message, _, _ = await _sent_message(server, "poison")
    ids = []
    for n in range(6):
        ids += await _enqueue(server, message, [f"r{n}@p{n}.test"])
    bad = ids[2]
    _write(server, "CREATE FUNCTION test_refuse_outcome() RETURNS trigger LANGUAGE plpgsql "
           "AS $$ BEGIN IF NEW.id = '" + bad + "' AND OLD.status = 'sending' AND "
           "NEW.status <> 'sending' THEN RAISE EXCEPTION 'this outcome cannot be written'; "
           "END IF; RETURN NEW; END $$; CREATE TRIGGER test_refuse_outcome BEFORE UPDATE "
           "ON outbound_queue FOR EACH ROW EXECUTE FUNCTION test_refuse_outcome()")
    try:
        gate = Gate()
        worker = _worker(server, gate, _clock(), batch=6, concurrency=6)
        round_ = defer.ensureDeferred(worker.drain_once())
        await _until(lambda: len(gate.waiting) == 6)
        gate.release()
        assert await round_ == 6
    finally:
        _write(server, "DROP TRIGGER test_refuse_outcome ON outbound_queue; "
               "DROP FUNCTION test_refuse_outcome()")
    rows = dict(query(_dsn(server), "SELECT id, status FROM outbound_queue WHERE id = ANY(%s)",
                      (ids,)))
    assert rows.pop(bad) == "sending"  # its lease runs out; it is tried again then
    assert set(rows.values()) == {"done"}


@pytest_twisted.ensureDeferred
async def test_one_enqueue_writes_a_row_per_domain_and_a_reference_each(server):
    message, _, _ = await _sent_message(server, "domains")
    before = _refcount(server, message.raw_blob_key)
    ids = await _enqueue(server, message, ["a@one.test", "b@TWO.test", "c@one.test",
                                           "a@one.test", "d@three.test"])
    assert len(ids) == 3
    assert _refcount(server, message.raw_blob_key) == before + 3
    by_domain = {d: qid for qid, d in query(
        _dsn(server), "SELECT id, domain FROM outbound_queue WHERE id = ANY(%s)", (ids,))}
    assert _recipients(server, by_domain["one.test"]) == {"a@one.test": "queued",
                                                          "c@one.test": "queued"}
    assert _recipients(server, by_domain["two.test"]) == {"b@two.test": "queued"}
    assert _recipients(server, by_domain["three.test"]) == {"d@three.test": "queued"}
    deferred_sink = Sink(lambda env: {r: DEFERRED for r in env.recipients})
    assert await _worker(server, deferred_sink, _clock()).drain_once() == 3


@pytest_twisted.ensureDeferred
async def test_recipients_are_checked_together_and_the_first_refusal_is_raised(server):
    _, inbox, _key = await _sent_message(server, "checks")
    org_id = query(_dsn(server), "SELECT org_id FROM inboxes WHERE id = %s",
                   (inbox["id"],))[0][0]
    _write(server, "INSERT INTO suppressions (org_id, id, email, reason, created_at) "
          "VALUES (%s, 'sup_test1', 'gone@example.org', 'manual', now())", (org_id,))
    core = server.core
    submission = core.sending._submission
    principal = object()
    sender = Sender(principal, org_id, inbox["environment_id"], inbox["id"],  # type: ignore[arg-type]
                    inbox["email"])
    await submission.check_recipients(sender, ["ok@example.org", "fine@example.net"])
    with pytest.raises(SuppressedRecipient):
        await submission.check_recipients(sender, ["ok@example.org", "Gone@Example.ORG"])
    with pytest.raises(SuppressedRecipient):
        await submission.check_recipients(sender, ["gone@example.org"])
    _write(server, "INSERT INTO filter_rules (org_id, id, environment_id, inbox_id, "
          "direction, match_type, value, action, created_at) VALUES (%s, 'flt_test1', %s, "
          "%s, 'send', 'domain', 'blocked.test', 'block', now())",
          (org_id, inbox["environment_id"], inbox["id"]))
    with pytest.raises(RecipientBlocked):  # the earlier recipient's refusal comes first
        await submission.check_recipients(sender, ["x@blocked.test", "gone@example.org"])


class CountingRouter:
    """The service's Router, counting lookups."""

    def __init__(self, router) -> None:
        self.router = router
        self.lookups = 0

    async def resolve(self, address, sender):
        self.lookups += 1
        return await self.router.resolve(address, sender)


@pytest_twisted.ensureDeferred
async def test_a_remote_domain_is_looked_up_once_a_second_and_hosted_ones_every_time(server):
    from agentpost.outbound.local import REMOTE_MEMO_S, LocalFirstTransport
    from agentpost.outbound.transports import Envelope

    message, inbox, _key = await _sent_message(server, "memo")
    clock = _clock()
    router = CountingRouter(server.core.router)
    sink = Sink()
    transport = LocalFirstTransport(router, server.core.ingest, sink, hostname="mx.test",
                                    clock=clock)
    raw = b"From: <a@b.test>\r\nSubject: memo\r\n\r\nhi\r\n"

    def envelope(n, *rcpts):
        return Envelope(f"obq_memo{n}", message.org_id, inbox["email"], rcpts, "msg_x")

    await transport.send(envelope(1, "a@Remote.test"), raw)
    await transport.send(envelope(2, "b@remote.test", inbox["email"]), raw)
    assert router.lookups == 2  # remote.test once, the hosted inbox every time
    assert [e.recipients for e in sink.handoffs] == [("a@Remote.test",), ("b@remote.test",)]
    clock.advance(REMOTE_MEMO_S)
    await transport.send(envelope(3, "c@remote.test"), raw)
    assert router.lookups == 3  # remembered for a second only
