"""The /api/v1 webhook endpoints (scopes ``webhooks:read`` / ``webhooks:write``).

``POST/GET /webhooks``, ``GET/PATCH/DELETE /webhooks/{webhook_id}``,
``POST /webhooks/{webhook_id}/rotate-secret``, ``POST /webhooks/{webhook_id}/test``,
``GET /webhooks/{webhook_id}/deliveries`` and
``GET /webhooks/{webhook_id}/deliveries/{delivery_id}/attempts`` and
``POST /webhooks/{webhook_id}/deliveries/{delivery_id}/replay``.
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from agentpost.core.context import RequestContext
from agentpost.core.events import EVENT_TYPES
from agentpost.core.pages import decode_token, parse_limit
from agentpost.core.webhooks import Webhooks
from agentpost.http import schemas as s
from agentpost.http.api import PAGING, arg, listing
from agentpost.http.framework import Body, Route, RouteTable
from agentpost.http.views import ts

_TS = {"type": "string", "format": "date-time"}
_TS_NULL = {"type": ["string", "null"], "format": "date-time"}
_STR_NULL = {"type": ["string", "null"]}
_INT_NULL = {"type": ["integer", "null"]}
_EVENT_TYPE = {"type": "string", "enum": list(EVENT_TYPES)}
_ENV_IDS = {"type": ["array", "null"], "items": {"type": "string", "pattern": "^env_"},
            "description": "Only events of these environments (null: every environment)."}

_WEBHOOK_PROPS: dict[str, Any] = {
    "id": {"type": "string", "pattern": "^whk_"},
    "url": {"type": "string"},
    "description": _STR_NULL,
    "event_types": {"type": "array", "items": {"type": "string"},
                    "description": "Only these event types (empty: every type)."},
    "inbox_id": _STR_NULL,
    "environment_ids": _ENV_IDS,
    "enabled": {"type": "boolean"},
    "consecutive_failures": {"type": "integer"},
    "disabled_reason": {"type": ["string", "null"], "enum": [
        None, "manual", "consecutive_failures"]},
    "previous_secret_expires_at": {**_TS_NULL, "description": "Until when the secret "
                                   "before the last rotation still signs too."},
    "created_at": _TS,
    "updated_at": _TS,
}

WEBHOOK = {"type": "object", "required": list(_WEBHOOK_PROPS), "additionalProperties": False,
           "properties": _WEBHOOK_PROPS}

WEBHOOK_WITH_SECRET = {
    "type": "object", "required": [*_WEBHOOK_PROPS, "secret"], "additionalProperties": False,
    "properties": {**_WEBHOOK_PROPS, "secret": {
        "type": "string", "pattern": "^whsec_",
        "description": "The signing secret; shown only now."}},
}

WEBHOOK_DELIVERY = {
    "type": "object",
    "required": ["id", "webhook_id", "event_id", "event_type", "status", "attempt",
                 "next_attempt_at", "status_code", "latency_ms", "error", "attempts",
                 "created_at", "updated_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": "^whd_"},
        "webhook_id": {"type": "string"},
        "event_id": {**_STR_NULL, "description": "null for a test ping"},
        "event_type": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "succeeded", "failed"]},
        "attempt": {"type": "integer", "description": "Attempts made so far."},
        "next_attempt_at": {**_TS_NULL, "description": "When a pending delivery is tried "
                            "next."},
        "status_code": {**_INT_NULL, "description": "HTTP status of the last attempt."},
        "latency_ms": _INT_NULL,
        "error": _STR_NULL,
        "attempts": {"type": "integer", "description": "Attempts recorded in this "
                     "delivery's history (every schedule, replays included); see "
                     "GET .../attempts."},
        "created_at": _TS,
        "updated_at": _TS,
    },
}

WEBHOOK_ATTEMPT = {
    "type": "object",
    "required": ["delivery_id", "webhook_id", "attempt", "started_at", "status_code",
                 "latency_ms", "error", "response_body", "next_retry_at"],
    "additionalProperties": False,
    "properties": {
        "delivery_id": {"type": "string", "pattern": "^whd_"},
        "webhook_id": {"type": "string", "pattern": "^whk_"},
        "attempt": {"type": "integer", "description": "The attempt's number within its "
                    "schedule (a replay starts again at 1), as sent in "
                    "x-agentpost-attempt."},
        "started_at": _TS,
        "status_code": {**_INT_NULL, "description": "HTTP status (null: no answer)."},
        "latency_ms": {"type": "integer"},
        "error": {**_STR_NULL, "description": "Why it failed (at most 500 characters)."},
        "response_body": {**_STR_NULL, "description": "The answer's first 256 bytes as "
                          "text (invalid UTF-8 and NUL shown as U+FFFD)."},
        "next_retry_at": {**_TS_NULL, "description": "When the next attempt was scheduled "
                          "(null: this attempt ended the schedule)."},
    },
}

_URL = s.text(2000, 8)
WEBHOOK_CREATE = {
    "type": "object", "required": ["url"], "additionalProperties": False,
    "properties": {"url": _URL, "description": {**s.text(500), "type": ["string", "null"]},
                   "event_types": {"type": "array", "items": _EVENT_TYPE, "maxItems": 50},
                   "inbox_id": {"type": ["string", "null"], "maxLength": 64},
                   "environment_ids": {**_ENV_IDS, "maxItems": 100},
                   "enabled": {"type": "boolean"}},
}
WEBHOOK_UPDATE = {**WEBHOOK_CREATE, "required": [], "minProperties": 1}
NO_FIELDS = {"type": "object", "additionalProperties": False, "properties": {}}


def webhook(row: dict[str, Any]) -> dict[str, Any]:
    """An endpoint (with its secret only when the row carries one to show)."""
    out = {"id": row["id"], "url": row["url"], "description": row["description"],
           "event_types": list(row["event_types"] or []), "inbox_id": row["inbox_id"],
           "environment_ids": (list(row["environment_ids"])
                               if row["environment_ids"] is not None else None),
           "enabled": row["enabled"], "consecutive_failures": row["consecutive_failures"],
           "disabled_reason": row["disabled_reason"],
           "previous_secret_expires_at": ts(row["previous_expires_at"]),
           "created_at": ts(row["created_at"]), "updated_at": ts(row["updated_at"])}
    if "secret" in row:
        out["secret"] = row["secret"]
    return out


def delivery(row: dict[str, Any]) -> dict[str, Any]:
    """One delivery of an event (or a ping) to an endpoint."""
    return {"id": row["id"], "webhook_id": row["webhook_id"], "event_id": row["event_id"],
            "event_type": row["event_type"], "status": row["status"],
            "attempt": row["attempt"],
            "next_attempt_at": ts(row["next_attempt_at"]) if row["status"] == "pending"
            else None,
            "status_code": row["status_code"], "latency_ms": row["latency_ms"],
            "error": row["error"], "attempts": row["attempts"],
            "created_at": ts(row["created_at"]), "updated_at": ts(row["updated_at"])}


def attempt(row: dict[str, Any]) -> dict[str, Any]:
    """One attempt of a delivery."""
    return {"delivery_id": row["delivery_id"], "webhook_id": row["webhook_id"],
            "attempt": row["attempt"], "started_at": ts(row["started_at"]),
            "status_code": row["status_code"], "latency_ms": row["latency_ms"],
            "error": row["error"], "response_body": row["response_excerpt"],
            "next_retry_at": ts(row["next_retry_at"])}


def add_webhook_routes(table: RouteTable, webhooks: Webhooks) -> None:
    """Register /webhooks."""
    s.COMPONENTS.setdefault("Webhook", WEBHOOK)
    s.COMPONENTS.setdefault("WebhookDelivery", WEBHOOK_DELIVERY)
    s.COMPONENTS.setdefault("WebhookAttempt", WEBHOOK_ATTEMPT)

    async def create(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        return 201, webhook(await webhooks.create(ctx, body.value))

    async def list_all(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await webhooks.list_webhooks(ctx, after_id=decode_token(arg(request, "page_token")),
                                   limit=limit)
        return 200, listing(rows, limit, webhook)

    async def get_one(ctx: RequestContext, request: IRequest, body: Body,
                      webhook_id: str) -> tuple[int, Any]:
        return 200, webhook(await webhooks.get(ctx, webhook_id))

    async def update(ctx: RequestContext, request: IRequest, body: Body,
                     webhook_id: str) -> tuple[int, Any]:
        return 200, webhook(await webhooks.update(ctx, webhook_id, body.value))

    async def delete(ctx: RequestContext, request: IRequest, body: Body,
                     webhook_id: str) -> tuple[int, Any]:
        await webhooks.delete(ctx, webhook_id)
        return 204, None

    async def rotate(ctx: RequestContext, request: IRequest, body: Body,
                     webhook_id: str) -> tuple[int, Any]:
        return 200, webhook(await webhooks.rotate_secret(ctx, webhook_id))

    async def test(ctx: RequestContext, request: IRequest, body: Body,
                   webhook_id: str) -> tuple[int, Any]:
        return 202, delivery(await webhooks.test(ctx, webhook_id))

    async def deliveries(ctx: RequestContext, request: IRequest, body: Body,
                         webhook_id: str) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await webhooks.deliveries(
            ctx, webhook_id, after_id=decode_token(arg(request, "page_token")), limit=limit)
        return 200, listing(rows, limit, delivery)

    async def attempts(ctx: RequestContext, request: IRequest, body: Body, webhook_id: str,
                       delivery_id: str) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await webhooks.attempts(
            ctx, webhook_id, delivery_id, after=decode_token(arg(request, "page_token")),
            limit=limit)
        return 200, listing(rows, limit, attempt, key="cursor")

    async def replay(ctx: RequestContext, request: IRequest, body: Body, webhook_id: str,
                     delivery_id: str) -> tuple[int, Any]:
        return 202, delivery(await webhooks.replay(ctx, webhook_id, delivery_id))

    one = "/webhooks/{webhook_id}"
    tag = "Webhooks"
    for route in (
        Route("POST", "/webhooks", "webhooks.create", create,
              "Create a webhook endpoint (the answer shows its secret, once)",
              body=WEBHOOK_CREATE, response=WEBHOOK_WITH_SECRET, status=201,
              scope="webhooks:write", tag=tag),
        Route("GET", "/webhooks", "webhooks.list", list_all, "Webhook endpoints, newest first",
              response=s.list_of("Webhook"), scope="webhooks:read", query=PAGING, tag=tag),
        Route("GET", one, "webhooks.get", get_one, "A webhook endpoint",
              response=s.ref("Webhook"), scope="webhooks:read", tag=tag),
        Route("PATCH", one, "webhooks.update", update,
              "Change a webhook endpoint (enabling it resets its failure count)",
              body=WEBHOOK_UPDATE, response=s.ref("Webhook"), scope="webhooks:write",
              tag=tag),
        Route("DELETE", one, "webhooks.delete", delete, "Delete a webhook endpoint",
              status=204, scope="webhooks:write", tag=tag),
        Route("POST", one + "/rotate-secret", "webhooks.rotate_secret", rotate,
              "A new signing secret (the old one also signs for 24 hours)",
              body=NO_FIELDS, response=WEBHOOK_WITH_SECRET, scope="webhooks:write", tag=tag),
        Route("POST", one + "/test", "webhooks.test", test,
              "Send a signed webhook.test ping (one attempt)",
              body=NO_FIELDS, response=s.ref("WebhookDelivery"), status=202,
              scope="webhooks:write", tag=tag),
        Route("GET", one + "/deliveries", "webhooks.deliveries", deliveries,
              "Deliveries of an endpoint, newest first",
              response=s.list_of("WebhookDelivery"), scope="webhooks:read", query=PAGING,
              tag=tag),
        Route("GET", one + "/deliveries/{delivery_id}/attempts", "webhooks.attempts",
              attempts, "Every attempt of a delivery (status, latency, error, the start "
              "of the answer), newest first",
              response=s.list_of("WebhookAttempt"), scope="webhooks:read", query=PAGING,
              tag=tag),
        Route("POST", one + "/deliveries/{delivery_id}/replay", "webhooks.replay", replay,
              "Deliver a finished (succeeded or failed) delivery again",
              body=NO_FIELDS, response=s.ref("WebhookDelivery"), status=202,
              scope="webhooks:write", tag=tag),
    ):
        table.add(route)
