"""A recipient's status is `sending` while a worker holds its queue row: the API's
/messages/{id}/deliveries shows the hand-off under way (not the `queued` it had before
the claim), then its outcome."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.outbound.transports import SENT, Envelope, HandOff, Outcome
from tests.helpers import query
from tests.test_outbound_queue import _clock, _dsn, _enqueue, _sent_message, _worker, server

__all__ = ["server"]  # the fixture (the service without its own worker), used by name


class HeldTransport:
    """Holds every hand-off until the test releases it."""

    name = "held"

    def __init__(self) -> None:
        self.started: list[Envelope] = []
        self.release: defer.Deferred[None] = defer.Deferred()

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        self.started.append(envelope)
        await self.release
        return HandOff([Outcome(r, SENT, 250, "2.0.0", "ok") for r in envelope.recipients])


@pytest_twisted.ensureDeferred
async def test_a_recipient_being_handed_off_shows_sending_then_sent(server):
    message, _, key = await _sent_message(server, "inflight")
    [queue_id] = await _enqueue(server, message, ["friend@example.org"])
    path = f"/api/v1/messages/{message.message_id}/deliveries"

    async def statuses() -> list[str]:
        resp = await server.api.get(path, key=key)
        assert resp.status == 200, resp
        return [d["status"] for d in resp.json["data"]]

    assert await statuses() == ["queued"]
    transport = HeldTransport()
    clock = _clock()
    draining = defer.ensureDeferred(_worker(server, transport, clock).drain_once())
    for _ in range(500):
        if transport.started:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert transport.started, "the worker never handed off"
    assert query(_dsn(server), "SELECT status FROM outbound_queue WHERE id = %s",
                 (queue_id,)) == [("sending",)]
    assert await statuses() == ["sending"]
    transport.release.callback(None)
    assert await draining == 1
    assert await statuses() == ["sent"]
