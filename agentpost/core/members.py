"""Members: people in an organization and their organization/environment roles."""

from __future__ import annotations

import builtins
from typing import Any

from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.model.errors import Conflict, Forbidden, InvalidRequest, NotFound
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.model.scopes import ENV_ROLES, ORG_ROLES, role_at_least
from agentpost.storage import keys as key_store
from agentpost.storage import orgs as org_store
from agentpost.storage.database import Database, Txn


class Members:
    """List members, change roles (owner transfer included), remove members."""

    def __init__(self, db: Database, audit: AuditTrail, key_cache: Any = None) -> None:
        self._db = db
        self._audit = audit
        self._key_cache = key_cache  # auth.key_cache.KeyCache: answers wait for its NOTIFY

    def _ticket(self) -> int:
        return 0 if self._key_cache is None else self._key_cache.ticket()

    async def _settled(self, key_ids: builtins.list[str], ticket: int) -> None:
        """After a committed change to people's power: answer once its NOTIFY (sent by
        the trigger for every key of the person, all at the one COMMIT) is back on this
        process's LISTEN link, as revocation does (core.api_keys), so no other process
        answers the client's next request from a key it cached before the change.
        ``ticket``: taken before the transaction (storage.notice_wait)."""
        if self._key_cache is not None and key_ids:
            await self._key_cache.settle(ticket)

    async def list(self, ctx: RequestContext, after_id: str | None,
                   limit: int) -> list[dict[str, Any]]:
        """Members, newest first."""
        p = ctx.org_principal
        p.require("members:read")
        return await self._db.run_read(
            "members.list", org_store.list_members, p.org_id, after_id, limit + 1
        )

    async def get(self, ctx: RequestContext, user_id: str) -> dict[str, Any]:
        """One member."""
        p = ctx.org_principal
        p.require("members:read")
        ctx.target_id = user_id
        row = await self._db.run_read("members.get", org_store.get_member, p.org_id,
                                             user_id)
        if row is None:
            raise NotFound()
        return row

    async def add(self, ctx: RequestContext, email: str, role: str,
                  display_name: str = "") -> dict[str, Any]:
        """Add a person directly (operators provisioning; invitations come with the console)."""
        p = ctx.org_principal
        p.require("members:write")
        if role not in ("admin", "member"):
            raise InvalidRequest("role must be admin or member.", field="role")
        if not role_at_least(p.role, "admin"):
            raise Forbidden("Only owners and admins may add members.")
        p.require_organization_wide("add people to the organization")
        if "@" not in email:
            raise InvalidRequest("email must be an address.", field="email")

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            user = await org_store.insert_user(txn, new_id("usr"), email, display_name)
            await org_store.insert_membership(txn, p.org_id, user["id"], role)
            ctx.target_id = user["id"]
            await self._audit.write_in(txn, ctx, 201)
            member = await org_store.get_member(txn, p.org_id, user["id"])
            assert member is not None  # the membership was inserted just above
            return member

        return await self._db.run_interaction("members.add", txn_fn)

    async def update(self, ctx: RequestContext, user_id: str, role: str | None,
                     environments: builtins.list[dict[str, str]] | None) -> dict[str, Any]:
        """Change a role; making someone owner transfers ownership (the old owner becomes admin)."""
        p = ctx.org_principal
        p.require("members:write")
        ctx.target_id = user_id
        if role is not None and role not in ORG_ROLES:
            raise InvalidRequest("role must be owner, admin or member.", field="role")
        for item in environments or ():
            if item.get("role") not in ENV_ROLES:
                raise InvalidRequest("environment role must be admin or member.",
                                     field="environments")
        if not role_at_least(p.role, "admin"):
            raise Forbidden("Only owners and admins may change members.")
        if role is not None:
            p.require_organization_wide("change organization roles")

        held: builtins.list[str] = []

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            member = await org_store.get_member(txn, p.org_id, user_id, for_update=True)
            if member is None:
                raise NotFound()
            if role is not None and role != member["role"]:
                await _change_role(txn, p, member, role)
            if environments is not None:
                await _set_environments(txn, p, user_id, environments)
            await self._audit.write_in(txn, ctx)
            updated = await org_store.get_member(txn, p.org_id, user_id)
            assert updated is not None  # locked FOR UPDATE above: still a member
            held[:] = await key_store.live_keys_held_by(txn, p.org_id, user_id)
            if held:  # a notice for _settled to wait for, even when nothing changed
                await key_store.notify_keys_held_by(txn, p.org_id, [user_id])
            return updated

        ticket = self._ticket()
        updated = await self._db.run_interaction("members.update", txn_fn)
        await self._settled(held, ticket)
        return updated

    async def remove(self, ctx: RequestContext, user_id: str) -> None:
        """Remove a member; the owner cannot be removed (transfer first)."""
        p = ctx.org_principal
        p.require("members:write")
        ctx.target_id = user_id
        if not role_at_least(p.role, "admin"):
            raise Forbidden("Only owners and admins may remove members.")
        p.require_organization_wide("remove people from the organization")

        held: builtins.list[str] = []

        async def txn_fn(txn: Txn) -> None:
            member = await org_store.get_member(txn, p.org_id, user_id, for_update=True)
            if member is None:
                raise NotFound()
            if member["role"] == "owner":
                raise Conflict("The owner cannot be removed; transfer ownership first.")
            if member["role"] == "admin" and p.role != "owner":
                raise Forbidden("Only the owner may remove an admin.")
            await org_store.delete_member(txn, p.org_id, user_id)
            # Their keys are refused from now on anyway (no membership, no power);
            # revoking them too means re-adding the person later revives nothing.
            held[:] = await key_store.live_keys_held_by(txn, p.org_id, user_id)
            for key_id in held:
                await key_store.revoke_api_key(txn, p.org_id, key_id)
            await self._audit.write_in(txn, ctx, 204)

        ticket = self._ticket()
        await self._db.run_interaction("members.remove", txn_fn)
        await self._settled(held, ticket)


async def _change_role(txn: Txn, p: Principal, member: dict[str, Any], role: str) -> None:
    """Change an organization role (the caller checked it is organization-wide).

    The owner changes only by transfer; only the owner transfers ownership and only
    the owner changes an admin's role (as only the owner may remove one), so an admin
    can neither demote a peer nor promote anyone above admin. The people involved
    keep their keys, whose power follows the new roles on their next use.
    """
    if member["role"] == "owner":
        raise Conflict("Transfer ownership by making another member the owner.")
    if role == "owner" or member["role"] == "admin":
        if p.role != "owner":
            raise Forbidden("Only the owner may transfer ownership or change an admin's role.")
    if role == "owner":
        # The caller's role was read when its key was checked; re-check, under the owner
        # row's lock, that it still holds the seat it gives away (two racing transfers
        # by the same key must not both succeed).
        if await org_store.get_owner_id(txn, p.org_id, for_update=True) != p.user_id:
            raise Forbidden("Only the owner may transfer ownership.")
        await org_store.demote_owner(txn, p.org_id)
    await org_store.set_member_role(txn, p.org_id, member["user_id"], role)


async def _set_environments(txn: Txn, p: Principal, user_id: str,
                            environments: list[dict[str, str]]) -> None:
    """Replace a member's environment roles.

    An environment-confined caller names only its own environments (others are "not
    found") and replaces only the assignments within them; the member's assignments
    elsewhere are not its business and stay as they are.
    """
    named = [item["environment_id"] for item in environments]
    if len(set(named)) != len(named):
        raise InvalidRequest("Each environment may appear only once.", field="environments")
    for item in environments:
        p.require_environment(item["environment_id"])
        if await org_store.get_environment(txn, p.org_id, item["environment_id"]) is None:
            raise NotFound("No such environment.")
    await org_store.set_member_environments(
        txn, p.org_id, user_id, [(i["environment_id"], i["role"]) for i in environments],
        within=p.environment_ids,
    )
