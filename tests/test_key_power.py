"""A key's power follows its holder's current role, and confined keys stay confined.

Issue 9, items 8 and 9: an ownership transfer, a demotion, a removal from the
organization or from an environment takes power away from the person's keys on the
very next request; a key confined to some environments never reaches organization-wide
powers (members, roles, ownership, environments, other people's audit rows).
"""

from __future__ import annotations

import imaplib
import ssl
from dataclasses import dataclass
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS


@dataclass
class Org:
    """An organization provisioned by an operator, with an owner person."""

    id: str
    default_env: str
    admin: str  # installation admin key
    owner_key: str  # the operator-minted key, held by the owner person
    owner_id: str


async def _org_with_owner(server: Any, email: str = "alice@power.test") -> Org:
    admin = await server.admin_key()
    made = await server.api.post("/admin/v1/organizations", {"name": "Power",
                                                             "owner_email": email}, key=admin)
    assert made.status == 201, made
    minted = await server.api.post(f"/admin/v1/organizations/{made.json['id']}/api-keys", {},
                                   key=admin)
    assert minted.status == 201, minted
    key = minted.json["key"]
    owner_id = (await server.api.get("/api/v1/members", key=key)).json["data"][0]["user_id"]
    return Org(made.json["id"], made.json["default_environment_id"], admin, key, owner_id)


async def _add(server: Any, key: str, email: str, role: str = "member") -> str:
    made = await server.api.post("/api/v1/members", {"email": email, "role": role}, key=key)
    assert made.status == 201, made
    return made.json["user_id"]


async def _hand_over(server: Any, org: Org, new_owner_id: str) -> str:
    """Transfer ownership with the old owner's key; the operator mints the new owner's key."""
    moved = await server.api.patch(f"/api/v1/members/{new_owner_id}", {"role": "owner"},
                                   key=org.owner_key)
    assert moved.status == 200, moved
    minted = await server.api.post(f"/admin/v1/organizations/{org.id}/api-keys", {},
                                   key=org.admin)
    assert minted.status == 201, minted
    return minted.json["key"]


def _forbidden(resp: Any) -> None:
    assert resp.status == 403, resp
    assert resp.json["error"]["type"] == "forbidden"


@pytest_twisted.ensureDeferred
async def test_ownership_transfer_strips_the_old_owners_keys_of_owner_power(server):
    """After a transfer the old owner's keys act as admin: no second transfer, no owner keys."""
    org = await _org_with_owner(server)
    spare = await server.api.post("/api/v1/api-keys", {"role": "owner"}, key=org.owner_key)
    assert spare.status == 201 and spare.json["role"] == "owner"
    bob = await _add(server, org.owner_key, "bob@power.test")
    carol = await _add(server, org.owner_key, "carol@power.test")
    bob_key = await _hand_over(server, org, bob)

    for old in (org.owner_key, spare.json["key"]):
        # Neither a second transfer nor taking ownership back for oneself.
        _forbidden(await server.api.patch(f"/api/v1/members/{carol}", {"role": "owner"},
                                          key=old))
        _forbidden(await server.api.patch(f"/api/v1/members/{org.owner_id}",
                                          {"role": "owner"}, key=old))
        _forbidden(await server.api.post("/api/v1/api-keys", {"role": "owner"}, key=old))
        # Still an admin: admin work goes on.
        assert (await server.api.get("/api/v1/audit-logs", key=old)).status == 200
    default_role = await server.api.post("/api/v1/api-keys", {}, key=org.owner_key)
    assert default_role.status == 201 and default_role.json["role"] == "admin"
    roles = {m["user_id"]: m["role"] for m in
             (await server.api.get("/api/v1/members", key=bob_key)).json["data"]}
    assert roles == {org.owner_id: "admin", bob: "owner", carol: "member"}
    # The new owner's key, held by the new owner, is the one with owner power.
    assert (await server.api.post("/api/v1/api-keys", {"role": "owner"},
                                  key=bob_key)).status == 201


@pytest_twisted.ensureDeferred
async def test_racing_transfers_by_one_owner_key_give_ownership_away_once(server):
    """Two transfers sent at once with the owner's key: one succeeds, the other is refused."""
    org = await _org_with_owner(server)
    bob = await _add(server, org.owner_key, "bob@race.test")
    carol = await _add(server, org.owner_key, "carol@race.test")
    answers = await defer.gatherResults([
        defer.Deferred.fromCoroutine(server.api.patch(f"/api/v1/members/{who}",
                                                      {"role": "owner"}, key=org.owner_key))
        for who in (bob, carol)])
    assert sorted(a.status for a in answers) in ([200, 403], [200, 409]), answers
    roles = [m["role"] for m in
             (await server.api.get("/api/v1/members", key=org.owner_key)).json["data"]]
    assert sorted(roles) == ["admin", "member", "owner"]


@pytest_twisted.ensureDeferred
async def test_seat_key_loses_owner_power_once_a_person_owns_the_organization(server):
    """A bootstrap key owns an organization only until ownership is given to a person."""
    _, seat = await server.new_org()
    bob = await _add(server, seat, "bob@seat.test")
    carol = await _add(server, seat, "carol@seat.test")
    child = await server.api.post("/api/v1/api-keys", {"role": "owner"}, key=seat)
    assert child.status == 201
    moved = await server.api.patch(f"/api/v1/members/{bob}", {"role": "owner"}, key=seat)
    assert moved.status == 200
    for key in (seat, child.json["key"]):
        _forbidden(await server.api.patch(f"/api/v1/members/{carol}", {"role": "owner"},
                                          key=key))
        _forbidden(await server.api.post("/api/v1/api-keys", {"role": "owner"}, key=key))
        assert (await server.api.get("/api/v1/members", key=key)).status == 200


@pytest_twisted.ensureDeferred
async def test_demoted_persons_keys_lose_admin_power_on_the_next_request(server):
    """Admin → Member: the person's keys lose admin scopes at once and cannot change roles."""
    org = await _org_with_owner(server)
    bob = await _add(server, org.owner_key, "bob@demote.test")
    carol = await _add(server, org.owner_key, "carol@demote.test")
    bob_key = await _hand_over(server, org, bob)
    alice = org.owner_key
    assert (await server.api.get("/api/v1/audit-logs", key=alice)).status == 200
    demoted = await server.api.patch(f"/api/v1/members/{org.owner_id}", {"role": "member"},
                                     key=bob_key)
    assert demoted.status == 200 and demoted.json["role"] == "member"

    audit = await server.api.get("/api/v1/audit-logs", key=alice)
    _forbidden(audit)
    assert audit.json["error"]["missing_scope"] == "audit:read"
    for body in ({"role": "admin"}, {"role": "owner"}):
        for target in (carol, org.owner_id):  # nobody's role, one's own included
            refused = await server.api.patch(f"/api/v1/members/{target}", body, key=alice)
            _forbidden(refused)
            assert refused.json["error"]["missing_scope"] == "members:write"
    _forbidden(await server.api.post("/api/v1/members", {"email": "x@demote.test"},
                                     key=alice))
    roles = {m["user_id"]: m["role"] for m in
             (await server.api.get("/api/v1/members", key=bob_key)).json["data"]}
    assert roles[org.owner_id] == "member" and roles[carol] == "member"


@pytest_twisted.ensureDeferred
async def test_removed_persons_keys_are_refused_and_stay_refused(server):
    """Removal refuses the person's keys (and keys they minted) at once, even if re-added."""
    org = await _org_with_owner(server)
    bob = await _add(server, org.owner_key, "bob@remove.test")
    child = await server.api.post("/api/v1/api-keys", {"name": "ci"}, key=org.owner_key)
    assert child.status == 201
    bob_key = await _hand_over(server, org, bob)
    removed = await server.api.delete(f"/api/v1/members/{org.owner_id}", key=bob_key)
    assert removed.status == 204
    for key in (org.owner_key, child.json["key"]):
        refused = await server.api.get("/api/v1/inboxes", key=key)
        assert refused.status == 401 and refused.json["error"]["type"] == "unauthenticated"
    listed = await server.api.get(f"/api/v1/api-keys/{child.json['id']}", key=bob_key)
    assert listed.json["revoked_at"] is not None
    # The same person (same address, so the same user) comes back: the old keys do not.
    again = await _add(server, bob_key, "alice@power.test", role="admin")
    assert again == org.owner_id
    for key in (org.owner_key, child.json["key"]):
        assert (await server.api.get("/api/v1/inboxes", key=key)).status == 401


@pytest_twisted.ensureDeferred
async def test_a_members_keys_follow_their_environment_assignments(server):
    """An organization Member's keys reach only their environments, with their role there."""
    org = await _org_with_owner(server)
    bob = await _add(server, org.owner_key, "bob@envs.test")
    bob_key = await _hand_over(server, org, bob)
    alice = org.owner_key
    staging = (await server.api.post("/api/v1/environments", {"name": "Staging"},
                                      key=bob_key)).json["id"]
    await server.api.post("/api/v1/inboxes", {"username": "prod-bot"}, key=bob_key)
    path = f"/api/v1/members/{org.owner_id}"
    changed = await server.api.patch(path, {"role": "member", "environments": [
        {"environment_id": staging, "role": "admin"}]}, key=bob_key)
    assert changed.status == 200, changed

    envs = await server.api.get("/api/v1/environments", key=alice)
    assert [e["id"] for e in envs.json["data"]] == [staging]
    assert (await server.api.get(f"/api/v1/environments/{org.default_env}",
                                 key=alice)).status == 404
    assert (await server.api.get("/api/v1/inboxes", key=alice)).json["data"] == []
    made = await server.api.post("/api/v1/inboxes", {"username": "stage-bot"}, key=alice)
    assert made.status == 201 and made.json["environment_id"] == staging
    assert (await server.api.get("/api/v1/audit-logs", key=alice)).status == 200  # env admin

    # Demoted within the environment: environment-admin powers go at once.
    await server.api.patch(path, {"environments": [{"environment_id": staging,
                                                     "role": "member"}]}, key=bob_key)
    _forbidden(await server.api.get("/api/v1/audit-logs", key=alice))
    assert (await server.api.get("/api/v1/inboxes", key=alice)).status == 200
    # Removed from the environment: it disappears for the person's keys.
    await server.api.patch(path, {"environments": []}, key=bob_key)
    assert (await server.api.get(f"/api/v1/environments/{staging}", key=alice)).status == 404
    assert (await server.api.get("/api/v1/environments", key=alice)).json["data"] == []
    assert (await server.api.get(f"/api/v1/inboxes/{made.json['id']}",
                                 key=alice)).status == 404


@pytest_twisted.ensureDeferred
async def test_minting_is_bounded_by_the_minters_current_power(server):
    """A key minted now gets at most what its minter may do now: role, scopes, environments."""
    org = await _org_with_owner(server)
    bob = await _add(server, org.owner_key, "bob@mint.test")
    bob_key = await _hand_over(server, org, bob)
    alice = org.owner_key
    staging = (await server.api.post("/api/v1/environments", {"name": "Staging"},
                                      key=bob_key)).json["id"]
    await server.api.patch(f"/api/v1/members/{org.owner_id}", {"role": "member", "environments": [
        {"environment_id": staging, "role": "member"}]}, key=bob_key)

    minted = await server.api.post("/api/v1/api-keys", {}, key=alice)
    assert minted.status == 201, minted
    assert minted.json["role"] == "member" and minted.json["environment_ids"] == [staging]
    assert "members:write" not in minted.json["scopes"]
    for body in ({"role": "admin"}, {"scopes": ["audit:read"]},
                 {"environment_ids": [org.default_env]}, {"environment_ids": None}):
        refused = await server.api.post("/api/v1/api-keys", body, key=alice)
        if body.get("environment_ids", "") is None:  # null means "as restricted as I am"
            assert refused.status == 201 and refused.json["environment_ids"] == [staging]
        else:
            _forbidden(refused)


async def _confined(server: Any) -> tuple[dict[str, Any], str, str, str, dict[str, Any]]:
    """An organization, its seat key, a second environment, a member assigned to the
    default one, and an admin key (every admin scope) confined to the second one."""
    org, owner = await server.new_org()
    staging = (await server.api.post("/api/v1/environments", {"name": "Staging"},
                                      key=owner)).json["id"]
    bob = await _add(server, owner, "bob@confined.test")
    await server.api.patch(f"/api/v1/members/{bob}", {"environments": [
        {"environment_id": org["default_environment_id"], "role": "member"}]}, key=owner)
    confined = await server.api.post("/api/v1/api-keys", {
        "role": "admin", "environment_ids": [staging]}, key=owner)
    assert confined.status == 201 and "members:write" in confined.json["scopes"]
    return org, owner, staging, bob, confined.json


@pytest_twisted.ensureDeferred
async def test_environment_confined_key_cannot_reach_organization_powers(server):
    """A key confined to one environment, even with every admin scope: no organization
    roles (the reported escalation), no members in or out, no environments created or
    deleted, no unconfined or owner keys."""
    org, owner, staging, bob, confined = await _confined(server)
    key = confined["key"]
    for role in ("admin", "owner", "member"):
        _forbidden(await server.api.patch(f"/api/v1/members/{bob}", {"role": role}, key=key))
    _forbidden(await server.api.post("/api/v1/members", {"email": "eve@confined.test",
                                                         "role": "admin"}, key=key))
    _forbidden(await server.api.delete(f"/api/v1/members/{bob}", key=key))
    _forbidden(await server.api.post("/api/v1/environments", {"name": "Mine"}, key=key))
    _forbidden(await server.api.delete(f"/api/v1/environments/{staging}", key=key))
    gone = await server.api.delete(f"/api/v1/environments/{org['default_environment_id']}",
                                   key=key)
    assert gone.status == 404
    _forbidden(await server.api.post("/api/v1/api-keys", {"role": "owner"}, key=key))
    _forbidden(await server.api.post("/api/v1/api-keys", {
        "environment_ids": [org["default_environment_id"]]}, key=key))
    child = await server.api.post("/api/v1/api-keys", {"environment_ids": None}, key=key)
    assert child.status == 201 and child.json["environment_ids"] == [staging]
    member = (await server.api.get(f"/api/v1/members/{bob}", key=owner)).json
    assert member["role"] == "member"
    renamed = await server.api.patch(f"/api/v1/environments/{staging}", {"name": "Stage"},
                                     key=key)
    assert renamed.status == 200  # its own environment's settings are its business


@pytest_twisted.ensureDeferred
async def test_environment_confined_key_manages_only_its_environments_memberships(server):
    """It may assign people within its own environment; their other assignments stay."""
    org, _, staging, bob, confined = await _confined(server)
    key = confined["key"]
    foreign = await server.api.patch(f"/api/v1/members/{bob}", {"environments": [
        {"environment_id": org["default_environment_id"], "role": "admin"}]}, key=key)
    assert foreign.status == 404
    twice = await server.api.patch(f"/api/v1/members/{bob}", {"environments": [
        {"environment_id": staging, "role": "admin"},
        {"environment_id": staging, "role": "member"}]}, key=key)
    assert twice.status == 400 and twice.json["error"]["field"] == "environments"
    assigned = await server.api.patch(f"/api/v1/members/{bob}", {"environments": [
        {"environment_id": staging, "role": "admin"}]}, key=key)
    assert assigned.status == 200, assigned
    assert sorted((e["environment_id"], e["role"]) for e in assigned.json["environments"]) \
        == sorted([(org["default_environment_id"], "member"), (staging, "admin")])
    cleared = await server.api.patch(f"/api/v1/members/{bob}", {"environments": []}, key=key)
    assert cleared.json["environments"] == [
        {"environment_id": org["default_environment_id"], "role": "member"}]


@pytest_twisted.ensureDeferred
async def test_environment_confined_key_reads_no_one_elses_organization_audit_rows(server):
    """Audit rows of its environments and its own; not the organization's other rows
    (member changes, keys minted, other people's refusals)."""
    _, owner, staging, _, confined = await _confined(server)
    key = confined["key"]
    await server.api.patch(f"/api/v1/environments/{staging}", {"name": "Stage"}, key=key)
    await server.api.post("/api/v1/members", {"email": "eve@confined.test"}, key=key)
    await server.core.audit.flush()
    rows = (await server.api.get("/api/v1/audit-logs?limit=100", key=key)).json["data"]
    assert {r["action"] for r in rows} >= {"environments.update", "members.create"}
    assert all(r["environment_id"] == staging or r["actor"]["id"] == confined["id"]
               for r in rows), rows
    everything = (await server.api.get("/api/v1/audit-logs?limit=100", key=owner)).json["data"]
    others = {r["id"] for r in everything if r["environment_id"] is None
              and r["actor"]["id"] != confined["id"]}
    assert others and not others & {r["id"] for r in rows}


@pytest_twisted.ensureDeferred
async def test_admins_cannot_demote_peers_and_the_owner_changes_only_by_transfer(server):
    """Role changes through PATCH bodies: no admin demotes an admin, nobody demotes the owner."""
    org = await _org_with_owner(server)
    admin_key = (await server.api.post("/api/v1/api-keys", {"role": "admin"},
                                       key=org.owner_key)).json["key"]
    peer = await _add(server, org.owner_key, "peer@roles.test", role="admin")
    plain = await _add(server, org.owner_key, "plain@roles.test")
    _forbidden(await server.api.patch(f"/api/v1/members/{peer}", {"role": "member"},
                                      key=admin_key))
    _forbidden(await server.api.patch(f"/api/v1/members/{plain}", {"role": "owner"},
                                      key=admin_key))
    for key in (admin_key, org.owner_key):
        kept = await server.api.patch(f"/api/v1/members/{org.owner_id}", {"role": "admin"},
                                      key=key)
        assert kept.status == 409 and kept.json["error"]["type"] == "conflict"
    promoted = await server.api.patch(f"/api/v1/members/{plain}", {"role": "admin"},
                                      key=admin_key)
    assert promoted.status == 200
    demoted = await server.api.patch(f"/api/v1/members/{peer}", {"role": "member"},
                                     key=org.owner_key)
    assert demoted.status == 200 and demoted.json["role"] == "member"


def _imap_login(port: int, user: str, key: str) -> str:
    """'OK' when IMAP LOGIN (over implicit TLS) accepts the key, 'NO' when it refuses."""
    ctx = ssl.create_default_context(cafile=_DEV_TLS["ca"])
    imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=20)
    try:
        imap.login(user, key)
    except imaplib.IMAP4.error:
        imap.shutdown()
        return "NO"
    imap.logout()
    return "OK"


@pytest_twisted.ensureDeferred
async def test_imap_login_follows_the_holders_current_roles(server):
    """The same rules at the IMAP door: confinement to environments and removal."""
    org = await _org_with_owner(server)
    bob = await _add(server, org.owner_key, "bob@imap-power.test")
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "power-imap"},
                                   key=org.owner_key)).json
    bob_key = await _hand_over(server, org, bob)
    staging = (await server.api.post("/api/v1/environments", {"name": "Staging"},
                                      key=bob_key)).json["id"]

    async def login() -> str:
        return await deferToThread(_imap_login, server.imaps_port, inbox["email"],
                                   org.owner_key)

    path = f"/api/v1/members/{org.owner_id}"
    assert await login() == "OK"
    await server.api.patch(path, {"role": "member", "environments": [
        {"environment_id": staging, "role": "admin"}]}, key=bob_key)
    assert await login() == "NO"
    await server.api.patch(path, {"environments": [
        {"environment_id": org.default_env, "role": "member"}]}, key=bob_key)
    assert await login() == "OK"
    await server.api.delete(path, key=bob_key)
    assert await login() == "NO"


@pytest_twisted.ensureDeferred
async def test_a_holders_role_change_notifies_every_process_about_their_keys(server, db_dsn):
    """Demotions reach open sessions at once: an ownership transfer NOTIFYs the key
    channel for each live key of the old owner (at COMMIT), so every process's
    LiveCredentials re-reads them instead of waiting for its periodic check."""
    import select

    import psycopg2

    from agentpost.storage.keys import KEY_CHANNEL

    org = await _org_with_owner(server)
    spare = await server.api.post("/api/v1/api-keys", {"role": "owner"}, key=org.owner_key)
    assert spare.status == 201
    bob = await _add(server, org.owner_key, "bob@power.test", role="admin")
    listener = psycopg2.connect(db_dsn)
    listener.autocommit = True
    try:
        with listener.cursor() as cur:
            cur.execute(f"LISTEN {KEY_CHANNEL}")
            cur.execute("SELECT id FROM api_keys WHERE org_id = %s AND user_id = %s "
                        "AND revoked_at IS NULL", (org.id, org.owner_id))
            alices_keys = {row[0] for row in cur.fetchall()}
        assert len(alices_keys) == 2
        await _hand_over(server, org, bob)

        def heard() -> set[str]:
            ids: set[str] = set()
            for _ in range(50):  # a bounded wait: the notices are sent at COMMIT
                if select.select([listener], [], [], 0.2)[0]:
                    listener.poll()
                    ids.update(n.payload for n in listener.notifies)
                    listener.notifies.clear()
                if alices_keys <= ids:
                    break
            return ids

        assert alices_keys <= await deferToThread(heard)
    finally:
        listener.close()


@pytest_twisted.ensureDeferred
async def test_a_member_update_that_changes_nothing_does_not_wait_for_a_notice(server):
    """PATCH a person who holds keys with the role they have: no trigger NOTIFYs for a
    change that is not one, and the answer waited for a notice that never came (the key
    cache's 5 s timeout on every such call). The update notifies for the person's keys
    itself now, so its wait ends by that notice."""
    org = await _org_with_owner(server)
    bob = await _add(server, org.owner_key, "bob@noop.test", "admin")
    bob_key = await _hand_over(server, org, bob)  # alice, who holds owner_key: admin now
    cache = server.core.key_cache
    timeouts = cache.waiters.timeouts
    same = await server.api.patch(f"/api/v1/members/{org.owner_id}", {"role": "admin"},
                                  key=bob_key)
    assert same.status == 200 and same.json["role"] == "admin"
    assert cache.waiters.timeouts == timeouts
    changed = await server.api.patch(f"/api/v1/members/{org.owner_id}", {"role": "member"},
                                     key=bob_key)
    assert changed.status == 200 and changed.json["role"] == "member"
    assert cache.waiters.timeouts == timeouts  # a real change: ended by its notice
    _forbidden(await server.api.get("/api/v1/audit-logs", key=org.owner_key))
