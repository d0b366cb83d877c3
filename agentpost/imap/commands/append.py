"""APPEND (RFC 3501 §6.3.11, UIDPLUS APPENDUID, APPENDLIMIT).

Two halves: :func:`check_literal` runs when the reader meets the message's
synchronizing literal, before it invites the client to send it (a missing folder or a
message that cannot fit the quota is refused without reading it); :func:`append` runs
when the command is whole, with the message in a spool file the reader filled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentpost.imap.commands.common import account, require_write
from agentpost.imap.errors import error_for, no
from agentpost.imap.parser import Command, ParseError, mailbox, parse_datetime, parse_flags
from agentpost.imap.states import State
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol


async def check_literal(session: IMAP4ServerProtocol, tag: str | None, args: list[Any],
                        size: int) -> str | None:
    """None if the APPEND may go on, else the tagged refusal."""
    try:
        session.require(State.AUTHENTICATED, State.SELECTED)
        require_write(session)
        name = mailbox(args[0])
        await account(session).check_folder(name)
        used, limit = await account(session).quota()
        if limit and used + size > limit:
            raise errors.MailboxFull()
    except ParseError as exc:
        return f"{tag} BAD {exc}"
    except Exception as exc:
        return f"{tag} {error_for(exc, missing='TRYCREATE').render()}"
    return None


async def append(session: IMAP4ServerProtocol, command: Command) -> str:
    args = list(command.args)
    if len(args) < 2:
        raise ParseError("APPEND needs a mailbox and a message")
    name = mailbox(args.pop(0))
    message: Any = args.pop()
    if not isinstance(message, bytes):
        raise ParseError("APPEND message must be a literal")
    spool = session.take_spool() if not message else None
    if spool is not None:  # the literal went to a spool file
        message = spool
        message.seek(0, 2)
        size = message.tell()
        message.seek(0)
    else:
        size = len(message)
    flags: frozenset[str] = frozenset()
    when = None
    if args and isinstance(args[0], list):
        flags = parse_flags(args.pop(0)) - {"\\Recent"}
    if args and isinstance(args[0], str):
        when = parse_datetime(str(args.pop(0)))
    if args:
        raise ParseError("Unexpected APPEND arguments")
    require_write(session)
    if size > session.max_append_bytes:
        raise no("Message too large", "TOOBIG")
    if not size:
        raise no("An empty message cannot be appended", "CANNOT")
    try:
        uidvalidity, uid = await account(session).append(name, message, flags, when)
    except errors.NotFound as exc:
        raise error_for(exc, missing="TRYCREATE") from exc
    view = session.selected
    if session.state is State.SELECTED and view is not None and name == view.name:
        view.dirty = True
    return f"[APPENDUID {uidvalidity} {uid}] APPEND completed"
