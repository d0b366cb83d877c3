"""Reading the audit trail (writing lives in core.audit)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agentpost.core.context import RequestContext
from agentpost.storage import audit as audit_store
from agentpost.storage.database import Database


class AuditLog:
    """The organization's view of its own audit trail."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def list(self, ctx: RequestContext, *, actor_id: str | None, action: str | None,
                   since: datetime | None, until: datetime | None, after_id: str | None,
                   limit: int) -> list[dict[str, Any]]:
        """Rows newest first, filtered by actor, action (``inboxes.*`` allowed) and time."""
        p = ctx.org_principal
        p.require("audit:read")
        return await self._db.run_read(
            "audit.list", audit_store.list_audit, p.org_id, env_ids=p.environment_ids,
            actor_id=actor_id, action=action, since=since, until=until, after_id=after_id,
            limit=limit + 1, own_actor_id=p.credential_id,
        )
