"""Names and errors of staged uploads, apart from boto3 (see
:mod:`agentpost.storage.blobs.s3_staging`), so the core imports them on any store."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Protocol

STAGING_DIR = "uploads/"
NAME_RE = re.compile(r"uploads/[A-Za-z0-9_-]{1,64}/upl_[0-9a-f]{32}\Z")


class StagedObjectMissing(Exception):
    """Nothing has been PUT to the staging object (yet)."""


class StagedObjectTooLarge(Exception):
    """The staged object is larger than the upload allows."""

    def __init__(self, size: int) -> None:
        super().__init__(f"staged object of {size} bytes")
        self.size = size


def staged_name(org_id: str, upload_key: str) -> str:
    """The staging object of an upload (relative to the store's prefix):
    ``uploads/<org>/<upload key>``, the key being 128 random bits."""
    name = f"{STAGING_DIR}{org_id}/{upload_key}"
    if not NAME_RE.match(name):
        raise ValueError(f"not a staging name: {name!r}")
    return name


class Staging(Protocol):
    """What the upload core needs from a store that takes PUTs directly (S3Staging)."""

    async def presign_put(self, name: str, *, content_type: str, size: int,
                          expires_s: int) -> tuple[str, dict[str, str]]: ...

    async def read(self, name: str, limit: int) -> bytes: ...

    async def delete(self, name: str) -> None: ...

    async def sweep(self, older_than: datetime, limit: int = 10_000) -> int: ...
