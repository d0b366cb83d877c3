"""The IMAP4rev1 server protocol (RFC 3501) on a Twisted transport: an explicit state machine.

Why not ``twisted.mail.imap4.IMAP4Server``: see DESIGN.md §7. This module is built
so that its defects cannot happen here:

- **One command at a time.** Input is buffered; the next command is parsed only
  after the previous one's tagged response has been written, however long the
  account's coroutines take. Pipelined commands are answered in order.
- **Literals are framed by the reader**, not the parser: ``{n}`` gets ``+`` only
  when the command may go on (APPEND checks the mailbox first and answers
  ``NO [TRYCREATE]`` without reading the literal), ``{n+}`` (LITERAL+) is always
  consumed, and over-size literals are consumed and refused.
- **STARTTLS discards everything buffered after it.**
- **Byte-exact bodies**: sections are slices of the stored message
  (:mod:`agentpost.mail.imapformat`), partial ranges included.
- **Every session keeps its own sequence-number view** and reports other
  sessions' changes (EXISTS, FETCH, EXPUNGE) where RFC 3501 §7.4.1 allows, and at
  once while IDLE.
- **Errors are answered, never raised**: syntax errors are ``BAD``, domain errors
  ``NO`` with a response code from one table, anything unexpected is logged with a
  reference and answered ``NO [UNAVAILABLE]``.

- **Large bodies are streamed**: above ``stream_threshold`` a body section is a byte
  range of the stored blob (the section map written at ingest), sent in chunks that wait
  for the transport to drain, so memory per FETCH stays at a chunk.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import enum
import functools
import ipaddress
import logging
import re
import secrets
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from agentpost.imap.interfaces import (
    Changes,
    FetchRow,
    FetchWants,
    FolderInfo,
    FolderSnapshot,
    IMAPAccount,
    IMAPBackend,
    MessageMeta,
)
from agentpost.imap.parser import (
    LITERAL_RE,
    Atom,
    Command,
    FetchItem,
    ParseError,
    SeqSet,
    astring,
    decode_mailbox,
    encode_mailbox,
    mailbox,
    merge_ranges,
    number,
    parse_command,
    parse_datetime,
    parse_fetch_items,
    parse_flags,
    parse_search,
    parse_seqset,
    resolve_seqset,
)
from agentpost.imap.patterns import PatternSet, PatternTooLong
from agentpost.listening import no_delay
from agentpost.mail import imapformat
from agentpost.model import errors
from agentpost.transport import SessionTransport

log = logging.getLogger(__name__)

__all__ = ["IMAP4ServerProtocol", "IMAPError", "State"]

#: Command lines (each line between literals) may be this long.
MAX_LINE_BYTES = 256 * 1024
#: Literals outside APPEND (passwords, search strings, mailbox names).
MAX_SMALL_LITERAL_BYTES = 64 * 1024
#: The default APPEND literal limit.
MAX_APPEND_BYTES = 64 * 1024 * 1024
#: While a command is running, pause reading once this much input is queued.
MAX_BUFFERED_INPUT = 1024 * 1024
#: Messages larger than this are streamed from the blob store section by section.
STREAM_THRESHOLD_BYTES = 256 * 1024
#: One read from the blob store while streaming a literal.
STREAM_CHUNK_BYTES = 256 * 1024
#: Compressed input is inflated this much at a time (COMPRESS=DEFLATE).
INFLATE_STEP = 64 * 1024
#: Bodies (each under the stream threshold) read ahead of the FETCH response being sent.
READ_AHEAD = 8

#: APPEND messages are spooled in memory up to this size, then on disk.
SPOOL_MEMORY_BYTES = 1024 * 1024
#: After we close, a connection still open this much later is aborted: a TLS client
#: that never answers close_notify, or one that stopped reading.
CLOSE_GRACE_S = 5.0
_MARKER_AT_END = re.compile(rb"\{\d+\+?\}\r\n$")

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class IMAPError(Exception):
    """Answer the current command with ``status [code] text``."""

    def __init__(self, status: str, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code

    def render(self) -> str:
        return f"{self.status} [{self.code}] {self.text}" if self.code else \
            f"{self.status} {self.text}"


def _no(text: str, code: str | None = None) -> IMAPError:
    return IMAPError("NO", text, code)


def _bad(text: str) -> IMAPError:
    return IMAPError("BAD", text)


def error_for(exc: BaseException, *, missing: str = "NONEXISTENT") -> IMAPError:
    """The one table from domain errors to IMAP responses (RFC 5530 codes)."""
    if isinstance(exc, IMAPError):
        return exc
    if isinstance(exc, errors.NotFound):
        text = "Mailbox does not exist" if missing == "TRYCREATE" else exc.message
        return _no(text, missing)
    if isinstance(exc, errors.Conflict):
        return _no(exc.message, "ALREADYEXISTS")
    if isinstance(exc, errors.Forbidden):
        return _no(exc.message, "NOPERM")
    if isinstance(exc, errors.Unauthenticated):
        return _no("Authentication failed", "AUTHENTICATIONFAILED")
    if isinstance(exc, errors.PayloadTooLarge):
        return _no(exc.message, "TOOBIG")
    if isinstance(exc, errors.MailboxFull):
        return _no(exc.message, "OVERQUOTA")
    if isinstance(exc, errors.AgentPostError):
        if exc.temporary:
            return _no(exc.message, "UNAVAILABLE")
        return _no(exc.message, "CANNOT")
    ref = secrets.token_hex(4)
    log.error("imap: internal error ref %s", ref, exc_info=(type(exc), exc, exc.__traceback__))
    return _no(f"Internal error (ref {ref}); try again", "UNAVAILABLE")


def _imap_quote(text: str) -> str:
    return imapformat.quote(text)


@functools.lru_cache(maxsize=4096)
def _flag_list(flags: frozenset[str], recent: bool) -> str:
    """``(\\Seen \\Recent label)``: flag sets are shared objects (storage.imap.flags_of),
    so a 10,000-message FETCH renders each distinct one once."""
    shown = sorted(flags - {"\\Recent"})
    if recent:
        shown.append("\\Recent")
    return "(" + " ".join(shown) + ")"


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _internaldate(value: datetime | None) -> str:
    value = (value or datetime(1970, 1, 1, tzinfo=UTC)).astimezone(UTC)
    return (f'"{value.day:02d}-{_MONTHS[value.month - 1]}-{value.year:04d} '
            f'{value.hour:02d}:{value.minute:02d}:{value.second:02d} +0000"')


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


@implementer(IPushProducer)
class IMAP4ServerProtocol(Protocol):
    """One IMAP session. Build it through :class:`agentpost.imap.listener.IMAPFactory`.

    Arguments:
        backend: turns credentials into an :class:`IMAPAccount`.
        hostname: our name, in the greeting.
        clock: every timer uses it (``task.Clock`` in tests).
        tls_options: server TLS settings; STARTTLS is offered only if given.
        implicit_tls: the transport is TLS from the first byte (port 993).
        allow_plaintext_login: offer LOGIN/AUTHENTICATE without TLS (loopback dev only).
        max_append_bytes: largest APPEND literal; other literals are limited to 64 KiB.
        stream_threshold: messages above this size are streamed from the blob store.
        spool_dir: where APPEND messages over 1 MiB are spooled (system temp by default).
        autologout_s: idle time after login before ``BYE`` (RFC 3501 §5.4: ≥ 30 min).
        login_timeout_s: idle time before login.
        on_close: called once when the connection is gone.
        credentials: re-checks the login's key before every command and ends the
            session when the key is revoked, expires or loses power
            (:class:`agentpost.auth.sessions.LiveCredentials`); None in unit tests.
    """

    def __init__(
        self,
        backend: IMAPBackend,
        *,
        hostname: str = "localhost",
        clock: IReactorTime,
        tls_options: Any = None,
        implicit_tls: bool = False,
        allow_plaintext_login: bool = False,
        max_append_bytes: int = MAX_APPEND_BYTES,
        stream_threshold: int = STREAM_THRESHOLD_BYTES,
        spool_dir: str | None = None,
        autologout_s: float = 30 * 60,
        login_timeout_s: float = 120.0,
        on_close: Callable[[], None] | None = None,
        credentials: Any = None,
    ) -> None:
        self.backend = backend
        self.hostname = hostname
        self.clock = clock
        self.tls_options = tls_options
        self.tls_active = implicit_tls
        self.allow_plaintext_login = allow_plaintext_login
        self.max_append_bytes = max_append_bytes
        self.stream_threshold = stream_threshold
        self.spool_dir = spool_dir
        self.autologout_s = autologout_s
        self.login_timeout_s = login_timeout_s
        self._on_close = on_close
        self.credentials = credentials
        self._credential: Any = None  # a LiveSession once logged in
        self._rechecking = False
        self._abort_timer: Any = None
        self.session_id = secrets.token_hex(4)
        self.state = State.NOT_AUTHENTICATED
        self.account: IMAPAccount | None = None
        self.peer = ""
        self._peer_is_loopback = False
        # input framing
        self._buffer = bytearray()
        self._pending = bytearray()  # the command assembled so far (lines + literals)
        self._literal_left = 0  # literal octets still to read into _pending
        self._discard_left = 0  # octets of a refused literal still to drop
        self._discarding_line = False  # skipping the rest of a refused command
        self._append_checked = False
        self._head: tuple[str | None, str | None, list[Any]] | None = None  # see _peek
        self._append_peeks = 0
        self._deflate: Any = None  # COMPRESS=DEFLATE (RFC 4978), once active
        self._inflate: Any = None
        self._inflate_tail = b""  # compressed input not inflated yet (bounded expansion)
        self._spools: list[Any] = []  # APPEND messages of the command being read
        self._spooling = False
        self._busy = False
        self._processing = False
        self._paused = False
        self._output_blocked = False
        self._writable: list[defer.Deferred] = []
        self._line_handler: Callable[[bytes], None] | None = None
        self._timer: Any = None
        # selected-state view
        self.snapshot: FolderSnapshot | None = None
        self.readonly = False
        self._uids: list[int] = []
        self._meta: dict[int, MessageMeta] = {}
        self._recent: set[int] = set()
        self._pending_expunged: set[int] = set()
        self._highestmodseq = 0
        self._dirty = False
        self._unwatch: Callable[[], None] | None = None
        self._idle_wake: defer.Deferred | None = None
        self._idle_line: bytes | None = None
        self.condstore = False
        self.qresync = False  # RFC 7162: VANISHED instead of EXPUNGE, SELECT (QRESYNC ...)
        self._closed = False
        self._bye_sent = False  # LOGOUT's BYE is out: no more untagged responses

    # ------------------------------------------------------------------ capabilities

    def capabilities(self) -> list[str]:
        caps = ["IMAP4rev1", "LITERAL+", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT",
                "CHILDREN", "SPECIAL-USE", "UIDPLUS", "MOVE", "CONDSTORE", "LIST-EXTENDED",
                "LIST-STATUS", "ESEARCH", "QRESYNC", "QUOTA", "QUOTA=RES-STORAGE",
                f"APPENDLIMIT={self.max_append_bytes}", "STATUS=SIZE", "COMPRESS=DEFLATE",
                "SORT", "SORT=DISPLAY"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.tls_options is not None and not self.tls_active:
                caps.append("STARTTLS")
            if self._login_allowed():
                caps += ["AUTH=PLAIN", "SASL-IR"]
            else:
                caps.append("LOGINDISABLED")
        return caps

    def _login_allowed(self) -> bool:
        # The development switch never exposes passwords beyond this machine: a client on
        # another address still sees LOGINDISABLED, whatever the listener is bound to.
        return self.tls_active or (self.allow_plaintext_login and self._peer_is_loopback)

    @property
    def _link(self) -> SessionTransport:
        """The connection; only used between connectionMade and connectionLost."""
        assert self.transport is not None
        return cast(SessionTransport, self.transport)

    # ------------------------------------------------------------------ Twisted hooks

    def connectionMade(self) -> None:
        no_delay(self.transport)
        peer = self._link.getPeer()
        self.peer = str(getattr(peer, "host", "") or "")
        self._peer_is_loopback = _is_loopback(self.peer)
        self._link.registerProducer(self, True)
        self._send(f"* OK [CAPABILITY {' '.join(self.capabilities())}] "
                   f"{self.hostname} AgentPost IMAP4rev1 ready")
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.LOGOUT:
            return
        if self._inflate is not None:
            self._inflate_tail += data  # inflated bit by bit in _process
        else:
            self._buffer += data
        self._process()

    def _inflate_more(self) -> bool:
        """Inflate compressed input into the buffer, at most INFLATE_STEP bytes at a
        time and only while the buffer is short: a small compressed message that
        expands to gigabytes (a "zip bomb") never sits in memory."""
        try:
            out = self._inflate.decompress(self._inflate_tail, INFLATE_STEP)
        except zlib.error:
            self._send("* BYE Corrupt compressed data")
            self._close()
            return False
        if not out and self._inflate.unconsumed_tail == self._inflate_tail:
            self._inflate_tail = b""  # nothing more can come out of it
            return False
        self._inflate_tail = self._inflate.unconsumed_tail
        self._buffer += out
        return True

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        self.state = State.LOGOUT
        self._cancel_timer()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        self._release_credential()
        self._buffer.clear()
        self._pending.clear()
        self._close_spools()
        self._stop_watching()
        for d in self._writable:
            d.cancel()
        self._writable.clear()
        if self._idle_wake is not None and not self._idle_wake.called:
            self._idle_wake.cancel()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def pauseProducing(self) -> None:
        self._output_blocked = True

    def resumeProducing(self) -> None:
        self._output_blocked = False
        waiters, self._writable = self._writable, []
        for d in waiters:
            d.callback(None)
        if self.state is not State.LOGOUT:
            self._process()

    def stopProducing(self) -> None:
        """connectionLost does the cleanup."""

    # ------------------------------------------------------------------ output

    def _write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._deflate is not None:
            # A sync flush per write: every response reaches the client whole, at once.
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self._link.write(data)

    def _send(self, line: str) -> None:
        self._write(line.encode("utf-8") + b"\r\n")

    async def _drain(self) -> None:
        """Wait while the transport's write buffer is full (large FETCH responses)."""
        while self._output_blocked and self.state is not State.LOGOUT:
            d: defer.Deferred = defer.Deferred()
            self._writable.append(d)
            await d

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state = State.LOGOUT
        self._cancel_timer()
        self._buffer.clear()
        self._stop_watching()
        self._release_credential()
        self._link.unregisterProducer()
        self._link.loseConnection()
        # Over implicit TLS the transport is Twisted's TLS layer, whose loseConnection
        # sends close_notify and then waits for the client's; a client that has logged
        # out owes us nothing (RFC 8446 §6.1 lets either side close without waiting), so
        # the TCP connection beneath it is closed as soon as close_notify is flushed.
        beneath = getattr(self.transport, "transport", None)
        if self.tls_active and beneath is not None:
            beneath.loseConnection()
        # loseConnection waits for the peer: for its TLS close_notify, or for it to read
        # what is buffered. A peer that never does would keep the connection forever.
        self._abort_timer = self.clock.callLater(CLOSE_GRACE_S, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        log.info("imap %s: close not completed; aborting the connection", self.session_id)
        self._link.abortConnection()

    def _release_credential(self) -> None:
        if self._credential is not None:
            credential, self._credential = self._credential, None
            credential.close()

    def _end_session(self, reason: str) -> None:
        """The login's key died (revoked, expired, narrowed): BYE, then hang up --
        IDLE or not, whatever the session was doing."""
        if self.state is State.LOGOUT or self._rechecking:
            return
        log.info("imap %s: ending the session: %s", self.session_id, reason)
        self._send(f"* BYE {reason}")
        self._close()

    # ------------------------------------------------------------------ timers

    def _arm_timer(self) -> None:
        self._cancel_timer()
        if self.state is State.LOGOUT:
            return
        timeout = (self.login_timeout_s if self.state is State.NOT_AUTHENTICATED
                   else self.autologout_s)
        self._timer = self.clock.callLater(timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.state is State.LOGOUT:
            return
        log.info("imap %s: autologout in state %s", self.session_id, self.state.value)
        self._send("* BYE Autologout; idle for too long")
        self._close()

    # ------------------------------------------------------------------ input loop

    def _take_line(self) -> bytes | None:
        newline = self._buffer.find(b"\n", 0, MAX_LINE_BYTES)
        if newline < 0:
            if len(self._buffer) >= MAX_LINE_BYTES:
                self._buffer.clear()
                self._pending.clear()
                self._discarding_line = True
                self._send("* BAD Command line too long")
            return None
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self.state is not State.LOGOUT and not self._output_blocked:
                # Compressed input is inflated only while the buffer holds less than a
                # command line, so the buffer stays bounded whatever the ratio.
                if self._inflate_tail and len(self._buffer) <= MAX_LINE_BYTES and \
                        self._inflate_more():
                    continue
                if self._discard_left:
                    if not self._buffer:
                        break
                    take = min(self._discard_left, len(self._buffer))
                    del self._buffer[:take]
                    self._discard_left -= take
                    continue
                if self._literal_left:
                    if not self._buffer:
                        break
                    take = min(self._literal_left, len(self._buffer))
                    if self._spools and self._spooling:
                        self._spools[-1].write(self._buffer[:take])
                    else:
                        self._pending += self._buffer[:take]
                    del self._buffer[:take]
                    self._literal_left -= take
                    continue
                if self._line_handler is not None:
                    line = self._take_line()
                    if line is None:
                        if self._inflate_tail:
                            continue
                        break
                    handler, self._line_handler = self._line_handler, None
                    self._arm_timer()
                    handler(line)
                    continue
                if self._busy:
                    break
                if self._discarding_line:
                    newline = self._buffer.find(b"\n")
                    if newline < 0:
                        self._buffer.clear()
                        if self._inflate_tail:
                            continue
                        break
                    line = bytes(self._buffer[:newline]).rstrip(b"\r")
                    del self._buffer[: newline + 1]
                    m = LITERAL_RE.search(line)
                    if m is not None:  # a refused command's further literal
                        self._discard_left = int(m.group(1))
                    else:
                        self._discarding_line = False
                    continue
                line = self._take_line()
                if line is None:
                    if self._inflate_tail:
                        continue
                    break
                self._arm_timer()
                self._line(line)
        except Exception:
            ref = secrets.token_hex(4)
            log.exception("imap %s: input handling failed (ref %s)", self.session_id, ref)
            self._send(f"* BYE Internal error (ref {ref})")
            self._close()
        finally:
            self._processing = False
        self._flow_control()

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
            self._append_peeks = 0
        self._pending += line
        m = LITERAL_RE.search(line)
        if m is None:
            data = bytes(self._pending)
            self._pending.clear()
            self._append_checked = False
            self._run(data)
            return
        size = int(m.group(1))
        sync = not m.group(2)
        tag, name, args = self._peek(len(m.group(0)))
        limit = self.max_append_bytes if name == "APPEND" else MAX_SMALL_LITERAL_BYTES
        if size > limit or len(self._pending) > 4 * MAX_LINE_BYTES:
            self._pending.clear()
            self._close_spools()
            self._append_checked = False
            if not sync:
                self._discard_left = size
                self._discarding_line = True
            self._send(f"{tag or '*'} NO [TOOBIG] Literal too large")
            return
        if sync and name == "LOGIN" and not self._login_allowed():
            # Do not invite a password in cleartext.
            self._pending.clear()
            self._send(f"{tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in")
            return
        self._pending += b"\r\n"
        if sync and name == "APPEND" and not self._append_checked and args:
            # Check the mailbox before inviting the message (RFC 3501 §6.3.11).
            self._append_checked = True
            self._busy = True
            d = defer.ensureDeferred(self._check_append(tag, args, size))
            d.addBoth(self._append_checked_cb, size)
            return
        self._begin_literal(size, name == "APPEND" and bool(args))  # not the mailbox name
        if sync:
            self._send("+ Ready for literal data")

    def _begin_literal(self, size: int, spool: bool) -> None:
        """Read the next ``size`` octets as a literal. An APPEND message goes to a spool
        file (memory up to 1 MiB, then disk) and the command keeps an empty literal in its
        place, so a 50 MB APPEND is never held in the command buffer."""
        self._literal_left = size
        self._spooling = spool and size > 0
        if self._spooling:
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
        if self._head is None or (self._head[1] == "APPEND" and not self._append_checked
                                  and self._append_peeks < 2):
            self._append_peeks += self._head is not None
            self._head = self._peek_command(bytes(self._pending[:len(self._pending)
                                                               - marker_len]))
        return self._head

    def _peek_command(self, prefix: bytes) -> tuple[str | None, str | None, list[Any]]:
        try:
            command = parse_command(prefix)
        except ParseError as exc:
            return getattr(exc, "tag", None), None, []
        except Exception:
            return None, None, []
        return command.tag, command.name, command.args

    async def _check_append(self, tag: str | None, args: list[Any], size: int) -> str | None:
        """None if the APPEND may go on, else the tagged refusal (a missing folder or a
        message that cannot fit the quota is refused before the client sends it)."""
        try:
            self._require(State.AUTHENTICATED, State.SELECTED)
            self._require_write()
            name = mailbox(args[0])
            await self.account.check_folder(name)  # type: ignore[union-attr]
            used, limit = await self.account.quota()  # type: ignore[union-attr]
            if limit and used + size > limit:
                raise errors.MailboxFull()
        except ParseError as exc:
            return f"{tag} BAD {exc}"
        except Exception as exc:
            return f"{tag} {error_for(exc, missing='TRYCREATE').render()}"
        return None

    def _append_checked_cb(self, refusal: Any, size: int) -> None:
        self._busy = False
        if self.state is State.LOGOUT:
            return
        if isinstance(refusal, Failure):
            refusal = f"* NO [UNAVAILABLE] {refusal.getErrorMessage()}"
        if refusal is not None:
            self._pending.clear()
            self._close_spools()
            self._append_checked = False
            self._send(refusal)
        else:
            self._begin_literal(size, True)
            self._send("+ Ready for literal data")
        self._process()

    def _run(self, data: bytes) -> None:
        self._spooling = False
        try:
            command = parse_command(data)
        except ParseError as exc:
            self._close_spools()
            self._send(f"{getattr(exc, 'tag', None) or '*'} BAD {exc}")
            return
        self._busy = True
        d = defer.ensureDeferred(self._dispatch(command))
        d.addErrback(self._dispatch_failed, command)
        d.addCallback(self._finished)

    def _dispatch_failed(self, failure: Failure, command: Command) -> None:
        log.error("imap %s: response failed: %s", self.session_id, failure.getTraceback())
        if self.state is not State.LOGOUT:
            self._send(f"{command.tag} NO [UNAVAILABLE] Internal error")

    def _finished(self, _: Any) -> None:
        self._busy = False
        self._close_spools()
        if self.state is State.LOGOUT:
            return
        self._arm_timer()
        if not self._processing:
            self._process()

    # ------------------------------------------------------------------ dispatch

    ANY = ("CAPABILITY", "NOOP", "LOGOUT", "ID")
    NOT_AUTH = ("STARTTLS", "AUTHENTICATE", "LOGIN")
    AUTH = ("ENABLE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE",
            "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "NAMESPACE", "IDLE",
            "GETQUOTA", "GETQUOTAROOT", "SETQUOTA", "COMPRESS")
    SELECTED = ("CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY",
                "MOVE", "SORT")
    UID_COMMANDS = ("FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE", "SORT")
    #: Commands during which EXPUNGE may not be reported (RFC 3501 §7.4.1, RFC 5256).
    NO_EXPUNGE = ("FETCH", "STORE", "SEARCH", "SORT")

    async def _dispatch(self, command: Command) -> None:
        name = command.name
        try:
            if command.uid and name not in self.UID_COMMANDS:
                raise _bad(f"UID {name} is not a command")
            handler = getattr(self, f"_cmd_{name.lower()}", None)
            if handler is None or name not in self.ANY + self.NOT_AUTH + self.AUTH + \
                    self.SELECTED:
                raise _bad(f"Unknown command {name}")
            if self._credential is not None and name != "LOGOUT":
                await self._recheck_credential(command)
            if name in self.NOT_AUTH:
                self._require(State.NOT_AUTHENTICATED)
            elif name in self.AUTH:
                self._require(State.AUTHENTICATED, State.SELECTED)
            elif name in self.SELECTED:
                self._require(State.SELECTED)
            result = await handler(command)
            if self.state is State.SELECTED and name not in ("SELECT", "EXAMINE", "LOGOUT") \
                    and (self._dirty or name in ("NOOP", "CHECK")):
                await self._report_changes(
                    expunge=command.uid or name not in self.NO_EXPUNGE)
            response = f"OK {result}" if result else f"OK {name} completed"
        except _Answered:
            return
        except ParseError as exc:
            response = f"BAD {exc}"
        except Exception as exc:  # domain errors and bugs: NO, never a traceback
            if self.state is State.LOGOUT:
                return
            response = error_for(exc).render()
        if self.state is not State.LOGOUT or name == "LOGOUT":
            self._send(f"{command.tag} {response}")
        if name == "LOGOUT":
            self._close()

    async def _recheck_credential(self, command: Command) -> None:
        """Refuse the command and end the session if the login's key died since
        (DESIGN.md §3.11: a credential is re-checked for every command)."""
        credential = self._credential
        self._rechecking = True  # the check answers the command itself: see _end_session
        try:
            reason = await credential.check()
        except Exception:
            if credential.ended is None:
                raise  # the key could not be read: NO [UNAVAILABLE], the session stays
            reason = credential.ended
        finally:
            self._rechecking = False
        if reason is None:
            return
        if self.state is not State.LOGOUT:
            self._send(f"{command.tag} NO [EXPIRED] {reason}")
            self._end_session(reason)
        raise _Answered()

    def _require(self, *states: State) -> None:
        if self.state not in states:
            if self.state is State.NOT_AUTHENTICATED:
                raise _bad("Log in first")
            if states == (State.SELECTED,):
                raise _bad("No mailbox selected")
            raise _bad("Command not valid in this state")

    def _require_write(self) -> None:
        if self.account is None or not self.account.can_write:
            raise _no("This key may not change messages (messages:write needed)", "NOPERM")

    def _args(self, command: Command, count: int, at_most: int | None = None) -> list[Any]:
        args = command.args
        if len(args) < count or len(args) > (count if at_most is None else at_most):
            raise ParseError(f"Wrong number of arguments for {command.name}")
        return args

    # ------------------------------------------------------------------ any state

    async def _cmd_capability(self, command: Command) -> None:
        self._args(command, 0)
        self._send("* CAPABILITY " + " ".join(self.capabilities()))

    async def _cmd_noop(self, command: Command) -> None:
        return None

    async def _cmd_check(self, command: Command) -> None:
        return None

    async def _cmd_logout(self, command: Command) -> None:
        self._bye_sent = True
        self._send("* BYE Logging out")

    async def _cmd_id(self, command: Command) -> None:
        self._send('* ID ("name" "AgentPost")')

    # ------------------------------------------------------------------ not authenticated

    async def _cmd_starttls(self, command: Command) -> str | None:
        self._args(command, 0)
        if self.tls_active:
            raise _bad("TLS is already active")
        if self.tls_options is None:
            raise _no("STARTTLS is not available here")
        self._send(f"{command.tag} OK Begin TLS negotiation now")
        # RFC 3501 §6.2.1 / RFC 2595 §3.1: nothing the client pipelined in cleartext
        # may run inside the TLS session.
        self._buffer.clear()
        self._pending.clear()
        self._close_spools()
        self._literal_left = self._discard_left = 0
        self._discarding_line = False
        self.tls_active = True
        self._link.startTLS(self.tls_options)
        raise _Answered()

    async def _cmd_login(self, command: Command) -> str:
        args = self._args(command, 2)
        if not self._login_allowed():
            raise _no("Use STARTTLS before logging in", "PRIVACYREQUIRED")
        return await self._authenticate(astring(args[0]), astring(args[1]), "LOGIN")

    async def _cmd_authenticate(self, command: Command) -> str:
        args = self._args(command, 1, 2)
        if not isinstance(args[0], Atom) or args[0].upper() != "PLAIN":
            raise _no("Unsupported authentication mechanism", "CANNOT")
        if not self._login_allowed():
            raise _no("Use STARTTLS before logging in", "PRIVACYREQUIRED")
        if len(args) == 2:
            response = astring(args[1])
        else:
            self._send("+ ")
            d: defer.Deferred = defer.Deferred()
            self._line_handler = d.callback
            response = (await d).decode("ascii", "replace")
        response = response.strip()
        if response == "*":
            raise _bad("Authentication cancelled")
        try:
            decoded = base64.b64decode("" if response == "=" else response, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad("Invalid base64 in SASL response") from exc
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            raise _bad("Malformed PLAIN response")
        authz, user, password = (p.decode("utf-8", "replace") for p in parts)
        if authz and authz != user:
            raise _no("Authorization identity must match", "AUTHORIZATIONFAILED")
        return await self._authenticate(user, password, "AUTHENTICATE")

    async def _authenticate(self, user: str, password: str, how: str) -> str:
        try:
            account = await self.backend.authenticate(user, password, self.peer)
        except errors.Unauthenticated as exc:
            raise _no("Authentication failed", "AUTHENTICATIONFAILED") from exc
        if self.credentials is not None:
            try:
                credential = await self.credentials.register(account.principal,
                                                             self._end_session)
            except errors.Unauthenticated as exc:  # the key died as we logged in
                raise _no("Authentication failed", "AUTHENTICATIONFAILED") from exc
            if self.state is State.LOGOUT:  # the client left meanwhile
                credential.close()
                raise _Answered()
            self._credential = credential
        self.account = account
        self.state = State.AUTHENTICATED
        log.info("imap %s: %s logged in from %s", self.session_id, account.address, self.peer)
        return f"[CAPABILITY {' '.join(self.capabilities())}] {how} completed"

    # ------------------------------------------------------------------ authenticated

    async def _cmd_enable(self, command: Command) -> None:
        if not command.args:
            raise ParseError("ENABLE needs capabilities")
        enabled = []
        condstore = False
        for cap in command.args:
            name = str(cap).upper()
            if name == "CONDSTORE":
                condstore = True
                enabled.append("CONDSTORE")
            elif name == "QRESYNC":
                condstore = self.qresync = True  # QRESYNC implies CONDSTORE
                enabled.append("QRESYNC")
        self._send("* ENABLED" + "".join(" " + c for c in enabled))
        if condstore:
            self._enable_condstore()

    async def _cmd_namespace(self, command: Command) -> None:
        self._send('* NAMESPACE (("" "/")) NIL NIL')

    async def _cmd_select(self, command: Command) -> str:
        return await self._select(command, readonly=False)

    async def _cmd_examine(self, command: Command) -> str:
        return await self._select(command, readonly=True)

    async def _select(self, command: Command, readonly: bool) -> str:
        args = self._args(command, 1, 2)
        name = mailbox(args[0])
        resync: tuple[int, int, list[tuple[int, int]] | None] | None = None
        if len(args) == 2:
            params = args[1]
            if not isinstance(params, list) or not params:
                raise ParseError("Unsupported SELECT parameters")
            i = 0
            while i < len(params):
                param = str(params[i]).upper()
                if param == "CONDSTORE":
                    self.condstore = True
                    i += 1
                elif param == "QRESYNC" and i + 1 < len(params):
                    if not self.qresync:
                        raise ParseError("ENABLE QRESYNC first")
                    resync = _qresync_params(params[i + 1])
                    i += 2
                else:
                    raise ParseError("Unsupported SELECT parameters")
        if self.state is State.SELECTED:
            self._unselect()
            if self.condstore:
                self._send("* OK [CLOSED] Previous mailbox closed")
        assert self.account is not None
        snap = await self.account.select(name)
        readonly = readonly or not self.account.can_write
        uids = [m.uid for m in snap.messages]
        # \Recent: UIDs no earlier session was told about; SELECT claims them, EXAMINE
        # only looks (RFC 3501 §6.3.2).
        seen_up_to = await self.account.claim_recent(snap.folder_id, uids[-1] if uids else 0,
                                                     not readonly)
        if self.state is State.LOGOUT:
            return "closed"
        self.snapshot = snap
        self.readonly = readonly
        self._uids = uids
        self._meta = {m.uid: m for m in snap.messages}
        self._recent = set(uids[bisect.bisect_right(uids, seen_up_to):])
        self._pending_expunged = set()
        self._highestmodseq = snap.highestmodseq
        self._dirty = False
        self.state = State.SELECTED
        self._unwatch = self.account.watch(snap.folder_id, self._folder_changed)
        keywords = sorted({f for m in snap.messages for f in m.flags if not f.startswith("\\")})
        flags = " ".join([*SYSTEM_FLAGS, *keywords])
        self._send(f"* FLAGS ({flags})")
        if self.readonly:
            self._send("* OK [PERMANENTFLAGS ()] Read-only mailbox")
        else:
            self._send(f"* OK [PERMANENTFLAGS ({flags} \\*)] Flags permitted")
        self._send(f"* {len(self._uids)} EXISTS")
        self._send(f"* {len(self._recent)} RECENT")
        if snap.first_unseen_uid is not None and snap.first_unseen_uid in self._meta:
            seq = bisect.bisect_left(self._uids, snap.first_unseen_uid) + 1
            self._send(f"* OK [UNSEEN {seq}] First unseen")
        self._send(f"* OK [UIDVALIDITY {snap.uidvalidity}] UIDs valid")
        self._send(f"* OK [UIDNEXT {snap.uidnext}] Predicted next UID")
        self._send(f"* OK [HIGHESTMODSEQ {snap.highestmodseq}] Highest")
        if resync is not None and resync[0] == snap.uidvalidity:
            self._resync(resync[1], resync[2])
        mode = "READ-ONLY" if self.readonly else "READ-WRITE"
        return f"[{mode}] {command.name} completed"

    def _resync(self, modseq: int, known: list[tuple[int, int]] | None) -> None:
        """QRESYNC (RFC 7162 §3.2.5): what the client's cache lost since ``modseq``.

        Vanished UIDs are the client's known UIDs (or every UID below the highest) that
        are no longer here -- a superset of those expunged after ``modseq``, which the
        RFC allows and which needs no tombstones; changed messages come from MODSEQ."""
        top = self._uids[-1] if self._uids else 0
        ranges = merge_ranges(known) if known is not None else ([(1, top)] if top else [])
        gone = self._missing(ranges)
        if gone:
            self._send(f"* VANISHED (EARLIER) {gone}")
        starts = [a for a, _ in ranges]
        for uid in self._uids:
            meta = self._meta[uid]
            i = bisect.bisect_right(starts, uid) - 1  # the known range that may hold uid
            if meta.modseq > modseq and (known is None or (i >= 0 and uid <= ranges[i][1])):
                self._send(f"* {self._seq(uid)} FETCH (UID {uid} FLAGS "
                           f"{self._flags_text(uid, meta.flags)} MODSEQ ({meta.modseq}))")

    def _missing(self, ranges: list[tuple[int, int]]) -> str:
        """The UIDs of ``ranges`` not in the view, as a compact set (gaps, not a list:
        a client may claim ``1:4000000000``)."""
        top = self._uids[-1] if self._uids else 0
        out: list[str] = []
        for a, b in merge_ranges(ranges):  # each UID of the view is visited once
            b = min(b, top)
            pos = bisect.bisect_left(self._uids, a)
            nxt = a
            while nxt <= b:
                present = self._uids[pos] if pos < len(self._uids) else b + 1
                if present > nxt:  # a gap before the next UID that exists
                    end = min(present - 1, b)
                    out.append(str(nxt) if end == nxt else f"{nxt}:{end}")
                nxt = present + 1
                pos += 1
        return ",".join(out)

    def _unselect(self) -> None:
        self._stop_watching()
        self.snapshot = None
        self._uids = []
        self._meta = {}
        self._recent = set()
        self._pending_expunged = set()
        self.state = State.AUTHENTICATED

    def _stop_watching(self) -> None:
        if self._unwatch is not None:
            unwatch, self._unwatch = self._unwatch, None
            try:
                unwatch()
            except Exception:
                log.exception("imap %s: unwatch failed", self.session_id)

    def _folder_changed(self) -> None:
        self._dirty = True
        if self._idle_wake is not None and not self._idle_wake.called:
            self._idle_wake.callback(None)

    async def _cmd_create(self, command: Command) -> None:
        name = mailbox(self._args(command, 1)[0]).rstrip("/")
        self._require_write()
        if not name or name == "INBOX":
            raise _no("INBOX already exists", "ALREADYEXISTS") if name else _bad("Empty name")
        await self.account.create_folder(name)  # type: ignore[union-attr]

    async def _cmd_delete(self, command: Command) -> None:
        name = mailbox(self._args(command, 1)[0])
        self._require_write()
        if name == "INBOX":
            raise _no("INBOX cannot be deleted", "CANNOT")
        await self.account.delete_folder(name)  # type: ignore[union-attr]

    async def _cmd_rename(self, command: Command) -> None:
        args = self._args(command, 2)
        old, new = mailbox(args[0]), mailbox(args[1]).rstrip("/")
        self._require_write()
        await self.account.rename_folder(old, new)  # type: ignore[union-attr]

    async def _cmd_subscribe(self, command: Command) -> None:
        name = mailbox(self._args(command, 1)[0])
        await self.account.set_subscribed(name, True)  # type: ignore[union-attr]

    async def _cmd_unsubscribe(self, command: Command) -> None:
        name = mailbox(self._args(command, 1)[0])
        await self.account.set_subscribed(name, False)  # type: ignore[union-attr]

    async def _cmd_list(self, command: Command) -> None:
        await self._list(command, subscribed_only=False)

    async def _cmd_lsub(self, command: Command) -> None:
        await self._list(command, subscribed_only=True)

    async def _list(self, command: Command, subscribed_only: bool) -> None:
        """LIST and LSUB, with LIST-EXTENDED (RFC 5258) selection and return options,
        several patterns, SPECIAL-USE (RFC 6154) and LIST-STATUS (RFC 5819)."""
        args = list(command.args)
        select: set[str] = set()
        returns: set[str] = set()
        status_items: list[str] = []
        if not subscribed_only and args and isinstance(args[0], list):
            select = {str(o).upper() for o in args.pop(0)}
            unknown = select - {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
            if unknown:
                raise ParseError(f"Unknown LIST selection option {sorted(unknown)[0]}")
            if select - {"REMOTE"} == {"RECURSIVEMATCH"}:  # RFC 5258 §3: BAD
                raise ParseError("RECURSIVEMATCH needs another selection option")
        if not subscribed_only and len(args) == 4 and isinstance(args[2], Atom) and \
                args[2].upper() == "RETURN":
            options = args.pop()
            args.pop()
            if not isinstance(options, list):
                raise ParseError("RETURN needs a list")
            i = 0
            while i < len(options):
                option = str(options[i]).upper()
                if option == "STATUS":
                    if i + 1 >= len(options) or not isinstance(options[i + 1], list):
                        raise ParseError("RETURN STATUS needs a list of items")
                    status_items = [str(x).upper() for x in options[i + 1]]
                    for item in status_items:
                        if item not in _STATUS_ITEMS:
                            raise ParseError(f"Unknown STATUS item {item}")
                    i += 2
                    continue
                if option not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    raise ParseError(f"Unknown LIST return option {option}")
                returns.add(option)
                i += 1
        if len(args) != 2:
            raise ParseError(f"Wrong number of arguments for {command.name}")
        ref = mailbox(args[0])
        patterns = args[1] if isinstance(args[1], list) and not subscribed_only else [args[1]]
        if not patterns:
            raise ParseError("LIST needs a pattern")
        verb = "LSUB" if subscribed_only else "LIST"
        wanted = [decode_mailbox(astring(p, "pattern")) for p in patterns]
        if wanted == [""]:
            self._send(f'* {verb} (\\Noselect) "/" ""')
            return
        try:  # linear-time matching, never a regex built from the client's pattern
            matcher = PatternSet(ref + pattern for pattern in wanted)
        except PatternTooLong as exc:
            raise ParseError(str(exc)) from exc
        folders = await self.account.list_folders()  # type: ignore[union-attr]
        only_subscribed = subscribed_only or "SUBSCRIBED" in select
        # Every ancestor of a subscribed folder, for RECURSIVEMATCH: one pass, not a
        # scan of all subscribed names per folder.
        subscribed_parents = {f.name.rsplit("/", i)[0] for f in folders if f.subscribed
                              for i in range(1, f.name.count("/") + 1)}
        # LSUB (RFC 3501 §6.3.9): an unsubscribed parent whose subscribed descendant the
        # pattern does not reach ("%") is listed \Noselect in its place.
        # One pass over each name, which also tells which of its parents match: a
        # parent that no longer exists is not matched again (linear in the names).
        matched: set[str] = set()
        matched_parents: set[str] = set()
        for f in folders:
            hit, parents = matcher.match_prefixes(f.name, fold_case=f.name == "INBOX")
            if hit:
                matched.add(f.name)
            if f.subscribed:
                matched_parents.update(parents)
        unreached_parents: set[str] = set()
        missing: set[str] = set()
        if only_subscribed and subscribed_parents:
            unreached_parents = {f.name.rsplit("/", i)[0] for f in folders
                                 if f.subscribed and f.name not in matched
                                 for i in range(1, f.name.count("/") + 1)}
            # Subscriptions live on folder rows, so a subscribed name always exists; but
            # DELETE of a parent leaves its children: such a parent is \NonExistent.
            missing = subscribed_parents - {f.name for f in folders}
            if missing:
                matched |= missing & matched_parents
                folders = sorted([*folders, *(FolderInfo(n, None, False, True)
                                              for n in missing)], key=lambda f: f.name)
        recursive = only_subscribed and "RECURSIVEMATCH" in select
        for folder in folders:
            if folder.name not in matched:
                continue
            if "SPECIAL-USE" in select and not folder.special_use:
                continue
            # RECURSIVEMATCH (RFC 5258 §3.5): CHILDINFO on every listed parent of a
            # subscribed mailbox, and unsubscribed parents are listed for it.
            child_info = recursive and folder.name in subscribed_parents
            noselect = False
            if only_subscribed and not folder.subscribed and not child_info:
                if subscribed_only and folder.name in unreached_parents:
                    noselect = True
                else:
                    continue
            attrs = ["\\HasChildren" if folder.has_children else "\\HasNoChildren"]
            if folder.special_use:
                attrs.append(folder.special_use)
            if folder.name in missing:
                attrs.append("\\Noselect" if subscribed_only else "\\NonExistent")
            elif noselect:
                attrs.append("\\Noselect")
            if not subscribed_only and folder.subscribed and \
                    ("SUBSCRIBED" in returns or "SUBSCRIBED" in select):
                attrs.append("\\Subscribed")
            wire = _imap_quote(encode_mailbox(folder.name))
            extra = ' ("CHILDINFO" ("SUBSCRIBED"))' if child_info else ""
            self._send(f'* {verb} ({" ".join(attrs)}) "/" {wire}{extra}')
            if status_items and folder.name not in missing:
                try:
                    st = await self.account.status(folder.name)  # type: ignore[union-attr]
                except errors.NotFound:
                    continue  # deleted meanwhile
                self._send(f"* STATUS {wire} ({_status_text(st, status_items)})")

    async def _cmd_status(self, command: Command) -> None:
        args = self._args(command, 2)
        name = mailbox(args[0])
        items = args[1]
        if not isinstance(items, list) or not items:
            raise ParseError("STATUS needs a list of items")
        keys = [str(item).upper() for item in items]
        for key in keys:
            if key not in _STATUS_ITEMS:
                raise ParseError(f"Unknown STATUS item {key}")
        st = await self.account.status(name)  # type: ignore[union-attr]
        self._send(f"* STATUS {_imap_quote(encode_mailbox(name))} ({_status_text(st, keys)})")
        if "HIGHESTMODSEQ" in keys:
            self._enable_condstore()

    async def _cmd_compress(self, command: Command) -> None:
        """COMPRESS DEFLATE (RFC 4978): raw DEFLATE both ways after the tagged OK."""
        mechanism = str(self._args(command, 1)[0]).upper()
        if mechanism != "DEFLATE":
            raise _bad(f"Unknown compression mechanism {mechanism}")
        if self._deflate is not None:
            raise _no("DEFLATE is already active", "COMPRESSIONACTIVE")
        self._send(f"{command.tag} OK DEFLATE active")
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        # Whatever the client sent after the command is already compressed.
        self._inflate_tail = bytes(self._buffer)
        self._buffer.clear()
        raise _Answered()

    # ------------------------------------------------------------------ QUOTA (RFC 9208)
    # One quota root, "", covers every folder of the inbox when [mail] inbox_quota is set;
    # without a limit folders have no quota root at all.

    async def _quota_line(self) -> str | None:
        assert self.account is not None
        used, limit = await self.account.quota()
        if not limit:
            return None
        return f'* QUOTA "" (STORAGE {-(-used // 1024)} {limit // 1024})'

    async def _cmd_getquotaroot(self, command: Command) -> None:
        name = mailbox(self._args(command, 1)[0])
        await self.account.check_folder(name)  # type: ignore[union-attr]  # NONEXISTENT
        line = await self._quota_line()
        wire = _imap_quote(encode_mailbox(name))
        self._send(f'* QUOTAROOT {wire} ""' if line else f"* QUOTAROOT {wire}")
        if line:
            self._send(line)

    async def _cmd_getquota(self, command: Command) -> None:
        root = astring(self._args(command, 1)[0], "quota root")
        line = await self._quota_line()
        if root != "" or line is None:
            raise _no("No such quota root", "NONEXISTENT")
        self._send(line)

    async def _cmd_setquota(self, command: Command) -> None:
        self._args(command, 2)
        raise _no("Quotas are set by the administrator ([mail] inbox_quota)", "NOPERM")

    async def _cmd_append(self, command: Command) -> str:
        args = list(command.args)
        if len(args) < 2:
            raise ParseError("APPEND needs a mailbox and a message")
        name = mailbox(args.pop(0))
        message: Any = args.pop()
        if not isinstance(message, bytes):
            raise ParseError("APPEND message must be a literal")
        if not message and self._spools:
            message = self._spools.pop(0)  # the literal went to a spool file
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
        self._require_write()
        if size > self.max_append_bytes:
            raise _no("Message too large", "TOOBIG")
        if not size:
            raise _no("An empty message cannot be appended", "CANNOT")
        try:
            uidvalidity, uid = await self.account.append(  # type: ignore[union-attr]
                name, message, flags, when)
        except errors.NotFound as exc:
            raise error_for(exc, missing="TRYCREATE") from exc
        if self.state is State.SELECTED and self.snapshot is not None and \
                name == self.snapshot.name:
            self._dirty = True
        return f"[APPENDUID {uidvalidity} {uid}] APPEND completed"

    async def _cmd_idle(self, command: Command) -> str | None:
        self._args(command, 0)
        self._send("+ idling")
        self._idle_line = None
        self._dirty = self.state is State.SELECTED  # RFC 2177: report what is pending now

        def on_line(line: bytes) -> None:
            self._idle_line = line
            if self._idle_wake is not None and not self._idle_wake.called:
                self._idle_wake.callback(None)

        self._line_handler = on_line
        try:
            while self._idle_line is None and self.state is not State.LOGOUT:
                if self.state is State.SELECTED and self._dirty:
                    await self._report_changes(expunge=True)
                    continue
                self._idle_wake = defer.Deferred()
                try:
                    await self._idle_wake
                finally:
                    self._idle_wake = None
        finally:
            if self._line_handler is on_line:
                self._line_handler = None
        if self._idle_line is not None and self._idle_line.strip().upper() != b"DONE":
            raise _bad("Expected DONE")
        return "IDLE terminated"

    # ------------------------------------------------------------------ selected

    def _seq_uids(self, seqset: SeqSet, uid: bool, strict: bool = True) -> list[int]:
        """UIDs of the view addressed by a sequence set (UID set when ``uid``), ascending.
        The ranges are merged first: ``1:*`` repeated 50,000 times is one pass. A number
        beyond the mailbox is BAD when ``strict`` (FETCH, STORE...), else matches nothing
        (a SEARCH key, as Dovecot answers)."""
        out: list[int] = []
        if uid:
            largest = self._uids[-1] if self._uids else 0
            for lo, hi in merge_ranges(resolve_seqset(seqset, largest)):
                i = bisect.bisect_left(self._uids, lo)
                j = bisect.bisect_right(self._uids, hi)
                out += self._uids[i:j]
            return out
        count = len(self._uids)
        ranges = []
        for pair, (lo, hi) in zip(seqset, resolve_seqset(seqset, count), strict=True):
            if None in pair:  # "n:*" with n beyond the end means just the last one
                lo, hi = max(1, min(lo, count)), min(hi, count)
                if count == 0:
                    continue
            elif hi > count:
                if strict:
                    raise _bad("Invalid message sequence number")
                if lo > count:
                    continue
                hi = count
            ranges.append((lo, hi))
        for lo, hi in merge_ranges(ranges):
            out += self._uids[lo - 1:hi]
        return out

    def _seq(self, uid: int) -> int:
        return bisect.bisect_left(self._uids, uid) + 1

    def _flags_text(self, uid: int, flags: frozenset[str]) -> str:
        return _flag_list(flags, uid in self._recent)

    def _enable_condstore(self) -> None:
        """A CONDSTORE enabling command (RFC 7162 §3.1) ran: from now on every FETCH
        response that carries FLAGS carries MODSEQ too. The first one issued while a
        mailbox is selected reports its HIGHESTMODSEQ (SELECT and EXAMINE always do)."""
        if self.condstore:
            return
        self.condstore = True
        if self.state is State.SELECTED and self.snapshot is not None:
            self._send(f"* OK [HIGHESTMODSEQ {self._highestmodseq}] Highest")

    async def _report_changes(self, expunge: bool) -> None:
        """Poll the account and send EXPUNGE/EXISTS/RECENT/FETCH for what changed."""
        if self.snapshot is None or self.account is None or self._bye_sent:
            return  # after BYE only the tagged completion may follow (RFC 3501 §7.1.5)
        self._dirty = False
        changes: Changes = await self.account.changes(self.snapshot.folder_id, list(self._uids),
                                                      self._highestmodseq)
        if self.state is not State.SELECTED or self.snapshot is None:
            return
        # Expunges seen during FETCH/STORE/SEARCH wait (RFC 3501 §7.4.1) in a set of their
        # own: the account reports each expunge once, not again at the next poll.
        self._pending_expunged.update(changes.expunged)
        if expunge and self._pending_expunged:
            gone, self._pending_expunged = sorted(self._pending_expunged), set()
            self._expunged(gone)
        elif self._pending_expunged:
            self._dirty = True  # report them at the next command that allows it
        for meta in changes.changed:
            old = self._meta.get(meta.uid)
            if old is None or (old.flags == meta.flags and old.modseq >= meta.modseq):
                continue
            self._meta[meta.uid] = meta
            modseq = f" MODSEQ ({meta.modseq})" if self.condstore else ""
            self._send(f"* {self._seq(meta.uid)} FETCH (UID {meta.uid} "
                       f"FLAGS {self._flags_text(meta.uid, meta.flags)}{modseq})")
        new = [m for m in changes.new if m.uid not in self._meta and
               (not self._uids or m.uid > self._uids[-1])]
        if new:
            new.sort(key=lambda m: m.uid)
            seen_up_to = await self.account.claim_recent(self.snapshot.folder_id,
                                                         new[-1].uid, not self.readonly)
            if self.state is not State.SELECTED or self.snapshot is None:
                return
            for meta in new:
                if meta.uid in self._meta:
                    continue
                self._uids.append(meta.uid)
                self._meta[meta.uid] = meta
                if meta.uid > seen_up_to:
                    self._recent.add(meta.uid)
            self._send(f"* {len(self._uids)} EXISTS")
            self._send(f"* {len(self._recent)} RECENT")
        self._highestmodseq = max(self._highestmodseq, changes.highestmodseq)

    def _expunged(self, uids: list[int]) -> None:
        """Drop UIDs from the view, announcing each (descending: no renumbering)."""
        present = {u for u in uids if u in self._meta}
        if not present:
            return
        if self.qresync:
            self._send(f"* VANISHED {imapformat.compact_numbers(list(present))}")
        else:
            seqs = sorted((self._seq(u) for u in present), reverse=True)
            self._write(b"".join(b"* %d EXPUNGE\r\n" % seq for seq in seqs))
        self._uids = [u for u in self._uids if u not in present]
        for uid in present:
            del self._meta[uid]
            self._recent.discard(uid)

    async def _cmd_unselect(self, command: Command) -> None:
        self._args(command, 0)
        self._unselect()

    async def _cmd_close(self, command: Command) -> None:
        self._args(command, 0)
        assert self.snapshot is not None and self.account is not None
        if not self.readonly and self.account.can_write:
            await self.account.expunge(self.snapshot.folder_id, None)
        self._unselect()

    async def _cmd_expunge(self, command: Command) -> None:
        if command.uid:
            uids = self._seq_uids(parse_seqset(self._args(command, 1)[0]), True)
        else:
            self._args(command, 0)
            uids = None
        self._require_write()
        if self.readonly:
            raise _no("Mailbox is read-only", "READ-ONLY")
        assert self.snapshot is not None
        if uids is not None and not uids:
            return
        gone = await self.account.expunge(self.snapshot.folder_id, uids)  # type: ignore
        self._expunged(gone)

    async def _cmd_search(self, command: Command) -> None:
        args = list(command.args)
        returns: list[str] | None = None
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "RETURN":
            # ESEARCH (RFC 4731): RETURN (MIN MAX COUNT ALL); "()" means ALL.
            options = args[1]
            if not isinstance(options, list):
                raise ParseError("RETURN needs a list")
            returns = [str(o).upper() for o in options] or ["ALL"]
            for option in returns:
                if option not in ("MIN", "MAX", "COUNT", "ALL"):
                    raise ParseError(f"Unknown SEARCH return option {option}")
            args = args[2:]
        charset, key = parse_search(args)
        if charset not in (None, "UTF-8", "US-ASCII"):
            raise _no("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        wants_modseq = [False]
        resolved = self._resolve_search(key, wants_modseq)
        if wants_modseq[0]:
            self._enable_condstore()
        assert self.snapshot is not None and self.account is not None
        found = await self.account.search(self.snapshot.folder_id, resolved)
        found = [u for u in found if u in self._meta]
        numbers = found if command.uid else [self._seq(u) for u in found]
        if returns is not None:
            text = f"* ESEARCH (TAG {_imap_quote(command.tag)})"
            if command.uid:
                text += " UID"
            if numbers:
                if "MIN" in returns:
                    text += f" MIN {min(numbers)}"
                if "MAX" in returns:
                    text += f" MAX {max(numbers)}"
                if "ALL" in returns:
                    text += f" ALL {imapformat.compact_numbers(numbers)}"
            if "COUNT" in returns:
                text += f" COUNT {len(numbers)}"
            if wants_modseq[0] and found:
                text += f" MODSEQ {max(self._meta[u].modseq for u in found)}"
            self._send(text)
            return
        text = "* SEARCH" + "".join(f" {n}" for n in numbers)
        if wants_modseq[0] and found:
            text += f" (MODSEQ {max(self._meta[u].modseq for u in found)})"
        self._send(text)

    async def _cmd_sort(self, command: Command) -> None:
        """SORT (RFC 5256, with SORT=DISPLAY from RFC 5957): SEARCH, ordered in SQL."""
        args = list(command.args)
        if len(args) < 3 or not isinstance(args[0], list) or not args[0]:
            raise ParseError("SORT needs (criteria), a charset and search keys")
        criteria: list[tuple[str, bool]] = []
        reverse = False
        for token in args[0]:
            name = str(token).upper()
            if name == "REVERSE":
                if reverse:
                    raise ParseError("REVERSE REVERSE")
                reverse = True
                continue
            if name not in _SORT_KEYS:
                raise ParseError(f"Unknown sort key {name}")
            criteria.append((name, reverse))
            reverse = False
        if reverse or not criteria:
            raise ParseError("REVERSE must precede a sort key")
        charset = astring(args[1], "charset").upper()
        if charset not in ("UTF-8", "US-ASCII"):
            raise _no("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        _, key = parse_search(args[2:])
        wants_modseq = [False]
        resolved = self._resolve_search(key, wants_modseq)
        if wants_modseq[0]:
            self._enable_condstore()
        assert self.snapshot is not None and self.account is not None
        found = [u for u in await self.account.search(self.snapshot.folder_id, resolved,
                                                      criteria) if u in self._meta]
        numbers = found if command.uid else [self._seq(u) for u in found]
        text = "* SORT" + "".join(f" {n}" for n in numbers)
        if wants_modseq[0] and found:
            text += f" (MODSEQ {max(self._meta[u].modseq for u in found)})"
        self._send(text)

    def _resolve_search(self, key: tuple[Any, ...], modseq: list[bool]) -> tuple[Any, ...]:
        kind = key[0]
        if kind == "seq":
            return ("uid", self._seq_uids(key[1], False, strict=False))
        if kind == "uidset":
            return ("uid", self._seq_uids(key[1], True))
        if kind == "recent":
            return ("uid", sorted(self._recent))
        if kind == "and":
            return ("and", [self._resolve_search(k, modseq) for k in key[1]])
        if kind == "or":
            return ("or", self._resolve_search(key[1], modseq),
                    self._resolve_search(key[2], modseq))
        if kind == "not":
            return ("not", self._resolve_search(key[1], modseq))
        if kind == "modseq":
            modseq[0] = True
        return key

    async def _cmd_store(self, command: Command) -> str | None:
        args = list(command.args)
        if len(args) < 3:
            raise ParseError("STORE needs a set, an item and flags")
        uids = self._seq_uids(parse_seqset(args.pop(0)), command.uid)
        unchangedsince = None
        if isinstance(args[0], list):
            mod = args.pop(0)
            if len(mod) != 2 or str(mod[0]).upper() != "UNCHANGEDSINCE":
                raise ParseError("Unknown STORE modifier")
            unchangedsince = number(mod[1], "UNCHANGEDSINCE")
        if len(args) < 2 or not isinstance(args[0], Atom):
            raise ParseError("STORE needs an item and flags")
        item = args.pop(0).upper()
        if item not in ("FLAGS", "+FLAGS", "-FLAGS", "FLAGS.SILENT", "+FLAGS.SILENT",
                        "-FLAGS.SILENT"):
            raise ParseError(f"Unknown STORE item {item}")
        flag_tokens = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        flags = parse_flags(flag_tokens) - {"\\Recent"}
        self._require_write()
        if self.readonly:
            raise _no("Mailbox is read-only", "READ-ONLY")
        if unchangedsince is not None:
            self._enable_condstore()
        mode = item[0] if item[0] in "+-" else ""
        silent = item.endswith(".SILENT")
        assert self.snapshot is not None and self.account is not None
        if not uids:
            return None
        metas, failed = await self.account.store(self.snapshot.folder_id, uids, mode, flags,
                                                 unchangedsince)
        for meta in metas:
            if meta.uid not in self._meta:
                continue
            self._meta[meta.uid] = meta
            # Once CONDSTORE is on, every FETCH a STORE causes carries UID and MODSEQ,
            # .SILENT ones too (just without FLAGS): the client's cache needs the new
            # mod-sequence (RFC 7162 §3.1, §3.1.3).
            if silent and not self.condstore:
                continue
            parts = []
            if command.uid or self.condstore:
                parts.append(f"UID {meta.uid}")
            if not silent:
                parts.append(f"FLAGS {self._flags_text(meta.uid, meta.flags)}")
            if self.condstore:
                parts.append(f"MODSEQ ({meta.modseq})")
            self._send(f"* {self._seq(meta.uid)} FETCH ({' '.join(parts)})")
        failed = [u for u in failed if u in self._meta]
        if failed:
            numbers = failed if command.uid else [self._seq(u) for u in failed]
            return f"[MODIFIED {imapformat.compact_numbers(numbers)}] Conditional STORE failed"
        return None

    async def _cmd_copy(self, command: Command) -> str:
        return await self._copy_move(command, move=False)

    async def _cmd_move(self, command: Command) -> str:
        return await self._copy_move(command, move=True)

    async def _copy_move(self, command: Command, move: bool) -> str:
        args = self._args(command, 2)
        uids = self._seq_uids(parse_seqset(args[0]), command.uid)
        dest = mailbox(args[1])
        self._require_write()
        if move and self.readonly:
            raise _no("Mailbox is read-only", "READ-ONLY")
        assert self.snapshot is not None and self.account is not None
        if not uids:
            return f"{command.name} completed (no messages)"
        op = self.account.move if move else self.account.copy
        try:
            uidvalidity, pairs = await op(self.snapshot.folder_id, uids, dest)
        except errors.NotFound as exc:
            raise error_for(exc, missing="TRYCREATE") from exc
        code = ""
        if pairs:
            code = (f"[COPYUID {uidvalidity} {imapformat.compact_in_order([s for s, _ in pairs])} "
                    f"{imapformat.compact_in_order([d for _, d in pairs])}] ")
        if move:
            if code:
                self._send(f"* OK {code}Moved")
            self._expunged([s for s, _ in pairs])
            return f"{command.name} completed"
        return f"{code}{command.name} completed"

    async def _cmd_fetch(self, command: Command) -> None:
        args = self._args(command, 2, 3)
        requested = parse_seqset(args[0])
        uids = self._seq_uids(requested, command.uid)
        items = parse_fetch_items(args[1])
        changedsince = None
        vanished = False
        if len(args) == 3:
            mod = args[2]
            if not isinstance(mod, list) or not mod:
                raise ParseError("Unknown FETCH modifier")
            i = 0
            while i < len(mod):
                name = str(mod[i]).upper()
                if name == "CHANGEDSINCE" and i + 1 < len(mod):
                    changedsince = number(mod[i + 1], "CHANGEDSINCE")
                    i += 2
                elif name == "VANISHED" and command.uid and self.qresync:
                    vanished = True
                    i += 1
                else:
                    raise ParseError("Unknown FETCH modifier")
            if vanished and changedsince is None:
                raise ParseError("VANISHED needs CHANGEDSINCE")
        if changedsince is not None or any(i.name == "MODSEQ" for i in items):
            self._enable_condstore()
        if changedsince is not None:
            if vanished:
                # RFC 7162 §3.2.6: UIDs of the set that are gone, before the FETCHes.
                top = self._uids[-1] if self._uids else 0
                gone = self._missing(resolve_seqset(requested, top))
                if gone:
                    self._send(f"* VANISHED (EARLIER) {gone}")
            uids = [u for u in uids if self._meta[u].modseq > changedsince]
            if not any(i.name == "MODSEQ" for i in items):
                items.append(FetchItem("MODSEQ"))
        if command.uid and not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))
        if not uids:
            return
        await self._fetch(uids, items)

    async def _fetch(self, uids: list[int], items: list[FetchItem]) -> None:
        assert self.snapshot is not None and self.account is not None
        folder_id = self.snapshot.folder_id
        names = {i.name for i in items}
        marks_seen = any((i.name == "BODY[]" and not i.peek) or i.name in ("RFC822",
                                                                           "RFC822.TEXT")
                         for i in items)
        needs_content = any(_content_spec(i) is not None for i in items)
        wants = FetchWants(internaldate="INTERNALDATE" in names, size="RFC822.SIZE" in names,
                           envelope="ENVELOPE" in names,
                           bodystructure=bool(names & {"BODY", "BODYSTRUCTURE"}),
                           content=needs_content)
        seen_now: set[int] = set()
        if marks_seen and not self.readonly and self.account.can_write:
            unseen = [u for u in uids if "\\Seen" not in self._meta[u].flags]
            if unseen:
                for meta in await self.account.set_seen(folder_id, unseen):
                    if meta.uid in self._meta:
                        self._meta[meta.uid] = meta
                        seen_now.add(meta.uid)
        rows = [r for r in await self.account.fetch(folder_id, uids, wants)
                if r.uid in self._meta]

        def needs_raw(row: FetchRow) -> bool:
            streaming = (needs_content and row.raw_key is not None and row.sections is not None
                         and row.size is not None and row.size > self.stream_threshold)
            return (needs_content and not streaming) or \
                (wants.envelope and row.envelope is None) or \
                (wants.bodystructure and (row.bodystructure is None or row.body is None))

        # Small bodies are read a few messages ahead of the one being sent (each read is a
        # thread hop or an S3 GET): at most READ_AHEAD bodies under the stream threshold
        # are in memory at once.
        reads: dict[int, defer.Deferred] = {}

        def start(index: int) -> None:
            if index < len(rows) and index not in reads and needs_raw(rows[index]):
                reads[index] = defer.ensureDeferred(self._load_raw(folder_id, rows[index]))

        try:
            for index, row in enumerate(rows):
                for ahead in range(index, index + READ_AHEAD):
                    start(ahead)
                raw = None
                if index in reads:
                    raw = await reads.pop(index)
                    if raw is None:
                        continue  # expunged meanwhile
                if self.state is not State.SELECTED:
                    return
                segments = await self._fetch_response(row, raw, items, row.uid in seen_now)
                for segment in segments:
                    if isinstance(segment, _Range):
                        try:
                            await self._stream_range(segment)
                        except Exception:
                            # The literal's length is on the wire: no answer can follow a
                            # short literal, so the only honest move is to hang up.
                            log.exception("imap %s: streaming a body failed; disconnecting",
                                          self.session_id)
                            self._close()
                            raise _Answered() from None
                    else:
                        self._write(segment)
                    await self._drain()
                    if self.state is State.LOGOUT:
                        return
        finally:
            for d in reads.values():  # the session ended or failed mid-FETCH
                d.addErrback(lambda _: None)
                d.cancel()

    async def _load_raw(self, folder_id: int, row: FetchRow) -> bytes | None:
        """The stored message (None if expunged meanwhile): by the key the FETCH query
        already returned, else looked up by UID."""
        assert self.account is not None
        try:
            if row.raw_key is not None:
                return await self.account.read_blob(row.raw_key)
            return await self.account.fetch_raw(folder_id, row.uid)
        except (errors.NotFound, KeyError):  # KeyError: BlobNotFound, collected meanwhile
            return None

    async def _stream_range(self, rng: _Range) -> None:
        """Send a literal's bytes from the blob store a chunk at a time, waiting whenever
        the transport's buffer is full: a 50 MB message never sits in memory, and a slow
        client slows the reads instead of growing the buffer."""
        assert self.account is not None
        pos, left = rng.start, rng.length
        while left > 0:
            chunk = await self.account.read_range(rng.key, pos, min(left, STREAM_CHUNK_BYTES))
            if not chunk:  # the blob is shorter than recorded: never send a short literal
                raise errors.StorageFailure()
            if self.state is State.LOGOUT:
                return
            self._write(chunk)
            pos += len(chunk)
            left -= len(chunk)
            await self._drain()

    async def _content(self, row: FetchRow, raw: bytes | None,
                       spec: imapformat.SectionSpec) -> list[bytes | _Range]:
        """The literal of one body section: sliced from ``raw``, or planned from the
        section map and streamed (HEADER.FIELDS reads just that header)."""
        if raw is not None:
            return [_literal(imapformat.section(raw, spec))]
        assert row.sections is not None and row.raw_key is not None and self.account
        plan = imapformat.plan_section(row.sections, spec)
        if plan.fields is not None:
            header = await self.account.read_range(row.raw_key, plan.start, plan.length)
            data = imapformat.filter_header_fields(header, *plan.fields)
            if spec.partial is not None:
                data = data[spec.partial[0]:spec.partial[0] + spec.partial[1]]
            return [_literal(data)]
        start, end = plan.start, plan.end
        if spec.partial is not None:
            start = min(end, start + spec.partial[0])
            end = min(end, start + spec.partial[1])
        length = end - start
        if length <= STREAM_CHUNK_BYTES:
            data = await self.account.read_range(row.raw_key, start, length) if length else b""
            if len(data) != length:
                raise errors.StorageFailure()
            return [_literal(data)]
        return [b"{%d}\r\n" % length, _Range(row.raw_key, start, length)]

    async def _fetch_response(self, row: FetchRow, raw: bytes | None, items: list[FetchItem],
                              add_flags: bool) -> list[bytes | _Range]:
        out: list[bytes | _Range] = [b"* %d FETCH (" % self._seq(row.uid)]
        done: set[str] = set()
        flags = row.flags
        first = True
        if add_flags and self.condstore and not any(i.name == "UID" for i in items):
            # The implicit \Seen change is reported like a STORE's: with UID and MODSEQ
            # once CONDSTORE is on (RFC 7162 §3.1).
            out.append(b"UID %d" % row.uid)
            done.add("UID")
            first = False
        for item in items:
            name = item.name
            key = name if item.section is None else "BODY[" + item.section.render() + "]"
            if key in done and item.section is None:
                continue
            done.add(key)
            parts: list[bytes | _Range]
            spec = _content_spec(item)
            if name == "UID":
                parts = [b"UID %d" % row.uid]
            elif name == "FLAGS":
                parts = [b"FLAGS " + self._flags_text(row.uid, flags).encode()]
            elif name == "MODSEQ":
                parts = [b"MODSEQ (%d)" % row.modseq]
            elif name == "INTERNALDATE":
                parts = [b"INTERNALDATE " + _internaldate(row.internaldate).encode()]
            elif name == "RFC822.SIZE":
                size = row.size if row.size is not None else len(raw or b"")
                parts = [b"RFC822.SIZE %d" % size]
            elif name == "ENVELOPE":
                env = row.envelope if row.envelope is not None else \
                    imapformat.envelope(raw or b"")
                parts = [b"ENVELOPE " + env.encode("utf-8")]
            elif name == "BODYSTRUCTURE":
                bs = row.bodystructure if row.bodystructure is not None else \
                    imapformat.bodystructure(raw or b"", True)
                parts = [b"BODYSTRUCTURE " + bs.encode("utf-8")]
            elif name == "BODY":
                body = row.body if row.body is not None else \
                    imapformat.bodystructure(raw or b"", False)
                parts = [b"BODY " + body.encode("utf-8")]
            elif spec is not None:
                if item.section is not None:
                    label = "BODY[" + item.section.render() + "]"
                    if item.section.partial is not None:
                        label += f"<{item.section.partial[0]}>"
                else:
                    label = name
                parts = [label.encode("utf-8") + b" ", *await self._content(row, raw, spec)]
            else:
                continue
            if not first:
                out.append(b" ")
            first = False
            out += parts
        if add_flags and "FLAGS" not in done:
            out.append((b" " if not first else b"") + b"FLAGS " +
                       self._flags_text(row.uid, flags).encode())
            done.add("FLAGS")
            first = False
        if self.condstore and "FLAGS" in done and "MODSEQ" not in done:
            # With CONDSTORE on, FLAGS always travel with their MODSEQ (RFC 7162 §3.1).
            out.append((b" " if not first else b"") + b"MODSEQ (%d)" % row.modseq)
        out.append(b")\r\n")
        # Coalesce neighbouring byte strings: one write per small response.
        merged: list[bytes | _Range] = []
        for segment in out:
            if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += segment
            else:
                merged.append(segment)
        return merged


@dataclass(frozen=True)
class _Range:
    """Literal bytes to stream from the blob store: ``length`` octets from ``start``."""

    key: str
    start: int
    length: int


_WHOLE = imapformat.SectionSpec()
_RFC822_SPECS = {"RFC822": _WHOLE, "RFC822.HEADER": imapformat.SectionSpec(text="HEADER"),
                 "RFC822.TEXT": imapformat.SectionSpec(text="TEXT")}


def _content_spec(item: FetchItem) -> imapformat.SectionSpec | None:
    """The body section a FETCH item returns, if it returns one."""
    if item.section is not None:
        return item.section
    return _RFC822_SPECS.get(item.name)


_SORT_KEYS = ("ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM",
              "DISPLAYTO")
_STATUS_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "RECENT", "HIGHESTMODSEQ",
                 "SIZE")


def _qresync_params(value: Any) -> tuple[int, int, list[tuple[int, int]] | None]:
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


def _status_text(st: Any, items: list[str]) -> str:
    values = {"MESSAGES": st.messages, "UIDNEXT": st.uidnext, "UIDVALIDITY": st.uidvalidity,
              "UNSEEN": st.unseen, "RECENT": st.recent,
              "HIGHESTMODSEQ": st.highestmodseq, "SIZE": st.size}
    return " ".join(f"{key} {values[key]}" for key in items)


class _Answered(Exception):
    """The handler already wrote the tagged response (STARTTLS)."""
