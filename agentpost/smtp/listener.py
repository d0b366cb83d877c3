"""The SMTP listener: a factory holding the shared configuration, and connection caps.

The factory is where per-client and total connection limits live, because only it
sees every connection: over either cap a client gets ``421 4.7.0`` at connect time
(a retryable refusal, RFC 5321 §3.8) instead of a session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol

from agentpost.listening import ConnectionCaps, listen_tcp
from agentpost.smtp import replies
from agentpost.smtp.interfaces import DeliveryAgent
from agentpost.smtp.policy import ListenerPolicy
from agentpost.smtp.server import SMTPLimits, SMTPServerProtocol

__all__ = ["SMTPFactory", "listen_smtp"]


class _RefusingProtocol(Protocol):
    """Says 421 and hangs up: for clients over a connection cap."""

    def __init__(self, reply: replies.Reply) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        """Refuse at once; nothing the client sends is read."""
        assert self.transport is not None  # set by makeConnection, before this call
        self.transport.write(self.reply.render())
        self.transport.loseConnection()


class SMTPFactory(ConnectionCaps, Factory):
    """Builds :class:`SMTPServerProtocol` sessions sharing one configuration.

    Arguments are those of :class:`SMTPServerProtocol` plus:
        max_connections_per_ip: concurrent sessions from one client address.
        max_connections: concurrent sessions in total.
        implicit_tls: TLS settings for a listener that is TLS from the first byte
            (submission on port 465); :func:`listen_smtp` then wraps the
            socket in TLS and sessions do not offer STARTTLS.
        policy: the listener's rules (:mod:`agentpost.smtp.policy`), e.g. SUBMISSION.
    """

    def __init__(
        self,
        agent: DeliveryAgent,
        *,
        hostname: str,
        clock: IReactorTime,
        limits: SMTPLimits | None = None,
        tls_options: Any = None,
        listener: str = "mx",
        require_tls: bool = False,
        implicit_tls: Any = None,
        spool_dir: str | None = None,
        max_connections_per_ip: int = 20,
        max_connections: int = 1000,
        protocol_class: type[SMTPServerProtocol] = SMTPServerProtocol,
        policy: ListenerPolicy | None = None,
    ) -> None:
        self.agent = agent
        self.hostname = hostname
        self.clock = clock
        self.limits = limits or SMTPLimits()
        self.tls_options = tls_options
        self.listener = listener
        self.require_tls = require_tls
        self.implicit_tls = implicit_tls
        self.spool_dir = spool_dir
        self.protocol_class = protocol_class
        self.policy = policy
        self.init_caps(max_connections_per_ip, max_connections)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """A session, or a 421 refusal when a connection cap is reached."""

        def session(on_close: Callable[[], None]) -> Protocol:
            return self.protocol_class(
                self.agent,
                hostname=self.hostname,
                clock=self.clock,
                limits=self.limits,
                tls_options=self.tls_options,
                listener=self.listener,
                require_tls=self.require_tls,
                implicit_tls=self.implicit_tls is not None,
                spool_dir=self.spool_dir,
                on_close=on_close,
                policy=self.policy,
            )

        return self.admitted(addr, session)

    def refusal(self, text: str) -> Protocol:
        return _RefusingProtocol(replies.closing(self.hostname, "4.7.0", text))


async def listen_smtp(reactor: Any, factory: SMTPFactory, bind: str = "0.0.0.0",  # noqa: S104
                      port: int = 25) -> IListeningPort:
    """Listen on ``bind:port`` (IPv6 if ``bind`` contains a colon).

    With ``factory.implicit_tls`` set, the socket is TLS from the first byte: the
    factory is wrapped in :class:`TLSMemoryBIOFactory`, which also calls each
    session's ``handshakeCompleted`` so the ``Received:`` header names the TLS
    version and cipher.
    """
    return await listen_tcp(reactor, factory, bind, port, tls_options=factory.implicit_tls)
