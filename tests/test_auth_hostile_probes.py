"""Hostile probes of the authentication and tenancy door (real server, real PostgreSQL).

Each test is a stranger or a tenant trying for more than it holds: key minting beyond
the minter's power, odd expiry times, keys spelled differently, organization keys on
the admin API, foreign ids, and the failed-key throttle dodged from inside one IPv6 /64.
Every refusal must be a clean JSON error with a stable type, never a 500.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import make_config, start_server

UNKNOWN = "ap_sk_" + "y" * 43


def _error(answer: Any, status: int, kind: str) -> None:
    assert answer.status == status, answer
    assert answer.json["error"]["type"] == kind, answer.json


async def _owner_org(server: Any, email: str) -> tuple[dict[str, Any], str, str]:
    """An operator-made organization with an owner person, and that person's key."""
    admin = await server.admin_key()
    made = await server.api.post("/admin/v1/organizations", {"name": "Hostile",
                                                             "owner_email": email}, key=admin)
    assert made.status == 201, made
    minted = await server.api.post(f"/admin/v1/organizations/{made.json['id']}/api-keys", {},
                                   key=admin)
    assert minted.status == 201, minted
    return made.json, minted.json["key"], admin


@pytest_twisted.ensureDeferred
async def test_wildcard_unknown_and_repeated_scopes(server):
    """No wildcard spelling grants anything; a repeated scope is stored once."""
    _, owner = await server.new_org()
    for scopes in (["*"], ["inboxes:*"], ["INBOXES:READ"], ["inboxes:read "], [""]):
        answer = await server.api.post("/api/v1/api-keys", {"name": "w", "scopes": scopes},
                                       key=owner)
        _error(answer, 400, "invalid_request")
    twice = await server.api.post("/api/v1/api-keys", {
        "name": "twice", "scopes": ["inboxes:read", "inboxes:read"]}, key=owner)
    assert twice.status == 201, twice
    assert twice.json["scopes"] == ["inboxes:read"]


@pytest_twisted.ensureDeferred
async def test_minting_never_exceeds_the_minter(server):
    """A narrow key cannot mint a wider one, an owner key, or an unrestricted one."""
    org, owner = await server.new_org()
    narrow = await server.api.post("/api/v1/api-keys", {
        "name": "n", "scopes": ["api_keys:write", "api_keys:read", "inboxes:read"],
        "role": "member"}, key=owner)
    assert narrow.status == 201, narrow
    wider = await server.api.post("/api/v1/api-keys", {
        "name": "x", "scopes": ["inboxes:write"]}, key=narrow.json["key"])
    _error(wider, 403, "forbidden")
    as_owner = await server.api.post("/api/v1/api-keys", {"name": "x", "role": "owner"},
                                     key=narrow.json["key"])
    _error(as_owner, 403, "forbidden")
    confined = await server.api.post("/api/v1/api-keys", {
        "name": "c", "environment_ids": [org["default_environment_id"]]}, key=owner)
    assert confined.status == 201, confined
    for envs in (None, [org["default_environment_id"], "env_01M8K0T69GDHM7HC0RJ4FYJB6T"]):
        child = await server.api.post("/api/v1/api-keys", {"name": "ch", "environment_ids": envs},
                                      key=confined.json["key"])
        if envs is None:  # confined like its minter, never unrestricted
            assert child.status == 201 and child.json["environment_ids"] == [
                org["default_environment_id"]], child
        else:
            _error(child, 403, "forbidden")
    empty = await server.api.post("/api/v1/api-keys", {"name": "e", "environment_ids": []},
                                  key=owner)
    _error(empty, 400, "invalid_request")


@pytest_twisted.ensureDeferred
async def test_foreign_environment_ids_are_refused_without_a_leak(server):
    """Naming another tenant's environment mints nothing and reveals nothing."""
    other, _ = await server.new_org("Other")
    _, owner = await server.new_org("Mine")
    answer = await server.api.post("/api/v1/api-keys", {
        "name": "f", "environment_ids": [other["default_environment_id"]]}, key=owner)
    assert answer.status in (400, 403, 404), answer
    assert "Other" not in answer.body.decode()


@pytest_twisted.ensureDeferred
async def test_expiry_edges(server):
    """Past, zone-less, out-of-range and extreme expiries are 400s; the far future works."""
    _, owner = await server.new_org()
    for expires in ("2001-01-01T00:00:00Z", "2099-01-01T00:00:00", "2099-01-01",
                    "2099-01-01T00:00:00+16:00", "9999-12-31T23:59:59-14:00",
                    "0001-01-01T00:00:00+01:00", "2099-13-01T00:00:00Z", "soon"):
        answer = await server.api.post("/api/v1/api-keys", {"name": "t", "expires_at": expires},
                                       key=owner)
        _error(answer, 400, "invalid_request")
    far = await server.api.post("/api/v1/api-keys", {
        "name": "far", "expires_at": "9999-12-31T23:59:59Z"}, key=owner)
    assert far.status == 201, far
    assert (await server.api.get("/api/v1/inboxes", key=far.json["key"])).status == 200
    listed = await server.api.get("/api/v1/api-keys", key=owner)
    assert listed.status == 200
    shifted = await server.api.post("/api/v1/api-keys", {
        "name": "east", "expires_at": "2099-06-01T12:00:00+14:00"}, key=owner)
    assert shifted.status == 201 and shifted.json["expires_at"].startswith(
        "2099-05-31T22:00:00"), shifted


@pytest_twisted.ensureDeferred
async def test_revoked_key_spelled_differently_stays_refused(server):
    """Case, padding and truncation never turn a revoked or wrong key into a good one."""
    _, owner = await server.new_org()
    made = await server.api.post("/api/v1/api-keys", {"name": "r"}, key=owner)
    secret = made.json["key"]
    assert (await server.api.delete(f"/api/v1/api-keys/{made.json['id']}",
                                    key=owner)).status == 200
    for variant in (secret, secret + " ", " " + secret, secret.upper(), secret[:-1],
                    secret + "=", secret.replace("ap_sk_", "AP_SK_")):
        answer = await server.api.get("/api/v1/inboxes", key=variant)
        _error(answer, 401, "unauthenticated")
    assert (await server.api.get("/api/v1/inboxes", key=owner.upper())).status == 401


def _raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        chunks = []
        while True:
            data = conn.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_undecodable_and_control_bytes_in_the_key_are_401(server):
    """Non-ASCII bytes, NUL and overlong keys in Authorization are refused as unknown."""
    port = int(server.base_url.rsplit(":", 1)[1])
    for token in (b"ap_sk_" + b"\xff\xfe" * 20, b"ap_sk_" + b"a" * 20 + b"\x00" + b"b" * 20,
                  b"ap_sk_" + "\u00e9".encode() * 30, b"ap_sk_" + b"z" * 5000,
                  b"ap_admin_" + b"q" * 43):
        raw = await deferToThread(
            _raw_request, port,
            b"GET /api/v1/inboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token + b"\r\n\r\n")
        status_line = raw.split(b"\r\n", 1)[0]
        assert status_line.split()[1] in (b"400", b"401"), raw[:300]
        assert b'"type"' in raw and b"Traceback" not in raw


@pytest_twisted.ensureDeferred
async def test_admin_api_takes_no_organization_key_and_no_garbage_ids(server):
    """/admin/v1 answers only admin keys; odd organization ids are clean 400/404s."""
    org, owner = await server.new_org()
    admin = await server.admin_key()
    for key in (owner, owner.replace("ap_sk_", "ap_admin_"), UNKNOWN):
        _error(await server.api.get("/admin/v1/organizations", key=key), 401, "unauthenticated")
        _error(await server.api.post(f"/admin/v1/organizations/{org['id']}/api-keys", {},
                                     key=key), 401, "unauthenticated")
    _error(await server.api.get("/api/v1/inboxes", key=admin), 401, "unauthenticated")
    for org_id in ("org_%00", "org_nope", "x" * 500, "%C0%AF", "..%2F.."):
        answer = await server.api.get(f"/admin/v1/organizations/{org_id}", key=admin)
        assert answer.status in (400, 404), answer
        assert answer.json["error"]["type"] in ("invalid_request", "not_found")
    bad_page = await server.api.get("/admin/v1/organizations?page_token=%FF%00", key=admin)
    _error(bad_page, 400, "invalid_request")


@pytest_twisted.ensureDeferred
async def test_admin_created_owner_must_have_an_address(server):
    """An owner_email without '@' is not an address (as for members.create)."""
    admin = await server.admin_key()
    answer = await server.api.post("/admin/v1/organizations", {
        "name": "NoAt", "owner_email": "nobody"}, key=admin)
    _error(answer, 400, "invalid_request")


@pytest_twisted.ensureDeferred
async def test_role_games_by_owner_and_admin(server):
    """The owner cannot leave or demote themselves; an admin cannot crown themselves."""
    _org, owner_key, admin_api = await _owner_org(server, "boss@hostile.test")
    members = (await server.api.get("/api/v1/members", key=owner_key)).json["data"]
    owner_id = members[0]["user_id"]
    _error(await server.api.delete(f"/api/v1/members/{owner_id}", key=owner_key), 409,
           "conflict")
    _error(await server.api.patch(f"/api/v1/members/{owner_id}", {"role": "admin"},
                                  key=owner_key), 409, "conflict")
    added = await server.api.post("/api/v1/members", {"email": "adm@hostile.test",
                                                      "role": "admin"}, key=owner_key)
    assert added.status == 201, added
    again = await server.api.post("/api/v1/members", {"email": "ADM@hostile.test",
                                                      "role": "member"}, key=owner_key)
    _error(again, 409, "conflict")
    foreign = await server.api.get("/api/v1/members/usr_01M8K0T69GDHM7HC0RJ4FYJB6T",
                                   key=owner_key)
    _error(foreign, 404, "not_found")
    del admin_api


@pytest_twisted.ensureDeferred
async def test_other_tenants_keys_cannot_be_read_or_revoked(server):
    """Key ids of another organization are 404 for reads and revocation."""
    _, mine = await server.new_org("Mine")
    _, theirs = await server.new_org("Theirs")
    victim = await server.api.post("/api/v1/api-keys", {"name": "v"}, key=theirs)
    _error(await server.api.get(f"/api/v1/api-keys/{victim.json['id']}", key=mine), 404,
           "not_found")
    _error(await server.api.delete(f"/api/v1/api-keys/{victim.json['id']}", key=mine), 404,
           "not_found")
    assert (await server.api.get("/api/v1/inboxes", key=victim.json["key"])).status == 200


@pytest_twisted.async_yield_fixture
async def strict(db_dsn, openapi_checker):
    config = make_config(db_dsn, http={"trusted_proxies": ["127.0.0.1"]},
                         login={"source_failures_per_minute": 3,
                                "pair_failures_per_minute": 3})
    running = await start_server(config, openapi_checker)
    yield running
    await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_guessing_from_fresh_addresses_of_one_ipv6_64_is_throttled(strict):
    """One attacker holds a whole /64: a new address in it is not a clean source."""
    for host in range(1, 4):
        answer = await strict.api.get("/api/v1/inboxes", key=UNKNOWN, headers={
            "X-Forwarded-For": f"2001:db8:1:2::{host:x}"})
        _error(answer, 401, "unauthenticated")
    throttled = await strict.api.get("/api/v1/inboxes", key=UNKNOWN, headers={
        "X-Forwarded-For": "2001:db8:1:2::beef"})
    _error(throttled, 429, "rate_limited")
    _, good = await strict.new_org()
    elsewhere = await strict.api.get("/api/v1/inboxes", key=good, headers={
        "X-Forwarded-For": "2001:db8:1:3::1"})
    assert elsewhere.status == 200


async def _ws_open(base_url: str, key: str, forwarded_for: str) -> Any:
    """A WebSocket handshake through the trusted proxy (loopback) for ``forwarded_for``."""
    from autobahn.twisted.websocket import WebSocketClientFactory, connectWS
    from twisted.internet import defer, reactor

    from tests.ws_client import BOUND_S, WS, _Client

    factory = WebSocketClientFactory(base_url.replace("http", "ws", 1) + f"/ws?token={key}",
                                     headers={"X-Forwarded-For": forwarded_for})
    factory.protocol = _Client
    factory.frames = defer.DeferredQueue()
    factory.opened = defer.Deferred()
    factory.closed = defer.Deferred()
    factory.code = None
    ws = WS(factory)
    connectWS(factory)
    ws.proto = await factory.opened.addTimeout(BOUND_S, reactor)
    return ws


@pytest_twisted.ensureDeferred
async def test_websocket_key_guesses_behind_a_proxy_charge_the_client_not_the_proxy(strict):
    """Behind a trusted proxy every WebSocket came from the proxy's address: one
    client guessing keys used to get every other client's handshake refused (429)."""
    _, good = await strict.new_org()
    refusals = []
    for _ in range(4):
        try:
            await _ws_open(strict.base_url, UNKNOWN, "198.51.100.9")
        except Exception as exc:  # the handshake is refused
            refusals.append(str(exc))
    assert len(refusals) == 4 and all("401" in r for r in refusals[:3]), refusals
    assert "429" in refusals[3], refusals
    ws = await _ws_open(strict.base_url, good, "198.51.100.10")
    ws.close()
    await ws.closed()


@pytest_twisted.ensureDeferred
async def test_an_empty_forwarded_hop_still_charges_a_source(strict):
    """A trusted proxy passing an empty last hop left the request with no source at all,
    so unknown keys were never throttled; the peer (the proxy) is charged instead."""
    answers = [await strict.api.get("/api/v1/inboxes", key=UNKNOWN,
                                    headers={"X-Forwarded-For": "203.0.113.5, "})
               for _ in range(4)]
    assert [a.status for a in answers] == [401, 401, 401, 429], answers


@pytest_twisted.ensureDeferred
async def test_admin_api_use_and_refusals_are_audited(server, db_dsn):
    """Every admin API call, allowed or refused, leaves an audit row with its actor."""
    from twisted.internet import task

    from tests.helpers import query

    _, owner = await server.new_org()
    admin = await server.admin_key()
    assert (await server.api.get("/admin/v1/organizations", key=admin)).status == 200
    assert (await server.api.get("/admin/v1/organizations", key=owner)).status == 401
    assert (await server.api.get("/admin/v1/organizations/org_nope", key=admin)).status == 404
    rows: list[tuple] = []
    for _ in range(100):
        rows = query(db_dsn, "SELECT actor_type, action, outcome, status FROM audit_log "
                             "WHERE action LIKE 'admin.%%' ORDER BY occurred_at")
        if len(rows) >= 3:
            break
        await task.deferLater(__import__("twisted.internet.reactor").internet.reactor, 0.05,
                              lambda: None)
    assert ("admin_key", "admin.organizations.list", "allowed", 200) in rows, rows
    assert ("anonymous", "admin.organizations.list", "denied", 401) in rows, rows
    assert ("admin_key", "admin.organizations.get", "failed", 404) in rows, rows


@pytest_twisted.ensureDeferred
async def test_a_member_revokes_only_their_own_keys(server):
    """Members use inboxes: acting as a member, a person's key used to revoke any
    member-level key it could see, cutting off a colleague's (or the owner's) agents."""
    org, alice_key, admin = await _owner_org(server, "alice@revoke.test")
    members = (await server.api.get("/api/v1/members", key=alice_key)).json["data"]
    alice_id = members[0]["user_id"]
    env = org["default_environment_id"]
    added = await server.api.post("/api/v1/members", {"email": "bob@revoke.test",
                                                      "role": "admin"}, key=alice_key)
    bob_id = added.json["user_id"]
    moved = await server.api.patch(f"/api/v1/members/{bob_id}", {"role": "owner"},
                                   key=alice_key)
    assert moved.status == 200, moved
    bob_key = (await server.api.post(f"/admin/v1/organizations/{org['id']}/api-keys", {},
                                     key=admin)).json["key"]
    demoted = await server.api.patch(f"/api/v1/members/{alice_id}", {
        "role": "member", "environments": [{"environment_id": env, "role": "member"}]},
        key=bob_key)
    assert demoted.status == 200, demoted
    bobs_bot = await server.api.post("/api/v1/api-keys", {
        "name": "bot", "role": "member", "environment_ids": [env]}, key=bob_key)
    assert bobs_bot.status == 201, bobs_bot
    listed = await server.api.get("/api/v1/api-keys", key=alice_key)
    assert bobs_bot.json["id"] in [k["id"] for k in listed.json["data"]]
    refused = await server.api.delete(f"/api/v1/api-keys/{bobs_bot.json['id']}", key=alice_key)
    _error(refused, 403, "forbidden")
    assert (await server.api.get("/api/v1/inboxes", key=bobs_bot.json["key"])).status == 200
    her_bot = await server.api.post("/api/v1/api-keys", {"name": "mine"}, key=alice_key)
    assert her_bot.status == 201 and her_bot.json["role"] == "member", her_bot
    own = await server.api.delete(f"/api/v1/api-keys/{her_bot.json['id']}", key=alice_key)
    assert own.status == 200, own
    assert (await server.api.delete(f"/api/v1/api-keys/{bobs_bot.json['id']}",
                                    key=bob_key)).status == 200


@pytest_twisted.ensureDeferred
async def test_member_changes_with_foreign_ids_touch_nothing(server):
    """Another tenant's people and environments are 'not found' in member changes."""
    other, other_owner = await server.new_org("Other")
    stranger = await server.api.post("/api/v1/members", {"email": "s@other.test"},
                                     key=other_owner)
    assert stranger.status == 201, stranger
    _, owner = await server.new_org("Mine")
    mine = await server.api.post("/api/v1/members", {"email": "m@mine.test"}, key=owner)
    path = f"/api/v1/members/{stranger.json['user_id']}"
    _error(await server.api.patch(path, {"role": "admin"}, key=owner), 404, "not_found")
    _error(await server.api.delete(path, key=owner), 404, "not_found")
    foreign_env = await server.api.patch(f"/api/v1/members/{mine.json['user_id']}", {
        "environments": [{"environment_id": other["default_environment_id"],
                          "role": "admin"}]}, key=owner)
    _error(foreign_env, 404, "not_found")
    nul = await server.api.patch(f"/api/v1/members/{mine.json['user_id']}", {
        "environments": [{"environment_id": "env_\u0000", "role": "admin"}]}, key=owner)
    _error(nul, 400, "invalid_request")
    still = await server.api.get(path.replace("/api/v1", "/api/v1"), key=other_owner)
    assert still.status == 200 and still.json["role"] == "member", still


@pytest_twisted.ensureDeferred
async def test_a_confined_keys_key_listing_pages_through_every_key_it_may_see(server):
    """The listing filtered a page *after* reading it: a confined key whose visible keys
    sat behind a page of organization-wide keys got an empty last page and never saw
    them."""
    org, owner = await server.new_org()
    env = org["default_environment_id"]
    confined = await server.api.post("/api/v1/api-keys", {"name": "c", "environment_ids": [env]},
                                     key=owner)
    visible = await server.api.post("/api/v1/api-keys", {"name": "v", "environment_ids": [env]},
                                    key=owner)
    for n in range(3):  # newer, organization-wide: not the confined key's business
        assert (await server.api.post("/api/v1/api-keys", {"name": f"wide{n}"},
                                      key=owner)).status == 201
    seen, token = [], None
    for _ in range(10):
        path = "/api/v1/api-keys?limit=2" + (f"&page_token={token}" if token else "")
        page = await server.api.get(path, key=confined.json["key"])
        assert page.status == 200, page
        seen += [k["id"] for k in page.json["data"]]
        token = page.json["next_page_token"]
        if token is None:
            break
    assert sorted(seen) == sorted([confined.json["id"], visible.json["id"]]), seen


@pytest_twisted.ensureDeferred
async def test_odd_paging_and_refusals_are_clean_json_with_security_headers(server):
    """Bad limits and cursors are 400s; 401s carry the security headers too."""
    _, owner = await server.new_org()
    admin = await server.admin_key()
    for query_text in ("limit=0", "limit=101", "limit=abc", "limit=1e3", "limit=-1",
                       "limit=99999999999999999999999", "page_token=!!!",
                       "page_token=" + "A" * 5000):
        for path, key in (("/api/v1/api-keys", owner), ("/admin/v1/organizations", admin)):
            answer = await server.api.get(f"{path}?{query_text}", key=key)
            _error(answer, 400, "invalid_request")
    refused = await server.api.get("/api/v1/api-keys", key=UNKNOWN)
    _error(refused, 401, "unauthenticated")
    assert refused.headers.get("x-content-type-options") == "nosniff"
    assert refused.headers.get("x-frame-options") == "DENY"
    refused_admin = await server.api.get("/admin/v1/organizations", key=owner)
    assert refused_admin.headers.get("x-content-type-options") == "nosniff"


@pytest_twisted.ensureDeferred
async def test_poisoned_forwarded_addresses_do_not_stop_the_audit_trail(strict, db_dsn):
    """Control bytes and non-ASCII in a forwarded address reach the audit row and the
    throttle as text; rows behind them are still written."""
    from twisted.internet import reactor, task

    from tests.helpers import query

    port = int(strict.base_url.rsplit(":", 1)[1])
    _, good = await strict.new_org()
    for hop in (b"\x00\x01evil", b"\xff\xfe" * 40, b"1.2.3.4\x7f"):
        raw = await deferToThread(
            _raw_request, port,
            b"GET /api/v1/inboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"X-Forwarded-For: " + hop + b"\r\nAuthorization: Bearer " + UNKNOWN.encode()
            + b"\r\n\r\n")
        assert raw.split(b" ", 2)[1] in (b"400", b"401"), raw[:200]
    after = await strict.api.get("/api/v1/inboxes?marker=1", key=good,
                                 headers={"X-Forwarded-For": "192.0.2.77"})
    assert after.status == 200
    rows: list[tuple] = []
    for _ in range(100):
        rows = query(db_dsn, "SELECT remote_addr FROM audit_log WHERE remote_addr = %s",
                     ("192.0.2.77",))
        if rows:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert rows, "the audit trail stopped behind a poisoned row"
    assert strict.core.audit.quarantined == 0


@pytest_twisted.ensureDeferred
async def test_the_access_log_never_holds_a_websocket_token(db_dsn, openapi_checker):
    """``GET /ws?token=ap_sk_…`` is how browsers authenticate the event stream; with
    ``[http] access_log`` on, the key used to be written to the log in the URI."""
    from twisted.logger import globalLogPublisher

    lines: list[str] = []

    def observe(event: dict) -> None:
        from twisted.logger import formatEvent

        lines.append(formatEvent(event) or "")

    running = await start_server(make_config(db_dsn, http={"access_log": True}),
                                 openapi_checker)
    globalLogPublisher.addObserver(observe)
    try:
        _, key = await running.new_org()
        await running.api.get(f"/ws?token={key}")
        await running.api.get(f"/api/v1/inboxes?x=1&access_token={key}&token={key}")
        from twisted.internet import reactor, task

        await task.deferLater(reactor, 0.1, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observe)
        await running.service.stopService()
    logged = [line for line in lines if "/ws" in line or "/api/v1/inboxes" in line]
    assert logged, lines[-20:]
    assert not any(key in line or key[6:] in line for line in lines), logged


@pytest_twisted.ensureDeferred
async def test_a_removed_persons_cached_key_fails_at_once_on_another_process(server, db_dsn,
                                                                            openapi_checker):
    """Two processes on one database, the key warm in the other's cache: removing its
    holder from the organization refuses it there on the very next request, and a
    demotion takes admin power away there too."""
    other = await start_server(make_config(db_dsn), openapi_checker)
    try:
        org, owner_key, admin = await _owner_org(server, "own@two.test")
        carol = await server.api.post("/api/v1/members", {"email": "carol@two.test",
                                                          "role": "admin"}, key=owner_key)
        dave = await server.api.post("/api/v1/members", {"email": "dave@two.test",
                                                         "role": "admin"}, key=owner_key)
        keys = {}
        for person in (carol, dave):  # each takes the seat in turn to get a key of their own
            moved = await server.api.patch(f"/api/v1/members/{person.json['user_id']}",
                                           {"role": "owner"}, key=owner_key)
            assert moved.status == 200, moved
            keys[person.json["user_id"]] = (await server.api.post(
                f"/admin/v1/organizations/{org['id']}/api-keys", {}, key=admin)).json["key"]
            owner_key = keys[person.json["user_id"]]
        carol_key, dave_key = keys[carol.json["user_id"]], keys[dave.json["user_id"]]
        for _ in range(3):  # warm the other process's cache
            assert (await other.api.get("/api/v1/members", key=carol_key)).status == 200
            assert (await other.api.get("/api/v1/environments", key=carol_key)).status == 200
        removed = await server.api.delete(f"/api/v1/members/{carol.json['user_id']}",
                                          key=dave_key)
        assert removed.status == 204, removed
        _error(await other.api.get("/api/v1/members", key=carol_key), 401, "unauthenticated")
    finally:
        await other.service.stopService()
