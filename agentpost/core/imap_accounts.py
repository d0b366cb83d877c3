"""The IMAP backend: inboxes as IMAP accounts, over the same store, auth and ingest path.

Login goes through the shared twisted.cred portal (username = inbox address, password
= an API key of the inbox's organization); the resulting Principal scopes every query.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal

from agentpost.auth.cred import IPrincipal
from agentpost.core.audit import AuditTrail
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.context import RequestContext
from agentpost.core.ingest import Ingest, Target
from agentpost.core.messages import check_labels
from agentpost.imap.interfaces import (
    Changes,
    FetchRow,
    FetchWants,
    FolderInfo,
    FolderSnapshot,
    FolderStatus,
    MessageMeta,
)
from agentpost.model.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    MailboxFull,
    NotFound,
    RateLimited,
    Unauthenticated,
)
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.storage import imap as imap_store
from agentpost.storage import inboxes as inbox_store
from agentpost.storage import logins as login_store
from agentpost.storage import mail as mail_store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database, Txn
from agentpost.storage.notify import Notifier

log = logging.getLogger(__name__)

_FOLDER_RE = re.compile(r"^[^/\x00-\x1f\x7f*%]+(/[^/\x00-\x1f\x7f*%]+)*$")
_MAX_FOLDER_LEN = 200


def _meta(row: dict[str, Any]) -> MessageMeta:
    return MessageMeta(row["uid"], row["modseq"], imap_store.flags_of(row))


def _check_folder_name(name: str) -> str:
    if len(name) > _MAX_FOLDER_LEN or not _FOLDER_RE.match(name):
        raise InvalidRequest("Folder names are '/'-separated, without empty parts, * or %.")
    return name


def _split_flags(flags: frozenset[str]) -> tuple[set[str], list[str]]:
    system = {f for f in flags if f.startswith("\\")}
    keywords = check_labels(sorted({f.lower() for f in flags if not f.startswith("\\")}))
    return system, keywords


class InboxAccount:
    """One inbox seen through IMAP (implements agentpost.imap.interfaces.IMAPAccount)."""

    def __init__(self, principal: Principal, inbox: dict[str, Any], db: Database,
                 blobs: BlobStore, ingest: Ingest, collector: BlobCollector,
                 notifier: Notifier | None, quota: int = 0) -> None:
        self.principal = principal
        self.inbox = inbox
        self.address = inbox["email"]
        self.can_write = "messages:write" in principal.scopes
        self._org = principal.org_id
        self._inbox_id = inbox["id"]
        self._db = db
        self._blobs = blobs
        self._ingest = ingest
        self._collector = collector
        self._notifier = notifier
        self.quota_limit = quota

    def _writable(self) -> None:
        if not self.can_write:
            raise Forbidden("This key lacks messages:write.", missing_scope="messages:write")

    async def _folder(self, txn: Txn, name: str, *, for_update: bool = False) -> dict[str, Any]:
        folder = await imap_store.get_folder(txn, self._org, self._inbox_id, name,
                                             for_update=for_update)
        if folder is None:
            raise NotFound("No such folder.")
        return folder

    async def _folder_id(self, txn: Txn, folder_id: int) -> dict[str, Any]:
        folder = await imap_store.get_folder_by_id(txn, self._org, self._inbox_id, folder_id)
        if folder is None:
            raise NotFound("The folder no longer exists.")
        return folder

    # Folders --------------------------------------------------------------------------

    async def list_folders(self) -> list[FolderInfo]:
        """Every folder, with SPECIAL-USE and CHILDREN information."""
        rows = await self._db.run_read("imap.list", imap_store.list_folders, self._org,
                                       self._inbox_id)
        return [FolderInfo(r["name"], None if r["special_use"] == "\\Inbox" else
                           r["special_use"], r["subscribed"], r["has_children"]) for r in rows]

    async def create_folder(self, name: str) -> None:
        """CREATE (parents are created too, as RFC 3501 suggests)."""
        self._writable()
        name = _check_folder_name(name.rstrip("/"))
        if name.upper() == "INBOX":
            raise Conflict("INBOX always exists.")

        async def txn_fn(txn: Txn) -> None:
            parts = name.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if await imap_store.get_folder(txn, self._org, self._inbox_id, parent) is None:
                    await imap_store.create_folder(txn, self._org, self.inbox["environment_id"],
                                                   self._inbox_id, parent)
            await imap_store.create_folder(txn, self._org, self.inbox["environment_id"],
                                           self._inbox_id, name)

        await self._db.run_interaction("imap.create", txn_fn)

    async def delete_folder(self, name: str) -> None:
        """DELETE a user folder and the messages in it."""
        self._writable()
        freed: list[str] = []

        async def txn_fn(txn: Txn) -> None:
            folder = await self._folder(txn, name, for_update=True)
            if folder["special_use"] is not None:
                raise InvalidRequest("System folders cannot be deleted.")
            uids = [r["uid"] for r in await imap_store.folder_meta(txn, self._org,
                                                                     folder["id"])]
            freed.extend(await self._delete_uids(txn, folder["id"], uids))
            await imap_store.delete_folder(txn, self._org, folder["id"])

        await self._db.run_interaction("imap.delete", txn_fn)
        await self._collector.collect(freed)

    async def rename_folder(self, old: str, new: str) -> None:
        """RENAME a user folder (and its children)."""
        self._writable()
        new = _check_folder_name(new.rstrip("/"))

        async def txn_fn(txn: Txn) -> None:
            folder = await self._folder(txn, old, for_update=True)
            if folder["special_use"] is not None:
                raise InvalidRequest("System folders cannot be renamed.")
            if await imap_store.get_folder(txn, self._org, self._inbox_id, new) is not None:
                raise Conflict("Folder already exists.")
            await imap_store.rename_folder(txn, self._org, self._inbox_id, folder["name"], new)

        await self._db.run_interaction("imap.rename", txn_fn)

    async def set_subscribed(self, name: str, subscribed: bool) -> None:
        """SUBSCRIBE / UNSUBSCRIBE."""

        async def txn_fn(txn: Txn) -> None:
            folder = await self._folder(txn, name)
            await imap_store.set_subscribed(txn, self._org, folder["id"], subscribed)

        await self._db.run_interaction("imap.subscribe", txn_fn)

    async def select(self, name: str) -> FolderSnapshot:
        """SELECT/EXAMINE: the folder and the UID, MODSEQ and flags of every message."""

        async def txn_fn(txn: Txn) -> FolderSnapshot:
            folder = await self._folder(txn, name)
            rows = await imap_store.folder_meta(txn, self._org, folder["id"])
            unseen = next((r["uid"] for r in rows if not r["seen"]), None)
            return FolderSnapshot(folder["id"], folder["name"], folder["uidvalidity"],
                                  folder["uidnext"], folder["highestmodseq"],
                                  [_meta(r) for r in rows], unseen)

        return await self._db.run_interaction("imap.select", txn_fn,
                                              isolation="repeatable read")

    async def check_folder(self, name: str) -> None:
        """NotFound unless the folder exists."""

        async def txn_fn(txn: Txn) -> None:
            await self._folder(txn, name)

        await self._db.run_read("imap.folder", txn_fn)

    async def status(self, name: str) -> FolderStatus:
        """STATUS counters."""

        async def txn_fn(txn: Txn) -> FolderStatus:
            folder = await self._folder(txn, name)
            counts = await imap_store.folder_counts(txn, self._org, folder["id"],
                                                    folder["recent_uid"])
            return FolderStatus(counts["messages"], folder["uidnext"], folder["uidvalidity"],
                                counts["unseen"], folder["highestmodseq"], counts["recent"],
                                int(counts["size"]))

        return await self._db.run_interaction("imap.status", txn_fn,
                                              isolation="repeatable read")

    # Messages -------------------------------------------------------------------------

    async def fetch(self, folder_id: int, uids: list[int], wants: FetchWants) -> list[FetchRow]:
        """Only the columns the FETCH needs (FLAGS alone never reads bodies)."""
        columns = []
        if wants.internaldate:
            columns.append("received_at")
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
        return [FetchRow(uid=r["uid"], modseq=r["modseq"], flags=imap_store.flags_of(r),
                         internaldate=r.get("received_at"), size=r.get("size"),
                         envelope=r.get("imap_envelope"),
                         bodystructure=r.get("imap_bodystructure"), body=r.get("imap_body"),
                         raw_key=r.get("raw_blob_key"), sections=r.get("imap_sections"))
                for r in rows]

    async def claim_recent(self, folder_id: int, up_to_uid: int, claim: bool) -> int:
        """\\Recent bookkeeping in the folder row, shared by every process."""
        return await self._db.run_interaction("imap.recent", imap_store.claim_recent,
                                              self._org, folder_id, up_to_uid, claim)

    async def read_blob(self, raw_key: str) -> bytes:
        """A message whose key came from this account's own (org-scoped) FETCH."""
        return await self._blobs.get_bytes(raw_key)

    async def read_range(self, raw_key: str, start: int, length: int) -> bytes:
        """Part of a message whose key came from this account's own (org-scoped) FETCH."""
        return await self._blobs.get_range(raw_key, start, length)

    async def fetch_raw(self, folder_id: int, uid: int) -> bytes:
        """The stored bytes, exactly."""
        rows = await self._db.run_read("imap.fetch_raw", imap_store.message_ids_for_uids,
                                       self._org, folder_id, [uid])
        if not rows:
            raise NotFound("The message was expunged.")
        return await self._blobs.get_bytes(rows[0]["raw_blob_key"])

    async def set_seen(self, folder_id: int, uids: list[int]) -> list[MessageMeta]:
        """A non-PEEK body fetch marks messages read."""
        if not self.can_write:
            return []
        changed, _ = await self.store(folder_id, uids, "+", frozenset({"\\Seen"}), None)
        return changed

    async def store(self, folder_id: int, uids: list[int], mode: str, flags: frozenset[str],
                    unchangedsince: int | None) -> tuple[list[MessageMeta], list[int]]:
        """STORE: one new MODSEQ for every message the command changes."""
        self._writable()
        system, keywords = _split_flags(flags)
        unknown = system - set(imap_store.SYSTEM_FLAGS)
        system -= unknown  # \Recent and others cannot be stored; ignore them

        async def txn_fn(txn: Txn) -> tuple[list[MessageMeta], list[int]]:
            await self._folder_id(txn, folder_id)
            rows = await imap_store.message_ids_for_uids(txn, self._org, folder_id, uids,
                                                         for_update=True)
            failed = [r["uid"] for r in rows
                      if unchangedsince is not None and r["modseq"] > unchangedsince]
            modseq = None
            out: list[MessageMeta] = []
            for row in rows:
                if row["uid"] in failed:
                    continue
                columns = self._new_flag_columns(row, mode, system, keywords)
                if columns:
                    if modseq is None:
                        modseq = await mail_store.bump_modseq(txn, self._org, folder_id)
                    await imap_store.set_flags(txn, self._org, folder_id, row["id"], columns,
                                               modseq)
                    row = {**row, **columns, "modseq": modseq}
                out.append(_meta(row))
            if modseq is not None:
                for thread_id in {r["thread_id"] for r in rows}:
                    await mail_store.refresh_thread(txn, self._org, thread_id)
            return out, failed

        return await self._db.run_interaction("imap.store", txn_fn)

    @staticmethod
    def _new_flag_columns(row: dict[str, Any], mode: str, system: set[str],
                          keywords: list[str]) -> dict[str, Any]:
        columns: dict[str, Any] = {}
        for flag, col in imap_store.SYSTEM_FLAGS.items():
            if mode == "+":
                value = row[col] or flag in system
            elif mode == "-":
                value = row[col] and flag not in system
            else:
                value = flag in system
            if value != row[col]:
                columns[col] = value
        current = set(row["labels"])
        if mode == "+":
            labels = current | set(keywords)
        elif mode == "-":
            labels = current - set(keywords)
        else:
            labels = set(keywords)
        if labels != current:
            columns["labels"] = sorted(labels)
        return columns

    async def append(self, folder: str, message: bytes | IO[bytes], flags: frozenset[str],
                     internaldate: datetime | None) -> tuple[int, int]:
        """APPEND through the single ingest path."""
        self._writable()
        system, keywords = _split_flags(flags)
        target = Target(self._org, self.inbox["environment_id"], self._inbox_id, self.address)

        # RFC 3501: INBOX is case-insensitive; every other name is exact (ingest matches
        # names exactly and answers NotFound -> [TRYCREATE] for a missing one).
        name = "INBOX" if folder.upper() == "INBOX" else folder
        [stored] = await self._ingest.store(
            [target], io.BytesIO(message) if isinstance(message, bytes) else message,
            envelope_from=None, folder=name,
            flags=frozenset(system), labels=tuple(keywords), received_at=internaldate,
            require_folder=True, direction="inbound", enforce_quota=True)
        return stored.uidvalidity, stored.uid

    async def quota(self) -> tuple[int, int]:
        """(bytes used, limit in bytes; 0: none) for IMAP QUOTA. Without a limit there
        is nothing to report or check, and no query (APPEND asks before every literal)."""
        if not self.quota_limit:
            return 0, 0
        used = await self._db.run_read("imap.quota", mail_store.inbox_usage, self._org,
                                       self._inbox_id)
        return used, self.quota_limit

    async def _transfer(self, folder_id: int, uids: list[int], dest: str,
                        move: bool) -> tuple[int, list[tuple[int, int]]]:
        self._writable()

        async def txn_fn(txn: Txn) -> tuple[int, list[tuple[int, int]]]:
            await self._folder_id(txn, folder_id)
            target = await self._folder(txn, dest)
            rows = await imap_store.message_ids_for_uids(txn, self._org, folder_id, uids,
                                                         for_update=True)
            pairs = []
            for row in rows:
                # Inbox row before folder row, the order ingest locks them in.
                if not move and not await mail_store.charge_storage(
                        txn, self._org, self._inbox_id, row["size"], self.quota_limit):
                    raise MailboxFull()
                uid, modseq = await mail_store.allocate_uid(txn, self._org, target["id"])
                if move:
                    await imap_store.move_message(txn, self._org, row["id"], folder_id,
                                                  target["id"], uid, modseq)
                else:
                    copy_id = new_id("msg")
                    await mail_store.reference_blob(txn, row["raw_blob_key"], 0)
                    for key, size in await imap_store.attachment_keys(txn, self._org,
                                                                      row["id"]):
                        await mail_store.reference_blob(txn, key, size)
                    await imap_store.copy_message(txn, self._org, row["id"], copy_id,
                                                  target["id"], uid, modseq)
                    await mail_store.refresh_thread(txn, self._org, row["thread_id"])
                pairs.append((row["uid"], uid))
            if move and rows:
                await mail_store.bump_modseq(txn, self._org, folder_id)
            return target["uidvalidity"], pairs

        return await self._db.run_interaction("imap.move" if move else "imap.copy", txn_fn)

    async def copy(self, folder_id: int, uids: list[int],
                   dest: str) -> tuple[int, list[tuple[int, int]]]:
        """COPY: new rows in the destination, sharing the stored bytes."""
        return await self._transfer(folder_id, uids, dest, move=False)

    async def move(self, folder_id: int, uids: list[int],
                   dest: str) -> tuple[int, list[tuple[int, int]]]:
        """MOVE: the same message re-homed with a new UID."""
        return await self._transfer(folder_id, uids, dest, move=True)

    async def _delete_uids(self, txn: Txn, folder_id: int, uids: list[int]) -> list[str]:
        freed = []
        rows = await imap_store.message_ids_for_uids(txn, self._org, folder_id, uids,
                                                     for_update=True)
        for row in rows:
            for key in await mail_store.delete_message(txn, self._org, row["id"]):
                if await mail_store.release_blob(txn, key):
                    freed.append(key)
            await mail_store.refresh_thread(txn, self._org, row["thread_id"])
            await mail_store.delete_thread_if_empty(txn, self._org, row["thread_id"])
        return freed

    async def expunge(self, folder_id: int, uids: list[int] | None) -> list[int]:
        """Remove \\Deleted messages; the stored bytes go when nothing else uses them."""
        self._writable()
        freed: list[str] = []

        async def txn_fn(txn: Txn) -> list[int]:
            await self._folder_id(txn, folder_id)
            doomed = await imap_store.deleted_uids(txn, self._org, folder_id, uids)
            if doomed:
                freed.extend(await self._delete_uids(txn, folder_id, doomed))
                await mail_store.bump_modseq(txn, self._org, folder_id)
            return doomed

        expunged = await self._db.run_interaction("imap.expunge", txn_fn)
        await self._collector.collect(freed)
        return expunged

    async def search(self, folder_id: int, key: tuple[Any, ...],
                     sort: list[tuple[str, bool]] | None = None) -> list[int]:
        """SEARCH (and SORT) translated to SQL."""
        try:
            return await self._db.run_read("imap.search", imap_store.search, self._org,
                                           folder_id, key, sort)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    async def changes(self, folder_id: int, known_uids: list[int],
                      since_modseq: int) -> Changes:
        """What other sessions, the API or delivery changed since the session looked."""

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            return await imap_store.changes(txn, self._org, folder_id,
                                            max(known_uids, default=0), known_uids,
                                            since_modseq)

        found = await self._db.run_interaction("imap.changes", txn_fn,
                                               isolation="repeatable read")
        present = found["present"]
        return Changes(new=[_meta(r) for r in found["new"]],
                       changed=[_meta(r) for r in found["changed"]],
                       expunged=[] if present is None else
                       [u for u in known_uids if u not in present],
                       highestmodseq=found["highestmodseq"] or since_modseq)

    def watch(self, folder_id: int, callback: Callable[[], None]) -> Callable[[], None]:
        """Wake-ups for this folder from every process (LISTEN/NOTIFY)."""
        if self._notifier is None:
            return lambda: None
        return self._notifier.watch(str(folder_id), callback)


def _bucket(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()


class IMAPLogins:
    """IMAP LOGIN/AUTHENTICATE through the shared portal, throttled and audited."""

    def __init__(self, portal: Portal, db: Database, blobs: BlobStore, ingest: Ingest,
                 collector: BlobCollector, audit: AuditTrail, clock: Any,
                 notifier: Notifier | None, failures_per_minute: int = 10) -> None:
        self._portal = portal
        self._db = db
        self._blobs = blobs
        self._ingest = ingest
        self._collector = collector
        self._audit = audit
        self._notifier = notifier
        self._clock = clock
        self._rate = failures_per_minute / 60.0
        self._burst = float(failures_per_minute)

    async def authenticate(self, username: str, password: str, peer: str) -> InboxAccount:
        """Username = inbox address, password = an API key of its organization."""
        ctx = RequestContext(new_id("req"), peer, "imap.login", target_id=username[:320])
        account_key = username.strip().lower()
        # Failure allowances per client address and per account, kept in PostgreSQL so
        # that every process and node draws from the same ones.
        buckets = [_bucket("imap-peer", peer), _bucket("imap-account", account_key)]
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        tokens = await self._db.run_read("imap.login.allowance", login_store.emptiest,
                                         buckets, now, self._rate, self._burst)
        if tokens is not None and tokens < 1.0:
            raise RateLimited(retry_after_s=(1.0 - tokens) / self._rate)
        try:
            # The key is checked before the inbox is looked up, so a missing inbox and a
            # wrong key take the same path and the same time.
            _, principal, _ = await self._portal.login(
                UsernamePassword(username.encode("utf-8"), password.encode("utf-8")), None,
                IPrincipal)
            ctx.principal = principal
            if "messages:read" not in principal.scopes:
                raise UnauthorizedLogin("missing messages:read")
            inbox = await self._db.run_read("imap.login.inbox", inbox_store.get_inbox_by_address,
                                            principal.org_id, principal.environment_ids,
                                            account_key)
            if inbox is None:
                raise UnauthorizedLogin("no such inbox for this key")
        except UnauthorizedLogin:
            await self._db.run_interaction("imap.login.failed", login_store.record_failure,
                                           buckets, now, self._rate, self._burst)
            self._audit.enqueue(ctx, "denied", None)
            raise Unauthenticated("Authentication failed.") from None
        ctx.target_id = inbox["id"]
        ctx.environment_id = inbox["environment_id"]
        self._audit.enqueue(ctx, "allowed", None)
        return InboxAccount(principal, inbox, self._db, self._blobs, self._ingest,
                            self._collector, self._notifier, self._ingest.inbox_quota)
