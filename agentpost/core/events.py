"""The event log: one envelope for every consumer (the API, webhooks, WebSockets).

Events are written by the change that causes them, in its transaction
(storage.mail.insert_event), and pg_notify'd on ``EVENTS_CHANNEL`` after commit.
Consumers see them through :func:`envelope`; a client that was away replays with
``Events.list(after=<last id it saw>)``. Delivery is at-least-once: clients dedupe by
``id``. Ordering and the commit-order bound are explained in storage/events.py.

Scope ``events:read``; an environment-confined principal sees only the events of its
environments (organization-wide events, such as ``webhook.disabled``, need an
unconfined credential).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from agentpost.core.context import RequestContext
from agentpost.model.errors import InvalidRequest
from agentpost.model.ids import is_id
from agentpost.storage import events as store
from agentpost.storage.database import Database

# The types the code emits (the API documents them; unknown type filters are refused
# so a typo does not silently match nothing).
EVENT_TYPES: tuple[str, ...] = (
    "message.received", "message.sent", "message.appended", "message.delivered",
    "message.bounced", "message.complained", "message.rejected", "message.delayed",
    "draft.saved", "domain.verified", "webhook.disabled",
)
MAX_LIMIT = 500


def timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a Z (milliseconds), as every API timestamp."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(row: dict[str, Any]) -> dict[str, Any]:
    """The public form of an event row: ``{id, type, timestamp, org_id, env_id, data}``."""
    return {"id": row["id"], "type": row["type"], "timestamp": timestamp(row["created_at"]),
            "org_id": row["org_id"], "env_id": row["environment_id"],
            "data": row["data"] if row["data"] is not None else {}}


def visible_to(row: dict[str, Any], org_id: str, env_ids: frozenset[str] | None) -> bool:
    """Whether a principal of ``org_id`` confined to ``env_ids`` may see this event
    (for consumers that read rows by id, e.g. after a NOTIFY)."""
    if row["org_id"] != org_id:
        return False
    return env_ids is None or row["environment_id"] in env_ids


def check_types(types: Iterable[str] | None, field: str = "types") -> list[str] | None:
    """A validated list of event types (None or empty: every type)."""
    if types is None:
        return None
    wanted = [t for t in types if t]
    unknown = sorted(set(wanted) - set(EVENT_TYPES))
    if unknown:
        raise InvalidRequest(f"Unknown event type(s): {', '.join(unknown)}.", field=field)
    return wanted or None


class Events:
    """Read the organization's event log."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def list(self, ctx: RequestContext, *, after: str | None = None,
                   types: list[str] | None = None, inbox_id: str | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        """Envelopes after the cursor, oldest first (at most ``limit``)."""
        p = ctx.org_principal
        p.require("events:read")
        if after is not None and not is_id(after, "evt"):
            raise InvalidRequest("after must be an event id (evt_...).", field="after")
        if inbox_id is not None and not is_id(inbox_id, "inb"):
            raise InvalidRequest("inbox_id must be an inbox id (inb_...).", field="inbox_id")
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}.", field="limit")
        rows = await self._db.run_read(
            "events.list", store.events_after, p.org_id, p.environment_ids, after=after,
            types=check_types(types), inbox_id=inbox_id, limit=limit)
        return [envelope(r) for r in rows]
