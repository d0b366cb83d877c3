"""Where a DSN goes: the sending inbox's INBOX, through the one ingest path (so it is
threaded, counted against the quota, announced as ``message.received`` and audited
like any other arrival)."""

from __future__ import annotations

import io

from agentpost.core.ingest import Ingest, Target
from agentpost.storage import inboxes as inbox_store
from agentpost.storage.database import Database


class InboxBounceSink:
    """The worker's BounceSink for this installation."""

    def __init__(self, db: Database, ingest: Ingest) -> None:
        self._db = db
        self._ingest = ingest

    async def __call__(self, org_id: str, environment_id: str, inbox_id: str,
                       raw: bytes) -> None:
        inbox = await self._db.run_read("outbound.bounce_inbox", inbox_store.get_inbox,
                                        org_id, None, inbox_id)
        if inbox is None:
            raise LookupError(inbox_id)
        target = Target(org_id, inbox["environment_id"], inbox_id, inbox["email"])
        # A DSN is never refused for quota: losing it would hide the failure it reports.
        await self._ingest.store([target], io.BytesIO(raw), envelope_from="")
