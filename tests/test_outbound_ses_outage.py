"""SES down for a while, then back: the mail waits in the queue on the retry schedule
and leaves exactly once when SES answers again; and the configured configuration set
is named in every SendEmail call (moto ignores it, so the fault proxy's record of the
wire is what proves it).

moto in server mode behind the test-owned fault proxy (tests/aws_faults.py), as in
tests/test_outbound_ses.py."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from tests.aws import ses_outbound
from tests.aws_faults import SEND_EMAIL
from tests.helpers import query
from tests.test_outbound_queue import _clock, _dsn, _enqueue, _recipients, _sent_message, _worker
from tests.test_outbound_ses import transports, wait_sent  # noqa: F401 - a fixture


@pytest.fixture
def server(server):
    """The running service without its own queue worker: the tests drive one of their
    own on a task.Clock."""
    pytest_twisted.blockon(defer.ensureDeferred(server.core.outbound.stop()))
    return server


def _state(server, queue_id):
    return query(_dsn(server), "SELECT q.status, r.status, r.status_code, r.transport_id "
                 "FROM outbound_queue q JOIN outbound_recipients r ON r.queue_id = q.id "
                 "WHERE q.id = %s", (queue_id,))[0]


@pytest.mark.parametrize("fault", [
    {"status": 503, "error_type": "ServiceUnavailable"},
    {"status": 500, "error_type": "InternalFailure"},
    {"mode": "drop"},
    {"mode": "delay", "delay_s": 1.5},
], ids=["503", "500", "connection-dropped", "read-timeout"])
@pytest_twisted.ensureDeferred
async def test_ses_down_keeps_mail_queued_until_it_is_back_then_it_leaves_once(
        server, ses_faults, ses_account, transports, fault):  # noqa: F811
    message, _, _ = await _sent_message(server, "patient")
    [queue_id] = await _enqueue(server, message, ["friend@example.org"])
    ses_faults.inject(SEND_EMAIL, count=2, **fault)  # down for two attempts
    clock = _clock()
    worker = _worker(server, transports(ses_faults.endpoint_url, clock,
                                        read_timeout_s=0.5), clock)

    assert await worker.drain_once() == 1
    queue_status, rcpt_status, code, transport_id = _state(server, queue_id)
    assert (rcpt_status, transport_id) == ("deferred", None) and code.startswith("4.")
    assert queue_status != "done"
    clock.advance(59)
    assert await worker.drain_once() == 0  # not before the first step of the schedule
    clock.advance(2)
    assert await worker.drain_once() == 1  # still down: deferred again
    assert _state(server, queue_id)[1] == "deferred"
    clock.advance(299)
    assert await worker.drain_once() == 0  # the second step is 5 minutes
    clock.advance(2)
    assert await worker.drain_once() == 1  # SES is back
    assert _recipients(server, queue_id) == {"friend@example.org": "sent"}
    sent = await task.deferLater(reactor, 0, ses_account.sent)
    [(ses_id, mail)] = sent.items()
    assert mail["source"] == "patient@agents.test"
    assert _state(server, queue_id) == ("done", "sent", "2.0.0", ses_id)
    assert ses_faults.attempts(SEND_EMAIL) == 3
    clock.advance(24 * 3600)
    assert await worker.drain_once() == 0  # nothing left, nothing twice
    assert len(await task.deferLater(reactor, 0, ses_account.sent)) == 1


@pytest_twisted.ensureDeferred
async def test_the_configured_configuration_set_is_named_in_every_send(
        db_dsn, openapi_checker, ses_faults, ses_account):
    """`[outbound] ses_configuration_set` reaches SendEmail's ConfigurationSetName (SES
    publishes the events of that set to SNS); without it the field is left out."""
    from tests.conftest import make_config, start_server

    def configured(name: str) -> dict:
        return ses_outbound(ses_faults.endpoint_url,
                            **({"ses_configuration_set": name} if name else {}))

    for name, username in (("agentpost-events", "withset"), ("", "withoutset")):
        running = await start_server(make_config(db_dsn, outbound=configured(name)),
                                     openapi_checker)
        try:
            message, _, _ = await _sent_message(running, username)
            [queue_id] = await _enqueue(running, message, ["friend@example.org"])
            await wait_sent(running, queue_id)
        finally:
            await running.service.stopService()
        request = json.loads(ses_faults.bodies(SEND_EMAIL)[-1])
        assert request["FromEmailAddress"] == f"{username}@agents.test"
        if name:
            assert request["ConfigurationSetName"] == name
        else:
            assert "ConfigurationSetName" not in request
