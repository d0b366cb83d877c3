"""API keys: minted with at most the rights of whoever mints them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agentpost.auth import secrets
from agentpost.auth.key_cache import KeyCache
from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.core.organizations import MintedKey
from agentpost.model.errors import Forbidden, InvalidRequest, NotFound
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.model.scopes import ROLE_SCOPES, role_at_least, unknown_scopes
from agentpost.storage import keys as key_store
from agentpost.storage import orgs as org_store
from agentpost.storage.database import Database, Txn


def _visible(p: Principal, row: dict[str, Any]) -> bool:
    """A restricted caller sees only keys confined to environments it may use."""
    if p.environment_ids is None:
        return True
    return bool(row["env_restricted"]) and set(row["environment_ids"]) <= p.environment_ids


def holder_rank(row: dict[str, Any]) -> str:
    """The organization rank of whoever holds the key *now* (a ``_HOLDER_COLS`` row).

    A key held by nobody (an operator-issued "owner seat" key, or one such a key
    minted) ranks as the power it can still carry: owner while the organization has no
    owner person, admin once one exists (auth.cred._effective_power). A holder who is
    no longer a member ranks lowest: such keys are refused and revoked already.
    """
    if row["user_id"] is None:
        return "admin" if row["org_has_owner"] else "owner"
    return str(row["holder_role"] or "member")


def _require_may_manage(p: Principal, row: dict[str, Any]) -> None:
    """Refuse changes to keys of people (or with a role) above the caller's rank.

    People manage keys of their own rank or below: an admin never cuts off the
    owner's agents, even through an admin- or member-role key the owner minted; an
    owner manages every key; a member only their own holder's. A key may always
    retire itself: that only gives up the bearer's own power.
    """
    if row["id"] == p.credential_id and p.credential_type == "api_key":
        return
    if not role_at_least(p.role, row["role"]):
        raise Forbidden(f"A {p.role} key cannot revoke a {row['role']} key.")
    holder = holder_rank(row)
    if not role_at_least(p.role, holder):
        raise Forbidden(f"A {p.role} cannot revoke or change a key held by an "
                        f"organization {holder}.")
    if not role_at_least(p.role, "admin") and (p.user_id is None
                                               or row["user_id"] != p.user_id):
        # Members use inboxes; they may retire their own keys, never cut off
        # a colleague's (or the owner's) agents.
        raise Forbidden("A member key can revoke only keys of its own holder.")


class APIKeys:
    """Create, list, read and revoke keys."""

    def __init__(self, db: Database, audit: AuditTrail, key_cache: KeyCache | None = None) -> None:
        self._db = db
        self._audit = audit
        self._key_cache = key_cache

    async def create(self, ctx: RequestContext, *, name: str, scopes: list[str] | None,
                     environment_ids: list[str] | None, expires_at: datetime | None,
                     role: str | None) -> MintedKey:
        """Mint a key; never more scopes, environments or role than the creator holds.

        ``p`` carries the creator's *effective* power (already capped by its holder's
        current roles), and the new key is held by the same person, so it is capped
        by that person's roles on every later use too.
        """
        p = ctx.org_principal
        p.require("api_keys:write")
        role = role or ("member" if p.role == "member" else "admin")
        if role not in ROLE_SCOPES:
            raise InvalidRequest("role must be owner, admin or member.", field="role")
        if not role_at_least(p.role, role):
            raise Forbidden(f"A {p.role} key cannot create a {role} key.")
        if scopes is None:
            scopes = sorted(p.scopes & ROLE_SCOPES[role])
        scopes = sorted(set(scopes))  # a repeated scope is one scope, stored once
        bad = unknown_scopes(scopes)
        if bad:
            raise InvalidRequest(f"Unknown scopes: {', '.join(bad)}.", field="scopes")
        excess = sorted(set(scopes) - p.scopes)
        if excess:
            raise Forbidden(f"Cannot grant scopes this key lacks: {', '.join(excess)}.",
                            missing_scope=excess[0])
        beyond_role = sorted(set(scopes) - ROLE_SCOPES[role])
        if beyond_role:
            raise InvalidRequest(f"A {role} key cannot hold: {', '.join(beyond_role)}.",
                                 field="scopes")
        if p.environment_ids is not None:
            if environment_ids is None:
                environment_ids = sorted(p.environment_ids)
            elif not set(environment_ids) <= p.environment_ids:
                raise Forbidden("Cannot grant environments this key may not use.")
        if environment_ids is not None and not environment_ids:
            raise InvalidRequest("environment_ids, when given, must name at least one.",
                                 field="environment_ids")
        if expires_at is not None and expires_at.timestamp() <= self._db.now().timestamp():
            raise InvalidRequest("expires_at must be in the future.", field="expires_at")

        async def txn_fn(txn: Txn) -> MintedKey:
            for env_id in environment_ids or ():
                if await org_store.get_environment(txn, p.org_id, env_id) is None:
                    raise InvalidRequest(f"No such environment: {env_id}.",
                                         field="environment_ids")
            secret = secrets.new_api_key()
            row = await key_store.insert_api_key(
                txn, org_id=p.org_id, key_id=new_id("key"), name=name,
                display_prefix=secret.display_prefix, digest=secret.digest, role=role,
                scopes=scopes, environment_ids=sorted(set(environment_ids))
                if environment_ids is not None else None,
                created_by=p.actor, user_id=p.user_id, expires_at=expires_at,
            )
            ctx.target_id = row["id"]
            await self._audit.write_in(txn, ctx, 201)
            return MintedKey(row, secret.plaintext)

        return await self._db.run_interaction("api_keys.create", txn_fn)

    async def list(self, ctx: RequestContext, after_id: str | None,
                   limit: int) -> list[dict[str, Any]]:
        """Keys newest first (never their secrets)."""
        p = ctx.org_principal
        p.require("api_keys:read")
        within = sorted(p.environment_ids) if p.environment_ids is not None else None
        rows = await self._db.run_read(
            "api_keys.list", key_store.list_api_keys, p.org_id, after_id, limit + 1, within
        )
        return [r for r in rows if _visible(p, r)]  # as the query filtered; kept as a guard

    async def get(self, ctx: RequestContext, key_id: str) -> dict[str, Any]:
        """One key's metadata."""
        p = ctx.org_principal
        p.require("api_keys:read")
        ctx.target_id = key_id
        row = await self._db.run_read(
            "api_keys.get", key_store.get_api_key, p.org_id, key_id
        )
        if row is None or not _visible(p, row):
            raise NotFound()
        return row

    async def revoke(self, ctx: RequestContext, key_id: str) -> dict[str, Any]:
        """Revoke at once: the next request with the key fails, in every process."""
        p = ctx.org_principal
        p.require("api_keys:write")
        ctx.target_id = key_id

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            row = await key_store.get_api_key_with_holder(txn, p.org_id, key_id)
            if row is None or not _visible(p, row):
                raise NotFound()
            _require_may_manage(p, row)
            await key_store.revoke_api_key(txn, p.org_id, key_id)
            await self._audit.write_in(txn, ctx)
            revoked = await key_store.get_api_key(txn, p.org_id, key_id)
            assert revoked is not None  # read above; keys are revoked, never deleted
            return revoked

        ticket = 0 if self._key_cache is None else self._key_cache.ticket()
        revoked = await self._db.run_interaction("api_keys.revoke", txn_fn)
        if self._key_cache is not None:  # answer once the revocation reached the listeners
            await self._key_cache.settle(ticket)
        return revoked
