"""Per-attempt history of webhook deliveries (issue 13): one row per attempt, listed at
GET /webhooks/{id}/deliveries/{delivery_id}/attempts, counted in the delivery's JSON,
kept across replays, scoped to the organization (a foreign id is 404 and changes
nothing), and swept by retention."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta

import psycopg2
import pytest_twisted

from agentpost.webhooks.worker import RETRY_DELAYS_S
from tests.helpers import query

# Fixtures and helpers of the delivery tests: the server allowed to call loopback, a
# receiver, and a worker on a task.Clock.
from tests.test_webhook_delivery import _hook, rig, server  # noqa: F401


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _deliveries(server, key, hook_id):  # noqa: F811 - the fixture's name
    got = await server.api.get(f"/api/v1/webhooks/{hook_id}/deliveries", key=key)
    assert got.status == 200, got
    return got.json["data"]


async def _attempts(server, key, hook_id, delivery_id, **params):  # noqa: F811
    qs = "&".join(f"{k}={v}" for k, v in params.items())
    return await server.api.get(
        f"/api/v1/webhooks/{hook_id}/deliveries/{delivery_id}/attempts"
        + (f"?{qs}" if qs else ""), key=key)


@pytest_twisted.ensureDeferred
async def test_a_delivery_that_fails_twice_then_succeeds_lists_three_attempts(
        server, rig, receiver):  # noqa: F811
    org, owner = await server.new_org()
    receiver.script = [500, 503]  # then the default 200
    hook = await _hook(server, owner, receiver.url)
    await rig.event(org["id"])
    rig.worker.kick()
    await rig.settle()
    await rig.advance(RETRY_DELAYS_S[0])
    await rig.advance(RETRY_DELAYS_S[1])
    assert len(receiver.requests) == 3
    [delivery] = await _deliveries(server, owner, hook["id"])
    assert delivery["status"] == "succeeded" and delivery["attempt"] == 3
    assert delivery["attempts"] == 3

    got = await _attempts(server, owner, hook["id"], delivery["id"])
    assert got.status == 200, got
    rows = got.json["data"]
    assert got.json["next_page_token"] is None
    assert [(r["attempt"], r["status_code"]) for r in rows] == [(3, 200), (2, 503), (1, 500)]
    assert all(r["delivery_id"] == delivery["id"] and r["webhook_id"] == hook["id"]
               for r in rows)
    assert rows[2]["error"] == "HTTP 500: ok" and rows[1]["error"] == "HTTP 503: ok"
    assert rows[0]["error"] is None
    assert all(r["response_body"] == "ok" for r in rows)
    assert all(r["latency_ms"] >= 0 for r in rows)
    # Times are the injected clock's: each retry started when its predecessor said.
    first, second, third = (_at(r["started_at"]) for r in reversed(rows))
    assert _at(rows[2]["next_retry_at"]) == second == first + timedelta(
        seconds=RETRY_DELAYS_S[0])
    assert _at(rows[1]["next_retry_at"]) == third == second + timedelta(
        seconds=RETRY_DELAYS_S[1])
    assert rows[0]["next_retry_at"] is None

    # Pages of two, then the rest.
    page1 = await _attempts(server, owner, hook["id"], delivery["id"], limit=2)
    assert [r["attempt"] for r in page1.json["data"]] == [3, 2]
    token = page1.json["next_page_token"]
    assert token
    page2 = await _attempts(server, owner, hook["id"], delivery["id"], limit=2,
                            page_token=token)
    assert [r["attempt"] for r in page2.json["data"]] == [1]
    assert page2.json["next_page_token"] is None

    # A replay adds to the history (its schedule starts again at attempt 1).
    replayed = await server.api.post(
        f"/api/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/replay", key=owner)
    assert replayed.status == 202, replayed
    assert replayed.json["attempts"] == 3 and replayed.json["status"] == "pending"
    rig.worker.kick()
    await rig.settle()
    assert len(receiver.requests) == 4
    assert receiver.requests[-1][0]["x-agentpost-attempt"] == "1"
    [delivery] = await _deliveries(server, owner, hook["id"])
    assert delivery["attempts"] == 4 and delivery["status"] == "succeeded"
    rows = (await _attempts(server, owner, hook["id"], delivery["id"])).json["data"]
    assert [(r["attempt"], r["status_code"]) for r in rows] == [
        (1, 200), (3, 200), (2, 503), (1, 500)]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_receiver_leaves_attempts_without_a_status(
        server, rig, receiver):  # noqa: F811
    org, owner = await server.new_org()
    hook = await _hook(server, owner, receiver.url)
    await receiver.stop()  # connections are refused
    await rig.event(org["id"])
    rig.worker.kick()
    await rig.settle()
    [delivery] = await _deliveries(server, owner, hook["id"])
    [row] = (await _attempts(server, owner, hook["id"], delivery["id"])).json["data"]
    assert row["status_code"] is None and row["response_body"] is None
    assert "refused" in row["error"].lower() and len(row["error"]) <= 500
    assert row["next_retry_at"] is not None


@pytest_twisted.ensureDeferred
async def test_long_answers_are_kept_short(server, rig, receiver, monkeypatch):  # noqa: F811
    """The error text and the body excerpt are capped (and a NUL cannot break the row)."""
    org, owner = await server.new_org()
    hook = await _hook(server, owner, receiver.url)
    receiver.status = 500
    monkeypatch.setattr(type(receiver), "render_POST", _long_answer)
    await rig.event(org["id"])
    rig.worker.kick()
    await rig.settle()
    [delivery] = await _deliveries(server, owner, hook["id"])
    [row] = (await _attempts(server, owner, hook["id"], delivery["id"])).json["data"]
    assert row["status_code"] == 500
    assert len(row["response_body"]) <= 256 and "\x00" not in row["response_body"]
    assert len(row["error"]) <= 500 and "\x00" not in row["error"]


def _long_answer(self, request):
    self.requests.append(({}, request.content.read()))
    request.setResponseCode(500)
    return b"x\x00" * 5000


async def _org_with_delivery(server, rig, receiver, name):  # noqa: F811
    """An organization, its endpoint and one finished (succeeded) delivery."""
    org, key = await server.new_org(name)
    hook = await _hook(server, key, receiver.url)
    await rig.event(org["id"])
    rig.worker.kick()
    await rig.settle()
    [delivery] = await _deliveries(server, key, hook["id"])
    assert delivery["status"] == "succeeded"
    return org, key, hook, delivery


def _state(dsn):
    return query(dsn, "SELECT d.id, d.status, d.attempt, d.updated_at, "
                      "(SELECT count(*) FROM webhook_attempts a WHERE a.delivery_id = d.id) "
                      "FROM webhook_deliveries d ORDER BY d.id")


@pytest_twisted.ensureDeferred
async def test_another_orgs_delivery_is_not_found_and_nothing_changes(
        server, rig, receiver):  # noqa: F811
    org_a, key_a, hook_a, delivery_a = await _org_with_delivery(server, rig, receiver, "A")
    _, key_b, hook_b, delivery_b = await _org_with_delivery(server, rig, receiver, "B")
    before, sent = _state(rig.dsn), len(receiver.requests)
    probes = [
        (key_b, hook_b["id"], delivery_a["id"]),  # A's real delivery under B's endpoint
        (key_b, hook_a["id"], delivery_a["id"]),  # B's key on A's endpoint and delivery
        (key_a, hook_a["id"], delivery_b["id"]),  # B's delivery under A's own endpoint
    ]
    # A second endpoint of A's: A's delivery under the wrong (own) endpoint is 404 too.
    other_a = await _hook(server, key_a, receiver.url, event_types=["message.sent"])
    probes.append((key_a, other_a["id"], delivery_a["id"]))
    # A key of A's confined to another environment does not see the org-wide endpoint.
    staging = (await server.api.post("/api/v1/environments", {"name": "staging"},
                                     key=key_a)).json
    confined = (await server.api.post("/api/v1/api-keys", {
        "name": "c", "environment_ids": [staging["id"]],
        "scopes": ["webhooks:read", "webhooks:write"]}, key=key_a)).json["key"]
    probes.append((confined, hook_a["id"], delivery_a["id"]))
    for key, hook_id, delivery_id in probes:
        base = f"/api/v1/webhooks/{hook_id}/deliveries/{delivery_id}"
        listed = await server.api.get(base + "/attempts", key=key)
        replayed = await server.api.post(base + "/replay", key=key)
        for got in (listed, replayed):
            assert got.status == 404, (key, base, got)
            assert got.json["error"]["type"] == "not_found"
            assert "started_at" not in got.body.decode()
    rig.worker.kick()
    await rig.settle()
    assert _state(rig.dsn) == before  # no delivery queued again, no attempt added
    assert len(receiver.requests) == sent
    # The owners still see their own.
    for key, hook, delivery in ((key_a, hook_a, delivery_a), (key_b, hook_b, delivery_b)):
        got = await _attempts(server, key, hook["id"], delivery["id"])
        assert got.status == 200 and len(got.json["data"]) == 1
    assert org_a["id"] not in (await _attempts(server, key_b, hook_b["id"],
                                               delivery_b["id"])).body.decode()


@pytest_twisted.ensureDeferred
async def test_bad_ids_and_page_tokens_are_refused(server, rig, receiver):  # noqa: F811
    _, key, hook, delivery = await _org_with_delivery(server, rig, receiver, "T")
    assert (await _attempts(server, key, hook["id"], "nope")).status == 404
    assert (await _attempts(server, key, hook["id"],
                            "whd_01JQ8X5K2M3N4P5R6S7T8V9W00")).status == 404
    assert (await _attempts(server, key, "whk_01JQ8X5K2M3N4P5R6S7T8V9W00",
                            delivery["id"])).status == 404
    for raw in ("c1:abc", "c1:" + "9" * 30):
        token = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        got = await _attempts(server, key, hook["id"], delivery["id"], page_token=token)
        assert got.status == 400, (raw, got)
    assert (await _attempts(server, key, hook["id"], delivery["id"], limit=0)).status == 400


@pytest_twisted.ensureDeferred
async def test_attempts_are_swept_by_retention_and_go_with_their_endpoint(
        server, rig, receiver):  # noqa: F811
    org, key, hook, delivery = await _org_with_delivery(server, rig, receiver, "R")
    conn = psycopg2.connect(rig.dsn)
    conn.autocommit = True
    with conn.cursor() as cur:  # an attempt from long ago on the same (kept) delivery
        cur.execute("INSERT INTO webhook_attempts (org_id, delivery_id, webhook_id, attempt, "
                    "started_at, status_code, latency_ms) VALUES (%s, %s, %s, 1, "
                    "now() - interval '40 days', 500, 3)",
                    (org["id"], delivery["id"], hook["id"]))
    conn.close()
    assert (await _deliveries(server, key, hook["id"]))[0]["attempts"] == 2
    await server.core.retention.stop()  # its start-up run would hold the sweeper's lock
    await server.core.retention.sweep_once()
    rows = (await _attempts(server, key, hook["id"], delivery["id"])).json["data"]
    assert [r["status_code"] for r in rows] == [200]  # the fresh one stays
    assert (await server.api.delete(f"/api/v1/webhooks/{hook['id']}", key=key)).status == 204
    assert query(rig.dsn, "SELECT count(*) FROM webhook_attempts WHERE webhook_id = %s",
                 (hook["id"],)) == [(0,)]
