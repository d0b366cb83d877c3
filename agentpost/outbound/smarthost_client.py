"""The client side of SMTP for the smarthost transport: replies matched to commands
(pipelined or not), a session set up with STARTTLS and AUTH, a bounded pool of sessions
with an idle timeout, and a per-hand-off deadline, all on the injected clock.

Kept apart from :mod:`agentpost.outbound.smarthost` (which maps a hand-off onto SMTP
transactions and their replies onto outcomes) so each stays small; see that module's
doc for the behaviour as a whole.
"""

from __future__ import annotations

import base64
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, ssl
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

log = logging.getLogger(__name__)

#: Transactions on one connection before it is replaced (some relays cap them).
MAX_TRANSACTIONS = 200
#: After QUIT, how long a connection may take to close before it is dropped.
CLOSE_GRACE_S = 10.0
_QUEUE_ID = (re.compile(r"queued as\s+<?([\w.@:-]+)>?", re.I),
             re.compile(r"\bid[=:]\s*<?([\w.@:-]+)>?", re.I),
             re.compile(r"^(?:2\.\d{1,3}\.\d{1,3}\s+)?(?:ok|queued)\s*[:,]?\s+<?([\w.@:-]{6,})>?",
                        re.I))
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")

class SmarthostError(Exception):
    """The smarthost could not take the hand-off now: every recipient is deferred."""

    def __init__(self, diagnostic: str, status_code: str = "4.4.2",
                 smtp_code: int | None = None, *, reusable: bool = False) -> None:
        super().__init__(diagnostic)
        self.diagnostic = diagnostic
        self.status_code = status_code
        self.smtp_code = smtp_code
        self.reusable = reusable  # the connection is still good for the next hand-off


class StaleConnection(SmarthostError):
    """A pooled connection was gone before it answered anything: try a fresh one."""


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines if line.strip())

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def enhanced(self) -> str:
        """The reply's enhanced status code, or one made from its class."""
        match = _ENHANCED.match(self.lines[0].strip() if self.lines else "")
        if match and match.group(1) == str(self.code)[0]:
            return match.group(0)
        return f"{str(self.code)[0]}.0.0"

    def describe(self) -> str:
        return f"{self.code} {self.text}"[:500]


def queue_id_of(reply: Reply) -> str | None:
    """The smarthost's id for an accepted message, as its 250 text tells it (Postfix
    ``queued as X``, ``id=X``, or ``Ok <id>`` as Amazon SES's SMTP interface answers)."""
    text = reply.text
    for pattern in _QUEUE_ID:
        match = pattern.search(text)
        if match:
            return match.group(1)[:200]
    return None


# ---------------------------------------------------------------------- the wire


class SMTPClientProtocol(protocol.Protocol):
    """Reads replies and matches them, in order, to the commands waiting for one."""

    MAX_LENGTH = 4096
    MAX_LINES = 200

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock
        self._buffer = b""
        self._waiting: deque[defer.Deferred[Reply]] = deque()
        self._partial: list[str] = []
        self._tls_options: Any = None
        self.greeting = self._expect()
        self.replies = 0
        self.lost: Failure | None = None
        self.on_lost: Callable[[], None] | None = None
        self._dropped = False  # aborted or closing: nothing more is read
        self._drop_reason: str | None = None

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self.lost is None and not self._dropped:
            line, found, rest = self._buffer.partition(b"\n")
            if not found:
                if len(self._buffer) > self.MAX_LENGTH:
                    self._abort("the smarthost sent an over-long reply line")
                return
            self._buffer = rest
            if len(line) > self.MAX_LENGTH:
                self._abort("the smarthost sent an over-long reply line")
                return
            self.lineReceived(line)

    async def starttls(self, options: Any) -> Reply:
        """STARTTLS; on 220 the handshake starts at once, and anything the server sent
        after its 220 in the same plain-text read is an injection (the connection is
        dropped, RFC 3207 section 6)."""
        self._tls_options = options
        return await self.command(b"STARTTLS")

    def _expect(self) -> defer.Deferred[Reply]:
        d: defer.Deferred[Reply] = defer.Deferred()
        self._waiting.append(d)
        return d

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if (len(text) < 3 or not text[:3].isdigit() or text[0] not in "2345"
                or (len(text) > 3 and text[3] not in " -")
                or len(self._partial) >= self.MAX_LINES):
            self._abort("the smarthost sent a garbled reply")
            return
        self._partial.append(text[4:])
        if len(text) > 3 and text[3] == "-":
            return
        reply, self._partial = Reply(int(text[:3]), tuple(self._partial)), []
        self.replies += 1
        if self._tls_options is not None and self._waiting:
            options, self._tls_options = self._tls_options, None
            if self._buffer:
                self._abort("the smarthost sent data after its STARTTLS reply")
                return
            if reply.code == 220:
                self.transport.startTLS(options)  # type: ignore[union-attr]
        if not self._waiting:  # unsolicited: a 421 before closing an idle connection
            log.info("smarthost said, unasked: %s", reply.describe())
            self.close()
            return
        self._waiting.popleft().callback(reply)

    def _abort(self, why: str) -> None:
        log.warning("smarthost connection dropped: %s", why)
        self._drop_reason = why
        self.abort()

    def abort(self) -> None:
        """Drop the connection now (no QUIT): a garbled peer, or the deadline."""
        self._dropped = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost = reason
        waiting, self._waiting = self._waiting, deque()
        why = (Failure(SmarthostError(self._drop_reason)) if self._drop_reason is not None
               else reason)
        for d in waiting:
            d.errback(why)
        if self.on_lost is not None:
            self.on_lost()

    @property
    def connected_now(self) -> bool:
        return self.lost is None and self.transport is not None and not self._dropped

    def send(self, lines: Sequence[bytes]) -> list[defer.Deferred[Reply]]:
        """Write ``lines`` at once (pipelined if more than one); their replies."""
        if self.lost is not None:
            raise SmarthostError("the smarthost connection is closed")
        waiting = [self._expect() for _ in lines]
        assert self.transport is not None
        self.transport.write(b"".join(line + b"\r\n" for line in lines))
        return waiting

    async def command(self, line: bytes) -> Reply:
        return await self.send([line])[0]

    async def data(self, stuffed: bytes) -> Reply:
        """The message (dot-stuffed, ending in CRLF) and the end-of-data line."""
        waiting = self._expect()
        assert self.transport is not None
        self.transport.write(stuffed + b".\r\n")
        return await waiting

    def close(self) -> None:
        """QUIT and close, without waiting for the answer."""
        if self.lost is None and self.transport is not None and not self._dropped:
            waiting = self._expect()
            waiting.addErrback(lambda _: None)
            self.transport.write(b"QUIT\r\n")
            self.transport.loseConnection()
            self._dropped = True
            if self._clock is not None:  # a TLS peer that never answers close_notify
                self._clock.callLater(CLOSE_GRACE_S, self._drop_if_open)

    def _drop_if_open(self) -> None:
        if self.lost is None:
            self.abort()


async def all_replies(waiting: list[defer.Deferred[Reply]]) -> list[Reply]:
    """Every reply, or the first failure (the others' failures consumed)."""
    try:
        return await defer.gatherResults(waiting, consumeErrors=True)
    except defer.FirstError as exc:
        exc.subFailure.raiseException()
        raise  # pragma: no cover - raiseException always raises


# ---------------------------------------------------------------------- deadline


class Deadline:
    """One hand-off's time limit on the injected clock: when it passes, whatever the
    hand-off is waiting for (a connection, a pool slot, a reply) is cancelled."""

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.expired = False
        self.seconds = seconds
        self._pending: set[defer.Deferred[Any]] = set()
        self._protocols: set[SMTPClientProtocol] = set()
        self._timer = clock.callLater(seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        for d in list(self._pending):
            d.cancel()
        for proto in list(self._protocols):
            proto.abort()

    async def wait(self, d: defer.Deferred[Any]) -> Any:
        self._pending.add(d)
        try:
            return await d
        finally:
            self._pending.discard(d)

    def watch(self, proto: SMTPClientProtocol) -> None:
        self._protocols.add(proto)

    def unwatch(self, proto: SMTPClientProtocol) -> None:
        self._protocols.discard(proto)

    def cancel(self) -> None:
        if self._timer.active():
            self._timer.cancel()


# ---------------------------------------------------------------------- sessions


@dataclass
class Session:
    """An open connection, greeted, secured and authenticated, between transactions."""

    proto: SMTPClientProtocol
    extensions: dict[str, str]
    tls: bool
    transactions: int = 0
    idle_timer: IDelayedCall | None = None
    reused: bool = False

    @property
    def usable(self) -> bool:
        return self.proto.connected_now and self.transactions < MAX_TRANSACTIONS

    def has(self, keyword: str) -> bool:
        return keyword in self.extensions

    @property
    def size_limit(self) -> int:
        """The SIZE the server announced (0: none or unreadable)."""
        value = self.extensions.get("SIZE", "").split(" ")[0]
        return int(value) if value.isdigit() and len(value) < 16 else 0


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters."""
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            out[keyword.upper()] = params.strip()
    return out


@dataclass
class SmarthostSettings:
    """Where and how to connect (the ``smtp_*`` keys of ``[outbound]``)."""

    host: str
    port: int = 587
    tls: str = "required"
    tls_verify: bool = True
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    helo: str = "localhost"
    pool_size: int = 4
    idle_timeout_s: float = 30.0
    deadline_s: float = 100.0
    connect_timeout_s: float = 30.0


def _trust_root(ca_file: str | None) -> Any:
    if not ca_file:
        return ssl.platformTrust()
    pem = Path(ca_file).read_bytes()
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem,
                        re.S)
    if not blocks:
        raise ValueError(f"no certificate in {ca_file}")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


def client_tls_options(settings: SmarthostSettings) -> Any:
    """TLS 1.2 or newer; the certificate verified for ``host`` unless told otherwise."""
    if not settings.tls_verify:
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    return ssl.optionsForClientTLS(
        settings.host, trustRoot=_trust_root(settings.ca_file),
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2})


class Connector:
    """Opens sessions: connect, greeting, EHLO, STARTTLS, EHLO again, AUTH."""

    def __init__(self, settings: SmarthostSettings, reactor: Any,
                 clock: IReactorTime | None = None) -> None:
        self.settings = settings
        self._reactor = reactor
        self._clock = clock
        self._tls_options = client_tls_options(settings) if settings.tls != "none" else None

    async def open(self, deadline: Deadline) -> Session:
        s = self.settings
        endpoint = HostnameEndpoint(self._reactor, s.host, s.port, timeout=s.connect_timeout_s)
        proto = SMTPClientProtocol(self._clock)
        try:
            await deadline.wait(connectProtocol(endpoint, proto))
        except Exception as exc:
            raise as_smarthost_error(deadline, exc, f"cannot connect to {s.host}:{s.port}",
                           "4.4.1") from None
        deadline.watch(proto)
        try:
            return await self._setup(proto)
        except SmarthostError:
            proto.close()
            raise
        except Exception as exc:
            proto.close()
            raise as_smarthost_error(deadline, exc, "connection to the smarthost lost") from None
        finally:
            deadline.unwatch(proto)

    async def _setup(self, proto: SMTPClientProtocol) -> Session:
        s = self.settings
        greeting = await proto.greeting
        if greeting.code != 220:
            raise _refused("the smarthost's greeting", greeting)
        extensions = await self._ehlo(proto)
        tls = False
        if s.tls != "none" and "STARTTLS" in extensions:
            reply = await proto.starttls(self._tls_options)
            if reply.code != 220:
                raise _refused("STARTTLS", reply)
            tls = True
            try:
                extensions = await self._ehlo(proto)
            except SmarthostError:
                raise
            except Exception as exc:
                raise SmarthostError(f"TLS with the smarthost failed ({describe_error(exc)}); "
                                     "nothing was sent in clear", "4.7.5") from None
        elif s.tls == "required":
            raise SmarthostError("the smarthost does not offer STARTTLS (smtp_tls = "
                                 "required); nothing was sent in clear", "4.7.10")
        if s.username:
            if not tls and s.tls != "none":
                raise SmarthostError("refusing to send credentials without TLS (the "
                                     "smarthost offers no STARTTLS)", "4.7.10")
            await self._auth(proto, extensions)
        return Session(proto, extensions, tls)

    async def _ehlo(self, proto: SMTPClientProtocol) -> dict[str, str]:
        reply = await proto.command(b"EHLO " + self.settings.helo.encode("idna"))
        if reply.code != 250:
            raise _refused("EHLO", reply)
        return parse_ehlo(reply)

    async def _auth(self, proto: SMTPClientProtocol, extensions: dict[str, str]) -> None:
        user = (self.settings.username or "").encode("utf-8")
        password = (self.settings.password or "").encode("utf-8")
        mechanisms = extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await proto.command(b"AUTH PLAIN " + token)
        elif "LOGIN" in mechanisms:
            reply = await proto.command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await proto.command(base64.b64encode(user))
            if reply.code == 334:
                reply = await proto.command(base64.b64encode(password))
        else:
            raise SmarthostError("the smarthost offers neither AUTH PLAIN nor AUTH LOGIN "
                                 f"(it offers: {' '.join(mechanisms) or 'no AUTH'})", "4.7.0")
        if reply.code != 235:
            raise SmarthostError(f"the smarthost refused AUTH as {self.settings.username!r}: "
                                 f"{reply.describe()}", "4.7.0", reply.code)


def describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "certificate verify failed" in text:
        return "certificate verify failed"
    return text[:300]


def as_smarthost_error(deadline: Deadline, exc: BaseException, what: str,
             status: str = "4.4.2") -> SmarthostError:
    if deadline.expired:
        return SmarthostError(f"no answer from the smarthost within {deadline.seconds:.0f} s",
                              "4.4.7")
    if isinstance(exc, SmarthostError):
        return exc
    return SmarthostError(f"{what}: {describe_error(exc)}", status)


def _refused(step: str, reply: Reply) -> SmarthostError:
    return SmarthostError(f"the smarthost refused {step}: {reply.describe()}",
                          "4" + reply.enhanced()[1:], reply.code)


# ---------------------------------------------------------------------- the pool


class ConnectionPool:
    """At most ``size`` sessions with the one smarthost; idle ones close after
    ``idle_timeout_s`` on the injected clock, and hand-offs beyond ``size`` wait."""

    def __init__(self, opener: Callable[[Deadline], Awaitable[Session]], clock: IReactorTime,
                 size: int, idle_timeout_s: float) -> None:
        self._open = opener
        self._clock = clock
        self._size = size
        self._idle_timeout = idle_timeout_s
        self._idle: list[Session] = []
        self._out = 0
        self._waiters: deque[defer.Deferred[None]] = deque()
        self._closed = False
        self.opened = 0

    async def acquire(self, deadline: Deadline) -> Session:
        while True:
            while self._idle:
                session = self._idle.pop()  # the most recently used
                if session.idle_timer is not None and session.idle_timer.active():
                    session.idle_timer.cancel()
                if session.usable:
                    self._out += 1
                    session.reused = True
                    return session
                session.proto.close()
            if self._out < self._size:
                self._out += 1
                try:
                    session = await self._open(deadline)
                except BaseException:
                    self._out -= 1
                    self._wake()
                    raise
                self.opened += 1
                return session
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            try:
                await deadline.wait(waiter)
            except defer.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                if not deadline.expired:
                    raise
                raise SmarthostError("no smarthost connection became free within "
                                     f"{deadline.seconds:.0f} s", "4.4.7") from None

    def release(self, session: Session, reusable: bool) -> None:
        self._out -= 1
        if reusable and session.usable and not self._closed:
            session.idle_timer = self._clock.callLater(self._idle_timeout, self._expire,
                                                       session)
            session.proto.on_lost = lambda: self._forget(session)
            self._idle.append(session)
        else:
            session.proto.close()
        self._wake()

    def _forget(self, session: Session) -> None:
        if session in self._idle:
            self._idle.remove(session)
            if session.idle_timer is not None and session.idle_timer.active():
                session.idle_timer.cancel()

    def _expire(self, session: Session) -> None:
        if session in self._idle:
            self._idle.remove(session)
            session.proto.close()

    def _wake(self) -> None:
        if self._waiters:
            self._waiters.popleft().callback(None)

    def close(self) -> None:
        """Close idle sessions; sessions in use close when released."""
        self._closed = True
        while self._idle:
            session = self._idle.pop()
            if session.idle_timer is not None and session.idle_timer.active():
                session.idle_timer.cancel()
            session.proto.close()

    @property
    def idle(self) -> int:
        return len(self._idle)
