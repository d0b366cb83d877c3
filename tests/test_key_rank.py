"""People manage keys within their rank: an admin never revokes the owner's keys.

A key used to be judged only by the role it was minted with, so an admin could revoke
an admin- or member-role key the owner had minted for the owner's own agents. Now the
holder's *current* organization rank counts too; membership changes stay guarded so an
admin cannot get around it by removing or demoting the owner, or by crowning someone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest_twisted


@dataclass
class People:
    """alice: admin (a former owner); bob: the owner; carol: a member (a former owner)."""

    org_id: str
    env: str
    alice_key: str
    bob_key: str
    carol_key: str
    ids: dict[str, str]


def _forbidden(resp: Any) -> None:
    assert resp.status == 403, resp
    assert resp.json["error"]["type"] == "forbidden", resp


async def _works(server: Any, key: str) -> int:
    return (await server.api.get("/api/v1/inboxes", key=key)).status


async def _mint_for_owner(server: Any, admin: str, org_id: str) -> str:
    minted = await server.api.post(f"/admin/v1/organizations/{org_id}/api-keys", {},
                                   key=admin)
    assert minted.status == 201, minted
    return str(minted.json["key"])


async def _transfer(server: Any, key: str, to: str) -> None:
    moved = await server.api.patch(f"/api/v1/members/{to}", {"role": "owner"}, key=key)
    assert moved.status == 200, moved


async def _people(server: Any, tag: str) -> People:
    """Each person holds keys only by having owned the organization once (keys are
    held by whoever mints them; the operator mints only the owner's)."""
    admin = await server.admin_key()
    made = await server.api.post("/admin/v1/organizations", {
        "name": "Rank", "owner_email": f"alice@{tag}.test"}, key=admin)
    assert made.status == 201, made
    org_id, env = made.json["id"], made.json["default_environment_id"]
    alice_key = await _mint_for_owner(server, admin, org_id)
    ids = {"alice": (await server.api.get("/api/v1/members", key=alice_key)).json[
        "data"][0]["user_id"]}
    for name in ("bob", "carol"):
        added = await server.api.post("/api/v1/members", {"email": f"{name}@{tag}.test"},
                                      key=alice_key)
        assert added.status == 201, added
        ids[name] = added.json["user_id"]
    await _transfer(server, alice_key, ids["carol"])
    carol_key = await _mint_for_owner(server, admin, org_id)
    await _transfer(server, carol_key, ids["bob"])
    bob_key = await _mint_for_owner(server, admin, org_id)
    demoted = await server.api.patch(f"/api/v1/members/{ids['carol']}", {
        "role": "member", "environments": [{"environment_id": env, "role": "member"}]},
        key=bob_key)
    assert demoted.status == 200, demoted
    return People(org_id, env, alice_key, bob_key, carol_key, ids)


async def _mint(server: Any, key: str, **body: Any) -> dict[str, Any]:
    made = await server.api.post("/api/v1/api-keys", {"name": "bot", **body}, key=key)
    assert made.status == 201, made
    return dict(made.json)


@pytest_twisted.ensureDeferred
async def test_an_admin_cannot_revoke_keys_the_owner_holds(server):
    """Admin → owner's admin-, member- and owner-role keys: 403, and they keep working."""
    p = await _people(server, "rank-owner")
    roles = {m["user_id"]: m["role"] for m in
             (await server.api.get("/api/v1/members", key=p.bob_key)).json["data"]}
    assert roles == {p.ids["alice"]: "admin", p.ids["bob"]: "owner",
                     p.ids["carol"]: "member"}
    owners = [await _mint(server, p.bob_key, role="admin"),
              await _mint(server, p.bob_key, role="member"),
              await _mint(server, p.bob_key, role="member", environment_ids=[p.env])]
    listed = await server.api.get("/api/v1/api-keys", key=p.alice_key)
    assert {k["id"] for k in owners} <= {k["id"] for k in listed.json["data"]}
    for key in owners:
        _forbidden(await server.api.delete(f"/api/v1/api-keys/{key['id']}",
                                           key=p.alice_key))
        assert await _works(server, key["key"]) == 200
        got = await server.api.get(f"/api/v1/api-keys/{key['id']}", key=p.bob_key)
        assert got.json["revoked_at"] is None, got
    # A key confined to an environment is no way around it either.
    confined = await _mint(server, p.alice_key, role="admin", environment_ids=[p.env])
    _forbidden(await server.api.delete(f"/api/v1/api-keys/{owners[2]['id']}",
                                       key=confined["key"]))
    assert await _works(server, owners[2]["key"]) == 200
    # The owner manages their own keys (and anyone's).
    assert (await server.api.delete(f"/api/v1/api-keys/{owners[0]['id']}",
                                    key=p.bob_key)).status == 200
    assert await _works(server, owners[0]["key"]) == 401
    assert (await server.api.delete(f"/api/v1/api-keys/{confined['id']}",
                                    key=p.bob_key)).status == 200


@pytest_twisted.ensureDeferred
async def test_an_admin_revokes_member_keys_and_nothing_foreign(server):
    """Admin → a member's key: revoked; another organization's key id: 404."""
    p = await _people(server, "rank-member")
    carols = await _mint(server, p.carol_key)
    assert carols["role"] == "member"
    own = await _mint(server, p.alice_key, role="member", environment_ids=[p.env])
    _forbidden(await server.api.delete(f"/api/v1/api-keys/{own['id']}", key=p.carol_key))
    revoked = await server.api.delete(f"/api/v1/api-keys/{carols['id']}", key=p.alice_key)
    assert revoked.status == 200 and revoked.json["revoked_at"] is not None, revoked
    assert await _works(server, carols["key"]) == 401
    assert await _works(server, own["key"]) == 200

    _, stranger = await server.new_org("Stranger")
    foreign = await _mint(server, stranger)
    for key in (p.alice_key, p.bob_key):
        gone = await server.api.delete(f"/api/v1/api-keys/{foreign['id']}", key=key)
        assert gone.status == 404 and gone.json["error"]["type"] == "not_found", gone
    assert await _works(server, foreign["key"]) == 200


@pytest_twisted.ensureDeferred
async def test_a_key_may_always_retire_itself(server):
    """A member's key revokes itself even when held by nobody below the caller's rank."""
    p = await _people(server, "rank-self")
    carols = await _mint(server, p.carol_key)
    gone = await server.api.delete(f"/api/v1/api-keys/{carols['id']}", key=p.carol_key)
    assert gone.status == 200, gone
    bot = await _mint(server, p.bob_key, role="member")
    assert (await server.api.delete(f"/api/v1/api-keys/{bot['id']}",
                                    key=bot["key"])).status == 200
    assert await _works(server, bot["key"]) == 401


@pytest_twisted.ensureDeferred
async def test_keys_held_by_nobody_rank_as_the_owner_seat(server):
    """Seat keys: owner-ranked while nobody owns the organization, admin-ranked after."""
    org, seat = await server.new_org("Seat")
    child = await _mint(server, seat, role="admin")
    bob = await server.api.post("/api/v1/members", {"email": "bob@rank-seat.test"}, key=seat)
    assert bob.status == 201, bob
    await _transfer(server, seat, bob.json["user_id"])
    # The seat key now acts as an admin: the owner's keys are out of its reach...
    bob_key = await _mint_for_owner(server, await server.admin_key(), org["id"])
    bobs_bot = await _mint(server, bob_key, role="member")
    _forbidden(await server.api.delete(f"/api/v1/api-keys/{bobs_bot['id']}", key=seat))
    # ...but keys nobody holds are admin-ranked now, so admins may clean them up.
    assert (await server.api.delete(f"/api/v1/api-keys/{child['id']}",
                                    key=seat)).status == 200


@pytest_twisted.ensureDeferred
async def test_an_admin_cannot_remove_demote_or_replace_the_owner(server):
    """No way around the key rule through membership: the owner stays the owner."""
    p = await _people(server, "rank-roles")
    bob, carol, alice = p.ids["bob"], p.ids["carol"], p.ids["alice"]
    removed = await server.api.delete(f"/api/v1/members/{bob}", key=p.alice_key)
    assert removed.status == 409 and removed.json["error"]["type"] == "conflict", removed
    demoted = await server.api.patch(f"/api/v1/members/{bob}", {"role": "member"},
                                     key=p.alice_key)
    assert demoted.status == 409 and demoted.json["error"]["type"] == "conflict", demoted
    for who in (carol, alice):
        _forbidden(await server.api.patch(f"/api/v1/members/{who}", {"role": "owner"},
                                          key=p.alice_key))
    roles = {m["user_id"]: m["role"] for m in
             (await server.api.get("/api/v1/members", key=p.bob_key)).json["data"]}
    assert roles == {alice: "admin", bob: "owner", carol: "member"}
    assert await _works(server, p.bob_key) == 200
