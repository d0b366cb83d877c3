"""Tenancy: every route, called with another organization's ids, answers 404 and leaks nothing.

The matrix is generated from the route table itself, so a new route cannot be added
without being covered.
"""

import re

import pytest_twisted

# Body to send per (method, path template) so that requests reach the lookup.
BODIES = {
    ("PATCH", "/api/v1/environments/{environment_id}"): {"name": "stolen"},
    ("PATCH", "/api/v1/inboxes/{inbox_id}"): {"display_name": "stolen"},
    ("PATCH", "/api/v1/members/{user_id}"): {"role": "member"},
    ("PATCH", "/api/v1/messages/{message_id}"): {"read": True},
    ("POST", "/api/v1/messages/{message_id}/labels"): {"labels": ["stolen"]},
    ("DELETE", "/api/v1/messages/{message_id}/labels"): {"labels": ["stolen"]},
    ("POST", "/api/v1/threads/{thread_id}/labels"): {"labels": ["stolen"]},
    ("DELETE", "/api/v1/threads/{thread_id}/labels"): {"labels": ["stolen"]},
}


def _failed_delivery(server, hook):
    """A real, finished delivery (with one attempt) of ``hook``, as the worker leaves
    one: written directly, so no URL is ever called. Replaying it would queue it."""
    import psycopg2

    from agentpost.model.ids import new_id

    delivery_id = new_id("whd")
    conn = psycopg2.connect(server.service.config.database.url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO webhook_deliveries (org_id, id, webhook_id, event_type, "
                    "payload, status, attempt, next_attempt_at, status_code, error, "
                    "created_at, updated_at) SELECT org_id, %s, id, 'webhook.test', '{}', "
                    "'failed', 1, now(), 500, 'HTTP 500', now(), now() FROM webhooks "
                    "WHERE id = %s", (delivery_id, hook["id"]))
        cur.execute("INSERT INTO webhook_attempts (org_id, delivery_id, webhook_id, attempt, "
                    "started_at, status_code, latency_ms, error) SELECT org_id, id, "
                    "webhook_id, 1, now(), 500, 7, 'HTTP 500' FROM webhook_deliveries "
                    "WHERE id = %s", (delivery_id,))
    conn.close()
    return delivery_id


async def _populate(server, key, tag):
    """Create one of everything in an organization; return ids by path parameter name."""
    env = await server.api.post("/api/v1/environments", {"name": f"Staging {tag}"}, key=key)
    inbox = await server.api.post("/api/v1/inboxes", {"username": f"victim-{tag}"}, key=key)
    api_key = await server.api.post("/api/v1/api-keys", {"name": "victim"}, key=key)
    member = await server.api.post("/api/v1/members", {"email": f"m-{tag}@example.com"},
                                   key=key)
    rule = await server.api.post("/api/v1/filter-rules", {
        "direction": "receive", "action": "block", "match_type": "domain",
        "value": f"spam-{tag}.example"}, key=key)
    assert {r.status for r in (env, inbox, api_key, member, rule)} == {201}
    from tests.mailfactory import make_message

    [stored] = await server.deliver(make_message(
        to=inbox.json["email"], subject=f"secret {tag}",
        attachments=[("s.txt", "text/plain", f"attachment {tag}".encode())]),
        [inbox.json["email"]])
    msg = await server.api.get(f"/api/v1/messages/{stored.message_id}", key=key)
    domain = await server.api.post("/api/v1/domains", {"name": f"victim-{tag}.example"},
                                   key=key)
    draft = await server.api.post(f"/api/v1/inboxes/{inbox.json['id']}/drafts", {
        "to": [f"friend-{tag}@example.net"], "subject": f"secret {tag} draft"}, key=key)
    suppressed = await server.api.post("/api/v1/suppressions", {
        "email": f"gone-{tag}@example.net"}, key=key)
    # An event type nothing here emits: the worker never tries to reach the URL.
    hook = await server.api.post("/api/v1/webhooks", {
        "url": f"https://hooks-{tag}.example.com/in", "event_types": ["domain.verified"]},
        key=key)
    assert {r.status for r in (domain, draft, suppressed, hook)} == {201}, (
        domain, draft, suppressed, hook)
    return {
        "webhook_id": hook.json["id"],
        "delivery_id": _failed_delivery(server, hook.json),
        "domain_id": domain.json["id"],
        "draft_id": draft.json["id"],
        "email": suppressed.json["email"],
        "message_id": stored.message_id,
        "thread_id": stored.thread_id,
        "attachment_id": msg.json["attachments"][0]["id"],
        "rule_id": rule.json["id"],
        "environment_id": env.json["id"],
        "inbox_id": inbox.json["id"],
        "api_key_id": api_key.json["id"],
        "user_id": member.json["user_id"],
        "secrets": [api_key.json["key"]],
    }


@pytest_twisted.ensureDeferred
async def test_cross_tenant_matrix(server):
    """Organization B's owner key, aimed at A's ids on every /api/v1 route: 404, no A data."""
    _, key_a = await server.new_org("A")
    _, key_b = await server.new_org("B")
    ids_a = await _populate(server, key_a, "a")
    await _populate(server, key_b, "b")
    api_table = server.service.route_tables["api"]
    covered = 0
    for route in api_table.routes:
        names = re.findall(r"{(\w+)}", route.path)
        path = "/api/v1" + route.path
        for name in names:
            path = path.replace("{" + name + "}", ids_a[name])
        body = BODIES.get((route.method, "/api/v1" + route.path))
        if route.body is not None and body is None:
            body = {}
        resp = await server.api.request(route.method, path, key=key_b, json_body=body)
        text = resp.body.decode()
        leak_check = [v for k, v in ids_a.items() if k != "secrets"] + ids_a["secrets"] + [
            "secret a", "attachment a"]
        if route.action == "audit.list":
            # B's own trail names the ids B asked for (its own input), but it must not
            # attribute anything to A's environments or show A's secrets.
            assert ids_a["environment_id"] not in {r["environment_id"]
                                                   for r in resp.json["data"]}
            leak_check = ids_a["secrets"]
        for value in leak_check:
            assert value not in text, f"{route.method} {path} leaked {value}"
        if names:
            assert resp.status == 404, f"{route.method} {path}: {resp}"
            assert resp.json["error"]["type"] == "not_found"
        covered += 1
    assert covered == len(api_table.routes) >= 20

    # And A's resources are untouched by all of that.
    message = await server.api.get(f"/api/v1/messages/{ids_a['message_id']}", key=key_a)
    assert message.status == 200 and message.json["labels"] == []
    assert message.json["read"] is False and message.json["subject"] == "secret a"
    inbox = await server.api.get(f"/api/v1/inboxes/{ids_a['inbox_id']}", key=key_a)
    assert inbox.status == 200 and inbox.json["display_name"] == ""
    env = await server.api.get(f"/api/v1/environments/{ids_a['environment_id']}", key=key_a)
    assert env.status == 200 and env.json["name"] == "Staging a"
    still = await server.api.get("/api/v1/inboxes", key=ids_a["secrets"][0])
    assert still.status == 200
    hook_path = f"/api/v1/webhooks/{ids_a['webhook_id']}/deliveries"
    [delivery] = (await server.api.get(hook_path, key=key_a)).json["data"]
    assert delivery["id"] == ids_a["delivery_id"]  # not replayed: still failed, 1 attempt
    assert (delivery["status"], delivery["attempts"]) == ("failed", 1)


@pytest_twisted.ensureDeferred
async def test_cross_environment_ids_are_not_found(server):
    """A key restricted to one environment cannot see or touch another environment's inbox."""
    org, owner = await server.new_org()
    staging = await server.api.post("/api/v1/environments", {"name": "Staging"}, key=owner)
    env_s = staging.json["id"]
    env_d = org["default_environment_id"]
    in_default = await server.api.post("/api/v1/inboxes", {"username": "prod-bot"}, key=owner)
    in_staging = await server.api.post("/api/v1/inboxes", {"username": "stage-bot",
                                                           "environment_id": env_s}, key=owner)
    restricted = await server.api.post("/api/v1/api-keys", {
        "environment_ids": [env_s], "scopes": ["inboxes:read", "inboxes:write",
                                               "environments:read"]}, key=owner)
    rkey = restricted.json["key"]
    foreign = in_default.json["id"]
    for method, path, body in [
        ("GET", f"/api/v1/inboxes/{foreign}", None),
        ("PATCH", f"/api/v1/inboxes/{foreign}", {"display_name": "x"}),
        ("DELETE", f"/api/v1/inboxes/{foreign}", None),
        ("GET", f"/api/v1/environments/{env_d}", None),
    ]:
        resp = await server.api.request(method, path, key=rkey, json_body=body)
        assert resp.status == 404, (method, path, resp)
    listed = await server.api.get("/api/v1/inboxes", key=rkey)
    assert [i["id"] for i in listed.json["data"]] == [in_staging.json["id"]]
    envs = await server.api.get("/api/v1/environments", key=rkey)
    assert [e["id"] for e in envs.json["data"]] == [env_s]
    # Creating without naming an environment lands in the only one the key may use.
    made = await server.api.post("/api/v1/inboxes", {"username": "auto"}, key=rkey)
    assert made.status == 201 and made.json["environment_id"] == env_s
    # Naming a forbidden environment is "not found", not "forbidden".
    refused = await server.api.post("/api/v1/inboxes", {"username": "sneak",
                                                        "environment_id": env_d}, key=rkey)
    assert refused.status == 404


def test_database_refuses_cross_tenant_links(db_dsn):
    """Composite foreign keys: an inbox of org B cannot point at org A's environment."""
    import psycopg2
    import pytest

    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    cur = conn.cursor()
    for org in ("org_A", "org_B"):
        cur.execute("INSERT INTO organizations (id, name, created_at, updated_at) "
                    "VALUES (%s, %s, now(), now())", (org, org))
    cur.execute("INSERT INTO environments (org_id, id, name, slug, is_default, created_at, "
                "updated_at) VALUES ('org_A', 'env_A', 'a', 'a', true, now(), now())")
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        cur.execute("INSERT INTO inboxes (org_id, id, environment_id, username, domain, email, "
                    "created_at, updated_at) VALUES ('org_B', 'inb_X', 'env_A', 'x', 'd.test', "
                    "'x@d.test', now(), now())")
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        cur.execute("INSERT INTO api_keys (org_id, id, display_prefix, secret_sha256, role, "
                    "scopes, created_by_type, created_by_id, created_at) VALUES ('org_B', "
                    "'key_X', 'p', '\\x00', 'owner', '{}', 't', 't', now())")
        cur.execute("INSERT INTO api_key_environments VALUES ('org_B', 'key_X', 'env_A')")
    conn.close()
