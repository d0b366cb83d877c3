"""The queue's local path when the remote part of a hand-off goes wrong: recipients
already delivered through ingest keep their outcome (the retry does not deliver them
again), and only the remote recipients are deferred -- for a remote transport that
raises, for one that does not answer by ``remote_deadline_s``, never for a
cancellation (issue 11: without losing a message or sending one twice).

A queue row holds one domain, hosted here or not for all its addresses; it mixes the
two only when the domain's hosting changes during the hand-off. The router below is
the service's own, with that change made (in another transaction) between the row's
two lookups: the domain is deleted after its first address was resolved."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from agentpost.outbound.local import LocalFirstTransport
from agentpost.outbound.transports import DEFERRED, SENT, Envelope, HandOff, Outcome
from tests.helpers import execute as _execute
from tests.helpers import query
from tests.test_outbound_queue import _clock, _dsn, _enqueue, _sent_message, _worker
from tests.test_outbound_worker_more import _until

DOMAIN = "partial.example"


@pytest.fixture
def server(server):
    """The running service without its own queue worker (as tests/test_outbound_queue)."""
    pytest_twisted.blockon(defer.ensureDeferred(server.core.outbound.stop()))
    return server


class Remote:
    """A test-owned remote transport: raises or hangs as scripted, else sends."""

    name = "fake-remote"

    def __init__(self, *script: Any) -> None:
        self.script = list(script)  # per call: an exception, "hang", or nothing (sent)
        self.calls: list[tuple[str, ...]] = []
        self.pending: list[defer.Deferred[HandOff]] = []

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        self.calls.append(envelope.recipients)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        if step == "hang":
            d: defer.Deferred[HandOff] = defer.Deferred()
            self.pending.append(d)
            return await d
        return HandOff([Outcome(r, SENT, 250, "2.0.0", "ok") for r in envelope.recipients])


class DomainDeletedMidHandOff:
    """The service's Router; before it resolves ``address`` the first time, another
    transaction deletes the hosted domain (so that address is not hosted any more)."""

    def __init__(self, router: Any, dsn: str, address: str) -> None:
        self._router = router
        self._dsn = dsn
        self._address = address
        self.fired = False

    async def resolve(self, address: str, sender: str) -> Any:
        if address == self._address and not self.fired:
            self.fired = True
            await threads.deferToThread(_execute, self._dsn,
                                        "DELETE FROM domains WHERE name = %s", (DOMAIN,))
        return await self._router.resolve(address, sender)


async def _keeper(server) -> dict[str, Any]:
    """An inbox on the organization's own verified domain DOMAIN."""
    _, key = await server.new_org("Keeper")
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "keeper"},
                                   key=key)).json
    _execute(_dsn(server), "INSERT INTO domains (org_id, id, environment_id, name, "
             "created_at, verified_at) SELECT org_id, 'dom_partial', environment_id, %s, "
             "now(), now() FROM inboxes WHERE id = %s", (DOMAIN, inbox["id"]))
    _execute(_dsn(server), "UPDATE inboxes SET domain = %s, email = %s WHERE id = %s",
             (DOMAIN, f"keeper@{DOMAIN}", inbox["id"]))
    return {**inbox, "email": f"keeper@{DOMAIN}"}


def _states(server, queue_id: str) -> dict[str, tuple[str, str | None, str | None]]:
    return {a: (s, c, d) for a, s, c, d in query(
        _dsn(server), "SELECT address, status, status_code, diagnostic "
        "FROM outbound_recipients WHERE queue_id = %s", (queue_id,))}


def _copies(server, inbox_id: str) -> int:
    return query(_dsn(server), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                 (inbox_id,))[0][0]


async def _mixed_row(server, remote: Remote, **transport_kw):
    """A queued row [keeper@DOMAIN, stranger@DOMAIN], a clock, and a transport whose
    router sees DOMAIN deleted between the two lookups: keeper local, stranger remote."""
    message, _, _ = await _sent_message(server, "partial-sender")
    keeper = await _keeper(server)
    stranger = f"stranger@{DOMAIN}"
    [queue_id] = await _enqueue(server, message, [keeper["email"], stranger])
    router = DomainDeletedMidHandOff(server.core.router, _dsn(server), stranger)
    clock = _clock()  # after the enqueue: the row is due
    transport = LocalFirstTransport(router, server.core.ingest, remote, hostname="mx.test",
                                    clock=clock, **transport_kw)
    return queue_id, keeper, stranger, transport, clock


@pytest_twisted.ensureDeferred
async def test_a_remote_transport_error_defers_only_the_remote_recipients(server):
    remote = Remote(RuntimeError("transport bug"))
    queue_id, keeper, stranger, transport, clock = await _mixed_row(server, remote)
    worker = _worker(server, transport, clock)

    assert await worker.drain() == 1
    states = _states(server, queue_id)
    assert states[keeper["email"]] == ("sent", "2.0.0", "delivered locally")
    assert states[stranger] == ("deferred", "4.4.0", "transport error (RuntimeError)")
    assert _copies(server, keeper["id"]) == 1

    clock.advance(60)  # the retry schedule's first step (tests/test_outbound_queue)
    assert await worker.drain() == 1
    assert {a: s for a, (s, _, _) in _states(server, queue_id).items()} == {
        keeper["email"]: "sent", stranger: "sent"}
    # the retry hands off the deferred recipient alone: keeper is not sent again,
    # neither through ingest nor (its domain now not hosted) through the relay
    assert remote.calls == [(stranger,), (stranger,)]
    assert _copies(server, keeper["id"]) == 1
    [(raw_key,)] = query(_dsn(server), "SELECT raw_blob_key FROM messages "
                         "WHERE inbox_id = %s", (keeper["id"],))
    stored = email.message_from_bytes(await server.core.blobs.get_bytes(raw_key),
                                      policy=email.policy.default)
    assert stored["Subject"] == "outbound"


@pytest_twisted.ensureDeferred
async def test_a_remote_part_past_its_deadline_keeps_the_local_outcomes(server):
    """``remote_deadline_s`` below the worker's hand-off deadline: the hand-off answers
    in time, so the worker records the local delivery instead of deferring everyone."""
    remote = Remote("hang")
    queue_id, keeper, stranger, transport, clock = await _mixed_row(
        server, remote, remote_deadline_s=20.0)
    worker = _worker(server, transport, clock, handoff_timeout_s=30.0)
    round_ = defer.ensureDeferred(worker.drain_once())
    await _until(lambda: remote.pending)
    assert remote.pending and _copies(server, keeper["id"]) == 1
    clock.advance(19.0)
    assert not round_.called
    clock.advance(1.0)
    assert await round_ == 1
    states = _states(server, queue_id)
    assert states[keeper["email"]][0] == "sent"
    assert states[stranger][:2] == ("deferred", "4.4.1")
    remote.pending[0].callback(HandOff([Outcome(stranger, SENT)]))  # too late: ignored
    assert _states(server, queue_id)[stranger][0] == "deferred"
    assert clock.getDelayedCalls() == []

    clock.advance(60)
    assert await worker.drain_once() == 1
    assert remote.calls == [(stranger,), (stranger,)]
    assert _copies(server, keeper["id"]) == 1
    assert _states(server, queue_id)[stranger][0] == "sent"


@pytest_twisted.ensureDeferred
async def test_a_cancelled_remote_part_is_not_turned_into_a_success(server):
    message, inbox, _ = await _sent_message(server, "cancelled")
    remote = Remote(defer.CancelledError())
    transport = LocalFirstTransport(server.core.router, server.core.ingest, remote,
                                    hostname="mx.test", clock=_clock())
    envelope = Envelope("obq_cancelled", message.org_id, inbox["email"],
                        (inbox["email"], "far@remote.example"), message.message_id)
    raw = b"From: <a@b.test>\r\nSubject: cancelled\r\n\r\nhi\r\n"
    with pytest.raises(defer.CancelledError):
        await transport.send(envelope, raw)
    assert remote.calls == [("far@remote.example",)]


@pytest_twisted.ensureDeferred
async def test_a_remote_error_alone_defers_its_recipients_with_the_workers_code(server):
    """No hosted recipient: the same outcome the worker gives a transport that raises."""
    message, inbox, _ = await _sent_message(server, "remote-only")
    remote = Remote(ValueError("unclassified"))
    transport = LocalFirstTransport(server.core.router, server.core.ingest, remote,
                                    hostname="mx.test", clock=_clock())
    envelope = Envelope("obq_remote_only", message.org_id, inbox["email"],
                        ("a@remote.example", "b@remote.example"), message.message_id)
    handoff = await transport.send(envelope, b"Subject: x\r\n\r\nhi\r\n")
    assert [(o.address, o.status, o.status_code, o.diagnostic) for o in handoff.outcomes] \
        == [(a, DEFERRED, "4.4.0", "transport error (ValueError)")
            for a in envelope.recipients]
