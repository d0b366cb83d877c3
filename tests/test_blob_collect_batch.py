"""The blob collector deletes the store objects of many freed keys under their locks in
one transaction: one round trip to lock and check them all, whatever their number."""

from __future__ import annotations

import pytest_twisted

from agentpost.core.blobrefs import BlobCollector
from agentpost.storage import mail as mail_store
from agentpost.storage.database import Txn


@pytest_twisted.ensureDeferred
async def test_collect_deletes_only_unreferenced_objects_in_one_round_trip(server, sent):
    core = server.core
    refs = [await core.blobs.put_bytes(f"collect me {i}\n".encode()) for i in range(6)]
    kept = refs[0]

    async def reference(txn: Txn) -> None:
        await mail_store.reference_blob(txn, kept.key, kept.size)

    await core.db.run_interaction("test.reference", reference)
    for ref in refs:
        assert await core.blobs.exists(ref.key)

    sent.clear()
    keys = [r.key for r in refs] + [refs[1].key, "never-stored-" + "0" * 52]
    await BlobCollector(core.db, core.blobs).collect(keys)
    # BEGIN with the locks and the check in one message, then COMMIT (the server's own
    # timers may send statements of theirs meanwhile: only the collector's count).
    assert len(_lock_and_check(sent)) == 1, sent
    assert "COMMIT" in sent
    assert await core.blobs.exists(kept.key)  # a row still references it
    for ref in refs[1:]:
        assert not await core.blobs.exists(ref.key)


@pytest_twisted.ensureDeferred
async def test_collect_of_nothing_sends_nothing(server, sent):
    sent.clear()
    await BlobCollector(server.core.db, server.core.blobs).collect([])
    assert sent == []


@pytest_twisted.ensureDeferred
async def test_collect_goes_in_slices_of_bounded_locks(server, sent, monkeypatch):
    from agentpost.core import blobrefs

    monkeypatch.setattr(blobrefs, "COLLECT_SLICE", 2)
    core = server.core
    refs = [await core.blobs.put_bytes(f"sliced {i}\n".encode()) for i in range(5)]
    sent.clear()
    await BlobCollector(core.db, core.blobs).collect([r.key for r in refs])
    checks = _lock_and_check(sent)  # 3 transactions of at most 2 keys each
    assert len(checks) == 3 and sent.count("COMMIT") >= 3, sent
    for ref in refs:
        assert not await core.blobs.exists(ref.key)


def _lock_and_check(sent: list[str]) -> list[str]:
    """The collector's lock-and-check messages among everything sent."""
    return [sql for sql in sent if "hashtextextended(k, 7)" in sql and "FROM blobs b" in sql]
