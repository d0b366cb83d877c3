"""The API's inbox list and the MX's routing read ask PostgreSQL for their generic plan
(storage.prepared.GENERIC_PLANS). Under ``plan_cache_mode = auto`` the list, whose text
had ``(%s IS NULL OR ...)`` branches and an array parameter, was planned again on
every GET once an organization had more than a page of inboxes; its conditions are now
written only when they apply (one text per combination), so each text's generic plan
is the right one. The answers must not change -- every environment scope, every page --
the setting must go only with a statement sent alone, and it must not outlive it.

The suite prepares statements from their first use (tests/conftest.py), and each read
runs several times, so these are EXECUTEs of prepared statements with generic plans."""

from __future__ import annotations

import pytest
import pytest_twisted

from agentpost.model.errors import RelayDenied, UnknownRecipient
from agentpost.storage import inboxes as inbox_store
from agentpost.storage.prepared import GENERIC_PLANS
from tests.helpers import query

REPEAT = 4


async def _make_inboxes(server, key: str) -> str:
    """Four inboxes in the default environment and three in "Staging" (its id)."""
    env = (await server.api.post("/api/v1/environments", {"name": "Staging"},
                                 key=key)).json
    for i in range(4):
        assert (await server.api.post("/api/v1/inboxes", {"username": f"gp-d{i}"},
                                      key=key)).status == 201
    for i in range(3):
        made = await server.api.post("/api/v1/inboxes", {
            "username": f"gp-s{i}", "environment_id": env["id"]}, key=key)
        assert made.status == 201
    return env["id"]


async def _pages(server, key: str, extra: str, limit: int) -> list[list[str]]:
    """The ids of every page of GET /api/v1/inboxes, following next_page_token."""
    pages: list[list[str]] = []
    token = None
    while True:
        path = f"/api/v1/inboxes?limit={limit}{extra}"
        if token:
            path += f"&page_token={token}"
        got = await server.api.get(path, key=key)
        assert got.status == 200
        pages.append([item["id"] for item in got.json["data"]])
        token = got.json["next_page_token"]
        if token is None:
            return pages


@pytest_twisted.ensureDeferred
async def test_inbox_list_goes_with_the_generic_plan_and_pages_alike(server, sent, db_dsn):
    org, key = await server.new_org()
    staging = await _make_inboxes(server, key)
    default_env = org["default_environment_id"]
    every = [r[0] for r in query(db_dsn, "SELECT id FROM inboxes WHERE org_id = %s "
                                 "ORDER BY id DESC", (org["id"],))]
    in_staging = [r[0] for r in query(db_dsn, "SELECT id FROM inboxes WHERE org_id = %s "
                                      "AND environment_id = %s ORDER BY id DESC",
                                      (org["id"], staging))]
    assert len(every) == 7 and len(in_staging) == 3
    sent.clear()
    for _ in range(REPEAT):
        # No environment named: the key's scope (all of them); then one environment.
        pages = await _pages(server, key, "", 3)
        assert pages == [every[:3], every[3:6], every[6:]]
        pages = await _pages(server, key, f"&environment_id={staging}", 2)
        assert pages == [in_staging[:2], in_staging[2:]]
    # Several environments (a key limited to a set of them), with and without a cursor.
    db = server.core.db
    both = frozenset({default_env, staging})
    for _ in range(REPEAT):
        for after in (None, every[1], every[5]):
            expected = [i for i in every if after is None or i < after]
            text, last = await db.run_read("test.page", inbox_store.list_inbox_page,
                                           org["id"], both, after, 2)
            assert text.count('"id":') == len(expected[:2])
            assert all(f'"id":"{i}"' in text for i in expected[:2])
            assert last == (expected[1] if len(expected) > 2 else None)
            rows = await db.run_read("test.rows", inbox_store.list_inboxes, org["id"],
                                     both, after, 3)
            assert [r["id"] for r in rows] == expected[:3]
    lists = [m for m in sent if "FROM inboxes WHERE org_id" in m and "ORDER BY id DESC" in m]
    assert len(lists) >= REPEAT * 11
    for message in lists:  # alone in its round trip, first: ends with the statement
        assert message.startswith(GENERIC_PLANS + "; "), message
        assert "IS NULL OR" not in message, message
    assert any("environment_id = ANY(" in m for m in lists)
    assert any("environment_id = %s" in m and "id < %s" in m for m in lists)


@pytest_twisted.ensureDeferred
async def test_the_setting_ends_with_the_read(db_dsn):
    """SET LOCAL in a read sent without BEGIN ends with that read's implicit
    transaction: the pool's connection is back at ``auto`` for whatever comes next."""
    from twisted.internet import reactor

    from agentpost.storage.database import Database

    db = Database(db_dsn, clock=reactor, reactor=reactor, pool_size=1)
    try:
        for _ in range(REPEAT):
            await db.run_read("test.page", inbox_store.list_inbox_page, "org_none", None,
                              None, 20)

            async def show(txn):
                return await txn.fetchval("SHOW plan_cache_mode")

            assert await db.run_read("test.show", show) == "auto"
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_mx_routing_goes_with_the_generic_plan(server, sent):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "gp-route"},
                                   key=key)).json
    domain = inbox["email"].split("@", 1)[1]
    sent.clear()
    for _ in range(REPEAT):
        target = await server.core.router.resolve(inbox["email"].upper(), "a@ok.example")
        assert (target.inbox_id, target.email) == (inbox["id"], inbox["email"])
        with pytest.raises(UnknownRecipient):
            await server.core.router.resolve(f"nobody-here@{domain}", "a@ok.example")
        with pytest.raises(RelayDenied):
            await server.core.router.resolve("someone@not-ours.example", "a@ok.example")
    routes = [m for m in sent if "AS hosted" in m]
    # unknown and unhosted addresses read every time; the inbox's route once at least
    # (then, while the LISTEN link holds, from core.route_cache)
    assert REPEAT * 2 + 1 <= len(routes) <= REPEAT * 3
    assert all(m.startswith(GENERIC_PLANS + "; ") for m in routes), routes
