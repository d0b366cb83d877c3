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


def _ctx(request_id: str, action: str = "inboxes.get", **kw) -> RequestContext:
    return RequestContext(request_id, "127.0.0.1", action, **kw)


@pytest_twisted.ensureDeferred
async def test_one_unwritable_row_never_blocks_the_rows_behind_it(db_dsn):
    """A NUL is written as U+FFFD; a row PostgreSQL refuses anyway is quarantined alone
    (counted, logged), and every other row of its batch is still written."""
    from twisted.internet import reactor

    from agentpost.storage.database import Database

    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=1)
    trail = AuditTrail(db, task.Clock(), 0.1, 100)
    trail.enqueue(_ctx("req_nul", target_id="inb_\x00x", details={"note": "a\x00\ud800"}),
                  "denied", 404)
    trail.enqueue(_ctx("req_bad"), "no-such-outcome", 400)  # fails the CHECK constraint
    trail.enqueue(_ctx("req_ok", "inboxes.list"), "allowed", 200)
    await trail.flush()
    assert (trail.pending, trail.sanitised, trail.quarantined) == (0, 1, 1)
    trail.enqueue(_ctx("req_after", "inboxes.list"), "allowed", 200)
    await trail.stop()
    await db.close()
    rows = query(db_dsn, "SELECT request_id, target_id, details->>'note' FROM audit_log "
                 "ORDER BY request_id")
    assert rows == [("req_after", None, None), ("req_nul", "inb_\ufffdx", "a\ufffd\ufffd"),
                    ("req_ok", None, None)]


@pytest_twisted.ensureDeferred
async def test_rows_wait_bounded_while_the_database_is_away(server, pg, db_dsn):
    """PostgreSQL away: rows stay buffered (the oldest dropped past capacity, counted) and
    are written by the first flush after it returns."""
    trail = AuditTrail(server.core.db, task.Clock(), 0.1, max_buffer=2, capacity=4)
    pg.stop()
    try:
        for i in range(1, 7):
            trail.enqueue(_ctx(f"req_{i}", "test.away"), "allowed", 200)
        await trail.flush()
        assert (trail.pending, trail.dropped, trail.quarantined) == (4, 2, 0)
    finally:
        pg.start()
    await trail.flush()
    assert trail.pending == 0
    rows = query(db_dsn, "SELECT request_id FROM audit_log WHERE action = 'test.away' "
                 "ORDER BY request_id")
    assert rows == [("req_3",), ("req_4",), ("req_5",), ("req_6",)]


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_waits_for_the_last_rows(db_dsn, openapi_checker):
    """Rows still buffered at shutdown (one of them unwritable as it came) are written
    before stopService's Deferred fires."""
    from tests.conftest import make_config, start_server

    running = await start_server(make_config(db_dsn, audit={"flush_interval": "1h"}),
                                 openapi_checker)
    _, owner = await running.new_org()
    running.core.audit.enqueue(_ctx("req_poison", target_id="inb_\x00x"), "denied", 404)
    for _ in range(3):
        assert (await running.api.get("/api/v1/inboxes", key=owner)).status == 200
    assert running.core.audit.pending == 4
    await running.service.stopService()
    rows = query(db_dsn, "SELECT action, count(*) FROM audit_log "
                 "WHERE action IN ('inboxes.list', 'inboxes.get') GROUP BY action ORDER BY 1")
    assert rows == [("inboxes.get", 1), ("inboxes.list", 3)]


@pytest_twisted.ensureDeferred
async def test_an_environment_restricted_key_reads_only_its_environments_rows(server):
    """Its environments' rows, and of the rows with no environment (organization-level
    actions, refusals whose target never resolved) only its own; organization-wide keys
    read everything."""
    org, owner = await server.new_org()
    api = server.api
    env_a = org["default_environment_id"]
    env_b = (await api.post("/api/v1/environments", {"name": "B"}, key=owner)).json["id"]
    scopes = ["audit:read", "inboxes:read"]
    key_a = (await api.post("/api/v1/api-keys", {"environment_ids": [env_a], "scopes": scopes},
                            key=owner)).json
    key_b = (await api.post("/api/v1/api-keys", {"environment_ids": [env_b], "scopes": scopes},
                            key=owner)).json
    inbox_a = (await api.post("/api/v1/inboxes", {"username": "ay"}, key=owner)).json
    inbox_b = (await api.post("/api/v1/inboxes", {"username": "bee", "environment_id": env_b},
                              key=owner)).json
    # Refusals whose target is in no environment the caller may see: environment NULL.
    assert (await api.get(f"/api/v1/inboxes/{inbox_b['id']}", key=key_a["key"])).status == 404
    assert (await api.get(f"/api/v1/inboxes/{inbox_a['id']}", key=key_b["key"])).status == 404
    assert (await api.get("/api/v1/inboxes/inb_01HZZZZZZZZZZZZZZZZZZZZZZZ",
                          key=owner)).status == 404
    await server.core.audit.flush()

    seen_by_a = (await api.get("/api/v1/audit-logs?limit=100", key=key_a["key"])).json["data"]
    for row in seen_by_a:
        assert row["environment_id"] == env_a or (
            row["environment_id"] is None and row["actor"]["id"] == key_a["id"]), row
    targets = {(r["action"], r["target_id"], r["outcome"]) for r in seen_by_a}
    assert ("inboxes.create", inbox_a["id"], "allowed") in targets
    assert ("inboxes.get", inbox_b["id"], "failed") in targets  # its own refusal
    assert inbox_a["id"] not in {r["target_id"] for r in seen_by_a if r["outcome"] != "allowed"}
    assert "inb_01HZZZZZZZZZZZZZZZZZZZZZZZ" not in str(seen_by_a)
    assert key_b["id"] not in str(seen_by_a)  # neither its creation nor its requests

    everything = (await api.get("/api/v1/audit-logs?limit=100", key=owner)).json["data"]
    assert {("inboxes.get", inbox_a["id"]), ("inboxes.get", "inb_01HZZZZZZZZZZZZZZZZZZZZZZZ")} \
        <= {(r["action"], r["target_id"]) for r in everything}
