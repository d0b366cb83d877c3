"""Folds inbox usage deltas into ``inboxes.used_bytes`` on a timer (issue 12).

Deliveries append a delta row instead of updating the inbox's row (storage.usage), so
that deliveries to one inbox do not queue on it. Reads are exact without this job (they
add the pending deltas); it only keeps the pending rows few, so those reads stay cheap.
Every process runs it; an advisory lock lets one fold at a time and the others skip.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet.interfaces import IReactorTime

from agentpost.jobs.periodic import Periodic
from agentpost.storage import usage
from agentpost.storage.database import Database

log = logging.getLogger(__name__)

#: Seconds between folds: at a few hundred deliveries a second, a few hundred rows.
INTERVAL_S = 2.0
#: Rows folded (so dead) before the folding process vacuums the table: a few pages.
VACUUM_AFTER_ROWS = 200


class UsageFold:
    """Runs :func:`agentpost.storage.usage.fold` every ``interval_s`` on ``clock``."""

    def __init__(self, db: Database, clock: IReactorTime,
                 interval_s: float = INTERVAL_S) -> None:
        self._db = db
        self._dead = 0  # rows this process folded (deleted) since its last VACUUM
        self._periodic = Periodic("usage fold", clock, interval_s, self.run_once)

    async def run_once(self) -> int | None:
        """Fold once; the number of deltas folded (None: another process was folding).
        The process that folded then vacuums the table (storage.usage.vacuum) once
        enough rows died since its last vacuum."""
        folded = await self._db.run_interaction("usage.fold", usage.fold)
        if folded:
            self._dead += folded
            if self._dead >= VACUUM_AFTER_ROWS:
                self._dead = 0
                try:  # (a user that does not own the table gets a warning, no error)
                    await self._db.run_read("usage.vacuum", usage.vacuum)
                except Exception as exc:  # the database away: next time, or autovacuum
                    log.warning("usage fold: VACUUM of inbox_usage_deltas failed: %s",
                                str(exc).strip() or type(exc).__name__)
        return folded

    def start(self) -> None:
        """Fold now and then every interval."""
        self._periodic.start(now=True)

    async def stop(self) -> None:
        """Stop the timer, letting a fold in progress commit."""
        await self._periodic.stop()

    def wake(self) -> None:
        """Fold now (tests)."""
        self._periodic.wake()

    @property
    def running(self) -> Any:
        return self._periodic.running
