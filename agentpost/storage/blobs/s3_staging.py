"""Staged uploads on S3: a client PUTs an attachment straight to the bucket through a
presigned URL, and the server adopts the object when a send first uses it.

Why: with an S3 store, routing upload bytes through our HTTP server would cost a copy
through this process and its bandwidth for nothing. The client instead writes to a
staging object ``<prefix>uploads/<org>/<upload key>`` (not a content address, so it is
outside the blob namespace and never mistaken for a blob). The URL is SigV4 presigned
with ``Content-Length`` (the declared size), ``Content-Type`` and the server-side
encryption headers among its signed headers, so S3 refuses a PUT of another size, type
or without encryption, and it lives only minutes. The server never trusts that alone:
when a send uses the upload it HEADs and reads the object with a size limit, hashes it
into the content-addressed store (:mod:`agentpost.core.uploads`), then deletes it.

Objects never adopted are removed with their upload row by the upload sweep, and a
listing sweep removes any staging object older than a cut-off (a crash between adoption
and delete, a PUT repeated after adoption).

IAM: s3:PutObject on ``<prefix>uploads/*`` for the presigning principal (the URL acts
with its rights), plus the store's own GetObject/DeleteObject/ListBucket.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError
from twisted.internet import defer

from agentpost.storage.blobs.staging import (
    NAME_RE,
    STAGING_DIR,
    StagedObjectMissing,
    StagedObjectTooLarge,
)

_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND


class S3Staging:
    """Presigned PUTs to, reads of and deletes of staging objects in the store's bucket
    (built by :meth:`agentpost.storage.blobs.s3.S3BlobStore.staging`; boto3 calls run in
    the store's thread pool, with its errors translated to StorageFailure)."""

    def __init__(self, client: Callable[[], Any], run: Callable[..., defer.Deferred[Any]],
                 bucket: str, prefix: str, sse_args: dict[str, str]) -> None:
        self._client = client
        self._run = run
        self.bucket = bucket
        self.prefix = prefix
        self._sse_args = dict(sse_args)

    def _key(self, name: str) -> str:
        if not NAME_RE.match(name):
            raise ValueError(f"not a staging name: {name!r}")
        return self.prefix + name

    def put_headers(self, content_type: str) -> dict[str, str]:
        """The headers a PUT to a presigned URL must carry (they are signed)."""
        headers = {"Content-Type": content_type,
                   "x-amz-server-side-encryption": self._sse_args["ServerSideEncryption"]}
        if "SSEKMSKeyId" in self._sse_args:
            headers["x-amz-server-side-encryption-aws-kms-key-id"] = self._sse_args[
                "SSEKMSKeyId"]
        return headers

    def _presign_sync(self, name: str, content_type: str, size: int, expires_s: int) -> str:
        params = {"Bucket": self.bucket, "Key": self._key(name), "ContentType": content_type,
                  "ContentLength": size, **self._sse_args}
        url: str = self._client().generate_presigned_url(
            "put_object", Params=params, ExpiresIn=expires_s, HttpMethod="PUT")
        return url

    async def presign_put(self, name: str, *, content_type: str, size: int,
                          expires_s: int) -> tuple[str, dict[str, str]]:
        """A SigV4 PUT URL for exactly ``size`` bytes of ``content_type``, encrypted as
        the store encrypts, valid ``expires_s``; and the headers the PUT must send."""
        url = await self._run(self._presign_sync, name, content_type, size, expires_s)
        return url, self.put_headers(content_type)

    def _read_sync(self, name: str, limit: int) -> bytes:
        client, key = self._client(), self._key(name)
        try:
            head = client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                raise StagedObjectMissing(name) from None
            raise
        size = int(head.get("ContentLength", 0))
        if size > limit:
            raise StagedObjectTooLarge(size)
        try:
            resp = client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                raise StagedObjectMissing(name) from None
            raise
        body = resp["Body"]
        try:
            data: bytes = body.read(limit + 1)  # replaced since the HEAD: still bounded
        finally:
            body.close()
        if len(data) > limit:
            raise StagedObjectTooLarge(len(data))
        return data

    async def read(self, name: str, limit: int) -> bytes:
        """The staged object's bytes: StagedObjectMissing before a PUT,
        StagedObjectTooLarge (decided from a HEAD, before downloading) over ``limit``."""
        data: bytes = await self._run(self._read_sync, name, limit)
        return data

    def _delete_sync(self, name: str) -> None:
        try:
            self._client().delete_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if not _missing(exc):
                raise

    async def delete(self, name: str) -> None:
        """Remove a staging object; a missing one is fine."""
        await self._run(self._delete_sync, name)

    def _sweep_sync(self, older_than: datetime, limit: int) -> int:
        client = self._client()
        paginator = client.get_paginator("list_objects_v2")
        deleted = 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + STAGING_DIR):
            old = [{"Key": o["Key"]} for o in page.get("Contents", [])
                   if o["LastModified"] < older_than]
            for start in range(0, len(old), 1000):
                chunk = old[start:start + 1000]
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk,
                                                                  "Quiet": True})
                deleted += len(chunk)
            if deleted >= limit:
                break
        return deleted

    async def sweep(self, older_than: datetime, limit: int = 10_000) -> int:
        """Delete staging objects last written before ``older_than`` (about ``limit``
        per call): those no upload row accounts for any more."""
        deleted: int = await self._run(self._sweep_sync, older_than, limit)
        return deleted
