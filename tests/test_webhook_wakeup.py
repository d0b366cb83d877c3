"""Webhook workers are woken only by events that created deliveries (migration 0030):
mail to an organization without webhooks costs no process a claim or a next-due query."""

from __future__ import annotations

import select
import smtplib

import psycopg2
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.storage.webhooks import WAKEUP_CHANNEL
from tests.conftest import make_config, start_server
from tests.mailfactory import make_message


@pytest_twisted.async_yield_fixture
async def server(db_dsn, openapi_checker):
    """Loopback receivers allowed (the receiver fixture listens on 127.0.0.1)."""
    running = await start_server(make_config(db_dsn, webhooks={
        "allow_networks": ["127.0.0.0/8"]}), openapi_checker)
    yield running
    await running.service.stopService()


def _send(port: int, rcpt: str, subjects: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        for subject in subjects:
            smtp.sendmail("alice@example.com", [rcpt], make_message(subject=subject,
                                                                    body="x\n"))


class Listener:
    """A plain LISTEN connection, as every process's worker holds one."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.conn.cursor().execute(f"LISTEN {WAKEUP_CHANNEL}")

    def drain(self, wait_s: float) -> int:
        """Notices that arrive within ``wait_s`` seconds of quiet."""
        got = 0
        while select.select([self.conn], [], [], wait_s)[0]:
            self.conn.poll()
            got += len(self.conn.notifies)
            self.conn.notifies.clear()
        return got


@pytest_twisted.ensureDeferred
async def test_only_events_with_deliveries_wake_the_workers(server, db_dsn, receiver):
    listener = Listener(db_dsn)
    try:
        _, owner = await server.new_org()
        quiet = (await server.api.post("/api/v1/inboxes", {"username": "no-hooks"},
                                       key=owner)).json
        await deferToThread(_send, server.mx_port, quiet["email"], ["a", "b", "c"])
        assert await deferToThread(listener.drain, 0.5) == 0

        _, owner2 = await server.new_org()
        hooked = (await server.api.post("/api/v1/inboxes", {"username": "hooked"},
                                        key=owner2)).json
        hook = await server.api.post("/api/v1/webhooks", {
            "url": receiver.url, "event_types": ["message.received"]}, key=owner2)
        assert hook.status == 201, hook
        await deferToThread(_send, server.mx_port, hooked["email"], ["d"])
        assert await deferToThread(listener.drain, 0.5) >= 1
        # Still no wake-up for the organization without webhooks.
        await deferToThread(_send, server.mx_port, quiet["email"], ["e"])
        assert await deferToThread(listener.drain, 0.5) == 0
    finally:
        listener.conn.close()
