"""THREAD (RFC 5256): ORDEREDSUBJECT and REFERENCES, as sequence numbers or (UID
THREAD) UIDs.

The folder supplies, in one query, the threading fields of the messages the search
key matches (:meth:`agentpost.imap.interfaces.IMAPFolder.thread_fields`); the
algorithms and the rendering are :mod:`agentpost.mail.imapthread`'s. Threading a
large mailbox is CPU work (linear-logarithmic, no recursion), so above
:data:`INLINE_MESSAGES` messages it runs in the reactor's thread pool rather than on
the reactor thread (DESIGN.md §3.12).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

from agentpost.imap.commands.common import selected
from agentpost.imap.errors import no
from agentpost.imap.interfaces import ThreadFields
from agentpost.imap.parser import Atom, Command, ParseError, astring
from agentpost.imap.search_grammar import parse_search
from agentpost.imap.updates import enable_condstore
from agentpost.mail.imapthread import (
    ThreadMessage,
    ThreadNode,
    thread_data,
    thread_orderedsubject,
    thread_references,
)

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

Algorithm = Callable[[Iterable[ThreadMessage]], list[ThreadNode]]

#: The algorithms offered, as advertised (``THREAD=<name>``).
ALGORITHMS: dict[str, Algorithm] = {
    "ORDEREDSUBJECT": thread_orderedsubject,
    "REFERENCES": thread_references,
}
_CHARSETS = ("UTF-8", "US-ASCII")
#: Up to this many messages are threaded on the reactor thread (a few milliseconds).
INLINE_MESSAGES = 2000


async def thread(session: IMAP4ServerProtocol, command: Command) -> None:
    """``THREAD algorithm charset search-criteria``: one ``* THREAD`` response with the
    matching messages' threads. An unknown algorithm is BAD (it is part of the
    syntax the server accepts), an unknown charset NO [BADCHARSET] (RFC 5256 §3)."""
    view = selected(session)
    args = list(command.args)
    if len(args) < 3:
        raise ParseError("THREAD needs an algorithm, a charset and search keys")
    if not isinstance(args[0], Atom) or args[0].upper() not in ALGORITHMS:
        raise ParseError(f"Unknown THREAD algorithm {args[0]!s}; "
                         f"supported: {' '.join(ALGORITHMS)}")
    algorithm = ALGORITHMS[args[0].upper()]
    charset = astring(args[1], "charset").upper()
    if charset not in _CHARSETS:
        raise no("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
    _, key = parse_search(args[2:])
    wants_modseq = [False]
    resolved = view.resolve_search(key, wants_modseq)
    if wants_modseq[0]:
        enable_condstore(session)
    rows = [r for r in await view.folder.thread_fields(resolved) if r.uid in view.meta]
    numbers = [r.uid if command.uid else view.seq(r.uid) for r in rows]
    threads = await _run(session, algorithm, rows, numbers)
    session.send("* " + thread_data(threads))


async def _run(session: IMAP4ServerProtocol, algorithm: Algorithm, rows: list[ThreadFields],
               numbers: list[int]) -> list[ThreadNode]:
    """The threads, computed in the thread pool when there are many messages and the
    session's clock is a reactor that has one (a test clock threads inline)."""
    clock: Any = session.clock
    if len(rows) > INLINE_MESSAGES and IReactorThreads.providedBy(clock):
        threads: list[ThreadNode] = await deferToThreadPool(
            clock, clock.getThreadPool(), _threads, algorithm, rows, numbers)
        return threads
    return _threads(algorithm, rows, numbers)


def _threads(algorithm: Algorithm, rows: list[ThreadFields],
             numbers: list[int]) -> list[ThreadNode]:
    """Pure: the messages as the algorithms see them (base subject and reply flag
    extracted here, so in the pool too), threaded."""
    messages = [ThreadMessage.from_fields(number, message_id=r.message_id,
                                          references=r.references, in_reply_to=r.in_reply_to,
                                          subject=r.subject, sent_at=r.sent_at,
                                          internal_date=r.internaldate)
                for r, number in zip(rows, numbers, strict=True)]
    return algorithm(messages)
