"""The IMAP4rev1 server protocol (RFC 3501) on a Twisted transport: an explicit state machine.

Why not ``twisted.mail.imap4.IMAP4Server``: see DESIGN.md §7. This module is built
so that its defects cannot happen here:

- **One command at a time.** Input is buffered; the next command is parsed only
  after the previous one's tagged response has been written, however long the
  account's coroutines take. Pipelined commands are answered in order
  (:mod:`agentpost.imap.reader`).
- **Literals are framed by the reader**, not the parser: ``{n}`` gets ``+`` only
  when the command may go on (APPEND checks the mailbox first and answers
  ``NO [TRYCREATE]`` without reading the literal), ``{n+}`` (LITERAL+) is always
  consumed, and over-size literals are consumed and refused
  (:mod:`agentpost.imap.reader`).
- **STARTTLS discards everything buffered after it** (:mod:`agentpost.imap.reader`).
- **Byte-exact bodies**: sections are slices of the stored message
  (:mod:`agentpost.mail.imapformat`), partial ranges included
  (:mod:`agentpost.imap.commands.fetch`).
- **Every session keeps its own sequence-number view**
  (:class:`agentpost.imap.selected.SelectedMailbox`) and reports other sessions'
  changes (EXISTS, FETCH, EXPUNGE) where RFC 3501 §7.4.1 allows, and at once while
  IDLE (:mod:`agentpost.imap.updates`); the command table says which commands use
  sequence numbers.
- **Errors are answered, never raised**: syntax errors are ``BAD``, domain errors
  ``NO`` with a response code from one table (:mod:`agentpost.imap.errors`), anything
  unexpected is logged with a reference and answered ``NO [UNAVAILABLE]``.
- **Large bodies are streamed**: above ``stream_threshold`` a body section is a byte
  range of the stored blob (the section map written at ingest), sent in chunks that wait
  for the transport to drain, so memory per FETCH stays at a chunk.

Where things live: this module is the connection (Twisted hooks, producer, timers,
output, close/abort, the credential re-check) and the dispatcher; the output cork
that sends a command's responses in one piece is :mod:`agentpost.cork`; the
input half (the input loop, literal framing, spooling, inflating) is the
:class:`CommandReader` mixin in :mod:`agentpost.imap.reader`.
:mod:`agentpost.imap.commands.table` lists the commands, each handled in a module of
its family under :mod:`agentpost.imap.commands`.
The selected folder is reached only through the backend's folder handle
(:class:`agentpost.imap.interfaces.IMAPFolder`, held by the session's
:class:`~agentpost.imap.selected.SelectedMailbox`), so folder ids and blob keys never
reach this layer.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import zlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from agentpost.cork import Cork
from agentpost.imap import rev2
from agentpost.imap.commands.table import COMMANDS, CommandSpec
from agentpost.imap.errors import Answered, IMAPError, bad, error_for, no, response_text
from agentpost.imap.interfaces import IMAPAccount, IMAPBackend
from agentpost.imap.parser import Command, ParseError
from agentpost.imap.reader import INFLATE_STEP, MAX_LINE_BYTES, CommandReader
from agentpost.imap.selected import SelectedMailbox
from agentpost.imap.states import State
from agentpost.imap.updates import report_changes
from agentpost.listening import no_delay, send_direct
from agentpost.model import errors
from agentpost.transport import SessionTransport

if TYPE_CHECKING:
    from agentpost.imap.notifier_state import MailboxNotifier

log = logging.getLogger(__name__)

__all__ = ["CLOSE_GRACE_S", "INFLATE_STEP", "MAX_LINE_BYTES", "IMAP4ServerProtocol",
           "IMAPError", "State"]

#: The default APPEND literal limit.
MAX_APPEND_BYTES = 64 * 1024 * 1024
#: Messages larger than this are streamed from the blob store section by section.
STREAM_THRESHOLD_BYTES = 256 * 1024
#: After we close, a connection still open this much later is aborted: a TLS client
#: that never answers close_notify, or one that stopped reading.
CLOSE_GRACE_S = 5.0


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@implementer(IPushProducer)
class IMAP4ServerProtocol(CommandReader, Protocol):
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
        login_timeout_s: time from the connection to log in (not an idle time: input
            does not extend it).
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
        self._init_reader()
        self._busy = False
        self._output_blocked = False
        self._writable: list[defer.Deferred] = []
        self._timer: Any = None
        self.selected: SelectedMailbox | None = None  # the view, while SELECTED
        self._idle_wake: defer.Deferred[None] | None = None
        self.condstore = False
        self.qresync = False  # RFC 7162: VANISHED instead of EXPUNGE, SELECT (QRESYNC ...)
        self.imap4rev2 = False  # ENABLE IMAP4rev2 (RFC 9051): see agentpost.imap.rev2
        self._closed = False
        self._cork = Cork(self._emit)  # a command's responses leave in one send
        self.bye_sent = False  # LOGOUT's BYE is out: no more untagged responses
        self.notify: MailboxNotifier | None = None  # NOTIFY SET (RFC 5465) in effect

    def login_allowed(self) -> bool:
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
        self.send(f"* OK [CAPABILITY {' '.join(self.capabilities())}] "
                   f"{self.hostname} AgentPost IMAP4rev1 ready")
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.LOGOUT:
            return
        if self._inflate is not None:
            self._inflate_tail += data  # inflated bit by bit in _process
        else:
            self._buffer += data
        with self._cork.batch():  # pipelined commands answered now share a send
            self._process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        self._cork.discard()
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
        if self.notify is not None:
            notify, self.notify = self.notify, None
            notify.stop()
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
        with self._cork.batch():
            for d in waiters:
                d.callback(None)
            if self.state is not State.LOGOUT:
                self._process()

    def stopProducing(self) -> None:
        """connectionLost does the cleanup."""

    # ------------------------------------------------------------------ output

    def write(self, data: bytes) -> None:
        """Bytes to the client, after everything written before; held while a command
        runs (:mod:`agentpost.cork`)."""
        if self._closed:
            return
        self._cork.write(data)

    def _emit(self, data: bytes) -> None:
        """What the cork lets go, to the wire (compressed once COMPRESS is active)."""
        if self._closed:
            return
        if self._deflate is not None:
            # A sync flush per send: every response reaches the client whole, at once.
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        send_direct(self._link, data)

    def send(self, line: str) -> None:
        """One response line; CRLF is added. A continuation request (``+``) leaves at
        once: the client waits for it before sending more."""
        self.write(line.encode("utf-8") + b"\r\n")
        if line.startswith("+"):
            self._cork.flush()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is full (large FETCH responses)."""
        while self._output_blocked and self.state is not State.LOGOUT:
            self._cork.flush()
            d: defer.Deferred = defer.Deferred()
            self._writable.append(d)
            await d

    def close(self) -> None:
        """Hang up (after LOGOUT, BYE or a fatal error); unanswered input is dropped."""
        if self._closed:
            return
        self._cork.flush()  # the last responses (BYE, LOGOUT's OK) before the close
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

    def _stop_watching(self) -> None:
        if self.selected is not None:
            self.selected.stop_watching(self.session_id)

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
        self.send(f"* BYE {reason}")
        self.close()

    # ------------------------------------------------------------------ timers

    def _arm_timer(self) -> None:
        """(Re)start the idle timer after input. Before login it is not restarted: a
        stranger has ``login_timeout_s`` from the connection to log in, as Dovecot's
        login processes give, however busy it keeps the session (a NOOP every minute
        once held a connection slot forever)."""
        if self.state is State.NOT_AUTHENTICATED and self._timer is not None:
            return
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
        self.send("* BYE Autologout; idle for too long")
        self.close()

    def _dispatch_failed(self, failure: Failure, command: Command) -> None:
        log.error("imap %s: response failed: %s", self.session_id, failure.getTraceback())
        if self.state is not State.LOGOUT:
            self.send(f"{command.tag} NO [UNAVAILABLE] Internal error")

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, command: Command) -> None:
        """Run one command through its table row: UID prefix, credential, state, the
        handler, then the selected mailbox's changes where the row allows; one tagged
        response whatever happens (unless the handler gave it)."""
        name = command.name
        self._cork.begin_command()  # ended by _finished, which always follows
        try:
            spec = COMMANDS.get(name)
            if command.uid and (spec is None or not spec.uid_ok):
                raise bad(f"UID {name} is not a command")
            if spec is None:
                raise bad(f"Unknown command {name}")
            if self._credential is not None and spec.recheck_credential:
                await self._recheck_credential(command)
            if spec.states:
                self.require(*spec.states)
            result = await spec.handler(self, command)
            await self._after(spec, command)
            response = f"OK {result}" if result else f"OK {name} completed"
        except Answered:
            return
        except ParseError as exc:
            response = f"BAD {exc}"
        except Exception as exc:  # domain errors and bugs: NO, never a traceback
            if self.state is State.LOGOUT:
                return
            response = error_for(exc).render()
        if self.state is not State.LOGOUT or name == "LOGOUT":
            self.send(f"{command.tag} {response_text(response)}")
        if name == "LOGOUT":
            self.close()

    def _finished(self, result: Any) -> None:
        """The command is answered: its responses leave, with those of the commands
        after it that are answered at once (pipelined)."""
        with self._cork.batch():
            self._cork.end_command()
            super()._finished(result)

    def start_tls(self) -> None:
        self._cork.flush()  # the tagged OK in cleartext, before the handshake
        super().start_tls()

    def start_compression(self) -> None:
        self._cork.flush()  # the tagged OK uncompressed
        super().start_compression()

    async def _after(self, spec: CommandSpec, command: Command) -> None:
        """Report the selected mailbox's changes after a command that allows it; during
        one that uses sequence numbers, expunges wait (RFC 3501 §7.4.1)."""
        view = self.selected
        if self.state is State.SELECTED and spec.reports_changes and view is not None \
                and (view.dirty or spec.polls):
            await report_changes(self, expunge=command.uid or not spec.uses_sequence_numbers)

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
            self.send(f"{command.tag} NO [EXPIRED] {reason}")
            self._end_session(reason)
        raise Answered()

    def require(self, *states: State) -> None:
        """BAD unless the session is in one of ``states``."""
        if self.state not in states:
            if self.state is State.NOT_AUTHENTICATED:
                raise bad("Log in first")
            if states == (State.SELECTED,):
                raise bad("No mailbox selected")
            raise bad("Command not valid in this state")

    # ------------------------------------------------------------------ for the handlers

    def capabilities(self) -> list[str]:
        caps = ["IMAP4rev1", "LITERAL+", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT",
                "CHILDREN", "SPECIAL-USE", "UIDPLUS", "MOVE", "CONDSTORE", "LIST-EXTENDED",
                "LIST-STATUS", "ESEARCH", "QRESYNC", "QUOTA", "QUOTA=RES-STORAGE",
                f"APPENDLIMIT={self.max_append_bytes}", "MULTIAPPEND", "CATENATE",
                "STATUS=SIZE", "COMPRESS=DEFLATE", "BINARY", "SEARCHRES",
                "SORT", "SORT=DISPLAY", "NOTIFY",
                "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES", "ESORT", "CONTEXT=SEARCH",
                "CONTEXT=SORT"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.tls_options is not None and not self.tls_active:
                caps.append("STARTTLS")
            if self.login_allowed():
                caps += ["AUTH=PLAIN", "SASL-IR"]
            else:
                caps.append("LOGINDISABLED")
        if rev2.offered(caps):  # last: it needs the extensions RFC 9051 folds in
            caps.insert(1, rev2.IMAP4REV2)
        return caps

    async def logged_in(self, account: IMAPAccount) -> None:
        """Enter the authenticated state as ``account``, its key watched from now on."""
        if self.credentials is not None:
            try:
                credential = await self.credentials.register(account.principal,
                                                             self._end_session)
            except errors.Unauthenticated as exc:  # the key died as we logged in
                raise no("Authentication failed", "AUTHENTICATIONFAILED") from exc
            if self.state is State.LOGOUT:  # the client left meanwhile
                credential.close()
                raise Answered()
            self._credential = credential
        self.account = account
        self.state = State.AUTHENTICATED
        log.info("imap %s: %s logged in from %s", self.session_id, account.address, self.peer)

    def selected_mailbox(self, view: SelectedMailbox) -> None:
        """Enter the selected state with ``view``, woken by its folder's changes."""
        self.selected = view
        self.state = State.SELECTED
        view.watch(self._selected_changed)

    def _selected_changed(self) -> None:
        """The selected folder may have changed: NOTIFY reports it at once (RFC 5465
        SELECTED), IDLE wakes; otherwise the next command reports it."""
        if self.notify is not None:
            self.notify.selected_changed()
        self.wake()

    def unselect(self) -> None:
        """Back to the authenticated state (CLOSE, UNSELECT, a new SELECT)."""
        self._stop_watching()
        self.selected = None
        self.state = State.AUTHENTICATED

    def wake(self) -> None:
        """Wake :meth:`wait_for_wake` (the selected folder changed, or a line came)."""
        if self._idle_wake is not None and not self._idle_wake.called:
            self._idle_wake.callback(None)

    def run_unsolicited(self, work: Callable[[], Coroutine[Any, Any, None]]) -> str:
        """Run ``work`` (NOTIFY's unsolicited responses, RFC 5465) between commands, as
        if it were one: no command starts while it runs, so its responses never land
        inside another command's (RFC 3501 §7.4.1) nor inside a literal. Returns
        "busy" while a command is in progress, "blocked" while the client is not
        reading, "closed" after LOGOUT/BYE, else "started"."""
        if self.state is State.LOGOUT or self.bye_sent:
            return "closed"
        if self._busy or self._pending:  # a command is running, or half read
            return "busy"
        if self._output_blocked:
            return "blocked"
        self._busy = True
        self._cork.begin_command()

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                log.error("imap %s: notification failed: %s", self.session_id,
                          result.getTraceback())
            self._busy = False
            self._cork.end_command()
            if self.state is not State.LOGOUT:
                self._process()

        defer.ensureDeferred(work()).addBoth(done)
        return "started"

    async def wait_for_wake(self) -> None:
        self._cork.flush()  # what IDLE reported so far, before waiting for more
        self._idle_wake = defer.Deferred()
        try:
            await self._idle_wake
        finally:
            self._idle_wake = None

