"""LIST and LSUB, with LIST-EXTENDED (RFC 5258) selection and return options, several
patterns, SPECIAL-USE (RFC 6154) and LIST-STATUS (RFC 5819).

The steps, each a function: read the options (:func:`_list_options`), match the
folder names once (:func:`_match`), add the parents LSUB and RECURSIVEMATCH owe
(:func:`_add_parents`), then decide and render each folder's line
(:func:`_attributes`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from agentpost.imap import rev2
from agentpost.imap.commands.common import account
from agentpost.imap.commands.mailboxes import status_items
from agentpost.imap.interfaces import FolderInfo
from agentpost.imap.parser import (
    Atom,
    Command,
    ParseError,
    astring,
)
from agentpost.imap.patterns import PatternSet, PatternTooLong
from agentpost.imap.wire import status_text

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

_SELECTION_OPTIONS = {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
_RETURN_OPTIONS = ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE")


@dataclass
class _Options:
    """One LIST/LSUB command, read."""

    lsub: bool
    reference: str = ""  # as the client wrote it (modified UTF-7 or UTF-8)
    patterns: list[Any] = field(default_factory=list)
    select: set[str] = field(default_factory=set)  # LIST-EXTENDED selection options
    returns: set[str] = field(default_factory=set)  # RETURN options (but STATUS)
    status_items: list[str] = field(default_factory=list)  # RETURN (STATUS (...))

    @property
    def verb(self) -> str:
        return "LSUB" if self.lsub else "LIST"

    @property
    def only_subscribed(self) -> bool:
        return self.lsub or "SUBSCRIBED" in self.select

    @property
    def recursive(self) -> bool:
        return self.only_subscribed and "RECURSIVEMATCH" in self.select


@dataclass
class _Matched:
    """The names to consider and what the subscriptions say about their parents."""

    folders: list[FolderInfo]  # existing folders, and (subscribed modes) names without one
    matched: set[str]  # names the patterns match
    # Matched ancestors of subscribed names the patterns do not match: LSUB lists them
    # \Noselect when unsubscribed (RFC 3501 §6.3.9), RECURSIVEMATCH gives them CHILDINFO
    # (RFC 5258 §3.5; a subscribed descendant the pattern matches itself needs none).
    reached: set[str]
    missing: set[str] = field(default_factory=set)  # listed names that have no folder
    # Of those, the levels of hierarchy a trailing "%" returns (RFC 3501 §6.3.8): \Noselect
    implied: set[str] = field(default_factory=set)


async def list_(session: IMAP4ServerProtocol, command: Command) -> None:
    await _list(session, command, lsub=False)


async def lsub(session: IMAP4ServerProtocol, command: Command) -> None:
    await _list(session, command, lsub=True)


async def _list(session: IMAP4ServerProtocol, command: Command, lsub: bool) -> None:
    options = _list_options(command, lsub)
    rev2.refuse_removed_status_items(session, options.status_items)
    reference = rev2.mailbox_text(session, options.reference)
    wanted = [rev2.mailbox_text(session, astring(p, "pattern")) for p in options.patterns]
    if wanted == [""]:
        session.send(f'* {options.verb} (\\Noselect) "/" ""')
        return
    try:  # linear-time matching, never a regex built from the client's pattern
        matcher = PatternSet(reference + pattern for pattern in wanted)
    except PatternTooLong as exc:
        raise ParseError(str(exc)) from exc
    acct = account(session)
    folders, missing = await acct.list_folders(), set[str]()
    if options.only_subscribed:  # subscriptions may name folders that do not exist
        folders, missing = _with_subscriptions(folders, await acct.list_subscriptions())
    found = _match(folders, matcher, missing)
    if options.only_subscribed and found.reached:
        _add_parents(found)
    elif not options.lsub and not options.select - {"REMOTE"}:
        _add_hierarchy_levels(found, [reference + p for p in wanted if p.endswith("%")])
    statuses = {} if not options.status_items else await acct.statuses(
        [f.name for f in found.folders if f.name not in found.missing])
    for folder in found.folders:
        attrs = _attributes(folder, found, options)
        if attrs is None:
            continue
        wire = rev2.mailbox_wire(session, folder.name)
        child_info = options.recursive and folder.name in found.reached
        extra = ' ("CHILDINFO" ("SUBSCRIBED"))' if child_info else ""
        session.send(f'* {options.verb} ({" ".join(attrs)}) "/" {wire}{extra}')
        st = statuses.get(folder.name)
        if st is not None:  # (none: not asked for, a \\NonExistent name, or deleted meanwhile)
            session.send(f"* STATUS {wire} ({status_text(st, options.status_items)})")


def _list_options(command: Command, lsub: bool) -> _Options:
    """The reference, the patterns and (LIST only) the LIST-EXTENDED options."""
    args = list(command.args)
    options = _Options(lsub)
    if not lsub and args and isinstance(args[0], list):
        options.select = {str(o).upper() for o in args.pop(0)}
        unknown = options.select - _SELECTION_OPTIONS
        if unknown:
            raise ParseError(f"Unknown LIST selection option {sorted(unknown)[0]}")
        if options.select - {"REMOTE"} == {"RECURSIVEMATCH"}:  # RFC 5258 §3: BAD
            raise ParseError("RECURSIVEMATCH needs another selection option")
    if not lsub and len(args) == 4 and isinstance(args[2], Atom) and \
            args[2].upper() == "RETURN":
        returns = args.pop()
        args.pop()
        _return_options(returns, options)
    if len(args) != 2:
        raise ParseError(f"Wrong number of arguments for {command.name}")
    options.reference = astring(args[0], "reference")
    options.patterns = args[1] if isinstance(args[1], list) and not lsub else [args[1]]
    if not options.patterns:
        raise ParseError("LIST needs a pattern")
    return options


def _return_options(returns: Any, options: _Options) -> None:
    """LIST ... RETURN (SUBSCRIBED CHILDREN SPECIAL-USE STATUS (items))."""
    if not isinstance(returns, list):
        raise ParseError("RETURN needs a list")
    i = 0
    while i < len(returns):
        option = str(returns[i]).upper()
        if option == "STATUS":
            if i + 1 >= len(returns) or not isinstance(returns[i + 1], list):
                raise ParseError("RETURN STATUS needs a list of items")
            options.status_items = status_items(returns[i + 1])
            i += 2
            continue
        if option not in _RETURN_OPTIONS:
            raise ParseError(f"Unknown LIST return option {option}")
        options.returns.add(option)
        i += 1


def _ancestors(name: str) -> list[str]:
    return [name.rsplit("/", i)[0] for i in range(1, name.count("/") + 1)]


def _parents_of(names: Iterable[str]) -> set[str]:
    return {p for name in names for p in _ancestors(name)}


def _with_subscriptions(folders: list[FolderInfo], subscribed: list[str]
                        ) -> tuple[list[FolderInfo], set[str]]:
    """The folders with their subscription as ``subscribed`` says, and the subscribed
    names no folder has (deleted, or never created): listed \\NonExistent by LIST
    (SUBSCRIBED) and \\Noselect by LSUB (RFC 5258 §3, RFC 3501 §6.3.9)."""
    wanted = set(subscribed)
    existing = {f.name for f in folders}
    with_children = _parents_of(existing)
    out = [f if f.subscribed == (f.name in wanted) else replace(f, subscribed=not f.subscribed)
           for f in folders]
    missing = wanted - existing
    out += [FolderInfo(n, None, True, n in with_children) for n in missing]
    return sorted(out, key=lambda f: f.name), missing


def _match(folders: list[FolderInfo], matcher: PatternSet, missing: set[str]) -> _Matched:
    """Which names the patterns match, in one pass over each name, which also tells
    which of its parents match (linear in the names)."""
    matched: set[str] = set()
    reached: set[str] = set()
    for f in folders:
        hit, parents = matcher.match_prefixes(f.name, fold_case=f.name == "INBOX")
        if hit:
            matched.add(f.name)
        elif f.subscribed:
            reached.update(parents)
    return _Matched(folders, matched, reached, set(missing))


def _add_parents(found: _Matched) -> None:
    """A reached parent with no folder of its own (DELETE of a parent leaves its
    children, and a subscription needs no folder) is listed too: \\NonExistent
    (LIST) or \\Noselect (LSUB)."""
    names = {f.name for f in found.folders}
    missing = found.reached - names
    if missing:
        with_children = _parents_of(f.name for f in found.folders
                                    if f.name not in found.missing)
        found.missing |= missing
        found.matched |= missing
        found.folders = sorted([*found.folders, *(FolderInfo(n, None, False,
                                                             n in with_children)
                                                  for n in missing)], key=lambda f: f.name)


def _add_hierarchy_levels(found: _Matched, patterns: list[str]) -> None:
    """A pattern ending in "%" also returns the levels of hierarchy it matches, and
    those that are no mailbox come \\Noselect (RFC 3501 §6.3.8, RFC 9051 §6.3.9): a
    parent whose folder was DELETEd keeps its children, which "%" browsing must still
    reach. Only those patterns' own parent matches count (not ``*``'s)."""
    if not patterns:
        return
    levels = PatternSet(patterns)  # a subset of patterns already accepted: not too long
    names = {f.name for f in found.folders}
    implied = {parent for f in found.folders
               for parent in levels.match_prefixes(f.name, fold_case=f.name == "INBOX")[1]
               if parent not in names}
    if implied:
        found.implied |= implied
        found.missing |= implied
        found.matched |= implied
        found.folders = sorted([*found.folders,
                                *(FolderInfo(n, None, False, True) for n in implied)],
                               key=lambda f: f.name)


def _attributes(folder: FolderInfo, found: _Matched, options: _Options) -> list[str] | None:
    """The folder's LIST/LSUB attributes, or None when it is not listed."""
    if folder.name not in found.matched:
        return None
    if "SPECIAL-USE" in options.select and not folder.special_use:
        return None
    # RECURSIVEMATCH (RFC 5258 §3.5): CHILDINFO on every listed parent of a
    # subscribed mailbox, and unsubscribed parents are listed for it.
    child_info = options.recursive and folder.name in found.reached
    noselect = False
    if options.only_subscribed and not folder.subscribed and not child_info:
        if options.lsub and folder.name in found.reached:
            noselect = True
        else:
            return None
    attrs = ["\\HasChildren" if folder.has_children else "\\HasNoChildren"]
    if folder.special_use:
        attrs.append(folder.special_use)
    if folder.name in found.implied:
        attrs.append("\\Noselect")
    elif folder.name in found.missing:
        attrs.append("\\Noselect" if options.lsub else "\\NonExistent")
    elif noselect:
        attrs.append("\\Noselect")
    if not options.lsub and folder.subscribed and \
            ("SUBSCRIBED" in options.returns or "SUBSCRIBED" in options.select):
        attrs.append("\\Subscribed")
    return attrs

