"""Mailbox commands: SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE STATUS, and
QUOTA (RFC 9208): GETQUOTAROOT GETQUOTA SETQUOTA."""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

from agentpost.imap import rev2
from agentpost.imap.commands.common import account, arguments, require_write
from agentpost.imap.errors import bad, no
from agentpost.imap.parser import (
    Command,
    ParseError,
    astring,
    merge_ranges,
    number,
    parse_seqset,
)
from agentpost.imap.selected import SelectedMailbox
from agentpost.imap.states import State
from agentpost.imap.updates import enable_condstore
from agentpost.imap.wire import STATUS_ITEMS, SYSTEM_FLAGS, status_text

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

#: SELECT (QRESYNC (uidvalidity modseq [known-uids])): known-uids None means "all".
Resync = tuple[int, int, list[tuple[int, int]] | None]


async def select(session: IMAP4ServerProtocol, command: Command) -> str:
    return await _select(session, command, readonly=False)


async def examine(session: IMAP4ServerProtocol, command: Command) -> str:
    return await _select(session, command, readonly=True)


async def _select(session: IMAP4ServerProtocol, command: Command, readonly: bool) -> str:
    args = arguments(command, 1, 2)
    name = rev2.mailbox_arg(session, args[0])
    resync = _select_params(session, args[1]) if len(args) == 2 else None
    if session.state is State.SELECTED:
        session.unselect()
        if session.condstore or session.imap4rev2:  # RFC 7162 §3.2.11, RFC 9051 §7.1
            session.send("* OK [CLOSED] Previous mailbox closed")
    acct = account(session)
    folder, snap = await acct.select(name)
    readonly = readonly or not acct.can_write
    top = snap.messages[-1].uid if snap.messages else 0
    # \Recent: UIDs no earlier session was told about; SELECT claims them, EXAMINE
    # only looks (RFC 3501 §6.3.2).
    seen_up_to = await folder.claim_recent(top, not readonly)
    if session.state is State.LOGOUT:
        return "closed"
    view = SelectedMailbox(folder, snap, readonly=readonly, seen_up_to=seen_up_to)
    view.show_recent = not session.imap4rev2
    session.selected_mailbox(view)
    _send_selected(session, view)
    if session.imap4rev2:  # RFC 9051 §6.3.2: LIST for the mailbox, OLDNAME if normalized
        await rev2.send_mailbox_list(session, view.name, rev2.normalized(session, args[0]))
    if resync is not None and resync[0] == snap.uidvalidity:
        _resync(session, view, resync[1], resync[2])
    mode = "READ-ONLY" if view.readonly else "READ-WRITE"
    return f"[{mode}] {command.name} completed"


def _select_params(session: IMAP4ServerProtocol, params: Any) -> Resync | None:
    """SELECT's (CONDSTORE) and (QRESYNC (...)) parameters (RFC 7162)."""
    if not isinstance(params, list) or not params:
        raise ParseError("Unsupported SELECT parameters")
    resync = None
    i = 0
    while i < len(params):
        param = str(params[i]).upper()
        if param == "CONDSTORE":
            session.condstore = True
            i += 1
        elif param == "QRESYNC" and i + 1 < len(params):
            if not session.qresync:
                raise ParseError("ENABLE QRESYNC first")
            resync = _qresync_params(params[i + 1])
            i += 2
        else:
            raise ParseError("Unsupported SELECT parameters")
    return resync


def _qresync_params(value: Any) -> Resync:
    """``(uidvalidity modseq [known-uids [(seqs uids)]])`` of SELECT (QRESYNC ...)."""
    if not isinstance(value, list) or len(value) < 2:
        raise ParseError("QRESYNC needs (uidvalidity modseq [known-uids])")
    uidvalidity = number(value[0], "UIDVALIDITY")
    modseq = number(value[1], "MODSEQ")
    known = None
    if len(value) >= 3 and not isinstance(value[2], list):
        known = []
        for lo, hi in parse_seqset(value[2]):
            if lo is None or hi is None:
                raise ParseError("known-uids may not contain *")
            known.append((min(lo, hi), max(lo, hi)))
    return uidvalidity, modseq, known


def _send_selected(session: IMAP4ServerProtocol, view: SelectedMailbox) -> None:
    """The untagged responses SELECT and EXAMINE owe (RFC 3501 §6.3.1, RFC 7162)."""
    snap = view.snapshot
    keywords = sorted({f for m in snap.messages for f in m.flags if not f.startswith("\\")})
    flags = " ".join([*SYSTEM_FLAGS, *keywords])
    session.send(f"* FLAGS ({flags})")
    if view.readonly:
        session.send("* OK [PERMANENTFLAGS ()] Read-only mailbox")
    else:
        session.send(f"* OK [PERMANENTFLAGS ({flags} \\*)] Flags permitted")
    session.send(f"* {len(view.uids)} EXISTS")
    if not session.imap4rev2:  # RFC 9051 removed RECENT and the UNSEEN response code
        session.send(f"* {len(view.recent)} RECENT")
        if snap.first_unseen_uid is not None and snap.first_unseen_uid in view.meta:
            session.send(f"* OK [UNSEEN {view.seq(snap.first_unseen_uid)}] First unseen")
    session.send(f"* OK [UIDVALIDITY {snap.uidvalidity}] UIDs valid")
    session.send(f"* OK [UIDNEXT {snap.uidnext}] Predicted next UID")
    session.send(f"* OK [HIGHESTMODSEQ {snap.highestmodseq}] Highest")


def _resync(session: IMAP4ServerProtocol, view: SelectedMailbox, modseq: int,
            known: list[tuple[int, int]] | None) -> None:
    """QRESYNC (RFC 7162 §3.2.5): what the client's cache lost since ``modseq``.

    Vanished UIDs are the client's known UIDs (or every UID below the highest) that
    are no longer here -- a superset of those expunged after ``modseq``, which the
    RFC allows and which needs no tombstones; changed messages come from MODSEQ."""
    top = view.top_uid
    ranges = merge_ranges(known) if known is not None else ([(1, top)] if top else [])
    gone = view.missing(ranges)
    if gone:
        session.send(f"* VANISHED (EARLIER) {gone}")
    starts = [a for a, _ in ranges]
    for uid in view.uids:
        meta = view.meta[uid]
        i = bisect.bisect_right(starts, uid) - 1  # the known range that may hold uid
        if meta.modseq > modseq and (known is None or (i >= 0 and uid <= ranges[i][1])):
            session.send(f"* {view.seq(uid)} FETCH (UID {uid} FLAGS "
                         f"{view.flags_text(uid, meta.flags)} MODSEQ ({meta.modseq}))")


async def create(session: IMAP4ServerProtocol, command: Command) -> None:
    """CREATE. A trailing hierarchy separator only declares that names will be created
    under this one (RFC 3501 §6.3.3): ``foo/`` creates ``foo``, and ``INBOX/`` is OK
    with nothing to do -- INBOX always exists and may have children (as Dovecot)."""
    token = arguments(command, 1)[0]
    given = rev2.mailbox_arg(session, token)
    name = given.rstrip("/")
    require_write(session)
    if not name:
        raise bad("Empty name")
    if name == "INBOX":
        if given != name:
            return
        raise no("INBOX already exists", "ALREADYEXISTS")
    await account(session).create_folder(name)
    oldname = rev2.normalized(session, token)
    if oldname is not None:  # RFC 9051 §6.3.4: tell the client the name it got
        await rev2.send_mailbox_list(session, name, oldname)


async def delete(session: IMAP4ServerProtocol, command: Command) -> None:
    token = arguments(command, 1)[0]
    name = rev2.mailbox_arg(session, token)
    require_write(session)
    if name == "INBOX":
        raise no("INBOX cannot be deleted", "CANNOT")
    await account(session).delete_folder(name)
    oldname = rev2.normalized(session, token)
    if oldname is not None:  # RFC 9051 §6.3.5
        await rev2.send_mailbox_list(session, name, oldname, exists=False)


async def rename(session: IMAP4ServerProtocol, command: Command) -> None:
    args = arguments(command, 2)
    old, new = rev2.mailbox_arg(session, args[0]), rev2.mailbox_arg(session, args[1]).rstrip("/")
    require_write(session)
    await account(session).rename_folder(old, new)
    oldname = rev2.normalized(session, args[1])
    if oldname is not None:  # RFC 9051 §6.3.6: the new name was normalized
        await rev2.send_mailbox_list(session, new, oldname)


async def subscribe(session: IMAP4ServerProtocol, command: Command) -> None:
    name = rev2.mailbox_arg(session, arguments(command, 1)[0])
    await account(session).set_subscribed(name, True)


async def unsubscribe(session: IMAP4ServerProtocol, command: Command) -> None:
    name = rev2.mailbox_arg(session, arguments(command, 1)[0])
    await account(session).set_subscribed(name, False)


def status_items(items: Any) -> list[str]:
    """STATUS data item names, BAD for an unknown one (STATUS and LIST RETURN STATUS)."""
    keys = [str(item).upper() for item in items]
    for key in keys:
        if key not in STATUS_ITEMS:
            raise ParseError(f"Unknown STATUS item {key}")
    return keys


async def status(session: IMAP4ServerProtocol, command: Command) -> None:
    args = arguments(command, 2)
    name = rev2.mailbox_arg(session, args[0])
    items = args[1]
    if not isinstance(items, list) or not items:
        raise ParseError("STATUS needs a list of items")
    keys = status_items(items)
    rev2.refuse_removed_status_items(session, keys)
    st = await account(session).status(name)
    session.send(f"* STATUS {rev2.mailbox_wire(session, name)} ({status_text(st, keys)})")
    if "HIGHESTMODSEQ" in keys:
        enable_condstore(session)


# One quota root, "", covers every folder of the inbox when [mail] inbox_quota is set;
# without a limit folders have no quota root at all.

async def _quota_line(session: IMAP4ServerProtocol) -> str | None:
    used, limit = await account(session).quota()
    if not limit:
        return None
    return f'* QUOTA "" (STORAGE {-(-used // 1024)} {limit // 1024})'


async def getquotaroot(session: IMAP4ServerProtocol, command: Command) -> None:
    name = rev2.mailbox_arg(session, arguments(command, 1)[0])
    await account(session).check_folder(name)  # NONEXISTENT
    line = await _quota_line(session)
    wire = rev2.mailbox_wire(session, name)
    session.send(f'* QUOTAROOT {wire} ""' if line else f"* QUOTAROOT {wire}")
    if line:
        session.send(line)


async def getquota(session: IMAP4ServerProtocol, command: Command) -> None:
    root = astring(arguments(command, 1)[0], "quota root")
    line = await _quota_line(session)
    if root != "" or line is None:
        raise no("No such quota root", "NONEXISTENT")
    session.send(line)


async def setquota(session: IMAP4ServerProtocol, command: Command) -> None:
    arguments(command, 2)
    raise no("Quotas are set by the administrator ([mail] inbox_quota)", "NOPERM")
