"""The SMTP dialogue of the smarthost transport's client side: replies matched to
commands (pipelined or not), STARTTLS on the wire, the errors a hand-off can end in, and
a per-hand-off deadline on the injected clock.

Opening a connection (plain, STARTTLS or implicit TLS), AUTH and the pool of sessions
are in :mod:`agentpost.outbound.smarthost_session`; mapping a hand-off onto
transactions is :mod:`agentpost.outbound.smarthost`, whose doc describes the whole.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
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


def describe_error(exc: BaseException) -> str:
    """A short, log-safe description of a connection or TLS failure."""
    text = str(exc) or type(exc).__name__
    if "certificate verify failed" in text:
        return "certificate verify failed"
    return text[:300]


def as_smarthost_error(deadline: Deadline, exc: BaseException, what: str,
                       status: str = "4.4.2") -> SmarthostError:
    """``exc`` as the error a hand-off ends in (the deadline's own when it passed)."""
    if deadline.expired:
        return SmarthostError(f"no answer from the smarthost within {deadline.seconds:.0f} s",
                              "4.4.7")
    if isinstance(exc, SmarthostError):
        return exc
    return SmarthostError(f"{what}: {describe_error(exc)}", status)


def refused(step: str, reply: Reply) -> SmarthostError:
    """A refused set-up step: always temporary (the configuration or relay is at fault)."""
    return SmarthostError(f"the smarthost refused {step}: {reply.describe()}",
                          "4" + reply.enhanced()[1:], reply.code)
