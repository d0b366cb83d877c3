"""One dedicated thread that writes the local store's small in-memory puts in batches.

Why not the reactor's thread pool: on the MX every message's blob was a separate pool job,
and each job cost two thread handoffs (the pool's condition variable, then the reactor's
waker) plus GIL contention with the other nine pool threads: a visible share of the server's
CPU, much of it in the kernel (futex). This writer takes every put queued while it was busy
as one batch, writes and fsyncs each new file, renames them to their content addresses,
fsyncs each touched directory once for the whole batch, and hands all the results back to
the reactor in one call.

The durability contract is unchanged: a put's Deferred fires only after its file was
fsynced, renamed into place and its directory fsynced (or the identical content was
already there and its directory fsynced). The order (file fsync before rename) means a
crash leaves at most a temp file, never a partial blob under a real key.

The thread starts on the first put and exits after :data:`IDLE_EXIT_S` without work, so a
store that is no longer used (tests make many) holds no thread.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from agentpost.storage.blobs.base import BlobRef, hash_bytes, key_for_digest, storage_failure

#: Seconds the writer thread waits for work before it exits (it restarts on demand).
IDLE_EXIT_S = 10.0
#: A batch stops growing at this many puts or bytes, so one batch's wait stays short.
BATCH_MAX_PUTS = 16
BATCH_MAX_BYTES = 4 * 1024 * 1024


@dataclass
class _Job:
    data: bytes | bytearray | memoryview
    done: defer.Deferred[BlobRef]
    ref: BlobRef | None = None  # set once the file (if any) is written
    error: Failure | None = None
    parent: str = ""  # the directory whose fsync this job's durability awaits
    tmp: str = ""  # the fsynced temp file still to rename, if any
    final: str = ""
    same_as: _Job | None = field(default=None, repr=False)  # identical content in the batch


def process_umask() -> int | None:
    """The process umask without changing it (os.umask would, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


_WRITERS: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked worker (server.workers) inherits no threads: forget the parent's, so
    the child's first put starts its own instead of queueing for one that is gone."""
    for writer in list(_WRITERS):
        writer._forget_threads()


os.register_at_fork(after_in_child=_after_fork_in_child)


class BatchWriter:
    """Writes puts for one local store; see the module docstring.

    Args:
        reactor: results are delivered with ``reactor.callFromThread``.
        root: the store's root directory (string path).
        create_temp: ``() -> (fd, path)``: a new empty temp file (store's naming rules).
        makedirs: ``(dir) -> None``: create a missing content directory durably.
        fsync_dir: ``(dir) -> None``.
        guard: ``(fn, *args)``: the store's error translation (OSError -> StorageFailure).
        file_mode: the mode blobs must have; fchmod is skipped when the umask cannot
            change it.
        threads: at most this many writer threads.
    """

    def __init__(self, reactor: Any, root: str, *, create_temp: Callable[[], tuple[int, str]],
                 makedirs: Callable[[str], None], fsync_dir: Callable[[str], None],
                 guard: Callable[..., Any], file_mode: int, threads: int = 4) -> None:
        self._reactor = reactor
        self._root = root
        self._create_temp = create_temp
        self._makedirs = makedirs
        self._fsync_dir = fsync_dir
        self._guard = guard
        self._mode = file_mode
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = max(1, threads)
        self._running = 0  # threads alive
        self._idle = 0  # of them, waiting for work (a submit then starts none)
        self._chmod = True
        _WRITERS.add(self)

    def _forget_threads(self) -> None:
        self._queue = queue.SimpleQueue()  # puts queued in the parent are the parent's
        self._lock = threading.Lock()
        self._running = self._idle = 0

    def submit(self, data: bytes | bytearray | memoryview) -> defer.Deferred[BlobRef]:
        """Queue one put (reactor thread); the Deferred fires in the reactor thread.

        A thread is started when none is idle, up to ``threads``: fsyncs issued from
        several threads at once share the filesystem's journal commits, one thread
        doing them one after the other would cap the put rate at the disk's latency."""
        job = _Job(data, defer.Deferred())
        with self._lock:
            self._queue.put(job)
            if self._idle == 0 and self._running < self._threads:
                self._running += 1
                threading.Thread(target=self._loop, name="blob-writer", daemon=True).start()
        return job.done

    # -- the writer threads ---------------------------------------------------------------

    def _next_batch(self) -> list[_Job] | None:
        """Block for work; None when idle for IDLE_EXIT_S (the thread then exits)."""
        with self._lock:
            self._idle += 1
        while True:
            try:
                first = self._queue.get(timeout=IDLE_EXIT_S)
                with self._lock:
                    self._idle -= 1
                break
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._running -= 1
                        self._idle -= 1
                        return None
        batch = [first]
        size = len(first.data)
        while len(batch) < BATCH_MAX_PUTS and size < BATCH_MAX_BYTES:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(job)
            size += len(job.data)
        return batch

    def _loop(self) -> None:
        umask = process_umask()
        self._chmod = umask is None or bool(umask & self._mode)
        while (batch := self._next_batch()) is not None:
            self._write_batch(batch)
            self._reactor.callFromThread(_deliver, batch)

    def _write_batch(self, batch: list[_Job]) -> None:
        """Files first (write + fsync), then renames, then one fsync per directory."""
        by_digest: dict[str, _Job] = {}
        for job in batch:
            try:
                self._guard(self._prepare, job, by_digest)
            except BaseException:
                job.error = Failure()
        dirs: dict[str, list[_Job]] = {}
        for job in batch:
            if job.error is not None or job.same_as is not None:
                continue
            try:
                if job.tmp:
                    self._guard(self._rename, job)
                dirs.setdefault(job.parent, []).append(job)
            except BaseException:
                job.error = Failure()
                _unlink_quietly(job.tmp)
        for parent, jobs in dirs.items():
            try:
                self._guard(self._fsync_dir, parent)
            except BaseException:
                failure = Failure()
                for job in jobs:
                    job.error = failure
        for job in batch:
            if job.same_as is not None:
                job.ref, job.error = job.same_as.ref, job.same_as.error

    def _prepare(self, job: _Job, by_digest: dict[str, _Job]) -> None:
        """Hash; note an identical put earlier in the batch or an already stored blob;
        else write the temp file and fsync it (its rename comes after the whole batch)."""
        digest, size = hash_bytes(job.data)
        first = by_digest.get(digest)
        if first is not None:
            job.same_as = first
            return
        by_digest[digest] = job
        key = key_for_digest(digest)
        job.final = final = f"{self._root}/{key}"
        job.parent = final[:final.rindex("/")]
        try:
            stored = os.stat(final).st_size == size
        except FileNotFoundError:
            stored = False
        if not stored:
            fd, job.tmp = self._create_temp()
            try:
                try:
                    view = memoryview(job.data)
                    done = 0
                    while done < size:
                        done += os.write(fd, view[done:])
                    if self._chmod:
                        os.fchmod(fd, self._mode)  # the umask must not narrow it
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException:
                _unlink_quietly(job.tmp)
                job.tmp = ""
                raise
        job.ref = BlobRef(key, size, digest)

    def _rename(self, job: _Job) -> None:
        try:
            os.replace(job.tmp, job.final)
        except FileNotFoundError:  # the first blob in this directory
            self._makedirs(job.parent)
            os.replace(job.tmp, job.final)


def _unlink_quietly(path: str) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _deliver(batch: list[_Job]) -> None:
    """Fire every put of a batch (reactor thread)."""
    for job in batch:
        job.data = b""  # the caller may hold the Deferred longer than the bytes matter
        if job.error is not None:
            job.done.errback(job.error)
        elif job.ref is None:  # never expected: every path sets one or the other
            job.done.errback(storage_failure("local blob put finished without a result"))
        else:
            job.done.callback(job.ref)
