"""Commands that change the selected mailbox or leave it: STORE COPY MOVE EXPUNGE CLOSE
UNSELECT CHECK."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentpost.imap import rev2
from agentpost.imap.commands import contexts
from agentpost.imap.commands.common import (
    arguments,
    require_writable,
    require_write,
    selected,
)
from agentpost.imap.errors import error_for, no, response_text
from agentpost.imap.interfaces import MessageMeta
from agentpost.imap.parser import (
    Atom,
    Command,
    ParseError,
    number,
    parse_flags,
    parse_seqset,
)
from agentpost.imap.selected import SelectedMailbox
from agentpost.imap.updates import announce_expunged, enable_condstore
from agentpost.mail import imapformat
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

_STORE_ITEMS = ("FLAGS", "+FLAGS", "-FLAGS", "FLAGS.SILENT", "+FLAGS.SILENT",
                "-FLAGS.SILENT")


async def check(session: IMAP4ServerProtocol, command: Command) -> None:
    """Nothing to flush; the dispatcher polls the mailbox (the table's ``polls``)."""
    return None


async def unselect(session: IMAP4ServerProtocol, command: Command) -> None:
    arguments(command, 0)
    session.unselect()


async def close(session: IMAP4ServerProtocol, command: Command) -> None:
    """Expunge silently (unless read-only), then unselect.

    CLOSE has no NO (RFC 3501 §6.4.2): the session leaves the mailbox whatever the
    expunge did. A folder deleted meanwhile (by this session's DELETE too) has nothing
    left to expunge; any other failure is reported untagged, as Dovecot does, and the
    \\Deleted messages stay for a later expunge. Why: CLOSE once answered NO and kept
    the session selected on a folder that no longer existed."""
    arguments(command, 0)
    view = selected(session)
    try:
        if not view.readonly and session.account is not None and session.account.can_write:
            await view.folder.expunge(None)
    except errors.NotFound:
        pass
    except Exception as exc:  # answered untagged; the mailbox is closed all the same
        session.send(f"* {response_text(error_for(exc).render())}")
    session.unselect()


async def expunge(session: IMAP4ServerProtocol, command: Command) -> None:
    """EXPUNGE, and UID EXPUNGE (UIDPLUS) for the \\Deleted among a UID set."""
    view = selected(session)
    if command.uid:
        requested = parse_seqset(arguments(command, 1)[0], saved=True)
        uids: list[int] | None = view.seq_uids(requested, True)
    else:
        arguments(command, 0)
        uids = None
    require_writable(session, view)
    if uids is not None and not uids:
        return
    announce_expunged(session, await view.folder.expunge(uids))


async def store(session: IMAP4ServerProtocol, command: Command) -> str | None:
    """STORE, with UNCHANGEDSINCE (RFC 7162 §3.1.3)."""
    view = selected(session)
    args = list(command.args)
    if len(args) < 3:
        raise ParseError("STORE needs a set, an item and flags")
    uids = view.seq_uids(parse_seqset(args.pop(0), saved=True), command.uid)
    unchangedsince = _unchangedsince(args)
    if len(args) < 2 or not isinstance(args[0], Atom):
        raise ParseError("STORE needs an item and flags")
    item = args.pop(0).upper()
    if item not in _STORE_ITEMS:
        raise ParseError(f"Unknown STORE item {item}")
    flag_tokens = args[0] if len(args) == 1 and isinstance(args[0], list) else args
    flags = parse_flags(flag_tokens) - {"\\Recent"}
    require_writable(session, view)
    if unchangedsince is not None:
        enable_condstore(session)
    if not uids:
        return None
    mode = item[0] if item[0] in "+-" else ""
    metas, failed = await view.folder.store(uids, mode, flags, unchangedsince)
    _report_stored(session, view, command, metas, silent=item.endswith(".SILENT"))
    if metas and view.search_contexts:
        # RFC 5267 §4.3.2: live SEARCH/SORT results follow the flag change in the same
        # reply; the poll after the command may not see our own change as new.
        await contexts.refresh(session)
    failed = [u for u in failed if u in view.meta]
    if failed:
        numbers = failed if command.uid else [view.seq(u) for u in failed]
        return f"[MODIFIED {imapformat.compact_numbers(numbers)}] Conditional STORE failed"
    return None


def _unchangedsince(args: list[Any]) -> int | None:
    """Pop ``(UNCHANGEDSINCE n)`` from STORE's arguments when it is there."""
    if not isinstance(args[0], list):
        return None
    mod = args.pop(0)
    if len(mod) != 2 or str(mod[0]).upper() != "UNCHANGEDSINCE":
        raise ParseError("Unknown STORE modifier")
    return number(mod[1], "UNCHANGEDSINCE")


def _report_stored(session: IMAP4ServerProtocol, view: SelectedMailbox, command: Command,
                   metas: list[MessageMeta], silent: bool) -> None:
    for meta in metas:
        if meta.uid not in view.meta:
            continue
        view.meta[meta.uid] = meta
        # Once CONDSTORE is on, every FETCH a STORE causes carries UID and MODSEQ,
        # .SILENT ones too (just without FLAGS): the client's cache needs the new
        # mod-sequence (RFC 7162 §3.1, §3.1.3).
        if silent and not session.condstore:
            continue
        parts = []
        if command.uid or session.condstore:
            parts.append(f"UID {meta.uid}")
        if not silent:
            parts.append(f"FLAGS {view.flags_text(meta.uid, meta.flags)}")
        if session.condstore:
            parts.append(f"MODSEQ ({meta.modseq})")
        session.send(f"* {view.seq(meta.uid)} FETCH ({' '.join(parts)})")


async def copy(session: IMAP4ServerProtocol, command: Command) -> str:
    return await _copy_move(session, command, move=False)


async def move(session: IMAP4ServerProtocol, command: Command) -> str:
    """MOVE (RFC 6851): COPYUID in an untagged OK, then the expunges."""
    return await _copy_move(session, command, move=True)


async def _copy_move(session: IMAP4ServerProtocol, command: Command, move: bool) -> str:
    view = selected(session)
    args = arguments(command, 2)
    uids = view.seq_uids(parse_seqset(args[0], saved=True), command.uid)
    dest = rev2.mailbox_arg(session, args[1])
    require_write(session)
    if move and view.readonly:
        raise no("Mailbox is read-only", "READ-ONLY")
    if not uids:
        return f"{command.name} completed (no messages)"
    op = view.folder.move if move else view.folder.copy
    try:
        uidvalidity, pairs = await op(uids, dest)
    except errors.NotFound as exc:
        raise error_for(exc, missing="TRYCREATE") from exc
    code = ""
    if pairs:
        code = (f"[COPYUID {uidvalidity} {imapformat.compact_in_order([s for s, _ in pairs])} "
                f"{imapformat.compact_in_order([d for _, d in pairs])}] ")
    if dest == view.name:
        # Into the selected mailbox itself: the copies are new messages of the view,
        # announced (EXISTS) after the command like any arrival (RFC 6851 §4.3 for
        # MOVE; RFC 3501 §7.3.1). The folder's own signal may come too late for that.
        view.dirty = True
    if move:
        if code:
            session.send(f"* OK {code}Moved")
        announce_expunged(session, [s for s, _ in pairs])
        return f"{command.name} completed"
    return f"{code}{command.name} completed"
