"""Webhook endpoints that fight back (hostile review, apihostile): an endpoint that
sends its headers and then trickles its body must not keep our connection once the
attempt's time is up, and one that never stops sending is read no further than the cap."""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import protocol, reactor, task

from agentpost.storage.database import Database
from agentpost.webhooks.ssrf import SSRFGuard
from agentpost.webhooks.worker import TIMEOUT_S, WebhookWorker
from tests.helpers import query
from tests.test_webhook_delivery import server as server
from tests.webhook_receiver import wait_for


class _Stalling(protocol.Protocol):
    """Answers a request's headers at once, then a body that never comes (``flood``:
    sends body bytes without end instead)."""

    def dataReceived(self, data: bytes) -> None:
        if self.factory.answered.get(self):
            return
        self.factory.answered[self] = True
        self.factory.requests += 1
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\nx")
        if self.factory.flood:
            self._pump()

    def _pump(self) -> None:
        if self.transport.connected and not self.transport.disconnecting:
            self.transport.write(b"y" * 65536)
            self.factory.sent += 65536
            if self.factory.sent < 64 * 1024 * 1024:
                reactor.callLater(0, self._pump)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.closed += 1


class _StallingFactory(protocol.Factory):
    protocol = _Stalling

    def __init__(self, flood: bool = False) -> None:
        self.flood = flood
        self.answered: dict = {}
        self.requests = self.closed = self.sent = 0




@pytest_twisted.async_yield_fixture
async def rig(server):
    """A worker on a task.Clock (the attempt's timeout is driven, not waited for)."""
    await server.core.webhook_worker.stop()
    clock = task.Clock()
    clock.advance(time.time())
    db = Database(server.service.config.database.url, clock=clock, reactor=reactor,
                  pool_size=3)
    guard = SSRFGuard(allow_http=True, allow_networks=["127.0.0.0/8"])
    worker = WebhookWorker(db, guard, server.core.domains.sealer, reactor=reactor,
                           clock=clock, poll_s=5.0)
    await worker.start()
    yield worker, clock
    await worker.stop()
    await db.close()


async def _hook_and_ping(server, url: str) -> None:
    _, owner = await server.new_org()
    made = await server.api.post("/api/v1/webhooks", {"url": url}, key=owner)
    assert made.status == 201, made
    ping = await server.api.post(f"/api/v1/webhooks/{made.json['id']}/test", key=owner)
    assert ping.status == 202, ping


@pytest_twisted.ensureDeferred
async def test_a_trickling_answer_loses_its_connection_when_the_attempt_times_out(
        server, rig):
    worker, clock = rig
    factory = _StallingFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        await _hook_and_ping(server, f"http://127.0.0.1:{port.getHost().port}/hook")
        clock.advance(max(0.0, time.time() - clock.seconds()) + 1)  # the ping is due
        worker.kick()
        await wait_for(lambda: factory.requests == 1)
        clock.advance(TIMEOUT_S + 1)
        await wait_for(lambda: query(server.service.config.database.url,
                                     "SELECT 1 FROM webhook_attempts WHERE error LIKE "
                                     "'no answer within%%'"))
        await wait_for(lambda: factory.closed == 1)  # our side let go of the socket
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_endless_answer_is_read_no_further_than_the_cap(server, rig):
    worker, clock = rig
    factory = _StallingFactory(flood=True)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        await _hook_and_ping(server, f"http://127.0.0.1:{port.getHost().port}/hook")
        clock.advance(max(0.0, time.time() - clock.seconds()) + 1)
        worker.kick()
        await wait_for(lambda: factory.closed == 1)
        assert factory.sent < 64 * 1024 * 1024
        await wait_for(lambda: query(server.service.config.database.url,
                                     "SELECT 1 FROM webhook_attempts"))
    finally:
        await port.stopListening()
