"""Inboxes: the mailboxes agents own."""

from __future__ import annotations

import re
import secrets
from typing import Any

from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.core.reserved import ReservedNames
from agentpost.core.route_cache import RouteCache
from agentpost.model.errors import InvalidRequest, NotFound, ReservedAddress
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.storage import inboxes as inbox_store
from agentpost.storage import mail as mail_store
from agentpost.storage import orgs as org_store
from agentpost.storage.database import Database, Txn

_USERNAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._+-]{0,62}[a-z0-9])?\Z")
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                        r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _list_scope(ctx: RequestContext,
                environment_id: str | None) -> tuple[str, frozenset[str] | None]:
    """The organization and environments a list may show this caller."""
    p = ctx.org_principal
    p.require("inboxes:read")
    if environment_id is None:
        return p.org_id, p.environment_ids
    p.require_environment(environment_id)
    return p.org_id, frozenset({environment_id})


async def resolve_environment(txn: Txn, p: Principal, env_id: str | None) -> str:
    """The environment a new resource goes into: the one named, else the default."""
    if env_id is not None:
        p.require_environment(env_id)
        if await org_store.get_environment(txn, p.org_id, env_id) is None:
            raise NotFound("No such environment.")
        return env_id
    default = await org_store.get_default_environment(txn, p.org_id)
    if default is not None and p.may_use_environment(default["id"]):
        default_id: str = default["id"]
        return default_id
    if p.environment_ids is not None and len(p.environment_ids) == 1:
        return next(iter(p.environment_ids))
    raise InvalidRequest("environment_id is required for this key.", field="environment_id")


class Inboxes:
    """Create, list, read, update and delete inboxes."""

    def __init__(self, db: Database, audit: AuditTrail, shared_domain: str,
                 collector: Any = None, reserved: ReservedNames | None = None, *,
                 routes: RouteCache | None = None) -> None:
        """``routes``: the MX's route cache, settled after a deletion."""
        self._db = db
        self._routes = routes
        self._audit = audit
        self._shared_domain = shared_domain.lower()
        self._collector = collector
        self._reserved = reserved if reserved is not None else ReservedNames()

    async def create(self, ctx: RequestContext, *, username: str | None, domain: str | None,
                     display_name: str | None, environment_id: str | None,
                     client_id: str | None) -> tuple[dict[str, Any], bool]:
        """Create an inbox; returns (inbox, created). A repeated client_id returns the first."""
        p = ctx.org_principal
        p.require("inboxes:write")
        username = (username or "agent-" + secrets.token_hex(5)).lower()
        if not _USERNAME_RE.match(username):
            raise InvalidRequest(
                "username must be 1-64 of a-z, 0-9, '.', '_', '+', '-', starting and ending "
                "with a letter or digit.", field="username")
        domain = (domain or self._shared_domain).lower().rstrip(".")
        if not _DOMAIN_RE.match(domain):
            raise InvalidRequest("domain is not a valid domain name.", field="domain")

        async def txn_fn(txn: Txn) -> tuple[dict[str, Any], bool]:
            env_id = await resolve_environment(txn, p, environment_id)
            ctx.environment_id = env_id
            if client_id is not None:
                existing = await inbox_store.get_inbox_by_client_id(txn, p.org_id, env_id,
                                                                    client_id)
                if existing is not None:
                    ctx.target_id = existing["id"]
                    return existing, False
            if not await inbox_store.domain_usable(txn, p.org_id, env_id, domain):
                raise InvalidRequest(
                    f"The domain {domain} is not hosted here for this environment.",
                    field="domain")
            await self._refuse_reserved(txn, username, domain)
            inbox = await inbox_store.insert_inbox(
                txn, org_id=p.org_id, inbox_id=new_id("inb"), environment_id=env_id,
                username=username, domain=domain, display_name=display_name or "",
                client_id=client_id,
            )
            await mail_store.create_system_folders(txn, p.org_id, env_id, inbox["id"])
            ctx.target_id = inbox["id"]
            await self._audit.write_in(txn, ctx, 201)
            return inbox, True

        return await self._db.run_interaction("inboxes.create", txn_fn)

    async def _refuse_reserved(self, txn: Txn, username: str, domain: str) -> None:
        """On a shared domain the operator's names (postmaster, abuse, admin, ...) are
        nobody else's: whoever holds them can get certificates for the whole domain."""
        if username in self._reserved and \
                await inbox_store.domain_kind(txn, domain) == "shared":
            raise ReservedAddress(
                f"The username {username!r} is reserved on the shared domain {domain}; "
                "choose another one.", field="username")

    async def list_page(self, ctx: RequestContext, *, environment_id: str | None,
                        after_id: str | None, limit: int) -> tuple[str, str | None]:
        """:meth:`list` (same checks, same rows) as one page joined by PostgreSQL: each
        inbox as its JSON view, separated by commas, and the last id when another page
        follows (storage.inboxes.list_inbox_page)."""
        org_id, envs = _list_scope(ctx, environment_id)
        return await self._db.run_read(
            "inboxes.list", inbox_store.list_inbox_page, org_id, envs, after_id, limit
        )

    async def list(self, ctx: RequestContext, *, environment_id: str | None,
                   after_id: str | None, limit: int) -> list[dict[str, Any]]:
        """Inboxes newest first; ``limit + 1`` rows so the caller can tell if more exist."""
        org_id, envs = _list_scope(ctx, environment_id)
        return await self._db.run_read(
            "inboxes.list", inbox_store.list_inboxes, org_id, envs, after_id, limit + 1
        )

    async def get(self, ctx: RequestContext, inbox_id: str) -> dict[str, Any]:
        """One inbox of the caller's organization and environments."""
        p = ctx.org_principal
        p.require("inboxes:read")
        ctx.target_id = inbox_id
        inbox = await self._db.run_read(
            "inboxes.get", inbox_store.get_inbox, p.org_id, p.environment_ids, inbox_id
        )
        if inbox is None:
            raise NotFound()
        ctx.environment_id = inbox["environment_id"]
        return inbox

    async def update(self, ctx: RequestContext, inbox_id: str,
                     changes: dict[str, Any]) -> dict[str, Any]:
        """Change display_name and/or send_paused."""
        p = ctx.org_principal
        p.require("inboxes:write")
        ctx.target_id = inbox_id

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            inbox = await inbox_store.update_inbox(txn, p.org_id, p.environment_ids, inbox_id,
                                                   changes)
            if inbox is None:
                raise NotFound()
            ctx.environment_id = inbox["environment_id"]
            await self._audit.write_in(txn, ctx)
            return inbox

        return await self._db.run_interaction("inboxes.update", txn_fn)

    async def delete(self, ctx: RequestContext, inbox_id: str) -> None:
        """Delete an inbox (its mail goes with it, once mail exists)."""
        p = ctx.org_principal
        p.require("inboxes:write")
        ctx.target_id = inbox_id

        freed: list[str] = []

        async def txn_fn(txn: Txn) -> None:
            inbox = await inbox_store.get_inbox(txn, p.org_id, p.environment_ids, inbox_id)
            if inbox is None:
                raise NotFound()
            keys = await mail_store.blob_keys_of_inbox(txn, p.org_id, inbox_id)
            # The inbox (and, by cascade, its messages) first: a blob nobody else uses
            # loses its row on release, which its messages' rows still named (a 409).
            await inbox_store.delete_inbox(txn, p.org_id, p.environment_ids, inbox_id)
            for key in keys:
                if await mail_store.release_blob(txn, key):
                    freed.append(key)
            ctx.environment_id = inbox["environment_id"]
            await self._audit.write_in(txn, ctx, 204)

        ticket = 0 if self._routes is None else self._routes.ticket()
        await self._db.run_interaction("inboxes.delete", txn_fn)
        if self._routes is not None:  # RCPT refuses the name at once, in every process
            await self._routes.settle(ticket)
        if self._collector is not None:
            await self._collector.collect(freed)

    async def ensure_shared_domain(self) -> None:
        """Record the configured shared domain at start-up."""
        await self._db.run_interaction(
            "domains.ensure_shared", inbox_store.ensure_shared_domain, self._shared_domain
        )
