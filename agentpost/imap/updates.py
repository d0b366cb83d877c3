"""Unsolicited responses about the selected mailbox: EXISTS, RECENT, FETCH, EXPUNGE.

Why apart from the commands: the dispatcher reports other sessions' changes after
most commands, IDLE reports them as they happen, and EXPUNGE, MOVE and CLOSE announce
their own removals; all of them must render the same way (EXPUNGE or, after ENABLE
QRESYNC, VANISHED; FLAGS with MODSEQ once CONDSTORE is on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentpost.imap.commands import contexts
from agentpost.imap.states import State
from agentpost.mail import imapformat

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol


def announce_expunged(session: IMAP4ServerProtocol, uids: list[int]) -> None:
    """Drop UIDs from the view, announcing each (descending: no renumbering)."""
    view = session.selected
    if view is None:
        return
    contexts.announce_removals(session, uids)  # RFC 5267 §4.3.4: before the EXPUNGE
    present, seqs = view.remove(uids)
    if not present:
        return
    if session.qresync:
        session.send(f"* VANISHED {imapformat.compact_numbers(present)}")
    else:
        session.write(b"".join(b"* %d EXPUNGE\r\n" % seq for seq in seqs))


def enable_condstore(session: IMAP4ServerProtocol) -> None:
    """A CONDSTORE enabling command (RFC 7162 §3.1) ran: from now on every FETCH
    response that carries FLAGS carries MODSEQ too. The first one issued while a
    mailbox is selected reports its HIGHESTMODSEQ (SELECT and EXAMINE always do)."""
    if session.condstore:
        return
    session.condstore = True
    if session.state is State.SELECTED and session.selected is not None:
        session.send(f"* OK [HIGHESTMODSEQ {session.selected.highestmodseq}] Highest")


async def report_changes(session: IMAP4ServerProtocol, expunge: bool) -> None:
    """Poll the folder and send EXPUNGE/EXISTS/RECENT/FETCH for what changed; expunges
    wait when ``expunge`` is false (a command that uses sequence numbers)."""
    view = session.selected
    if view is None or session.account is None or session.bye_sent:
        return  # after BYE only the tagged completion may follow (RFC 3501 §7.1.5)
    # Woken by the folder's watch (or by its own write): the process's shared reading
    # after that wake-up will do. Otherwise (NOOP, CHECK) the database as it is now.
    fresh, view.dirty = not view.dirty, False
    changes = await view.folder.changes(list(view.uids), view.highestmodseq, fresh)
    if session.state is not State.SELECTED or session.selected is not view:
        return
    gone = view.take_expunged(changes, expunge)
    if gone:
        announce_expunged(session, gone)
    for meta in changes.changed:
        if not view.update(meta):
            continue
        modseq = f" MODSEQ ({meta.modseq})" if session.condstore else ""
        session.send(f"* {view.seq(meta.uid)} FETCH (UID {meta.uid} "
                     f"FLAGS {view.flags_text(meta.uid, meta.flags)}{modseq})")
    new = view.arrivals(changes.new)
    if new:
        seen_up_to = await view.folder.claim_recent(new[-1].uid, not view.readonly)
        if session.state is not State.SELECTED or session.selected is not view:
            return
        view.add(new, seen_up_to)
        session.send(f"* {len(view.uids)} EXISTS")
        if not session.imap4rev2:  # RFC 9051 removed RECENT
            session.send(f"* {len(view.recent)} RECENT")
    view.highestmodseq = max(view.highestmodseq, changes.highestmodseq)
    if gone or new or changes.changed or changes.expunged:
        # RFC 5267 UPDATE: after EXISTS (§4.3.3). Only when something changed: a NOOP
        # must not re-run every live search of the session.
        await contexts.refresh(session)
