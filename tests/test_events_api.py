"""GET /api/v1/events: the replayable event log (issue 13) -- cursor paging, filters,
scope, environment restriction and tenancy; and the commit-order bound that keeps a
late-committing writer from slipping behind a cursor."""

from __future__ import annotations

import psycopg2
import pytest_twisted

from agentpost.core.events import envelope
from agentpost.model.ids import new_id
from tests.mailfactory import make_message


async def _inbox(server, key, username):
    made = await server.api.post("/api/v1/inboxes", {"username": username}, key=key)
    assert made.status == 201, made
    return made.json


async def _receive(server, inbox, n, tag="m"):
    for i in range(n):
        await server.deliver(make_message(to=inbox["email"], subject=f"{tag}{i}",
                                          msgid=f"<{tag}{i}-{inbox['id']}@x>"), [inbox["email"]])


@pytest_twisted.ensureDeferred
async def test_a_client_replays_everything_after_its_cursor_in_order(server):
    _, owner = await server.new_org()
    a = await _inbox(server, owner, "ev-a")
    b = await _inbox(server, owner, "ev-b")
    await _receive(server, a, 3, "a")
    await _receive(server, b, 2, "b")
    api = server.api
    everything = await api.get("/api/v1/events?types=message.received", key=owner)
    assert everything.status == 200, everything
    got = everything.json["data"]
    assert len(got) == 5
    for e in got:
        assert set(e) == {"id", "type", "timestamp", "org_id", "env_id", "data"}
        assert e["id"].startswith("evt_") and e["timestamp"].endswith("Z")
        assert e["type"] == "message.received" and e["env_id"].startswith("env_")
    # Page through with limit=2: the same events, the same order, nothing twice.
    seen, after = [], None
    while True:
        url = "/api/v1/events?types=message.received&limit=2" + (
            f"&after={after}" if after else "")
        page = (await api.get(url, key=owner)).json
        seen += [e["id"] for e in page["data"]]
        if not page["data"]:
            assert page["next_after"] == after
            break
        after = page["next_after"]
    assert seen == [e["id"] for e in got]
    # After the last one there is nothing; a new event shows up after that cursor.
    await _receive(server, a, 1, "late")
    newer = (await api.get(f"/api/v1/events?types=message.received&after={seen[-1]}",
                           key=owner)).json["data"]
    assert len(newer) == 1 and newer[0]["id"] not in seen
    # Filters: inbox, types.
    only_b = (await api.get(f"/api/v1/events?inbox_id={b['id']}&types=message.received",
                            key=owner)).json["data"]
    assert len(only_b) == 2
    assert (await api.get("/api/v1/events?types=message.nonsense", key=owner)).status == 400
    assert (await api.get("/api/v1/events?after=msg_nope", key=owner)).status == 400
    assert (await api.get("/api/v1/events?limit=0", key=owner)).status == 400


@pytest_twisted.ensureDeferred
async def test_events_of_another_org_are_invisible_and_the_scope_is_required(server):
    _, owner = await server.new_org("one")
    _, other = await server.new_org("two")
    mine = await _inbox(server, owner, "ev-mine")
    theirs = await _inbox(server, other, "ev-theirs")
    await _receive(server, mine, 1)
    await _receive(server, theirs, 2)
    api = server.api
    my_events = (await api.get("/api/v1/events", key=owner)).json["data"]
    their_events = (await api.get("/api/v1/events", key=other)).json["data"]
    assert {e["org_id"] for e in my_events} == {my_events[0]["org_id"]}
    assert not {e["id"] for e in my_events} & {e["id"] for e in their_events}
    # Their inbox as a filter, or their event as my cursor, shows me nothing of theirs.
    assert (await api.get(f"/api/v1/events?inbox_id={theirs['id']}",
                          key=owner)).json["data"] == []
    via_cursor = (await api.get(f"/api/v1/events?after={their_events[0]['id']}",
                                key=owner)).json["data"]
    assert all(e["org_id"] == my_events[0]["org_id"] for e in via_cursor)
    # A key without events:read is refused; a member key may have it.
    narrow = await api.post("/api/v1/api-keys", {"name": "n", "scopes": ["inboxes:read"]},
                            key=owner)
    refused = await api.get("/api/v1/events", key=narrow.json["key"])
    assert refused.status == 403 and refused.json["error"]["missing_scope"] == "events:read"
    member = await api.post("/api/v1/api-keys", {"name": "m", "role": "member",
                                                 "scopes": ["events:read"]}, key=owner)
    assert member.status == 201, member
    assert (await api.get("/api/v1/events", key=member.json["key"])).status == 200


@pytest_twisted.ensureDeferred
async def test_an_environment_confined_key_sees_only_its_environments(server):
    _, owner = await server.new_org()
    api = server.api
    default_env = (await api.get("/api/v1/environments", key=owner)).json["data"][0]["id"]
    other_env = await api.post("/api/v1/environments", {"name": "staging"}, key=owner)
    assert other_env.status == 201, other_env
    staging = other_env.json["id"]
    prod_inbox = await _inbox(server, owner, "ev-prod")
    st = await api.post("/api/v1/inboxes", {"username": "ev-stage", "environment_id": staging},
                        key=owner)
    assert st.status == 201, st
    await _receive(server, prod_inbox, 1)
    await _receive(server, st.json, 1, "s")
    confined = await api.post("/api/v1/api-keys", {
        "name": "c", "environment_ids": [staging], "scopes": ["events:read"]}, key=owner)
    assert confined.status == 201, confined
    seen = (await api.get("/api/v1/events", key=confined.json["key"])).json["data"]
    assert seen and all(e["env_id"] == staging for e in seen)
    everything = (await api.get("/api/v1/events", key=owner)).json["data"]
    assert any(e["env_id"] == default_env for e in everything)


def test_a_writer_that_commits_late_cannot_slip_behind_a_cursor(db_dsn):
    """Two transactions insert events; the one with the smaller id commits last. A
    reader polling in between must not be handed the later one before the earlier one
    is visible (the txid bound of storage/events.py)."""
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    cur = conn.cursor()
    org = new_id("org")
    cur.execute("INSERT INTO organizations (id, name, tier, created_at, updated_at) "
                "VALUES (%s, 'x', 'free', now(), now())", (org,))
    slow, fast = psycopg2.connect(db_dsn), psycopg2.connect(db_dsn)
    first, second = new_id("evt"), new_id("evt")
    ins = ("INSERT INTO events (org_id, id, type, data, created_at) "
           "VALUES (%s, %s, 'message.received', '{}', now())")
    slow.cursor().execute(ins, (org, first))   # begun, not committed
    fast.cursor().execute(ins, (org, second))
    fast.commit()
    sql = ("SELECT id FROM events WHERE org_id = %s "
           "AND txid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY txid, seq")
    cur.execute(sql, (org,))
    assert cur.fetchall() == []  # the committed one waits for the older writer
    slow.commit()
    cur.execute(sql, (org,))
    assert [r[0] for r in cur.fetchall()] == [first, second]
    for c in (slow, fast, conn):
        c.close()


def test_the_envelope_has_the_documented_shape():
    from datetime import UTC, datetime
    row = {"id": "evt_01JQ8X5K2M3N4P5R6S7T8V9W00", "type": "message.received",
           "created_at": datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC),
           "org_id": "org_x", "environment_id": "env_y", "data": {"a": 1}}
    assert envelope(row) == {"id": row["id"], "type": "message.received",
                             "timestamp": "2026-01-02T03:04:05.123Z", "org_id": "org_x",
                             "env_id": "env_y", "data": {"a": 1}}


@pytest_twisted.ensureDeferred
async def test_events_older_than_retention_are_swept(server, db_dsn):
    org, owner = await server.new_org()
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    old, fresh = new_id("evt"), new_id("evt")
    with conn.cursor() as cur:
        for event_id, age in ((old, "31 days"), (fresh, "1 day")):
            cur.execute("INSERT INTO events (org_id, id, type, data, created_at) VALUES "
                        "(%s, %s, 'domain.verified', '{}', now() - %s::interval)",
                        (org["id"], event_id, age))
    conn.close()
    # The server's own sweep runs at start; one in progress holds the one-sweeper lock
    # and ours would find it taken and do nothing: let it finish and stop its timer.
    await server.core.retention.stop()
    await server.core.retention.sweep_once()
    left = [e["id"] for e in (await server.api.get("/api/v1/events", key=owner)).json["data"]]
    assert fresh in left and old not in left
