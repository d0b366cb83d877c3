"""Webhook endpoints: create, read, change, delete, rotate their secret, send a ping,
list and replay deliveries, list a delivery's attempts (scopes ``webhooks:read`` /
``webhooks:write``).

Why the secret is sealed, not hashed: we must sign with it on every delivery, so we
keep it, encrypted with the installation's master key (``[secrets] key_file``,
auth/sealing.py); without that key no endpoint can be created. It is shown once, at
creation and at each rotation. After a rotation the previous secret keeps signing
(next to the new one) for :data:`ROTATION_OVERLAP_S`, so receivers can switch over.

An endpoint belongs to the organization. Its optional filters (event types, an inbox,
environments) narrow what it receives. An environment-confined credential manages only
endpoints whose environment filter lies within its environments, and what it creates
gets its environments as the filter.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from agentpost.auth.sealing import Sealer, context
from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.core.events import check_types, timestamp
from agentpost.model.errors import Conflict, InvalidRequest, NotFound, TemporaryFailure
from agentpost.model.ids import is_id, new_id
from agentpost.model.principal import Principal
from agentpost.storage import inboxes as inbox_store
from agentpost.storage import orgs as org_store
from agentpost.storage import webhooks as store
from agentpost.storage.database import Database, Txn
from agentpost.webhooks.signing import new_secret
from agentpost.webhooks.ssrf import SSRFGuard

ROTATION_OVERLAP_S = 24 * 3600
# Each event is fanned out to every matching endpoint inside its writer's transaction,
# so the number of endpoints an organization may have is bounded.
MAX_WEBHOOKS_PER_ORG = 25


def secret_context(org_id: str, webhook_id: str) -> bytes:
    """Associated data of a sealed webhook secret: where it belongs."""
    return context("webhook", org_id, webhook_id)


async def _check_targets(txn: Txn, p: Principal, values: dict[str, Any]) -> None:
    """The inbox and environments a filter names must be ones this principal sees.

    An id of another organization (or an unknown one) used to be stored as is: an
    endpoint that silently never fires, where the filter rules' own inbox and
    environment fields answer 404 (core.filters)."""
    inbox_id = values.get("inbox_id")
    if inbox_id is not None and await inbox_store.get_inbox(
            txn, p.org_id, p.environment_ids, inbox_id) is None:
        raise NotFound("No such inbox.", field="inbox_id")
    for env_id in values.get("environment_ids") or ():
        if await org_store.get_environment(txn, p.org_id, env_id) is None:
            raise NotFound("No such environment.", field="environment_ids")


class Webhooks:
    """The /webhooks API."""

    def __init__(self, db: Database, audit: AuditTrail, guard: SSRFGuard,
                 sealer: Sealer | None, wake: Callable[[], None] | None = None) -> None:
        self._db = db
        self._audit = audit
        self._guard = guard
        self._sealer = sealer
        self._wake = wake or (lambda: None)

    def _seal(self, org_id: str, webhook_id: str, secret: str) -> bytes:
        if self._sealer is None:
            # The operator's configuration, not the client's request: 503 until fixed.
            raise TemporaryFailure("This installation cannot hold webhook secrets: its "
                                   "operator has not configured [secrets] key_file.")
        return self._sealer.seal(secret.encode("ascii"), secret_context(org_id, webhook_id))

    def _filters(self, ctx: RequestContext, body: dict[str, Any],
                 creating: bool) -> dict[str, Any]:
        """Validated column values for the fields present in ``body``."""
        p = ctx.org_principal
        out: dict[str, Any] = {}
        if "url" in body:
            self._guard.check_syntax(body["url"])
            out["url"] = body["url"]
        if "description" in body:
            out["description"] = body["description"]
        if "enabled" in body:
            out["enabled"] = bool(body["enabled"])
        if "event_types" in body:
            out["event_types"] = check_types(body["event_types"] or [], "event_types") or []
        if "inbox_id" in body:
            if body["inbox_id"] is not None and not is_id(body["inbox_id"], "inb"):
                raise InvalidRequest("inbox_id must be an inbox id.", field="inbox_id")
            out["inbox_id"] = body["inbox_id"]
        if "environment_ids" in body or (creating and p.environment_ids is not None):
            envs = body.get("environment_ids")
            if envs is None and p.environment_ids is not None:
                envs = sorted(p.environment_ids)
            if envs is not None:
                if not envs or not all(is_id(e, "env") for e in envs):
                    raise InvalidRequest("environment_ids must be a non-empty list of "
                                         "environment ids (or null: every environment).",
                                         field="environment_ids")
                for env in envs:
                    p.require_environment(env)
                envs = sorted(set(envs))
            out["environment_ids"] = envs
        return out

    async def create(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        """A new endpoint; the answer carries its secret (the only time it is shown)."""
        p = ctx.org_principal
        p.require("webhooks:write")
        values = self._filters(ctx, body, creating=True)
        webhook_id = new_id("whk")
        secret = new_secret()
        sealed = self._seal(p.org_id, webhook_id, secret)

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            await _check_targets(txn, p, values)
            if await store.count(txn, p.org_id) >= MAX_WEBHOOKS_PER_ORG:
                raise Conflict(f"An organization may have at most "
                                    f"{MAX_WEBHOOKS_PER_ORG} webhook endpoints.")
            row = await store.insert(txn, {
                "org_id": p.org_id, "id": webhook_id, **values,
                "secret_sealed": sealed, "created_at": txn.now, "updated_at": txn.now})
            ctx.target_id = webhook_id
            await self._audit.write_in(txn, ctx, 201)
            return row

        row = await self._db.run_interaction("webhooks.create", txn_fn)
        return {**row, "secret": secret}

    async def list_webhooks(self, ctx: RequestContext, *, after_id: str | None,
                   limit: int) -> list[dict[str, Any]]:
        """Endpoints newest first (limit + 1 rows)."""
        p = ctx.org_principal
        p.require("webhooks:read")
        return await self._db.run_read("webhooks.list", store.list_webhooks, p.org_id,
                                       p.environment_ids, after_id=after_id,
                                       limit=limit + 1)

    async def get(self, ctx: RequestContext, webhook_id: str) -> dict[str, Any]:
        """One endpoint (NotFound when it is not this principal's to see)."""
        p = ctx.org_principal
        p.require("webhooks:read")
        return await self._db.run_interaction("webhooks.get", self._get, ctx, webhook_id)

    async def _get(self, txn: Txn, ctx: RequestContext, webhook_id: str,
                   lock: bool = False) -> dict[str, Any]:
        p = ctx.org_principal
        row = (await store.get(txn, p.org_id, p.environment_ids, webhook_id, lock=lock)
               if is_id(webhook_id, "whk") else None)
        if row is None:
            raise NotFound("No such webhook.")
        ctx.target_id = webhook_id
        return row

    async def update(self, ctx: RequestContext, webhook_id: str,
                     body: dict[str, Any]) -> dict[str, Any]:
        """Change fields; enabling an endpoint resets its failure count."""
        p = ctx.org_principal
        p.require("webhooks:write")
        values = self._filters(ctx, body, creating=False)

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            await self._get(txn, ctx, webhook_id, lock=True)
            await _check_targets(txn, p, values)
            changes = {**values, "updated_at": txn.now}
            if values.get("enabled"):
                changes.update(consecutive_failures=0, disabled_reason=None)
            elif values.get("enabled") is False:
                changes["disabled_reason"] = "manual"
            row = await store.update(txn, p.org_id, webhook_id, changes)
            await self._audit.write_in(txn, ctx, 200)
            return row

        row = await self._db.run_interaction("webhooks.update", txn_fn)
        if values.get("enabled"):
            self._wake()  # its pending deliveries may go now
        return row

    async def delete(self, ctx: RequestContext, webhook_id: str) -> None:
        """Delete an endpoint and its delivery history."""
        p = ctx.org_principal
        p.require("webhooks:write")

        async def txn_fn(txn: Txn) -> None:
            await self._get(txn, ctx, webhook_id, lock=True)
            await store.delete(txn, p.org_id, webhook_id)
            await self._audit.write_in(txn, ctx, 204)

        await self._db.run_interaction("webhooks.delete", txn_fn)

    async def rotate_secret(self, ctx: RequestContext, webhook_id: str) -> dict[str, Any]:
        """A new secret; the current one keeps signing too for ROTATION_OVERLAP_S."""
        p = ctx.org_principal
        p.require("webhooks:write")
        secret = new_secret()
        sealed = self._seal(p.org_id, webhook_id, secret)

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            old = await self._get(txn, ctx, webhook_id, lock=True)
            row = await store.update(txn, p.org_id, webhook_id, {
                "secret_sealed": sealed, "previous_secret_sealed": old["secret_sealed"],
                "previous_expires_at": txn.now + timedelta(seconds=ROTATION_OVERLAP_S),
                "updated_at": txn.now})
            await self._audit.write_in(txn, ctx, 200)
            return row

        row = await self._db.run_interaction("webhooks.rotate_secret", txn_fn)
        return {**row, "secret": secret}

    async def test(self, ctx: RequestContext, webhook_id: str) -> dict[str, Any]:
        """Queue a signed ``webhook.test`` ping (one attempt, no retries)."""
        p = ctx.org_principal
        p.require("webhooks:write")
        delivery_id = new_id("whd")

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            hook = await self._get(txn, ctx, webhook_id)
            if not hook["enabled"]:
                raise Conflict("This webhook is disabled; enable it before testing.")
            await store.insert_ping(txn, org_id=p.org_id, delivery_id=delivery_id,
                                    webhook_id=webhook_id, payload={
                                        "id": delivery_id, "type": "webhook.test",
                                        "timestamp": timestamp(txn.now),
                                        "org_id": p.org_id, "env_id": None,
                                        "data": {"webhook_id": webhook_id}})
            await self._audit.write_in(txn, ctx, 202)
            delivery = await store.get_delivery(txn, p.org_id, webhook_id, delivery_id)
            assert delivery is not None
            return delivery

        row = await self._db.run_interaction("webhooks.test", txn_fn)
        self._wake()
        return row

    async def deliveries(self, ctx: RequestContext, webhook_id: str, *,
                         after_id: str | None, limit: int) -> list[dict[str, Any]]:
        """Deliveries of an endpoint, newest first (limit + 1 rows)."""
        p = ctx.org_principal
        p.require("webhooks:read")

        async def txn_fn(txn: Txn) -> list[dict[str, Any]]:
            await self._get(txn, ctx, webhook_id)
            return await store.list_deliveries(txn, p.org_id, webhook_id,
                                               after_id=after_id, limit=limit + 1)

        return await self._db.run_interaction("webhooks.deliveries", txn_fn)

    async def attempts(self, ctx: RequestContext, webhook_id: str, delivery_id: str, *,
                       after: str | None, limit: int) -> list[dict[str, Any]]:
        """Every attempt of one delivery, newest first (limit + 1 rows). The delivery
        must belong to this endpoint, which must be visible to the principal: another
        organization's (or environment's) delivery is NotFound like a missing one."""
        p = ctx.org_principal
        p.require("webhooks:read")
        if after is not None and not (after.isdigit() and len(after) <= 18):
            raise InvalidRequest("page_token is not valid.", field="page_token")

        async def txn_fn(txn: Txn) -> list[dict[str, Any]]:
            await self._get(txn, ctx, webhook_id)
            if not is_id(delivery_id, "whd") or await store.get_delivery(
                    txn, p.org_id, webhook_id, delivery_id) is None:
                raise NotFound("No such delivery.")
            return await store.list_attempts(txn, p.org_id, delivery_id, after=after,
                                             limit=limit + 1)

        return await self._db.run_interaction("webhooks.attempts", txn_fn)

    async def replay(self, ctx: RequestContext, webhook_id: str,
                     delivery_id: str) -> dict[str, Any]:
        """Queue a finished delivery again (a fresh attempt schedule)."""
        p = ctx.org_principal
        p.require("webhooks:write")

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            await self._get(txn, ctx, webhook_id)
            if not is_id(delivery_id, "whd"):
                raise NotFound("No such delivery.")
            row = await store.replay(txn, p.org_id, webhook_id, delivery_id)
            if row is None:
                if await store.get_delivery(txn, p.org_id, webhook_id, delivery_id) is None:
                    raise NotFound("No such delivery.")
                raise Conflict("This delivery is still pending.")
            await self._audit.write_in(txn, ctx, 202)
            return row

        row = await self._db.run_interaction("webhooks.replay", txn_fn)
        self._wake()
        return row
