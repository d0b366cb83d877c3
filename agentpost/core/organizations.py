"""Organizations: created by operators (admin API, `agentpost bootstrap`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentpost.auth import secrets
from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.model.errors import InvalidRequest, NotFound
from agentpost.model.ids import new_id
from agentpost.model.scopes import ALL_SCOPES
from agentpost.storage import keys as key_store
from agentpost.storage import orgs as org_store
from agentpost.storage.database import Database, Txn

TIERS = ("free", "developer", "startup", "business", "enterprise")


@dataclass(frozen=True)
class MintedKey:
    """A key row plus its plaintext, which exists only in this value and the response."""

    row: dict[str, Any]
    plaintext: str


class Organizations:
    """Operator-level operations on organizations."""

    def __init__(self, db: Database, audit: AuditTrail) -> None:
        self._db = db
        self._audit = audit

    async def create(self, ctx: RequestContext, name: str, tier: str = "free",
                     owner_email: str | None = None) -> dict[str, Any]:
        """An organization with its default environment (and owner, if named)."""
        if tier not in TIERS:
            raise InvalidRequest(f"tier must be one of {', '.join(TIERS)}.", field="tier")
        if owner_email is not None and "@" not in owner_email:  # as members.add demands
            raise InvalidRequest("owner_email must be an address.", field="owner_email")

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            org = await _create(txn, name, tier, owner_email)
            ctx.target_id = org["id"]
            ctx.details["org_id"] = org["id"]
            await self._audit.write_in(txn, ctx, 201)
            return org

        return await self._db.run_interaction("orgs.create", txn_fn)

    async def get(self, org_id: str) -> dict[str, Any]:
        """One organization with its default environment id."""

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            org = await org_store.get_organization(txn, org_id)
            if org is None:
                raise NotFound()
            env = await org_store.get_default_environment(txn, org_id)
            return {**org, "default_environment_id": env["id"] if env else None}

        return await self._db.run_interaction("orgs.get", txn_fn)

    async def list(self, after_id: str | None, limit: int) -> list[dict[str, Any]]:
        """Organizations newest first."""
        return await self._db.run_read(
            "orgs.list", org_store.list_organizations, after_id, limit + 1
        )

    async def set_tier(self, ctx: RequestContext, org_id: str, tier: str) -> dict[str, Any]:
        """Change the tier (which sets audit retention and limits)."""
        if tier not in TIERS:
            raise InvalidRequest(f"tier must be one of {', '.join(TIERS)}.", field="tier")

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            org = await org_store.set_tier(txn, org_id, tier)
            if org is None:
                raise NotFound()
            ctx.target_id = org_id
            ctx.details["org_id"] = org_id
            await self._audit.write_in(txn, ctx)
            return org

        return await self._db.run_interaction("orgs.set_tier", txn_fn)

    async def mint_owner_key(self, ctx: RequestContext, org_id: str,
                             name: str = "owner key") -> MintedKey:
        """An owner-level, all-scopes key: how an operator hands an organization over.

        The key is held by the organization's owner person when there is one, so it
        stops being an owner key the moment that person transfers ownership; without
        an owner person it is an "owner seat" key (see auth.cred.principal_from_key).
        """

        async def txn_fn(txn: Txn) -> MintedKey:
            if await org_store.get_organization(txn, org_id) is None:
                raise NotFound()
            holder = await org_store.get_owner_id(txn, org_id)
            minted = await insert_owner_key(txn, org_id, name, ("admin_key", _actor(ctx)),
                                            holder)
            ctx.target_id = minted.row["id"]
            ctx.details["org_id"] = org_id
            await self._audit.write_in(txn, ctx, 201)
            return minted

        return await self._db.run_interaction("orgs.mint_owner_key", txn_fn)

    async def bootstrap(self, name: str, tier: str = "free") -> tuple[dict[str, Any], MintedKey]:
        """What `agentpost bootstrap` does: an organization and an owner key, atomically."""

        async def txn_fn(txn: Txn) -> tuple[dict[str, Any], MintedKey]:
            org = await _create(txn, name, tier, None)
            minted = await insert_owner_key(txn, org["id"], "bootstrap", ("cli", "bootstrap"),
                                            None)
            return org, minted

        return await self._db.run_interaction("orgs.bootstrap", txn_fn)

    async def create_admin_key(self, name: str) -> MintedKey:
        """An installation admin key, printed once by `agentpost admin-key create`."""
        secret = secrets.new_admin_key()
        row = await self._db.run_interaction(
            "admin_keys.create", key_store.insert_admin_key, new_id("adk"), name,
            secret.display_prefix, secret.digest,
        )
        return MintedKey(row, secret.plaintext)


async def _create(txn: Txn, name: str, tier: str, owner_email: str | None) -> dict[str, Any]:
    org = await org_store.insert_organization(txn, new_id("org"), name, tier)
    env = await org_store.insert_environment(txn, org["id"], new_id("env"), "Default",
                                             "default", True)
    if owner_email:
        user = await org_store.insert_user(txn, new_id("usr"), owner_email, "")
        await org_store.insert_membership(txn, org["id"], user["id"], "owner")
    return {**org, "default_environment_id": env["id"]}


async def insert_owner_key(txn: Txn, org_id: str, name: str, created_by: tuple[str, str],
                           user_id: str | None) -> MintedKey:
    """Store an all-scopes owner key held by ``user_id`` (None: the owner seat) and
    return it with its one-time plaintext."""
    secret = secrets.new_api_key()
    row = await key_store.insert_api_key(
        txn, org_id=org_id, key_id=new_id("key"), name=name,
        display_prefix=secret.display_prefix, digest=secret.digest, role="owner",
        scopes=sorted(ALL_SCOPES), environment_ids=None, created_by=created_by,
        user_id=user_id, expires_at=None,
    )
    return MintedKey(row, secret.plaintext)


def _actor(ctx: RequestContext) -> str:
    principal = ctx.principal
    return getattr(principal, "admin_key_id", None) or "unknown"
