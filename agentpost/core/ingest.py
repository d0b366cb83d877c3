"""The single ingest path: every stored message, whichever door it came in by.

MX delivery, IMAP APPEND and SMTP submission (the Sent copy, queued in the same
transaction); API send later. The order is what makes
"nothing lost" true: blobs are written durably first, then one transaction records
the message for every recipient inbox (with its thread, UID, attachments, the
``message.received`` event and an audit row), and only then does the caller acknowledge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import IO, Any

from twisted.internet import defer, threads

from agentpost.core import parse_dispatch
from agentpost.core.audit import audit_row, scrub_row
from agentpost.core.context import RequestContext
from agentpost.core.group_commit import GroupCommit
from agentpost.core.header_limit import check_header_size
from agentpost.core.ingest_analysis import RENDER_VERSION as RENDER_VERSION
from agentpost.core.ingest_analysis import (
    STORE_EXTRACTED_MAX_CHARS as STORE_EXTRACTED_MAX_CHARS,
)
from agentpost.core.ingest_analysis import IMAPRendered
from agentpost.core.ingest_analysis import analyse_indexed as _analyse_indexed
from agentpost.core.ingest_analysis import rendered_columns as rendered_columns
from agentpost.core.known_folders import KnownFolders
from agentpost.mail.parse import ParsedMessage
from agentpost.model.errors import NotFound, StorageFailure
from agentpost.model.ids import new_id
from agentpost.storage import mail as mail_store
from agentpost.storage import threads as thread_store
from agentpost.storage.blobs import BlobRef, BlobStore
from agentpost.storage.blobs.base import is_inline_key
from agentpost.storage.copy_rows import CopyRows, Statements
from agentpost.storage.database import Database, Txn
from agentpost.storage.long_text import blob_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A recipient inbox, resolved (with its tenant) before ingest."""

    org_id: str
    environment_id: str
    inbox_id: str
    email: str


@dataclass(frozen=True)
class Stored:
    """One stored copy of a message."""

    message_id: str
    inbox_id: str
    org_id: str
    thread_id: str
    uid: int
    uidvalidity: int = 0  # of the folder it was stored in (IMAP APPENDUID)
    raw_blob_key: str = ""  # the message's own blob (the outbound queue names it)
    size: int = 0
    modseq: int = 0  # the copy's MODSEQ when its insert reported it (one copy), else 0
    folder_id: int = 0


#: Runs inside the storing transaction, after every copy is written (submission queues
#: the message there, so that "stored" and "queued" commit together or not at all).
Within = Callable[[Txn, list[Stored]], Awaitable[Any]]
#: (sql, params) to send with a copy's message insert (submission: its queue rows).
BeforeInsert = Callable[[Txn, Stored], tuple[str, list[Any]]]


@dataclass(frozen=True)
class _State:
    """Per-delivery options carried into the transaction."""

    flags: frozenset[str]
    labels: tuple[str, ...]
    imap: IMAPRendered
    require_folder: bool
    quota: int = 0  # enforced per inbox (bytes); 0: only counted
    origin: RequestContext | None = None  # who brought the message in (the audit row)
    #: SEARCH/SORT columns (agentpost.mail.searchkeys), derived in the parsing thread.
    index: dict[str, Any] = field(default_factory=dict)
    #: The event written with the copy; None: message.received / message.sent by direction.
    event_type: str | None = None
    #: Statements for one stored copy, sent in the same round trip just before its
    #: message insert (after its blob references: the raw blob's lock is held).
    before_insert: BeforeInsert | None = None




@dataclass(frozen=True)
class BatchItem:
    """One message of :meth:`Ingest.store_batch` (a binary file at offset 0), with the
    IMAP flags, labels and INTERNALDATE it is stored with."""

    message: IO[bytes]
    flags: frozenset[str] = frozenset()
    labels: tuple[str, ...] = ()
    received_at: datetime | None = None


@dataclass(frozen=True)
class _Copy:
    """One copy, staged: its thread, event and audit rows (``before``), its message row
    and attachment rows; ``stored`` has no UID yet."""

    row: dict[str, Any]
    attachments: list[dict[str, Any]]
    before: CopyRows
    stored: Stored


@dataclass(frozen=True)
class Staged:
    """A delivery staged in a shared transaction (core.group_commit): the copies whose
    message rows the batch inserts together, last."""

    copies: list[_Copy]

    def writes(self) -> list[tuple[dict[str, Any], list[dict[str, Any]],
                                   CopyRows | Statements]]:
        """What storage.mail.insert_messages takes."""
        return [(c.row, c.attachments, c.before) for c in self.copies]

    def finish(self, uids: dict[str, int]) -> list[Stored]:
        """The stored copies, given the UIDs written; LookupError if one is missing."""
        out = []
        for c in self.copies:
            if c.stored.message_id not in uids:
                raise LookupError("the folder of a new message vanished")
            out.append(replace(c.stored, uid=uids[c.stored.message_id]))
        return out


@dataclass(eq=False)
class _Delivery:
    """One MX delivery waiting for its batch (core.group_commit.Delivery): what its
    copies ask the batch's one staging statement, then the copies staged from the
    answers. Everything but the message rows, which the batch writes together."""

    ingest: Ingest
    targets: list[Target]
    order: list[int]  # the targets in lock order: the copies are staged in it
    parsed: ParsedMessage
    refs: list[BlobRef]  # the message's own blob, then its attachments'
    blob_bodies: dict[str, bytes | str]
    envelope_from: str | None
    direction: str
    folder: str
    state: _State
    received_at: datetime | None

    def probes(self) -> list[mail_store.DeliveryProbe]:
        """One per copy, in :attr:`order`."""
        parsed = self.parsed
        related = ([parsed.in_reply_to] if parsed.in_reply_to else []) + parsed.references
        blobs = [(ref.key, ref.size) for ref in self.refs]
        inline = _inline_bodies(self.refs, self.blob_bodies)
        return [mail_store.DeliveryProbe(self.targets[i].org_id, self.targets[i].inbox_id,
                                         self.folder, blobs, parsed.message_id, related,
                                         inline)
                for i in self.order]

    def guess(self, probes: list[mail_store.DeliveryProbe]
              ) -> list[mail_store.DeliveryAnswer] | None:
        """The answers to ``probes`` (:meth:`probes`' own) from what the process remembers
        (core.known_folders), for the write to check; None when one must be asked: a
        reply (its thread is looked up), a blob in the store (a new row means checking
        the store), a folder not seen yet."""
        if any(p.related or any(key not in p.inline for key, _ in p.blobs) for p in probes):
            return None
        known = self.ingest.known_folders
        answers = []
        for probe in probes:
            folder = known.get(probe.org_id, probe.inbox_id, probe.folder_name)
            if folder is None:
                return None
            answers.append(mail_store.DeliveryAnswer(folder, None, []))
        return answers

    def forget_guess(self) -> None:
        """The guess did not hold: its folders are asked for next time."""
        for target in self.targets:
            self.ingest.known_folders.forget(target.org_id, target.inbox_id, self.folder)

    async def stage(self, txn: Txn, answers: list[mail_store.DeliveryAnswer]) -> Staged:
        """The copies (in the caller's target order), given :meth:`probes`' answers."""
        new = sorted({key for answer in answers for key in answer.new_blobs})
        if new:
            await self.ingest._recheck_blobs(new, self.refs, self.blob_bodies)
        when = self.received_at or txn.now
        copies: list[_Copy | None] = [None] * len(self.targets)
        for i, answer in zip(self.order, answers, strict=True):
            target = self.targets[i]
            folder = answer.folder
            if folder is None:
                folder = await _missing_folder(txn, target, self.folder, self.state)
            self.ingest.known_folders.remember(target.org_id, target.inbox_id, self.folder,
                                               folder)
            copies[i] = _with_before_insert(txn, self.state, _build_copy(
                txn, target, self.parsed, self.refs[0], self.refs[1:], self.envelope_from,
                self.direction, self.state, when, folder, answer.thread_id,
                answer.starts_thread))
        return Staged([c for c in copies if c is not None])


def _json_safe_headers(parsed: ParsedMessage) -> list[list[str]]:
    return [[k, v] for k, v in parsed.headers[:500]]


def _audit_row(origin: RequestContext | None, target: Target, message_id: str,
               envelope_from: str | None, folder: str, size: int,
               when: datetime) -> dict[str, Any]:
    """The audit row of one stored copy, in the receiving inbox's organization and
    environment. A credential (IMAP APPEND) is the actor; without one (the MX) the
    actor is the remote sender, named by its envelope address."""
    ctx = origin or RequestContext(new_id("req"), None, "ingest.store")
    row = audit_row(ctx, "allowed", 200, when)  # 200: what every accepted change says
    if ctx.principal is None:
        row["actor_type"] = "smtp_sender" if origin is not None else "system"
        row["actor_id"] = (envelope_from or "<>")[:320] if origin is not None else None
    row.update(org_id=target.org_id, environment_id=target.environment_id,
               target_id=message_id)
    row["details"] = {**row["details"], "inbox_id": target.inbox_id, "folder": folder,
                      "size": size}
    scrub_row(row)  # a row PostgreSQL would refuse must not refuse the delivery
    return row


class Ingest:
    """Parse, store blobs, then commit rows for every target in one transaction."""

    def __init__(self, db: Database, blobs: BlobStore, reactor: Any,
                 inbox_quota: int = 0, group_commit: GroupCommit | None = None) -> None:
        self._db = db
        self._blobs = blobs
        self._reactor = reactor
        self.inbox_quota = inbox_quota
        #: Batches ``store(..., group=True)`` transactions ([smtp] group_commit).
        self.group_commit = group_commit
        #: Folders its deliveries went to, so the next can skip the staging round trip.
        self.known_folders = KnownFolders()

    async def store(self, targets: list[Target], message: IO[bytes], *,
                    envelope_from: str | None, direction: str = "inbound",
                    folder: str = "INBOX", flags: frozenset[str] = frozenset(),
                    labels: tuple[str, ...] = (), received_at: datetime | None = None,
                    require_folder: bool = False, enforce_quota: bool = False,
                    origin: RequestContext | None = None,
                    within: Within | None = None,
                    event_type: str | None = None, group: bool = False,
                    before_insert: BeforeInsert | None = None) -> list[Stored]:
        """Store ``message`` (a binary file at offset 0) once per target inbox.

        ``group`` (the MX, submission) lets the transaction share its COMMIT with other deliveries
        arriving at the same moment (core.group_commit), when that is configured; it
        still returns only after the COMMIT.

        ``direction="outbound"`` (a sent copy) announces ``message.sent`` instead of
        ``message.received``; ``event_type`` names another event for copies that were
        neither received nor sent (an IMAP APPEND, a saved draft), so programs that
        react to new mail are not told about them. ``within`` is awaited inside the same
        transaction once every copy is written, with the stored copies: what it writes
        commits with them. ``before_insert`` gives statements for each copy that go in
        the same round trip as its message insert (one round trip fewer than ``within``).

        Each stored copy gets an audit row in the same transaction, described by
        ``origin`` (action, principal or none, client address, request id); without it
        the row says ``ingest.store`` by the system: no copy is ever stored unaudited.

        ``flags`` are IMAP system flags (\\Seen, \\Flagged, ...); ``require_folder`` makes a
        missing folder a NotFound (IMAP APPEND answers [TRYCREATE]) instead of creating
        the system folders. ``enforce_quota`` refuses (MailboxFull, nothing stored) a
        message that would take an inbox past ``inbox_quota``; without it the use is
        only counted (the MX checks fullness at RCPT: one recipient's quota must not
        fail a message for the others).
        """
        raw = message.read()
        check_header_size(raw)
        # The message's own blob is written (and fsynced) in another thread while this
        # one parses: it needs only the bytes, and is durable before the transaction
        # (or, small, it is kept in PostgreSQL and written by the transaction itself).
        raw_put = self._put_raw(raw)
        try:
            parsed, imap, index = await parse_dispatch.analyse(
                self._reactor, _analyse_indexed, raw)
        except BaseException as exc:
            raw_put.addErrback(lambda _failure: None)  # the parse error is the one to report
            if isinstance(exc, OSError):  # spooling a large attachment failed (disk full)
                log.error("ingest: could not spool a message part: %s", exc)
                raise StorageFailure() from exc
            raise
        try:
            state = _State(flags=frozenset(flags), labels=tuple(sorted(set(labels))),
                           imap=imap, require_folder=require_folder,
                           quota=self.inbox_quota if enforce_quota else 0, origin=origin,
                           index=index, event_type=event_type,
                           before_insert=before_insert)
            return await self._store(targets, raw, parsed, envelope_from, direction, folder,
                                     received_at, state, raw_put, within, group)
        finally:
            parsed.discard()

    async def store_batch(self, target: Target, items: list[BatchItem], *, folder: str,
                          direction: str = "inbound", require_folder: bool = False,
                          enforce_quota: bool = False,
                          origin: RequestContext | None = None,
                          event_type: str | None = None) -> list[Stored]:
        """Store every item in one folder of one inbox in ONE transaction: all of them or
        none (IMAP MULTIAPPEND, RFC 3502 §6.3.11), with UIDs allocated in item order.

        The same path as :meth:`store`, message by message: each is parsed in a thread
        and its blobs are written durably before the transaction ("nothing lost"); each
        row gets its audit row and event. With ``enforce_quota`` the quota is checked
        message by message against the inbox's use including the earlier items, so the
        batch is refused whole (MailboxFull) if it would not fit. One transaction for N
        messages is also what makes bulk loading fast; its cost is that the folder's row
        lock, taken by the first insert, is held while the rest are inserted.
        """
        prepared: list[tuple[ParsedMessage, _State, datetime | None,
                             tuple[BlobRef, list[BlobRef], dict[str, bytes | str]]]] = []
        analysed: list[ParsedMessage] = []  # discarded at the end, whatever happens
        try:
            for item in items:
                raw = item.message.read()
                check_header_size(raw)
                try:
                    parsed, imap, index = await threads.deferToThreadPool(
                        self._reactor, self._reactor.getThreadPool(), _analyse_indexed, raw)
                except OSError as exc:
                    log.error("ingest: could not spool a message part: %s", exc)
                    raise StorageFailure() from exc
                state = _State(flags=frozenset(item.flags),
                               labels=tuple(sorted(set(item.labels))), imap=imap,
                               require_folder=require_folder,
                               quota=self.inbox_quota if enforce_quota else 0,
                               origin=origin, index=index, event_type=event_type)
                analysed.append(parsed)
                prepared.append((parsed, state, item.received_at,
                                 await self._put_blobs(raw, parsed)))

            async def txn_fn(txn: Txn) -> list[Stored]:
                out: list[Stored] = []
                for parsed, state, received_at, (raw_ref, att_refs, bodies) in prepared:
                    out.append(await self._store_one(
                        txn, target, parsed, raw_ref, att_refs, bodies, None, direction,
                        folder, state, received_at or txn.now))
                return out

            return await self._db.run_interaction("ingest.store_batch", txn_fn,
                                                  unlock_before_flush=True)
        finally:
            for parsed in analysed:
                parsed.discard()

    async def _put_blobs(self, raw: bytes, parsed: ParsedMessage,
                         raw_put: defer.Deferred[BlobRef] | None = None
                         ) -> tuple[BlobRef, list[BlobRef], dict[str, bytes | str]]:
        """Write the message and its attachments durably, before any row names them
        (``raw_put``: the message's own put, already started)."""
        raw_ref = await (raw_put if raw_put is not None else self._put_raw(raw))
        if is_inline_key(raw_ref.key):  # a body that is the bytes' tail is not sent twice
            parsed.text_body = blob_text(parsed.text_body, raw, raw_ref.key)
            parsed.html_body = blob_text(parsed.html_body, raw, raw_ref.key)
        att_refs: list[BlobRef] = []
        blob_bodies: dict[str, bytes | str] = {raw_ref.key: raw}
        for att in parsed.attachments:
            if att.content is not None:
                ref = await self._blobs.put_bytes(att.content, content_type=att.mime_type)
                blob_bodies[ref.key] = att.content
            else:  # a large part, decoded to a spool file
                assert att.path is not None
                ref = await self._blobs.put_file(att.path, content_type=att.mime_type)
                blob_bodies[ref.key] = att.path
            att_refs.append(ref)
        return raw_ref, att_refs, blob_bodies

    async def _store(self, targets: list[Target], raw: bytes, parsed: ParsedMessage,
                     envelope_from: str | None, direction: str, folder: str,
                     received_at: datetime | None, state: _State,
                     raw_put: defer.Deferred[BlobRef] | None = None,
                     within: Within | None = None, group: bool = False) -> list[Stored]:
        raw_ref, att_refs, blob_bodies = await self._put_blobs(raw, parsed, raw_put)

        # Rows are locked in inbox order, so two deliveries to the same recipients in a
        # different RCPT order cannot deadlock; results come back in the caller's order.
        order = sorted(range(len(targets)), key=lambda i: (targets[i].org_id,
                                                           targets[i].inbox_id))

        async def txn_fn(txn: Txn) -> list[Stored]:
            when = received_at or txn.now
            out: list[Stored | None] = [None] * len(targets)
            for i in order:  # one copy and nothing after it: its insert commits too
                out[i] = await self._store_one(txn, targets[i], parsed, raw_ref, att_refs,
                                               blob_bodies, envelope_from, direction, folder,
                                               state, when, len(order) == 1 and not within)
            if within is not None:
                await within(txn, out)  # type: ignore[arg-type]
            return out  # type: ignore[return-value]

        if group and self.group_commit is not None and targets and within is None \
                and not state.quota:
            first = targets[order[0]]
            stored: list[Stored] = await self.group_commit.run(
                (first.org_id, first.inbox_id),
                _Delivery(self, targets, order, parsed, [raw_ref, *att_refs], blob_bodies,
                          envelope_from, direction, folder, state, received_at))
            return stored
        # The folder's UID row is held from the last insert to COMMIT: released before
        # the WAL flush, the next delivery to the folder need not queue behind our fsync.
        return await self._db.run_interaction("ingest.store", txn_fn, unlock_before_flush=True)

    def _put_raw(self, raw: bytes) -> defer.Deferred[BlobRef]:
        """The message's own blob: kept inline (storage.blobs.inline) when the store
        offers it and the message is small, else put in the store."""
        inline_ref = getattr(self._blobs, "inline_ref", None)
        ref = inline_ref(raw) if inline_ref is not None else None
        if ref is not None:
            return defer.succeed(ref)
        return defer.ensureDeferred(self._blobs.put_bytes(raw, content_type="message/rfc822"))

    async def _recheck_blobs(self, new_keys: list[str], refs: list[BlobRef],
                             blob_bodies: dict[str, bytes | str]) -> None:
        """Blob rows that are new in this transaction: make sure their objects survived
        a collector that ran between our put and our reference (its lock pairs with
        the reference's, so after it nothing can remove them)."""
        by_key = {ref.key: ref for ref in refs}
        for key in new_keys:
            if is_inline_key(key):  # its row, new in this transaction, holds the bytes
                continue
            if not await self._blobs.exists(key):
                body = blob_bodies[key]
                again = await (self._blobs.put_bytes(body) if isinstance(body, bytes)
                               else self._blobs.put_file(body))
                if again.key != by_key[key].key:
                    raise StorageFailure()

    async def _folder_and_thread(self, txn: Txn, target: Target, parsed: ParsedMessage,
                                 raw_ref: BlobRef, att_refs: list[BlobRef],
                                 blob_bodies: dict[str, bytes | str], folder_name: str,
                                 state: _State) -> tuple[dict[str, Any], str | None]:
        """Blob references, the folder and the thread to join (None: a new one), in one
        round trip (storage.mail.prepare_delivery)."""
        org = target.org_id
        related = ([parsed.in_reply_to] if parsed.in_reply_to else []) + parsed.references
        thread_sql: tuple[str, list[Any]] = ("NULL::text", [])
        if related or parsed.message_id:
            thread_sql = thread_store.find_thread_sql(org, target.inbox_id, parsed.message_id,
                                                      related)
        refs = [raw_ref, *att_refs]
        prep = await mail_store.prepare_delivery(
            txn, org_id=org, inbox_id=target.inbox_id, folder_name=folder_name,
            blobs=[(ref.key, ref.size) for ref in refs], thread=thread_sql,
            inline=_inline_bodies(refs, blob_bodies))
        await self._recheck_blobs(prep["new_blobs"] or [], refs, blob_bodies)
        folder = prep["folder"]
        if folder is None:
            folder = await _missing_folder(txn, target, folder_name, state)
        return folder, prep["thread_id"]

    async def _store_one(self, txn: Txn, target: Target, parsed: ParsedMessage,
                         raw_ref: BlobRef, att_refs: list[BlobRef],
                         blob_bodies: dict[str, bytes | str], envelope_from: str | None,
                         direction: str, folder_name: str, state: _State,
                         when: datetime, commit: bool = False) -> Stored:
        """One copy in two round trips: :meth:`_stage_copy`, then the thread, event,
        audit row, message, references, attachments and usage delta together, the
        folder's UID lock taken by the last statement (held only to COMMIT, which
        ``commit`` sends in the same round trip)."""
        copy = _with_before_insert(txn, state, await self._stage_copy(
            txn, target, parsed, raw_ref, att_refs, blob_bodies, envelope_from, direction,
            folder_name, state, when))
        uid, modseq = await mail_store.insert_message(txn, copy.row, quota=state.quota,
                                                      attachments=copy.attachments,
                                                      before=copy.before.sql(),
                                                      commit=commit)
        return replace(copy.stored, uid=uid, modseq=modseq)

    async def _stage_copy(self, txn: Txn, target: Target, parsed: ParsedMessage,
                          raw_ref: BlobRef, att_refs: list[BlobRef],
                          blob_bodies: dict[str, bytes | str], envelope_from: str | None,
                          direction: str, folder_name: str, state: _State,
                          when: datetime) -> _Copy:
        """One round trip (:meth:`_folder_and_thread`), then what is left to write."""
        folder, thread_id = await self._folder_and_thread(
            txn, target, parsed, raw_ref, att_refs, blob_bodies, folder_name, state)
        return _build_copy(txn, target, parsed, raw_ref, att_refs, envelope_from, direction,
                           state, when, folder, thread_id)


def _inline_bodies(refs: list[BlobRef], bodies: dict[str, bytes | str]) -> dict[str, bytes]:
    """The bytes of the blobs kept in PostgreSQL, which their blob row must carry."""
    return {ref.key: body for ref in refs
            if is_inline_key(ref.key) and isinstance(body := bodies[ref.key], bytes)}


def _with_before_insert(txn: Txn, state: _State, copy: _Copy) -> _Copy:
    """Plus ``before_insert``'s statements (alone or batched: they commit with it)."""
    extra = state.before_insert(txn, copy.stored) if state.before_insert else ("", [])
    return replace(copy, before=copy.before.plus(extra)) if extra[0] else copy


async def _missing_folder(txn: Txn, target: Target, folder_name: str,
                          state: _State) -> dict[str, Any]:
    """A delivery's folder that was not there: the system folders are created (an
    inbox without them), unless the caller requires the folder (IMAP APPEND)."""
    folder = None
    if not state.require_folder:
        await mail_store.create_system_folders(txn, target.org_id, target.environment_id,
                                               target.inbox_id)
        folder = await mail_store.folder_by_name(txn, target.org_id, target.inbox_id,
                                                 folder_name)
    if folder is None:  # required and missing, or not a system folder
        raise NotFound("No such folder.")
    return folder


def _build_copy(txn: Txn, target: Target, parsed: ParsedMessage, raw_ref: BlobRef,
                att_refs: list[BlobRef], envelope_from: str | None, direction: str,
                state: _State, when: datetime, folder: dict[str, Any],
                thread_id: str | None, starts_thread: bool = False) -> _Copy:
    """A copy's rows and statements, once its folder and thread (None, or one it starts:
    a new one) are known (no round trip)."""
    org = target.org_id
    recipients = parsed.to_addresses + parsed.cc_addresses
    new_thread: dict[str, Any] | None = None
    thread_update: Statements = ("", [])
    if thread_id is None or starts_thread:
        thread_id = thread_id or new_id("thr")
        new_thread = {"org_id": org, "id": thread_id, "environment_id": target.environment_id,
                      "inbox_id": target.inbox_id, "subject": parsed.subject,
                      "received_at": when, "from_address": parsed.from_address,
                      "recipients": recipients, "labels": list(state.labels)}
    else:
        thread_update = thread_store.add_to_thread_sql(
            org, thread_id, received_at=when, from_address=parsed.from_address,
            recipients=recipients, labels=list(state.labels), now=txn.now)
    message_id = new_id("msg")
    rows = CopyRows(txn.now, {
        "org_id": org, "id": new_id("evt"), "environment_id": target.environment_id,
        "inbox_id": target.inbox_id,
        "type": state.event_type or (
            "message.sent" if direction == "outbound" else "message.received"),
        "data": {"message_id": message_id, "inbox_id": target.inbox_id,
                 "thread_id": thread_id, "subject": parsed.subject,
                 "from": parsed.from_address,
                 "received_at": when.astimezone(UTC).isoformat()}},
        (_audit_row(state.origin, target, message_id, envelope_from, folder["name"],
                    raw_ref.size, txn.now),), new_thread, thread_update)
    attachments = [{
        "org_id": org, "id": new_id("att"), "filename": att.filename,
        "mime_type": att.mime_type, "size": ref.size, "content_id": att.content_id,
        "disposition": att.disposition, "sha256": ref.sha256, "blob_key": ref.key,
        "part_index": att.part_index,
    } for att, ref in zip(parsed.attachments, att_refs, strict=True)]
    return _Copy(
        _message_row(target, parsed, state, message_id, thread_id, folder["id"],
                     direction, raw_ref, bool(att_refs), envelope_from, when, txn.now),
        attachments, rows,
        Stored(message_id, target.inbox_id, org, thread_id, 0, folder["uidvalidity"],
               raw_ref.key, raw_ref.size, folder_id=folder["id"]))


def _message_row(target: Target, parsed: ParsedMessage, state: _State, message_id: str,
                 thread_id: str, folder_id: int, direction: str, raw_ref: BlobRef,
                 has_attachments: bool, envelope_from: str | None, when: datetime,
                 now: datetime) -> dict[str, Any]:
    """The ``messages`` row of one stored copy."""
    return {
        "org_id": target.org_id, "id": message_id, "environment_id": target.environment_id,
        "inbox_id": target.inbox_id, "thread_id": thread_id, "folder_id": folder_id,
        "direction": direction,
        "message_id_header": parsed.message_id, "in_reply_to": parsed.in_reply_to,
        "reference_ids": parsed.references, "subject": parsed.subject,
        "from_address": parsed.from_address, "to_addresses": parsed.to_addresses,
        "cc_addresses": parsed.cc_addresses, "bcc_addresses": parsed.bcc_addresses,
        "reply_to": parsed.reply_to, "sent_at": parsed.sent_at, "received_at": when,
        "headers": _json_safe_headers(parsed), "text_body": parsed.text_body,
        "html_body": parsed.html_body,
        # None when it is the whole body: reads compute it from the body (storage.mail).
        "extracted_text": (None if parsed.text_body is not None
                           and parsed.extracted_text is not None
                           and len(parsed.extracted_text) <= len(parsed.text_body)
                           and parsed.extracted_text
                           == mail_store.whole_body_text(parsed.text_body)
                           else parsed.extracted_text),
        "preview": parsed.preview, "size": raw_ref.size, "raw_blob_key": raw_ref.key,
        "has_attachments": has_attachments, "seen": "\\Seen" in state.flags,
        "flagged": "\\Flagged" in state.flags, "answered": "\\Answered" in state.flags,
        "draft": "\\Draft" in state.flags, "deleted": "\\Deleted" in state.flags,
        "labels": list(state.labels), "imap_envelope": state.imap[0],
        "imap_bodystructure": state.imap[1], "imap_body": state.imap[2],
        "imap_sections": state.imap[3], "render_version": RENDER_VERSION,
        "envelope_from": envelope_from, "envelope_to": [target.email],
        "created_at": now, **state.index,
    }
