"""ESORT and CONTEXT=SEARCH / CONTEXT=SORT (RFC 5267): the return options SEARCH and
SORT gain beyond ESEARCH's, and the live result sets UPDATE keeps.

Why a module of its own: SEARCH and SORT (:mod:`agentpost.imap.commands.search`) stay
what they were and call in here at three points -- :func:`take_options` pulls CONTEXT,
UPDATE and ``PARTIAL low:high`` out of the ``RETURN (...)`` list before the rest is
parsed, :func:`reply` (SEARCH) and :func:`reply_sort` (SORT RETURN, ESORT §3) write the
``* ESEARCH`` answer -- while :func:`announce_removals` and :func:`refresh` are what
:mod:`agentpost.imap.updates` calls as the mailbox changes.

Live contexts (§4.3) belong to the selected mailbox (``SelectedMailbox.search_contexts``,
by tag), so they end with it, as the RFC wants. Each holds its resolved search key,
its sort order and its current result, by UID in result order; numbers are rendered
when a notification is sent, so sequence numbers are always the ones the client has:

- a message leaving the view is announced with ``REMOVEFROM`` *before* its EXPUNGE
  (:func:`announce_removals`, §4.3.4);
- after every poll (after EXISTS, §4.3.3) each context's search runs again and the
  difference is sent as ``REMOVEFROM`` then ``ADDTO`` (:func:`refresh`). SEARCH
  contexts use position 0 and mailbox-ordered sets; SORT contexts give positions, the
  removals and additions being runs in the requested order (§4.3.2).

Bounds: at most :data:`MAX_UPDATE_CONTEXTS` live contexts per session (more get
``* NO [NOUPDATE "tag"]``, §4.3.1); a PARTIAL range is two numbers whatever its width
and is answered by slicing the result list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentpost.imap.commands.common import selected
from agentpost.imap.errors import no
from agentpost.imap.parser import Atom, Command, ParseError, astring
from agentpost.imap.selected import SelectedMailbox
from agentpost.imap.wire import quote
from agentpost.mail import imapformat

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

#: Live UPDATE contexts per session (RFC 5267 §4.3.1: at least one, SHOULD more).
MAX_UPDATE_CONTEXTS = 5
_ESORT_RETURNS = ("MIN", "MAX", "COUNT", "ALL")
_MAX_NUMBER = 4294967295  # nz-number (RFC 3501 §9)
#: ``low:high`` (RFC 5267 §4.4), or both negative, counting from the end (RFC 9394).
_RANGE = re.compile(r"(-?)([0-9]{1,10}):(-?)([0-9]{1,10})")


@dataclass
class ContextOptions:
    """The RFC 5267 part of one command's ``RETURN (...)``.

    Attributes:
        partial: the PARTIAL range as the reply echoes it, normalised (``"4:2"`` is
            ``"2:4"``, ``"-9:-1"`` is ``"-1:-9"``), or None.
        span: the same range as 0-based slice bounds for a result of any length:
            (first, last) positive, or negative counting from the end.
        update: UPDATE was asked for (CONTEXT alone is a hint and changes nothing).
        explicit: other return options remained, so ``RETURN (PARTIAL 1:5)`` does not
            mean the ALL an empty ``RETURN ()`` means.
        returns: for SORT, the ESORT options (MIN MAX COUNT ALL) asked for.
    """

    partial: str | None = None
    span: tuple[int, int] = (0, 0)
    update: bool = False
    explicit: bool = True
    returns: list[str] = field(default_factory=list)

    def search_returns(self, returns: list[str] | None) -> list[str]:
        """SEARCH's return options once ESEARCH parsed the rest: none when the list
        held only our options (a PARTIAL must not bring an ALL along)."""
        return list(returns or []) if self.explicit else []


@dataclass
class SearchContext:
    """One live UPDATE context: what to run again, and what the client holds (UIDs,
    in result order)."""

    tag: str
    uid: bool
    key: tuple[Any, ...]
    sort: list[tuple[str, bool]] | None
    results: list[int]


# ---------------------------------------------------------------------- parsing


def take_options(session: IMAP4ServerProtocol, command: Command, args: list[Any], *,
                 sort: bool = False) -> tuple[list[Any], ContextOptions | None]:
    """Split the RFC 5267 options out of a leading ``RETURN (...)``: the arguments
    left and the options (None without any). For SEARCH the other return options stay
    in the arguments, for ESEARCH's parser; for SORT (``sort``) RETURN is consumed and
    its options checked here (ESORT, §3.1). BAD for a malformed PARTIAL, PARTIAL twice
    or beside ALL (§4.4), and UPDATE under a tag already in use by a context (§4.3)."""
    if not (args and isinstance(args[0], Atom) and args[0].upper() == "RETURN"):
        return args, None
    if len(args) < 2 or not isinstance(args[1], list):
        raise ParseError("RETURN needs a list")
    options, rest = _split(args[1])
    if options.partial is not None and any(str(o).upper() == "ALL" for o in rest):
        raise ParseError("PARTIAL and ALL may not be combined")
    if options.update and command.tag in selected(session).search_contexts:
        raise ParseError("Tag reuse: a context already has this tag")
    if sort:
        options.returns = _esort_returns(rest, options)
        return args[2:], options
    if options.partial is None and not options.update and not _took_context(args[1]):
        return args, None
    options.explicit = bool(rest)
    return [args[0], rest, *args[2:]], options


def _split(tokens: list[Any]) -> tuple[ContextOptions, list[Any]]:
    """(our options, the other tokens of the RETURN list)."""
    options = ContextOptions()
    rest: list[Any] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name = str(token).upper() if isinstance(token, str) else ""
        if name == "PARTIAL":
            if options.partial is not None:
                raise ParseError("Only one PARTIAL is allowed")
            if i + 1 >= len(tokens) or not isinstance(tokens[i + 1], Atom):
                raise ParseError("PARTIAL needs a range")
            options.partial, options.span = _parse_range(tokens[i + 1])
            i += 2
            continue
        if name == "UPDATE":
            options.update = True
        elif name != "CONTEXT":
            rest.append(token)
        i += 1
    return options, rest


def _took_context(tokens: list[Any]) -> bool:
    return any(isinstance(t, str) and t.upper() == "CONTEXT" for t in tokens)


def _parse_range(token: str) -> tuple[str, tuple[int, int]]:
    """``low:high`` (either order, RFC 5267 §4.4) as the range to echo and its slice
    bounds: ``(first, last)`` 0-based for positive ranges, negative ones (RFC 9394 §3.1:
    ``-1`` is the last result) as they are.

    The echo is normalised, smaller position first (``4:2`` comes back as ``2:4``, and
    RFC 9394's ``-500:-400`` as ``-400:-500``), as Dovecot answers and as RFC 9394's
    examples show: the client matches the reply to the positions, not to its spelling."""
    m = _RANGE.fullmatch(token)
    if m is None or m.group(1) != m.group(3):
        raise ParseError("PARTIAL needs a range low:high")
    low, high = sorted((int(m.group(2)), int(m.group(4))))
    if low == 0 or high > _MAX_NUMBER:
        raise ParseError("PARTIAL range out of bounds")
    if m.group(1):
        return f"-{low}:-{high}", (-high, -low)
    return f"{low}:{high}", (low - 1, high - 1)


def _esort_returns(rest: list[Any], options: ContextOptions) -> list[str]:
    """SORT's ESEARCH options: MIN MAX COUNT ALL; an empty list means ALL (§3.3)."""
    returns = [str(o).upper() for o in rest]
    for option in returns:
        if option not in _ESORT_RETURNS:
            raise ParseError(f"Unknown SORT return option {option}")
    if not returns and options.partial is None and not options.update:
        return ["ALL"]
    return returns


# ---------------------------------------------------------------------- answers


def _numbers(view: SelectedMailbox, uid: bool, uids: list[int]) -> list[int]:
    return uids if uid else [view.seq(u) for u in uids]


def _partial_item(options: ContextOptions, numbers: list[int], ordered: bool) -> str:
    """`` PARTIAL (range set)`` with the results at the range's positions (NIL when
    none: a range past the end, §4.4)."""
    if options.partial is None:
        return ""
    first, last = options.span
    if first < 0:  # counting from the end: -1 is the last result
        first, last = max(len(numbers) + first, 0), len(numbers) + last
    window = numbers[first:last + 1] if last >= 0 else []
    shown = (imapformat.compact_in_order(window) if ordered
             else imapformat.compact_numbers(window)) or "NIL"
    return f" PARTIAL ({options.partial} {shown})"


def reply(session: IMAP4ServerProtocol, command: Command, options: ContextOptions,
          text: str, key: tuple[Any, ...], found: list[int], numbers: list[int]) -> None:
    """SEARCH: send ESEARCH's line ``text`` with PARTIAL added; with UPDATE, keep the
    result live (or say NOUPDATE first, §4.3.1)."""
    if options.update:
        _register(session, command, key, None, found)
    session.send(text + _partial_item(options, numbers, ordered=False))


def reply_sort(session: IMAP4ServerProtocol, command: Command, options: ContextOptions,
               key: tuple[Any, ...], sort: list[tuple[str, bool]], found: list[int],
               modseq: int | None) -> None:
    """SORT RETURN (...) (ESORT §3.1): MIN and MAX are the first and last in sort order,
    ALL and PARTIAL in sort order with ranges only where it ascends (§3.2)."""
    view = selected(session)
    numbers = _numbers(view, command.uid, found)
    if options.update:
        _register(session, command, key, sort, found)
    text = f"* ESEARCH (TAG {quote(command.tag)})" + (" UID" if command.uid else "")
    returns = options.returns
    if numbers:
        if "MIN" in returns:
            text += f" MIN {numbers[0]}"
        if "MAX" in returns:
            text += f" MAX {numbers[-1]}"
        if "ALL" in returns:
            text += f" ALL {imapformat.compact_in_order(numbers)}"
    if "COUNT" in returns:
        text += f" COUNT {len(numbers)}"
    text += _partial_item(options, numbers, ordered=True)
    if modseq is not None:
        text += f" MODSEQ {modseq}"
    session.send(text)


def _register(session: IMAP4ServerProtocol, command: Command, key: tuple[Any, ...],
              sort: list[tuple[str, bool]] | None, found: list[int]) -> None:
    """Keep a context live, unless the session has all it may (untagged NO
    [NOUPDATE]; the command's other return options are still answered)."""
    view = selected(session)
    contexts = view.search_contexts
    if len(contexts) >= MAX_UPDATE_CONTEXTS:
        session.send(f"* NO [NOUPDATE {quote(command.tag)}] Too many contexts; "
                     f"at most {MAX_UPDATE_CONTEXTS} (CANCELUPDATE one)")
        return
    resolved = view.resolve_search(key, [False])  # sequence numbers as of this command
    contexts[command.tag] = SearchContext(command.tag, command.uid, resolved, sort,
                                          list(found))


async def cancelupdate(session: IMAP4ServerProtocol, command: Command) -> str:
    """CANCELUPDATE "tag" ... (§4.3.5): those contexts stop; all or none (NO when a
    tag names no live context)."""
    view = selected(session)
    if not command.args:
        raise ParseError("CANCELUPDATE needs the tags of searching commands")
    tags = [astring(arg, "tag") for arg in command.args]
    unknown = [t for t in tags if t not in view.search_contexts]
    if unknown:
        raise no(f"No context with tag {unknown[0]}")
    for tag in tags:
        view.search_contexts.pop(tag, None)
    return "CANCELUPDATE completed"


# ---------------------------------------------------------------------- notifications


def announce_removals(session: IMAP4ServerProtocol, uids: list[int]) -> None:
    """Messages are about to be announced as expunged: each context holding some says
    REMOVEFROM first, while their sequence numbers are still valid (§4.3.4)."""
    view = session.selected
    if view is None or not view.search_contexts:
        return
    gone = set(uids)
    for context in view.search_contexts.values():
        if any(u in gone for u in context.results):
            _send_difference(session, view, context,
                             [u for u in context.results if u not in gone])


async def refresh(session: IMAP4ServerProtocol) -> None:
    """After a poll (so after any EXISTS): run every live context's search again and
    send what changed (§4.3.2). Messages not yet in the view wait for their EXISTS."""
    view = session.selected
    if view is None:
        return
    for context in list(view.search_contexts.values()):
        if context.sort is None:
            found = await view.folder.search(context.key)
        else:
            found = await view.folder.search(context.key, context.sort)
        if session.selected is not view or session.bye_sent:
            return
        if view.search_contexts.get(context.tag) is not context:
            continue  # cancelled meanwhile
        _send_difference(session, view, context, [u for u in found if u in view.meta])


def _send_difference(session: IMAP4ServerProtocol, view: SelectedMailbox,
                     context: SearchContext, new: list[int]) -> None:
    """One ESEARCH with REMOVEFROM then ADDTO turning the client's result into ``new``;
    nothing when they agree."""
    old = context.results
    if old == new:
        return
    if context.sort is None:
        items = _unordered_changes(view, context, set(old), set(new))
    else:
        items = _ordered_changes(view, context, old, new)
    context.results = new
    if items:
        session.send(f"* ESEARCH (TAG {quote(context.tag)})"
                     + (" UID" if context.uid else "") + items)


def _unordered_changes(view: SelectedMailbox, context: SearchContext, old: set[int],
                       new: set[int]) -> str:
    """SEARCH contexts: position 0, sets in mailbox order (§4.3.3, §4.3.4)."""
    items = ""
    removed = sorted(old - new)
    added = sorted(new - old)
    if removed:
        numbers = _numbers(view, context.uid, removed)
        items += f" REMOVEFROM (0 {imapformat.compact_numbers(numbers)})"
    if added:
        numbers = _numbers(view, context.uid, added)
        items += f" ADDTO (0 {imapformat.compact_numbers(numbers)})"
    return items


def _ordered_changes(view: SelectedMailbox, context: SearchContext, old: list[int],
                     new: list[int]) -> str:
    """SORT contexts: removals then insertions as (position, run) pairs that, applied in
    order, turn ``old`` into ``new``. Sort keys do not change, so what stays keeps its
    order; should it not, everything is removed and added again (still correct)."""
    new_set, old_set = set(new), set(old)
    kept = [u for u in old if u in new_set]
    if kept != [u for u in new if u in old_set]:
        kept = []
    keep = set(kept)
    items = ""
    removals = _runs(old, keep, inserting=False)
    if removals:
        items += " REMOVEFROM (" + _pairs(view, context, removals) + ")"
    additions = _runs(new, keep, inserting=True)
    if additions:
        items += " ADDTO (" + _pairs(view, context, additions) + ")"
    return items


def _runs(sequence: list[int], keep: set[int], *,
          inserting: bool) -> list[tuple[int, list[int]]]:
    """(1-based position, run) of the items of ``sequence`` not in ``keep``, each
    position as it is once the earlier runs are applied: removing from ``old`` only
    the kept items precede a run, inserting into the kept list to make ``new`` every
    earlier item of ``new`` does."""
    runs: list[tuple[int, list[int]]] = []
    run: list[int] = []
    position = 0  # items before the next one, once earlier runs are applied
    for item in sequence:
        if item in keep:
            if run:
                runs.append((position + 1 - (len(run) if inserting else 0), run))
                run = []
            position += 1
            continue
        run.append(item)
        if inserting:
            position += 1
    if run:
        runs.append((position + 1 - (len(run) if inserting else 0), run))
    return runs


def _pairs(view: SelectedMailbox, context: SearchContext,
           runs: list[tuple[int, list[int]]]) -> str:
    return " ".join(
        f"{position} {imapformat.compact_in_order(_numbers(view, context.uid, run))}"
        for position, run in runs)
