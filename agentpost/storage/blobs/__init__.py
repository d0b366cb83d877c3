"""Content-addressed blob storage for mail content (raw messages, attachments).

Two stores implement one contract (:class:`BlobStore`, see ``base.py`` for the calling
convention: Twisted-driven ``async def`` coroutines, blocking work in thread pools):

* :class:`LocalBlobStore` - files under a directory, for single-node appliances;
* :class:`S3BlobStore` - objects in an S3 bucket, server-side encrypted.

The S3 store (and boto3) is imported lazily, so a local-only install never loads boto3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentpost.storage.blobs.base import (
    BlobNotFound,
    BlobRef,
    BlobSource,
    BlobStore,
    BlobStream,
    InvalidBlobKey,
    content_disposition,
    key_for_digest,
    validate_key,
)
from agentpost.storage.blobs.local import LocalBlobStore
from agentpost.storage.blobs.staging import Staging

if TYPE_CHECKING:
    from agentpost.storage.blobs.s3 import S3BlobStore

__all__ = [
    "BlobNotFound",
    "BlobRef",
    "BlobSource",
    "BlobStore",
    "BlobStream",
    "InvalidBlobKey",
    "LocalBlobStore",
    "S3BlobStore",
    "content_disposition",
    "key_for_digest",
    "staging_of",
    "validate_key",
]


def staging_of(store: BlobStore) -> Staging | None:
    """The store's staged-upload support (an S3Staging) or None: only S3 lets clients
    PUT straight to the store; the local store keeps our own signed URLs."""
    make = getattr(store, "staging", None)
    staging: Staging | None = make() if callable(make) else None
    return staging


def __getattr__(name: str) -> Any:
    if name == "S3BlobStore":
        from agentpost.storage.blobs.s3 import S3BlobStore

        return S3BlobStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
