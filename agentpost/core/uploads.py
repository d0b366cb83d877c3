"""Attachments uploaded ahead of a send: a signed PUT URL, then ``{key}`` in the send.

Why: a JSON send body carries base64 (a third larger, and bounded by ``[http]
max_body``); an upload streams the bytes once to a temporary file and into the blob
store, and one upload can be attached to several messages within its day.

On the local store the PUT URL is ours (``/api/v1/uploads/{key}?expires=..&signature=..``):
the content goes through the server into the content-addressed blob store, exactly
like a received attachment. The signature is an HMAC-SHA256 over the key and the
expiry with a secret kept in PostgreSQL (``server_secrets``), created by whichever
process needs it first, so every process of a deployment signs and checks alike, and
restarts keep issued URLs valid.

On S3 the URL is a presigned S3 PUT to a staging object
(:mod:`agentpost.storage.blobs.s3_staging`): the bytes never pass through us on the
way in. The first send that uses the upload adopts it: the staged object is read with
the upload's size limit (a larger one is refused with 413 and deleted), stored under
its content address like any blob, recorded on the row, and deleted; later sends use
the blob.

Upload rows hold a counted reference on their blob; the retention sweep deletes the
rows a day after creation (used or not), the blobs nobody else uses, the staged
objects of uploads never used, and any staging object older than that.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime

from agentpost.core.blobrefs import BlobCollector
from agentpost.core.context import RequestContext
from agentpost.mail.compose import AttachmentPart, check_text
from agentpost.model.errors import (
    Conflict,
    InvalidRequest,
    InvalidUploadSignature,
    MessageTooLarge,
    NotFound,
    PayloadTooLarge,
    StorageFailure,
)
from agentpost.storage import uploads as store
from agentpost.storage.blobs import BlobRef, BlobStore, staging_of
from agentpost.storage.blobs.staging import (
    StagedObjectMissing,
    StagedObjectTooLarge,
    Staging,
    staged_name,
)
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

#: How long the PUT URL works (our own).
URL_TTL_S = 3600
#: How long a presigned S3 PUT URL works: minutes, since it is a bearer credential.
PRESIGNED_TTL_S = 900
#: How long an upload may be used in sends before the sweep removes it.
UPLOAD_TTL_S = 24 * 3600
_SECRET_NAME = "upload_url_signing"  # noqa: S105 - a row name, not a secret
_KEY_RE = re.compile(r"^upl_[0-9a-f]{32}\Z")
_CID_RE = re.compile(r"^[\x21-\x3b\x3d\x3f-\x7e]{1,250}\Z")
_MIME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/"
                      r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z")


def check_mime_type(value: Any, field_name: str = "mime_type") -> str:
    """``type/subtype`` and nothing else (no parameters, no line breaks)."""
    if not isinstance(value, str) or not _MIME_RE.match(value):
        raise InvalidRequest(f"{field_name} must be a MIME type such as text/plain.",
                             field=field_name)
    return value.lower()


def _spoofing_or_control(c: str) -> bool:
    """Control characters (C0, DEL, C1) and the bidirectional formatting characters that
    make ``invoice<RLO>fdp.exe`` look like ``invoiceexe.pdf`` in a mail client."""
    return (ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or "\u202a" <= c <= "\u202e"
            or "\u2066" <= c <= "\u2069" or c in "\u200e\u200f\u061c")


def check_filename(value: Any, field_name: str = "filename") -> str:
    """A file name: text without line breaks, NUL, other control or bidi formatting
    characters, or path separators, 1-255 chars."""
    name = check_text(value, field_name, limit=255).strip()
    if (not name or "/" in name or "\\" in name or name in (".", "..")
            or any(_spoofing_or_control(c) for c in name)):
        raise InvalidRequest(f"{field_name} must be a plain file name.", field=field_name)
    return name


def stored_part(att: dict[str, Any], data: bytes) -> AttachmentPart:
    """A stored attachment (a stranger's, or an IMAP client's draft) as a part of a
    message we compose: a file name, MIME type or Content-ID our own checks would
    refuse is replaced, never a reason to fail the forward or the draft."""
    try:
        filename = check_filename(att.get("filename") or "attachment")
    except InvalidRequest:
        filename = "attachment"
    try:
        mime = check_mime_type(att.get("mime_type") or "application/octet-stream")
    except InvalidRequest:
        mime = "application/octet-stream"
    cid = att.get("content_id")
    if cid is not None and not _CID_RE.match(cid):
        cid = None
    return AttachmentPart(filename, mime, data, cid, att.get("disposition") == "inline")


def check_upload_key(value: Any) -> str:
    """An upload key's syntax (a wrong one is simply not found)."""
    if not isinstance(value, str) or not _KEY_RE.match(value):
        raise NotFound()
    return value


def _may_use(p: Any, row: dict[str, Any]) -> bool:
    """Whether principal ``p`` may attach upload ``row``: an organization-wide key any of
    the organization's; a key confined to environments its own uploads and those made
    in its environments (an upload is content: another environment's is not its to
    read)."""
    if p.environment_ids is None or row["created_by"] == p.credential_id:
        return True
    return row["environment_id"] is not None and row["environment_id"] in p.environment_ids


@dataclass(frozen=True)
class Ticket:
    """Where to PUT an upload: our own URL's query (local store) or a presigned S3 URL
    and the headers its signature covers (S3 store)."""

    row: dict[str, Any]
    own_query: str | None = None
    presigned_url: str | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Upload:
    """An uploaded attachment, ready to be put into a message."""

    key: str
    filename: str
    mime_type: str
    data: bytes


class Uploads:
    """Issue upload URLs, accept their content, hand the content to sends, sweep."""

    def __init__(self, db: Database, blobs: BlobStore, collector: BlobCollector,
                 clock: IReactorTime, max_size_bytes: int,
                 staging: Staging | None = None) -> None:
        self._db = db
        self._blobs = blobs
        #: Clients PUT straight to the store (S3), or through us (local).
        self.staging = staging if staging is not None else staging_of(blobs)
        self._collector = collector
        self._clock = clock
        self.max_size_bytes = max_size_bytes
        self._secret: bytes | None = None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    async def _signing_key(self) -> bytes:
        if self._secret is None:
            self._secret = await self._db.run_interaction(
                "uploads.secret", store.server_secret, _SECRET_NAME, secrets.token_bytes(32))
        return self._secret

    async def sign(self, key: str, expires: int) -> str:
        """The URL signature for ``PUT key`` until ``expires`` (unix seconds)."""
        mac = hmac.new(await self._signing_key(), f"PUT\n{key}\n{expires}".encode(),
                       hashlib.sha256)
        return mac.hexdigest()

    async def create(self, ctx: RequestContext, filename: Any, mime_type: Any,
                     size: Any) -> Ticket:
        """A new upload row and where to PUT its content (see :class:`Ticket`)."""
        p = ctx.org_principal
        p.require("messages:send")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest("size must be a byte count.", field="size")
        if size > self.max_size_bytes:
            raise PayloadTooLarge(f"An upload may hold at most {self.max_size_bytes} bytes.",
                                  field="size")
        now = self._now()
        # A key confined to one environment confines its uploads to it (see read).
        env_id = next(iter(p.environment_ids)) if p.environment_ids and len(
            p.environment_ids) == 1 else None
        row = {"org_id": p.org_id, "environment_id": env_id,
               "key": "upl_" + secrets.token_hex(16),
               "filename": check_filename(filename), "mime_type": check_mime_type(mime_type),
               "declared_size": size, "created_by": p.credential_id, "created_at": now,
               "url_expires_at": now + timedelta(
                   seconds=URL_TTL_S if self.staging is None else PRESIGNED_TTL_S),
               "expires_at": now + timedelta(seconds=UPLOAD_TTL_S)}
        created = await self._db.run_interaction("uploads.create", store.insert_upload, row)
        ctx.target_id = created["key"]
        if self.staging is not None:
            url, headers = await self.staging.presign_put(
                staged_name(p.org_id, created["key"]), content_type=created["mime_type"],
                size=size, expires_s=PRESIGNED_TTL_S)
            return Ticket(created, presigned_url=url, headers=headers)
        expires = int(created["url_expires_at"].timestamp())
        signature = await self.sign(created["key"], expires)
        return Ticket(created, own_query=f"expires={expires}&signature={signature}")

    async def prime(self) -> None:
        """Load the signing secret now, so :meth:`url_is_signed` can answer for URLs
        any process signed (the HTTP channel asks before a body is read)."""
        await self._signing_key()

    def _valid(self, secret: bytes, key: str, expires: str | None,
               signature: str | None) -> bool:
        if not expires or not signature or not expires.isdigit() or len(expires) > 12:
            return False
        good = hmac.new(secret, f"PUT\n{key}\n{expires}".encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(good, signature) and int(expires) >= self._clock.seconds()

    def url_is_signed(self, key: str, expires: str | None, signature: str | None) -> bool:
        """The signature check without I/O, for the HTTP channel: only a PUT whose URL
        we signed may send a body larger than ``[http] max_body``, so an anonymous
        client cannot make the server spool upload-sized bodies. False until the
        secret is loaded (see :meth:`prime`)."""
        return self._secret is not None and self._valid(self._secret, key, expires, signature)

    async def check_signature(self, key: str, expires: str | None,
                              signature: str | None) -> None:
        """InvalidUploadSignature unless the URL is ours and still valid."""
        if not self._valid(await self._signing_key(), key, expires, signature):
            raise InvalidUploadSignature()

    async def receive(self, key: str, expires: str | None, signature: str | None,
                      content: IO[bytes], length: int) -> dict[str, Any]:
        """Store a signed PUT's content (``length`` bytes of ``content``)."""
        check_upload_key(key)
        await self.check_signature(key, expires, signature)
        if length > self.max_size_bytes:
            raise PayloadTooLarge(f"An upload may hold at most {self.max_size_bytes} bytes.")
        row = await self._db.run_read("uploads.get", store.get_by_key, key)
        if row is None or row["expires_at"] <= self._now():
            raise NotFound()
        if row["blob_key"] is not None:
            raise Conflict("This upload already has its content.")
        ref = await self._blobs.put_file(content, content_type=row["mime_type"])
        attached = await self._db.run_interaction("uploads.content", self._attach, key, ref,
                                                  content)
        if not attached:
            await self._collector.collect([ref.key])
            raise Conflict("This upload already has its content.")
        row.update(size=ref.size, sha256=ref.sha256)
        return row

    async def _attach(self, txn: Txn, key: str, ref: BlobRef, content: IO[bytes]) -> bool:
        if not await store.attach_content(txn, key, ref.key, ref.size, ref.sha256):
            return False
        if not await self._blobs.exists(ref.key):  # a collector removed it meanwhile
            content.seek(0)
            again = await self._blobs.put_file(content)
            if again.key != ref.key:
                raise StorageFailure()
        return True

    async def read(self, ctx: RequestContext, keys: list[str],
                   max_total_bytes: int) -> dict[str, Upload]:
        """The content of the organization's uploads (another's key is NotFound); their
        sizes are checked against ``max_total_bytes`` before any is loaded."""
        p = ctx.org_principal
        now = self._now()
        rows: dict[str, dict[str, Any]] = {}
        if self.staging is not None:
            await self._adopt_staged(p, keys, now)

        async def txn_fn(txn: Txn) -> None:
            for key in keys:
                row = await store.get_upload(txn, p.org_id, check_upload_key(key), now)
                if row is not None and not _may_use(p, row):
                    row = None  # another environment's: as if it did not exist
                if row is None:
                    raise NotFound("No such upload.", field="attachments")
                if row["blob_key"] is None:
                    raise InvalidRequest("The upload's content has not arrived yet.",
                                         field="attachments")
                rows[key] = row
            if sum(r["size"] for r in rows.values()) > max_total_bytes:
                raise MessageTooLarge(f"The attachments exceed {max_total_bytes} bytes.")
            await store.mark_used(txn, p.org_id, list(rows), now)

        await self._db.run_interaction("uploads.read", txn_fn)
        out = {}
        for key, row in rows.items():
            data = await self._blobs.get_bytes(row["blob_key"])
            out[key] = Upload(key, row["filename"], row["mime_type"], data)
        return out

    async def _adopt_staged(self, p: Any, keys: list[str], now: datetime) -> None:
        """Move the staged objects of these uploads (the caller's, content not yet
        recorded) into the blob store. Anything else is left for :meth:`read`'s own
        checks, which answer 404 / 400 as for any upload."""

        async def pending(txn: Txn) -> list[dict[str, Any]]:
            found = []
            for key in keys:
                row = await store.get_upload(txn, p.org_id, check_upload_key(key), now)
                if row is not None and row["blob_key"] is None and _may_use(p, row):
                    found.append(row)
            return found

        for row in await self._db.run_read("uploads.pending", pending):
            await self._adopt(row)

    async def _adopt(self, row: dict[str, Any]) -> None:
        """Read one staged object (bounded by the declared size), store it under its
        content address, record it on the upload, delete the staged object."""
        assert self.staging is not None
        name = staged_name(row["org_id"], row["key"])
        limit = min(row["declared_size"], self.max_size_bytes)
        try:
            data = await self.staging.read(name, limit)
        except StagedObjectMissing:
            return  # read() answers "not arrived yet"
        except StagedObjectTooLarge as exc:
            await self.staging.delete(name)
            raise PayloadTooLarge(
                f"The uploaded file has {exc.size} bytes; upload {row['key']} was declared "
                f"with {row['declared_size']} (at most {self.max_size_bytes}).",
                field="attachments") from None
        ref = await self._blobs.put_bytes(data, content_type=row["mime_type"])
        attached = await self._db.run_interaction("uploads.adopt", self._attach, row["key"],
                                                  ref, io.BytesIO(data))
        if not attached:  # a concurrent send adopted it first
            await self._collector.collect([ref.key])
        await self.staging.delete(name)

    async def _drop_staged(self, uploads: list[tuple[str, str]]) -> None:
        """Delete the staged objects of these (deleted) uploads; one that fails is left
        to the listing sweep rather than stopping this one."""
        if self.staging is None:
            return
        for org_id, key in uploads:
            try:
                await self.staging.delete(staged_name(org_id, key))
            except (ValueError, StorageFailure) as exc:
                log.warning("uploads: staged object of %s not deleted: %s", key, exc)

    async def sweep(self, batch: int = 500) -> int:
        """Delete expired uploads, the blobs nobody else uses and the staged objects of
        uploads never used (retention job); then staging objects older than any upload
        could be."""
        now = self._now()
        total = 0
        while True:
            deleted, freed, unfilled = await self._db.run_interaction(
                "uploads.sweep", store.delete_expired, now, batch)
            total += deleted
            await self._collector.collect(freed)
            await self._drop_staged(unfilled)
            if deleted < batch:
                break
        if self.staging is not None:
            cutoff = now - timedelta(seconds=UPLOAD_TTL_S + URL_TTL_S)
            orphans = await self.staging.sweep(cutoff)
            if orphans:
                log.info("uploads: removed %d staged objects no upload uses", orphans)
        return total
