"""The IMAP backend's message side: what a session does to the messages of a folder.

Split from :mod:`agentpost.core.imap_accounts` (the inbox and its mailboxes: listing,
subscriptions, CREATE/DELETE/RENAME, SELECT, STATUS) by job: everything here reads or
changes messages -- FETCH's rows and bytes, STORE, COPY/MOVE, EXPUNGE, APPEND, SEARCH,
THREAD and change detection. Changes go through core.mail_changes (the implementation
the API uses) and core.ingest (APPEND), which write one audit row per command in the
command's transaction.

:class:`MessageOps` also holds what both halves share (the session's principal, the
inbox, the audit context, folder lookups by name and id); :class:`InboxFolder` is the
handle SELECT gives the protocol, so folder ids and blob keys stay on this side.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import IO, Any

from twisted.internet import defer

from agentpost.core import mail_changes
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.context import RequestContext
from agentpost.core.imap_flags import (
    appended_meta,
    end_unchanged,
    message_meta,
    new_flag_columns,
    split_flags,
)
from agentpost.core.imap_poll import FolderMirrors, mirrors_for
from agentpost.core.imap_spellings import (  # noqa: F401 - RecordedSpellings re-exported
    RECORDED_SPELLINGS,
    RecordedSpellings,
    Spellings,
    spellings_in,
    spellings_read,
)
from agentpost.core.ingest import BatchItem, Ingest, Target
from agentpost.imap.interfaces import (
    AppendMessage,
    Changes,
    FetchRow,
    FetchWants,
    MessageMeta,
    SearchKey,
    ThreadFields,
)
from agentpost.mail.keywords import fold as kw_fold
from agentpost.model.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
)
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.storage import imap as imap_store
from agentpost.storage import imap_commits
from agentpost.storage import keywords as keyword_store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database, Txn
from agentpost.storage.notify import Notifier

log = logging.getLogger(__name__)

#: An audit row of a command over many messages names this many of them by id (the
#: UID set and the count name them all).
_AUDIT_MAX_IDS = 100
#: The event an APPENDed copy writes: a client filing a message is not mail received
#: (webhooks for message.received must not fire for a client's own uploads).
APPENDED = "message.appended"


def _in_zone(received_at: datetime | None, zone: int | None) -> datetime | None:
    """The internal date in the zone its APPEND gave (minutes east; None: +0000), so
    FETCH INTERNALDATE answers with the date-time the client stored (issue 10)."""
    if received_at is None:
        return None
    return received_at.astimezone(timezone(timedelta(minutes=zone or 0)))


def _describe(ctx: RequestContext, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Point a command's audit row at what it changed: the message when it is one, else
    the inbox, with the count, the UID set and (up to a limit) the message ids."""
    ids = [r["id"] for r in rows]
    ctx.target_id = ids[0] if len(ids) == 1 else ctx.details["inbox_id"]
    ctx.details.update(count=len(ids), uids=mail_changes.uid_set([r["uid"] for r in rows]),
                       message_ids=ids[:_AUDIT_MAX_IDS], **extra)


#: What STORE's transaction gives back: the messages' new state, the UIDs UNCHANGEDSINCE
#: refused, and (the folder's new MODSEQ, the changed messages) when it changed any.
_Stored = tuple[list[MessageMeta], list[int], tuple[int, list[MessageMeta]] | None]


class MessageOps:
    """The message operations of one inbox seen through IMAP, and the state the
    mailbox operations (:class:`agentpost.core.imap_accounts.InboxAccount`) share."""

    def __init__(self, principal: Principal, inbox: dict[str, Any], db: Database,
                 blobs: BlobStore, ingest: Ingest, collector: BlobCollector,
                 notifier: Notifier | None, quota: int = 0, *,
                 remote_addr: str | None = None) -> None:
        self.principal = principal
        self.remote_addr = remote_addr  # the client, for the audit rows of its commands
        self.inbox = inbox
        self.address = inbox["email"]
        self.can_write = "messages:write" in principal.scopes
        self._org = principal.org_id
        self._inbox_id = inbox["id"]
        self._spell_key = (self._org, self._inbox_id)  # RECORDED_SPELLINGS
        self._db = db
        self._blobs = blobs
        self._ingest = ingest
        self._collector = collector
        self._notifier = notifier
        # one change poll per folder for every session of the process (core.imap_poll)
        self._mirrors: FolderMirrors | None = (None if notifier is None
                                               else mirrors_for(notifier))
        self.quota_limit = quota

    def _touched(self, *folder_ids: int, names: tuple[str, ...] = ()) -> None:
        """This session wrote to the inbox (to these folders, by id or name; none given:
        anywhere): the process's mirrors of them catch up before they answer again."""
        if self._mirrors is not None:
            self._mirrors.touched(self._org, self._inbox_id, folder_ids, names)

    async def _spellings(self, rows: Iterable[dict[str, Any]]) -> Spellings:
        """How to show the keywords of rows a one-statement read returned
        (core.imap_spellings: from the process's cache, or one read for the keywords
        it does not know yet)."""
        return await spellings_read(self._db, self._spell_key, rows)

    def _writable(self) -> None:
        if not self.can_write:
            raise Forbidden("This key lacks messages:write.", missing_scope="messages:write")

    def _ctx(self, action: str, **details: Any) -> RequestContext:
        """A fresh audit context for one command, with the session's principal as it is
        now; the target is the inbox until the command narrows it to one message."""
        return RequestContext(new_id("req"), self.remote_addr, action,
                              principal=self.principal,
                              environment_id=self.inbox["environment_id"],
                              target_id=self._inbox_id,
                              details={"inbox_id": self._inbox_id, **details})

    async def _folder(self, txn: Txn, name: str, *, for_update: bool = False) -> dict[str, Any]:
        folder = await imap_store.get_folder(txn, self._org, self._inbox_id, name,
                                             for_update=for_update)
        if folder is None:
            raise NotFound("No such folder.")
        return folder

    async def _lock(self, txn: Txn, folder_id: int, uids: list[int] | None, *,
                    deleted_only: bool = False,
                    before: tuple[str, list[Any]] = ("", []),
                    extra: tuple[str, list[Any]] = ("NULL::text[]", []),
                    ) -> tuple[list[dict[str, Any]], Any]:
        """The messages a write changes, locked, with the folder check (NotFound when it
        was deleted meanwhile) in the same round trip (imap_store.lock_messages)."""
        found = await imap_store.lock_messages(txn, self._org, self._inbox_id, folder_id,
                                               uids, deleted_only=deleted_only,
                                               before=before, extra=extra)
        if found is None:
            raise NotFound("The folder no longer exists.")
        return found

    async def _folder_id(self, txn: Txn, folder_id: int) -> dict[str, Any]:
        folder = await imap_store.get_folder_by_id(txn, self._org, self._inbox_id, folder_id)
        if folder is None:
            raise NotFound("The folder no longer exists.")
        return folder

    # Messages -------------------------------------------------------------------------

    async def _fetch(self, folder_id: int, uids: list[int], wants: FetchWants) -> list[FetchRow]:
        """Only the columns the FETCH needs (FLAGS alone never reads bodies)."""
        columns = []
        if wants.internaldate:
            columns += ["received_at", "internal_date_zone"]
        if wants.size:
            columns.append("size")
        if wants.envelope:
            columns.append("imap_envelope")
        if wants.bodystructure:
            columns += ["imap_bodystructure", "imap_body"]
        if wants.content:
            columns += ["raw_blob_key", "imap_sections"]
            if not wants.size:
                columns.append("size")
        rows = await self._db.run_read("imap.fetch", imap_store.fetch_rows, self._org,
                                       folder_id, uids, columns)
        spellings = await self._spellings(rows)
        return [FetchRow(uid=r["uid"], modseq=r["modseq"],
                         flags=imap_store.flags_of(r, spellings),
                         internaldate=_in_zone(r.get("received_at"),
                                               r.get("internal_date_zone")),
                         size=r.get("size"),
                         envelope=r.get("imap_envelope"),
                         bodystructure=r.get("imap_bodystructure"), body=r.get("imap_body"),
                         sections=r.get("imap_sections"), blob_ref=r.get("raw_blob_key"))
                for r in rows]

    async def _claim_recent(self, folder_id: int, up_to_uid: int, claim: bool,
                            mark: int | None = None) -> int:
        """\\Recent bookkeeping in the folder row, shared by every process.

        Most calls have nothing to claim (every session polling after one APPEND sees
        the same new UIDs; one of them claims them): they read the mark without a lock,
        so a poll never queues behind a writer holding the folder row -- or take
        ``mark`` as the poll that found the new UIDs read it (it only rises, so an
        older reading can only send us to the locked claim, which has the truth)."""
        if mark is None:
            mark = await self._db.run_read("imap.recent", imap_store.recent_mark,
                                           self._org, folder_id)
        if not claim or mark >= up_to_uid:
            return mark
        # One message without BEGIN: the folder row is released by the implicit COMMIT
        # that ends it, not a round trip later.
        return await self._db.run_read("imap.recent", imap_store.claim_recent,
                                       self._org, folder_id, up_to_uid)

    async def _read_message(self, folder_id: int, row: FetchRow) -> bytes:
        """A fetched message: by the key this account's own (org-scoped) FETCH returned,
        else looked up by UID."""
        if row.blob_ref is not None:
            return await self._blobs.get_bytes(row.blob_ref)
        return await self._fetch_raw(folder_id, row.uid)

    async def _read_range(self, row: FetchRow, start: int, length: int) -> bytes:
        """Part of a message whose key came from this account's own (org-scoped) FETCH."""
        if row.blob_ref is None:
            raise InvalidRequest("The message was fetched without its content.")
        return await self._blobs.get_range(row.blob_ref, start, length)

    async def _fetch_raw(self, folder_id: int, uid: int) -> bytes:
        """The stored bytes, exactly."""
        rows = await self._db.run_read("imap.fetch_raw", imap_store.message_ids_for_uids,
                                       self._org, folder_id, [uid])
        if not rows:
            raise NotFound("The message was expunged.")
        return await self._blobs.get_bytes(rows[0]["raw_blob_key"])

    async def _store(self, action: str, folder_id: int, uids: list[int], mode: str,
                     flags: frozenset[str], unchangedsince: int | None
                     ) -> tuple[list[MessageMeta], list[int]]:
        """The flag change the API's read-state and label changes make too
        (mail_changes.change_flags), audited as ``action`` when it changes anything."""
        self._writable()
        system, keywords = split_flags(flags)
        system &= set(imap_store.SYSTEM_FLAGS)  # \Recent and others cannot be stored
        ctx = self._ctx(action, folder_id=folder_id, mode=mode,
                        flags=sorted(system) + keywords)
        known = RECORDED_SPELLINGS.lookup(self._spell_key, keywords)

        async def txn_fn(txn: Txn) -> _Stored:
            spellings = known
            if spellings is not None:  # every keyword's spelling already recorded
                rows, _ = await self._lock(txn, folder_id, uids)
            else:  # one round trip: first-seen spellings, the folder check, the rows
                remember = keyword_store.remember_sql(self._org, self._inbox_id, flags,
                                                      txn.now)
                rows, spelled = await self._lock(
                    txn, folder_id, uids, before=remember,
                    extra=keyword_store.spellings_of_sql(self._org, self._inbox_id, flags))
                spellings = {kw_fold(s): s for s in spelled or ()}
                txn.after_commit(RECORDED_SPELLINGS.learn, self._spell_key, spellings)
            # the rows' keywords and the ones stored now, as the inbox spells them
            shown = await spellings_in(txn, self._spell_key, rows, spellings)
            failed = [r["uid"] for r in rows
                      if unchangedsince is not None and r["modseq"] > unchangedsince]
            kept = [(row, new_flag_columns(row, mode, system, keywords))
                    for row in rows if row["uid"] not in failed]
            changes = [(row, columns) for row, columns in kept if columns]
            if not changes:
                if known is not None:
                    await end_unchanged(txn)
                return [message_meta(row, shown) for row, _ in kept], failed, None
            _describe(ctx, [row for row, _ in changes])
            modseqs = await mail_changes.change_flags(txn, ctx, changes, commit=True)
            out = [message_meta({**row, **columns, "modseq": modseqs[row["id"]]}, shown)
                   if columns else message_meta(row, shown) for row, columns in kept]
            modseq = modseqs[changes[0][0]["id"]]  # one folder: one new MODSEQ
            return out, failed, (modseq, [m for m, (_, columns) in zip(out, kept,
                                                                      strict=True)
                                          if columns])

        mirror = None if self._mirrors is None else \
            self._mirrors.loaded(self._org, self._inbox_id, folder_id)
        mark = None if mirror is None else mirror.mark()
        held = False
        try:
            out, failed, written = await self._db.run_interaction("imap.store", txn_fn)
            held = written is None or (mirror is not None and mark is not None
                                       and mirror.wrote(mark, *written))
            return out, failed
        finally:
            if not held:
                self._touched(folder_id)

    async def _remember(self, keywords: list[str], flags: frozenset[str]) -> None:
        """APPEND's keywords get their first-seen spelling recorded: one statement
        committed on its own, before ingest's transaction -- and none when this process
        already knows every one of them is recorded (RECORDED_SPELLINGS)."""
        if not keywords or RECORDED_SPELLINGS.lookup(self._spell_key, keywords) is not None:
            return
        found = await self._db.run_read("imap.keywords", keyword_store.remember,
                                        self._org, self._inbox_id, flags)
        RECORDED_SPELLINGS.learn(self._spell_key, found)

    async def append(self, folder: str, message: bytes | IO[bytes], flags: frozenset[str],
                     internaldate: datetime | None) -> tuple[int, int]:
        """APPEND through the single ingest path."""
        self._writable()
        system, keywords = split_flags(flags)
        mail_changes.check_keyword_caps(keywords)  # the caps STORE and the API keep too
        await self._remember(keywords, flags)
        target = Target(self._org, self.inbox["environment_id"], self._inbox_id, self.address)

        # RFC 3501: INBOX is case-insensitive; every other name is exact (ingest matches
        # names exactly and answers NotFound -> [TRYCREATE] for a missing one).
        name = "INBOX" if folder.upper() == "INBOX" else folder
        mirror = None if self._mirrors is None else \
            self._mirrors.by_name(self._org, self._inbox_id, name)
        mark = None if mirror is None else mirror.mark()
        [stored] = await self._ingest.store(
            [target], io.BytesIO(message) if isinstance(message, bytes) else message,
            envelope_from=None, folder=name,
            flags=frozenset(system), labels=tuple(keywords), received_at=internaldate,
            require_folder=True, direction="inbound", enforce_quota=True,
            origin=self._ctx("imap.append", folder=name), event_type=APPENDED)
        # The process's mirror of the folder takes the new message as it is (no
        # catch-up query for the sessions that have it selected), as after a STORE.
        spellings = RECORDED_SPELLINGS.lookup(self._spell_key, keywords)
        # (by_name is the folder SELECT last found under this name: the id must match)
        if mirror is None or mark is None or spellings is None or not stored.modseq \
                or stored.folder_id != mirror.folder_id \
                or not mirror.appended(mark, appended_meta(stored.uid, stored.modseq,
                                                           system, keywords, spellings)):
            self._touched(names=(name,))
        return stored.uidvalidity, stored.uid

    async def append_many(self, folder: str, messages: list[AppendMessage]
                          ) -> tuple[int, list[int]]:
        """MULTIAPPEND (RFC 3502) through the single ingest path, in one transaction:
        every message or none (a bad one, or the quota, refuses them all)."""
        self._writable()
        items: list[BatchItem] = []
        all_flags: set[str] = set()
        all_keywords: set[str] = set()
        for msg in messages:
            system, keywords = split_flags(msg.flags)
            mail_changes.check_keyword_caps(keywords)
            all_flags |= msg.flags
            all_keywords.update(keywords)
            body = msg.message
            items.append(BatchItem(io.BytesIO(body) if isinstance(body, bytes) else body,
                                   frozenset(system), tuple(keywords), msg.internaldate))
        await self._remember(sorted(all_keywords), frozenset(all_flags))
        target = Target(self._org, self.inbox["environment_id"], self._inbox_id, self.address)
        name = "INBOX" if folder.upper() == "INBOX" else folder
        stored = await self._ingest.store_batch(
            target, items, folder=name, require_folder=True, direction="inbound",
            enforce_quota=True, origin=self._ctx("imap.append", folder=name,
                                                 count=len(items)), event_type=APPENDED)
        self._touched(names=(name,))
        return (stored[0].uidvalidity if stored else 0), [s.uid for s in stored]

    async def _transfer(self, folder_id: int, uids: list[int], dest: str,
                        move: bool) -> tuple[int, list[tuple[int, int]]]:
        self._writable()
        ctx = self._ctx("imap.move" if move else "imap.copy", folder_id=folder_id,
                        to_folder=dest)

        written = [folder_id]
        target_of = imap_commits.target_folder_sql(self._org, self._inbox_id, dest)

        async def txn_fn(txn: Txn) -> tuple[int, list[tuple[int, int]]]:
            # The source rows locked and the destination found in one round trip.
            rows, target = await self._lock(txn, folder_id, uids, extra=target_of)
            if target is None:
                raise NotFound("No such folder.")
            written[1:] = [target["id"]]
            if not rows:  # nothing changes, nothing to audit
                return target["uidvalidity"], []
            _describe(ctx, rows, to_folder_id=target["id"])
            if move:
                pairs = await mail_changes.move_messages(txn, ctx, rows, folder_id,
                                                         target["id"])
            else:
                pairs = await mail_changes.copy_messages(txn, ctx, rows, target["id"],
                                                         self.quota_limit)
            return target["uidvalidity"], pairs

        try:
            return await self._db.run_interaction("imap.move" if move else "imap.copy",
                                                  txn_fn)
        finally:
            if len(written) > 1:  # both folders, else (no target found) anywhere
                self._touched(*written)
            else:
                self._touched()


    async def _delete_uids(self, txn: Txn, ctx: RequestContext, folder_id: int,
                           uids: list[int]) -> list[str]:
        """The API's deletion (mail_changes.delete_messages), audited as ``ctx``, in a
        transaction that goes on after it (folder deletion)."""
        rows = await imap_store.message_ids_for_uids(txn, self._org, folder_id, uids,
                                                     for_update=True)
        _describe(ctx, rows)
        return await mail_changes.delete_messages(txn, ctx, rows)

    async def _may_expunge(self, folder_id: int, uids: list[int] | None) -> bool:
        """Whether EXPUNGE may find \\Deleted messages. Most find none (98 % of the
        mixed load's UID EXPUNGEs): a locked transaction then cost two round trips
        (BEGIN with the locking read, COMMIT) where one unlocked read tells. Asked only
        when the folder's mirror shows none (else the locked transaction is likely
        needed); the read is as good a moment to answer "nothing" as any."""
        mirror = None if self._mirrors is None else \
            self._mirrors.loaded(self._org, self._inbox_id, folder_id)
        if mirror is None or mirror.any_flagged("\\Deleted", uids):
            return True
        found = await self._db.run_read("imap.expunge", imap_store.deleted_uids, self._org,
                                        self._inbox_id, folder_id, uids)
        if found is None:
            raise NotFound("The folder no longer exists.")
        return bool(found)

    async def _expunge(self, folder_id: int, uids: list[int] | None) -> list[int]:
        """Remove \\Deleted messages; the stored bytes go when nothing else uses them."""
        self._writable()
        if not await self._may_expunge(folder_id, uids):
            return []
        freed: list[str] = []
        ctx = self._ctx("imap.expunge", folder_id=folder_id)

        async def txn_fn(txn: Txn) -> tuple[list[int], int | None]:
            # The \\Deleted rows locked (re-checked once locked) with the folder check.
            rows, _ = await self._lock(txn, folder_id, uids, deleted_only=True)
            if not rows:  # an EXPUNGE that removes nothing changes nothing: no audit row
                return [], None
            # The API's deletion; its last round trip gives the folder its new MODSEQ
            # and commits.
            _describe(ctx, rows)
            freed[:], modseq = await mail_changes.expunge_folder(txn, ctx, rows, folder_id)
            return [row["uid"] for row in rows], modseq

        mirror = None if self._mirrors is None else \
            self._mirrors.loaded(self._org, self._inbox_id, folder_id)
        mark = None if mirror is None else mirror.mark()
        held = False
        try:
            expunged, modseq = await self._db.run_interaction("imap.expunge", txn_fn)
            # The process's mirror takes the expunge as it is (no catch-up query after
            # it for every session of the folder here), as after a STORE.
            held = modseq is None or (mirror is not None and mark is not None
                                      and mirror.expunged(mark, modseq, expunged))
        finally:
            if not held:
                self._touched(folder_id)
        if freed:  # after COMMIT; the answer need not wait for the files to go
            collecting = defer.ensureDeferred(self._collector.collect(freed))
            collecting.addErrback(lambda failure: log.warning(
                "imap.expunge: blob collection failed: %s", failure.getErrorMessage()))
        return expunged

    async def _search(self, folder_id: int, key: SearchKey,
                     sort: list[tuple[str, bool]] | None = None) -> list[int]:
        """SEARCH (and SORT) translated to SQL."""
        try:
            return await self._db.run_read("imap.search", imap_store.search, self._org,
                                           folder_id, key, sort)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    async def _thread_fields(self, folder_id: int, key: SearchKey) -> list[ThreadFields]:
        """THREAD's inputs for the messages matching ``key`` (org- and folder-scoped)."""
        try:
            rows = await self._db.run_read("imap.thread", imap_store.thread_fields,
                                           self._org, folder_id, key)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return [ThreadFields(uid=r["uid"], message_id=r["message_id_header"],
                             references=tuple(r["reference_ids"] or ()),
                             in_reply_to=r["in_reply_to"], subject=r["subject"] or "",
                             sent_at=r["sent_at"], internaldate=r["received_at"])
                for r in rows]

    async def _changes(self, folder_id: int, known_uids: list[int], since_modseq: int,
                       fresh: bool) -> tuple[Changes, int | None]:
        """What other sessions, the API or delivery changed since the session looked:
        from the process's mirror of the folder when there is a LISTEN link (one poll
        per folder, core.imap_poll), else with a query of the session's own."""
        if self._mirrors is not None:
            mirror = self._mirrors.get(self._org, self._inbox_id, folder_id)
            # A mirror older than the session's view (it selected after a change the
            # mirror has not heard of yet) catches up first: it could not tell what
            # left the folder since.
            await mirror.current(self._db, fresh or mirror.highestmodseq < since_modseq)
            return mirror.changes(known_uids, since_modseq), mirror.recent_uid

        found = await self._db.run_read("imap.changes", imap_store.changes, self._org,
                                        folder_id, max(known_uids, default=0), known_uids,
                                        since_modseq)
        present = found["present"]
        shown = await self._spellings(found["new"] + found["changed"])
        return Changes(new=[message_meta(r, shown) for r in found["new"]],
                       changed=[message_meta(r, shown) for r in found["changed"]],
                       expunged=[] if present is None else
                       [u for u in known_uids if u not in present],
                       highestmodseq=found["highestmodseq"] or since_modseq
                       ), found["recent_uid"]

    def _watch(self, folder_id: int, callback: Callable[[], None]) -> Callable[[], None]:
        """Wake-ups for this folder from every process (LISTEN/NOTIFY), through the
        folder's mirror: it hears of a change before any session it wakes."""
        if self._mirrors is not None:
            return self._mirrors.watch(self._org, self._inbox_id, folder_id, callback)
        if self._notifier is None:
            return lambda: None
        return self._notifier.watch(str(folder_id), callback)


class InboxFolder:
    """One folder of an inbox, bound at SELECT/EXAMINE (implements
    agentpost.imap.interfaces.IMAPFolder): the account's folder operations with the
    folder id filled in, so the protocol never holds it."""

    def __init__(self, account: MessageOps, folder_id: int, name: str) -> None:
        self.account = account
        self.folder_id = folder_id
        self.name = name
        self._recent_mark: int | None = None  # as the last changes() poll read it

    async def fetch(self, uids: list[int], wants: FetchWants) -> list[FetchRow]:
        return await self.account._fetch(self.folder_id, uids, wants)

    async def read_message(self, row: FetchRow) -> bytes:
        return await self.account._read_message(self.folder_id, row)

    async def read_range(self, row: FetchRow, start: int, length: int) -> bytes:
        return await self.account._read_range(row, start, length)

    def recent_mark_read(self, mark: int | None) -> None:
        """The folder's \\Recent mark as a read just saw it (SELECT, a changes() poll):
        the next :meth:`claim_recent` starts from it instead of reading it again."""
        self._recent_mark = mark

    async def claim_recent(self, up_to_uid: int, claim: bool) -> int:
        mark, self._recent_mark = self._recent_mark, None
        seen = await self.account._claim_recent(self.folder_id, up_to_uid, claim, mark)
        mirrors = self.account._mirrors
        if claim and mirrors is not None:  # the other sessions here need not try
            mirrors.get(self.account._org, self.account._inbox_id,
                        self.folder_id).claimed(up_to_uid)
        return seen

    async def set_seen(self, uids: list[int]) -> list[MessageMeta]:
        """A non-PEEK body fetch marks messages read."""
        if not self.account.can_write:
            return []
        changed, _ = await self.account._store("imap.fetch", self.folder_id, uids, "+",
                                               frozenset({"\\Seen"}), None)
        return changed

    async def store(self, uids: list[int], mode: str, flags: frozenset[str],
                    unchangedsince: int | None) -> tuple[list[MessageMeta], list[int]]:
        """STORE: one new MODSEQ for every message the command changes."""
        return await self.account._store("imap.store", self.folder_id, uids, mode, flags,
                                         unchangedsince)

    async def copy(self, uids: list[int], dest: str) -> tuple[int, list[tuple[int, int]]]:
        """COPY: new rows in the destination, sharing the stored bytes."""
        return await self.account._transfer(self.folder_id, uids, dest, move=False)

    async def move(self, uids: list[int], dest: str) -> tuple[int, list[tuple[int, int]]]:
        """MOVE: the same message re-homed with a new UID."""
        return await self.account._transfer(self.folder_id, uids, dest, move=True)

    async def expunge(self, uids: list[int] | None) -> list[int]:
        return await self.account._expunge(self.folder_id, uids)

    async def search(self, key: SearchKey,
                     sort: list[tuple[str, bool]] | None = None) -> list[int]:
        return await self.account._search(self.folder_id, key, sort)

    async def thread_fields(self, key: SearchKey) -> list[ThreadFields]:
        return await self.account._thread_fields(self.folder_id, key)

    async def changes(self, known_uids: list[int], since_modseq: int,
                      fresh: bool = True) -> Changes:
        found, self._recent_mark = await self.account._changes(self.folder_id, known_uids,
                                                               since_modseq, fresh)
        return found

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self.account._watch(self.folder_id, callback)
