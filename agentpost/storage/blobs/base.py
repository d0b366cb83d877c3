"""The blob-store contract shared by the local and S3 stores.

Blobs hold the bulky, immutable bytes of mail (raw RFC 5322 messages byte-exact, decoded
attachments); PostgreSQL holds everything else and refers to blobs by key.

Calling convention (one style for every store): each operation is an ``async def``
coroutine that awaits Twisted Deferreds internally, so it must be driven by Twisted:
``await store.get_bytes(key)`` inside a coroutine that runs under
``Deferred.fromCoroutine`` (or ``pytest_twisted.ensureDeferred``), or
``Deferred.fromCoroutine(store.get_bytes(key))`` from callback-style code. They are not
asyncio coroutines. All blocking work (disk, boto3) runs in a thread pool, never on the
reactor thread, so a 25 MB message never stalls SMTP/IMAP/HTTP for other clients.

Keys are content addresses, ``sha256/<first 2 hex>/<64 lowercase hex>``, identical for
every store so that a blob reference survives a move between stores. Because identical
content shares one key, ``delete`` removes it for *every* user: callers must reference-count
(see ``agentpost/storage/mail.py``) and delete only unreferenced keys.

Errors: a missing blob raises :class:`BlobNotFound`; a malformed key raises
:class:`InvalidBlobKey` (never reaching the backend, so ``../`` cannot escape a directory);
any backend failure (I/O error, S3 error, timeout, integrity mismatch) raises
:class:`agentpost.model.errors.StorageFailure`, a temporary failure. Errors raised while
*reading the caller's source* (a missing spool file, say) propagate unchanged: they are the
caller's bug, not a storage outage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeAlias, runtime_checkable

from twisted.internet import defer

from agentpost.model.errors import StorageFailure

log = logging.getLogger(__name__)

#: What ``put_file`` accepts: a filesystem path, or a binary file object read from its
#: current position to EOF (it is read in a worker thread; don't touch it meanwhile).
BlobSource: TypeAlias = "str | os.PathLike[str] | IO[bytes]"

#: Presigned URLs live at least this long and at most this long (S3's SigV4 limit: 7 days).
PRESIGN_MIN_EXPIRES_S = 1
PRESIGN_MAX_EXPIRES_S = 7 * 24 * 3600

#: Read size when copying/hashing a source, and the default ``open_stream`` chunk size.
COPY_CHUNK_SIZE = 1024 * 1024
DEFAULT_STREAM_CHUNK_SIZE = 256 * 1024

_KEY_RE = re.compile(r"sha256/([0-9a-f]{2})/(\1[0-9a-f]{62})")


@dataclass(frozen=True)
class BlobRef:
    """What a put returns and the database stores: the key plus facts checked on read."""

    key: str
    size: int
    sha256: str


class BlobNotFound(KeyError):
    """No blob under this key (a ``KeyError`` so mapping-style callers can catch it)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no blob {self.key!r}"


class InvalidBlobKey(ValueError):
    """The key is not a content address; rejected before any backend is touched."""


def key_for_digest(hexdigest: str) -> str:
    """The content address for a lowercase hex SHA-256 digest."""
    return f"sha256/{hexdigest[:2]}/{hexdigest}"


#: Keys of blobs kept in PostgreSQL (their blob row's ``data``), not in the store:
#: the store's own key behind this prefix (storage.blobs.inline).
INLINE_PREFIX = "db/"


def inline_key_for_digest(hexdigest: str) -> str:
    """The key of content kept in PostgreSQL."""
    return INLINE_PREFIX + key_for_digest(hexdigest)


def is_inline_key(key: str) -> bool:
    """Whether ``key`` names a blob kept in PostgreSQL (a well-formed one: see
    :func:`validate_key`)."""
    return key.startswith(INLINE_PREFIX)


def validate_key(key: object) -> str:
    """Return ``key`` if it is a well-formed content address, else raise InvalidBlobKey.

    Why strict: keys become file paths and S3 object names; accepting only the exact
    format (shard must equal the digest prefix) rules out traversal and aliasing.
    """
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise InvalidBlobKey(f"not a blob key: {key!r}")
    return key


def digest_of_key(key: str) -> str:
    """The hex SHA-256 a (validated) key names."""
    return validate_key(key).rsplit("/", 1)[1]


def check_range(start: int, length: int) -> None:
    """``get_range`` arguments must be non-negative integers (bools are a bug)."""
    for name, value in (("start", start), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def clamp_expiry(expires_s: int | float) -> int:
    """Presigned-URL lifetime limited to what S3 accepts (1 s .. 7 days)."""
    return int(max(PRESIGN_MIN_EXPIRES_S, min(PRESIGN_MAX_EXPIRES_S, int(expires_s))))


_UNSAFE_FILENAME = re.compile(r'[\x00-\x1f\x7f"\\/]')


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """A Content-Disposition value per RFC 6266, safe for any attachment file name.

    Why: attachment names come from untrusted mail. Control characters (header
    injection), quotes, backslashes and path separators are replaced; a non-ASCII
    name gets an ASCII ``filename`` fallback plus an RFC 5987 ``filename*``.
    """
    cleaned = _UNSAFE_FILENAME.sub("_", filename).strip() or "download"
    fallback = cleaned.encode("ascii", "replace").decode("ascii").replace("?", "_")
    value = f'{disposition}; filename="{fallback}"'
    if fallback != cleaned:
        value += "; filename*=UTF-8''" + urllib.parse.quote(cleaned, safe="")
    return value


def check_header_value(name: str, value: str) -> str:
    """Reject CR/LF/NUL in a value that ends up in an HTTP response header."""
    if any(c in value for c in "\r\n\x00"):
        raise ValueError(f"{name} must not contain CR, LF or NUL")
    return value


def storage_failure(reason: str) -> StorageFailure:
    """A StorageFailure with the generic client-safe message; ``reason`` (paths, bucket
    names, backend error text) goes to the log and to ``.reason``, never to clients
    (HTTP/SMTP show an AgentPostError's ``message`` and ``details``)."""
    log.warning("blob store failure: %s", reason)
    failure = StorageFailure()
    failure.reason = reason  # type: ignore[attr-defined]
    return failure


class SourceReadError(Exception):
    """Internal marker: the caller's source failed; unwrapped to the original error."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def read_source(fileobj: IO[bytes], size: int = COPY_CHUNK_SIZE) -> bytes:
    """Read from the caller's source, tagging its errors so they are not mistaken for
    storage failures (the stores unwrap :class:`SourceReadError` back to the original)."""
    try:
        chunk = fileobj.read(size)
    except Exception as exc:
        raise SourceReadError(exc) from exc
    if chunk is None:  # a non-blocking raw stream with nothing ready: not supported
        raise SourceReadError(BlockingIOError("put_file source must be a blocking stream"))
    return bytes(chunk) if not isinstance(chunk, bytes) else chunk


def open_source(source: BlobSource) -> tuple[IO[bytes], bool]:
    """Open a path or pass a file object through (errors tagged as in :func:`read_source`).

    Returns the file object and whether the caller must close it.
    """
    if isinstance(source, str | os.PathLike):
        try:
            return open(source, "rb"), True  # closed by the caller
        except OSError as exc:
            raise SourceReadError(exc) from exc
    if not hasattr(source, "read"):
        raise TypeError(f"put_file needs a path or a binary file object, not {type(source)}")
    return source, False


def hash_bytes(data: bytes | bytearray | memoryview) -> tuple[str, int]:
    """SHA-256 hex digest and length of in-memory content."""
    return hashlib.sha256(data).hexdigest(), len(data)


class BlobStream:
    """An async iterator over one blob's chunks, one blocking read per step in a thread.

    Back-pressure comes for free: the next chunk is read only when the consumer asks for
    it. Use ``async for chunk in stream`` and close it (``await stream.aclose()``, or
    ``async with stream:``) if you stop early; it closes itself at EOF or on an error.
    ``size`` is the blob's total length (IMAP literals need it up front).
    """

    def __init__(
        self,
        run: Callable[..., defer.Deferred[Any]],
        read: Callable[[], bytes],
        close: Callable[[], None],
        size: int,
    ) -> None:
        self._run = run
        self._read = read
        self._close = close
        self.size = size
        self._closed = False
        self._busy = False

    def __aiter__(self) -> BlobStream:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        if self._busy:
            raise RuntimeError("BlobStream read while a previous read is in flight")
        self._busy = True
        try:
            chunk: bytes = await self._run(self._read)
        except BaseException:
            self._busy = False
            await self.aclose()
            raise
        self._busy = False
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Release the file handle / HTTP connection; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._run(self._close)
        except Exception:  # noqa: S110 - closing a read-only handle cannot lose data
            pass

    async def __aenter__(self) -> BlobStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed, immutable blob storage; every method is a Twisted-driven coroutine.

    Guarantees: puts are idempotent (same content, same key, no duplicate object) and
    durable when they return; reads are byte-exact; ``delete`` is idempotent.
    """

    async def put_file(
        self, source: BlobSource, *, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        """Store a file's content (path, or file object from its position to EOF)."""
        ...

    async def put_bytes(
        self, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        """Store in-memory content."""
        ...

    async def get_bytes(self, key: str) -> bytes:
        """The whole blob, checked against its SHA-256 (a mismatch is a StorageFailure)."""
        ...

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``start``; short at end of blob, ``b""`` past it."""
        ...

    async def open_stream(
        self, key: str, *, chunk_size: int = DEFAULT_STREAM_CHUNK_SIZE
    ) -> BlobStream:
        """A pull-driven chunk iterator for large blobs (BlobNotFound raised here)."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether the blob is stored."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the blob (for every user of that content); a missing blob is fine."""
        ...

    async def presigned_url(
        self, key: str, *, filename: str, content_type: str, expires_s: int
    ) -> str | None:
        """A time-limited direct download URL, or None when the store cannot make one."""
        ...

    async def check(self) -> None:
        """Raise StorageFailure unless the store is usable (for start-up and readiness)."""
        ...
