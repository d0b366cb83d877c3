"""The scheduled-send timer: drafts whose ``send_at`` has come leave through the send core.

Every process runs it (on the injected clock, through jobs.periodic). A run claims due
drafts with ``FOR UPDATE SKIP LOCKED`` and a lease in one short transaction
(storage.drafts.claim_due), so two processes -- or two nodes -- never claim one draft;
each claimed draft is then sent by core.draft_sending, which deletes it in the very
transaction that stores and queues the Sent copy, and only while this job still holds
its lease. A process that dies mid-send leaves a lease that runs out: the draft is
claimed again, and sent once (the transaction that sent it also deleted it).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.interfaces import IReactorTime

from agentpost.core.draft_sending import DraftSending
from agentpost.jobs.periodic import Periodic
from agentpost.storage import drafts as draft_store
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

#: Drafts one claim takes.
BATCH = 20


class ScheduledSend:
    """Sends due drafts every ``interval_s`` (and when woken)."""

    def __init__(self, db: Database, sending: DraftSending, clock: IReactorTime, *,
                 interval_s: float, lease_s: float, batch: int = BATCH) -> None:
        self._db = db
        self._sending = sending
        self._clock = clock
        self._lease_s = lease_s
        self._batch = batch
        self.worker = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.periodic = Periodic("scheduled send", clock, interval_s, self.run_once,
                                 self._report)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    async def run_once(self) -> dict[str, int]:
        """Claim and send every due draft, a batch at a time; counts by outcome."""
        outcomes: dict[str, int] = {}
        while True:
            now = self._now()
            lease_until = now + timedelta(seconds=self._lease_s)

            async def claim(txn: Txn, now: datetime = now,
                            lease_until: datetime = lease_until) -> list[dict[str, Any]]:
                return await draft_store.claim_due(txn, now, lease_until, self.worker,
                                                   self._batch)

            claimed = await self._db.run_interaction("drafts.scheduled.claim", claim)
            for row in claimed:
                outcome = await self._sending.send_claimed(row, self.worker)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if len(claimed) < self._batch:
                return outcomes

    def _report(self, outcomes: dict[str, int]) -> None:
        if outcomes:
            log.info("scheduled send: %s", ", ".join(f"{n} {k}" for k, n in
                                                     sorted(outcomes.items())))

    def start(self) -> None:
        """Look now and then every interval."""
        self.periodic.start()

    async def stop(self) -> None:
        """Stop the timer and wait for a run in progress."""
        await self.periodic.stop()
