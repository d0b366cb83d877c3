"""APPEND (RFC 3501 §6.3.11) with MULTIAPPEND (RFC 3502), CATENATE (RFC 4469), UIDPLUS
APPENDUID (RFC 4315 §3) and APPENDLIMIT (RFC 7889).

Two halves: :func:`check_literal` runs when the reader meets the command's first
synchronizing message literal, before it invites the client to send it (a missing
folder or a message that cannot fit the quota is refused without reading it);
:func:`append` runs when the command is whole, with every message literal in a spool
file the reader filled, in the order of the literals. The reader also bounds the
literals of one command (count and total bytes, ``NO [LIMIT]``) as they arrive.

``append`` then works in three steps, so one bad message stores nothing (RFC 3502:
"all or none"):

1. parse every message (flags, date, a literal or a CATENATE list) -- BAD on syntax;
2. assemble every message: a plain literal is its spool; a CATENATE message is its
   TEXT parts and the bytes its URLs name, copied into a new spool
   (:mod:`agentpost.imap.commands.catenate_parts`) -- ``NO [BADURL]``, ``NO [TOOBIG]``;
3. store them all in one transaction through the ingest path -- ``[APPENDUID v uid-set]``.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

from agentpost.imap import rev2
from agentpost.imap.commands.catenate_parts import copy_url, too_big
from agentpost.imap.commands.common import account, require_write
from agentpost.imap.errors import error_for, no
from agentpost.imap.interfaces import AppendMessage
from agentpost.imap.parser import (
    Command,
    Literal,
    ParseError,
    astring,
    parse_datetime,
    parse_flags,
)
from agentpost.imap.states import State
from agentpost.mail.imapformat import compact_numbers
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

#: Messages in one APPEND (the reader also caps its literals and their total size).
MAX_APPEND_MESSAGES = 1000
#: CATENATE parts (TEXT and URL) in one APPEND: each URL is a read of another message.
MAX_CATENATE_PARTS = 1000
#: A URL sent as a literal is at most this long (catenate.MAX_URL_CHARS).
_MAX_URL_LITERAL = 8192
#: CATENATE messages are assembled in memory up to this size, then on disk.
_SPOOL_MEMORY_BYTES = 1024 * 1024


async def check_literal(session: IMAP4ServerProtocol, tag: str | None, args: list[Any],
                        size: int) -> str | None:
    """None if the APPEND may go on, else the tagged refusal."""
    try:
        session.require(State.AUTHENTICATED, State.SELECTED)
        require_write(session)
        name = rev2.mailbox_arg(session, args[0])
        await account(session).check_folder(name)
        used, limit = await account(session).quota()
        if limit and used + size > limit:
            raise errors.MailboxFull()
    except ParseError as exc:
        return f"{tag} BAD {exc}"
    except Exception as exc:
        return f"{tag} {error_for(exc, missing='TRYCREATE').render()}"
    return None


@dataclass
class _Draft:
    """One message of the command as given: its options and its parts, in order
    (``("text", spool)`` or ``("url", url)``); a plain literal is one text part."""

    flags: frozenset[str] = frozenset()
    when: datetime | None = None
    parts: list[tuple[str, Any]] = field(default_factory=list)
    catenate: bool = False


class _Spools:
    """The command's spooled literals, taken in order; all closed when it ends."""

    def __init__(self, session: IMAP4ServerProtocol) -> None:
        self._session = session
        self.opened: list[IO[bytes]] = []

    def take(self, token: Literal) -> IO[bytes]:
        spool = self._session.take_spool() if not token else None
        data: IO[bytes] = spool if spool is not None else io.BytesIO(bytes(token))
        self.opened.append(data)
        return data

    def close(self) -> None:
        for spool in self.opened:
            spool.close()


def _size(data: IO[bytes]) -> int:
    data.seek(0, 2)
    size = data.tell()
    data.seek(0)
    return size


def _parse_catenate(parts: Any, spools: _Spools, draft: _Draft) -> None:
    """``(TEXT literal / URL astring ...)`` (RFC 4469 §5)."""
    if not isinstance(parts, list) or not parts or len(parts) % 2:
        raise ParseError("CATENATE needs a list of TEXT and URL parts")
    for kind, value in zip(parts[::2], parts[1::2], strict=True):
        kind = str(kind).upper() if isinstance(kind, str) else ""
        if kind == "TEXT" and isinstance(value, Literal):
            draft.parts.append(("text", spools.take(value)))
        elif kind == "URL" and isinstance(value, Literal):  # an astring may be a literal
            spool = spools.take(value)
            if _size(spool) > _MAX_URL_LITERAL:
                raise ParseError("CATENATE URL too long")
            draft.parts.append(("url", spool.read().decode("utf-8", "replace")))
        elif kind == "URL" and isinstance(value, str):
            draft.parts.append(("url", astring(value, "URL")))
        else:
            raise ParseError("CATENATE parts are TEXT literal or URL url")


def _parse_messages(args: list[Any], spools: _Spools) -> list[_Draft]:
    """Every ``[flags] [date] (literal / CATENATE (...))`` of the command (RFC 3502 §6.3.11,
    RFC 4469 §5), each literal matched with its spool in order."""
    drafts: list[_Draft] = []
    i, parts = 0, 0
    while i < len(args):
        if len(drafts) >= MAX_APPEND_MESSAGES:
            raise ParseError(f"At most {MAX_APPEND_MESSAGES} messages in one APPEND")
        draft = _Draft()
        if isinstance(args[i], list):
            draft.flags = parse_flags(args[i]) - {"\\Recent"}
            i += 1
        token = args[i] if i < len(args) else None
        if isinstance(token, str) and not isinstance(token, Literal) and \
                token.upper() != "CATENATE":
            draft.when = parse_datetime(str(token))
            i += 1
            token = args[i] if i < len(args) else None
        if isinstance(token, Literal):
            draft.parts.append(("text", spools.take(token)))
            i += 1
        elif isinstance(token, str) and token.upper() == "CATENATE" and i + 1 < len(args):
            draft.catenate = True
            _parse_catenate(args[i + 1], spools, draft)
            parts += len(draft.parts)
            if parts > MAX_CATENATE_PARTS:
                raise ParseError(f"At most {MAX_CATENATE_PARTS} CATENATE parts in one APPEND")
            i += 2
        else:
            raise ParseError("APPEND message must be a literal or CATENATE")
        drafts.append(draft)
    if not drafts:
        raise ParseError("APPEND needs a mailbox and a message")
    return drafts


async def _assemble(session: IMAP4ServerProtocol, draft: _Draft,
                    spools: _Spools) -> AppendMessage:
    """The message a draft describes, held to the APPENDLIMIT; NO [BADURL] for a URL
    that names nothing of this account."""
    limit = session.max_append_bytes
    if not draft.catenate:
        [(_, data)] = draft.parts
        size = _size(data)
    else:
        data = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY_BYTES,
                                             dir=session.spool_dir)
        spools.opened.append(data)
        size = 0
        for kind, value in draft.parts:
            if kind == "text":
                part_size = _size(value)
                if size + part_size > limit:
                    raise too_big()
                shutil.copyfileobj(value, data)
                size += part_size
            else:
                size += await copy_url(session, value, data, limit - size)
        data.seek(0)
    if size > limit:
        raise too_big()
    if not size:
        raise no("An empty message cannot be appended", "CANNOT")
    return AppendMessage(data, draft.flags, draft.when)


async def _assemble_all(session: IMAP4ServerProtocol, drafts: list[_Draft],
                        spools: _Spools) -> list[AppendMessage]:
    """Every message of the command, the bytes copied from URLs counted with the rest:
    one command may not make us write (or read) more than the reader lets literals
    bring, whatever mix of literals and CATENATE URLs carries them."""
    budget = max(session.max_append_total_bytes, session.max_append_bytes)
    out: list[AppendMessage] = []
    for draft in drafts:
        message = await _assemble(session, draft, spools)
        data = message.message
        budget -= len(data) if isinstance(data, bytes) else _size(data)
        if budget < 0:
            raise no("The messages of one APPEND exceed its total limit", "LIMIT")
        out.append(message)
    return out


async def append(session: IMAP4ServerProtocol, command: Command) -> str:
    args = list(command.args)
    if len(args) < 2:
        raise ParseError("APPEND needs a mailbox and a message")
    name = rev2.mailbox_arg(session, args[0])
    spools = _Spools(session)
    try:
        drafts = _parse_messages(args[1:], spools)
        require_write(session)
        messages = await _assemble_all(session, drafts, spools)
        try:
            if len(messages) == 1:
                [msg] = messages
                uidvalidity, uid = await account(session).append(
                    name, msg.message, msg.flags, msg.internaldate)
                uids = [uid]
            else:
                uidvalidity, uids = await account(session).append_many(name, messages)
        except errors.NotFound as exc:
            raise error_for(exc, missing="TRYCREATE") from exc
    finally:
        spools.close()
    view = session.selected
    if session.state is State.SELECTED and view is not None and name == view.name:
        view.dirty = True
    return f"[APPENDUID {uidvalidity} {compact_numbers(uids)}] APPEND completed"
