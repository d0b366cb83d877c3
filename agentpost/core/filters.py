"""Allow/block filter rules (receive direction enforced at RCPT; send direction later)."""

from __future__ import annotations

from typing import Any

import psycopg2.errors

from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.core.inboxes import resolve_environment
from agentpost.core.route_cache import RouteCache
from agentpost.mail.filters import normalize_value
from agentpost.model.errors import Conflict, InvalidRequest, NotFound
from agentpost.model.ids import new_id
from agentpost.storage import filters as rule_store
from agentpost.storage import inboxes as inbox_store
from agentpost.storage.database import Database, Txn


class FilterRules:
    """Create, list, read and delete rules."""

    def __init__(self, db: Database, audit: AuditTrail,
                 routes: RouteCache | None = None) -> None:
        """``routes``: the MX's route cache, which carries receive rules; a change is
        answered once every process has dropped its copy (RouteCache.settle)."""
        self._db = db
        self._audit = audit
        self._routes = routes

    def _route_ticket(self) -> int:
        return 0 if self._routes is None else self._routes.ticket()

    async def _settle_routes(self, ticket: int) -> None:
        if self._routes is not None:
            await self._routes.settle(ticket)

    async def create(self, ctx: RequestContext, *, direction: str, action: str,
                     match_type: str, value: str, environment_id: str | None,
                     inbox_id: str | None) -> dict[str, Any]:
        """A rule for an environment, or for one inbox."""
        p = ctx.org_principal
        p.require("filters:write")
        try:
            value = normalize_value(match_type, value)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="value") from None

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            env_id = environment_id
            if inbox_id is not None:
                inbox = await inbox_store.get_inbox(txn, p.org_id, p.environment_ids, inbox_id)
                if inbox is None:
                    raise NotFound("No such inbox.")
                if env_id is not None and env_id != inbox["environment_id"]:
                    raise InvalidRequest("inbox_id is not in that environment.",
                                         field="inbox_id")
                env_id = inbox["environment_id"]
            env_id = await resolve_environment(txn, p, env_id)
            ctx.environment_id = env_id
            try:
                rule = await rule_store.insert_rule(txn, {
                    "org_id": p.org_id, "id": new_id("rul"), "environment_id": env_id,
                    "inbox_id": inbox_id, "direction": direction, "action": action,
                    "match_type": match_type, "value": value, "created_at": txn.now})
            except psycopg2.errors.UniqueViolation:
                raise Conflict("An identical rule already exists.") from None
            ctx.target_id = rule["id"]
            await self._audit.write_in(txn, ctx, 201)
            return rule

        ticket = self._route_ticket()
        rule = await self._db.run_interaction("filters.create", txn_fn)
        await self._settle_routes(ticket)
        return rule

    async def list(self, ctx: RequestContext, after_id: str | None,
                   limit: int) -> list[dict[str, Any]]:
        """Rules newest first (limit + 1 rows)."""
        p = ctx.org_principal
        p.require("filters:read")
        return await self._db.run_read("filters.list", rule_store.list_rules, p.org_id,
                                              p.environment_ids, after_id, limit + 1)

    async def get(self, ctx: RequestContext, rule_id: str) -> dict[str, Any]:
        """One rule."""
        p = ctx.org_principal
        p.require("filters:read")
        ctx.target_id = rule_id
        rule = await self._db.run_read("filters.get", rule_store.get_rule, p.org_id,
                                              p.environment_ids, rule_id)
        if rule is None:
            raise NotFound()
        return rule

    async def delete(self, ctx: RequestContext, rule_id: str) -> None:
        """Remove a rule."""
        p = ctx.org_principal
        p.require("filters:write")
        ctx.target_id = rule_id

        async def txn_fn(txn: Txn) -> None:
            rule = await rule_store.get_rule(txn, p.org_id, p.environment_ids, rule_id)
            if rule is None:
                raise NotFound()
            ctx.environment_id = rule["environment_id"]
            await rule_store.delete_rule(txn, p.org_id, rule_id)
            await self._audit.write_in(txn, ctx, 204)

        ticket = self._route_ticket()
        await self._db.run_interaction("filters.delete", txn_fn)
        await self._settle_routes(ticket)
