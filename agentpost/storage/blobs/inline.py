"""Small messages kept in PostgreSQL; everything else in the configured blob store.

Why: a message's records (headers, bodies, IMAP renders) already go to PostgreSQL in
one transaction. Writing its raw bytes to the blob store as well cost, per message, a
file write with two fsyncs (file and directory) in another thread -- or an S3 PUT,
tens of milliseconds -- all before that transaction could start, since a row must
never name bytes that are not durable. For most mail (a few KiB) the bytes now ride
in the transaction itself: ingest gives them an inline key (``db/sha256/..``) and the
staging statement that counts the blob's references writes them into the blob row
(``blobs.data``, migration 0035). The COMMIT that makes the message visible makes its
bytes durable; the row, and with it the bytes, goes when the last reference does.
Attachments, and messages over ``storage.inline_message_max``, stay in the store,
where presigned downloads and streaming of large bodies work as before.

:class:`InlineBlobs` is the store every reader is given: an inline key is read from
PostgreSQL, any other key from the store underneath. The key alone says where the
bytes are, so reading an attachment costs no database round trip. Blob keys are
content addresses learned only from organization-scoped rows (a message, an
attachment, a queue row); reading one by key is what the blob store itself does.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from agentpost.storage.blobs.base import (
    DEFAULT_STREAM_CHUNK_SIZE,
    INLINE_PREFIX,
    BlobNotFound,
    BlobRef,
    BlobSource,
    BlobStore,
    BlobStream,
    check_range,
    digest_of_key,
    hash_bytes,
    inline_key_for_digest,
    is_inline_key,
    storage_failure,
)
from agentpost.storage.database import Database, Txn

#: A read asked of PostgreSQL: (key, start, length), length -1 for the whole blob (an
#: int either way: an array of NULLs alone would not be typed int[]).
_Request = tuple[str, int, int]
_WHOLE = -1
#: substring() takes int4 positions: a range past this ends there (the bytes are
#: at most storage.inline_message_max, far shorter).
_INT4_MAX = 2**31 - 1


async def _read_inline(txn: Txn, requests: list[_Request]) -> dict[_Request, bytes]:
    """Every request's bytes in one statement: a range is cut by PostgreSQL, so an IMAP
    client reading headers or a partial body gets those bytes only (a compressed row is
    decompressed only as far as the range reaches), not the whole message. A whole
    UTF-8 message comes as text (blobs.utf8, migration 0038): the same bytes, at half
    the size of bytea's hex and four times faster to read."""
    rows = await txn.fetchall(
        "SELECT x.i, CASE WHEN t THEN convert_from(b.data, 'UTF8') END AS text, "
        "  CASE WHEN x.n >= 0 THEN substring(b.data FROM x.s + 1 FOR x.n) "
        "    WHEN NOT t THEN b.data END AS data "
        "FROM unnest(%s::text[], %s::int[], %s::int[]) WITH ORDINALITY AS x(k, s, n, i) "
        "JOIN blobs b ON b.key = x.k AND b.data IS NOT NULL "
        # as text only where the text is the bytes: a UTF-8 database (also one restored
        # from another's dump), a whole read, a row that says so
        "CROSS JOIN LATERAL (SELECT x.n < 0 AND b.utf8 IS TRUE "
        "  AND current_setting('server_encoding') = 'UTF8' AS t) AS w",
        ([r[0] for r in requests], [r[1] for r in requests], [r[2] for r in requests]))
    return {requests[row["i"] - 1]: (row["text"].encode("utf-8") if row["text"] is not None
                                     else bytes(row["data"])) for row in rows}


def _memory_stream(data: bytes, chunk_size: int) -> BlobStream:
    """A :class:`BlobStream` over bytes already in memory (no thread, no handle)."""
    chunks = iter([data[i:i + chunk_size] for i in range(0, len(data), chunk_size)])
    return BlobStream(defer.maybeDeferred, lambda: next(chunks, b""), lambda: None, len(data))


class InlineBlobs:
    """The blob store as the server uses it: inline keys in PostgreSQL, others in
    ``store``. Puts go to ``store``: ingest alone decides that a message is kept
    inline (:meth:`inline_ref`), since only it writes the blob row that holds it."""

    def __init__(self, store: BlobStore, db: Database, inline_max: int,
                 reactor: IReactorTime) -> None:
        self.store = store
        self._db = db
        self.inline_max = inline_max
        self._reactor = reactor
        #: Reads asked for in this reactor turn, answered by one statement in the next
        #: (an IMAP FETCH reads several bodies ahead, a queue round all its messages).
        self._waiting: dict[_Request, list[defer.Deferred[bytes | None]]] = {}

    def inline_ref(self, data: bytes) -> BlobRef | None:
        """The inline key of a message small enough to be kept in PostgreSQL (its bytes
        must then go into the blob row by the transaction that references it), else
        None: it goes to the store."""
        if len(data) > self.inline_max:
            return None
        digest, size = hash_bytes(data)
        return BlobRef(inline_key_for_digest(digest), size, digest)

    # -- reads ----------------------------------------------------------------------------

    def _read(self, key: str, start: int = 0,
              length: int = _WHOLE) -> defer.Deferred[bytes | None]:
        if not self._waiting:
            self._reactor.callLater(0, self._read_waiting)
        waiter: defer.Deferred[bytes | None] = defer.Deferred()
        self._waiting.setdefault((key, start, length), []).append(waiter)
        return waiter

    def _read_waiting(self) -> None:
        waiting, self._waiting = self._waiting, {}

        def answer(found: dict[_Request, bytes]) -> None:
            for request, waiters in waiting.items():
                for waiter in waiters:
                    if not waiter.called:  # not cancelled meanwhile (a session ended)
                        waiter.callback(found.get(request))

        def fail(failure: Failure) -> None:
            for waiters in waiting.values():
                for waiter in waiters:
                    if not waiter.called:
                        waiter.errback(failure)

        read = self._db.run_read("blobs.inline", _read_inline, list(waiting))
        read.addCallbacks(answer, fail)

    async def _inline(self, key: str) -> bytes:
        digest = digest_of_key(key[len(INLINE_PREFIX):])  # validates the rest of the key
        data = await self._read(key)
        if data is None:
            raise BlobNotFound(key)
        if hashlib.sha256(data).hexdigest() != digest:
            raise storage_failure(f"blob {key} is corrupt (content does not match its key)")
        return data

    async def get_bytes(self, key: str) -> bytes:
        if is_inline_key(key):
            return await self._inline(key)
        return await self.store.get_bytes(key)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """As the store's: the bytes are not checked against the key (only whole reads
        can be); a range past the end is short or empty."""
        if is_inline_key(key):
            check_range(start, length)
            digest_of_key(key[len(INLINE_PREFIX):])  # validates the rest of the key
            start = min(start, _INT4_MAX - 1)
            data = await self._read(key, start, min(length, _INT4_MAX - 1 - start))
            if data is None:
                raise BlobNotFound(key)
            return data
        return await self.store.get_range(key, start, length)

    async def open_stream(self, key: str, *,
                          chunk_size: int = DEFAULT_STREAM_CHUNK_SIZE) -> BlobStream:
        if is_inline_key(key):
            return _memory_stream(await self._inline(key), chunk_size)
        return await self.store.open_stream(key, chunk_size=chunk_size)

    async def exists(self, key: str) -> bool:
        if is_inline_key(key):
            try:
                await self._inline(key)
            except BlobNotFound:
                return False
            return True
        return await self.store.exists(key)

    # -- writes and the rest: the store's ------------------------------------------------

    async def put_file(self, source: BlobSource, *,
                       content_type: str = "application/octet-stream") -> BlobRef:
        return await self.store.put_file(source, content_type=content_type)

    async def put_bytes(self, data: bytes, *,
                        content_type: str = "application/octet-stream") -> BlobRef:
        return await self.store.put_bytes(data, content_type=content_type)

    async def delete(self, key: str) -> None:
        """An inline blob has nothing outside its row, which is already gone."""
        if not is_inline_key(key):
            await self.store.delete(key)

    async def presigned_url(self, key: str, *, filename: str, content_type: str,
                            expires_s: int) -> str | None:
        if is_inline_key(key):
            return None
        return await self.store.presigned_url(key, filename=filename,
                                              content_type=content_type, expires_s=expires_s)

    async def check(self) -> None:
        await self.store.check()

    def __getattr__(self, name: str) -> Any:
        # The store's other parts (staged uploads on S3, the local store's root, ...).
        return getattr(self.store, name)
