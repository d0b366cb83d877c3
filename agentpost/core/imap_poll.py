"""One change poll per folder per process, shared by every session that selects it.

Why: under a mixed load the selected folder is nearly always "dirty" (another session,
the API or delivery changed it), so a change poll followed ~70 % of all IMAP commands,
one per session per change, each re-reading what the others had just read. Here a
process keeps a mirror of each selected folder (UID -> MODSEQ and flags, the expunge
mark, the \\Recent mark), catches it up with ONE statement per wave of changes
(storage.imap.folder_delta: only the rows whose MODSEQ is above the mirror's), and
answers each session's "what changed since MODSEQ m among my UIDs" from memory.

When is the mirror current? Every change to a folder, from any process, ends with a
NOTIFY on the folder's key (storage.mail.notify_folder) after it commits; the mirror is
the one LISTEN watcher of its folder here and bumps a generation counter before it wakes
the sessions (so a session woken by a change never reads a mirror that has not yet heard
of it). A catch-up that started at generation g makes the mirror current up to g; a
session asks for the generation it last heard of. Writes made by this process's own
sessions bump the generation at once (the NOTIFY comes back a moment later), and NOOP,
CHECK and the start of IDLE ask for a catch-up that starts after them, so a client that
waits for a write's OK and then polls another session sees it, as it did before.

What a session is told stays its own (agentpost.imap.updates and selected): a mirror
only answers the same three questions the per-session query did -- messages above the
session's highest UID, known UIDs with a MODSEQ above the session's, known UIDs that are
gone when the folder's expunge mark moved past the session's MODSEQ -- so when EXPUNGE
may be sent (never during FETCH/STORE/SEARCH) is still decided per session.

Tenancy: a mirror is keyed by (organization, folder id) and read with queries scoped by
both; it is shared only by sessions of that organization's inbox.
"""

from __future__ import annotations

import bisect
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from agentpost.core.imap_spellings import Spellings, spellings_read
from agentpost.imap.interfaces import Changes, MessageMeta
from agentpost.storage import imap as imap_store
from agentpost.storage.database import Database
from agentpost.storage.notify import Notifier

log = logging.getLogger(__name__)

#: Change-log entries a mirror keeps (MODSEQ order) before it forgets the older half;
#: a session behind the log is answered by comparing its UIDs with the mirror instead.
LOG_MAX = 4096
#: Mirrors no session watches that a process keeps (the least recently used go first).
IDLE_MIRRORS = 64


class FolderMirror:
    """The process's copy of one folder's message state (see the module docstring)."""

    def __init__(self, org_id: str, inbox_id: str, folder_id: int) -> None:
        self.org_id = org_id
        self.inbox_id = inbox_id
        self.folder_id = folder_id
        self.loaded = False
        self.deleted = False
        self.highestmodseq = 0
        self.expunged_modseq = 0
        self.recent_uid = 0
        self.uids: list[int] = []  # ascending
        self.meta: dict[int, MessageMeta] = {}
        self._log: list[tuple[int, int]] = []  # (MODSEQ, UID) of changes, ascending
        self._log_floor = 0  # every change above this MODSEQ is in _log
        self._gone: list[tuple[int, int]] = []  # (expunge mark, UID) of removals
        self._gone_floor = 0  # every removal above this mark is in _gone
        self.generation = 0  # wake-ups heard (NOTIFY, local writes, forced polls)
        self.notified = 0  # of which NOTIFYs (and link restarts)
        self.current_to = -1  # the generation the last finished catch-up started at
        self._running: int | None = None  # generation of the catch-up in flight
        self._waiters: list[defer.Deferred[None]] = []
        self.sessions: set[Callable[[], None]] = set()
        self.unwatch: Callable[[], None] | None = None
        self.queries = 0  # catch-ups run (tests count them)

    # ------------------------------------------------------------------ wake-ups

    def heard(self) -> None:
        """The folder may have changed: a catch-up is due, then the sessions look."""
        self.generation += 1
        self.notified += 1
        for callback in list(self.sessions):
            try:
                callback()
            except Exception:
                log.exception("imap: folder watcher failed")

    # ------------------------------------------------------------------ catching up

    async def current(self, db: Database, fresh: bool) -> None:
        """Return once a catch-up that started after every wake-up heard so far (and,
        when ``fresh``, after this call) has finished; one runs at a time and serves
        every session waiting for it."""
        if fresh:
            self.generation += 1
        want = self.generation
        while self.current_to < want:
            if self._running is None:
                defer.ensureDeferred(self._catch_up(db))
            if self.current_to >= want:  # it finished without waiting
                break
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            await waiter

    async def _catch_up(self, db: Database) -> None:
        start = self._running = self.generation
        outcome: Failure | None = None
        try:
            self.queries += 1
            found = await db.run_read(
                "imap.changes", imap_store.folder_delta, self.org_id, self.folder_id,
                self.highestmodseq if self.loaded else -1, self.loaded)
            spellings = None if found is None else await spellings_read(
                db, (self.org_id, self.inbox_id), found["messages"])
            self._apply(found, spellings)
            self.current_to = max(self.current_to, start)  # a local write may be ahead
        except Exception:
            outcome = Failure()
        finally:
            self._running = None
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if outcome is None:
                waiter.callback(None)
            else:
                waiter.errback(outcome)

    def _apply(self, found: dict[str, Any] | None,
               spellings: Spellings | None = None) -> None:
        """Fold a reading of the folder into the mirror: the rows above some MODSEQ the
        mirror has passed (a catch-up from its own, or SELECT's from an older one), at a
        snapshot no older than the mirror's -- else it is dropped. A row read again is
        the same or a newer version of it, so only rows above the mirror's MODSEQ join
        the change log, which stays in MODSEQ order."""
        if found is None:
            self.deleted = True
            self.loaded = True
            return
        first = not self.loaded
        self.recent_uid = max(self.recent_uid, found["recent_uid"])
        if not first and found["highestmodseq"] <= self.highestmodseq:
            return  # nothing the mirror does not have (or an older reading)
        before = self.highestmodseq
        rows = sorted(found["messages"], key=lambda r: r["modseq"])
        top = self.uids[-1] if self.uids else 0
        added: list[int] = []
        for row in rows:
            meta = MessageMeta(row["uid"], row["modseq"],
                               imap_store.flags_of(row, spellings))
            if meta.uid not in self.meta:
                added.append(meta.uid)
            self.meta[meta.uid] = meta
            if not first and meta.modseq > before:
                self._log.append((meta.modseq, meta.uid))
        if added:
            added.sort()
            if added[0] > top:
                self.uids.extend(added)
            else:
                self.uids = sorted(set(self.uids).union(added))
        present = found["present"]
        if present is not None:
            keep = set(present)
            removed = [u for u in self.uids if u not in keep]
            if removed:
                mark = found["expunged_modseq"]
                self.uids = [u for u in self.uids if u in keep]
                for uid in removed:
                    del self.meta[uid]
                    self._gone.append((mark, uid))
        self.highestmodseq = max(self.highestmodseq, found["highestmodseq"])
        self.expunged_modseq = max(self.expunged_modseq, found["expunged_modseq"])
        if first:
            self.loaded = True
            self._log_floor = self._gone_floor = self.highestmodseq
        self._trim()

    def _trim(self) -> None:
        if len(self._log) > LOG_MAX:
            cut = len(self._log) // 2
            self._log_floor = self._log[cut - 1][0]
            del self._log[:cut]
        if len(self._gone) > LOG_MAX:
            cut = len(self._gone) // 2
            self._gone_floor = self._gone[cut - 1][0]
            del self._gone[:cut]

    # ------------------------------------------------------------------ answering

    def changes(self, known_uids: list[int], since_modseq: int) -> Changes:
        """A session's answer, as the per-session query gave it (``known_uids`` are the
        session's view, ascending)."""
        if self.deleted:
            return Changes(expunged=list(known_uids), highestmodseq=since_modseq)
        top = known_uids[-1] if known_uids else 0
        new = [self.meta[u] for u in self.uids[bisect.bisect_right(self.uids, top):]]
        changed: list[MessageMeta] = []
        if self.highestmodseq > since_modseq:
            if since_modseq >= self._log_floor:
                start = bisect.bisect_right(self._log, (since_modseq, float("inf")))
                uids = {u for _, u in self._log[start:] if u <= top}
                candidates = [u for u in sorted(uids) if _known(known_uids, u)]
            else:
                candidates = known_uids
            for uid in candidates:
                meta = self.meta.get(uid)
                if meta is not None and meta.modseq > since_modseq:
                    changed.append(meta)
        expunged: list[int] = []
        if self.expunged_modseq > since_modseq:
            if since_modseq >= self._gone_floor:
                start = bisect.bisect_right(self._gone, (since_modseq, float("inf")))
                expunged = sorted({u for _, u in self._gone[start:]
                                   if _known(known_uids, u)})
            else:
                expunged = [u for u in known_uids if u not in self.meta]
        return Changes(new=new, changed=changed, expunged=expunged,
                       highestmodseq=max(self.highestmodseq, since_modseq)
                       if self.loaded else since_modseq)

    # ------------------------------------------------------------------ local writes

    def mark(self) -> tuple[int, int]:
        """Taken before a session of this process sends a write (:meth:`wrote`)."""
        return self.generation, self.notified

    def wrote(self, mark: tuple[int, int], modseq: int, metas: list[MessageMeta]) -> bool:
        """A session of this process committed a flag change: ``metas`` (the rows' new
        state) at ``modseq``, the folder's new HIGHESTMODSEQ. Why: without this, the
        write's own wake-up made every session here wait for a catch-up query after it
        (the writer's first), under load ~10 ms of a STORE's ~40.

        True when the mirror now holds the change (the caller need not force a
        catch-up): it read it already, or it was at ``modseq - 1`` -- every change
        below is in it, since each change to a folder takes the next MODSEQ under the
        folder row's lock -- and takes the rows as they are. The mirror is then also
        *current* (no catch-up owed for the wake-ups heard so far) when, since ``mark``,
        nothing but at most one NOTIFY was heard: PostgreSQL delivers notifications in
        commit order, so one heard before this write's own could only be of a change
        committed before it (below ``modseq``: held), and any later one would have come
        after this write's own (two). A forced poll (NOOP) or another local write
        meanwhile leaves that to a catch-up, as before."""
        if not self._next_is(modseq, [m.uid for m in metas]):
            return self._holds(modseq)
        for meta in sorted(metas, key=lambda m: m.uid):
            self.meta[meta.uid] = meta
            self._log.append((modseq, meta.uid))
        self._local_write_done(mark, modseq)
        return True

    def expunged(self, mark: tuple[int, int], modseq: int, uids: list[int]) -> bool:
        """A session of this process committed an EXPUNGE of ``uids``, which gave the
        folder ``modseq`` (its new HIGHESTMODSEQ and expunge mark): as :meth:`wrote`,
        so the other sessions here learn of it without a catch-up query after it."""
        if not self._next_is(modseq, uids):
            return self._holds(modseq)
        gone = set(uids)
        self.uids = [u for u in self.uids if u not in gone]
        for uid in sorted(gone):
            del self.meta[uid]
            self._gone.append((modseq, uid))
        self.expunged_modseq = modseq
        self._local_write_done(mark, modseq)
        return True

    def appended(self, mark: tuple[int, int], meta: MessageMeta) -> bool:
        """A session of this process committed an APPEND of ``meta`` (its MODSEQ the
        folder's new HIGHESTMODSEQ): as :meth:`wrote`, when it is the next change and
        the newest message, so the folder's sessions here see it without a catch-up."""
        top = self.uids[-1] if self.uids else 0
        if not self._next_is(meta.modseq, []) or meta.uid <= top:
            return self._holds(meta.modseq)
        self.meta[meta.uid] = meta
        self.uids.append(meta.uid)
        self._log.append((meta.modseq, meta.uid))
        self._local_write_done(mark, meta.modseq)
        return True

    def _holds(self, modseq: int) -> bool:
        """Whether the mirror already read the change that gave the folder ``modseq``."""
        return self.loaded and not self.deleted and modseq <= self.highestmodseq

    def _next_is(self, modseq: int, uids: list[int]) -> bool:
        """Whether a local change at ``modseq`` of these (known) messages is the next one
        the mirror can take as it is: every change below it is already in."""
        return (self.loaded and not self.deleted and modseq == self.highestmodseq + 1
                and all(uid in self.meta for uid in uids))

    def _local_write_done(self, mark: tuple[int, int], modseq: int) -> None:
        self.highestmodseq = modseq
        self._trim()
        generation, notified = mark
        heard = self.notified - notified
        if self.generation - generation == heard <= 1:
            self.current_to = max(self.current_to, self.generation)
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:  # they look again; a catch-up in flight serves the rest
                waiter.callback(None)

    def any_flagged(self, flag: str, uids: list[int] | None) -> bool:
        """Whether a message (among ``uids``; None: any) has ``flag`` as the mirror last
        read it: a hint only (EXPUNGE skips its locked transaction when the database,
        asked without a lock, agrees there is nothing to remove)."""
        metas = self.meta.values() if uids is None else \
            (self.meta.get(uid) for uid in uids)
        return any(meta is not None and flag in meta.flags for meta in metas)

    def take(self, folder: dict[str, Any], rows: list[dict[str, Any]],
             spellings: Spellings | None = None) -> None:
        """SELECT's reading of the folder from the mirror's MODSEQ then (it may have
        caught up since: an older reading is dropped, a re-read row is no news), with
        the spellings of its keywords (core.imap_spellings)."""
        self._apply({"highestmodseq": folder["highestmodseq"],
                     "expunged_modseq": folder["expunged_modseq"],
                     "recent_uid": folder["recent_uid"], "present": folder["present"],
                     "messages": rows}, spellings)

    def snapshot(self, highestmodseq: int) -> list[MessageMeta] | None:
        """Every message, ascending UID, if the mirror is at ``highestmodseq`` (a
        folder's state is a function of its HIGHESTMODSEQ: every change raises it)."""
        if not self.loaded or self.deleted or self.highestmodseq != highestmodseq:
            return None
        return [self.meta[u] for u in self.uids]

    def claimed(self, up_to_uid: int) -> None:
        """A session of this process claimed \\Recent up to ``up_to_uid``: the others
        need not try (the mark only rises)."""
        self.recent_uid = max(self.recent_uid, up_to_uid)


def _name_key(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


def _known(uids: list[int], uid: int) -> bool:
    i = bisect.bisect_left(uids, uid)
    return i < len(uids) and uids[i] == uid


class FolderMirrors:
    """The mirrors of one process (one per LISTEN notifier), by (org, folder id)."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._mirrors: OrderedDict[tuple[str, int], FolderMirror] = OrderedDict()
        self._names: dict[tuple[str, str, str], int] = {}  # (org, inbox, name) -> id

    def get(self, org_id: str, inbox_id: str, folder_id: int) -> FolderMirror:
        key = (org_id, folder_id)
        mirror = self._mirrors.get(key)
        if mirror is None or mirror.inbox_id != inbox_id:
            mirror = FolderMirror(org_id, inbox_id, folder_id)
            mirror.unwatch = self._notifier.watch(str(folder_id), mirror.heard)
            self._mirrors[key] = mirror
            self._forget_idle()
        self._mirrors.move_to_end(key)
        return mirror

    def by_name(self, org_id: str, inbox_id: str, name: str) -> FolderMirror | None:
        """The loaded mirror of the folder a SELECT of ``name`` last found, if any (a
        guess: the caller checks the id and MODSEQ against the folder it reads)."""
        folder_id = self._names.get((org_id, inbox_id, _name_key(name)))
        mirror = None if folder_id is None else self._mirrors.get((org_id, folder_id))
        if mirror is None or not mirror.loaded or mirror.deleted \
                or mirror.inbox_id != inbox_id:
            return None
        return mirror

    def named(self, org_id: str, inbox_id: str, name: str, folder_id: int) -> None:
        """SELECT found ``name`` to be ``folder_id``."""
        key = (org_id, inbox_id, _name_key(name))
        self._names.pop(key, None)
        self._names[key] = folder_id
        while len(self._names) > 4 * IDLE_MIRRORS + len(self._mirrors):
            del self._names[next(iter(self._names))]

    def watch(self, org_id: str, inbox_id: str, folder_id: int,
              callback: Callable[[], None]) -> Callable[[], None]:
        """A session's wake-up for the folder, called after the mirror has heard."""
        mirror = self.get(org_id, inbox_id, folder_id)
        mirror.sessions.add(callback)

        def cancel() -> None:
            mirror.sessions.discard(callback)

        return cancel

    def loaded(self, org_id: str, inbox_id: str, folder_id: int) -> FolderMirror | None:
        """The folder's mirror if this process keeps one (a session watches it)."""
        mirror = self._mirrors.get((org_id, folder_id))
        if mirror is None or mirror.inbox_id != inbox_id or not mirror.loaded:
            return None
        return mirror

    def touched(self, org_id: str, inbox_id: str, folder_ids: Iterable[int] = (),
                names: Iterable[str] = ()) -> None:
        """A session of this process wrote to the inbox: the mirrors of the folders it
        wrote to (by id, or by name as SELECT found it; none given: every folder of the
        inbox) catch up before they answer again (the write's NOTIFY reaches us only a
        moment later). Only those: a write elsewhere in the inbox used to send every
        folder's sessions to the database after it (and spoil :meth:`FolderMirror.wrote`)."""
        ids = set(folder_ids)
        for name in names:
            folder_id = self._names.get((org_id, inbox_id, _name_key(name)))
            if folder_id is None:  # not known here: any mirror may be it
                ids.clear()
                break
            ids.add(folder_id)
        for mirror in self._mirrors.values():
            if mirror.org_id == org_id and mirror.inbox_id == inbox_id \
                    and (not ids or mirror.folder_id in ids):
                mirror.generation += 1

    def _forget_idle(self) -> None:
        idle = [k for k, m in self._mirrors.items() if not m.sessions]
        for key in idle[:max(0, len(idle) - IDLE_MIRRORS)]:
            mirror = self._mirrors.pop(key)
            if mirror.unwatch is not None:
                mirror.unwatch()


_BY_NOTIFIER: weakref.WeakKeyDictionary[Notifier, FolderMirrors] = (
    weakref.WeakKeyDictionary())


def mirrors_for(notifier: Notifier) -> FolderMirrors:
    """The process's mirrors behind ``notifier`` (one set per LISTEN connection)."""
    mirrors = _BY_NOTIFIER.get(notifier)
    if mirrors is None:
        mirrors = _BY_NOTIFIER[notifier] = FolderMirrors(notifier)
    return mirrors
