"""SEARCH keys decided from the session's view of the selected mailbox, without a query.

Why: most SEARCHes clients send while polling are about flags and numbers (``UNSEEN``,
``OR SEEN FLAGGED``, ``KEYWORD $Label1``, ``NOT DELETED``, ``UID 40:*``, ``$``), and the
view (:class:`~agentpost.imap.selected.SelectedMailbox` ``meta``) already holds every
message's UID, flags and MODSEQ, with \\Recent and the saved result beside them. Under the
mixed load each of those SEARCHes cost 1.5-2 ms of PostgreSQL (a scan of the folder's
rows) and a round trip (issue 10, speed); :mod:`agentpost.imap.commands.search` asks
:func:`matches` first and the database only when this returns None.

The key is the one :meth:`SelectedMailbox.resolve_search` gives the database (sequence
sets, UID sets, ``$`` and RECENT already UIDs of the view), and each criterion means
what ``storage.imap.search_sql`` makes of it, so both paths find the same messages:

- ``("all",)``; ``("uid", uids)``; ``("and", [...])``, ``("or", a, b)``, ``("not", k)``;
- ``("flag", f, on)``: the five stored system flags as the view holds them; any other
  (none is parsed today) is never set, as no column stores it;
- ``("keyword", k, on)``: the folded keyword among the message's folded keywords
  (i;ascii-casemap, :func:`agentpost.mail.keywords.fold`), whatever spelling the view
  shows; a system flag's name (``KEYWORD \\Seen``) is no keyword, so matches nothing;
- ``("modseq", n)``: MODSEQ at least n (an entry name, RFC 7162 §3.1.5, is parsed and
  ignored by both paths: one MODSEQ per message).

Anything else (text, headers, dates, sizes) returns None: the view does not hold it.
Pure functions of the key and the view; no I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from agentpost.imap.interfaces import MessageMeta
from agentpost.imap.selected import SelectedMailbox
from agentpost.imap.wire import SYSTEM_FLAGS
from agentpost.mail.keywords import fold

#: A compiled criterion: does the message with this UID and state match?
Predicate = Callable[[int, MessageMeta], bool]

_STORED_FLAGS = frozenset(SYSTEM_FLAGS)
#: Criteria evaluations (keys x messages) one SEARCH may cost the reactor thread; above
#: it the database decides (statement_timeout bounds it there, and the process keeps
#: serving): a hostile key of a thousand ORs over a mailbox of 100,000 messages would
#: otherwise hold every session of the process for seconds.
MAX_EVALUATIONS = 200_000


#: The criteria the view decides, as parsed (sequence sets, UID sets, RECENT) and as
#: resolved for the database (UID lists).
_DECIDABLE = frozenset({"all", "seq", "uidset", "recent", "uid", "flag", "keyword",
                        "modseq"})


def decidable(key: tuple[Any, ...]) -> bool:
    """Whether every criterion of a key (parsed or resolved) can be decided from the
    view."""
    return _cost(key) is not None


def _cost(key: tuple[Any, ...]) -> int | None:
    """The criteria of a key tree (what each message costs to test), or None when one
    of them needs the database."""
    op = key[0]
    if op in _DECIDABLE:
        return 1
    parts = key[1] if op == "and" else key[1:] if op in ("or", "not") else None
    if parts is None:
        return None
    total = 1
    for part in parts:
        inner = _cost(part)
        if inner is None:
            return None
        total += inner
    return total


def matches(view: SelectedMailbox, key: tuple[Any, ...]) -> list[int] | None:
    """The UIDs of the view matching a resolved key, ascending (the database path's
    order), or None when the key needs the database.

    A message another session expunged stays in this session's view until the expunge
    may be reported (never during SEARCH without UID, RFC 3501 §7.4.1). The database
    path cannot find it any more (the row is gone); here, an expunge the session has
    already heard of (``view.pending_expunged``) is left out the same way, so the
    answer is the database path's. One it has not heard of yet (another process's,
    before its NOTIFY) is matched from the flags the session last reported, the state
    the client holds, as a FETCH of its flags describes it (commands/fetch.py); the
    EXPUNGE follows at the next command that may carry it."""
    cost = _cost(key)
    if cost is None or cost * len(view.uids) > MAX_EVALUATIONS:
        return None
    gone = view.pending_expunged
    uids = [u for u in view.uids if u not in gone] if gone else view.uids
    meta = view.meta
    op = key[0]
    # The keys clients poll with most, without a call per message.
    if op == "all":
        return list(uids)
    if op == "uid":  # a bare set (``UID 1:*``, ``1:5``, ``$``)
        wanted = set(key[1])
        return [u for u in uids if u in wanted]
    if op == "flag" and key[1] in _STORED_FLAGS:
        flag, on = key[1], bool(key[2])
        return [u for u in uids if (flag in meta[u].flags) is on]
    test = _compile(key)
    return [u for u in uids if test(u, meta[u])]


def _compile(key: tuple[Any, ...]) -> Predicate:
    """A predicate for a decidable key (see :func:`decidable`)."""
    op = key[0]
    if op == "all":
        return lambda uid, meta: True
    if op == "uid":
        wanted = frozenset(key[1])
        return lambda uid, meta: uid in wanted
    if op == "flag":
        flag, on = key[1], bool(key[2])
        if flag not in _STORED_FLAGS:  # nothing stores it: never set
            return lambda uid, meta: not on
        return lambda uid, meta: (flag in meta.flags) is on
    if op == "keyword":
        folded, on = fold(key[1]), bool(key[2])
        return lambda uid, meta: (folded in _keywords(meta.flags)) is on
    if op == "modseq":
        least = int(key[1])
        return lambda uid, meta: meta.modseq >= least
    if op == "not":
        inner = _compile(key[1])
        return lambda uid, meta: not inner(uid, meta)
    if op == "or":
        first, second = _compile(key[1]), _compile(key[2])
        return lambda uid, meta: first(uid, meta) or second(uid, meta)
    if op == "and":
        parts = [_compile(k) for k in key[1]]
        if len(parts) == 1:
            return parts[0]
        return lambda uid, meta: all(p(uid, meta) for p in parts)
    raise ValueError(f"not decidable from the view: {op!r}")


@functools.lru_cache(maxsize=4096)
def _keywords(flags: frozenset[str]) -> frozenset[str]:
    """The folded keywords of a flag set, as ``messages.labels`` stores them (system
    flags apart). A folder has few distinct flag sets and they are shared objects
    (``storage.imap.flags_of``), so this is a cache hit per message."""
    return frozenset(fold(f) for f in flags if not f.startswith("\\"))
