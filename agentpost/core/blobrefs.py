"""Blob lifetime: referenced by rows, deleted from the store once nothing uses it."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agentpost.storage import mail as mail_store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)


#: Keys locked by one collector transaction: an expunge of 100,000 messages must not
#: hold 100,000 advisory locks (the shared lock table) and deletions in one transaction.
COLLECT_SLICE = 500


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
        for start in range(0, len(wanted), COLLECT_SLICE):
            await self._collect(wanted[start:start + COLLECT_SLICE])

    async def _collect(self, keys: list[str]) -> None:
        async def txn_fn(txn: Txn) -> None:
            for key in await mail_store.blobs_unreferenced(txn, keys):
                try:
                    await self._blobs.delete(key)
                except Exception as exc:
                    log.warning("could not delete blob %s: %s", key, exc)

        try:
            await self._db.run_interaction("blobs.collect", txn_fn)
        except Exception as exc:
            log.warning("could not delete %d blob(s) (%s): %s", len(keys), keys[0], exc)
