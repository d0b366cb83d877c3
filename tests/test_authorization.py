"""Scopes, roles and the separation between organization keys and admin keys."""

import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_missing_scope_is_forbidden_and_named(server):
    """A read-only key cannot write, and the error names the scope it lacks."""
    _, owner = await server.new_org()
    ro = await server.api.post("/api/v1/api-keys", {"scopes": ["inboxes:read"]}, key=owner)
    key = ro.json["key"]
    assert (await server.api.get("/api/v1/inboxes", key=key)).status == 200
    denied = await server.api.post("/api/v1/inboxes", {"username": "nope"}, key=key)
    assert denied.status == 403
    assert denied.json["error"]["type"] == "forbidden"
    assert denied.json["error"]["missing_scope"] == "inboxes:write"
    for path in ("/api/v1/api-keys", "/api/v1/members", "/api/v1/audit-logs",
                 "/api/v1/environments", "/api/v1/domains"):
        resp = await server.api.get(path, key=key)
        assert resp.status == 403, path
        assert resp.json["error"]["missing_scope"]
    # Nothing was created by the refused call.
    listed = await server.api.get("/api/v1/inboxes", key=owner)
    assert listed.json["data"] == []


@pytest_twisted.ensureDeferred
async def test_admin_and_organization_keys_are_separate(server):
    """Admin keys work only on /admin/v1; organization keys never do."""
    _, owner = await server.new_org()
    admin = await server.admin_key()
    assert admin.startswith("ap_admin_")
    assert (await server.api.get("/admin/v1/organizations", key=owner)).status == 401
    assert (await server.api.get("/api/v1/inboxes", key=admin)).status == 401
    listed = await server.api.get("/admin/v1/organizations", key=admin)
    assert listed.status == 200 and len(listed.json["data"]) == 1


@pytest_twisted.ensureDeferred
async def test_admin_api_creates_org_sets_tier_and_mints_owner_key(server):
    """An operator provisions an organization and hands over its first key."""
    admin = await server.admin_key()
    made = await server.api.post("/admin/v1/organizations", {
        "name": "Acme", "owner_email": "boss@acme.test"}, key=admin)
    assert made.status == 201, made
    org_id = made.json["id"]
    assert made.json["tier"] == "free" and made.json["default_environment_id"].startswith("env_")
    tier = await server.api.patch(f"/admin/v1/organizations/{org_id}", {"tier": "business"},
                                  key=admin)
    assert tier.status == 200 and tier.json["tier"] == "business"
    bad = await server.api.patch(f"/admin/v1/organizations/{org_id}", {"tier": "gold"},
                                 key=admin)
    assert bad.status == 400
    minted = await server.api.post(f"/admin/v1/organizations/{org_id}/api-keys", {}, key=admin)
    assert minted.status == 201 and minted.json["role"] == "owner"
    owner = minted.json["key"]
    members = await server.api.get("/api/v1/members", key=owner)
    assert [(m["email"], m["role"]) for m in members.json["data"]] == [("boss@acme.test",
                                                                        "owner")]
    missing = await server.api.post("/admin/v1/organizations/org_01M8K0T69GDHM7HC0RJ4FYJB6T"
                                    "/api-keys", {}, key=admin)
    assert missing.status == 404


@pytest_twisted.ensureDeferred
async def test_member_roles_and_ownership_transfer(server):
    """Admins manage members; only the owner transfers ownership; the owner can't be removed."""
    admin_key = await server.admin_key()
    made = await server.api.post("/admin/v1/organizations", {
        "name": "Roles", "owner_email": "owner@roles.test"}, key=admin_key)
    owner = (await server.api.post(f"/admin/v1/organizations/{made.json['id']}/api-keys", {},
                                   key=admin_key)).json["key"]
    owner_id = (await server.api.get("/api/v1/members", key=owner)).json["data"][0]["user_id"]
    alice = (await server.api.post("/api/v1/members", {"email": "alice@roles.test",
                                                       "role": "admin"}, key=owner)).json
    bob = (await server.api.post("/api/v1/members", {"email": "bob@roles.test"},
                                 key=owner)).json
    assert bob["role"] == "member"

    admin = (await server.api.post("/api/v1/api-keys", {"role": "admin"}, key=owner)).json["key"]
    member = (await server.api.post("/api/v1/api-keys", {"role": "member"},
                                    key=owner)).json["key"]
    # A member-role key has no members:write scope at all.
    assert (await server.api.delete(f"/api/v1/members/{bob['user_id']}",
                                    key=member)).status == 403
    # An admin may not take ownership nor remove the owner.
    grab = await server.api.patch(f"/api/v1/members/{bob['user_id']}", {"role": "owner"},
                                  key=admin)
    assert grab.status == 403
    assert (await server.api.delete(f"/api/v1/members/{owner_id}", key=owner)).status == 409
    # The owner transfers ownership: exactly one owner afterwards.
    moved = await server.api.patch(f"/api/v1/members/{alice['user_id']}", {"role": "owner"},
                                   key=owner)
    assert moved.status == 200 and moved.json["role"] == "owner"
    roles = {m["email"]: m["role"] for m in
             (await server.api.get("/api/v1/members", key=owner)).json["data"]}
    assert roles == {"owner@roles.test": "admin", "alice@roles.test": "owner",
                     "bob@roles.test": "member"}
    # Environment roles.
    env = (await server.api.post("/api/v1/environments", {"name": "Staging"}, key=owner)).json
    set_env = await server.api.patch(f"/api/v1/members/{bob['user_id']}", {
        "environments": [{"environment_id": env["id"], "role": "admin"}]}, key=admin)
    assert set_env.status == 200
    assert set_env.json["environments"] == [{"environment_id": env["id"], "role": "admin"}]
    removed = await server.api.delete(f"/api/v1/members/{bob['user_id']}", key=admin)
    assert removed.status == 204
    assert (await server.api.get(f"/api/v1/members/{bob['user_id']}", key=owner)).status == 404


@pytest_twisted.ensureDeferred
async def test_environment_lifecycle(server):
    """Environments are created, renamed and deleted; the default one cannot be deleted."""
    org, owner = await server.new_org()
    made = await server.api.post("/api/v1/environments", {"name": "QA Team"}, key=owner)
    assert made.status == 201 and made.json["slug"] == "qa-team"
    dup = await server.api.post("/api/v1/environments", {"name": "QA", "slug": "qa-team"},
                                key=owner)
    assert dup.status == 409 and dup.json["error"]["type"] == "conflict"
    renamed = await server.api.patch(f"/api/v1/environments/{made.json['id']}",
                                     {"name": "QA"}, key=owner)
    assert renamed.json["name"] == "QA"
    default = await server.api.delete(f"/api/v1/environments/{org['default_environment_id']}",
                                      key=owner)
    assert default.status == 409
    inbox = await server.api.post("/api/v1/inboxes", {"username": "qa-bot",
                                                      "environment_id": made.json["id"]},
                                  key=owner)
    busy = await server.api.delete(f"/api/v1/environments/{made.json['id']}", key=owner)
    assert busy.status == 409
    await server.api.delete(f"/api/v1/inboxes/{inbox.json['id']}", key=owner)
    gone = await server.api.delete(f"/api/v1/environments/{made.json['id']}", key=owner)
    assert gone.status == 204


@pytest_twisted.ensureDeferred
async def test_inbox_lifecycle_and_idempotent_create(server):
    """client_id makes create idempotent; update and delete work; pagination is by cursor."""
    _, owner = await server.new_org()
    first = await server.api.post("/api/v1/inboxes", {"username": "Sales.Bot",
                                                      "client_id": "crm-1"}, key=owner)
    assert first.status == 201 and first.json["username"] == "sales.bot"
    again = await server.api.post("/api/v1/inboxes", {"username": "other", "client_id": "crm-1"},
                                  key=owner)
    assert again.status == 200 and again.json["id"] == first.json["id"]
    taken = await server.api.post("/api/v1/inboxes", {"username": "sales.bot"}, key=owner)
    assert taken.status == 409
    foreign_domain = await server.api.post("/api/v1/inboxes", {"username": "x",
                                                               "domain": "gmail.com"}, key=owner)
    assert foreign_domain.status == 400 and foreign_domain.json["error"]["field"] == "domain"
    bad_name = await server.api.post("/api/v1/inboxes", {"username": "-bad-"}, key=owner)
    assert bad_name.status == 400 and bad_name.json["error"]["field"] == "username"
    updated = await server.api.patch(f"/api/v1/inboxes/{first.json['id']}",
                                     {"display_name": "Sales", "send_paused": True}, key=owner)
    assert updated.json["display_name"] == "Sales" and updated.json["send_paused"] is True
    for i in range(4):
        await server.api.post("/api/v1/inboxes", {"username": f"bot{i}"}, key=owner)
    seen, token = [], None
    while True:
        query = "?limit=2" + (f"&page_token={token}" if token else "")
        page = await server.api.get("/api/v1/inboxes" + query, key=owner)
        seen += [i["username"] for i in page.json["data"]]
        token = page.json["next_page_token"]
        if token is None:
            break
    assert seen == ["bot3", "bot2", "bot1", "bot0", "sales.bot"]
    assert (await server.api.get("/api/v1/inboxes?limit=0", key=owner)).status == 400
    assert (await server.api.get("/api/v1/inboxes?page_token=%%%", key=owner)).status == 400
    deleted = await server.api.delete(f"/api/v1/inboxes/{first.json['id']}", key=owner)
    assert deleted.status == 204
    assert (await server.api.get(f"/api/v1/inboxes/{first.json['id']}",
                                 key=owner)).status == 404
