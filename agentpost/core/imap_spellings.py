"""Keyword spellings this process knows are recorded (split from core.imap_messages,
by job: a cache shared by every IMAP session of the process).

Flag reads (SELECT, FETCH, the catch-ups, STORE's locked read) return keywords folded
only; the spellings to show them in come from here. A read that returns a keyword this
process has not seen for the inbox asks the database for the unknown ones in one
statement before the flags are built (:meth:`RecordedSpellings.of_rows`): a keyword
another process recorded a moment ago is then shown as recorded, and the per-row
subquery every flag read paid before (0.5-1 ms of PostgreSQL per FETCH 1:100 FLAGS
under the mixed load) is gone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from agentpost.mail.keywords import fold
from agentpost.storage import keywords as keyword_store
from agentpost.storage.database import Database, Txn

#: Folded -> recorded spelling, for storage.imap.flags_of.
Spellings = Mapping[str, str]
#: Reads the recorded spellings of some folded keywords (storage.keywords.recorded).
Reader = Callable[[list[str]], Awaitable[dict[str, str]]]
_NONE: dict[str, str] = {}


class RecordedSpellings:
    """Keyword spellings this process knows are recorded, per inbox (folded -> first
    seen). A recorded spelling never changes (storage.keywords), so once seen it may be
    used for good: STORE and APPEND of keywords an inbox already knows then skip the
    spelling statement (APPEND: a round trip and a COMMIT of its own), and every flag
    read shows keywords without reading their spellings (:meth:`of_rows`). Keyed by
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
        """Remember spellings read back from the database (committed ones only; one
        that does not fold back to its keyword is not a spelling)."""
        if not spellings:
            return
        known = self._known.setdefault(inbox, {})
        for keyword, spelling in spellings.items():
            if len(known) >= self._max_keywords:
                break
            if fold(spelling) == keyword:
                known[keyword] = spelling
        self._known.move_to_end(inbox)
        while len(self._known) > self._max:
            self._known.popitem(last=False)

    def missing(self, inbox: tuple[str, str], rows: Iterable[Mapping[str, Any]],
                given: Spellings = _NONE) -> list[str]:
        """The folded keywords of ``rows`` (their ``labels``) whose spelling neither this
        process nor ``given`` knows, sorted."""
        known = self._known.get(inbox, _NONE)
        out: set[str] = set()
        for row in rows:
            labels = row["labels"]
            if labels:
                out.update(k for k in labels if k not in known and k not in given)
        return sorted(out)

    async def of_rows(self, inbox: tuple[str, str], rows: Iterable[Mapping[str, Any]],
                      read: Reader, *, given: Spellings = _NONE,
                      learn: Callable[[dict[str, str]], None] | None = None
                      ) -> Spellings:
        """The spellings to show the keywords of ``rows`` in (with ``given``, spellings
        the caller already has). Keywords the process does not know are read with ONE
        call of ``read`` and learnt (through ``learn`` when given: a transaction learns
        after its COMMIT). A keyword with no recorded spelling, or one past the inbox's
        ``max_keywords``, is read again every time: a spelling may be recorded for it
        later, and correctness comes first."""
        unknown = self.missing(inbox, rows, given)
        known = self._known.get(inbox)
        if known is not None:
            self._known.move_to_end(inbox)
        if not unknown:
            return {**known, **given} if given and known else (known or given)
        found = await read(unknown)
        if learn is None:
            self.learn(inbox, found)
        else:
            learn(found)
        return {**(known or _NONE), **found, **given}


#: Shared by every session of the process (the rows are the same for all of them).
RECORDED_SPELLINGS = RecordedSpellings()


async def spellings_read(db: Database, inbox: tuple[str, str],
                         rows: Iterable[Mapping[str, Any]],
                         cache: RecordedSpellings | None = None) -> Spellings:
    """The spellings for rows a one-statement read (Database.run_read) returned; an
    unknown keyword costs one more such read. Its spelling, if any, was committed no
    later than the row that holds the keyword, so this later snapshot sees it."""
    org_id, inbox_id = inbox

    async def read(folded: list[str]) -> dict[str, str]:
        return await db.run_read("imap.keywords", keyword_store.recorded, org_id,
                                 inbox_id, folded)

    return await (cache or RECORDED_SPELLINGS).of_rows(inbox, rows, read)


async def spellings_in(txn: Txn, inbox: tuple[str, str],
                       rows: Iterable[Mapping[str, Any]], given: Spellings = _NONE,
                       cache: RecordedSpellings | None = None) -> Spellings:
    """:func:`spellings_read` inside a transaction: an unknown keyword is read in it,
    and learnt only once it commits (it may see the transaction's own spellings)."""
    known = cache or RECORDED_SPELLINGS
    org_id, inbox_id = inbox

    async def read(folded: list[str]) -> dict[str, str]:
        return await keyword_store.recorded(txn, org_id, inbox_id, folded)

    def learn(found: dict[str, str]) -> None:
        txn.after_commit(known.learn, inbox, found)

    return await known.of_rows(inbox, rows, read, given=given, learn=learn)
