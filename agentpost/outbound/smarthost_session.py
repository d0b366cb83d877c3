"""Sessions with the smarthost: connecting (plain, STARTTLS, or implicit TLS from the
first byte as RFC 8314 recommends for port 465), EHLO, AUTH, and a bounded pool of
sessions with an idle timeout on the injected clock.

The SMTP dialogue itself (replies, pipelining, the deadline) is in
:mod:`agentpost.outbound.smarthost_client`.
"""

from __future__ import annotations

import base64
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from agentpost.outbound.smarthost_client import (
    MAX_TRANSACTIONS,
    Deadline,
    Reply,
    SmarthostError,
    SMTPClientProtocol,
    as_smarthost_error,
    describe_error,
    refused,
)

log = logging.getLogger(__name__)

#: ``required``: STARTTLS or nothing is sent; ``opportunistic``: STARTTLS when offered;
#: ``implicit``: TLS from the first byte (port 465); ``none``: never (loopback tests).
TLS_MODES = ("required", "opportunistic", "implicit", "none")

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
    """TLS 1.2 or newer; the certificate verified for ``host`` unless told otherwise.
    Verified options also send ``host`` as SNI, so a relay serving several names picks
    the right certificate (STARTTLS and implicit TLS alike)."""
    if not settings.tls_verify:
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    return ssl.optionsForClientTLS(
        settings.host, trustRoot=_trust_root(settings.ca_file),
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2})


class Connector:
    """Opens sessions: connect (inside TLS from the first byte with ``implicit``),
    greeting, EHLO, STARTTLS and EHLO again (``required``/``opportunistic``), AUTH."""

    def __init__(self, settings: SmarthostSettings, reactor: Any,
                 clock: IReactorTime | None = None) -> None:
        self.settings = settings
        self._reactor = reactor
        self._clock = clock
        self._tls_options: Any = (client_tls_options(settings) if settings.tls != "none"
                                  else None)

    async def open(self, deadline: Deadline) -> Session:
        s = self.settings
        endpoint: Any = HostnameEndpoint(self._reactor, s.host, s.port,
                                         timeout=s.connect_timeout_s)
        if s.tls == "implicit":
            endpoint = wrapClientTLS(self._tls_options, endpoint)
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
        tls = s.tls == "implicit"
        try:
            greeting = await proto.greeting
        except SmarthostError:
            raise
        except Exception as exc:
            if not tls:
                raise
            # The handshake is the first thing on the wire: its failure ends the
            # connection before any greeting, and nothing was sent at all.
            raise SmarthostError(f"TLS with the smarthost failed ({describe_error(exc)}); "
                                 "nothing was sent", "4.7.5") from None
        if greeting.code != 220:
            raise refused("the smarthost's greeting", greeting)
        extensions = await self._ehlo(proto)
        if not tls and s.tls != "none" and "STARTTLS" in extensions:  # implicit: no STARTTLS
            reply = await proto.starttls(self._tls_options)
            if reply.code != 220:
                raise refused("STARTTLS", reply)
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
            raise refused("EHLO", reply)
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
