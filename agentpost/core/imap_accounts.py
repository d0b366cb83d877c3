"""The IMAP backend: inboxes as IMAP accounts, over the same store, auth and ingest path.

Login goes through the shared twisted.cred portal (username = inbox address, password
= an API key of the inbox's organization); the resulting Principal scopes every query.
Changes go through core.mail_changes (the implementation the API uses) and core.ingest
(APPEND), which write one audit row per command in the command's transaction.

:class:`InboxAccount` is the inbox: this module holds its mailbox side (listing,
subscriptions, CREATE/DELETE/RENAME, SELECT, STATUS, QUOTA); the message side (FETCH,
STORE, COPY/MOVE, EXPUNGE, APPEND, SEARCH) is :mod:`agentpost.core.imap_messages`,
whose :class:`InboxFolder` SELECT hands the protocol, so folder ids and blob keys stay
in core.

Subscriptions are names of their own (:mod:`agentpost.storage.subscriptions`): a
client may subscribe to a name that does not exist, DELETE keeps a folder's
subscription (LIST (SUBSCRIBED) then answers ``\\NonExistent``), RENAME moves the
subscriptions of the folder and its children. CREATE does not subscribe (RFC 3501
§6.3.3; Dovecot neither): clients such as Thunderbird and mbsync SUBSCRIBE what they
want listed, and a new inbox's system folders start subscribed.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from agentpost.core.audit import write_change
from agentpost.core.imap_flags import message_meta
from agentpost.core.imap_messages import InboxFolder, MessageOps
from agentpost.imap.interfaces import FolderInfo, FolderSnapshot, FolderStatus
from agentpost.model.errors import Conflict, InvalidRequest, NotFound
from agentpost.storage import imap as imap_store
from agentpost.storage import imap_status
from agentpost.storage import mail as mail_store
from agentpost.storage import subscriptions as subscription_store
from agentpost.storage.database import Txn

__all__ = ["InboxAccount", "InboxFolder"]

_FOLDER_RE = re.compile(r"^[^/\x00-\x1f\x7f*%]+(/[^/\x00-\x1f\x7f*%]+)*\Z")
_MAX_FOLDER_LEN = 200


def _check_folder_name(name: str) -> str:
    if len(name) > _MAX_FOLDER_LEN or not _FOLDER_RE.match(name):
        raise InvalidRequest("Folder names are '/'-separated, without empty parts, * or %.")
    return name


class InboxAccount(MessageOps):
    """One inbox seen through IMAP (implements agentpost.imap.interfaces.IMAPAccount)."""

    # Folders --------------------------------------------------------------------------

    async def list_folders(self) -> list[FolderInfo]:
        """Every folder, with SPECIAL-USE and CHILDREN information."""
        rows = await self._db.run_read("imap.list", imap_store.list_folders, self._org,
                                       self._inbox_id)
        return [FolderInfo(r["name"], None if r["special_use"] == "\\Inbox" else
                           r["special_use"], r["subscribed"], r["has_children"], str(r["id"]))
                for r in rows]

    async def list_subscriptions(self) -> list[str]:
        """Every subscribed name, whether or not a folder has it (LSUB, LIST
        (SUBSCRIBED): a name without a folder is \\NonExistent)."""
        return await self._db.run_read("imap.subscriptions", subscription_store.list_names,
                                       self._org, self._inbox_id)

    async def create_folder(self, name: str) -> None:
        """CREATE (parents are created too, as RFC 3501 suggests). A new folder is not
        subscribed: RFC 3501 §6.3.3 ties no subscription to CREATE, and clients
        (Thunderbird, mutt) SUBSCRIBE what they want listed."""
        self._writable()
        name = _check_folder_name(name.rstrip("/"))
        if name.upper() == "INBOX":
            raise Conflict("INBOX always exists.")
        ctx = self._ctx("imap.create", folder=name)

        async def txn_fn(txn: Txn) -> None:
            parts = name.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if await imap_store.get_folder(txn, self._org, self._inbox_id, parent) is None:
                    await imap_store.create_folder(txn, self._org, self.inbox["environment_id"],
                                                   self._inbox_id, parent)
            await imap_store.create_folder(txn, self._org, self.inbox["environment_id"],
                                           self._inbox_id, name)
            await write_change(txn, ctx)

        await self._db.run_interaction("imap.create", txn_fn)

    async def delete_folder(self, name: str) -> None:
        """DELETE a user folder and the messages in it."""
        self._writable()
        freed: list[str] = []
        ctx = self._ctx("imap.delete", folder=name)

        async def txn_fn(txn: Txn) -> None:
            folder = await self._folder(txn, name, for_update=True)
            if folder["special_use"] is not None:
                raise InvalidRequest("System folders cannot be deleted.")
            uids = [r["uid"] for r in await imap_store.folder_meta(txn, self._org,
                                                                     folder["id"])]
            ctx.details["folder_id"] = folder["id"]
            freed[:] = await self._delete_uids(txn, ctx, folder["id"], uids)
            await imap_store.delete_folder(txn, self._org, folder["id"])

        await self._db.run_interaction("imap.delete", txn_fn)
        await self._collector.collect(freed)

    async def rename_folder(self, old: str, new: str) -> None:
        """RENAME a user folder (and its children), and the subscriptions of both."""
        self._writable()
        new = _check_folder_name(new.rstrip("/"))
        if new.startswith(old + "/"):
            raise InvalidRequest("A folder cannot be moved under itself.")
        ctx = self._ctx("imap.rename", folder=old, to_folder=new)

        async def txn_fn(txn: Txn) -> None:
            folder = await self._folder(txn, old, for_update=True)
            if folder["special_use"] is not None:
                raise InvalidRequest("System folders cannot be renamed.")
            if await imap_store.get_folder(txn, self._org, self._inbox_id, new) is not None:
                raise Conflict("Folder already exists.")
            await imap_store.rename_folder(txn, self._org, self._inbox_id, folder["name"], new)
            await subscription_store.rename(txn, self._org, self._inbox_id, folder["name"], new)
            ctx.details["folder_id"] = folder["id"]
            await write_change(txn, ctx)

        await self._db.run_interaction("imap.rename", txn_fn)

    async def set_subscribed(self, name: str, subscribed: bool) -> None:
        """SUBSCRIBE / UNSUBSCRIBE. Any valid mailbox name may be subscribed, existing or
        not (RFC 3501 §6.3.6; as Dovecot). UNSUBSCRIBE of a name that is neither
        subscribed nor a folder is NotFound (``NO [NONEXISTENT]``); of an existing,
        unsubscribed folder it is a no-op, as it always was."""
        name = subscription_store.canonical(_check_folder_name(name.rstrip("/")))
        ctx = self._ctx("imap.subscribe" if subscribed else "imap.unsubscribe", folder=name)

        async def txn_fn(txn: Txn) -> None:
            folder = await imap_store.get_folder(txn, self._org, self._inbox_id, name)
            if subscribed:
                if not await subscription_store.subscribe(txn, self._org, self._inbox_id,
                                                          name):
                    raise InvalidRequest(
                        "An inbox holds at most "
                        f"{subscription_store.MAX_SUBSCRIPTIONS_PER_INBOX} subscriptions.")
            elif not await subscription_store.unsubscribe(txn, self._org, self._inbox_id,
                                                          name) and folder is None:
                raise NotFound("No such subscription or folder.")
            if folder is not None:
                ctx.details["folder_id"] = folder["id"]
            await write_change(txn, ctx)

        await self._db.run_interaction("imap.subscribe", txn_fn)

    async def select(self, name: str) -> tuple[InboxFolder, FolderSnapshot]:
        """SELECT/EXAMINE: the folder, bound, and the UID, MODSEQ and flags of every
        message."""

        # One statement (imap_store.select_folder): one snapshot without a transaction.
        # When this process mirrors the folder (core.imap_poll) only what changed after
        # the mirror's MODSEQ is read; the mirror takes it, and the messages come from it.
        mirrors = self._mirrors
        mirror = None if mirrors is None else mirrors.by_name(self._org, self._inbox_id,
                                                              name)
        since = (-1, -1) if mirror is None else (mirror.folder_id, mirror.highestmodseq)
        folder, rows = await self._db.run_read("imap.select", imap_store.select_folder,
                                               self._org, self._inbox_id, name, since)
        if folder is None:
            raise NotFound("No such folder.")
        spellings = await self._spellings(rows)  # keywords as the inbox spells them
        metas = None
        if mirrors is not None:
            if mirror is None or not folder["delta"]:  # all of it: the mirror starts here
                mirror = mirrors.get(self._org, self._inbox_id, folder["id"])
                folder["present"] = [r["uid"] for r in rows]
            mirrors.named(self._org, self._inbox_id, name, folder["id"])
            mirror.take(folder, rows, spellings)
            metas = mirror.snapshot(folder["highestmodseq"])
            if metas is None and folder["delta"]:  # it went past this reading: read all
                folder, rows = await self._db.run_read(
                    "imap.select", imap_store.select_folder, self._org, self._inbox_id,
                    name)
                if folder is None:
                    raise NotFound("No such folder.")
                spellings = await self._spellings(rows)
        if metas is None:
            metas = [message_meta(r, spellings) for r in rows]
        unseen = next((m.uid for m in metas if "\\Seen" not in m.flags), None)
        snapshot = FolderSnapshot(folder["name"], folder["uidvalidity"], folder["uidnext"],
                                  folder["highestmodseq"], metas, unseen)
        handle = InboxFolder(self, folder["id"], snapshot.name)
        handle.recent_mark_read(folder["recent_uid"])  # SELECT's claim needs no read
        return handle, snapshot

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
                                int(counts["size"]), deleted=counts["deleted"])

        return await self._db.run_interaction("imap.status", txn_fn,
                                              isolation="repeatable read")

    async def statuses(self, names: list[str]) -> dict[str, FolderStatus]:
        """STATUS counters of many folders by name, in one statement (LIST-STATUS:
        storage.imap_status); a name that is no folder (any more) is left out."""
        rows = await self._db.run_read("imap.statuses", imap_status.folder_statuses,
                                       self._org, self._inbox_id, names)
        return {r["name"]: FolderStatus(r["messages"], r["uidnext"], r["uidvalidity"],
                                        r["unseen"], r["highestmodseq"], r["recent"],
                                        int(r["size"]), deleted=r["deleted"])
                for r in rows}

    async def open_folder(self, name: str) -> tuple[InboxFolder, int]:
        """A folder handle and its UIDVALIDITY, without SELECT's snapshot (CATENATE)."""

        async def txn_fn(txn: Txn) -> tuple[int, str, int]:
            folder = await self._folder(txn, name)
            return folder["id"], folder["name"], folder["uidvalidity"]

        folder_id, real_name, uidvalidity = await self._db.run_read("imap.open_folder",
                                                                    txn_fn)
        return InboxFolder(self, folder_id, real_name), uidvalidity

    async def quota(self) -> tuple[int, int]:
        """(bytes used, limit in bytes; 0: none) for IMAP QUOTA. Without a limit there
        is nothing to report or check, and no query (APPEND asks before every literal)."""
        if not self.quota_limit:
            return 0, 0
        used = await self._db.run_read("imap.quota", mail_store.inbox_usage, self._org,
                                       self._inbox_id)
        return used, self.quota_limit

    def watch_folder(self, key: str, callback: Callable[[], None]) -> Callable[[], None]:
        """NOTIFY: wake-ups for a folder of this inbox, by the key list_folders gave."""
        return self._watch(int(key), callback)

    def watch_folder_list(self, callback: Callable[[], None]) -> Callable[[], None]:
        """NOTIFY: wake-ups when this inbox's folders are created, deleted, renamed or
        (un)subscribed (storage.mail.notify_folder_list): this inbox's key only."""
        if self._notifier is None:
            return lambda: None
        return self._notifier.watch(mail_store.folder_list_key(self._inbox_id), callback)
