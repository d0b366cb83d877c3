"""Keyword spellings this process knows are recorded (split from core.imap_messages,
by job: a cache shared by every IMAP session of the process)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class RecordedSpellings:
    """Keyword spellings this process knows are recorded, per inbox (folded -> first
    seen). A recorded spelling never changes (storage.keywords), so once seen it may be
    used for good: STORE and APPEND of keywords an inbox already knows then skip the
    spelling statement (APPEND: a round trip and a COMMIT of its own). Keyed by
    (org, inbox). Bounded whatever clients invent: the least recently used inboxes are
    forgotten, and an inbox keeps at most ``max_keywords`` (beyond: read every time)."""

    def __init__(self, max_inboxes: int = 512, max_keywords: int = 128) -> None:
        self._max = max_inboxes
        self._max_keywords = max_keywords
        self._known: OrderedDict[tuple[str, str], dict[str, str]] = OrderedDict()

    def lookup(self, inbox: tuple[str, str],
               folded: Iterable[str]) -> dict[str, str] | None:
        """The spellings of every one of ``folded`` ({} for none), or None when one is
        not known."""
        folded = list(folded)
        if not folded:
            return {}
        known = self._known.get(inbox)
        if known is None:
            return None
        out: dict[str, str] = {}
        for keyword in folded:
            spelling = known.get(keyword)
            if spelling is None:
                return None
            out[keyword] = spelling
        self._known.move_to_end(inbox)
        return out

    def learn(self, inbox: tuple[str, str], spellings: dict[str, str]) -> None:
        """Remember spellings read back from the database (committed ones only)."""
        if not spellings:
            return
        known = self._known.setdefault(inbox, {})
        for keyword, spelling in spellings.items():
            if len(known) >= self._max_keywords:
                break
            known[keyword] = spelling
        self._known.move_to_end(inbox)
        while len(self._known) > self._max:
            self._known.popitem(last=False)


#: Shared by every session of the process (the rows are the same for all of them).
RECORDED_SPELLINGS = RecordedSpellings()
