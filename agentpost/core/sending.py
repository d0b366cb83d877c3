"""Sending mail through the API: compose, check, then the one submission path.

Public surface (the drafts code calls the first):

- ``Sending.send_composition(ctx, inbox_id, composition, *, labels=(), record=None)
  -> dict``: the Sent copy's message JSON plus ``queue_ids`` and ``send_status``;
- ``Sending.send(ctx, inbox_id, body, record=None)``: the ``POST /inboxes/{id}/messages``
  body;
- ``Sending.respond(ctx, message_id, body, mode, record=None)``: reply, reply-all and
  forward.

Every recipient goes through ``Submission.check_recipients`` (paused inbox, send filter
rules, and whatever else submission checks; ``Submission.inbox_checks`` and ``judge``
when the inbox is not read yet: the inbox and the checks in one read), and the message
through ``Submission.submit``, so the API and SMTP submission refuse and queue alike. The Sent
copy, its queue rows and (with an Idempotency-Key) the recorded answer commit in one
transaction. ``record`` is the idempotency recorder (core.idempotency).
"""

from __future__ import annotations

import base64
import binascii
import html
import io
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from twisted.internet import threads

from agentpost.core.context import RequestContext
from agentpost.core.idempotency import Recorder
from agentpost.core.messages import check_labels
from agentpost.core.submission import Sender, Submission, Submitted
from agentpost.core.uploads import (
    Upload,
    Uploads,
    check_filename,
    check_mime_type,
    stored_part,
)
from agentpost.mail.compose import (
    Address,
    AttachmentPart,
    Composition,
    check_headers,
    check_text,
    compose,
    normalize_email,
    parse_address_list,
    prefixed_subject,
    quote_text,
    reply_references,
    usable_message_id,
)
from agentpost.model.errors import (
    InvalidRequest,
    MessageTooLarge,
    NotFound,
    TooManyRecipients,
)
from agentpost.storage import inboxes as inbox_store
from agentpost.storage import keywords as keyword_store
from agentpost.storage import mail as mail_store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database, Txn

#: A message whose bodies and attachments come to at most this many characters is
#: composed on the reactor thread: writing it (agentpost.mail.mime_writer, linear in its
#: size) takes less than the two thread handoffs and GIL hand-overs of a pool call, as
#: parsing a small message does (core.parse_dispatch).
INLINE_COMPOSE_MAX = 16 * 1024
INLINE_ADDRESSES = 10
#: The longest subject we accept (one header line).
MAX_SUBJECT = 998
MAX_ATTACHMENTS = 100
MODES = ("reply", "reply_all", "forward")


@dataclass(frozen=True)
class MessageLimits:
    """What one API send may be (``[mail] max_recipients``, ``[smtp] max_message_size``)."""

    max_recipients: int
    max_message_size_bytes: int


def _b64(content: Any, where: str) -> bytes:
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.content must be base64 text.", field=where)
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}.content is not valid base64.", field=where) from None


def attachment_parts(items: Any, uploads: dict[str, Upload]) -> list[AttachmentPart]:
    """The body's ``attachments``: ``{key}`` of an upload, or inline base64 ``content``."""
    if items is None:
        return []
    if not isinstance(items, list) or len(items) > MAX_ATTACHMENTS:
        raise InvalidRequest(f"attachments is a list of at most {MAX_ATTACHMENTS}.",
                             field="attachments")
    parts = []
    for i, item in enumerate(items):
        where = f"attachments[{i}]"
        if not isinstance(item, dict) or ("key" in item) == ("content" in item):
            raise InvalidRequest(f"{where} needs either key or content.", field=where)
        if "key" in item:
            up = uploads[item["key"]]
            data, filename, mime = up.data, item.get("filename") or up.filename, \
                item.get("mime_type") or up.mime_type
        else:
            data, filename, mime = (_b64(item["content"], where), item.get("filename"),
                                    item.get("mime_type") or "application/octet-stream")
        content_id = item.get("content_id")
        if content_id is not None:
            content_id = check_text(content_id, where, limit=250).strip("<> ")
            if not content_id or any(c.isspace() or c in "<>" for c in content_id):
                raise InvalidRequest(f"{where}.content_id is not a Content-ID.", field=where)
        disposition = item.get("disposition") or ("inline" if content_id else "attachment")
        if disposition not in ("inline", "attachment"):
            raise InvalidRequest(f"{where}.disposition is inline or attachment.", field=where)
        parts.append(AttachmentPart(check_filename(filename or "attachment", where),
                                    check_mime_type(mime, where), data, content_id,
                                    disposition == "inline"))
    return parts


def composition_from_body(body: dict[str, Any], uploads: dict[str, Upload]) -> Composition:
    """The send body as a Composition (addresses, headers and texts checked)."""
    subject = body.get("subject") or ""
    text_body, html_body = body.get("text_body"), body.get("html_body")
    for name, value in (("text_body", text_body), ("html_body", html_body)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string.", field=name)
    return Composition(
        to=parse_address_list(body.get("to"), "to"),
        cc=parse_address_list(body.get("cc"), "cc"),
        bcc=parse_address_list(body.get("bcc"), "bcc"),
        subject=check_text(subject, "subject", limit=MAX_SUBJECT),
        text_body=text_body, html_body=html_body,
        reply_to=parse_address_list(body.get("reply_to"), "reply_to"),
        headers=check_headers(body.get("headers")),
        attachments=attachment_parts(body.get("attachments"), uploads))


def upload_keys(body: dict[str, Any]) -> list[str]:
    """The upload keys a send body names."""
    items = body.get("attachments") or []
    if not isinstance(items, list):
        return []
    return [i["key"] for i in items if isinstance(i, dict) and isinstance(i.get("key"), str)]


# --------------------------------------------------------------------------- replies

def _addr(value: dict[str, Any] | None) -> list[Address]:
    """A stored address as an Address; one that would not survive our own checks (it
    came from a stranger's headers) is left out rather than written into ours."""
    if not value or not isinstance(value.get("email"), str):
        return []
    try:
        address = normalize_email(value["email"], "address")
    except InvalidRequest:
        return []
    name = value.get("name")
    name = " ".join(name.split()) if isinstance(name, str) else None
    return [Address(address, name.replace("\x00", "")[:200] or None if name else None)]


def _addrs(values: list[dict[str, Any]] | None) -> list[Address]:
    return [a for v in values or [] for a in _addr(v)]


def _without(addresses: list[Address], drop: set[str]) -> list[Address]:
    """``addresses`` minus ``drop`` and minus repeats, case-insensitively (``drop`` grows)."""
    out = []
    for a in addresses:
        if a.email.lower() not in drop:
            drop.add(a.email.lower())
            out.append(a)
    return out


def reply_recipients(original: dict[str, Any], own: str,
                     mode: str) -> tuple[list[Address], list[Address]]:
    """(to, cc) of a reply: the original's Reply-To or From (its To when we sent it);
    reply-all adds its To and Cc; never the inbox itself, no address twice."""
    if original["direction"] == "outbound":
        primary, others = _addrs(original["to_addresses"]), []
    else:
        primary = _addrs(original["reply_to"]) or _addr(original["from_address"])
        others = _addrs(original["to_addresses"])
    seen = {own.lower()}
    to = _without(primary, seen)
    if mode != "reply_all":
        return to, []
    cc = _without(others + _addrs(original["cc_addresses"]), seen)
    return to, cc


def _header_block(original: dict[str, Any]) -> list[tuple[str, str]]:
    def show(addrs: list[Address]) -> str:
        return ", ".join(f"{a.name} <{a.email}>" if a.name else a.email for a in addrs)

    sent = original.get("sent_at") or original.get("received_at")
    rows = [("From", show(_addr(original["from_address"]))),
            ("Date", sent.astimezone(UTC).strftime("%a, %d %b %Y %H:%M UTC") if sent else ""),
            ("Subject", original["subject"] or ""),
            ("To", show(_addrs(original["to_addresses"])))]
    if original["cc_addresses"]:
        rows.append(("Cc", show(_addrs(original["cc_addresses"]))))
    return rows


def forward_bodies(original: dict[str, Any], text: str | None,
                   html_text: str | None) -> tuple[str, str | None]:
    """The forward's text (and HTML, when either side has HTML): the sender's words,
    then a header block and the original."""
    block = _header_block(original)
    head = "---------- Forwarded message ---------\n" + "\n".join(
        f"{k}: {v}" for k, v in block)
    out_text = ((text or "") + "\n\n" + head + "\n\n" + (original["text_body"] or "")).lstrip()
    if html_text is None and original["html_body"] is None:
        return out_text, None
    mine = html_text if html_text is not None else (
        f"<p>{html.escape(text or '').replace(chr(10), '<br>')}</p>" if text else "")
    rows = "<br>".join(f"{k}: {html.escape(v)}" for k, v in block)
    theirs = original["html_body"] if original["html_body"] is not None else (
        f"<pre>{html.escape(original['text_body'] or '')}</pre>")
    out_html = (f"{mine}<br><div>---------- Forwarded message ---------<br>{rows}</div>"
                f"<br><blockquote>{theirs}</blockquote>")
    return out_text, out_html


def respond_composition(original: dict[str, Any], own: str, mode: str,
                        base: Composition, quote: bool) -> Composition:
    """A reply, reply-all or forward of ``original`` built on the caller's fields."""
    mid = usable_message_id(original["message_id_header"])
    refs = [f"<{r}>" for r in original["reference_ids"] or []]
    if not refs and original["in_reply_to"]:
        refs = [f"<{original['in_reply_to']}>"]
    references = reply_references(mid, refs)
    if mode == "forward":
        fwd_text, html_body = forward_bodies(original, base.text_body, base.html_body)
        # References (no In-Reply-To): the Sent copy stays in the original's thread.
        return replace(base, subject=prefixed_subject(original["subject"], "Fwd"),
                       text_body=fwd_text, html_body=html_body, references=references)
    to, cc = reply_recipients(original, own, mode)
    seen = {own.lower()}
    text = base.text_body
    if quote:
        sent = original.get("sent_at") or original.get("received_at")
        who = _addr(original["from_address"])
        attribution = (f"On {sent.astimezone(UTC):%a, %d %b %Y %H:%M UTC}, "
                       f"{who[0].email if who else 'someone'} wrote:") if sent else "Quoted:"
        text = (text or "") + "\n\n" + quote_text(original["text_body"], attribution)
    return replace(base, to=_without(to + base.to, seen), cc=_without(cc + base.cc, seen),
                   subject=prefixed_subject(original["subject"], "Re"),
                   text_body=text, in_reply_to=mid, references=references)


def _small(c: Composition, attached: int) -> bool:
    """Whether ``c`` is composed inline: small bodies, few addresses, no custom headers
    (the stdlib's header folding, which the writer falls back on, is not linear)."""
    size = attached + len(c.text_body or "") + len(c.html_body or "")
    return (size <= INLINE_COMPOSE_MAX and not c.headers
            and len(c.to) + len(c.cc) + len(c.bcc) + len(c.reply_to) <= INLINE_ADDRESSES)


class Sending:
    """The send API's core operations."""

    def __init__(self, db: Database, submission: Submission, blobs: BlobStore,
                 uploads: Uploads, reactor: Any, hostname: str, limits: MessageLimits,
                 view: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self._db = db
        self._submission = submission
        self._blobs = blobs
        self._uploads = uploads
        self._reactor = reactor
        self._hostname = hostname
        self.limits = limits
        self._view = view

    async def _inbox(self, ctx: RequestContext, inbox_id: str) -> dict[str, Any]:
        p = ctx.org_principal
        inbox = await self._db.run_read("sending.inbox", inbox_store.get_inbox, p.org_id,
                                        p.environment_ids, inbox_id)
        if inbox is None:
            raise NotFound()
        ctx.environment_id = inbox["environment_id"]
        return inbox

    async def send(self, ctx: RequestContext, inbox_id: str, body: dict[str, Any],
                   record: Recorder | None = None) -> dict[str, Any]:
        """``POST /inboxes/{inbox_id}/messages``."""
        ctx.org_principal.require("messages:send")
        inbox = None
        if upload_keys(body):  # a foreign inbox is 404 before its uploads are read
            inbox = await self._inbox(ctx, inbox_id)
        uploads = await self._read_uploads(ctx, body)
        composition = composition_from_body(body, uploads)
        labels = tuple(check_labels(body.get("labels") or []))
        # No inbox read yet: send_composition finds it with the checks, in one read.
        return await self.send_composition(ctx, inbox_id, composition, labels=labels,
                                           record=record, inbox=inbox)

    async def _read_uploads(self, ctx: RequestContext, body: dict[str, Any]
                            ) -> dict[str, Upload]:
        """The uploads the body names (none named: no transaction at all)."""
        keys = upload_keys(body)
        if not keys:
            return {}
        return await self._uploads.read(ctx, keys, self.limits.max_message_size_bytes)

    async def respond(self, ctx: RequestContext, message_id: str, body: dict[str, Any],
                      mode: str, record: Recorder | None = None) -> dict[str, Any]:
        """Reply, reply-all or forward a stored message from the inbox that holds it.

        Needs messages:read as well as messages:send: a forward (or a quoting reply, or
        the Sent copy in the answer) shows the original's content, which a send-only
        key could otherwise read by forwarding it to itself."""
        p = ctx.org_principal
        p.require("messages:send")
        p.require("messages:read")
        assert mode in MODES

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            msg = await mail_store.get_message(txn, p.org_id, p.environment_ids, message_id)
            if msg is None:
                raise NotFound()
            msg["attachments"] = await mail_store.list_attachments(txn, p.org_id, message_id)
            return msg

        original = await self._db.run_interaction("sending.original", txn_fn)
        inbox = await self._inbox(ctx, original["inbox_id"])
        uploads = await self._read_uploads(ctx, body)
        base = composition_from_body(body, uploads)
        if mode == "forward" and body.get("include_attachments", True):
            base = replace(base, attachments=[*await self._original_parts(original),
                                              *base.attachments])
        quote = bool(body.get("quote", False))
        # Quoting copies and escapes bodies of up to the message size: off the reactor.
        composition = await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), respond_composition, original,
            inbox["email"], mode, base, quote)
        labels = tuple(check_labels(body.get("labels") or []))
        return await self.send_composition(ctx, original["inbox_id"], composition,
                                           labels=labels, record=record, inbox=inbox)

    async def _original_parts(self, original: dict[str, Any]) -> list[AttachmentPart]:
        total = 0
        parts = []
        for att in original["attachments"]:
            total += att["size"] or 0
            if total > self.limits.max_message_size_bytes:
                raise MessageTooLarge("The original's attachments exceed the size limit.")
            parts.append(stored_part(att, await self._blobs.get_bytes(att["blob_key"])))
        return parts

    async def send_composition(self, ctx: RequestContext, inbox_id: str,
                               composition: Composition, *, labels: tuple[str, ...] = (),
                               record: Recorder | None = None,
                               inbox: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check every recipient, compose, store the Sent copy and queue it (one COMMIT,
        with ``record``'s answer when given); the Sent copy's JSON view, plus
        ``queue_ids`` and ``send_status``. ``inbox``: the row, when the caller has just
        read it with this ``ctx`` (one read fewer). Without ``record`` and ``labels``
        the send may share a group commit and its answer is read after the COMMIT."""
        p = ctx.org_principal
        p.require("messages:send")
        ctx.target_id = inbox_id
        known = inbox is not None and inbox["id"] == inbox_id
        recipients = composition.recipients()
        if not recipients or len(recipients) > self.limits.max_recipients:
            if not known:
                await self._inbox(ctx, inbox_id)  # a foreign inbox is 404 first
            if not recipients:
                raise InvalidRequest("Name at least one recipient (to, cc or bcc).",
                                     field="to")
            raise TooManyRecipients(
                f"A message may have at most {self.limits.max_recipients} recipients.",
                field="to")
        if known:
            assert inbox is not None
            sender = Sender.of(p, inbox)
            envelope_from = await self._submission.check_recipients(sender, recipients)
        else:  # the inbox and every check in one read
            inbox = await self._submission.inbox_checks(p.org_id, p.environment_ids,
                                                        inbox_id, recipients)
            if inbox is None:
                raise NotFound()
            ctx.environment_id = inbox["environment_id"]
            sender = Sender.of(p, inbox)
            envelope_from = self._submission.judge(inbox, recipients)
        raw = await self._compose(composition, inbox)
        if record is None and not labels:
            # Nothing else to write with the Sent copy: it may share a group commit,
            # and the answer is read once it has committed, out of the transaction.
            submitted = await self._submission.submit(sender, sender.address, recipients,
                                                      io.BytesIO(raw), ctx,
                                                      envelope_from=envelope_from)
            ctx.target_id = submitted.message_id
            return await self._answer(p.org_id, p.environment_ids, submitted)
        answer: dict[str, Any] = {}

        async def also(txn: Txn, submitted: Submitted) -> None:
            if labels:  # first seen here: IMAP shows them as the API spells them
                await keyword_store.remember(txn, p.org_id, inbox_id, labels)
            msg = await mail_store.get_message(txn, p.org_id, p.environment_ids,
                                               submitted.message_id)
            assert msg is not None  # inserted in this very transaction
            msg["attachments"] = (await mail_store.list_attachments(
                txn, p.org_id, submitted.message_id) if msg["has_attachments"] else [])
            body = {**self._view(msg), "queue_ids": submitted.queue_ids,
                    "send_status": "queued"}
            if record is not None:
                await record(txn, 201, body)
            answer.clear()
            answer.update(body)

        submitted = await self._submission.submit(sender, sender.address, recipients,
                                                  io.BytesIO(raw), ctx, labels=labels,
                                                  also=also, envelope_from=envelope_from)
        ctx.target_id = submitted.message_id
        return answer

    async def _answer(self, org_id: str, env_ids: frozenset[str] | None,
                      submitted: Submitted) -> dict[str, Any]:
        """The committed Sent copy's view, ``queue_ids`` and ``send_status`` (as the
        transaction's own read gives it); a copy already deleted again by someone else
        answers with its id."""
        msg = await self._db.run_read("sending.answer", mail_store.get_message, org_id,
                                      env_ids, submitted.message_id)
        extra = {"queue_ids": submitted.queue_ids, "send_status": "queued"}
        if msg is None:
            return {"id": submitted.message_id, **extra}
        msg["attachments"] = (await self._db.run_read(
            "sending.answer_attachments", mail_store.list_attachments, org_id,
            submitted.message_id) if msg["has_attachments"] else [])
        return {**self._view(msg), **extra}

    async def _compose(self, composition: Composition, inbox: dict[str, Any]) -> bytes:
        total = sum(len(a.data) for a in composition.attachments)
        limit = self.limits.max_message_size_bytes
        if total > limit:
            raise MessageTooLarge(f"The message would exceed {limit} bytes.")
        now = datetime.fromtimestamp(self._reactor.seconds(), UTC)
        from_addr = Address(inbox["email"], inbox.get("display_name") or None)

        def write() -> bytes:
            return compose(composition, from_addr=from_addr, hostname=self._hostname,
                           now=now)

        raw = write() if _small(composition, total) else await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), write)
        if len(raw) > limit:
            raise MessageTooLarge(f"The message would exceed {limit} bytes.")
        return raw
