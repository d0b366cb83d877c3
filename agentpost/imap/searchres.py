"""SEARCHRES (RFC 5182): ``SEARCH RETURN (SAVE ...)`` and the ``$`` it fills.

Where the pieces live: :func:`agentpost.imap.parser.parse_seqset` turns ``$`` into a
:class:`~agentpost.imap.parser.SavedResult` for the commands that accept it (FETCH,
STORE, COPY, MOVE, UID EXPUNGE, SEARCH keys, their UID forms; anywhere else it is
BAD); :meth:`agentpost.imap.selected.SelectedMailbox.seq_uids` resolves it to the saved
UIDs still in the view; the saved UIDs themselves are the view's ``saved``, so
SELECT, EXAMINE, CLOSE and UNSELECT -- which build or drop the view -- reset ``$`` to
empty (RFC 5182 §2.1). This module decides what a SEARCH saves.

Why UIDs: the RFC says the result names messages, not numbers; sequence numbers shift
with every expunge, UIDs do not, and a message expunged since drops out of ``$``.
"""

from __future__ import annotations

from typing import Any

from agentpost.imap.parser import Atom

__all__ = ["asks_to_save", "saved_uids"]


def asks_to_save(args: list[Any]) -> bool:
    """Whether SEARCH's arguments start ``RETURN (... SAVE ...)``: read from the raw
    tokens, so that a SEARCH failing even on its syntax still empties ``$``
    (RFC 5182 §2.1: a failed SEARCH with SAVE leaves the variable empty)."""
    return (len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "RETURN"
            and isinstance(args[1], list)
            and any(isinstance(o, Atom) and o.upper() == "SAVE" for o in args[1]))


def saved_uids(found: list[int], returns: list[str]) -> list[int]:
    """The UIDs ``RETURN (SAVE ...)`` keeps (RFC 5182 §2.4): with MIN and/or MAX but
    neither ALL nor COUNT, only the message(s) those return; otherwise all found.
    ``found`` is in UID order, which is also sequence order."""
    if not found or "ALL" in returns or "COUNT" in returns or \
            not ("MIN" in returns or "MAX" in returns):
        return sorted(found)
    ordered = sorted(found)
    kept = set()
    if "MIN" in returns:
        kept.add(ordered[0])
    if "MAX" in returns:
        kept.add(ordered[-1])
    return sorted(kept)
