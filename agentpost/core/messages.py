"""Reading and organizing stored mail through the API (new mail arrives by core.ingest).

Every change here goes through core.mail_changes, the implementation IMAP uses too."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import threads

from agentpost.core import mail_changes
from agentpost.core.audit import AuditTrail
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.context import RequestContext
from agentpost.mail import keywords
from agentpost.mail.reply import extract_new_text
from agentpost.model.errors import InvalidRequest, NotFound
from agentpost.storage import inboxes as inbox_store
from agentpost.storage import keywords as keyword_store
from agentpost.storage import mail as mail_store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database, Txn

MAX_LABELS = mail_changes.MAX_LABELS
#: Longest folder name the ``folder=`` filter takes (IMAP's own limit).
_MAX_FOLDER_CHARS = 200
_MAX_MESSAGE_ID_CHARS = 998


def check_labels(labels: list[str]) -> list[str]:
    """Labels made through the API keep the API's rules: lowercase strings of a safe
    alphabet, and not a name IMAP clients use for their own bookkeeping (each name has
    one meaning, whichever door sets it: agentpost.mail.keywords). Every label is an
    IMAP keyword as it is."""
    out = []
    for label in labels:
        problem = keywords.label_problem(label)
        if problem is not None:
            raise InvalidRequest(problem, field="labels")
        if label not in out:
            out.append(label)
    return out


def check_folder_filter(name: str | None) -> str | None:
    """The ``folder=`` filter: an IMAP folder name (INBOX in any case)."""
    if name is None:
        return None
    if not name or len(name) > _MAX_FOLDER_CHARS or any(ord(c) < 0x20 for c in name):
        raise InvalidRequest(f"folder is a folder name of 1-{_MAX_FOLDER_CHARS} characters.",
                             field="folder")
    return "INBOX" if name.upper() == "INBOX" else name


def check_message_id_filter(value: str | None) -> str | None:
    """The ``message_id=`` filter: a Message-ID with or without its angle brackets, as
    messages' ``message_id`` shows it (without)."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    if not value or len(value) > _MAX_MESSAGE_ID_CHARS or any(
            c.isspace() or c in "<>" for c in value):
        raise InvalidRequest("message_id is a Message-ID (id-left@id-right).",
                             field="message_id")
    return value


class Messages:
    """Messages and threads of an organization's inboxes."""

    def __init__(self, db: Database, audit: AuditTrail, blobs: BlobStore,
                 collector: BlobCollector, presign_ttl_s: int) -> None:
        self._db = db
        self._audit = audit
        self._blobs = blobs
        self._collector = collector
        self._presign_ttl_s = presign_ttl_s

    async def _inbox(self, txn: Txn, ctx: RequestContext, inbox_id: str) -> dict[str, Any]:
        p = ctx.org_principal
        inbox = await inbox_store.get_inbox(txn, p.org_id, p.environment_ids, inbox_id)
        if inbox is None:
            raise NotFound()
        ctx.environment_id = inbox["environment_id"]
        return inbox

    async def list(self, ctx: RequestContext, inbox_id: str, *, thread_id: str | None,
                   labels: list[str] | None, before: Any, after: Any, unread: bool | None,
                   after_id: str | None, limit: int, folder: str | None = None,
                   message_id: str | None = None) -> list[dict[str, Any]]:
        """Messages newest first (limit + 1 rows). ``folder`` (an IMAP folder name) tells
        archived, trashed and draft messages apart; ``message_id`` (the RFC 5322 header)
        finds every copy of one message, which a client's COPY+EXPUNGE move gives a new
        API id."""
        p = ctx.org_principal
        p.require("messages:read")
        ctx.target_id = inbox_id
        folder = check_folder_filter(folder)
        message_id = check_message_id_filter(message_id)

        async def txn_fn(txn: Txn) -> list[dict[str, Any]]:
            await self._inbox(txn, ctx, inbox_id)
            return await mail_store.list_messages(
                txn, p.org_id, p.environment_ids, inbox_id, thread_id=thread_id,
                labels=labels, before=before, after=after, unread=unread, after_id=after_id,
                limit=limit + 1, folder=folder, message_id=message_id)

        return await self._db.run_interaction("messages.list", txn_fn)

    async def get(self, ctx: RequestContext, message_id: str, *,
                  derive: bool = True) -> dict[str, Any]:
        """One message with bodies and attachment metadata (``derive``: fill in the
        extracted text of a large body)."""
        p = ctx.org_principal
        p.require("messages:read")
        ctx.target_id = message_id

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            msg = await mail_store.get_message(txn, p.org_id, p.environment_ids, message_id)
            if msg is None:
                raise NotFound()
            msg["attachments"] = await mail_store.list_attachments(txn, p.org_id, message_id)
            return msg

        msg = await self._db.run_interaction("messages.get", txn_fn)
        ctx.environment_id = msg["environment_id"]
        if derive and msg.get("extracted_text") is None and msg.get("text_body") is not None:
            # Large bodies keep no copy (see core.ingest); derive it off the reactor.
            msg["extracted_text"] = await threads.deferToThread(extract_new_text,
                                                                msg["text_body"])
        return msg

    async def raw(self, ctx: RequestContext, message_id: str) -> Any:
        """The message exactly as received, as a chunk stream (never loaded whole)."""
        msg = await self.get(ctx, message_id, derive=False)
        return await self._blobs.open_stream(msg["raw_blob_key"])

    async def attachment(self, ctx: RequestContext, message_id: str,
                         attachment_id: str) -> tuple[dict[str, Any], Any, str | None]:
        """Attachment metadata plus either a chunk stream (local store) or a presigned URL."""
        msg = await self.get(ctx, message_id, derive=False)
        for att in msg["attachments"]:
            if att["id"] == attachment_id:
                ctx.target_id = attachment_id
                url = await self._blobs.presigned_url(
                    att["blob_key"], filename=att["filename"] or "attachment",
                    content_type=att["mime_type"], expires_s=self._presign_ttl_s)
                if url is not None:
                    return att, None, url
                return att, await self._blobs.open_stream(att["blob_key"]), None
        raise NotFound()

    async def _change(self, ctx: RequestContext, message_id: str, desc: str,
                      mutate: Callable[[dict[str, Any]], dict[str, Any]],
                      added: Sequence[str] = ()) -> dict[str, Any]:
        p = ctx.org_principal
        p.require("messages:write")
        ctx.target_id = message_id

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            msg = await mail_store.get_message(txn, p.org_id, p.environment_ids, message_id,
                                               for_update=True)
            if msg is None:
                raise NotFound()
            ctx.environment_id = msg["environment_id"]
            changes = mutate(msg)
            if changes and added:  # first seen here: IMAP shows them as the API spells them
                await keyword_store.remember(txn, p.org_id, msg["inbox_id"], added)
            await mail_changes.change_flags(txn, ctx, [(msg, changes)] if changes else [])
            msg = await mail_store.get_message(txn, p.org_id, p.environment_ids, message_id)
            assert msg is not None  # locked FOR UPDATE above: still there
            msg["attachments"] = await mail_store.list_attachments(txn, p.org_id, message_id)
            return msg

        return await self._db.run_interaction(desc, txn_fn)

    async def set_read(self, ctx: RequestContext, message_id: str,
                       read: bool) -> dict[str, Any]:
        """Mark read or unread (the IMAP \\Seen flag)."""
        return await self._change(ctx, message_id, "messages.update",
                                  lambda m: {"seen": read} if m["seen"] != read else {})

    async def add_labels(self, ctx: RequestContext, message_id: str,
                         labels: builtins.list[str]) -> dict[str, Any]:
        """Add labels (IMAP keywords)."""
        labels = check_labels(labels)

        def mutate(m: dict[str, Any]) -> dict[str, Any]:
            new = sorted(set(m["labels"]) | set(labels))  # the cap: mail_changes
            return {"labels": new} if new != sorted(m["labels"]) else {}

        return await self._change(ctx, message_id, "messages.labels.add", mutate,
                                  added=labels)

    async def remove_labels(self, ctx: RequestContext, message_id: str,
                            labels: builtins.list[str]) -> dict[str, Any]:
        """Remove labels."""
        labels = check_labels(labels)

        def mutate(m: dict[str, Any]) -> dict[str, Any]:
            new = sorted(set(m["labels"]) - set(labels))
            return {"labels": new} if new != sorted(m["labels"]) else {}

        return await self._change(ctx, message_id, "messages.labels.remove", mutate)

    async def delete(self, ctx: RequestContext, message_id: str) -> None:
        """Delete a message; blobs nobody else references go after the commit."""
        p = ctx.org_principal
        p.require("messages:write")
        ctx.target_id = message_id
        freed: list[str] = []

        async def txn_fn(txn: Txn) -> None:
            msg = await mail_store.get_message(txn, p.org_id, p.environment_ids, message_id,
                                               for_update=True)
            if msg is None:
                raise NotFound()
            ctx.environment_id = msg["environment_id"]
            # Assigned, not extended: a retried transaction must not free keys twice.
            freed[:] = await mail_changes.delete_messages(txn, ctx, [msg], status=204)

        await self._db.run_interaction("messages.delete", txn_fn)
        await self._collector.collect(freed)

    async def list_threads(self, ctx: RequestContext, inbox_id: str, *,
                           labels: builtins.list[str] | None, cursor: tuple[Any, str] | None,
                           limit: int) -> builtins.list[dict[str, Any]]:
        """Threads by latest activity (limit + 1 rows)."""
        p = ctx.org_principal
        p.require("messages:read")
        ctx.target_id = inbox_id

        async def txn_fn(txn: Txn) -> list[dict[str, Any]]:
            await self._inbox(txn, ctx, inbox_id)
            return await mail_store.list_threads(txn, p.org_id, p.environment_ids, inbox_id,
                                                 labels=labels, cursor=cursor, limit=limit + 1)

        return await self._db.run_interaction("threads.list", txn_fn)

    async def get_thread(self, ctx: RequestContext, thread_id: str) -> dict[str, Any]:
        """A thread with its messages (oldest first, without bodies)."""
        p = ctx.org_principal
        p.require("messages:read")
        ctx.target_id = thread_id

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            thread = await mail_store.get_thread(txn, p.org_id, p.environment_ids, thread_id)
            if thread is None:
                raise NotFound()
            ctx.environment_id = thread["environment_id"]
            thread["messages"] = await mail_store.list_thread_messages(txn, p.org_id, thread_id)
            return thread

        return await self._db.run_interaction("threads.get", txn_fn)

    async def thread_labels(self, ctx: RequestContext, thread_id: str,
                            labels: builtins.list[str], add: bool) -> dict[str, Any]:
        """Add or remove labels on every message of a thread."""
        p = ctx.org_principal
        p.require("messages:write")
        ctx.target_id = thread_id
        labels = check_labels(labels)

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            thread = await mail_store.get_thread(txn, p.org_id, p.environment_ids, thread_id)
            if thread is None:
                raise NotFound()
            ctx.environment_id = thread["environment_id"]
            if add:  # first seen here: IMAP shows them as the API spells them
                await keyword_store.remember(txn, p.org_id, thread["inbox_id"], labels)
            changes = []
            for msg in await mail_store.thread_message_ids(txn, p.org_id, thread_id):
                current = set(msg["labels"])
                new = sorted(current | set(labels) if add else current - set(labels))
                if new != sorted(current):
                    changes.append((msg, {"labels": new}))
            await mail_changes.change_flags(txn, ctx, changes)
            thread = await mail_store.get_thread(txn, p.org_id, p.environment_ids, thread_id)
            if thread is None:  # emptied and removed by a concurrent delete meanwhile
                raise NotFound()
            thread["messages"] = await mail_store.list_thread_messages(txn, p.org_id, thread_id)
            return thread

        return await self._db.run_interaction("threads.labels", txn_fn)
