"""A session's output "cork": what one command or one burst of pipelined commands
answers leaves in one send (issue 12). IMAP and SMTP sessions both use it.

Why: an answer is often several writes (IMAP: untagged lines, then the tagged
completion; SMTP: one reply per pipelined MAIL, RCPT and DATA), and every
``transport.write`` costs a writability registration with epoll, a pass of the reactor
and an unregistration; sent one by one through :func:`agentpost.listening.send_direct`
each is still a ``send`` and a wake-up of the client. On a small VM those syscalls and
wake-ups were a large part of the CPU per command. Collected, the answer leaves in one
send (an IMAP session under COMPRESS=DEFLATE compresses it once). RFC 2920 section 3.1
asks an SMTP server for exactly this: keep the replies to a group of pipelined commands
and send them as a unit, as Postfix's smtpd does.

When bytes are held, and when they leave (the order of bytes never changes):

- **While a command runs** (or NOTIFY's unsolicited work, which runs like one): held
  until it ends -- the tagged completion is its last write.
- **During a synchronous batch** (input handled in ``dataReceived``, a resumed
  producer, the step after a command): held until the batch ends, so pipelined commands
  answered at once share a send; the batch's end flushes even if a command is still
  running (its partial output only leaves sooner).
- **Otherwise** (the greeting, a timer's BYE): at once.
- **Always at once** when the session is about to wait for the client or for the
  transport: a continuation request (``+``), IDLE's wait, a drain that will wait; and
  before STARTTLS, COMPRESS, close.
- **Past** :data:`MAX_HELD_BYTES` the held bytes leave through the normal path, so large
  FETCH streaming and the producer's flow control work as without the cork.

An SMTP session uses batches only (its input loop, and the step after a reply the
delivery agent computed): a reply never waits for the client's next bytes, and a
session that starts waiting for the agent sends what it answered before.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

#: Held bytes beyond this leave at once (Twisted's write buffer is as large).
MAX_HELD_BYTES = 64 * 1024


class Cork:
    """Holds a session's output bytes while a command or a batch runs.

    ``sink`` puts bytes on the wire (compressing them if COMPRESS is active); it is
    called once per flush with everything held, in order."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._held: list[bytes] = []
        self._size = 0
        self._batches = 0  # synchronous batches in progress (nested)
        self._commands = 0  # commands (or unsolicited work) in progress
        self._batch = _Batch(self)

    def write(self, data: bytes) -> None:
        """``data`` after everything written before it: held or sent now."""
        if not self._batches and not self._commands:
            self.flush()  # nothing should be held here; order first, whatever happens
            self._sink(data)
            return
        self._held.append(data)
        self._size += len(data)
        if self._size >= MAX_HELD_BYTES:
            self.flush()

    def flush(self) -> None:
        """Send everything held, in one piece."""
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held = []
        self._size = 0
        self._sink(data)

    def discard(self) -> None:
        """The connection is gone: what is held goes nowhere."""
        self._held = []
        self._size = 0

    def batch(self) -> _Batch:
        """A context that holds writes made inside; the outermost batch flushes at its
        end. Nested use is counted by the cork, so one context object serves all."""
        return self._batch

    def begin_command(self) -> None:
        """A command (or unsolicited work) starts: hold its writes until it ends."""
        self._commands += 1

    def end_command(self) -> None:
        """It ended: flush, unless a batch in progress will."""
        self._commands = max(0, self._commands - 1)
        if not self._batches:
            self.flush()


class _Batch:
    """:meth:`Cork.batch`'s context. A class rather than ``@contextmanager``: an SMTP
    message runs through five batches, and a generator-based context cost ~2.5 us of
    the reactor's time each, this one ~0.3 us."""

    __slots__ = ("_cork",)

    def __init__(self, cork: Cork) -> None:
        self._cork = cork

    def __enter__(self) -> None:
        self._cork._batches += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        cork = self._cork
        cork._batches -= 1
        if not cork._batches:
            cork.flush()
