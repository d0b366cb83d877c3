"""The input half of an IMAP session: lines, literals, spooling, compression.

Why a part of its own: how bytes become commands is where IMAP servers go wrong
(DESIGN.md §7), and none of it depends on what the commands do. Here:

- **One command at a time.** Input is buffered; the next command is parsed only
  after the previous one's tagged response has been written, however long the
  account's coroutines take. Pipelined commands are answered in order.
- **Literals are framed by the reader**, not the parser: ``{n}`` gets ``+`` only
  when the command may go on (a command with a ``literal_check`` in the table --
  APPEND -- checks the mailbox first and answers ``NO [TRYCREATE]`` without reading
  the literal), ``{n+}`` (LITERAL+) is always consumed, and over-size literals are
  consumed and refused.
- **Message literals are spooled** (memory, then disk), never held in the command.
- **STARTTLS discards everything buffered after it**; compressed input is inflated a
  step at a time.

:class:`CommandReader` is a mixin of :class:`agentpost.imap.server.IMAP4ServerProtocol`,
which provides the hooks declared at the top of the class.
"""

from __future__ import annotations

import logging
import re
import secrets
import tempfile
import zlib
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.python.failure import Failure

from agentpost.imap.commands.table import COMMANDS, LiteralCheck
from agentpost.imap.errors import response_text
from agentpost.imap.parser import LITERAL_RE, Command, ParseError, parse_command
from agentpost.imap.states import State
from agentpost.transport import SessionTransport

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

log = logging.getLogger("agentpost.imap.server")

#: Command lines (each line between literals) may be this long.
MAX_LINE_BYTES = 256 * 1024
#: Literals outside APPEND (passwords, search strings, mailbox names).
MAX_SMALL_LITERAL_BYTES = 64 * 1024
#: While a command is running, pause reading once this much input is queued.
MAX_BUFFERED_INPUT = 1024 * 1024
#: Compressed input is inflated this much at a time (COMPRESS=DEFLATE).
INFLATE_STEP = 64 * 1024

#: APPEND messages are spooled in memory up to this size, then on disk.
SPOOL_MEMORY_BYTES = 1024 * 1024
#: One APPEND may carry this many message literals (MULTIAPPEND messages, CATENATE
#: TEXT parts): each is a spool file and a parse.
MAX_APPEND_LITERALS = 1000
#: ... and this many bytes in all (each message is also held to the APPENDLIMIT). The
#: session's ``max_append_total_bytes`` is this, or its APPENDLIMIT if that is larger.
MAX_APPEND_TOTAL_BYTES = 256 * 1024 * 1024
_MARKER_AT_END = re.compile(rb"\{\d+\+?\}\r\n$")
#: The tag that starts a command line (RFC 3501 `tag`: astring characters but "+").
_TAG_AT_START = re.compile(rb"([!#$&'*,\-./0-9:;<=>?@A-Z\[\]^_`a-z|}~]{1,64}) ")


class CommandReader:
    """Turns the connection's bytes into whole commands and hands them to ``_dispatch``,
    one at a time."""

    # Provided by the session.
    state: State
    session_id: str
    max_append_bytes: int
    #: Bytes of message literals one APPEND may carry in all (MULTIAPPEND, CATENATE).
    max_append_total_bytes: int = MAX_APPEND_TOTAL_BYTES
    spool_dir: str | None
    tls_active: bool
    tls_options: Any
    _busy: bool
    _output_blocked: bool

    @property
    def _link(self) -> SessionTransport:
        raise NotImplementedError

    def send(self, line: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def login_allowed(self) -> bool:
        raise NotImplementedError

    def _arm_timer(self) -> None:
        raise NotImplementedError

    async def _dispatch(self, command: Command) -> None:
        raise NotImplementedError

    def _dispatch_failed(self, failure: Failure, command: Command) -> None:
        raise NotImplementedError

    def _init_reader(self) -> None:
        """The reader's state; called from the session's ``__init__``."""
        self._buffer = bytearray()
        self._pending = bytearray()  # the command assembled so far (lines + literals)
        self._literal_left = 0  # literal octets still to read into _pending
        self._discard_left = 0  # octets of a refused literal still to drop
        self._discarding_line = False  # skipping the rest of a refused command
        self._overlong_tag: str | None = None  # its tag, when the line was too long
        self._literal_checked = False
        self._head: tuple[str | None, str | None, list[Any]] | None = None  # see _peek
        self._check_peeks = 0
        self._deflate: Any = None  # COMPRESS=DEFLATE (RFC 4978), once active
        self._inflate: Any = None
        self._inflate_tail = b""  # compressed input not inflated yet (bounded expansion)
        self._spools: list[Any] = []  # APPEND messages of the command being read
        self._spooled_bytes = 0  # their sizes added up (the per-command total)
        self._spooling = False
        self._processing = False
        self._paused = False
        self._line_handler: Callable[[bytes], None] | None = None

    def _inflate_more(self) -> bool:
        """Inflate compressed input into the buffer, at most INFLATE_STEP bytes at a
        time and only while the buffer is short: a small compressed message that
        expands to gigabytes (a "zip bomb") never sits in memory."""
        try:
            out = self._inflate.decompress(self._inflate_tail, INFLATE_STEP)
        except zlib.error:
            self.send("* BYE Corrupt compressed data")
            self.close()
            return False
        if not out and self._inflate.unconsumed_tail == self._inflate_tail:
            self._inflate_tail = b""  # nothing more can come out of it
            return False
        self._inflate_tail = self._inflate.unconsumed_tail
        self._buffer += out
        return True

    def _take_line(self) -> bytes | None:
        newline = self._buffer.find(b"\n", 0, MAX_LINE_BYTES)
        if newline < 0:
            if len(self._buffer) >= MAX_LINE_BYTES:
                if self._line_handler is None:
                    m = _TAG_AT_START.match(bytes(self._pending[:80] or self._buffer[:80]))
                    self._overlong_tag = m.group(1).decode() if m else None
                # Only what is surely that line: the rest of it (and any command after
                # it, already buffered) is for _skip_refused_line.
                del self._buffer[:MAX_LINE_BYTES]
                self._pending.clear()
                self._discarding_line = True
                self.send("* BAD Command line too long")
            return None
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _process(self) -> None:
        """Handle buffered input until nothing more can be done now (a command is
        running, output is blocked, or more bytes are needed)."""
        if self._processing:
            return
        self._processing = True
        try:
            while self.state is not State.LOGOUT and not self._output_blocked and \
                    self._step():
                pass
        except Exception:
            ref = secrets.token_hex(4)
            log.exception("imap %s: input handling failed (ref %s)", self.session_id, ref)
            self.send(f"* BYE Internal error (ref {ref})")
            self.close()
        finally:
            self._processing = False
        self._flow_control()

    def _step(self) -> bool:
        """Handle one piece of input; False when no more can be handled now."""
        # Compressed input is inflated only while the buffer holds less than a
        # command line, so the buffer stays bounded whatever the ratio.
        if self._inflate_tail and len(self._buffer) <= MAX_LINE_BYTES and \
                self._inflate_more():
            return True
        if self._discard_left or self._literal_left:
            return self._take_literal()
        if self._line_handler is not None:
            line = self._rest_of_overlong_line() if self._discarding_line else \
                self._take_line()
            if line is None:
                return bool(self._inflate_tail) or self._overlong_then_more()
            handler, self._line_handler = self._line_handler, None
            self._arm_timer()
            handler(line)
            return True
        if self._busy:
            return False
        if self._discarding_line:
            return self._skip_refused_line()
        line = self._take_line()
        if line is None:
            return bool(self._inflate_tail) or self._overlong_then_more()
        self._arm_timer()
        self._line(line)
        return True

    def _overlong_then_more(self) -> bool:
        """A line was just found too long and input follows it: go on (its rest, and
        any command pipelined after it, are waiting in the buffer)."""
        return self._discarding_line and bool(self._buffer)

    def _take_literal(self) -> bool:
        """Literal octets: dropped (a refused literal), or added to the command or to
        its spool file."""
        if not self._buffer:
            return False
        if self._discard_left:
            take = min(self._discard_left, len(self._buffer))
            del self._buffer[:take]
            self._discard_left -= take
            return True
        take = min(self._literal_left, len(self._buffer))
        if self._spools and self._spooling:
            self._spools[-1].write(self._buffer[:take])
        else:
            self._pending += self._buffer[:take]
        del self._buffer[:take]
        self._literal_left -= take
        return True

    def _rest_of_overlong_line(self) -> bytes | None:
        """The end of a continuation line (AUTHENTICATE's response, IDLE's DONE) that was
        too long: dropped, and the waiting command hears an empty line (which it refuses).
        Why: this end once reached the command as if it were the whole line, and the
        client's next command was then skipped as the rest of a refused one -- a client
        waiting for its tag forever."""
        newline = self._buffer.find(b"\n")
        if newline < 0:
            self._buffer.clear()
            return None
        del self._buffer[: newline + 1]
        self._discarding_line = False
        return b""

    def _skip_refused_line(self) -> bool:
        """A line of a refused command; its further literals are dropped too."""
        newline = self._buffer.find(b"\n")
        if newline < 0:
            self._buffer.clear()
            return bool(self._inflate_tail)
        line = bytes(self._buffer[:newline]).rstrip(b"\r")
        del self._buffer[: newline + 1]
        m = LITERAL_RE.search(line)
        if m is not None:  # a refused command's further literal
            self._discard_left = int(m.group(1))
        else:
            self._discarding_line = False
            if self._overlong_tag is not None:
                # The command is complete at last: a client waiting for its tag (imaplib
                # does) hears how it ended instead of hanging on the untagged BAD.
                tag, self._overlong_tag = self._overlong_tag, None
                self.send(f"{tag} BAD [TOOBIG] Command line too long")
        return True

    def _flow_control(self) -> None:
        if self.state is State.LOGOUT:
            return
        stalled = self._busy or self._output_blocked
        queued = len(self._buffer) + len(self._inflate_tail)
        if not self._paused and stalled and queued > MAX_BUFFERED_INPUT:
            self._paused = True
            self._link.pauseProducing()
        elif self._paused and (not stalled or queued <= MAX_BUFFERED_INPUT // 2):
            self._paused = False
            self._link.resumeProducing()

    def _line(self, line: bytes) -> None:
        """One line of a command: either a literal marker follows or the command is whole."""
        if not self._pending:
            if not line.strip():
                return  # tolerate empty lines between commands
            self._head = None  # a new command
            self._check_peeks = 0
            self._spooled_bytes = 0
        self._pending += line
        m = LITERAL_RE.search(line)
        if m is None:
            data = bytes(self._pending)
            self._pending.clear()
            self._literal_checked = False
            self._run(data)
            return
        size = int(m.group(1))
        sync = not m.group(2)
        tag, name, args = self._peek(len(m.group(0)))
        check = _literal_check(name)  # APPEND: its literals past the mailbox are messages
        if not args or self.state not in (State.AUTHENTICATED, State.SELECTED):
            # The mailbox name is never a message, and before login nothing is: a stranger
            # cannot make us hold (or spool) a message-sized literal.
            check = None
        limit = self.max_append_bytes if check is not None else MAX_SMALL_LITERAL_BYTES
        refusal = None
        if size > limit or len(self._pending) > 4 * MAX_LINE_BYTES:
            refusal = "NO [TOOBIG] Literal too large"
        elif check is not None and args:
            refusal = self._over_append_limits(size)
        if refusal is not None:
            self._pending.clear()
            self._close_spools()
            self._literal_checked = False
            if not sync:
                self._discard_left = size
                self._discarding_line = True
            self.send(f"{tag or '*'} {refusal}")
            return
        if sync and name == "LOGIN" and not self.login_allowed():
            # Do not invite a password in cleartext.
            self._pending.clear()
            self.send(f"{tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in")
            return
        self._pending += b"\r\n"
        if sync and check is not None and not self._literal_checked and args:
            # Check the mailbox before inviting the message (RFC 3501 §6.3.11).
            self._literal_checked = True
            self._busy = True
            d: defer.Deferred[str | None] = defer.ensureDeferred(
                check(cast("IMAP4ServerProtocol", self), tag, args, size))
            d.addBoth(self._literal_checked_cb, size, tag)
            return
        self._begin_literal(size, check is not None and bool(args))  # not the mailbox name
        if sync:
            self.send("+ Ready for literal data")

    def _over_append_limits(self, size: int) -> str | None:
        """The refusal of one more message literal of an APPEND, if it is one too many
        or takes the command past its total size (RFC 5530 [LIMIT])."""
        if len(self._spools) >= MAX_APPEND_LITERALS:
            return f"NO [LIMIT] At most {MAX_APPEND_LITERALS} literals in one APPEND"
        total = max(self.max_append_total_bytes, self.max_append_bytes)
        if self._spooled_bytes + size > total:
            return f"NO [LIMIT] At most {total} bytes in one APPEND"
        return None

    def _begin_literal(self, size: int, spool: bool) -> None:
        """Read the next ``size`` octets as a literal. An APPEND message goes to a spool
        file (memory up to 1 MiB, then disk) and the command keeps an empty literal in its
        place, so a 50 MB APPEND is never held in the command buffer."""
        self._literal_left = size
        # Every message literal has its spool, even an empty one: the handler takes
        # them in the order of the command's literals (MULTIAPPEND, CATENATE).
        self._spooling = spool
        if self._spooling:
            self._spooled_bytes += size
            tail = bytes(self._pending[-40:])
            m = _MARKER_AT_END.search(tail)
            if m is not None:
                del self._pending[len(self._pending) - len(tail) + m.start():]
                self._pending += b"{0}\r\n"
            self._spools.append(tempfile.SpooledTemporaryFile(  # closed after the command
                max_size=SPOOL_MEMORY_BYTES, dir=self.spool_dir))

    def _close_spools(self) -> None:
        spools, self._spools = self._spools, []
        self._spooling = False
        for spool in spools:
            spool.close()

    def _peek(self, marker_len: int) -> tuple[str | None, str | None, list[Any]]:
        """Tag, name and arguments of the command being read, at one of its literals.

        Why not parse everything read so far at every literal: that cost O(literals x
        size), a minute of reactor time for a 26 KB command of 2,000 one-byte literals.
        Tag and name come from the first line; only APPEND's mailbox check needs the
        arguments again, at its first two literals at most (the mailbox name may
        itself be a literal; the message is the next one)."""
        if self._head is None or (_literal_check(self._head[1]) is not None
                                  and not self._literal_checked and self._check_peeks < 2):
            self._check_peeks += self._head is not None
            self._head = self._peek_command(bytes(self._pending[:len(self._pending)
                                                               - marker_len]))
        return self._head

    def _peek_command(self, prefix: bytes) -> tuple[str | None, str | None, list[Any]]:
        try:
            command = parse_command(prefix)
        except ParseError as exc:
            try:  # a literal inside a list: APPEND ... CATENATE (TEXT {n}
                command = parse_command(prefix + b")")
            except Exception:
                return getattr(exc, "tag", None), None, []
        except Exception:
            return None, None, []
        return command.tag, command.name, command.args

    def _literal_checked_cb(self, refusal: Any, size: int, tag: str | None) -> None:
        self._busy = False
        if self.state is State.LOGOUT:
            return
        if isinstance(refusal, Failure):  # the check itself broke: the command still
            # gets its tagged answer (untagged, the client would wait for it forever)
            log.error("imap: APPEND mailbox check failed: %s", refusal.getTraceback())
            refusal = f"{tag or '*'} NO [UNAVAILABLE] Temporary failure; try again"
        if refusal is not None:
            self._pending.clear()
            self._close_spools()
            self._literal_checked = False
            self.send(response_text(refusal))
        else:
            self._begin_literal(size, True)
            self.send("+ Ready for literal data")
        self._process()

    def _run(self, data: bytes) -> None:
        self._spooling = False
        try:
            command = parse_command(data)
        except ParseError as exc:
            self._close_spools()
            self.send(f"{getattr(exc, 'tag', None) or '*'} BAD {response_text(str(exc))}")
            return
        self._busy = True
        d = defer.ensureDeferred(self._dispatch(command))
        d.addErrback(self._dispatch_failed, command)
        d.addCallback(self._finished)

    def _finished(self, _: Any) -> None:
        self._busy = False
        self._close_spools()
        if self.state is State.LOGOUT:
            return
        self._arm_timer()
        if not self._processing:
            self._process()

    # ------------------------------------------------------------------ for the handlers

    def start_tls(self) -> None:
        """STARTTLS was answered: nothing the client pipelined in cleartext may run
        inside the TLS session (RFC 3501 §6.2.1 / RFC 2595 §3.1)."""
        self._buffer.clear()
        self._pending.clear()
        self._close_spools()
        self._literal_left = self._discard_left = 0
        self._discarding_line = False
        self.tls_active = True
        self._link.startTLS(self.tls_options)

    @property
    def compressing(self) -> bool:
        return self._deflate is not None

    def start_compression(self) -> None:
        """COMPRESS was answered: raw DEFLATE both ways (RFC 4978)."""
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        # Whatever the client sent after the command is already compressed.
        self._inflate_tail = bytes(self._buffer)
        self._buffer.clear()

    def set_line_handler(self, handler: Callable[[bytes], None]) -> None:
        """The next input line goes to ``handler`` instead of starting a command
        (an AUTHENTICATE continuation, IDLE's DONE)."""
        self._line_handler = handler

    def clear_line_handler(self, handler: Callable[[bytes], None]) -> None:
        if self._line_handler is handler:
            self._line_handler = None

    def read_line(self) -> defer.Deferred[bytes]:
        """The next input line."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self.set_line_handler(d.callback)
        return d

    def take_spool(self) -> IO[bytes] | None:
        """The next message literal of this command that went to a spool file."""
        return self._spools.pop(0) if self._spools else None


def _literal_check(name: str | None) -> LiteralCheck | None:
    """The check a command runs before its message literals (APPEND), if it has one."""
    spec = COMMANDS.get(name) if name else None
    return spec.literal_check if spec is not None else None
