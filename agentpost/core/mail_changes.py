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

IMAP's writes (STORE, EXPUNGE, COPY, MOVE) go one step further: those last statements
travel in the same message as the COMMIT (``commit=True``, storage.imap_commits.commit_with),
so the rows are held for the statements and the fsync, not also for a trip through the
server's busy reactor. COPY and MOVE allocate every UID of the command in one
statement. The API keeps the plain form: its callers may write after these.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agentpost.core.audit import audit_row, scrub_row, write_change
from agentpost.core.context import RequestContext
from agentpost.mail import keywords
from agentpost.mail.imapformat import compact_numbers
from agentpost.model.errors import InvalidRequest, MailboxFull
from agentpost.model.ids import new_id
from agentpost.storage import audit as audit_store
from agentpost.storage import imap_commits
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
                       status: int = 200, commit: bool = False) -> dict[str, int]:
    """Give locked message rows new read state, flags or labels, and audit it.

    ``changes`` pairs a row (``id``, ``folder_id``, ``thread_id`` and every
    FLAG_COLUMNS value) with the columns that change; pairs that change nothing should
    be left out. Each folder touched gets ONE new MODSEQ for all of its messages (what
    RFC 7162 wants of one STORE), folders in id order; threads whose labels changed are
    summarized again. The audit row is written even when nothing changed (the API
    audits every accepted request). Returns the new MODSEQ by message id.

    With ``commit`` (IMAP STORE) the transaction ends here: the audit row, the thread
    locks, the folder rows and the COMMIT go in ONE round trip (imap_commits.commit_with),
    so the folder rows are locked for the statements and the fsync only.
    """
    org = _org(ctx)
    _check_label_count(changes)
    relabelled = sorted({row["thread_id"] for row, columns in changes if "labels" in columns})
    by_folder: dict[int, list[dict[str, Any]]] = {}
    for row, columns in changes:
        by_folder.setdefault(row["folder_id"], []).append(
            {**{col: row[col] for col in FLAG_COLUMNS}, **columns, "id": row["id"]})
    folders = sorted(by_folder)
    if commit:
        return await _change_flags_and_commit(txn, ctx, org, by_folder, relabelled, status)
    await thread_store.lock_threads(txn, org, relabelled)  # before the folder rows
    await write_change(txn, ctx, status)
    modseqs: dict[str, int] = {}
    for folder_id in folders:  # last: the folder rows stay locked until COMMIT
        updates = by_folder[folder_id]
        modseq = await mail_store.apply_flags(
            txn, org, folder_id, updates, relabelled if folder_id == folders[-1] else ())
        modseqs.update((u["id"], modseq) for u in updates)
    return modseqs


def _audit_sql(txn: Txn, ctx: RequestContext, status: int = 200) -> tuple[str, list[Any]]:
    """write_change's INSERT, to send with other statements (marked audited on COMMIT)."""
    row = audit_row(ctx, "allowed", status, txn.now)
    scrub_row(row)
    txn.after_commit(setattr, ctx, "audited", True)
    return audit_store.audit_insert_sql([row])


class _Batch:
    """Statements and parameters sent together in one round trip."""

    def __init__(self) -> None:
        self.sql: list[str] = []
        self.params: list[Any] = []

    def add(self, part: tuple[str, list[Any]]) -> None:
        if part[0]:
            self.sql.append(part[0])
            self.params += part[1]

    @property
    def text(self) -> str:
        return "; ".join(self.sql)


async def _change_flags_and_commit(txn: Txn, ctx: RequestContext, org: str,
                                   by_folder: dict[int, list[dict[str, Any]]],
                                   relabelled: list[str], status: int) -> dict[str, int]:
    batch = _Batch()
    batch.add(_audit_sql(txn, ctx, status))
    if relabelled:  # the thread rows before the folder rows (the lock order above)
        batch.add(imap_commits.lock_threads_sql(org, relabelled))
    folders = sorted(by_folder)
    for folder_id in folders:
        batch.add(imap_commits.apply_flags_sql(org, folder_id, by_folder[folder_id]))
    if relabelled:
        batch.add(thread_store.relabel_threads_sql(org, relabelled, txn.now))
    batch.add(imap_commits.notify_sql(folders))
    result = imap_commits.modseqs_result(org, folders) if folders else ("NULL::int", [])
    found = await imap_commits.commit_with(txn, batch.text, batch.params, *result,
                                           generic_plans=True) or {}
    return {u["id"]: int(found[str(folder_id)])
            for folder_id in folders for u in by_folder[folder_id]}


async def delete_messages(txn: Txn, ctx: RequestContext, rows: list[dict[str, Any]], *,
                          status: int = 200, commit: bool = False) -> list[str]:
    """Delete locked message rows (``id``, ``thread_id``) with their attachments, storage
    use and blob references; each thread touched is summarized again (or removed when
    empty) once, after the deletions. Returns the blob keys nobody references any more,
    which the caller removes from the store after COMMIT. With ``commit`` (IMAP
    EXPUNGE) the audit row, the folders' expunge marks and the COMMIT go in one round
    trip, as in :func:`change_flags`: the deletions, blob releases, thread summaries and
    usage deltas too (:func:`_delete_and_commit`)."""
    org = _org(ctx)
    if commit:
        return list(await _delete_and_commit(txn, ctx, org, rows, status) or [])
    freed: list[str] = []
    deleted: list[dict[str, Any]] = []
    if rows:
        deleted = await mail_store.delete_messages(txn, org, [row["id"] for row in rows])
        freed = await mail_store.release_blobs(
            txn, [key for d in deleted for key in d["blob_keys"]])
        await thread_store.refresh_threads(txn, org, [row["thread_id"] for row in rows],
                                         drop_empty=True)
    freed_bytes: dict[str, int] = {}
    for d in deleted:
        freed_bytes[d["inbox_id"]] = freed_bytes.get(d["inbox_id"], 0) + d["size"]
    folders = sorted({d["folder_id"] for d in deleted})
    await write_change(txn, ctx, status)
    if rows:  # last: the folder rows stay locked until COMMIT
        await mail_store.record_expunge(txn, org, freed_bytes, folders)
    return freed


async def expunge_folder(txn: Txn, ctx: RequestContext, rows: list[dict[str, Any]],
                         folder_id: int) -> tuple[list[str], int]:
    """IMAP EXPUNGE of locked rows (at least one) of one folder: :func:`delete_messages`
    with ``commit``, which also returns the folder's new HIGHESTMODSEQ."""
    found = await _delete_and_commit(txn, ctx, _org(ctx), rows, 200,
                                     imap_commits.expunge_result(_org(ctx), folder_id))
    return list(found["freed"] or []), int(found["modseq"])


async def _delete_and_commit(txn: Txn, ctx: RequestContext, org: str,
                             rows: list[dict[str, Any]], status: int,
                             result: tuple[str, list[Any]] | None = None) -> Any:
    """IMAP EXPUNGE's whole change in ONE round trip with its COMMIT: the audit row,
    the deletions with their usage deltas, the blob releases (locks in key order), the
    threads (locked in id order, summarized again, dropped when empty), and last the
    folder rows' expunge marks and wake-ups -- the same lock order and effects as the
    API's path, with no trip through the reactor while anything is held. Returns the
    value of ``result`` (default: the freed blob keys; no rows: nothing)."""
    batch = _Batch()
    batch.add(_audit_sql(txn, ctx, status))
    if not rows:
        await imap_commits.commit_with(txn, batch.text, batch.params, generic_plans=True)
        return None
    batch.add(imap_commits.expunge_messages_sql(org, [row["id"] for row in rows], txn.now))
    batch.add(thread_store.lock_and_refresh_sql(
        org, [row["thread_id"] for row in rows], txn.now, drop_empty=True))
    batch.add(imap_commits.mark_expunged_after_sql(org))
    return await imap_commits.commit_with(txn, batch.text, batch.params,
                                          *(result or imap_commits.freed_result()),
                                          generic_plans=True)


async def copy_messages(txn: Txn, ctx: RequestContext, rows: list[dict[str, Any]],
                        target_folder_id: int, quota: int = 0) -> list[tuple[int, int]]:
    """Copy locked message rows into another folder of their inbox, sharing the stored
    bytes, and COMMIT. The copies are charged to the inbox at once (MailboxFull past
    ``quota`` bytes; 0: none) before their UIDs are allocated, in the lock order above:
    blob references, threads, inbox, target folder; the copies, their UIDs (one
    statement for all), the thread summaries, the audit row and the COMMIT go in one
    round trip. Returns (old UID, new UID) pairs."""
    org = _org(ctx)
    threads = sorted({row["thread_id"] for row in rows})
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[row["inbox_id"]] = sizes.get(row["inbox_id"], 0) + row["size"]
    charges = sorted(sizes.items())
    locks = _Batch()  # blob references, the thread rows, the inbox's charge: one trip
    locks.add(mail_store.reference_copies_sql(org, [row["id"] for row in rows]))
    locks.add(imap_commits.lock_threads_sql(org, threads))
    if len(charges) == 1:  # (rows of one folder: always) its answer ends the trip
        inbox_id, size = charges.pop()
        locks.add(mail_store.charge_storage_sql(org, inbox_id, size, quota, txn.now))
        if not await txn.fetchval(locks.text, locks.params):
            raise MailboxFull()
    else:
        await txn.execute(locks.text, locks.params)
    for inbox_id, size in charges:
        if not await mail_store.charge_storage(txn, org, inbox_id, size, quota):
            raise MailboxFull()
    new_ids = [new_id("msg") for _ in rows]
    batch = _Batch()
    batch.add(imap_commits.copy_messages_sql(org, [row["id"] for row in rows], new_ids,
                                           target_folder_id, txn.now))
    batch.add(thread_store.refresh_threads_sql(org, threads, txn.now))
    batch.add(imap_commits.notify_sql([target_folder_id]))
    return await _commit_transfer(txn, ctx, org, batch, rows, target_folder_id)


async def _commit_transfer(txn: Txn, ctx: RequestContext, org: str, batch: _Batch,
                           rows: list[dict[str, Any]], target_folder_id: int
                           ) -> list[tuple[int, int]]:
    """COPY/MOVE's last round trip: ``batch`` gave the rows, in order, consecutive UIDs
    below the target's UIDNEXT; the audit row gets them (``to_uids``) from there."""
    audit_sql, audit_params = _audit_sql(txn, ctx)
    batch.add((audit_sql, audit_params))
    batch.add(imap_commits.audit_to_uids_sql(org, audit_params[0], target_folder_id,
                                           len(rows)))
    uidnext = int(await imap_commits.commit_with(
        txn, batch.text, batch.params, *imap_commits.uidnext_result(org, target_folder_id)))
    first = uidnext - len(rows)
    pairs = [(row["uid"], first + i) for i, row in enumerate(rows)]
    ctx.details["to_uids"] = uid_set([new for _, new in pairs])
    return pairs


async def move_messages(txn: Txn, ctx: RequestContext, rows: list[dict[str, Any]],
                        source_folder_id: int, target_folder_id: int) -> list[tuple[int, int]]:
    """Re-home locked message rows in another folder with new UIDs (RFC 6851), and
    COMMIT: both folder rows (id order), the moves, the source's expunge mark, the audit
    row and the COMMIT in one round trip. Returns (old UID, new UID) pairs."""
    org = _org(ctx)
    if not rows:
        await write_change(txn, ctx)
        return []
    batch = _Batch()
    batch.add(imap_commits.move_messages_sql(org, [row["id"] for row in rows],
                                           source_folder_id, target_folder_id))
    batch.add(imap_commits.notify_sql([source_folder_id, target_folder_id]))
    return await _commit_transfer(txn, ctx, org, batch, rows, target_folder_id)
