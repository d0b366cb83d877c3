"""Webhook delivery (issue 13): signatures checked by an independent implementation
(standardwebhooks) and by hand, the retry schedule and disable-after-50 on a task.Clock,
a receiver that is down then up, and two workers on one database delivering each
attempt once."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest
import pytest_twisted
from standardwebhooks.webhooks import Webhook
from twisted.internet import reactor, task

from agentpost.model.ids import new_id
from agentpost.storage.database import Database
from agentpost.storage.mail import insert_event
from agentpost.webhooks.ssrf import SSRFGuard
from agentpost.webhooks.worker import DISABLE_AFTER, RETRY_DELAYS_S, WebhookWorker
from tests.conftest import make_config, start_server
from tests.helpers import query
from tests.mailfactory import make_message
from tests.webhook_receiver import wait_for


@pytest_twisted.async_yield_fixture
async def server(db_dsn, openapi_checker):
    """The service, allowed to call loopback receivers."""
    running = await start_server(
        make_config(db_dsn, webhooks={"allow_networks": ["127.0.0.0/8"]}), openapi_checker)
    yield running
    await running.service.stopService()


async def _hook(server, key, url, **extra):
    made = await server.api.post("/api/v1/webhooks", {"url": url, **extra}, key=key)
    assert made.status == 201, made
    return made.json


def _check_signatures(headers, body, secrets):
    """Both schemes, each with an independent check; every listed secret verifies."""
    for secret in secrets:
        Webhook(secret).verify(body, headers)  # raises on a bad signature
        mine = hmac.new(secret.encode(), headers["x-agentpost-timestamp"].encode() + b"."
                        + body, hashlib.sha256).hexdigest()
        assert mine in headers["x-agentpost-signature"].split(" ")


@pytest_twisted.ensureDeferred
async def test_a_received_message_is_posted_signed_in_both_schemes(server, receiver):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "hooked"},
                                   key=owner)).json
    hook = await _hook(server, owner, receiver.url, event_types=["message.received"])
    assert hook["secret"].startswith("whsec_")
    await server.deliver(make_message(to=inbox["email"], subject="hi"), [inbox["email"]])
    await wait_for(lambda: receiver.requests)
    headers, body = receiver.requests[0]
    _check_signatures(headers, body, [hook["secret"]])
    event = json.loads(body)
    assert event["type"] == "message.received" and headers["webhook-id"] == event["id"]
    assert set(event) == {"id", "type", "timestamp", "org_id", "env_id", "data"}
    assert headers["content-type"] == "application/json"
    # A wrong secret does not verify.
    with pytest.raises(Exception):  # noqa: B017 - the library's own error class
        Webhook("whsec_" + "A" * 32).verify(body, headers)
    # The delivery is listed with its outcome.
    listed = await server.api.get(f"/api/v1/webhooks/{hook['id']}/deliveries", key=owner)
    await wait_for(lambda: query(server.service.config.database.url,
                                 "SELECT 1 FROM webhook_deliveries WHERE status = 'succeeded'"))
    listed = await server.api.get(f"/api/v1/webhooks/{hook['id']}/deliveries", key=owner)
    [row] = listed.json["data"]
    assert row["status"] == "succeeded" and row["status_code"] == 200
    assert row["attempt"] == 1 and row["event_id"] == event["id"]


@pytest_twisted.ensureDeferred
async def test_after_rotation_both_secrets_sign_a_test_ping(server, receiver):
    _, owner = await server.new_org()
    hook = await _hook(server, owner, receiver.url)
    rotated = await server.api.post(f"/api/v1/webhooks/{hook['id']}/rotate-secret", key=owner)
    assert rotated.status == 200, rotated
    assert rotated.json["secret"] != hook["secret"]
    assert rotated.json["previous_secret_expires_at"] is not None
    ping = await server.api.post(f"/api/v1/webhooks/{hook['id']}/test", key=owner)
    assert ping.status == 202, ping
    await wait_for(lambda: receiver.requests)
    headers, body = receiver.requests[0]
    assert json.loads(body)["type"] == "webhook.test"
    assert len(headers["webhook-signature"].split(" ")) == 2
    _check_signatures(headers, body, [rotated.json["secret"], hook["secret"]])


# -- the worker on an injected clock ---------------------------------------------------

class Rig:
    """A worker on a task.Clock over its own pool, and a way to add events."""

    def __init__(self, server, clock, db):
        self.server, self.clock, self.db = server, clock, db
        cfg = server.service.config
        guard = SSRFGuard(allow_http=True, allow_networks=["127.0.0.0/8"])
        self.worker = WebhookWorker(db, guard, server.core.domains.sealer, reactor=reactor,
                                    clock=clock, poll_s=5.0)
        self.dsn = cfg.database.url

    async def event(self, org_id):
        event_id = new_id("evt")
        await self.db.run_interaction("t", insert_event, org_id=org_id, event_id=event_id,
                                      environment_id=None, inbox_id=None,
                                      type_="domain.verified", data={"n": event_id})
        return event_id

    def idle(self):
        return not self.worker._draining and not self.worker._inflight

    async def settle(self):
        await task.deferLater(reactor, 0.02, lambda: None)
        await wait_for(self.idle)

    async def advance(self, seconds):
        self.clock.advance(seconds)
        await self.settle()


@pytest_twisted.async_yield_fixture
async def rig(server):
    await server.core.webhook_worker.stop()  # the test drives its own worker
    clock = task.Clock()
    clock.advance(time.time())
    db = Database(server.service.config.database.url, clock=clock, reactor=reactor,
                  pool_size=3)
    r = Rig(server, clock, db)
    await r.worker.start()
    yield r
    await r.worker.stop()
    await db.close()


@pytest_twisted.ensureDeferred
async def test_failed_deliveries_are_retried_on_schedule_then_failed(server, rig, receiver):
    org, owner = await server.new_org()
    receiver.status = 500
    hook = await _hook(server, owner, receiver.url)
    await rig.event(org["id"])
    rig.worker.kick()
    await rig.settle()
    assert len(receiver.requests) == 1
    for n, delay in enumerate(RETRY_DELAYS_S, start=2):
        await rig.advance(delay - 1)
        assert len(receiver.requests) == n - 1, f"attempt {n} came early"
        await rig.advance(1)
        assert len(receiver.requests) == n, f"attempt {n} did not come after {delay}s"
        assert receiver.requests[-1][0]["x-agentpost-attempt"] == str(n)
    await rig.advance(24 * 3600)
    assert len(receiver.requests) == 1 + len(RETRY_DELAYS_S)
    rows = query(rig.dsn, "SELECT status, attempt, status_code, error FROM webhook_deliveries "
                          "WHERE webhook_id = %s", (hook["id"],))
    assert rows == [("failed", 6, 500, "HTTP 500: ok")]
    # A failed delivery can be replayed (a fresh schedule), and then it succeeds.
    receiver.status = 200
    listed = await server.api.get(f"/api/v1/webhooks/{hook['id']}/deliveries", key=owner)
    delivery_id = listed.json["data"][0]["id"]
    replayed = await server.api.post(
        f"/api/v1/webhooks/{hook['id']}/deliveries/{delivery_id}/replay", key=owner)
    assert replayed.status == 202, replayed
    rig.worker.kick()
    await rig.settle()
    assert query(rig.dsn, "SELECT status, attempt FROM webhook_deliveries WHERE id = %s",
                 (delivery_id,)) == [("succeeded", 1)]


@pytest_twisted.ensureDeferred
async def test_an_endpoint_is_disabled_after_50_consecutive_failures(server, rig, receiver):
    org, owner = await server.new_org()
    receiver.status = 503
    hook = await _hook(server, owner, receiver.url)
    for _ in range(10):
        await rig.event(org["id"])
    rig.worker.kick()
    await rig.settle()
    for delay in RETRY_DELAYS_S[:4]:  # 10 events x 5 attempts = 50 failures
        await rig.advance(delay)
    assert len(receiver.requests) == DISABLE_AFTER
    state = (await server.api.get(f"/api/v1/webhooks/{hook['id']}", key=owner)).json
    assert state["enabled"] is False and state["disabled_reason"] == "consecutive_failures"
    assert state["consecutive_failures"] == DISABLE_AFTER
    notice = query(rig.dsn, "SELECT data->>'webhook_id' FROM events WHERE org_id = %s "
                            "AND type = 'webhook.disabled'", (org["id"],))
    assert notice == [(hook["id"],)]
    await rig.advance(RETRY_DELAYS_S[4])
    assert len(receiver.requests) == DISABLE_AFTER  # disabled: nothing more is sent
    # New events do not queue for a disabled endpoint; re-enabling resets the count and
    # the pending deliveries go out.
    receiver.status = 200
    enabled = await server.api.patch(f"/api/v1/webhooks/{hook['id']}", {"enabled": True},
                                     key=owner)
    assert enabled.json["enabled"] is True and enabled.json["consecutive_failures"] == 0
    rig.worker.kick()
    await rig.settle()
    assert len(receiver.requests) == DISABLE_AFTER + 10
    assert query(rig.dsn, "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = %s "
                          "AND status = 'succeeded'", (hook["id"],)) == [(10,)]


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_is_down_then_up_gets_every_event(server, rig, receiver):
    org, owner = await server.new_org()
    await _hook(server, owner, receiver.url)
    port = receiver.port_number
    await receiver.stop()  # down: connections are refused
    sent = [await rig.event(org["id"]) for _ in range(5)]
    rig.worker.kick()
    await rig.settle()
    errors = query(rig.dsn, "SELECT error FROM webhook_deliveries WHERE status = 'pending'")
    assert len(errors) == 5 and all("ConnectionRefused" in e[0] or "refused" in e[0].lower()
                                    for e in errors)
    receiver.start(port)  # up again
    await rig.advance(RETRY_DELAYS_S[0])
    assert sorted(receiver.ids()) == sorted(sent)


@pytest_twisted.ensureDeferred
async def test_two_workers_on_one_database_deliver_each_event_once(server, rig, receiver):
    org, owner = await server.new_org()
    await _hook(server, owner, receiver.url)
    second_db = Database(rig.dsn, clock=rig.clock, reactor=reactor, pool_size=3)
    second = WebhookWorker(second_db, SSRFGuard(allow_http=True,
                                                allow_networks=["127.0.0.0/8"]),
                           server.core.domains.sealer, reactor=reactor, clock=rig.clock,
                           concurrency=4)
    await second.start()
    try:
        sent = [await rig.event(org["id"]) for _ in range(30)]
        rig.worker.kick()
        second.kick()
        await wait_for(lambda: len(receiver.requests) >= 30)
        await rig.settle()
        await wait_for(lambda: not second._draining and not second._inflight)
        assert sorted(receiver.ids()) == sorted(sent)  # each once, none twice
    finally:
        await second.stop()
        await second_db.close()


@pytest_twisted.ensureDeferred
async def test_a_wakeup_while_the_next_due_time_is_read_is_not_lost(server, rig, receiver,
                                                                    monkeypatch):
    """An event committed (and its NOTIFY heard) while the worker reads when the next
    delivery is due must go out at once, not after the poll interval (the task.Clock
    is never advanced here, so the poll timer cannot deliver it)."""
    from agentpost.webhooks import worker as worker_module

    org, owner = await server.new_org()
    await _hook(server, owner, receiver.url)
    real_next_due = worker_module.store.next_due
    sent: list[str] = []

    async def next_due_racing(txn):
        due = await real_next_due(txn)
        if not sent:  # once: an event commits and wakes us just after this read
            sent.append(await rig.event(org["id"]))
            rig.worker.kick()
        return due

    monkeypatch.setattr(worker_module.store, "next_due", next_due_racing)
    rig.worker.kick()
    await rig.settle()
    await wait_for(lambda: receiver.requests)
    assert receiver.ids() == sent
