"""The /webhooks API (issue 13): create/read/update/delete, the secret shown once and
stored sealed, scopes, tenancy (a foreign endpoint is 404), environment confinement,
URL checks at creation, and no endpoints without the master key."""

from __future__ import annotations

import pytest_twisted

from tests.conftest import make_config, start_server
from tests.helpers import query


@pytest_twisted.ensureDeferred
async def test_endpoints_are_created_read_changed_and_deleted(server, db_dsn):
    _, owner = await server.new_org()
    api = server.api
    made = await api.post("/api/v1/webhooks", {
        "url": "https://hooks.example.com/agentpost", "description": "ci",
        "event_types": ["message.received", "message.bounced"]}, key=owner)
    assert made.status == 201, made
    hook = made.json
    secret = hook["secret"]
    assert secret.startswith("whsec_") and hook["enabled"] is True
    assert hook["environment_ids"] is None and hook["inbox_id"] is None
    # Shown once: reads never carry it, and the database holds it sealed only.
    got = await api.get(f"/api/v1/webhooks/{hook['id']}", key=owner)
    assert got.status == 200 and "secret" not in got.json
    dump = query(db_dsn, "SELECT row_to_json(w)::text FROM webhooks w")
    assert secret not in dump[0][0] and secret[6:] not in dump[0][0]
    listed = await api.get("/api/v1/webhooks", key=owner)
    assert [w["id"] for w in listed.json["data"]] == [hook["id"]]
    changed = await api.patch(f"/api/v1/webhooks/{hook['id']}", {
        "enabled": False, "event_types": [], "url": "https://other.example/x"}, key=owner)
    assert changed.status == 200, changed
    assert changed.json["enabled"] is False and changed.json["event_types"] == []
    assert changed.json["disabled_reason"] == "manual"
    # The ping of a disabled endpoint is refused; a finished delivery list is empty.
    assert (await api.post(f"/api/v1/webhooks/{hook['id']}/test", key=owner)).status == 409
    deliveries = await api.get(f"/api/v1/webhooks/{hook['id']}/deliveries", key=owner)
    assert deliveries.status == 200 and deliveries.json["data"] == []
    assert (await api.delete(f"/api/v1/webhooks/{hook['id']}", key=owner)).status == 204
    assert (await api.get(f"/api/v1/webhooks/{hook['id']}", key=owner)).status == 404


@pytest_twisted.ensureDeferred
async def test_bad_input_and_internal_urls_are_refused(server):
    _, owner = await server.new_org()
    api = server.api
    for body in ({"url": "https://10.0.0.1/x"}, {"url": "http://169.254.169.254/latest"},
                 {"url": "https://[::1]/x"}, {"url": "gopher://example.com/"},
                 {"url": "https://ok.example/", "event_types": ["nope.nothing"]},
                 {"url": "https://ok.example/", "inbox_id": "msg_x"},
                 {"url": "https://ok.example/", "environment_ids": []}):
        refused = await api.post("/api/v1/webhooks", body, key=owner)
        assert refused.status == 400, (body, refused)
    internal = await api.post("/api/v1/webhooks", {"url": "https://10.0.0.1/x"}, key=owner)
    assert internal.json["error"]["type"] == "webhook_url_not_allowed"
    for body in ({"url": "https://ok.example/\u0000"},
                 {"url": "https://ok.example/", "description": "a\u0000b"}):
        assert (await api.post("/api/v1/webhooks", body, key=owner)).status == 400
    # The number of endpoints is capped (every event fans out to each).
    from agentpost.core.webhooks import MAX_WEBHOOKS_PER_ORG
    for n in range(MAX_WEBHOOKS_PER_ORG):
        made = await api.post("/api/v1/webhooks", {"url": f"https://h{n}.example/"},
                              key=owner)
        assert made.status == 201, made
    assert (await api.post("/api/v1/webhooks", {"url": "https://one-more.example/"},
                           key=owner)).status == 409


@pytest_twisted.ensureDeferred
async def test_another_orgs_endpoint_is_not_found_and_scopes_apply(server):
    _, owner = await server.new_org("one")
    _, other = await server.new_org("two")
    api = server.api
    theirs = (await api.post("/api/v1/webhooks", {"url": "https://t.example/"},
                             key=other)).json
    base = f"/api/v1/webhooks/{theirs['id']}"
    for method, path in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/test"),
                         ("POST", "/rotate-secret"), ("GET", "/deliveries"),
                         ("POST", "/deliveries/whd_01JQ8X5K2M3N4P5R6S7T8V9W00/replay")):
        body = {"enabled": True} if method == "PATCH" else None
        got = await api.request(method, base + path, key=owner, json_body=body)
        assert got.status == 404, (method, path, got)
    assert (await api.get("/api/v1/webhooks", key=owner)).json["data"] == []
    assert (await api.get(base, key=other)).status == 200
    # Members read endpoints but do not change them.
    member = await api.post("/api/v1/api-keys", {"name": "m", "role": "member",
                                                 "scopes": ["webhooks:read"]}, key=owner)
    assert member.status == 201, member
    assert (await api.get("/api/v1/webhooks", key=member.json["key"])).status == 200
    refused = await api.post("/api/v1/webhooks", {"url": "https://x.example/"},
                             key=member.json["key"])
    assert refused.status == 403


@pytest_twisted.ensureDeferred
async def test_an_environment_confined_key_manages_only_its_environments(server):
    _, owner = await server.new_org()
    api = server.api
    staging = (await api.post("/api/v1/environments", {"name": "staging"}, key=owner)).json
    prod = (await api.get("/api/v1/environments", key=owner)).json["data"][0]["id"]
    confined = (await api.post("/api/v1/api-keys", {
        "name": "c", "environment_ids": [staging["id"]],
        "scopes": ["webhooks:read", "webhooks:write"]}, key=owner)).json["key"]
    org_wide = (await api.post("/api/v1/webhooks", {"url": "https://all.example/"},
                               key=owner)).json
    mine = await api.post("/api/v1/webhooks", {"url": "https://st.example/"}, key=confined)
    assert mine.status == 201, mine
    assert mine.json["environment_ids"] == [staging["id"]]
    outside = await api.post("/api/v1/webhooks", {"url": "https://p.example/",
                                                  "environment_ids": [prod]}, key=confined)
    assert outside.status == 404
    listed = await api.get("/api/v1/webhooks", key=confined)
    assert [w["id"] for w in listed.json["data"]] == [mine.json["id"]]
    assert (await api.get(f"/api/v1/webhooks/{org_wide['id']}", key=confined)).status == 404


@pytest_twisted.ensureDeferred
async def test_without_a_master_key_no_endpoint_can_be_created(db_dsn, openapi_checker):
    running = await start_server(make_config(db_dsn, secrets={"key_file": ""}),
                                 openapi_checker)
    try:
        _, owner = await running.new_org()
        refused = await running.api.post("/api/v1/webhooks", {"url": "https://x.example/"},
                                         key=owner)
        assert refused.status == 503, refused
        assert "key_file" in refused.json["error"]["message"]
    finally:
        await running.service.stopService()
