"""Changes to stored messages, implemented once for every door (DESIGN rule 11).

The HTTP API (core.messages) and IMAP (core.imap_accounts) find and lock the rows in
their own way -- by message or thread id, by folder and UID -- and then call these
inside their transaction. Each change goes through the one storage function for it,
and its audit row is written in the same transaction, so an IMAP STORE and an API
label change cannot drift apart and neither can commit unaudited. New messages (SMTP
delivery, IMAP APPEND) take the other shared path, core.ingest, audited the same way.

Lock order (docs/architecture.md), the same on every path so that none can deadlock
with another: the caller has locked the message rows; then blob references (advisory
locks, key order), thread rows (id order), the inbox row (storage use), and last the
folder rows (UID/MODSEQ, id order). Ingest follows it too (blobs, thread, then inbox and
folder in insert_message), and so do API read/label changes, IMAP STORE, EXPUNGE, COPY,
MOVE and folder deletion (which locks its folder row first: nothing else may lock it
after its messages, so a STORE racing it at worst meets a retried deadlock).

The inbox and folder rows are the hot ones -- every change to a mailbox locks them, and
holds the lock until COMMIT (an fsync) -- so each change takes them in its LAST
statement(s): the slow work (threads, blobs, audit) is done before. That is also what
keeps MODSEQs right (RFC 7162): the per-folder counter is bumped under the folder row
lock held until COMMIT, so MODSEQs rise in commit order, just for less time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agentpost.core.audit import write_change
from agentpost.core.context import RequestContext
from agentpost.mail import keywords
from agentpost.mail.imapformat import compact_numbers
from agentpost.model.errors import InvalidRequest, MailboxFull
from agentpost.model.ids import new_id
from agentpost.storage import imap as imap_store
from agentpost.storage import mail as mail_store
from agentpost.storage import threads as thread_store
from agentpost.storage.database import Txn

#: Columns a flag change may set: the IMAP system flags, read state and labels.
FLAG_COLUMNS = mail_store.FLAG_COLUMNS
#: Labels per message (what the API shows); IMAP-only keywords have a cap of their own,
#: keywords.MAX_IMAP_KEYWORDS (agentpost.mail.keywords says which is which).
MAX_LABELS = keywords.MAX_LABELS

FlagChange = tuple[dict[str, Any], dict[str, Any]]


def uid_set(uids: list[int]) -> str:
    """[1, 2, 3, 7] -> "1:3,7": many messages of a folder in a few bytes of audit detail."""
    return compact_numbers(uids)


def _org(ctx: RequestContext) -> str:
    principal = ctx.org_principal
    principal.require("messages:write")
    return principal.org_id


def imap_keywords(flags: Iterable[str]) -> dict[str, str]:
    """The keywords among IMAP flags (STORE, APPEND), folded -> as the client spelled
    them. Any flag-keyword atom of RFC 3501/9051 is one; others (8-bit, too long) are
    refused here, before anything is locked."""
    try:
        return keywords.parse(flags)
    except ValueError as exc:
        raise InvalidRequest(
            f"{str(exc)[:40]!r} cannot be a keyword: keywords are 1-"
            f"{keywords.MAX_KEYWORD_CHARS} ASCII atom characters.", field="flags") from None


def check_keyword_caps(stored: Iterable[str]) -> None:
    """The caps on a new message's folded keywords (IMAP APPEND): MAX_LABELS labels and
    keywords.MAX_IMAP_KEYWORDS IMAP-only keywords, counted apart."""
    problem = keywords.cap_problem(stored)
    if problem is not None:
        raise InvalidRequest(problem, field="labels")


def _check_label_count(changes: list[FlagChange]) -> None:
    """The caps hold whichever door adds keywords: at most MAX_LABELS labels (what the
    API shows) and, apart, keywords.MAX_IMAP_KEYWORDS IMAP-only keywords, so a client's
    own bookkeeping never eats into the agent's labels. A message already over a cap
    may still lose some."""
    for row, columns in changes:
        new = columns.get("labels")
        if new is None:
            continue
        new_labels, new_others = keywords.split(new)
        old_labels, old_others = keywords.split(row["labels"])
        if len(new_labels) > MAX_LABELS and len(new_labels) > len(old_labels):
            raise InvalidRequest(f"A message holds at most {MAX_LABELS} labels.",
                                 field="labels")
        if (len(new_others) > keywords.MAX_IMAP_KEYWORDS
                and len(new_others) > len(old_others)):
            raise InvalidRequest(f"A message holds at most {keywords.MAX_IMAP_KEYWORDS} "
                                 "IMAP-only keywords.", field="labels")


async def change_flags(txn: Txn, ctx: RequestContext, changes: list[FlagChange], *,
                       status: int = 200) -> dict[str, int]:
    """Give locked message rows new read state, flags or labels, and audit it.

    ``changes`` pairs a row (``id``, ``folder_id``, ``thread_id`` and every
    FLAG_COLUMNS value) with the columns that change; pairs that change nothing should
    be left out. Each folder touched gets ONE new MODSEQ for all of its messages (what
    RFC 7162 wants of one STORE), folders in id order; threads whose labels changed are
    summarized again. The audit row is written even when nothing changed (the API
    audits every accepted request). Returns the new MODSEQ by message id.
    """
    org = _org(ctx)
    _check_label_count(changes)
    relabelled = sorted({row["thread_id"] for row, columns in changes if "labels" in columns})
    await thread_store.lock_threads(txn, org, relabelled)  # before the folder rows
    await write_change(txn, ctx, status)
    by_folder: dict[int, list[dict[str, Any]]] = {}
    for row, columns in changes:
        by_folder.setdefault(row["folder_id"], []).append(
            {**{col: row[col] for col in FLAG_COLUMNS}, **columns, "id": row["id"]})
    modseqs: dict[str, int] = {}
    folders = sorted(by_folder)
    for folder_id in folders:  # last: the folder rows stay locked until COMMIT
        updates = by_folder[folder_id]
        modseq = await mail_store.apply_flags(
            txn, org, folder_id, updates, relabelled if folder_id == folders[-1] else ())
        modseqs.update((u["id"], modseq) for u in updates)
    return modseqs


async def delete_messages(txn: Txn, ctx: RequestContext, rows: list[dict[str, Any]], *,
                          status: int = 200) -> list[str]:
    """Delete locked message rows (``id``, ``thread_id``) with their attachments, storage
    use and blob references; each thread touched is summarized again (or removed when
    empty) once, after the deletions. Returns the blob keys nobody references any more,
    which the caller removes from the store after COMMIT."""
    org = _org(ctx)
    freed: list[str] = []
    if rows:
        deleted = await mail_store.delete_messages(txn, org, [row["id"] for row in rows])
        freed = await mail_store.release_blobs(
            txn, [key for d in deleted for key in d["blob_keys"]])
        await thread_store.refresh_threads(txn, org, [row["thread_id"] for row in rows],
                                         drop_empty=True)
    await write_change(txn, ctx, status)
    if rows:
        freed_bytes: dict[str, int] = {}
        for d in deleted:
            freed_bytes[d["inbox_id"]] = freed_bytes.get(d["inbox_id"], 0) + d["size"]
        # Last: the inbox and folder rows stay locked until COMMIT.
        await mail_store.record_expunge(txn, org, freed_bytes,
                                        sorted({d["folder_id"] for d in deleted}))
    return freed


async def copy_messages(txn: Txn, ctx: RequestContext, rows: list[dict[str, Any]],
                        target_folder_id: int, quota: int = 0) -> list[tuple[int, int]]:
    """Copy locked message rows into another folder of their inbox, sharing the stored
    bytes. The copies are charged to the inbox at once (MailboxFull past ``quota``
    bytes; 0: none) before their UIDs are allocated, in the lock order above: blob
    references, threads, inbox, target folder. Returns (old UID, new UID) pairs."""
    org = _org(ctx)
    refs = [(row["raw_blob_key"], 0) for row in rows]
    for row in rows:
        refs += await imap_store.attachment_keys(txn, org, row["id"])
    for key, size in sorted(refs):
        await mail_store.reference_blob(txn, key, size)
    await thread_store.lock_threads(txn, org, [row["thread_id"] for row in rows])
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[row["inbox_id"]] = sizes.get(row["inbox_id"], 0) + row["size"]
    for inbox_id in sorted(sizes):
        if not await mail_store.charge_storage(txn, org, inbox_id, sizes[inbox_id], quota):
            raise MailboxFull()
    pairs = []
    for row in rows:
        uid, modseq = await mail_store.allocate_uid(txn, org, target_folder_id)
        await imap_store.copy_message(txn, org, row["id"], new_id("msg"), target_folder_id,
                                      uid, modseq)
        pairs.append((row["uid"], uid))
    await thread_store.refresh_threads(txn, org, [row["thread_id"] for row in rows])
    ctx.details["to_uids"] = uid_set([new for _, new in pairs])
    await write_change(txn, ctx)
    return pairs


async def move_messages(txn: Txn, ctx: RequestContext, rows: list[dict[str, Any]],
                        source_folder_id: int, target_folder_id: int) -> list[tuple[int, int]]:
    """Re-home locked message rows in another folder with new UIDs (RFC 6851); the
    source folder records the expunge. Returns (old UID, new UID) pairs."""
    org = _org(ctx)
    pairs = []
    if rows:  # both folder rows, in id order, before either is changed
        await mail_store.lock_folders(txn, org, [source_folder_id, target_folder_id])
    for row in rows:
        uid, modseq = await mail_store.allocate_uid(txn, org, target_folder_id)
        await imap_store.move_message(txn, org, row["id"], source_folder_id, target_folder_id,
                                      uid, modseq)
        pairs.append((row["uid"], uid))
    if rows:
        await mail_store.bump_modseq(txn, org, source_folder_id)
    ctx.details["to_uids"] = uid_set([new for _, new in pairs])
    await write_change(txn, ctx)
    return pairs
