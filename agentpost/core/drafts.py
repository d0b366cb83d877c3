"""Drafts: the API's structured view of an inbox's IMAP Drafts folder.

A draft is a row (``drf_`` id, the structured fields as the API took them, its send
schedule) plus exactly one real message in the inbox's ``\\Drafts`` folder, composed
from those fields and flagged ``\\Draft``, so every IMAP client sees what the API sees.
Each change goes through the one ingest path:

- **create** composes the copy and stores it; the row is written inside ingest's
  transaction (its ``within`` hook), so there is never a row without a copy;
- **update** composes a new copy and, in the same transaction, re-points the row
  (guarded by the copy it was based on: a concurrent edit is a 409, never a lost one)
  and deletes the old copy through core.mail_changes (IMAP sessions see an expunge
  and a new message; the ``drf_`` id stays);
- **delete** deletes the copy; the row goes with it by cascade, which is also what
  happens when an IMAP client expunges the copy;
- a message an IMAP client APPENDs (or copies) to Drafts gets a row the first time the
  API lists the inbox's drafts ("adoption"), read back from the stored message.

A copy an IMAP client flags ``\\Deleted`` or moves out of Drafts is not a draft any
more (storage.drafts shows only live copies in Drafts).

Sending and scheduling are in core.draft_sending (this module is the CRUD).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import threads

from agentpost.core import mail_changes
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.context import RequestContext
from agentpost.core.ingest import Ingest, Stored, Target
from agentpost.core.messages import check_labels
from agentpost.core.pages import MAX_LIMIT
from agentpost.core.uploads import check_filename, check_mime_type, stored_part
from agentpost.mail.compose import (
    Address,
    AttachmentPart,
    Composition,
    check_headers,
    check_text,
    compose,
    new_message_id,
    normalize_email,
    parse_address_list,
    reply_references,
    usable_message_id,
)
from agentpost.model.errors import Conflict, InvalidRequest, MessageTooLarge, NotFound
from agentpost.model.ids import is_id, new_id
from agentpost.model.principal import Principal
from agentpost.storage import drafts as draft_store
from agentpost.storage import inboxes as inbox_store
from agentpost.storage import keywords as keyword_store
from agentpost.storage import mail as mail_store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database, Txn

#: Structured fields a draft keeps (what create and update take, besides attachments,
#: labels and send_at).
ADDRESS_FIELDS = ("to", "cc", "bcc", "reply_to")
#: Drafts adopted per listing (the rest on the next one).
ADOPT_BATCH = MAX_LIMIT
#: Addresses per address field (sending has its own, lower, recipient limit).
MAX_ADDRESSES = 500
#: Attachments per draft.
MAX_ATTACHMENTS = 50
DRAFT_FLAGS = frozenset({"\\Draft", "\\Seen"})
#: ``await hook(txn, draft_row)`` inside the transaction that stores a new draft.
AnswerHook = Callable[[Txn, dict[str, Any]], Awaitable[None]]


def _body_text(value: Any, name: str) -> str | None:
    """A body: text of any length (the HTTP body limit bounds it) without NUL, which
    neither PostgreSQL nor a mail body can carry."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string.", field=name)
    if "\x00" in value:
        raise InvalidRequest(f"{name} must not contain NUL.", field=name)
    return value


def check_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The structured fields present in ``body``, checked and normalized: addresses
    as ``[{email, name}]``, header texts without CR/LF/NUL (header injection is a 400,
    never cleaned), custom headers from the allow-list only."""
    out: dict[str, Any] = {}
    for name in ADDRESS_FIELDS:
        if name in body:
            out[name] = [a.as_json() for a in parse_address_list(body[name], name)]
            if len(out[name]) > MAX_ADDRESSES:
                raise InvalidRequest(f"{name} holds more than {MAX_ADDRESSES} addresses.",
                                     field=name)
    if "subject" in body:
        out["subject"] = check_text(body["subject"] if body["subject"] is not None else "",
                                    "subject")
    for name in ("text_body", "html_body"):
        if name in body:
            out[name] = _body_text(body[name], name)
    if "headers" in body:
        out["headers"] = check_headers(body["headers"])
    return out


def check_attachments(items: Any) -> list[AttachmentPart | dict[str, str]]:
    """Attachments given inline (base64 ``content``) become parts; ``{key}`` entries
    (uploads, core.uploads) are checked here and read by :meth:`Drafts.attachments`.
    Filenames and MIME types become header parameters: no line breaks, no paths."""
    if items is None:
        return []
    if not isinstance(items, list) or len(items) > MAX_ATTACHMENTS:
        raise InvalidRequest(f"attachments is a list of at most {MAX_ATTACHMENTS}.",
                             field="attachments")
    parts: list[AttachmentPart | dict[str, str]] = []
    for item in items:
        if not isinstance(item, dict) or not (isinstance(item.get("content"), str)
                                              or isinstance(item.get("key"), str)):
            raise InvalidRequest("Each attachment needs an upload key or base64 content.",
                                 field="attachments")
        filename = item.get("filename")
        if filename is not None:
            filename = check_filename(filename, "attachments")
        mime_type = item.get("mime_type")
        if mime_type is not None:
            mime_type = check_mime_type(mime_type, "attachments")
        if isinstance(item.get("key"), str):
            parts.append({"key": item["key"], "filename": filename or "",
                          "mime_type": mime_type or ""})
            continue
        try:
            data = base64.b64decode(item["content"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("An attachment's content must be base64.",
                                 field="attachments") from None
        cid = item.get("content_id")
        if cid is not None:
            cid = check_text(cid, "attachments", limit=200).strip("<> ") or None
        parts.append(AttachmentPart(filename or "attachment",
                                    mime_type or "application/octet-stream", data, cid,
                                    bool(item.get("inline"))))
    return parts


def composition(fields: dict[str, Any], attachments: list[AttachmentPart]) -> Composition:
    """The draft's fields as the composer takes them."""

    def addrs(name: str) -> list[Address]:
        # Checked again here: an adopted draft's addresses are what an IMAP client wrote
        # (a trailing dot, no domain...), never through check_fields.
        return [Address(normalize_email(str(a.get("email") or ""), name),
                        check_text(a["name"], name) if a.get("name") else None)
                for a in fields.get(name) or []]

    reply = fields.get("reply_headers") or {}
    return Composition(
        to=addrs("to"), cc=addrs("cc"), bcc=addrs("bcc"), reply_to=addrs("reply_to"),
        subject=fields.get("subject") or "", text_body=fields.get("text_body"),
        html_body=fields.get("html_body"), headers=dict(fields.get("headers") or {}),
        in_reply_to=reply.get("in_reply_to"), references=list(reply.get("references") or []),
        attachments=attachments)


def sender_of(inbox: dict[str, Any]) -> Address:
    """The inbox as the From: of its drafts."""
    return Address(inbox["email"], inbox.get("display_name") or None)


def adopted_fields(msg: dict[str, Any], in_reply_to: str | None) -> dict[str, Any]:
    """A draft's fields read back from a message an IMAP client put in Drafts."""
    def addrs(value: Any) -> list[dict[str, Any]]:
        return [{"email": a.get("email") or "", "name": a.get("name") or None}
                for a in (value or []) if isinstance(a, dict) and a.get("email")]

    reply = {}
    if msg["in_reply_to"] or msg["reference_ids"]:
        reply = {"in_reply_to": usable_message_id(msg["in_reply_to"]),
                 "references": reply_references(
                     None, [f"<{r}>" for r in msg["reference_ids"] or []])}
    return {
        "to": addrs(msg["to_addresses"]), "cc": addrs(msg["cc_addresses"]),
        "bcc": addrs(msg["bcc_addresses"]), "reply_to": addrs(msg["reply_to"]),
        "subject": msg["subject"] or "", "text_body": msg["text_body"],
        "html_body": msg["html_body"], "headers": {}, "in_reply_to": in_reply_to,
        "reply_headers": reply, "message_id": usable_message_id(msg["message_id_header"]),
        "adopted": True,
    }


@dataclass(frozen=True)
class Schedule:
    """What a change does to a draft's send plan (None: leave it as it is)."""

    status: str
    send_at: datetime | None
    scheduled_by: str | None


class Drafts:
    """Create, read, update and delete drafts (and adopt IMAP clients' drafts)."""

    def __init__(self, db: Database, blobs: BlobStore, collector: BlobCollector,
                 ingest: Ingest, reactor: Any, *, hostname: str,
                 max_schedule_ahead_s: float, uploads: Any = None,
                 clock: Any = None, max_message_bytes: int = 0) -> None:
        self._db = db
        self._max_message_bytes = max_message_bytes  # 0: no limit
        self._clock = clock or reactor
        self._uploads = uploads  # core.uploads.Uploads: attachments by upload key
        self._blobs = blobs
        self._collector = collector
        self._ingest = ingest
        self._reactor = reactor
        self._hostname = hostname
        self.max_schedule_ahead_s = max_schedule_ahead_s

    def now(self) -> datetime:
        """The injected clock's time."""
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    # ------------------------------------------------------------------ scheduling

    def schedule(self, ctx: RequestContext, send_at: datetime | None) -> Schedule:
        """``send_at`` as a plan: None cancels (status draft); a time needs the
        ``messages:send`` scope, may lie in the past (due at once) and at most
        ``max_schedule_ahead_s`` ahead. The scheduling key is remembered: its power,
        as it is when the time comes, is what sends."""
        if send_at is None:
            return Schedule("draft", None, None)
        p = ctx.org_principal
        p.require("messages:send")
        now = self.now()
        if send_at > now + timedelta(seconds=self.max_schedule_ahead_s):
            days = self.max_schedule_ahead_s / 86400
            raise InvalidRequest(f"send_at may be at most {days:g} days ahead.",
                                 field="send_at")
        return Schedule("scheduled", max(send_at, now), p.credential_id)

    # ------------------------------------------------------------------ reading

    async def _inbox(self, txn: Txn, ctx: RequestContext, inbox_id: str) -> dict[str, Any]:
        p = ctx.org_principal
        inbox = await inbox_store.get_inbox(txn, p.org_id, p.environment_ids, inbox_id)
        if inbox is None:
            raise NotFound()
        ctx.environment_id = inbox["environment_id"]
        return inbox

    async def _adopt(self, txn: Txn, org_id: str, inbox_id: str) -> None:
        """Rows for the Drafts-folder messages an IMAP client put there."""
        for msg in await draft_store.unadopted(txn, org_id, inbox_id, ADOPT_BATCH):
            parent = (await draft_store.message_by_header(txn, org_id, inbox_id,
                                                          msg["in_reply_to"])
                      if msg["in_reply_to"] else None)
            await draft_store.insert_draft(txn, {
                "org_id": org_id, "id": new_id("drf"), "environment_id": msg["environment_id"],
                "inbox_id": inbox_id, "message_id": msg["id"],
                "fields": adopted_fields(msg, parent), "status": "draft",
                "created_at": msg["received_at"], "updated_at": txn.now})

    async def list_drafts(self, ctx: RequestContext, inbox_id: str, *,
                          after_id: str | None, limit: int) -> list[dict[str, Any]]:
        """Drafts of an inbox, newest first (limit + 1 rows), adopting IMAP drafts."""
        p = ctx.org_principal
        p.require("messages:read")
        ctx.target_id = inbox_id

        async def txn_fn(txn: Txn) -> list[dict[str, Any]]:
            await self._inbox(txn, ctx, inbox_id)
            await self._adopt(txn, p.org_id, inbox_id)
            rows = await draft_store.list_drafts(txn, p.org_id, p.environment_ids, inbox_id,
                                                 after_id=after_id, limit=limit + 1)
            found = await draft_store.attachments_of(txn, p.org_id,
                                                     [r["message_id"] for r in rows])
            for row in rows:
                row["attachments"] = found[row["message_id"]]
            return rows

        return await self._db.run_interaction("drafts.list", txn_fn)

    async def read(self, txn: Txn, ctx: RequestContext, draft_id: str, *,
                   for_update: bool = False) -> dict[str, Any]:
        """One draft of the principal's (NotFound otherwise), with attachments."""
        p = ctx.org_principal
        row = (await draft_store.get_draft(txn, p.org_id, p.environment_ids, draft_id,
                                           for_update=for_update)
               if is_id(draft_id, "drf") else None)
        if row is None:
            raise NotFound()
        ctx.environment_id = row["environment_id"]
        row["attachments"] = await mail_store.list_attachments(txn, p.org_id,
                                                               row["message_id"])
        return row

    async def get(self, ctx: RequestContext, draft_id: str) -> dict[str, Any]:
        """One draft."""
        ctx.org_principal.require("messages:read")
        ctx.target_id = draft_id
        return await self._db.run_interaction(
            "drafts.get", lambda txn: self.read(txn, ctx, draft_id))

    async def attachments(self, ctx: RequestContext,
                          entries: list[AttachmentPart | dict[str, str]]
                          ) -> list[AttachmentPart]:
        """Parts for checked attachment entries, reading uploads by key (the
        organization's own only: another's key is NotFound)."""
        keys = [e["key"] for e in entries if isinstance(e, dict)]
        if keys and self._uploads is None:
            raise InvalidRequest("Uploads are not available here; send base64 content.",
                                 field="attachments")
        found = (await self._uploads.read(ctx, keys, self._max_message_bytes or 2**62)
                 if keys else {})
        parts = []
        for e in entries:
            if isinstance(e, dict):
                up = found[e["key"]]
                e = AttachmentPart(e["filename"] or up.filename,
                                   e["mime_type"] or up.mime_type, up.data)
            parts.append(e)
        return parts

    async def attachment_parts(self, rows: list[dict[str, Any]]) -> list[AttachmentPart]:
        """A copy's attachments as parts again (its blobs), to compose the next copy or
        the message that is sent."""
        parts = []
        for att in rows:
            parts.append(stored_part(att, await self._blobs.get_bytes(att["blob_key"])))
        return parts

    # ------------------------------------------------------------------ writing

    async def _reply_headers(self, txn: Txn, ctx: RequestContext, inbox_id: str,
                             parent_id: str | None) -> dict[str, Any]:
        """In-Reply-To and References of a reply to ``parent_id`` (a message of the
        same inbox; another's is NotFound, as everywhere)."""
        if parent_id is None:
            return {}
        p = ctx.org_principal
        parent = (await mail_store.get_message(txn, p.org_id, p.environment_ids, parent_id)
                  if is_id(parent_id, "msg") else None)
        if parent is None or parent["inbox_id"] != inbox_id:
            raise NotFound("No such message to reply to.", field="in_reply_to")
        refs = [f"<{r}>" for r in parent["reference_ids"] or []]
        mid = usable_message_id(parent["message_id_header"])  # a stranger's header
        return {"in_reply_to": mid, "references": reply_references(mid, refs)}

    async def _compose(self, inbox: dict[str, Any], fields: dict[str, Any],
                       attachments: list[AttachmentPart]) -> bytes:
        """The copy's bytes (in a thread: attachments make it CPU work)."""
        c = composition(fields, attachments)
        now = self.now()
        limit = self._max_message_bytes
        if limit and sum(len(a.data) for a in attachments) > limit:
            raise MessageTooLarge(f"The draft would exceed {limit} bytes.")
        raw: bytes = await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), lambda: compose(
                c, from_addr=sender_of(inbox), hostname=self._hostname, now=now,
                message_id=fields.get("message_id")))
        if limit and len(raw) > limit:  # a draft that could never be sent is refused now
            raise MessageTooLarge(f"The draft would exceed {limit} bytes.")
        return raw

    async def _store_copy(self, ctx: RequestContext, inbox: dict[str, Any], raw: bytes,
                          labels: list[str], within: Any) -> list[Stored]:
        target = Target(inbox["org_id"], inbox["environment_id"], inbox["id"], inbox["email"])
        return await self._ingest.store(
            [target], io.BytesIO(raw), envelope_from=None, direction="inbound",
            folder="Drafts", flags=DRAFT_FLAGS, labels=tuple(labels), enforce_quota=True,
            origin=ctx, within=within, event_type="draft.saved")

    async def create(self, ctx: RequestContext, inbox_id: str, body: dict[str, Any], *,
                     answer: AnswerHook | None = None) -> dict[str, Any]:
        """A new draft: its copy in Drafts and its row, in one transaction.

        ``answer(txn, draft)`` runs inside that transaction with the draft as read back
        there: the Idempotency-Key recorder, so a retried create (one that schedules a
        send, say) finds the first answer on record exactly when the draft exists, and
        never makes a second draft."""
        p = ctx.org_principal
        p.require("messages:write")
        ctx.target_id = inbox_id
        fields = {"to": [], "cc": [], "bcc": [], "reply_to": [], "subject": "",
                  "text_body": None, "html_body": None, "headers": {}, **check_fields(body)}
        labels = check_labels(body.get("labels") or [])
        entries = check_attachments(body.get("attachments"))
        plan = self.schedule(ctx, _send_at(body)) if "send_at" in body else None
        attachments = await self.attachments(ctx, entries)

        async def prepare(txn: Txn) -> tuple[dict[str, Any], dict[str, Any]]:
            inbox = await self._inbox(txn, ctx, inbox_id)
            return inbox, await self._reply_headers(txn, ctx, inbox_id,
                                                    body.get("in_reply_to"))

        inbox, reply = await self._db.run_interaction("drafts.prepare", prepare)
        fields.update(in_reply_to=body.get("in_reply_to"), reply_headers=reply,
                      message_id=new_message_id(sender_of(inbox), self._hostname, self.now()))
        raw = await self._compose(inbox, fields, attachments)
        draft_id = new_id("drf")
        ctx.target_id = draft_id

        async def record(txn: Txn, stored: list[Stored]) -> None:
            txn.after_commit(setattr, ctx, "audited", True)  # ingest's row is the audit
            if labels:
                await keyword_store.remember(txn, p.org_id, inbox_id, labels)
            await draft_store.insert_draft(txn, {
                "org_id": p.org_id, "id": draft_id, "environment_id": inbox["environment_id"],
                "inbox_id": inbox_id, "message_id": stored[0].message_id, "fields": fields,
                "status": plan.status if plan else "draft",
                "send_at": plan.send_at if plan else None,
                "scheduled_by": plan.scheduled_by if plan else None,
                "created_at": txn.now, "updated_at": txn.now})
            if answer is not None:
                await answer(txn, await self.read(txn, ctx, draft_id))

        await self._store_copy(ctx, inbox, raw, labels, record)
        return await self._db.run_interaction(
            "drafts.get", lambda txn: self.read(txn, ctx, draft_id))

    async def update(self, ctx: RequestContext, draft_id: str,
                     body: dict[str, Any]) -> dict[str, Any]:
        """Change fields (a new copy replaces the old one, same drf_ id) and/or the
        send plan (``send_at``; null cancels)."""
        p = ctx.org_principal
        p.require("messages:write")
        ctx.target_id = draft_id
        changed = check_fields(body)
        new_labels = check_labels(body["labels"]) if "labels" in body else None
        new_attachments = (check_attachments(body["attachments"])
                           if "attachments" in body else None)
        plan = self.schedule(ctx, _send_at(body)) if "send_at" in body else None
        recompose = bool(changed) or any(k in body for k in ("labels", "attachments",
                                                              "in_reply_to"))
        if not recompose:
            if plan is None:  # another's draft is still a 404, not a 400
                await self._db.run_interaction(
                    "drafts.get", lambda txn: self.read(txn, ctx, draft_id))
                raise InvalidRequest("Nothing to change.")
            return await self.set_plan(ctx, draft_id, plan)

        async def prepare(txn: Txn) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
            row = await self.read(txn, ctx, draft_id)
            if row["status"] == "sending":
                raise Conflict("The draft is being sent.")
            inbox = await self._inbox(txn, ctx, row["inbox_id"])
            reply = (await self._reply_headers(txn, ctx, row["inbox_id"], body["in_reply_to"])
                     if "in_reply_to" in body else None)
            fields = {**row["fields"], **changed}
            if reply is not None:
                fields.update(in_reply_to=body["in_reply_to"], reply_headers=reply)
            return row, inbox, fields

        row, inbox, fields = await self._db.run_interaction("drafts.prepare", prepare)
        fields.pop("adopted", None)
        attachments = (await self.attachments(ctx, new_attachments)
                       if new_attachments is not None
                       else await self.attachment_parts(row["attachments"]))
        labels = new_labels if new_labels is not None else list(row["labels"])
        raw = await self._compose(inbox, fields, attachments)
        freed: list[str] = []
        row_changes: dict[str, Any] = {"fields": fields}
        if plan is not None:
            row_changes.update(status=plan.status, send_at=plan.send_at,
                               scheduled_by=plan.scheduled_by, last_error=None)

        async def replace(txn: Txn, stored: list[Stored]) -> None:
            if new_labels:
                await keyword_store.remember(txn, p.org_id, row["inbox_id"], new_labels)
            if not await draft_store.repoint(txn, p.org_id, draft_id, row["message_id"],
                                             stored[0].message_id, row_changes):
                raise Conflict("The draft changed meanwhile (edited, sent or deleted); "
                               "read it again.")
            freed[:] = await self.delete_copy(txn, ctx, row["message_id"])

        await self._store_copy(ctx, inbox, raw, labels, replace)
        await self._collector.collect(freed)
        return await self._db.run_interaction(
            "drafts.get", lambda txn: self.read(txn, ctx, draft_id))

    async def delete_copy(self, txn: Txn, ctx: RequestContext, message_id: str) -> list[str]:
        """Delete a draft's copy (the row, if still pointing at it, goes by cascade);
        returns the blob keys to collect after COMMIT. Runs as a change of the
        principal's whatever scope brought it here (sending needs only
        messages:send): the copy is the draft's own."""
        p = ctx.org_principal
        msg = await mail_store.get_message(txn, p.org_id, None, message_id, for_update=True)
        if msg is None:
            return []
        inner = RequestContext(ctx.request_id, ctx.remote_addr, ctx.action,
                               principal=_with_write(p), environment_id=msg["environment_id"],
                               target_id=ctx.target_id, details=ctx.details)
        freed = await mail_changes.delete_messages(txn, inner, [msg])
        txn.after_commit(setattr, ctx, "audited", True)
        return freed

    async def collect(self, keys: list[str]) -> None:
        """Remove blobs a deleted copy left unreferenced (after its COMMIT)."""
        await self._collector.collect(keys)

    async def delete(self, ctx: RequestContext, draft_id: str) -> None:
        """Delete a draft (and so its copy); a scheduled send is cancelled with it."""
        ctx.org_principal.require("messages:write")
        ctx.target_id = draft_id
        freed: list[str] = []

        async def txn_fn(txn: Txn) -> None:
            row = await self.read(txn, ctx, draft_id, for_update=True)
            if row["status"] == "sending":
                raise Conflict("The draft is being sent.")
            freed[:] = await self.delete_copy(txn, ctx, row["message_id"])

        await self._db.run_interaction("drafts.delete", txn_fn)
        await self._collector.collect(freed)

    async def set_plan(self, ctx: RequestContext, draft_id: str,
                       plan: Schedule) -> dict[str, Any]:
        """Schedule or cancel (status back to draft) a send; not while it is leaving."""
        ctx.target_id = draft_id

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            row = await self.read(txn, ctx, draft_id, for_update=True)
            if row["status"] == "sending":
                raise Conflict("The draft is being sent; it can no longer be cancelled.")
            await draft_store.set_schedule(txn, row["org_id"], draft_id, status=plan.status,
                                           send_at=plan.send_at,
                                           scheduled_by=plan.scheduled_by)
            return await self.read(txn, ctx, draft_id)

        return await self._db.run_interaction("drafts.schedule", txn_fn)

    async def cancel(self, ctx: RequestContext, draft_id: str) -> dict[str, Any]:
        """Cancel a scheduled send (a failed one is reset too): status draft. A key
        that may send may also take a send back; otherwise it takes messages:write."""
        p = ctx.org_principal
        if "messages:send" not in p.scopes:
            p.require("messages:write")
        return await self.set_plan(ctx, draft_id, Schedule("draft", None, None))


def _send_at(body: dict[str, Any]) -> datetime | None:
    """``send_at`` of a body the HTTP layer has already parsed to a datetime (or None)."""
    value = body.get("send_at")
    if value is not None and not isinstance(value, datetime):
        raise InvalidRequest("send_at must be an RFC 3339 time.", field="send_at")
    return value


def _with_write(p: Principal) -> Principal:
    """The principal, allowed to delete its own draft's copy."""
    return replace(p, scopes=p.scopes | {"messages:write"})
