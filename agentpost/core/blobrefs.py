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
        """For each key still unreferenced under its lock, delete the object."""
        for key in set(keys):

            async def txn_fn(txn: Txn, key: str = key) -> None:
                if await mail_store.blob_unreferenced(txn, key):
                    await self._blobs.delete(key)

            try:
                await self._db.run_interaction("blobs.collect", txn_fn)
            except Exception as exc:  # a leftover object is garbage, not data loss
                log.warning("could not delete blob %s: %s", key, exc)
