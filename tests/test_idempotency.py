"""core.idempotency on a real PostgreSQL with an injected clock: replay, conflict,
in-progress, release after failure, the answer recorded inside the caller's
transaction, take-over of an abandoned claim, scoping per credential, the sweep."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.core.context import RequestContext
from agentpost.core.idempotency import STALE_S, TTL_S, Idempotency, check_key, fingerprint
from agentpost.model.errors import IdempotencyConflict, IdempotencyInProgress, InvalidRequest
from agentpost.model.principal import Principal
from tests.helpers import query


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(time.time())
    return clock


def _ctx(org_id: str, credential: str = "key_A") -> RequestContext:
    principal = Principal(org_id, "owner", frozenset({"messages:send"}), "api_key", credential)
    return RequestContext("req_test", None, "messages.send", principal=principal)


async def _org(server) -> str:
    org, _ = await server.new_org()
    return org["id"]


def test_fingerprint_ignores_key_order_and_keys_are_printable_ascii():
    assert fingerprint("POST", "/p", {"a": 1, "b": 2}) == fingerprint("post", "/p",
                                                                     {"b": 2, "a": 1})
    assert fingerprint("POST", "/p", {"a": 1}) != fingerprint("POST", "/q", {"a": 1})
    assert check_key(None) is None and check_key("abc-123") == "abc-123"
    for bad in ("", "a b", "x" * 256, "é"):
        with pytest.raises(InvalidRequest):
            check_key(bad)


@pytest_twisted.ensureDeferred
async def test_a_repeat_replays_and_another_body_conflicts(server):
    idem = Idempotency(server.core.db, _clock())
    org = await _org(server)
    calls = []

    async def op(record):
        calls.append(record)
        return 201, {"id": "msg_1", "n": len(calls)}

    first = await idem.run(_ctx(org), "k1", "fp1", op)
    ctx = _ctx(org)
    again = await idem.run(ctx, "k1", "fp1", op)
    assert first == again == (201, {"id": "msg_1", "n": 1}) and len(calls) == 1
    assert ctx.details["idempotent_replay"] is True
    with pytest.raises(IdempotencyConflict):
        await idem.run(_ctx(org), "k1", "fp2", op)
    # Another credential of the same organization has keys of its own.
    assert await idem.run(_ctx(org, "key_B"), "k1", "fp2", op) == (201, {"id": "msg_1",
                                                                        "n": 2})


@pytest_twisted.ensureDeferred
async def test_a_concurrent_duplicate_is_in_progress_and_a_failure_releases(server):
    idem = Idempotency(server.core.db, _clock())
    org = await _org(server)
    gate: defer.Deferred[None] = defer.Deferred()

    async def slow(record):
        await gate
        return 201, {"ok": True}

    running = defer.ensureDeferred(idem.run(_ctx(org), "k", "fp", slow))
    for _ in range(50):  # until the claim is in
        if query(server.service.config.database.url,
                 "SELECT count(*) FROM idempotency_keys WHERE org_id = %s", (org,)) == [(1,)]:
            break
        await task.deferLater(reactor,
                              0.02, lambda: None)
    with pytest.raises(IdempotencyInProgress):
        await idem.run(_ctx(org), "k", "fp", slow)
    gate.callback(None)
    assert await running == (201, {"ok": True})

    async def failing(record):
        raise InvalidRequest("nope")

    with pytest.raises(InvalidRequest):
        await idem.run(_ctx(org), "k2", "fp", failing)

    async def fine(record):
        return 201, {"second": "try"}

    assert await idem.run(_ctx(org), "k2", "fp-other", fine) == (201, {"second": "try"})


@pytest_twisted.ensureDeferred
async def test_the_recorder_writes_the_answer_in_the_callers_transaction(server):
    idem = Idempotency(server.core.db, _clock())
    org = await _org(server)
    db = server.core.db

    async def op(record):
        async def txn_fn(txn):
            await record(txn, 201, {"in": "txn"})
            raise RuntimeError("the send failed after recording")  # rolls back both

        await db.run_interaction("test.send", txn_fn)
        return 201, {}

    with pytest.raises(RuntimeError):
        await idem.run(_ctx(org), "k", "fp", op)
    # Nothing recorded, claim released: the retry runs.

    async def op2(record):
        await db.run_interaction("test.send", lambda txn: record(txn, 201, {"in": "txn"}))
        return 201, {"in": "txn"}

    assert await idem.run(_ctx(org), "k", "fp", op2) == (201, {"in": "txn"})
    rows = query(server.service.config.database.url,
                 "SELECT state, status FROM idempotency_keys WHERE org_id = %s", (org,))
    assert rows == [("done", 201)]


@pytest_twisted.ensureDeferred
async def test_an_abandoned_claim_is_taken_over_and_the_late_original_rolls_back(server):
    clock = _clock()
    idem = Idempotency(server.core.db, clock)
    org = await _org(server)
    db = server.core.db
    gate: defer.Deferred[None] = defer.Deferred()

    async def stuck(record):
        await gate
        await db.run_interaction("test.send", lambda txn: record(txn, 201, {"who": "late"}))
        return 201, {"who": "late"}

    late = defer.ensureDeferred(idem.run(_ctx(org), "k", "fp", stuck))
    while query(server.service.config.database.url,
                "SELECT count(*) FROM idempotency_keys WHERE org_id = %s", (org,)) != [(1,)]:
        await task.deferLater(reactor,
                              0.02, lambda: None)
    clock.advance(STALE_S + 1)

    async def fresh(record):
        return 201, {"who": "fresh"}

    assert await idem.run(_ctx(org), "k", "fp", fresh) == (201, {"who": "fresh"})
    gate.callback(None)
    with pytest.raises(IdempotencyInProgress):  # its claim is gone: its send rolls back
        await late
    assert await idem.run(_ctx(org), "k", "fp", fresh) == (201, {"who": "fresh"})


@pytest_twisted.ensureDeferred
async def test_answers_expire_after_a_day_and_are_swept(server):
    clock = _clock()
    idem = Idempotency(server.core.db, clock)
    org = await _org(server)
    n = []

    async def op(record):
        n.append(1)
        return 201, {"n": len(n)}

    await idem.run(_ctx(org), "k", "fp", op)
    clock.advance(TTL_S + 1)
    assert await idem.run(_ctx(org), "k", "fp-new", op) == (201, {"n": 2})  # a fresh start
    clock.advance(TTL_S + 1)
    assert await idem.sweep() >= 1
    assert query(server.service.config.database.url,
                 "SELECT count(*) FROM idempotency_keys WHERE org_id = %s", (org,)) == [(0,)]
