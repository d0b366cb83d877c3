"""The command table: every IMAP command, its handler and the rules the dispatcher
applies before and after running it (after Dovecot's src/imap/imap-commands.c).

Adding a command is a handler (``async def handler(session, command) -> str | None``,
in the module of its family or a new one) and one row here; CAPABILITY is the
session's to extend.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentpost.imap.commands import (
    append,
    contexts,
    fetch,
    idle,
    listing,
    mailboxes,
    messages,
    notify,
    search,
    session,
    threading,
)
from agentpost.imap.parser import Command
from agentpost.imap.states import State

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

Handler = Callable[["IMAP4ServerProtocol", Command], Awaitable[str | None]]
#: Runs at a command's first synchronizing literal (past its first argument) before
#: the client is invited to send it: None to go on, else the tagged refusal.
LiteralCheck = Callable[["IMAP4ServerProtocol", "str | None", list[Any], int],
                        Coroutine[Any, Any, "str | None"]]

ANY_STATE: tuple[State, ...] = ()
NOT_AUTHENTICATED = (State.NOT_AUTHENTICATED,)
AUTHENTICATED = (State.AUTHENTICATED, State.SELECTED)
SELECTED = (State.SELECTED,)


@dataclass(frozen=True)
class CommandSpec:
    """One command's row.

    Attributes:
        name: the command name, upper case.
        handler: runs the command.
        states: where it is valid (``ANY_STATE``: everywhere); elsewhere BAD.
        uid_ok: may be prefixed by UID.
        uses_sequence_numbers: without UID, EXPUNGE may not be reported during it
            (RFC 3501 §7.4.1): expunges found afterwards wait for a later command.
        polls: always ask the selected folder for changes afterwards (NOOP, CHECK);
            other commands ask only when the folder signalled a change.
        reports_changes: report the selected mailbox's changes afterwards at all
            (not SELECT/EXAMINE, which just built the view, nor LOGOUT).
        recheck_credential: re-check the login's key first (all but LOGOUT).
        literal_check: the command's literals past its first argument are messages
            (APPEND): they may be up to the APPEND limit, are spooled, and this check
            runs before the first is invited.
    """

    name: str
    handler: Handler
    states: tuple[State, ...] = ANY_STATE
    uid_ok: bool = False
    uses_sequence_numbers: bool = False
    polls: bool = False
    reports_changes: bool = True
    recheck_credential: bool = True
    literal_check: LiteralCheck | None = None


def _table(*specs: CommandSpec) -> dict[str, CommandSpec]:
    return {spec.name: spec for spec in specs}


COMMANDS: dict[str, CommandSpec] = _table(
    # any state
    CommandSpec("CAPABILITY", session.capability),
    CommandSpec("NOOP", session.noop, polls=True),
    CommandSpec("LOGOUT", session.logout, reports_changes=False, recheck_credential=False),
    CommandSpec("ID", session.id_),
    # not authenticated
    CommandSpec("STARTTLS", session.starttls, NOT_AUTHENTICATED),
    CommandSpec("AUTHENTICATE", session.authenticate, NOT_AUTHENTICATED),
    CommandSpec("LOGIN", session.login, NOT_AUTHENTICATED),
    # authenticated (or selected)
    CommandSpec("ENABLE", session.enable, AUTHENTICATED),
    CommandSpec("NAMESPACE", session.namespace, AUTHENTICATED),
    CommandSpec("COMPRESS", session.compress, AUTHENTICATED),
    CommandSpec("SELECT", mailboxes.select, AUTHENTICATED, reports_changes=False),
    CommandSpec("EXAMINE", mailboxes.examine, AUTHENTICATED, reports_changes=False),
    CommandSpec("CREATE", mailboxes.create, AUTHENTICATED),
    CommandSpec("DELETE", mailboxes.delete, AUTHENTICATED),
    CommandSpec("RENAME", mailboxes.rename, AUTHENTICATED),
    CommandSpec("SUBSCRIBE", mailboxes.subscribe, AUTHENTICATED),
    CommandSpec("UNSUBSCRIBE", mailboxes.unsubscribe, AUTHENTICATED),
    CommandSpec("STATUS", mailboxes.status, AUTHENTICATED),
    CommandSpec("GETQUOTA", mailboxes.getquota, AUTHENTICATED),
    CommandSpec("GETQUOTAROOT", mailboxes.getquotaroot, AUTHENTICATED),
    CommandSpec("SETQUOTA", mailboxes.setquota, AUTHENTICATED),
    CommandSpec("LIST", listing.list_, AUTHENTICATED),
    CommandSpec("LSUB", listing.lsub, AUTHENTICATED),
    CommandSpec("APPEND", append.append, AUTHENTICATED, literal_check=append.check_literal),
    CommandSpec("IDLE", idle.idle, AUTHENTICATED),
    CommandSpec("NOTIFY", notify.notify, AUTHENTICATED, polls=True),
    # selected
    CommandSpec("CHECK", messages.check, SELECTED, polls=True),
    CommandSpec("CLOSE", messages.close, SELECTED),
    CommandSpec("UNSELECT", messages.unselect, SELECTED),
    CommandSpec("EXPUNGE", messages.expunge, SELECTED, uid_ok=True),
    CommandSpec("SEARCH", search.search, SELECTED, uid_ok=True, uses_sequence_numbers=True),
    CommandSpec("SORT", search.sort, SELECTED, uid_ok=True, uses_sequence_numbers=True),
    CommandSpec("THREAD", threading.thread, SELECTED, uid_ok=True,
                uses_sequence_numbers=True),
    CommandSpec("CANCELUPDATE", contexts.cancelupdate, SELECTED),
    CommandSpec("FETCH", fetch.fetch, SELECTED, uid_ok=True, uses_sequence_numbers=True),
    CommandSpec("STORE", messages.store, SELECTED, uid_ok=True, uses_sequence_numbers=True),
    CommandSpec("COPY", messages.copy, SELECTED, uid_ok=True),
    CommandSpec("MOVE", messages.move, SELECTED, uid_ok=True),
)
