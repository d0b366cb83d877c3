"""The local store's batch writer threads (issue 12): concurrent puts of distinct and
identical content are all durable and correct, a batch fsyncs each directory once and
only after its files, and one put's failure does not fail its batch-mates."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from agentpost.model.errors import StorageFailure
from agentpost.storage.blobs import local_writer
from agentpost.storage.blobs.local import LocalBlobStore
from agentpost.storage.blobs.local_writer import BatchWriter, _Job


def _key(data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    return f"sha256/{digest[:2]}/{digest}"


@pytest_twisted.ensureDeferred
async def test_concurrent_puts_of_distinct_and_identical_content_are_all_stored(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    contents = [os.urandom(100 + n) for n in range(40)]
    contents += contents[:10]  # the same content again, in flight at the same time
    contents += [b"same"] * 5
    refs = await defer.gatherResults(
        [defer.ensureDeferred(store.put_bytes(c)) for c in contents])
    for data, ref in zip(contents, refs, strict=True):
        assert (ref.key, ref.size) == (_key(data), len(data))
        path = tmp_path / "blobs" / ref.key
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "blobs" / "tmp") == []
    assert len({r.key for r in refs}) == 41


@pytest_twisted.ensureDeferred
async def test_a_put_larger_than_the_writer_limit_goes_to_the_pool(tmp_path, monkeypatch):
    monkeypatch.setattr("agentpost.storage.blobs.local.WRITER_MAX_BYTES", 10)
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    ref = await store.put_bytes(b"more than ten bytes")
    assert store._batch_writer is None  # never needed
    assert await store.get_bytes(ref.key) == b"more than ten bytes"


def _same_directory_pair() -> tuple[bytes, bytes]:
    """Two contents whose keys share a directory (sha256/<first two hex digits>/)."""
    seen: dict[str, bytes] = {}
    n = 0
    while True:
        data = b"content %d" % n
        prefix = hashlib.sha256(data).hexdigest()[:2]
        if prefix in seen:
            return seen[prefix], data
        seen[prefix] = data
        n += 1


def test_a_batch_fsyncs_files_before_renaming_and_each_directory_once(tmp_path, monkeypatch):
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    store._ensure_dirs()
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(local_writer.os, "fsync",
                        lambda fd: (events.append(("fsync", "file")), real_fsync(fd))[1])
    monkeypatch.setattr(local_writer.os, "replace",
                        lambda a, b: (events.append(("rename", b)), real_replace(a, b))[1])

    def fsync_dir(path: str) -> None:
        events.append(("fsync_dir", path))

    writer = BatchWriter(reactor, str(tmp_path / "blobs"), create_temp=store._create_temp,
                         makedirs=lambda d: os.makedirs(d, exist_ok=True),
                         fsync_dir=fsync_dir, guard=store._guarded, file_mode=0o640)
    a, b = _same_directory_pair()
    os.makedirs((tmp_path / "blobs" / _key(a)).parent)  # a first rename would retry
    jobs = [_Job(a, defer.Deferred()), _Job(b, defer.Deferred()), _Job(a, defer.Deferred())]
    writer._write_batch(jobs)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "fsync", "rename", "rename", "fsync_dir"]  # a twice: one file
    assert events[-1][1] == str(tmp_path / "blobs" / _key(a)).rsplit("/", 1)[0]
    assert [j.ref.key for j in jobs] == [_key(a), _key(b), _key(a)]
    assert all(j.error is None for j in jobs)

    events.clear()
    again = [_Job(b, defer.Deferred())]
    writer._write_batch(again)  # already stored: no file write, the directory still synced
    assert [kind for kind, _ in events] == ["fsync_dir"]
    assert again[0].ref.key == _key(b)


def test_one_failing_put_does_not_fail_its_batch_mates(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    calls = []

    def create_temp():
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return store._create_temp()

    writer = BatchWriter(reactor, str(tmp_path / "blobs"), create_temp=create_temp,
                         makedirs=lambda d: store._makedirs(Path(d)),
                         fsync_dir=lambda d: None, guard=store._guarded, file_mode=0o640)
    jobs = [_Job(b"first", defer.Deferred()), _Job(b"second", defer.Deferred()),
            _Job(b"third", defer.Deferred())]
    writer._write_batch(jobs)
    assert jobs[0].ref is not None and jobs[2].ref is not None
    assert jobs[1].error is not None and jobs[1].error.check(StorageFailure)
    assert (tmp_path / "blobs" / _key(b"third")).read_bytes() == b"third"
    assert os.listdir(tmp_path / "blobs" / "tmp") == []


@pytest_twisted.ensureDeferred
async def test_an_idle_writer_thread_exits_and_a_new_put_starts_one(tmp_path, monkeypatch):
    monkeypatch.setattr(local_writer, "IDLE_EXIT_S", 0.01)
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    await store.put_bytes(b"one")
    writer = store._batch_writer
    assert writer is not None
    for _ in range(500):  # the thread notices it is idle and leaves
        if writer._running == 0:
            break
        await deferLater(0.01)
    assert writer._running == 0
    ref = await store.put_bytes(b"two")
    assert await store.get_bytes(ref.key) == b"two"


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_writer_threads_are_capped(tmp_path, monkeypatch):
    """Many puts at once start at most ``threads`` writer threads; the rest queue and
    go in batches."""
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    writer = store._writer()
    gate = threading.Event()
    real = writer._write_batch
    sizes: list[int] = []

    def slow(batch):
        gate.wait(10)
        sizes.append(len(batch))
        real(batch)

    monkeypatch.setattr(writer, "_write_batch", slow)
    puts = [defer.ensureDeferred(store.put_bytes(b"blob %d" % n)) for n in range(30)]
    assert writer._running <= writer._threads
    time.sleep(0.05)  # let the started threads take their first batches (not asserted)
    gate.set()
    refs = await defer.gatherResults(puts)
    assert len({r.key for r in refs}) == 30
    assert sum(sizes) == 30 and len(sizes) < 30  # some puts shared a batch


@pytest.mark.parametrize("umask,needed", [(0o022, False), (0o027, False), (0o077, True)])
def test_fchmod_only_when_the_umask_narrows_the_mode(tmp_path, monkeypatch, umask, needed):
    monkeypatch.setattr("agentpost.storage.blobs.local.process_umask", lambda: umask)
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    assert store._chmod_needed() is needed


@pytest_twisted.ensureDeferred
async def test_a_forked_child_starts_its_own_writer_thread(tmp_path):
    """server.workers forks: the child must not wait for the parent's writer thread."""
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    await store.put_bytes(b"parent")  # the parent now has a writer thread
    writer = store._batch_writer
    assert writer is not None and writer._running >= 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it inherited, then leave at once
        ok = writer._running == 0 and writer._idle == 0
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.waitpid(pid, 0)
