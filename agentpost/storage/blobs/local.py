"""Blobs as files in a content-addressed directory tree on local disk.

Layout under ``root``::

    sha256/ab/ab12…ef   one file per blob, mode 0640 (directories 0750)
    tmp/                in-progress puts (same filesystem, so the final rename is atomic)

A put streams the source into a temp file while hashing it, fsyncs the file, renames it
to its content address and fsyncs the directory: once ``put_*`` returns, the blob
survives a power cut, and a crash mid-put leaves at most a temp file (see
:meth:`LocalBlobStore.sweep_temp`), never a partial blob under a real key.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from agentpost.model.errors import StorageFailure
from agentpost.storage.blobs.base import (
    COPY_CHUNK_SIZE,
    DEFAULT_STREAM_CHUNK_SIZE,
    BlobNotFound,
    BlobRef,
    BlobSource,
    BlobStream,
    SourceReadError,
    check_range,
    digest_of_key,
    hash_bytes,
    key_for_digest,
    open_source,
    read_source,
    storage_failure,
    validate_key,
)
from agentpost.storage.blobs.local_writer import BatchWriter, process_umask

log = logging.getLogger(__name__)

T = TypeVar("T")

FILE_MODE = 0o640
DIR_MODE = 0o750
_TMP_PREFIX = ".put-"
#: In-memory puts up to this size go to the store's batch writer threads
#: (storage.blobs.local_writer); larger ones to the thread pool as before: their
#: fsyncs write real data and gain from running ten at once more than from fewer
#: handoffs (100 KiB MX messages measured slower through the writer), and a 10 MB
#: message never holds up the small puts queued behind it.
WRITER_MAX_BYTES = 64 * 1024

_pid = os.getpid()  # temp file names; one getpid per put was a syscall per message


def _reset_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_reset_pid)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


#: Blobs up to this size are read in the calling thread (LocalBlobStore.get_bytes).
INLINE_READ_MAX = 64 * 1024


class LocalBlobStore:
    """A :class:`~agentpost.storage.blobs.base.BlobStore` on a local filesystem.

    Args:
        root: directory holding the store; created (0750, with missing parents) on first
            use, not in the constructor, so building the store never blocks the reactor.
        reactor: the reactor to report results on; defaults to the global reactor.
        threadpool: where blocking file I/O runs; defaults to the reactor's thread pool.

    ``content_type`` is accepted for interface parity and ignored: the database keeps
    content types; the file holds only content.
    """

    def __init__(self, root: Path | str, *, reactor: Any = None, threadpool: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.root = Path(root)
        self._reactor = reactor
        self._threadpool = threadpool
        self._tmp_dir = self.root / "tmp"
        self._root_s = str(self.root)
        self._tmp_s = str(self._tmp_dir)
        self._seq = itertools.count()  # temp file names (next() is atomic under the GIL)
        self._dirs_ready = False
        self._batch_writer: BatchWriter | None = None
        self._chmod: bool | None = None  # see _chmod_needed

    # -- plumbing -------------------------------------------------------------------------

    def _run(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run ``fn`` in the pool with the store's error translation applied."""
        pool = self._threadpool or self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, self._guarded, fn, *args)

    @staticmethod
    def _guarded(fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except SourceReadError as exc:
            raise exc.original from None
        except (BlobNotFound, StorageFailure, ValueError, TypeError):
            raise
        except OSError as exc:
            raise storage_failure(f"local blob store I/O error: {exc}") from exc

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _makedirs(self, path: Path) -> None:
        """Create ``path`` and missing parents (mode 0750), fsyncing each new entry's parent
        so the directory entries are as durable as the file renamed into them."""
        missing: list[Path] = []
        p = path
        while not p.is_dir():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, DIR_MODE)
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue  # a concurrent put made it
            os.chmod(d, DIR_MODE)  # the umask must not widen or narrow it
            _fsync_dir(d.parent)

    def _ensure_dirs(self) -> None:
        if not self._dirs_ready:
            self._makedirs(self._tmp_dir)
            self._makedirs(self.root / "sha256")
            self._dirs_ready = True

    def _open_blob(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return open(path, "rb")  # the caller closes it
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    # -- writes ---------------------------------------------------------------------------

    def _commit(self, tmp: str | Path, digest: str, size: int, *,
                checked: bool = False) -> BlobRef:
        """Rename a fsynced temp file to its content address (or drop it if present).

        ``checked``: the caller just found the address empty, so no second stat (a
        concurrent put of the same content makes the rename replace identical bytes).
        Plain string paths (not pathlib) on this per-message path: pathlib's object
        churn was a visible part of a put's CPU (issue 12)."""
        key = key_for_digest(digest)
        final = os.path.join(self._root_s, key)
        parent = os.path.dirname(final)
        existing: int | None = None
        if not checked:
            try:
                existing = os.stat(final).st_size
            except FileNotFoundError:
                pass
        if existing == size:
            os.unlink(tmp)  # same content already stored: nothing to do
            _fsync_dir(parent)  # in case a concurrent put renamed it a moment ago
            return BlobRef(key, size, digest)
        if existing is not None:
            log.warning("blob %s had size %d, expected %d; replacing it", key, existing, size)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            self._makedirs(Path(parent))
            os.replace(tmp, final)
        _fsync_dir(parent)
        return BlobRef(key, size, digest)

    def _chmod_needed(self) -> bool:
        """Whether a file created with FILE_MODE needs an fchmod: only when the umask
        (read once, without changing it) takes bits off FILE_MODE. It can never add
        any, so the mode is never wider than FILE_MODE either way."""
        if self._chmod is None:
            umask = process_umask()
            self._chmod = umask is None or bool(umask & FILE_MODE)
        return self._chmod

    def _create_temp(self) -> tuple[int, str]:
        """A new empty temp file (mode FILE_MODE less the umask) in ``tmp/``: a name
        from this process's counter, else (a leftover of an earlier process with our
        pid) one from mkstemp."""
        self._ensure_dirs()
        name = f"{self._tmp_s}/{_TMP_PREFIX}{_pid}-{next(self._seq)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(name, flags, FILE_MODE), name
        except FileExistsError:
            pass
        except FileNotFoundError:  # the tree was removed under us: recreate it once
            self._dirs_ready = False
            self._ensure_dirs()
        return tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=self._tmp_s)

    def _write_known(self, data: bytes, digest: str) -> BlobRef:
        """Write in-memory content whose digest is known: no second hashing pass and
        no buffered file object, only the system calls durability needs."""
        fd, tmp = self._create_temp()
        try:
            try:
                view = memoryview(data)
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:done + COPY_CHUNK_SIZE])
                if self._chmod_needed():
                    os.fchmod(fd, FILE_MODE)  # the umask must not narrow it
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._commit(tmp, digest, len(data), checked=True)
        except BaseException:
            _unlink_quietly(tmp)  # a half-written temp file must not stay behind
            raise

    def _write_stream(self, chunks: Callable[[], bytes | memoryview]) -> BlobRef:
        """Copy chunks into a temp file, hashing on the way (content is never held twice)."""
        self._ensure_dirs()
        try:
            fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=self._tmp_dir)
        except FileNotFoundError:  # the tree was removed under us: recreate it once
            self._dirs_ready = False
            self._ensure_dirs()
            fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=self._tmp_dir)
        tmp = Path(name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := chunks():
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fchmod(out.fileno(), FILE_MODE)
                os.fsync(out.fileno())
            return self._commit(tmp, digest.hexdigest(), size)
        except BaseException:
            _unlink_quietly(tmp)  # a half-written temp file must not stay behind
            raise

    def _put_file_sync(self, source: BlobSource) -> BlobRef:
        fileobj, owned = open_source(source)
        try:
            return self._write_stream(lambda: read_source(fileobj))
        finally:
            if owned:
                fileobj.close()

    def _put_bytes_sync(self, data: bytes) -> BlobRef:
        digest, size = hash_bytes(data)
        key = key_for_digest(digest)
        final = os.path.join(self._root_s, key)
        try:
            if os.stat(final).st_size == size:
                # in case a concurrent put renamed it a moment ago
                _fsync_dir(os.path.dirname(final))
                return BlobRef(key, size, digest)
        except FileNotFoundError:
            pass
        return self._write_known(data, digest)

    async def put_file(
        self, source: BlobSource, *, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        """Store a file's content; durable on return; the same content gives the same key."""
        return await self._run(self._put_file_sync, source)

    async def put_bytes(
        self, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        """Store in-memory content; a no-op (no write) when it is already stored.

        Small content (most mail) goes to the store's batch writer thread, larger
        content to the thread pool; both are durable on return."""
        if len(data) <= WRITER_MAX_BYTES:
            return await self._writer().submit(data)
        return await self._run(self._put_bytes_sync, data)

    def _writer(self) -> BatchWriter:
        if self._batch_writer is None:
            self._batch_writer = BatchWriter(
                self._reactor, self._root_s, create_temp=self._create_temp,
                makedirs=lambda d: self._makedirs(Path(d)), fsync_dir=_fsync_dir,
                guard=self._guarded, file_mode=FILE_MODE)
        return self._batch_writer

    # -- reads ----------------------------------------------------------------------------

    def _get_bytes_sync(self, key: str) -> bytes:
        with self._open_blob(key) as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest_of_key(key):
            raise storage_failure(f"blob {key} is corrupt (content does not match its key)")
        return data

    async def get_bytes(self, key: str) -> bytes:
        """The whole blob, verified against its SHA-256. A small one is read at once in
        the calling (reactor) thread, as twisted.web's static files are: from the page
        cache that is tens of microseconds, less than the hand-off to a worker thread
        and back costs (IMAP FETCH reads a stored message of a few KiB for most body
        items). Anything larger goes to the pool."""
        validate_key(key)
        data = self._guarded(self._get_small_sync, key)
        if data is not None:
            return data
        return await self._run(self._get_bytes_sync, key)

    def _get_small_sync(self, key: str) -> bytes | None:
        """The verified blob if it is at most INLINE_READ_MAX bytes, else None."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        try:
            size = os.fstat(fd).st_size
            if size > INLINE_READ_MAX:
                return None
            data = os.read(fd, size + 1)  # +1: a file that grew is not ours to trust
        finally:
            os.close(fd)
        if len(data) > size or hashlib.sha256(data).hexdigest() != digest_of_key(key):
            raise storage_failure(f"blob {key} is corrupt (content does not match its key)")
        return data

    def _get_range_sync(self, key: str, start: int, length: int) -> bytes:
        with self._open_blob(key) as f:
            if length == 0:
                return b""
            f.seek(start)
            return f.read(length)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start``; fewer at the end, ``b""`` past it (as IMAP)."""
        validate_key(key)
        check_range(start, length)
        return await self._run(self._get_range_sync, key, start, length)

    async def open_stream(
        self, key: str, *, chunk_size: int = DEFAULT_STREAM_CHUNK_SIZE
    ) -> BlobStream:
        """Stream a blob in ``chunk_size`` pieces, each read in a worker thread."""
        validate_key(key)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        f, size = await self._run(self._open_sized, key)
        return BlobStream(self._run, lambda: f.read(chunk_size), f.close, size)

    def _open_sized(self, key: str) -> tuple[IO[bytes], int]:
        f = self._open_blob(key)
        try:
            return f, os.fstat(f.fileno()).st_size
        except BaseException:
            f.close()
            raise

    def _exists_sync(self, key: str) -> bool:
        try:
            os.stat(self._path(key))
        except FileNotFoundError:
            return False
        return True

    async def exists(self, key: str) -> bool:
        """Whether the blob is stored (an unreadable store raises StorageFailure).

        One stat, done here rather than in a worker thread: ingest asks this for every
        new blob inside its open transaction, where a thread-pool round trip costs far
        more CPU and lock time than a stat of a file the store itself just wrote."""
        validate_key(key)
        return self._guarded(self._exists_sync, key)

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    async def delete(self, key: str) -> None:
        """Remove the blob; deleting a missing blob succeeds. Directories are kept (a
        concurrent put may be about to rename into them)."""
        validate_key(key)
        await self._run(self._delete_sync, key)

    async def presigned_url(
        self, key: str, *, filename: str, content_type: str, expires_s: int
    ) -> str | None:
        """Always None: local blobs are served through the HTTP API instead."""
        validate_key(key)
        return None

    # -- maintenance ----------------------------------------------------------------------

    def _check_sync(self) -> None:
        self._ensure_dirs()
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".probe", dir=self._tmp_dir)
        os.close(fd)
        os.unlink(name)

    async def check(self) -> None:
        """Create the directories if needed and prove a file can be written there."""
        await self._run(self._check_sync)

    def _sweep_sync(self, older_than_s: float) -> int:
        removed = 0
        cutoff = time.time() - older_than_s
        try:
            entries = list(os.scandir(self._tmp_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.startswith(_TMP_PREFIX):
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return removed

    async def sweep_temp(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files left by puts interrupted by a crash; returns how many.

        Only files older than ``older_than_s`` go, so puts in progress are untouched.
        """
        return await self._run(self._sweep_sync, older_than_s)
