"""SEARCH (with ESEARCH's RETURN, RFC 4731) and SORT (RFC 5256, SORT=DISPLAY RFC 5957).

Both resolve the parsed key against the session's view (sequence numbers, RECENT)
with :meth:`SelectedMailbox.resolve_search`, ask the folder, and answer in the
numbering the command used; SORT is ordered by the backend (in SQL).

A SEARCH whose every criterion the view holds (flags, keywords, MODSEQ, sequence and
UID sets, ``$``, RECENT: :mod:`agentpost.imap.view_search`) is answered from the view,
without a query (issue 10, speed; :data:`FROM_VIEW`). Before it, the changes the
folder's process-wide mirror knows of and the view does not yet are taken in, as the
dispatcher takes them after any command (unsolicited FETCH, EXISTS; expunges wait, RFC
3501 §7.4.1): so the view answers from the state the database path would read, a
change by another session of this process included (told just before the answer
instead of just after it), and the SEARCH (or ESEARCH) response is byte for byte the
database path's. SORT and THREAD still ask the database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentpost.imap import rev2, searchres, view_search
from agentpost.imap.commands import contexts
from agentpost.imap.commands.common import selected
from agentpost.imap.errors import no
from agentpost.imap.parser import Atom, Command, ParseError, astring
from agentpost.imap.search_grammar import parse_search
from agentpost.imap.selected import SelectedMailbox
from agentpost.imap.updates import enable_condstore, report_changes
from agentpost.imap.wire import quote
from agentpost.mail import imapformat

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

_SORT_KEYS = ("ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM",
              "DISPLAYTO")
_ESEARCH_RETURNS = ("MIN", "MAX", "COUNT", "ALL", "SAVE")  # SAVE: RFC 5182
_CHARSETS = ("UTF-8", "US-ASCII")


async def search(session: IMAP4ServerProtocol, command: Command) -> None:
    view = selected(session)
    try:
        await _search(session, view, command)
    except Exception:
        if searchres.asks_to_save(command.args):  # RFC 5182 §2.1: "$" is now empty
            view.saved = []
        raise


async def _search(session: IMAP4ServerProtocol, view: SelectedMailbox,
                  command: Command) -> None:
    args, context = contexts.take_options(session, command, list(command.args))
    args, returns = _return_options(args)
    if context is not None:  # RFC 5267: PARTIAL, UPDATE, CONTEXT
        returns = context.search_returns(returns)
    charset, key = parse_search(args)
    if charset not in (None, *_CHARSETS):
        raise no("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    rev2.refuse_removed_search_keys(session, key)
    if returns is None and session.imap4rev2:
        returns = ["ALL"]  # RFC 9051 §6.4.4: ESEARCH, never SEARCH
    found, wants_modseq = await _run(session, view, key)
    if returns is not None and "SAVE" in returns:
        view.saved = searchres.saved_uids(found, returns)  # after "$" in the key was read
        if set(returns) == {"SAVE"}:
            return  # SAVE alone: no ESEARCH response (RFC 5182 §2.1)
    numbers = found if command.uid else [view.seq(u) for u in found]
    if returns is not None:
        text = _esearch(view, command, returns, found, numbers, wants_modseq,
                        partial=context is not None and context.partial is not None)
        if context is not None:
            contexts.reply(session, command, context, text, key, found, numbers)
            return
        session.send(text)
        return
    session.send(_numbers_line("SEARCH", view, found, numbers, wants_modseq))


def _return_options(args: list[Any]) -> tuple[list[Any], list[str] | None]:
    """ESEARCH (RFC 4731): RETURN (MIN MAX COUNT ALL); "()" means ALL."""
    if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "RETURN":
        options = args[1]
        if not isinstance(options, list):
            raise ParseError("RETURN needs a list")
        returns = [str(o).upper() for o in options] or ["ALL"]
        for option in returns:
            if option not in _ESEARCH_RETURNS:
                raise ParseError(f"Unknown SEARCH return option {option}")
        return args[2:], returns
    return args, None


#: Answer a SEARCH the view can decide from the view (tests turn it off to compare).
FROM_VIEW = True


async def _run(session: IMAP4ServerProtocol, view: SelectedMailbox, key: tuple[Any, ...],
               sort: list[tuple[str, bool]] | None = None) -> tuple[list[int], bool]:
    """(matching UIDs still in the view, whether the key used MODSEQ)."""
    if FROM_VIEW and sort is None and view_search.decidable(key):
        await _catch_up(session, view)
    wants_modseq = [False]
    resolved = view.resolve_search(key, wants_modseq)
    if wants_modseq[0]:
        enable_condstore(session)
    if FROM_VIEW and sort is None:
        found_in_view = view_search.matches(view, resolved)
        if found_in_view is not None:
            return found_in_view, wants_modseq[0]
    if sort is None:
        found = await view.folder.search(resolved)
    else:
        found = await view.folder.search(resolved, sort)
    return [u for u in found if u in view.meta], wants_modseq[0]


async def _catch_up(session: IMAP4ServerProtocol, view: SelectedMailbox) -> None:
    """Take into the view what the folder's mirror knows and the view does not, before
    the view answers (see the module docstring): flag changes and arrivals are told now,
    expunges wait in ``view.pending_expunged`` (the view leaves those out). Costs no
    query while the mirror is current (``fresh`` is false)."""
    view.dirty = True
    await report_changes(session, expunge=False)


def _esearch(view: SelectedMailbox, command: Command, returns: list[str], found: list[int],
             numbers: list[int], wants_modseq: bool, *, partial: bool = False) -> str:
    text = f"* ESEARCH (TAG {quote(command.tag)})"
    if command.uid:
        text += " UID"
    if numbers:
        if "MIN" in returns:
            text += f" MIN {min(numbers)}"
        if "MAX" in returns:
            text += f" MAX {max(numbers)}"
        if "ALL" in returns:
            text += f" ALL {imapformat.compact_numbers(numbers)}"
    if "COUNT" in returns:
        text += f" COUNT {len(numbers)}"
    if wants_modseq and found:
        text += f" MODSEQ {view.max_modseq(_modseq_of(returns, found, partial=partial))}"
    return text


def _modseq_of(returns: list[str], found: list[int], *, sort: bool = False,
               partial: bool = False) -> list[int]:
    """The UIDs whose highest mod-sequence the ESEARCH MODSEQ item gives: those the
    response returns (RFC 4731 §3.2; ESORT, RFC 5267 §3, follows it), so with MIN
    and/or MAX alone just those one or two messages (as Dovecot answers), else every
    match. MIN and MAX are the first and last in sort order for SORT."""
    shown = set(returns) - {"SAVE"}  # SAVE returns nothing (RFC 5182 §2.1)
    if partial or not shown or not shown <= {"MIN", "MAX"}:
        return found
    first, last = (found[0], found[-1]) if sort else (min(found), max(found))
    return [u for u, option in ((first, "MIN"), (last, "MAX")) if option in returns]


def _numbers_line(verb: str, view: SelectedMailbox, found: list[int], numbers: list[int],
                  wants_modseq: bool) -> str:
    """``* SEARCH 1 2 3 (MODSEQ n)`` or ``* SORT ...``."""
    text = f"* {verb}" + "".join(f" {n}" for n in numbers)
    if wants_modseq and found:
        text += f" (MODSEQ {view.max_modseq(found)})"
    return text


async def sort(session: IMAP4ServerProtocol, command: Command) -> None:
    """SORT: SEARCH, ordered in SQL."""
    view = selected(session)
    args, esort = contexts.take_options(session, command, list(command.args), sort=True)
    if len(args) < 3 or not isinstance(args[0], list) or not args[0]:
        raise ParseError("SORT needs (criteria), a charset and search keys")
    criteria = _sort_criteria(args[0])
    charset = astring(args[1], "charset").upper()
    if charset not in _CHARSETS:
        raise no("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    if esort is None and len(args) > 3:
        # RFC 5267 §3.1 puts RETURN (...) right after SORT; imaptest's sort-partial
        # sends it after the charset (Dovecot 2.3 answers that BAD). No search key is
        # named RETURN, so both spellings are unambiguous and we take either.
        rest, esort = contexts.take_options(session, command, list(args[2:]), sort=True)
        args = [*args[:2], *rest]
    _, key = parse_search(args[2:])
    found, wants_modseq = await _run(session, view, key, criteria)
    if esort is not None:  # SORT RETURN (...): ESORT, CONTEXT=SORT (RFC 5267)
        modseq = (view.max_modseq(_modseq_of(esort.returns, found, sort=True,
                                             partial=esort.partial is not None))
                  if wants_modseq and found else None)
        contexts.reply_sort(session, command, esort, key, criteria, found, modseq)
        return
    numbers = found if command.uid else [view.seq(u) for u in found]
    session.send(_numbers_line("SORT", view, found, numbers, wants_modseq))


def _sort_criteria(tokens: list[Any]) -> list[tuple[str, bool]]:
    """[(sort key, reverse)] of ``(REVERSE DATE SUBJECT)``."""
    criteria: list[tuple[str, bool]] = []
    reverse = False
    for token in tokens:
        name = str(token).upper()
        if name == "REVERSE":
            if reverse:
                raise ParseError("REVERSE REVERSE")
            reverse = True
            continue
        if name not in _SORT_KEYS:
            raise ParseError(f"Unknown sort key {name}")
        criteria.append((name, reverse))
        reverse = False
    if reverse or not criteria:
        raise ParseError("REVERSE must precede a sort key")
    return criteria
