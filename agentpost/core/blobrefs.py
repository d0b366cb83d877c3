"""Blob lifetime: referenced by rows, deleted from the store once nothing uses it."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agentpost.storage import mail as mail_store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)


class BlobCollector:
    """Deletes store objects whose last reference went away (after that commit)."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self._db = db
        self._blobs = blobs

    async def collect(self, keys: Iterable[str]) -> None:
        """Delete the objects of the keys still unreferenced, all under their locks in
        one transaction: one round trip to lock and check however many keys (an
        EXPUNGE of many messages frees many), then the deletions, then COMMIT. Never
        raises: an object left behind is garbage, not data loss."""
        wanted = sorted(set(keys))
        if not wanted:
            return

        async def txn_fn(txn: Txn) -> None:
            for key in await mail_store.blobs_unreferenced(txn, wanted):
                try:
                    await self._blobs.delete(key)
                except Exception as exc:
                    log.warning("could not delete blob %s: %s", key, exc)

        try:
            await self._db.run_interaction("blobs.collect", txn_fn)
        except Exception as exc:
            log.warning("could not delete %d blob(s) (%s): %s", len(wanted),
                        wanted[0], exc)
