"""The /api/v1 suppression list and a sent message's deliveries.

``GET/POST /suppressions``, ``GET/DELETE /suppressions/{email}`` (scopes
``suppressions:read`` / ``suppressions:write``) and ``GET /messages/{message_id}/
deliveries`` (``messages:read``). Their JSON schemas live here and are added to the
published components when the routes are registered.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.web.iweb import IRequest

from agentpost.core.context import RequestContext
from agentpost.core.pages import decode_token, parse_limit
from agentpost.core.suppressions import Deliveries, Suppressions
from agentpost.http import schemas as s
from agentpost.http.api import PAGING, arg, listing
from agentpost.http.framework import Body, Route, RouteTable
from agentpost.http.views import ts

_TS = {"type": "string", "format": "date-time"}
_TS_NULL = {"type": ["string", "null"], "format": "date-time"}
_STR_NULL = {"type": ["string", "null"]}
_INT_NULL = {"type": ["integer", "null"]}

SUPPRESSION = {
    "type": "object",
    "required": ["id", "email", "reason", "environment_id", "source_message_id",
                 "diagnostic", "created_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": "^sup_"},
        "email": {"type": "string", "description": "Lowercased, domain in IDNA form."},
        "reason": {"type": "string", "enum": ["bounce", "complaint", "manual",
                                              "queue_bounce"]},
        "environment_id": _STR_NULL,
        "source_message_id": _STR_NULL,
        "diagnostic": _STR_NULL,
        "created_at": _TS,
    },
}

DELIVERY_EVENT = {
    "type": "object",
    "required": ["id", "type", "bounce_type", "bounce_subtype", "smtp_code", "status_code",
                 "diagnostic", "occurred_at", "created_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": "^dlv_"},
        "type": {"type": "string", "enum": ["send", "delivery", "bounce", "complaint",
                                            "reject", "delivery_delay"]},
        "bounce_type": _STR_NULL,
        "bounce_subtype": _STR_NULL,
        "smtp_code": _INT_NULL,
        "status_code": _STR_NULL,
        "diagnostic": _STR_NULL,
        "occurred_at": _TS_NULL,
        "created_at": _TS,
    },
}

DELIVERY = {
    "type": "object",
    "required": ["recipient", "domain", "status", "delivery_status", "attempts", "smtp_code",
                 "status_code", "diagnostic", "transport_id", "updated_at", "events"],
    "additionalProperties": False,
    "properties": {
        "recipient": {"type": "string"},
        "domain": {"type": "string"},
        "status": {"type": "string", "description": "The queue's hand-off state: queued, "
                   "sending, sent, deferred, bounced or failed."},
        "delivery_status": {"type": ["string", "null"], "enum": [
            None, "delayed", "delivered", "rejected", "bounced", "complained"],
            "description": "What the relay reported after the hand-off (SES feedback)."},
        "attempts": {"type": "integer"},
        "smtp_code": _INT_NULL,
        "status_code": _STR_NULL,
        "diagnostic": _STR_NULL,
        "transport_id": _STR_NULL,
        "updated_at": _TS,
        "events": {"type": "array", "items": DELIVERY_EVENT},
    },
}

DELIVERIES = {
    "type": "object",
    "required": ["message_id", "data"],
    "additionalProperties": False,
    "properties": {"message_id": {"type": "string"},
                   "data": {"type": "array", "items": {"$ref": "#/components/schemas/"
                                                                "Delivery"}}},
}

SUPPRESSION_CREATE = {
    "type": "object",
    "required": ["email"],
    "additionalProperties": False,
    "properties": {"email": s.text(254, 3), "diagnostic": s.text(1000)},
}


def suppression(row: dict[str, Any]) -> dict[str, Any]:
    """A suppression entry."""
    return {"id": row["id"], "email": row["email"], "reason": row["reason"],
            "environment_id": row["environment_id"],
            "source_message_id": row["source_message_id"], "diagnostic": row["diagnostic"],
            "created_at": ts(row["created_at"])}


def _json_ts(value: Any) -> str | None:
    """A timestamp that came back inside json_agg (text), in the API's form."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return ts(value)


def delivery(row: dict[str, Any]) -> dict[str, Any]:
    """One recipient of a sent message, with its feedback events."""
    events = [{"id": e["id"], "type": e["type"], "bounce_type": e["bounce_type"],
               "bounce_subtype": e["bounce_subtype"], "smtp_code": e["smtp_code"],
               "status_code": e["status_code"], "diagnostic": e["diagnostic"],
               "occurred_at": _json_ts(e["occurred_at"]),
               "created_at": _json_ts(e["created_at"])} for e in row["events"] or []]
    return {"recipient": row["address"], "domain": row["domain"], "status": row["status"],
            "delivery_status": row["delivery_status"], "attempts": row["attempts"],
            "smtp_code": row["smtp_code"], "status_code": row["status_code"],
            "diagnostic": row["diagnostic"], "transport_id": row["transport_id"],
            "updated_at": ts(max(t for t in (row["updated_at"], row["delivery_updated_at"])
                                 if t is not None)),
            "events": events}


def add_suppression_routes(table: RouteTable, suppressions: Suppressions,
                           deliveries: Deliveries) -> None:
    """Register /suppressions and /messages/{message_id}/deliveries."""
    s.COMPONENTS.setdefault("Suppression", SUPPRESSION)
    s.COMPONENTS.setdefault("Delivery", DELIVERY)

    async def list_entries(ctx: RequestContext, request: IRequest,
                           body: Body) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await suppressions.list(ctx, email=arg(request, "email"),
                                       after_id=decode_token(arg(request, "page_token")),
                                       limit=limit)
        return 200, listing(rows, limit, suppression)

    async def get_entry(ctx: RequestContext, request: IRequest, body: Body,
                        email: str) -> tuple[int, Any]:
        return 200, suppression(await suppressions.get(ctx, email))

    async def add_entry(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        row = await suppressions.add(ctx, body.value["email"], body.value.get("diagnostic"))
        return 201, suppression(row)

    async def remove_entry(ctx: RequestContext, request: IRequest, body: Body,
                           email: str) -> tuple[int, Any]:
        await suppressions.remove(ctx, email)
        return 204, None

    async def message_deliveries(ctx: RequestContext, request: IRequest, body: Body,
                                 message_id: str) -> tuple[int, Any]:
        rows = await deliveries.of_message(ctx, message_id)
        return 200, {"message_id": message_id, "data": [delivery(r) for r in rows]}

    one = "/suppressions/{email}"
    for route in (
        Route("GET", "/suppressions", "suppressions.list", list_entries,
              "Suppressed recipient addresses, newest first",
              response=s.list_of("Suppression"), scope="suppressions:read",
              query=[*PAGING, ("email", "only this address")], tag="Suppressions"),
        Route("POST", "/suppressions", "suppressions.create", add_entry,
              "Suppress an address (mail to it is refused with 422 / 550 5.7.1)",
              body=SUPPRESSION_CREATE, response=s.ref("Suppression"), status=201,
              scope="suppressions:write", tag="Suppressions"),
        Route("GET", one, "suppressions.get", get_entry, "Whether an address is suppressed",
              response=s.ref("Suppression"), scope="suppressions:read", tag="Suppressions"),
        Route("DELETE", one, "suppressions.delete", remove_entry,
              "Take an address off the suppression list", status=204,
              scope="suppressions:write", tag="Suppressions"),
        Route("GET", "/messages/{message_id}/deliveries", "messages.deliveries",
              message_deliveries, "Per-recipient delivery state of a sent message",
              response=DELIVERIES, scope="messages:read", tag="Messages"),
    ):
        table.add(route)
