"""One contract for every blob store, run against the local store and S3 (moto server).

Store-specific tests follow: S3 encryption, presigned URLs and outages; local layout,
modes, temp files and path traversal. Needs the ``tests.aws`` plugin (moto fixtures).
"""

import base64
import hashlib
import io
import os
import stat
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, threads

from agentpost.model.errors import StorageFailure, TemporaryFailure
from agentpost.storage.blobs import (
    BlobNotFound,
    BlobRef,
    BlobStore,
    BlobStream,
    InvalidBlobKey,
    LocalBlobStore,
    S3BlobStore,
    content_disposition,
)
from tests.aws import closed_port

MiB = 1024 * 1024
#: Every byte value, bare CR/LF, CRLF, a dot line and NULs: what mail must survive.
PAYLOAD = (bytes(range(256)) * 3
           + b"From: a@example.test\r\nSubject: x\r\n\r\nline\r\n.\r\n\x00\r\r\n\n\x00")


def sha(data):
    return hashlib.sha256(data).hexdigest()


def key_of(data):
    digest = sha(data)
    return f"sha256/{digest[:2]}/{digest}"


def missing_key():
    return key_of(b"never stored " + os.urandom(8))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """Each contract test runs once per store; S3 gets a fresh bucket on moto."""
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs", reactor=reactor)
        return
    bucket = request.getfixturevalue("s3_bucket")
    s3 = S3BlobStore(bucket.name, **bucket.store_kwargs(), reactor=reactor,
                     multipart_threshold=8 * MiB, multipart_chunksize=5 * MiB)
    yield s3
    s3.close()


@pytest.fixture
def s3_store(s3_bucket):
    s3 = S3BlobStore(s3_bucket.name, **s3_bucket.store_kwargs(), reactor=reactor,
                     multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    yield s3
    s3.close()


@pytest.fixture
def local_store(tmp_path):
    return LocalBlobStore(tmp_path / "blobs", reactor=reactor)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """12 MB of random bytes (above the multipart threshold), generated once."""
    path = tmp_path_factory.mktemp("big") / "big.bin"
    data = os.urandom(12 * 1000 * 1000)
    path.write_bytes(data)
    return path, sha(data)


# -- the contract ---------------------------------------------------------------------------

def test_stores_implement_the_protocol(store):
    assert isinstance(store, BlobStore)


@pytest_twisted.ensureDeferred
async def test_put_get_byte_exact(store, tmp_path):
    ref = await store.put_bytes(PAYLOAD, content_type="message/rfc822")
    assert ref == BlobRef(key_of(PAYLOAD), len(PAYLOAD), sha(PAYLOAD))
    assert await store.get_bytes(ref.key) == PAYLOAD
    assert await store.exists(ref.key)

    src = tmp_path / "msg.eml"
    other = PAYLOAD[::-1]
    src.write_bytes(other)
    ref2 = await store.put_file(src)
    assert ref2 == BlobRef(key_of(other), len(other), sha(other))
    assert await store.get_bytes(ref2.key) == other
    assert await store.put_file(str(src)) == ref2


@pytest_twisted.ensureDeferred
async def test_put_file_object_reads_from_current_position(store):
    f = io.BytesIO(b"HEADER" + PAYLOAD)
    f.seek(6)
    ref = await store.put_file(f)
    assert ref.key == key_of(PAYLOAD)
    assert await store.get_bytes(ref.key) == PAYLOAD


@pytest_twisted.ensureDeferred
async def test_put_file_from_unseekable_pipe(store):
    read_fd, write_fd = os.pipe()
    data = PAYLOAD * 50

    def feed():
        with os.fdopen(write_fd, "wb") as w:
            w.write(data)

    feeding = threads.deferToThread(feed)
    with os.fdopen(read_fd, "rb") as r:
        ref = await store.put_file(r)
    await feeding
    assert ref.key == key_of(data)
    assert await store.get_bytes(ref.key) == data


@pytest_twisted.ensureDeferred
async def test_idempotent_put_same_key(store, tmp_path):
    first = await store.put_bytes(PAYLOAD)
    assert await store.put_bytes(PAYLOAD) == first
    src = tmp_path / "same"
    src.write_bytes(PAYLOAD)
    assert await store.put_file(src) == first
    assert await store.put_file(io.BytesIO(PAYLOAD)) == first
    assert await store.get_bytes(first.key) == PAYLOAD


@pytest_twisted.ensureDeferred
async def test_empty_blob(store):
    ref = await store.put_bytes(b"")
    assert ref == BlobRef(key_of(b""), 0, sha(b""))
    assert await store.get_bytes(ref.key) == b""
    assert await store.get_range(ref.key, 0, 10) == b""
    assert [c async for c in await store.open_stream(ref.key)] == []


@pytest_twisted.ensureDeferred
async def test_get_range(store):
    ref = await store.put_bytes(PAYLOAD)
    n = len(PAYLOAD)
    cases = [(0, 10), (1, 1), (255, 3), (n - 3, 3), (n - 3, 100), (n - 1, 1), (0, n),
             (0, n + 50), (n, 5), (n + 1000, 5), (7, 0), (n + 5, 0)]
    for start, length in cases:
        got = await store.get_range(ref.key, start, length)
        assert got == PAYLOAD[start:start + length], (start, length)
    for start, length in [(-1, 5), (0, -1), (1.5, 2), (True, 1)]:
        with pytest.raises(ValueError):
            await store.get_range(ref.key, start, length)
    with pytest.raises(BlobNotFound):
        await store.get_range(missing_key(), 0, 10)
    with pytest.raises(BlobNotFound):
        await store.get_range(missing_key(), 0, 0)


@pytest_twisted.ensureDeferred
async def test_exists_and_delete_are_idempotent(store):
    ref = await store.put_bytes(b"to be deleted\r\n")
    assert await store.exists(ref.key)
    await store.delete(ref.key)
    assert not await store.exists(ref.key)
    await store.delete(ref.key)  # again: no error
    await store.delete(missing_key())
    with pytest.raises(BlobNotFound):
        await store.get_bytes(ref.key)
    assert await store.put_bytes(b"to be deleted\r\n") == ref  # and it can come back
    assert await store.get_bytes(ref.key) == b"to be deleted\r\n"


@pytest_twisted.ensureDeferred
async def test_not_found(store):
    key = missing_key()
    assert not await store.exists(key)
    with pytest.raises(BlobNotFound) as info:
        await store.get_bytes(key)
    assert isinstance(info.value, KeyError)
    assert info.value.key == key
    with pytest.raises(BlobNotFound):
        await store.open_stream(key)


@pytest.mark.parametrize("bad", [
    "../../etc/passwd", "sha256/../../../etc/passwd", "/etc/passwd", "",
    "sha256/ab/" + "ab" * 32 + "/../x", "sha256/AB/" + "AB" * 32,
    "sha256/00/" + "ab" * 32, "sha256/ab/" + "ab" * 31, "md5/ab/" + "ab" * 32,
    "sha256/ab/" + "ab" * 32 + "\n",
])
@pytest_twisted.ensureDeferred
async def test_malformed_keys_rejected_before_the_backend(store, bad):
    for call in (store.get_bytes(bad), store.exists(bad), store.delete(bad),
                 store.get_range(bad, 0, 1), store.open_stream(bad),
                 store.presigned_url(bad, filename="x", content_type="text/plain",
                                     expires_s=60)):
        with pytest.raises(InvalidBlobKey):
            await call
    assert issubclass(InvalidBlobKey, ValueError)


@pytest_twisted.ensureDeferred
async def test_stream_in_chunks_and_close_early(store):
    data = PAYLOAD * 10
    ref = await store.put_bytes(data)
    stream = await store.open_stream(ref.key, chunk_size=1000)
    assert isinstance(stream, BlobStream)
    assert stream.size == len(data)
    chunks = [c async for c in stream]
    assert b"".join(chunks) == data
    assert all(len(c) <= 1000 for c in chunks) and len(chunks) >= len(data) // 1000

    async with await store.open_stream(ref.key, chunk_size=100) as early:
        assert await early.__anext__() == data[:100]
    assert [c async for c in early] == []  # closed: nothing more


@pytest_twisted.ensureDeferred
async def test_large_put_file_does_not_block_the_reactor(store, big_file, monkeypatch):
    """The put's work runs in a worker thread, and while it is in progress the reactor
    still runs other calls (checked by events, not by timing)."""
    path, digest = big_file
    reactor_thread = threading.get_ident()
    workers: list[int] = []
    reactor_ran: list[int] = []
    put_sync = store._put_file_sync

    def in_worker(*args):
        workers.append(threading.get_ident())
        if threading.get_ident() != reactor_thread:  # (else it would wait forever)
            # the put has started and cannot finish before the reactor runs this
            threads.blockingCallFromThread(
                reactor, lambda: reactor_ran.append(threading.get_ident()))
        return put_sync(*args)

    monkeypatch.setattr(store, "_put_file_sync", in_worker)
    d = defer.Deferred.fromCoroutine(store.put_file(path))
    assert not d.called, "put_file did its work on the reactor thread"
    ref = await d
    assert ref.sha256 == digest and ref.size == path.stat().st_size
    assert len(workers) == 1 and workers[0] != reactor_thread, "not run in a worker thread"
    assert reactor_ran == [reactor_thread], "the reactor did not run other calls meanwhile"

    h = hashlib.sha256()
    size = 0
    async for chunk in await store.open_stream(ref.key, chunk_size=MiB):
        h.update(chunk)
        size += len(chunk)
    assert (h.hexdigest(), size) == (digest, ref.size)
    assert await store.get_range(ref.key, ref.size - 10, 100) == path.read_bytes()[-10:]


@pytest_twisted.ensureDeferred
async def test_concurrent_puts_of_the_same_content(store, tmp_path):
    data = os.urandom(MiB) + PAYLOAD
    puts = [defer.Deferred.fromCoroutine(store.put_bytes(data)) for _ in range(6)]
    src = tmp_path / "same.bin"
    src.write_bytes(data)
    puts += [defer.Deferred.fromCoroutine(store.put_file(src)) for _ in range(2)]
    refs = await defer.gatherResults(puts, consumeErrors=True)
    assert len(set(refs)) == 1
    assert refs[0].key == key_of(data)
    assert await store.get_bytes(refs[0].key) == data


@pytest_twisted.ensureDeferred
async def test_source_errors_are_not_storage_failures(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        await store.put_file(tmp_path / "no-such-spool-file")

    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put_file(Broken())


def test_content_disposition():
    assert content_disposition("report.pdf") == 'attachment; filename="report.pdf"'
    assert content_disposition('a"b\\c/d.txt') == 'attachment; filename="a_b_c_d.txt"'
    assert content_disposition("x\r\nSet-Cookie: y") == 'attachment; filename="x__Set-Cookie: y"'
    assert content_disposition("") == 'attachment; filename="download"'
    assert content_disposition("Résumé 2024.pdf", "inline") == (
        "inline; filename=\"R_sum_ 2024.pdf\"; filename*=UTF-8''R%C3%A9sum%C3%A9%202024.pdf")


# -- S3 only --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_s3_every_put_is_encrypted(s3_store, s3_bucket, tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(PAYLOAD * 3)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * MiB))  # > 5 MiB threshold: two parts
    refs = [await s3_store.put_bytes(PAYLOAD, content_type="message/rfc822"),
            await s3_store.put_file(small),
            await s3_store.put_file(big)]
    heads = [await threads.deferToThread(s3_bucket.client.head_object,
                                         Bucket=s3_bucket.name, Key=ref.key) for ref in refs]
    assert [h["ServerSideEncryption"] for h in heads] == ["AES256"] * 3
    assert [h["ContentLength"] for h in heads] == [ref.size for ref in refs]
    assert heads[0]["ContentType"] == "message/rfc822"
    assert heads[2]["ETag"].strip('"').endswith("-2"), "large put did not go multipart"


@pytest_twisted.ensureDeferred
async def test_s3_kms_and_prefix(s3_bucket):
    kms_key = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000001"
    s3 = S3BlobStore(s3_bucket.name, **s3_bucket.store_kwargs(), sse="aws:kms",
                     kms_key_id=kms_key, prefix="tenant-a", reactor=reactor)
    try:
        ref = await s3.put_bytes(PAYLOAD)
        head = await threads.deferToThread(s3_bucket.client.head_object,
                                           Bucket=s3_bucket.name, Key="tenant-a/" + ref.key)
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"] == kms_key
        assert ref.key == key_of(PAYLOAD)  # the prefix is not part of the blob key
        assert await s3.get_bytes(ref.key) == PAYLOAD
    finally:
        s3.close()
    with pytest.raises(ValueError):
        S3BlobStore("b", region="us-east-1", sse="none")
    with pytest.raises(ValueError):
        S3BlobStore("b", region="us-east-1", kms_key_id="k")


@pytest_twisted.ensureDeferred
async def test_s3_presigned_url_downloads_over_http(s3_store):
    ref = await s3_store.put_bytes(PAYLOAD)
    url = await s3_store.presigned_url(ref.key, filename='Résumé "final".pdf',
                                       content_type="application/pdf", expires_s=300)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["300"]
    resp = await treq.get(url, persistent=False)
    body = await resp.content()
    assert resp.code == 200
    assert body == PAYLOAD
    headers = resp.headers
    assert headers.getRawHeaders("content-disposition") == [
        "attachment; filename=\"R_sum_ _final_.pdf\"; "
        "filename*=UTF-8''R%C3%A9sum%C3%A9%20_final_.pdf"]
    assert headers.getRawHeaders("content-type") == ["application/pdf"]
    assert headers.getRawHeaders("x-amz-server-side-encryption") == ["AES256"]


@pytest_twisted.ensureDeferred
async def test_s3_presigned_expiry_is_capped(s3_store):
    key = key_of(b"anything")
    for asked, granted in [(10**9, "604800"), (604801, "604800"), (0, "1"), (-5, "1"),
                           (604800, "604800")]:
        url = await s3_store.presigned_url(key, filename="a.txt", content_type="text/plain",
                                           expires_s=asked)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        assert query["X-Amz-Expires"] == [granted], asked
    with pytest.raises(ValueError):
        await s3_store.presigned_url(key, filename="a", content_type="text/plain\r\nX: y",
                                     expires_s=60)


@pytest_twisted.ensureDeferred
async def test_s3_unreachable_endpoint_fails_fast():
    """A refused connection is a temporary StorageFailure after a bounded number of
    attempts: no retry loop (attempts are counted, not timed)."""
    with closed_port() as port:
        s3 = S3BlobStore("nowhere", region="us-east-1", endpoint_url=f"http://127.0.0.1:{port}",
                         access_key="testing", secret_key="testing", reactor=reactor,
                         connect_timeout_s=1, read_timeout_s=1, max_attempts=1)
        try:
            # fails fast: bounded socket waits and a bounded number of HTTP attempts,
            # each one counted (before-send fires once per attempt, retries included)
            client = await threads.deferToThread(s3._client)
            assert client.meta.config.connect_timeout == client.meta.config.read_timeout == 1
            attempts: list[str] = []
            client.meta.events.register(
                "before-send.s3", lambda request, **_: attempts.append(request.url))
            for call in (lambda: s3.put_bytes(PAYLOAD), lambda: s3.get_bytes(key_of(PAYLOAD)),
                         lambda: s3.exists(key_of(PAYLOAD)), lambda: s3.delete(key_of(PAYLOAD)),
                         lambda: s3.get_range(key_of(PAYLOAD), 0, 5), s3.check):
                attempts.clear()
                with pytest.raises(StorageFailure) as info:
                    await call()
                # max_attempts=1 is exactly one HTTP attempt (total_max_attempts)
                assert len(attempts) == 1, attempts
                assert isinstance(info.value, TemporaryFailure) and info.value.temporary
                # clients see the generic text; the cause stays server-side
                assert info.value.message == StorageFailure.default_message
                assert "EndpointConnectionError" in info.value.reason
                assert not isinstance(info.value, BlobNotFound)
        finally:
            s3.close()


@pytest_twisted.ensureDeferred
async def test_s3_missing_bucket_is_a_storage_failure(s3_bucket):
    s3 = S3BlobStore("no-such-bucket", **s3_bucket.store_kwargs(), reactor=reactor)
    try:
        with pytest.raises(StorageFailure):
            await s3.get_bytes(key_of(PAYLOAD))
        with pytest.raises(StorageFailure):
            await s3.check()
    finally:
        s3.close()
    good = S3BlobStore(s3_bucket.name, **s3_bucket.store_kwargs(), reactor=reactor)
    try:
        await good.check()
    finally:
        good.close()


@pytest_twisted.ensureDeferred
async def test_s3_corrupt_object_is_detected(s3_store, s3_bucket):
    key = key_of(PAYLOAD)
    await threads.deferToThread(s3_bucket.client.put_object, Bucket=s3_bucket.name, Key=key,
                                Body=PAYLOAD[:-1])
    with pytest.raises(StorageFailure):
        await s3_store.get_bytes(key)
    # a put of the real content repairs it (size differs, so it is re-uploaded)
    assert (await s3_store.put_bytes(PAYLOAD)).key == key
    assert await s3_store.get_bytes(key) == PAYLOAD


# -- local only -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_local_layout_modes_and_no_temp_files(local_store, tmp_path):
    ref = await local_store.put_bytes(PAYLOAD)
    path = tmp_path / "blobs" / ref.key
    assert path.read_bytes() == PAYLOAD
    assert path.parent.name == ref.sha256[:2] and path.name == ref.sha256
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    for d in (path.parent, path.parent.parent, tmp_path / "blobs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
    assert await local_store.presigned_url(ref.key, filename="a", content_type="text/plain",
                                           expires_s=60) is None
    await local_store.put_file(io.BytesIO(PAYLOAD * 2))
    await local_store.put_file(io.BytesIO(PAYLOAD))  # existing content: temp file dropped
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_local_traversal_never_reaches_the_disk(local_store, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"top secret")
    await local_store.put_bytes(b"x")
    for bad in ("../secret", "sha256/../../secret", str(secret)):
        with pytest.raises(InvalidBlobKey):
            await local_store.get_bytes(bad)
        with pytest.raises(InvalidBlobKey):
            await local_store.delete(bad)
    assert secret.read_bytes() == b"top secret"


@pytest_twisted.ensureDeferred
async def test_local_unusable_root_is_a_storage_failure(tmp_path):
    blocker = tmp_path / "a-regular-file"
    blocker.write_bytes(b"")
    store = LocalBlobStore(blocker / "blobs", reactor=reactor)  # mkdir fails, even for root
    for call in (lambda: store.put_bytes(PAYLOAD), lambda: store.put_file(io.BytesIO(PAYLOAD)),
                 lambda: store.get_bytes(key_of(PAYLOAD)), lambda: store.exists(key_of(PAYLOAD)),
                 store.check):
        with pytest.raises(StorageFailure) as info:
            await call()
        assert str(tmp_path) not in info.value.message
        assert str(tmp_path) in info.value.reason


@pytest_twisted.ensureDeferred
async def test_local_corruption_detected_and_repaired(local_store, tmp_path):
    ref = await local_store.put_bytes(PAYLOAD)
    path = tmp_path / "blobs" / ref.key
    path.write_bytes(PAYLOAD[:-5])  # a torn copy
    with pytest.raises(StorageFailure):
        await local_store.get_bytes(ref.key)
    assert await local_store.put_bytes(PAYLOAD) == ref  # size mismatch: rewritten
    assert await local_store.get_bytes(ref.key) == PAYLOAD


@pytest_twisted.ensureDeferred
async def test_local_sweep_temp(local_store, tmp_path):
    await local_store.check()
    tmp_dir = tmp_path / "blobs" / "tmp"
    stale, fresh = tmp_dir / ".put-stale.tmp", tmp_dir / ".put-fresh.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert await local_store.sweep_temp(older_than_s=3600) == 1
    assert sorted(p.name for p in tmp_dir.iterdir()) == [".put-fresh.tmp"]


def test_local_store_constructor_does_no_io(tmp_path):
    LocalBlobStore(tmp_path / "later", reactor=reactor)
    assert not Path(tmp_path / "later").exists()


@pytest_twisted.ensureDeferred
async def test_s3_single_part_put_carries_the_content_sha256(s3_store, s3_bucket):
    ref = await s3_store.put_bytes(PAYLOAD)
    head = await threads.deferToThread(s3_bucket.client.head_object, Bucket=s3_bucket.name,
                                       Key=ref.key, ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256") == base64.b64encode(bytes.fromhex(ref.sha256)).decode()


@pytest_twisted.ensureDeferred
async def test_s3_checksum_headers_can_be_turned_off(s3_bucket):
    s3 = S3BlobStore(s3_bucket.name, **s3_bucket.store_kwargs(), reactor=reactor,
                     send_checksums=False)
    try:
        ref = await s3.put_bytes(PAYLOAD)
        assert await s3.get_bytes(ref.key) == PAYLOAD
        head = await threads.deferToThread(s3_bucket.client.head_object,
                                           Bucket=s3_bucket.name, Key=ref.key,
                                           ChecksumMode="ENABLED")
        assert "ChecksumSHA256" not in head
    finally:
        s3.close()


@pytest_twisted.ensureDeferred
async def test_local_small_blobs_are_read_in_the_calling_thread(local_store, tmp_path):
    """A blob up to INLINE_READ_MAX is read, and verified, without a worker thread (the
    hand-off cost more than the read); a larger one still goes to the pool."""
    from agentpost.storage.blobs import local as local_module

    pool_reads: list[str] = []
    real_run = local_store._run

    def counting_run(fn, *args):
        pool_reads.append(fn.__name__)
        return real_run(fn, *args)

    local_store._run = counting_run
    small = await local_store.put_bytes(b"x" * 100)
    big = await local_store.put_bytes(b"y" * (local_module.INLINE_READ_MAX + 1))
    pool_reads.clear()
    assert await local_store.get_bytes(small.key) == b"x" * 100
    assert pool_reads == []
    assert await local_store.get_bytes(big.key) == b"y" * (local_module.INLINE_READ_MAX + 1)
    assert pool_reads == ["_get_bytes_sync"]
    (tmp_path / "blobs" / small.key).write_bytes(b"x" * 99)  # torn, read inline
    with pytest.raises(StorageFailure):
        await local_store.get_bytes(small.key)
    (tmp_path / "blobs" / small.key).unlink()
    with pytest.raises(KeyError):  # BlobNotFound, as from the pool
        await local_store.get_bytes(small.key)
