"""A burst of bounces (a relay refusing a whole campaign) owes one DSN per queue row:
the worker stores them without waiting a poll period per handful, in rounds bounded by
a budget that chain on the injected clock (normal sending keeps its turn), with one
DSN per row however many workers share the queue, and without spinning when the DSNs
cannot be stored."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.core.blobrefs import BlobCollector
from agentpost.outbound.bounces import InboxBounceSink
from agentpost.outbound.transports import FAILED
from agentpost.outbound.worker import OutboundWorker
from agentpost.storage.database import Database
from tests.helpers import query
from tests.test_outbound_queue import POLICY, Sink, _clock, _dsn, _enqueue, _sent_message
from tests.test_outbound_worker_more import _until

N = 30
_FINAL = re.compile(rb"Final-Recipient: rfc822; (\S+)")


@pytest.fixture
def server(server):
    """The running service without its own queue worker (as tests/test_outbound_queue)."""
    pytest_twisted.blockon(defer.ensureDeferred(server.core.outbound.stop()))
    return server


class RecordingSink:
    """The service's bounce sink, recording the recipients each stored DSN reports;
    ``before`` runs first (it may raise: the DSN is not stored)."""

    def __init__(self, server, seen: Counter[str] | None = None,
                 before: Callable[[], None] | None = None) -> None:
        self._real = InboxBounceSink(server.core.db, server.core.ingest)
        self.seen: Counter[str] = seen if seen is not None else Counter()
        self.before = before
        self.calls = 0

    async def __call__(self, org_id: str, env_id: str, inbox_id: str, raw: bytes) -> None:
        self.calls += 1
        if self.before is not None:
            self.before()
        await self._real(org_id, env_id, inbox_id, raw)
        self.seen.update(m.decode() for m in _FINAL.findall(raw))


async def _campaign(server, n: int = N) -> tuple[Any, list[str]]:
    """One message to ``n`` domains (``n`` queue rows) that the relay will refuse."""
    message, inbox, _ = await _sent_message(server, "campaign")
    recipients = [f"r{i}@domain{i}.test" for i in range(n)]
    await _enqueue(server, message, recipients)
    return inbox, recipients


def _dsns(server, inbox_id: str) -> int:
    return query(_dsn(server), "SELECT count(*) FROM messages WHERE inbox_id = %s AND "
                 "subject = 'Undelivered Mail Returned to Sender'", (inbox_id,))[0][0]


def _owed(server) -> int:
    return query(_dsn(server), "SELECT count(*) FROM outbound_queue WHERE bounce_pending")[0][0]


def _refusing(server, clock, sink, *, db=None, worker_id="w", **kw) -> OutboundWorker:
    """A worker whose relay refuses every recipient, storing DSNs through ``sink``."""
    core = server.core
    return OutboundWorker(db or core.db, core.blobs, BlobCollector(core.db, core.blobs),
                          Sink(lambda env: {r: FAILED for r in env.recipients}), clock,
                          worker_id=worker_id, hostname="mx.test", bounce_sink=sink,
                          policy=POLICY, **kw)


@pytest_twisted.ensureDeferred
async def test_a_wake_up_stores_every_owed_dsn_not_a_handful(server):
    inbox, recipients = await _campaign(server)
    clock = _clock()
    sink = RecordingSink(server)
    worker = _refusing(server, clock, sink)
    assert await worker.drain() == N  # what a wake-up (or a poll) runs, once
    assert _dsns(server, inbox["id"]) == N and _owed(server) == 0
    assert sink.seen == Counter(recipients)
    assert clock.getDelayedCalls() == []  # within the budget: no follow-up round


async def _rounds(workers: list[OutboundWorker], clocks: list[task.Clock],
                  limit: int) -> int:
    """Run the follow-up rounds the workers scheduled (at 0 s on their clocks, never a
    poll period) until none is left; how many were run."""
    rounds = 0
    while rounds < limit and any(c.getDelayedCalls() for c in clocks):
        for clock in clocks:
            clock.advance(0)
        rounds += 1
        await _until(lambda: all(w._periodic.running is None for w in workers))
    return rounds


@pytest_twisted.ensureDeferred
async def test_a_backlog_past_the_budget_chains_rounds_and_two_workers_send_each_once(
        server):
    """Each worker has its own connection pool, as two processes would; a budget of 4
    DSNs per round, so 30 take several rounds, each started at once by the last."""
    inbox, recipients = await _campaign(server)
    seen: Counter[str] = Counter()
    pools = [Database(_dsn(server), clock=reactor, reactor=reactor, pool_size=3)
             for _ in range(2)]
    clocks = [_clock(), _clock()]
    try:
        workers = [_refusing(server, clock, RecordingSink(server, seen), db=db,
                             worker_id=f"w{i}", batch=7, bounce_budget=4)
                   for i, (db, clock) in enumerate(zip(pools, clocks, strict=True))]
        await defer.gatherResults([defer.ensureDeferred(w.drain()) for w in workers])
        assert 0 < sum(seen.values()) <= 8  # one budget each
        rounds = await _rounds(workers, clocks, limit=N)
        assert rounds <= N // 4 + 1
        assert all(c.getDelayedCalls() == [] for c in clocks)
        for worker in workers:
            await worker.stop()
    finally:
        for db in pools:
            await db.close()
    assert seen == Counter(recipients)  # every row's DSN, exactly once
    assert _dsns(server, inbox["id"]) == N and _owed(server) == 0


@pytest_twisted.ensureDeferred
async def test_dsns_that_cannot_be_stored_wait_for_the_poll_not_a_spin(server):
    inbox, _ = await _campaign(server, 10)
    clock = _clock()

    def down() -> None:
        raise RuntimeError("blob store down")

    sink = RecordingSink(server, before=down)
    worker = _refusing(server, clock, sink, bounce_budget=4)
    await worker.drain()
    assert sink.calls == 4  # one budget, each row at most once
    assert clock.getDelayedCalls() == []  # no round at once: the next poll retries
    assert _owed(server) == 10
    sink.before = None
    while _owed(server):
        await worker.drain()
    assert _dsns(server, inbox["id"]) == 10


@pytest_twisted.ensureDeferred
async def test_a_round_stops_at_its_time_budget_on_the_clock(server):
    """Slow DSN stores (the clock moves 0.4 s per DSN here) end a round once
    ``bounce_budget_s`` has passed, and the next round follows at once."""
    inbox, _ = await _campaign(server, 6)
    clock = _clock()
    sink = RecordingSink(server, before=lambda: clock.advance(0.4))
    worker = _refusing(server, clock, sink, bounce_budget_s=1.0)
    await worker.drain()
    assert sink.calls == 3 and _owed(server) == 3  # 0.4, 0.8, 1.2 s: the third ends it
    assert [c.getTime() for c in clock.getDelayedCalls()] == [clock.seconds()]
    assert await _rounds([worker], [clock], limit=5) <= 2
    assert _owed(server) == 0 and _dsns(server, inbox["id"]) == 6
    await worker.stop()
