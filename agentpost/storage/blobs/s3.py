"""Blobs as objects in an S3 (or S3-compatible) bucket, through boto3.

boto3 blocks, so every call runs in a dedicated Twisted thread pool: a slow or dead S3
endpoint then ties up that pool's threads, never the reactor (and never the reactor's
own pool that the database and local disk work share).

Every write asks for server-side encryption (``AES256`` or ``aws:kms``), so an object is
never stored unencrypted even if the bucket has no default encryption. Small puts are a
single PutObject carrying ``ChecksumSHA256`` = the content hash, so real S3 refuses a body
that does not match its key; large puts go multipart through boto3's transfer manager.

IAM: the principal needs s3:GetObject, s3:PutObject, s3:DeleteObject on the prefix and
s3:ListBucket on the bucket (without ListBucket, S3 answers 403 instead of 404 for a
missing key, which this store must report as StorageFailure rather than BlobNotFound).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import tempfile
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

import boto3
import boto3.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from agentpost.model.errors import StorageFailure
from agentpost.storage.blobs.base import (
    DEFAULT_STREAM_CHUNK_SIZE,
    BlobNotFound,
    BlobRef,
    BlobSource,
    BlobStream,
    SourceReadError,
    check_header_value,
    check_range,
    clamp_expiry,
    content_disposition,
    digest_of_key,
    key_for_digest,
    open_source,
    read_source,
    storage_failure,
    validate_key,
)

if TYPE_CHECKING:
    from agentpost.storage.blobs.s3_staging import S3Staging

log = logging.getLogger(__name__)

T = TypeVar("T")

SSE_MODES = ("AES256", "aws:kms")
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part (all but the last)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_BACKEND_ERRORS = (
    ClientError, BotoCoreError, boto3.exceptions.Boto3Error, urllib3.exceptions.HTTPError,
    OSError,
)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_not_found(exc: ClientError) -> bool:
    # NoSuchBucket is a 404 too, but a misconfiguration, not a missing blob: it stays a
    # StorageFailure. (A HEAD has no body, so a missing bucket there looks like "404".)
    return _error_code(exc) in _NOT_FOUND_CODES


def _seekable(fileobj: IO[bytes]) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        return False


class S3BlobStore:
    """A :class:`~agentpost.storage.blobs.base.BlobStore` on S3.

    Args:
        bucket: the bucket name (it must exist; see :meth:`check`).
        region: the bucket's region, also the SigV4 signing region.
        endpoint_url: None for AWS; e.g. ``http://127.0.0.1:9000`` for MinIO or moto.
        access_key, secret_key, session_token: static credentials, or None for boto3's
            default chain (environment, shared config, instance/task role). Give both or
            neither of access_key and secret_key.
        sse: ``"AES256"`` (SSE-S3) or ``"aws:kms"``; sent with every put.
        kms_key_id: the KMS key for ``aws:kms`` (None: the bucket's/AWS-managed key).
        prefix: object-name prefix for the store (``"mail/"``); normalised to end in
            ``/``. Blob keys returned to callers never include it, so a reference stays
            valid if the prefix or the store changes.
        reactor: reports results on this reactor; defaults to the global reactor.
        threadpool: run boto3 calls here; by default the store owns a dedicated pool of
            ``max_threads`` threads, stopped by :meth:`close` or at reactor shutdown.
        connect_timeout_s, read_timeout_s, max_attempts: botocore socket timeouts and
            attempts per call ("standard" retry mode, so 5xx/throttling are retried).
        multipart_threshold, multipart_chunksize, multipart_concurrency: content above
            the threshold is uploaded in parts of chunksize (>= 5 MiB), up to
            ``multipart_concurrency`` at once.
        addressing_style: ``"path"`` (works with any endpoint, incl. IP addresses) or
            ``"virtual"``.
        send_checksums: send ``x-amz-checksum-*`` headers (a SHA-256 of the content on
            single-part puts, botocore's CRC otherwise). Set False only for S3-compatible
            servers that reject them; transport integrity then rests on TLS and Content-MD5.

    Constructing the store does no I/O; the boto3 client is built on first use, in a
    worker thread.
    """

    def __init__(
        self,
        bucket: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        sse: str = "AES256",
        kms_key_id: str | None = None,
        prefix: str = "",
        reactor: Any = None,
        threadpool: ThreadPool | None = None,
        max_threads: int = 8,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 3,
        multipart_threshold: int = 8 * 1024 * 1024,
        multipart_chunksize: int = 8 * 1024 * 1024,
        multipart_concurrency: int = 4,
        addressing_style: str = "path",
        send_checksums: bool = True,
    ) -> None:
        if not bucket:
            raise ValueError("bucket is required")
        if sse not in SSE_MODES:
            raise ValueError(f"sse must be one of {SSE_MODES}, not {sse!r}")
        if kms_key_id and sse != "aws:kms":
            raise ValueError("kms_key_id requires sse='aws:kms'")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        if multipart_chunksize < MIN_PART_SIZE:
            raise ValueError("multipart_chunksize must be at least 5 MiB")
        if max_attempts < 1 or max_threads < 1 or multipart_concurrency < 1:
            raise ValueError("max_attempts, max_threads and multipart_concurrency must be >= 1")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.bucket = bucket
        self.region = region
        self.endpoint_url = endpoint_url
        self.sse = sse
        self.kms_key_id = kms_key_id
        prefix = prefix.lstrip("/")
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._credentials = (access_key, secret_key, session_token)
        self._reactor = reactor
        checksum_mode = "when_supported" if send_checksums else "when_required"
        self._send_checksums = send_checksums
        self._config = Config(
            request_checksum_calculation=checksum_mode,
            response_checksum_validation=checksum_mode,
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            # total_max_attempts: a client config's max_attempts counts *retries*.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            max_pool_connections=max(10, max_threads * multipart_concurrency),
        )
        self._multipart_threshold = multipart_threshold
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=multipart_concurrency,
            use_threads=multipart_concurrency > 1,
        )
        self._sse_args: dict[str, str] = {"ServerSideEncryption": sse}
        if kms_key_id:
            self._sse_args["SSEKMSKeyId"] = kms_key_id
        self._client_obj: Any = None
        self._client_lock = threading.Lock()
        self._owns_pool = threadpool is None
        if threadpool is None:
            threadpool = ThreadPool(minthreads=0, maxthreads=max_threads, name=f"s3-{bucket}")
            threadpool.start()
            self._shutdown_trigger: Any = reactor.addSystemEventTrigger(
                "during", "shutdown", self._on_shutdown)
        else:
            self._shutdown_trigger = None
        self._pool = threadpool

    # -- plumbing -------------------------------------------------------------------------

    def _client(self) -> Any:
        """The boto3 client, built once (in a worker thread: it reads botocore's models
        from disk, and a default credential chain may query instance metadata)."""
        with self._client_lock:
            if self._client_obj is None:
                access_key, secret_key, token = self._credentials
                session = boto3.session.Session(
                    aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                    aws_session_token=token, region_name=self.region)
                self._client_obj = session.client(
                    "s3", endpoint_url=self.endpoint_url, config=self._config)
            return self._client_obj

    def _run(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, self._guarded, fn, *args)

    @staticmethod
    def _guarded(fn: Callable[..., T], *args: Any) -> T:
        """Translate backend exceptions (in the worker thread, where they happen)."""
        try:
            return fn(*args)
        except SourceReadError as exc:
            raise exc.original from None
        except (BlobNotFound, StorageFailure):
            raise
        except ClientError as exc:
            raise storage_failure(
                f"S3 error {_error_code(exc) or _http_status(exc)}: {exc}") from exc
        except _BACKEND_ERRORS as exc:
            raise storage_failure(f"S3 unavailable: {type(exc).__name__}: {exc}") from exc

    def _object(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._client().head_object(
                Bucket=self.bucket, Key=self._object(key))
            return head
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise

    # -- writes ---------------------------------------------------------------------------

    def _upload(
        self, digest: str, size: int, content_type: str, body: IO[bytes],
        data: bytes | None = None,
    ) -> BlobRef:
        """Store ``size`` bytes from ``body`` (positioned at the content), or ``data`` when
        the caller already has them in memory, under their hash."""
        key = key_for_digest(digest)
        ref = BlobRef(key, size, digest)
        head = self._head(key)
        if head is not None:
            if head.get("ContentLength") == size and head.get("ServerSideEncryption") == self.sse:
                return ref  # already stored, encrypted as configured: nothing to do
            log.warning("re-uploading blob %s (size %s, sse %s)", key,
                        head.get("ContentLength"), head.get("ServerSideEncryption"))
        extra = {"ContentType": content_type, **self._sse_args}
        client = self._client()
        if size <= self._multipart_threshold:
            if data is None:
                data = read_source(body, size) if size else b""
            if len(data) != size:
                raise SourceReadError(ValueError("put source changed while being stored"))
            if self._send_checksums:  # S3 then refuses a body that does not match the key
                extra["ChecksumAlgorithm"] = "SHA256"
                extra["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(digest)).decode()
            client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, **extra)
        else:
            client.upload_fileobj(body, self.bucket, self._object(key), ExtraArgs=extra,
                                  Config=self._transfer)
        return ref

    def _put_file_sync(self, source: BlobSource, content_type: str) -> BlobRef:
        fileobj, owned = open_source(source)
        spool: IO[bytes] | None = None
        try:
            digest = hashlib.sha256()
            size = 0
            if _seekable(fileobj):
                # Hash in a first pass, then rewind and upload from the same handle.
                start = fileobj.tell()
                while chunk := read_source(fileobj):
                    digest.update(chunk)
                    size += len(chunk)
                fileobj.seek(start)
                body = fileobj
            else:
                # A pipe/socket: spool while hashing (memory up to the multipart threshold,
                # then a temp file), since the key must be known before the upload starts.
                spool = tempfile.SpooledTemporaryFile(max_size=self._multipart_threshold)
                while chunk := read_source(fileobj):
                    digest.update(chunk)
                    size += len(chunk)
                    spool.write(chunk)
                spool.seek(0)
                body = spool
            return self._upload(digest.hexdigest(), size, content_type, body)
        finally:
            if spool is not None:
                spool.close()
            if owned:
                fileobj.close()

    def _put_bytes_sync(self, data: bytes, content_type: str) -> BlobRef:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) <= self._multipart_threshold:  # one PutObject straight from memory
            return self._upload(digest, len(data), content_type, io.BytesIO(), bytes(data))
        return self._upload(digest, len(data), content_type, io.BytesIO(data))

    async def put_file(
        self, source: BlobSource, *, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        """Store a file's content (path, or file object from its position to EOF).

        ``content_type`` is recorded on the first upload of that content only. The source
        must not change during the put (it is read twice when seekable: hash, upload).
        """
        check_header_value("content_type", content_type)
        return await self._run(self._put_file_sync, source, content_type)

    async def put_bytes(
        self, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        """Store in-memory content; skips the upload when the object already exists."""
        check_header_value("content_type", content_type)
        return await self._run(self._put_bytes_sync, data, content_type)

    # -- reads ----------------------------------------------------------------------------

    def _get_object(self, key: str, **kwargs: Any) -> dict[str, Any]:
        try:
            resp: dict[str, Any] = self._client().get_object(
                Bucket=self.bucket, Key=self._object(key), **kwargs)
            return resp
        except ClientError as exc:
            if _is_not_found(exc):
                raise BlobNotFound(key) from None
            raise

    def _get_bytes_sync(self, key: str) -> bytes:
        resp = self._get_object(key)
        body = resp["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        if hashlib.sha256(data).hexdigest() != digest_of_key(key):
            raise storage_failure(f"blob {key} is corrupt or truncated (content != key)")
        return data

    async def get_bytes(self, key: str) -> bytes:
        """The whole blob, verified against its SHA-256."""
        validate_key(key)
        return await self._run(self._get_bytes_sync, key)

    def _get_range_sync(self, key: str, start: int, length: int) -> bytes:
        if length == 0:
            if self._head(key) is None:
                raise BlobNotFound(key)
            return b""
        try:
            resp = self._get_object(key, Range=f"bytes={start}-{start + length - 1}")
        except ClientError as exc:
            if _error_code(exc) == "InvalidRange" or _http_status(exc) == 416:
                return b""  # start is at/after the end (or the blob is empty)
            raise
        body = resp["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        if not resp.get("ContentRange"):  # a server that ignored Range sent it all
            return data[start:start + length]
        return data[:length]

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start``; fewer at the end, ``b""`` past it (as IMAP)."""
        validate_key(key)
        check_range(start, length)
        return await self._run(self._get_range_sync, key, start, length)

    async def open_stream(
        self, key: str, *, chunk_size: int = DEFAULT_STREAM_CHUNK_SIZE
    ) -> BlobStream:
        """Stream a blob over one GET; each chunk is read in a worker thread when asked for,
        so a slow consumer slows the download (TCP back-pressure) instead of buffering."""
        validate_key(key)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        resp = await self._run(self._get_object, key)
        body = resp["Body"]
        return BlobStream(self._run, lambda: body.read(chunk_size), body.close,
                          int(resp.get("ContentLength", 0)))

    async def exists(self, key: str) -> bool:
        """Whether the object exists (one HEAD)."""
        validate_key(key)
        return await self._run(lambda: self._head(key) is not None)

    def _delete_sync(self, key: str) -> None:
        try:
            self._client().delete_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if not _is_not_found(exc):
                raise

    async def delete(self, key: str) -> None:
        """Delete the object; a missing one is fine. (On a versioned bucket this only adds
        a delete marker; use a lifecycle rule to expire old versions.)"""
        validate_key(key)
        await self._run(self._delete_sync, key)

    def _presign_sync(self, key: str, filename: str, content_type: str, expires_s: int) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": self._object(key),
            "ResponseContentDisposition": content_disposition(filename),
            "ResponseContentType": content_type,
        }
        url: str = self._client().generate_presigned_url(
            "get_object", Params=params, ExpiresIn=expires_s, HttpMethod="GET")
        return url

    async def presigned_url(
        self, key: str, *, filename: str, content_type: str, expires_s: int
    ) -> str | None:
        """A SigV4 GET URL that downloads the blob as ``filename`` with ``content_type``.

        ``expires_s`` is clamped to 1 s .. 7 days (S3's limit; botocore would happily sign
        a longer URL that S3 then rejects). The object's existence is not checked.
        """
        validate_key(key)
        check_header_value("content_type", content_type)
        return await self._run(self._presign_sync, key, filename, content_type,
                               clamp_expiry(expires_s))

    def staging(self) -> S3Staging:
        """Staged uploads in this bucket: presigned PUTs that bypass our HTTP server
        (see :mod:`agentpost.storage.blobs.s3_staging`)."""
        from agentpost.storage.blobs.s3_staging import S3Staging

        return S3Staging(self._client, self._run, self.bucket, self.prefix, self._sse_args)

    async def check(self) -> None:
        """HEAD the bucket: raises StorageFailure if it is missing, forbidden or unreachable."""
        await self._run(lambda: self._client().head_bucket(Bucket=self.bucket))

    # -- lifecycle ------------------------------------------------------------------------

    def _on_shutdown(self) -> None:
        self._shutdown_trigger = None
        self.close()

    def close(self) -> None:
        """Stop the store's own thread pool (waits for calls in flight). Idempotent; a
        pool passed in by the caller is left alone."""
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if self._owns_pool and self._pool.started:
            self._pool.stop()

    def __repr__(self) -> str:
        return (f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, "
                f"endpoint_url={self.endpoint_url!r}, sse={self.sse!r})")

