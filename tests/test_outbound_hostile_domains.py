"""Hostile review of domains (issue 11): deleting a domain while an inbox is being
created on it must never leave an inbox on a domain the organization no longer has.

The inbox creation is held between its domain check and its INSERT by a test-owned
connection that locks the environment row (the INSERT's foreign key check waits for
it), while the DELETE of the domain runs. Before the fix the DELETE counted no inbox,
removed the domain, and the inbox was created anyway.
"""

from __future__ import annotations

import time

import psycopg2
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread

from tests import test_domain_verify as verify_tests
from tests.helpers import query

zone = verify_tests.zone
key_file = verify_tests.key_file
dom_server = verify_tests.dom_server


def _dsn(server) -> str:
    return server.service.config.database.url


def _blocked_by(dsn: str, holder_pid: int, count: int, timeout_s: float = 20.0) -> bool:
    """Whether ``count`` backends wait for ``holder_pid``'s locks (polled until
    ``timeout_s``; the server's statements may run prepared, so not by their text)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = query(dsn, "SELECT count(*) FROM pg_stat_activity "
                     "WHERE %s = ANY(pg_blocking_pids(pid))", (holder_pid,))
        if rows[0][0] >= count:
            return True
        time.sleep(0.05)
    return False


@pytest_twisted.ensureDeferred
async def test_a_domain_deleted_while_an_inbox_is_created_on_it_never_orphans_it(
        dom_server):
    org, key = await dom_server.new_org()
    made = await dom_server.api.post("/api/v1/domains", {"name": "race.example"}, key=key)
    assert made.status == 201, made
    domain = made.json
    dsn = _dsn(dom_server)
    holder = psycopg2.connect(dsn)
    try:
        with holder.cursor() as cur:  # BEGIN (psycopg2 opens a transaction)
            cur.execute("SELECT pg_backend_pid()")
            holder_pid = cur.fetchone()[0]
            cur.execute("SELECT 1 FROM environments WHERE org_id = %s AND id = %s "
                        "FOR UPDATE", (org["id"], domain["environment_id"]))
        creating = defer.ensureDeferred(dom_server.api.post(
            "/api/v1/inboxes", {"username": "agent", "domain": "race.example"}, key=key))
        assert await deferToThread(_blocked_by, dsn, holder_pid, 1)
        deleting = defer.ensureDeferred(
            dom_server.api.delete(f"/api/v1/domains/{domain['id']}", key=key))
        # Let the DELETE run as far as it can (to its end, before the fix).
        await task.deferLater(_reactor, 1.0, lambda: None)
    finally:
        holder.rollback()
        holder.close()
    created, deleted = await creating, await deleting
    orphans = query(dsn, "SELECT count(*) FROM inboxes i WHERE i.domain = 'race.example' "
                    "AND NOT EXISTS (SELECT 1 FROM domains d WHERE d.org_id = i.org_id "
                    "AND d.name = i.domain)")
    assert orphans == [(0,)], (created, deleted)
    assert (created.status, deleted.status) in ((201, 409), (400, 204)), (created, deleted)


@pytest_twisted.ensureDeferred
async def test_a_stale_name_taken_over_while_its_holder_adds_an_inbox_never_orphans_it(
        dom_server):
    """The release of a stale unverified registration (another organization claims the
    name) and the holder's new inbox on it: either the inbox commits first and the name
    stays taken (409), or the release wins and the inbox is refused -- never an inbox of
    one tenant on a name another one then verifies (the MX routes by address)."""
    holder_org, holder = await dom_server.new_org("Holder")
    _, claimant = await dom_server.new_org("Claimant")
    made = await dom_server.api.post("/api/v1/domains", {"name": "stale-race.example"},
                                     key=holder)
    assert made.status == 201, made
    domain = made.json
    dsn = _dsn(dom_server)
    verify_tests._execute(dsn, "UPDATE domains SET created_at = created_at - interval "
                          "'8 days' WHERE id = %s", (domain["id"],))
    locker = psycopg2.connect(dsn)
    try:
        with locker.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            locker_pid = cur.fetchone()[0]
            cur.execute("SELECT 1 FROM environments WHERE org_id = %s AND id = %s "
                        "FOR UPDATE", (holder_org["id"], domain["environment_id"]))
        creating = defer.ensureDeferred(dom_server.api.post(
            "/api/v1/inboxes", {"username": "agent", "domain": "stale-race.example"},
            key=holder))
        assert await deferToThread(_blocked_by, dsn, locker_pid, 1)
        claiming = defer.ensureDeferred(dom_server.api.post(
            "/api/v1/domains", {"name": "stale-race.example"}, key=claimant))
        await task.deferLater(_reactor, 1.0, lambda: None)
    finally:
        locker.rollback()
        locker.close()
    created, claimed = await creating, await claiming
    orphans = query(dsn, "SELECT count(*) FROM inboxes i WHERE i.domain = "
                    "'stale-race.example' AND NOT EXISTS (SELECT 1 FROM domains d "
                    "WHERE d.org_id = i.org_id AND d.name = i.domain)")
    assert orphans == [(0,)], (created, claimed)
    assert (created.status, claimed.status) in ((201, 409), (400, 201)), (created, claimed)
