"""Attachments uploaded ahead of a send: a signed PUT URL, then ``{key}`` in the send.

Why: a JSON send body carries base64 (a third larger, and bounded by ``[http]
max_body``); an upload streams the bytes once to a temporary file and into the blob
store, and one upload can be attached to several messages within its day.

The PUT URL is ours on every store (``/api/v1/uploads/{key}?expires=..&signature=..``):
the content goes through the server into the content-addressed blob store (local or
S3, server-side encrypted), exactly like a received attachment. The signature is an
HMAC-SHA256 over the key and the expiry with a secret kept in PostgreSQL
(``server_secrets``), created by whichever process needs it first, so every process
of a deployment signs and checks alike, and restarts keep issued URLs valid.

Upload rows hold a counted reference on their blob; the retention sweep deletes the
rows a day after creation (used or not) and the blobs nobody else uses.
"""

from __future__ import annotations

import hashlib
import hmac
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
from agentpost.storage.blobs import BlobRef, BlobStore
from agentpost.storage.database import Database, Txn

#: How long the PUT URL works.
URL_TTL_S = 3600
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
class Upload:
    """An uploaded attachment, ready to be put into a message."""

    key: str
    filename: str
    mime_type: str
    data: bytes


class Uploads:
    """Issue upload URLs, accept their content, hand the content to sends, sweep."""

    def __init__(self, db: Database, blobs: BlobStore, collector: BlobCollector,
                 clock: IReactorTime, max_size_bytes: int) -> None:
        self._db = db
        self._blobs = blobs
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
                     size: Any) -> tuple[dict[str, Any], str]:
        """A new upload row and its URL's query string (``expires=..&signature=..``)."""
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
               "url_expires_at": now + timedelta(seconds=URL_TTL_S),
               "expires_at": now + timedelta(seconds=UPLOAD_TTL_S)}
        created = await self._db.run_interaction("uploads.create", store.insert_upload, row)
        ctx.target_id = created["key"]
        expires = int(created["url_expires_at"].timestamp())
        return created, f"expires={expires}&signature={await self.sign(created['key'], expires)}"

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

    async def sweep(self, batch: int = 500) -> int:
        """Delete expired uploads and the blobs nobody else uses (retention job)."""
        now = self._now()
        total = 0
        while True:
            deleted, freed = await self._db.run_interaction(
                "uploads.sweep", store.delete_expired, now, batch)
            total += deleted
            await self._collector.collect(freed)
            if deleted < batch:
                return total
