"""The local store's in-memory put (issue 12): temp names from a counter, one hash pass,
and the same guarantees as before (mode, no leftovers, a name collision survived)."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat

import pytest_twisted
from twisted.internet import reactor

from agentpost.storage.blobs.local import LocalBlobStore


@pytest_twisted.ensureDeferred
async def test_put_bytes_is_exact_private_and_leaves_no_temp_file(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    data = os.urandom(5000)
    ref = await store.put_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert (ref.key, ref.size, ref.sha256) == (f"sha256/{digest[:2]}/{digest}", 5000, digest)
    path = tmp_path / "blobs" / ref.key
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "blobs" / "tmp") == []
    assert await store.put_bytes(data) == ref  # already stored: the same ref, no write


@pytest_twisted.ensureDeferred
async def test_a_leftover_temp_file_with_our_next_name_is_left_alone(tmp_path):
    """An earlier process with the same pid may have left ``.put-<pid>-<n>.tmp``
    behind (a crash mid-put): the put picks another name and does not touch it."""
    store = LocalBlobStore(tmp_path / "blobs", reactor=reactor)
    await store.check()  # creates the directories
    store._seq = itertools.count(7)
    leftover = tmp_path / "blobs" / "tmp" / f".put-{os.getpid()}-7.tmp"
    leftover.write_bytes(b"half a blob")
    ref = await store.put_bytes(b"whole content")
    assert await store.get_bytes(ref.key) == b"whole content"
    assert leftover.read_bytes() == b"half a blob"
    assert os.listdir(tmp_path / "blobs" / "tmp") == [leftover.name]
    assert await store.sweep_temp(older_than_s=-1) == 1  # the sweeper still finds it
