"""The audit trail: every API request, allowed or denied, leaves a row."""

import pytest_twisted
from twisted.internet import task

from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from tests.helpers import query


@pytest_twisted.ensureDeferred
async def test_allowed_and_denied_requests_are_audited(server, db_dsn):
    """A change, a read, a scope denial and a bad key each leave one row with the right outcome."""
    org, owner = await server.new_org()
    ro = (await server.api.post("/api/v1/api-keys", {"scopes": ["inboxes:read"]},
                                key=owner)).json
    made = await server.api.post("/api/v1/inboxes", {"username": "audited"}, key=owner)
    await server.api.get("/api/v1/inboxes", key=owner)
    await server.api.post("/api/v1/inboxes", {"username": "denied"}, key=ro["key"])
    await server.api.get("/api/v1/inboxes", key="ap_sk_" + "Z" * 43)
    await server.core.audit.flush()

    rows = query(db_dsn, "SELECT action, outcome, status, actor_type, actor_id, target_id, "
                 "org_id, environment_id, remote_addr, request_id FROM audit_log ORDER BY id")
    by_action = {}
    for row in rows:
        by_action.setdefault((row[0], row[1]), []).append(row)
    create = by_action[("inboxes.create", "allowed")][0]
    owner_key_id = (await server.api.get("/api/v1/api-keys", key=owner)).json["data"][-1]["id"]
    assert create[2:8] == (201, "api_key", owner_key_id, made.json["id"], org["id"],
                           org["default_environment_id"])
    assert create[8] == "127.0.0.1" and create[9].startswith("req_")
    assert ("inboxes.list", "allowed") in by_action
    denied = by_action[("inboxes.create", "denied")][0]
    assert denied[2] == 403 and denied[4] == ro["id"]
    anonymous = [r for r in rows if r[3] == "anonymous"]
    assert anonymous and anonymous[0][1] == "denied" and anonymous[0][2] == 401

    # The organization reads its own trail through the API, filtered.
    listed = await server.api.get("/api/v1/audit-logs?action=inboxes.*", key=owner)
    actions = {(e["action"], e["outcome"]) for e in listed.json["data"]}
    assert {("inboxes.create", "allowed"), ("inboxes.create", "denied"),
            ("inboxes.list", "allowed")} <= actions
    by_actor = await server.api.get(f"/api/v1/audit-logs?actor_id={ro['id']}", key=owner)
    assert {e["actor"]["id"] for e in by_actor.json["data"]} == {ro["id"]}
    future = await server.api.get("/api/v1/audit-logs?since=2999-01-01T00:00:00Z", key=owner)
    assert future.json["data"] == []


@pytest_twisted.ensureDeferred
async def test_a_change_and_its_audit_row_commit_together(server, db_dsn):
    """A refused change (conflict) leaves no 'allowed' row; the accepted one leaves exactly one."""
    _, owner = await server.new_org()
    await server.api.post("/api/v1/inboxes", {"username": "once"}, key=owner)
    clash = await server.api.post("/api/v1/inboxes", {"username": "once"}, key=owner)
    assert clash.status == 409
    await server.core.audit.flush()
    rows = query(db_dsn, "SELECT outcome, status FROM audit_log WHERE action = 'inboxes.create' "
                 "ORDER BY id")
    assert rows == [("allowed", 201), ("failed", 409)]
    inboxes = query(db_dsn, "SELECT count(*) FROM inboxes")
    assert inboxes == [(1,)]


@pytest_twisted.ensureDeferred
async def test_buffered_rows_survive_a_failed_flush_and_a_clean_shutdown(db_dsn):
    """Rows buffered while the database is unreachable are written by the next flush."""
    from twisted.internet import reactor

    from agentpost.storage.database import Database

    clock = task.Clock()
    bad = Database("host=127.0.0.1 port=1 dbname=none connect_timeout=1", clock=reactor,
                   reactor=reactor, pool_size=1, connect_timeout_s=1)
    trail = AuditTrail(bad, clock, 0.1, 100)
    trail.enqueue(RequestContext("req_1", "127.0.0.1", "inboxes.list"), "allowed", 200)
    await trail.flush()
    assert trail.pending == 1  # kept for the next attempt

    good = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=1)
    trail2 = AuditTrail(good, clock, 0.1, 100)
    trail2.start()
    trail2.enqueue(RequestContext("req_2", "127.0.0.1", "inboxes.get"), "denied", 404)
    clock.advance(0.1)  # the periodic flush fires on the injected clock
    await trail2.stop()  # and a clean stop writes whatever is left
    await good.close()
    await bad.close()
    assert trail2.pending == 0
    assert query(db_dsn, "SELECT action, outcome FROM audit_log") == [("inboxes.get", "denied")]
