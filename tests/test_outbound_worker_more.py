"""More of the outbound queue worker: one blob read per message per round, the
hand-off deadline on the injected clock, recipient dedupe (domain case-insensitive,
local part exact) and the trace fields of a local delivery."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.outbound.local import LocalFirstTransport
from agentpost.outbound.queue import normal_recipient, unique_recipients
from agentpost.outbound.transports import SENT, HandOff, LogTransport, Outcome
from tests.helpers import query
from tests.test_outbound_queue import (
    Sink,
    _clock,
    _dsn,
    _enqueue,
    _recipients,
    _sent_message,
    _worker,
)


@pytest.fixture
def server(server):
    """The running service without its own queue worker (as tests/test_outbound_queue)."""
    pytest_twisted.blockon(defer.ensureDeferred(server.core.outbound.stop()))
    return server


class CountingBlobs:
    """The service's blob store, counting reads."""

    def __init__(self, blobs: Any) -> None:
        self._blobs = blobs
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blobs, name)

    async def get_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return await self._blobs.get_bytes(key)


@pytest_twisted.ensureDeferred
async def test_a_round_reads_each_message_once_whatever_its_domains(server):
    first, _, _ = await _sent_message(server, "many")
    second, _, _ = await _sent_message(server, "few")
    await _enqueue(server, first, ["a@one.test", "b@two.test", "c@three.test"])
    await _enqueue(server, second, ["d@one.test", "e@two.test"])
    sink = Sink()
    worker = _worker(server, sink, _clock(), concurrency=2)
    counting = CountingBlobs(server.core.blobs)
    worker._blobs = counting
    assert await worker.drain_once() == 5
    assert len(sink.handoffs) == 5
    assert sorted(counting.reads) == sorted([first.raw_blob_key, second.raw_blob_key])


@pytest_twisted.ensureDeferred
async def test_an_unreadable_message_defers_every_row_of_it_in_the_round(server):
    message, _, _ = await _sent_message(server, "lost")
    ids = await _enqueue(server, message, ["a@one.test", "b@two.test"])

    class Broken(CountingBlobs):
        async def get_bytes(self, key: str) -> bytes:
            self.reads.append(key)
            raise OSError("disk on fire")

    sink = Sink()
    worker = _worker(server, sink, _clock())
    worker._blobs = broken = Broken(server.core.blobs)
    await worker.drain_once()
    assert sink.handoffs == [] and len(broken.reads) == 1
    assert [_recipients(server, q) for q in ids] == [{"a@one.test": "deferred"},
                                                      {"b@two.test": "deferred"}]


class Stuck:
    """A transport that answers only when the test says so."""

    name = "stuck"

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[Any]] = []

    async def send(self, envelope, raw):
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return await d


async def _until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_hand_off_past_its_deadline_is_deferred_and_a_late_answer_ignored(server):
    message, _, _ = await _sent_message(server, "slow")
    [queue_id] = await _enqueue(server, message, ["a@slow.test"])
    clock, stuck = _clock(), Stuck()
    worker = _worker(server, stuck, clock, handoff_timeout_s=30.0, lease_s=300.0)
    round_ = defer.ensureDeferred(worker.drain_once())
    await _until(lambda: stuck.pending)
    clock.advance(29.0)
    assert not round_.called
    clock.advance(1.0)
    assert await round_ == 1
    assert _recipients(server, queue_id) == {"a@slow.test": "deferred"}
    [(status, leased_by, error, code)] = query(
        _dsn(server), "SELECT q.status, q.leased_by, q.last_error, r.status_code "
        "FROM outbound_queue q JOIN outbound_recipients r ON r.queue_id = q.id "
        "WHERE q.id = %s", (queue_id,))
    assert (status, leased_by, code) == ("deferred", None, "4.4.1")
    assert "no answer from the transport within 30s" in error
    stuck.pending[0].callback(HandOff([Outcome("a@slow.test", SENT)]))  # too late
    assert _recipients(server, queue_id) == {"a@slow.test": "deferred"}
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_quick_hand_off_leaves_no_deadline_timer_behind(server):
    message, _, _ = await _sent_message(server, "quick")
    await _enqueue(server, message, ["a@quick.test"])
    clock = _clock()
    worker = _worker(server, Sink(), clock, handoff_timeout_s=30.0)
    assert await worker.drain_once() == 1
    assert clock.getDelayedCalls() == []


def test_recipients_are_one_when_only_the_domains_case_differs():
    assert normal_recipient("Bob@Example.COM") == "Bob@example.com"
    assert unique_recipients(["Bob@Example.COM", "bob@example.com", "Bob@example.com",
                              "bob@EXAMPLE.com"]) == ["Bob@example.com", "bob@example.com"]


@pytest_twisted.ensureDeferred
async def test_enqueue_drops_domain_case_duplicates_and_keeps_local_parts(server):
    message, _, _ = await _sent_message(server, "dupes")
    ids = await _enqueue(server, message, ["Bob@Example.COM", "bob@example.com",
                                           "Bob@example.com", "carol@OTHER.test"])
    assert len(ids) == 2
    rows = query(_dsn(server), "SELECT q.domain, r.address FROM outbound_queue q "
                 "JOIN outbound_recipients r ON r.queue_id = q.id ORDER BY 1, 2")
    assert rows == [("example.com", "Bob@example.com"), ("example.com", "bob@example.com"),
                    ("other.test", "carol@other.test")]


@pytest_twisted.ensureDeferred
async def test_local_delivery_adds_return_path_and_received_like_an_mta(server):
    message, sender, key = await _sent_message(server, "local-sender")
    target = (await server.api.post("/api/v1/inboxes", {"username": "local-target"},
                                    key=key)).json
    await _enqueue(server, message, [target["email"]])
    clock = _clock()
    core = server.core
    transport = LocalFirstTransport(core.router, core.ingest, LogTransport(),
                                    hostname="mx.test", clock=clock)
    assert await _worker(server, transport, clock).drain() == 1
    [(blob,)] = query(_dsn(server), "SELECT raw_blob_key FROM messages WHERE inbox_id = %s",
                      (target["id"],))
    raw = await core.blobs.get_bytes(blob)
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0] == f"Return-Path: <{sender['email']}>".encode()
    assert head[1] == b"Received: by mx.test (AgentPost outbound queue)"
    assert head[2].startswith(b"\tid obq_")
    assert head[3].startswith(f"\tfor <{target['email']}>; ".encode())
    assert raw.count(b"Return-Path:") == 1


@pytest_twisted.ensureDeferred
async def test_a_worker_whose_lease_was_taken_over_records_nothing(server):
    """The one-statement record (outcomes, attempt closed, blob released) writes
    nothing when another worker holds the row now."""
    message, _, _ = await _sent_message(server, "overtaken")
    [queue_id] = await _enqueue(server, message, ["a@slow.test"])
    clock, stuck = _clock(), Stuck()
    worker = _worker(server, stuck, clock, worker_id="first")
    round_ = defer.ensureDeferred(worker.drain_once())
    await _until(lambda: stuck.pending)
    import psycopg2

    with psycopg2.connect(_dsn(server)) as conn, conn.cursor() as cur:  # commits on exit
        cur.execute("UPDATE outbound_queue SET leased_by = 'second' WHERE id = %s",
                    (queue_id,))
    conn.close()
    stuck.pending[0].callback(HandOff([Outcome("a@slow.test", SENT)]))
    assert await round_ == 1
    assert _recipients(server, queue_id) == {"a@slow.test": "queued"}
    [(status, leased_by, refs)] = query(
        _dsn(server), "SELECT q.status, q.leased_by, b.refcount FROM outbound_queue q "
        "JOIN blobs b ON b.key = q.raw_blob_key WHERE q.id = %s", (queue_id,))
    assert (status, leased_by, refs) == ("sending", "second", 2)
