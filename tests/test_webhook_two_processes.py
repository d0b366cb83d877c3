"""Webhooks with two real server processes on one database (issue 13).

This process and a second ``agentpost serve`` (tests/second_process) both accept mail by
SMTP and both run webhook workers over the same queue. Every event must reach the
test-owned receiver exactly once, whichever process accepted the mail and whichever
claimed the delivery; and a receiver that was down gets every event once it is back.
"""

from __future__ import annotations

import smtplib
from collections import Counter

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS, make_config, start_server
from tests.helpers import execute, query
from tests.mailfactory import make_message
from tests.second_process import SecondProcess
from tests.webhook_receiver import wait_for

N = 40


@pytest_twisted.async_yield_fixture
async def server(db_dsn, openapi_checker):
    """This process: loopback receivers allowed, retries looked for often."""
    running = await start_server(make_config(db_dsn, webhooks={
        "allow_networks": ["127.0.0.0/8"], "poll_interval": "200ms"}), openapi_checker)
    yield running
    await running.service.stopService()


def _second(tmp_path, db_dsn, server) -> SecondProcess:
    """The other process: its own MX, the same master key (it must open the sealed
    webhook secrets to sign), loopback receivers allowed (development: http too)."""
    return SecondProcess(tmp_path, db_dsn, server, mx=True, extra=(
        '[server]\nenvironment = "development"\nhostname = "mx2.test"\n'
        '[webhooks]\nallow_networks = ["127.0.0.0/8"]\npoll_interval = "200ms"\n'
        f'[secrets]\nkey_file = "{_DEV_TLS["secrets_key"]}"\n'))


def _send(port: int, rcpt: str, subjects: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        for subject in subjects:
            smtp.sendmail("alice@example.com", [rcpt], make_message(subject=subject,
                                                                    body="x\n"))


async def _split_send(server, second, rcpt: str, tag: str) -> None:
    """N messages, half through each process's MX, both at once."""
    half = N // 2
    await defer.gatherResults([
        deferToThread(_send, server.mx_port, rcpt, [f"{tag} a{n}" for n in range(half)]),
        deferToThread(_send, second.mx_port, rcpt,
                      [f"{tag} b{n}" for n in range(N - half)])])


def _settled(dsn: str, hook_id: str) -> bool:
    """All N deliveries of the endpoint exist and have succeeded (none can be sent
    again: a succeeded row is never claimed)."""
    return query(dsn, "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) "
                      "FROM webhook_deliveries WHERE webhook_id = %s", (hook_id,)) == [(N, N)]


async def _setup(server, receiver, username):
    org, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username},
                                   key=owner)).json
    hook = await server.api.post("/api/v1/webhooks", {
        "url": receiver.url, "event_types": ["message.received"]}, key=owner)
    assert hook.status == 201, hook
    return org, inbox, hook.json


def _events(dsn: str, org_id: str) -> list[str]:
    return sorted(r[0] for r in query(
        dsn, "SELECT id FROM events WHERE org_id = %s AND type = 'message.received'",
        (org_id,)))


async def _run(second: SecondProcess, body) -> None:
    """Run ``body`` with the second process up; its output must show no traceback."""
    try:
        assert await deferToThread(second.ready), "second process did not start"
        await body()
    except BaseException:
        print(second.stop())
        raise
    out = second.stop()
    assert "Traceback" not in out, out


@pytest_twisted.ensureDeferred
async def test_each_event_reaches_the_endpoint_once_with_two_processes(
        server, receiver, db_dsn, tmp_path):
    org, inbox, hook = await _setup(server, receiver, "twice")
    second = _second(tmp_path, db_dsn, server)

    async def body() -> None:
        await _split_send(server, second, inbox["email"], "both")
        await wait_for(lambda: _settled(db_dsn, hook["id"]), tries=3000)
        await task.deferLater(reactor, 1.0, lambda: None)  # room for a stray duplicate

    await _run(second, body)
    hits = Counter(receiver.ids())
    assert sorted(hits) == _events(db_dsn, org["id"]) and len(hits) == N
    assert set(hits.values()) == {1}, [k for k, v in hits.items() if v > 1]
    # One attempt each, recorded once.
    assert query(db_dsn, "SELECT count(*), count(DISTINCT delivery_id) FROM webhook_attempts "
                         "WHERE webhook_id = %s", (hook["id"],)) == [(N, N)]


@pytest_twisted.ensureDeferred
async def test_a_receiver_down_then_up_gets_every_event_from_the_other_process(
        server, receiver, db_dsn, tmp_path):
    """Only the second process delivers here (this one's worker is stopped), so the
    mail accepted by this process reaches the receiver through the other one."""
    await server.core.webhook_worker.stop()
    org, inbox, hook = await _setup(server, receiver, "downup")
    port = receiver.port_number
    await receiver.stop()  # connections refused
    second = _second(tmp_path, db_dsn, server)

    def first_attempts_failed() -> bool:
        return query(db_dsn, "SELECT count(*) FROM webhook_attempts WHERE webhook_id = %s "
                             "AND status_code IS NULL", (hook["id"],)) == [(N,)]

    async def body() -> None:
        await _split_send(server, second, inbox["email"], "down")
        await wait_for(first_attempts_failed, tries=3000)
        receiver.start(port)  # back up
        # The first retry is 30 s away; pass that time in the database instead of
        # waiting it out (the schedule itself is tested on a task.Clock).
        query_commit(db_dsn, "UPDATE webhook_deliveries SET next_attempt_at = now() "
                             "WHERE webhook_id = %s AND status = 'pending'", (hook["id"],))
        await wait_for(lambda: _settled(db_dsn, hook["id"]), tries=3000)
        await task.deferLater(reactor, 1.0, lambda: None)

    await _run(second, body)
    hits = Counter(receiver.ids())
    assert sorted(hits) == _events(db_dsn, org["id"]) and len(hits) == N
    assert set(hits.values()) == {1}
    assert query(db_dsn, "SELECT attempt, count(*) FROM webhook_attempts WHERE webhook_id = %s "
                         "GROUP BY attempt ORDER BY attempt", (hook["id"],)) == [(1, N), (2, N)]


#: One committed statement (the test's stand-in for time passing).
query_commit = execute
