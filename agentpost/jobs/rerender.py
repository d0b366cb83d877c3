"""Bringing stored IMAP renderings and search keys up to the current renderer.

Ingest renders ENVELOPE, BODYSTRUCTURE, the section map and the SEARCH/SORT keys once
and stores them. When a renderer is corrected (issue 10 kept ENVELOPE source routes and
raw BODYSTRUCTURE parameters), rows stored before still answer the old way. This job
re-renders them from their raw bytes in the background, in small batches, so an upgrade
needs no downtime and no migration that reads every blob.

Every process runs it. Rows are claimed with ``SKIP LOCKED``, so two processes share
the work instead of doing it twice, and a row a client is changing at that moment is
skipped and picked up by the next run. Batches are short transactions (a row lock is
held while its blob is read and rendered, never longer than one batch).
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import threads
from twisted.internet.interfaces import IReactorTime

from agentpost.core.ingest import RENDER_VERSION, rendered_columns
from agentpost.jobs.periodic import Periodic
from agentpost.storage import rerender as store
from agentpost.storage.blobs.base import BlobStore
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

#: Rows per transaction: keeps row locks short while their blobs are read.
BATCH = 20
#: How often a process looks for stale rows (after an upgrade there are some once).
INTERVAL_S = 3600.0


class RenderRefresh:
    """Re-renders rows whose ``render_version`` is older than this code's."""

    def __init__(self, db: Database, blobs: BlobStore, clock: IReactorTime, reactor: Any,
                 *, batch: int = BATCH, interval_s: float = INTERVAL_S) -> None:
        self._db = db
        self._blobs = blobs
        self._clock = clock
        self._reactor = reactor
        self._batch = batch
        self._interval_s = interval_s
        self._periodic = Periodic("re-rendering", clock, interval_s, self.run_once,
                                  self._report)
        self._stopping = False

    async def run_once(self) -> int:
        """Work through every stale row once; returns how many were brought up to date.

        A row that fails (its blob unreadable, say) is passed over and tried again on
        the next run; the id cursor makes sure one bad row cannot stall the rest."""
        done, cursor = 0, ""
        while not self._stopping:
            result = await self._db.run_interaction("rerender.batch", self._batch_txn, cursor)
            claimed, refreshed = result
            done += refreshed
            if len(claimed) < self._batch:
                break
            cursor = claimed[-1]
        return done

    async def _batch_txn(self, txn: Txn, after_id: str) -> tuple[list[str], int]:
        rows = await store.claim_stale(txn, RENDER_VERSION, after_id, self._batch)
        refreshed = 0
        for row in rows:
            try:
                raw = await self._blobs.get_bytes(row["raw_blob_key"])
                columns = await threads.deferToThreadPool(
                    self._reactor, self._reactor.getThreadPool(), rendered_columns, raw)
            except Exception as exc:  # the next run tries again
                log.warning("re-rendering message %s failed: %s", row["id"], exc)
                continue
            await store.save_rendered(txn, row["org_id"], row["id"], RENDER_VERSION, columns)
            refreshed += 1
        return [row["id"] for row in rows], refreshed

    def _report(self, refreshed: int) -> None:
        if refreshed:
            log.info("re-rendered %d stored messages (renderer version %d)", refreshed,
                     RENDER_VERSION)

    def start(self) -> None:
        """Run now and then every interval."""
        self._periodic.start()

    async def stop(self) -> None:
        """Stop the timer and let a batch in progress commit."""
        self._stopping = True
        await self._periodic.stop()
