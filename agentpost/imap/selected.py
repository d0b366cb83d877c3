"""The selected mailbox as one session sees it: its own sequence-number view.

Why an object of its own: every selected-state command reads or changes the same
bookkeeping (the UID list behind sequence numbers, per-UID flags and MODSEQ, the
session's \\Recent set, expunges that must wait, the highest MODSEQ reported), and
RFC 3501 §7.4.1 makes its consistency subtle. Here it is in one place, with the
folder handle it came from; the session holds one while SELECTED and none otherwise.
It renders nothing: the command modules and :mod:`agentpost.imap.updates` write the
responses from what it answers.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agentpost.imap.errors import bad
from agentpost.imap.interfaces import Changes, FolderSnapshot, IMAPFolder, MessageMeta
from agentpost.imap.parser import SavedResult, SeqSet, merge_ranges, resolve_seqset
from agentpost.imap.wire import flag_list

if TYPE_CHECKING:
    from agentpost.imap.commands.contexts import SearchContext

log = logging.getLogger(__name__)


class SelectedMailbox:
    """One session's view of its selected folder (built at SELECT/EXAMINE).

    Attributes:
        folder: the backend's handle to the folder.
        snapshot: what SELECT returned (name, UIDVALIDITY...), not kept up to date.
        readonly: EXAMINE, or a key without messages:write.
        uids: the view's UIDs, ascending: sequence number n is ``uids[n - 1]``.
        meta: the last flags and MODSEQ the session reported, per UID.
        recent: the UIDs this session reports as \\Recent.
        show_recent: whether FLAGS carry \\Recent (not for an IMAP4rev2 client).
        pending_expunged: expunges seen while they could not be reported.
        saved: the UIDs ``SEARCH RETURN (SAVE)`` kept for ``$`` (RFC 5182), ascending;
            empty at SELECT/EXAMINE, gone with the view at CLOSE/UNSELECT.
        highestmodseq: the highest MODSEQ the session knows about.
        dirty: the folder may have changed since the session last looked.
    """

    def __init__(self, folder: IMAPFolder, snapshot: FolderSnapshot, *, readonly: bool,
                 seen_up_to: int) -> None:
        self.folder = folder
        self.snapshot = snapshot
        self.readonly = readonly
        self.uids = [m.uid for m in snapshot.messages]
        self.meta: dict[int, MessageMeta] = {m.uid: m for m in snapshot.messages}
        self.recent: set[int] = set(self.uids[bisect.bisect_right(self.uids, seen_up_to):])
        self.show_recent = True  # False after ENABLE IMAP4rev2: RFC 9051 has no \\Recent
        self.pending_expunged: set[int] = set()
        self.saved: list[int] = []
        self.highestmodseq = snapshot.highestmodseq
        self.dirty = False
        # RFC 5267 UPDATE contexts by tag (agentpost.imap.commands.contexts): they end
        # with the selection.
        self.search_contexts: dict[str, SearchContext] = {}
        self._unwatch: Callable[[], None] | None = None

    @property
    def name(self) -> str:
        return self.snapshot.name

    @property
    def top_uid(self) -> int:
        """The highest UID of the view (0 when empty)."""
        return self.uids[-1] if self.uids else 0

    # ------------------------------------------------------------------ watching

    def watch(self, on_change: Callable[[], None]) -> None:
        """Mark the view dirty, then call ``on_change``, whenever the folder may change."""

        def changed() -> None:
            self.dirty = True
            on_change()

        self._unwatch = self.folder.watch(changed)

    def stop_watching(self, session_id: str = "") -> None:
        if self._unwatch is not None:
            unwatch, self._unwatch = self._unwatch, None
            try:
                unwatch()
            except Exception:
                log.exception("imap %s: unwatch failed", session_id)

    # ------------------------------------------------------------------ numbers

    def seq(self, uid: int) -> int:
        """The sequence number of a UID of the view."""
        return bisect.bisect_left(self.uids, uid) + 1

    def flags_text(self, uid: int, flags: frozenset[str]) -> str:
        return flag_list(flags, self.show_recent and uid in self.recent)

    def seq_uids(self, seqset: SeqSet, uid: bool, strict: bool = True) -> list[int]:
        """UIDs of the view addressed by a sequence set (UID set when ``uid``), ascending.
        The ranges are merged first: ``1:*`` repeated 50,000 times is one pass. A number
        beyond the mailbox is BAD when ``strict`` (FETCH, STORE...), else matches nothing
        (a SEARCH key, as Dovecot answers)."""
        if isinstance(seqset, SavedResult):  # "$": UIDs, expunged ones dropped (RFC 5182)
            return [u for u in self.saved if u in self.meta]
        out: list[int] = []
        if uid:
            for lo, hi in merge_ranges(resolve_seqset(seqset, self.top_uid)):
                i = bisect.bisect_left(self.uids, lo)
                j = bisect.bisect_right(self.uids, hi)
                out += self.uids[i:j]
            return out
        count = len(self.uids)
        ranges = []
        for pair, (lo, hi) in zip(seqset, resolve_seqset(seqset, count), strict=True):
            if None in pair:  # "n:*" with n beyond the end means just the last one
                lo, hi = max(1, min(lo, count)), min(hi, count)
                if count == 0:
                    continue
            elif hi > count:
                if strict:
                    raise bad("Invalid message sequence number")
                if lo > count:
                    continue
                hi = count
            ranges.append((lo, hi))
        for lo, hi in merge_ranges(ranges):
            out += self.uids[lo - 1:hi]
        return out

    def missing(self, ranges: list[tuple[int, int]]) -> str:
        """The UIDs of ``ranges`` not in the view, as a compact set (gaps, not a list:
        a client may claim ``1:4000000000``)."""
        top = self.top_uid
        out: list[str] = []
        for a, b in merge_ranges(ranges):  # each UID of the view is visited once
            b = min(b, top)
            pos = bisect.bisect_left(self.uids, a)
            nxt = a
            while nxt <= b:
                present = self.uids[pos] if pos < len(self.uids) else b + 1
                if present > nxt:  # a gap before the next UID that exists
                    end = min(present - 1, b)
                    out.append(str(nxt) if end == nxt else f"{nxt}:{end}")
                nxt = present + 1
                pos += 1
        return ",".join(out)

    def resolve_search(self, key: tuple[Any, ...], modseq: list[bool]) -> tuple[Any, ...]:
        """A parsed search key with sequence sets and RECENT turned into UIDs (what the
        backend understands); sets ``modseq[0]`` when the key uses MODSEQ."""
        kind = key[0]
        if kind == "seq":
            return ("uid", self.seq_uids(key[1], False, strict=False))
        if kind == "uidset":
            return ("uid", self.seq_uids(key[1], True))
        if kind == "recent":
            return ("uid", sorted(self.recent))
        if kind == "and":
            return ("and", [self.resolve_search(k, modseq) for k in key[1]])
        if kind == "or":
            return ("or", self.resolve_search(key[1], modseq),
                    self.resolve_search(key[2], modseq))
        if kind == "not":
            return ("not", self.resolve_search(key[1], modseq))
        if kind == "modseq":
            modseq[0] = True
        return key

    def max_modseq(self, uids: list[int]) -> int:
        return max(self.meta[u].modseq for u in uids)

    # ------------------------------------------------------------------ changes

    def remove(self, uids: list[int]) -> tuple[list[int], list[int]]:
        """Drop UIDs from the view: (the UIDs that were in it, their sequence numbers
        before the removal, descending -- the order EXPUNGE responses need)."""
        present = {u for u in uids if u in self.meta}
        if not present:
            return [], []
        seqs = sorted((self.seq(u) for u in present), reverse=True)
        self.uids = [u for u in self.uids if u not in present]
        for uid in present:
            del self.meta[uid]
            self.recent.discard(uid)
        return sorted(present), seqs

    def take_expunged(self, changes: Changes, report: bool) -> list[int]:
        """The expunges to announce now. Those seen during FETCH/STORE/SEARCH wait
        (RFC 3501 §7.4.1) in a set of their own: the account reports each expunge once,
        not again at the next poll."""
        self.pending_expunged.update(changes.expunged)
        if report and self.pending_expunged:
            gone, self.pending_expunged = sorted(self.pending_expunged), set()
            return gone
        if self.pending_expunged:
            self.dirty = True  # report them at the next command that allows it
        return []

    def update(self, meta: MessageMeta) -> bool:
        """Take a message's new flags/MODSEQ; False when it is not in the view or
        nothing the client knows changed."""
        old = self.meta.get(meta.uid)
        if old is None or (old.flags == meta.flags and old.modseq >= meta.modseq):
            return False
        self.meta[meta.uid] = meta
        return True

    def arrivals(self, new: list[MessageMeta]) -> list[MessageMeta]:
        """The new messages above the view, ascending UID."""
        top = self.top_uid
        found = [m for m in new if m.uid not in self.meta and (not self.uids or m.uid > top)]
        found.sort(key=lambda m: m.uid)
        return found

    def add(self, new: list[MessageMeta], seen_up_to: int) -> None:
        """Append arrivals to the view; those above ``seen_up_to`` are this session's
        \\Recent."""
        for meta in new:
            if meta.uid in self.meta:
                continue
            self.uids.append(meta.uid)
            self.meta[meta.uid] = meta
            if meta.uid > seen_up_to:
                self.recent.add(meta.uid)
