"""Environments: isolated partitions of an organization's resources."""

from __future__ import annotations

import re
from typing import Any

from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.model.errors import Conflict, InvalidRequest, NotFound
from agentpost.model.ids import new_id
from agentpost.storage import orgs as org_store
from agentpost.storage.database import Database, Txn

_SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?\Z")


def _slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64].strip("-")
    return slug or "env"


class Environments:
    """List, create, rename and delete environments."""

    def __init__(self, db: Database, audit: AuditTrail) -> None:
        self._db = db
        self._audit = audit

    async def list(self, ctx: RequestContext) -> list[dict[str, Any]]:
        """Environments the caller may see."""
        p = ctx.org_principal
        p.require("environments:read")
        return await self._db.run_read(
            "environments.list", org_store.list_environments, p.org_id, p.environment_ids
        )

    async def get(self, ctx: RequestContext, env_id: str) -> dict[str, Any]:
        """One environment, hidden if restricted away."""
        p = ctx.org_principal
        p.require("environments:read")
        p.require_environment(env_id)
        ctx.target_id = env_id
        env = await self._db.run_read(
            "environments.get", org_store.get_environment, p.org_id, env_id
        )
        if env is None:
            raise NotFound()
        ctx.environment_id = env_id
        return env

    async def create(self, ctx: RequestContext, name: str, slug: str | None) -> dict[str, Any]:
        """A new environment; only unrestricted keys may create them."""
        p = ctx.org_principal
        p.require("environments:write")
        p.require_organization_wide("create environments")
        slug = slug if slug is not None else _slugify(name)
        _check_slug(slug)

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            env = await org_store.insert_environment(txn, p.org_id, new_id("env"), name, slug,
                                                     False)
            ctx.target_id = ctx.environment_id = env["id"]
            await self._audit.write_in(txn, ctx, 201)
            return env

        return await self._db.run_interaction("environments.create", txn_fn)

    async def update(self, ctx: RequestContext, env_id: str,
                     changes: dict[str, Any]) -> dict[str, Any]:
        """Rename or re-slug."""
        p = ctx.org_principal
        p.require("environments:write")
        p.require_environment(env_id)
        ctx.target_id = env_id
        if "slug" in changes:
            _check_slug(changes["slug"])

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            env = await org_store.update_environment(txn, p.org_id, env_id, changes)
            if env is None:
                raise NotFound()
            ctx.environment_id = env_id
            await self._audit.write_in(txn, ctx)
            return env

        return await self._db.run_interaction("environments.update", txn_fn)

    async def delete(self, ctx: RequestContext, env_id: str) -> None:
        """Delete an empty, non-default environment (an organization-wide power: a credential
        confined to environments may rename its own but never delete one)."""
        p = ctx.org_principal
        p.require("environments:write")
        p.require_environment(env_id)
        p.require_organization_wide("delete environments")
        ctx.target_id = env_id

        async def txn_fn(txn: Txn) -> None:
            env = await org_store.get_environment(txn, p.org_id, env_id)
            if env is None:
                raise NotFound()
            ctx.environment_id = env_id
            if env["is_default"]:
                raise Conflict("The default environment cannot be deleted.")
            await org_store.delete_environment(txn, p.org_id, env_id)
            await self._audit.write_in(txn, ctx, 204)

        await self._db.run_interaction("environments.delete", txn_fn)


def _check_slug(slug: str) -> None:
    if not _SLUG_RE.match(slug):
        raise InvalidRequest(
            "slug must be 1-64 lowercase letters, digits and inner hyphens.", field="slug"
        )
