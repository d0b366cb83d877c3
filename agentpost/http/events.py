"""``GET /api/v1/events``: replay the event log after a cursor (scope ``events:read``).

A client stores the ``id`` of the last event it handled and asks for what came after;
``next_after`` is the cursor for the following call (unchanged when nothing new came).
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from agentpost.core.context import RequestContext
from agentpost.core.events import EVENT_TYPES, MAX_LIMIT, Events
from agentpost.http import schemas as s
from agentpost.http.api import arg
from agentpost.http.framework import Body, Route, RouteTable
from agentpost.model.errors import InvalidRequest

EVENT = {
    "type": "object",
    "required": ["id", "type", "timestamp", "org_id", "env_id", "data"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": "^evt_"},
        "type": {"type": "string", "description": "One of: " + ", ".join(EVENT_TYPES)},
        "timestamp": {"type": "string", "format": "date-time"},
        "org_id": {"type": "string", "pattern": "^org_"},
        "env_id": {"type": ["string", "null"]},
        "data": {"type": "object"},
    },
}

EVENT_PAGE = {
    "type": "object",
    "required": ["data", "limit", "next_after"],
    "additionalProperties": False,
    "properties": {
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
        "limit": {"type": "integer"},
        "next_after": {"type": ["string", "null"],
                       "description": "The cursor for the next call (the last id here, or "
                       "the given one when nothing new came)."},
    },
}

DEFAULT_LIMIT = 100


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.", field="limit")
    return int(raw)


def add_event_routes(table: RouteTable, events: Events) -> None:
    """Register GET /events."""
    s.COMPONENTS.setdefault("Event", EVENT)

    async def list_events(ctx: RequestContext, request: IRequest,
                          body: Body) -> tuple[int, Any]:
        limit = _limit(arg(request, "limit"))
        after = arg(request, "after") or None
        raw_types = arg(request, "types")
        types = [t.strip() for t in raw_types.split(",")] if raw_types else None
        rows = await events.list(ctx, after=after, types=types,
                                 inbox_id=arg(request, "inbox_id") or None, limit=limit)
        return 200, {"data": rows, "limit": limit,
                     "next_after": rows[-1]["id"] if rows else after}

    table.add(Route(
        "GET", "/events", "events.list", list_events,
        "Events after a cursor, oldest first (replay what a client missed)",
        response=EVENT_PAGE, scope="events:read", tag="Events",
        query=[("after", "an event id: only events after it (none: from the oldest kept)"),
               ("types", "comma-separated event types"), ("inbox_id", "only this inbox"),
               ("limit", f"1-{MAX_LIMIT}, default {DEFAULT_LIMIT}")]))
