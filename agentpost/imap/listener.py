"""The IMAP listeners: a factory holding the shared configuration, and connection caps.

Port 143-style listeners speak plaintext and offer STARTTLS (``tls_options``);
port 993-style listeners are TLS from the first byte (``implicit_tls``): then
:func:`listen_imap` wraps the factory in :class:`TLSMemoryBIOFactory` and sessions
never offer STARTTLS. Over a connection cap a client gets ``* BYE`` at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol

from agentpost.imap.interfaces import IMAPBackend
from agentpost.imap.server import MAX_APPEND_BYTES, IMAP4ServerProtocol
from agentpost.listening import ConnectionCaps, listen_tcp

__all__ = ["IMAPFactory", "listen_imap"]


class _RefusingProtocol(Protocol):
    """Says BYE and hangs up: for clients over a connection cap."""

    def __init__(self, text: str) -> None:
        self.text = text

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"* BYE [UNAVAILABLE] " + self.text.encode() + b"\r\n")
        self.transport.loseConnection()


class IMAPFactory(ConnectionCaps, Factory):
    """Builds :class:`IMAP4ServerProtocol` sessions sharing one configuration.

    Arguments are those of :class:`IMAP4ServerProtocol` plus:
        implicit_tls: TLS settings for a 993-style listener (None for 143-style).
        max_connections_per_ip / max_connections: concurrent session caps.
        credentials: :class:`agentpost.auth.sessions.LiveCredentials`, shared by every
            session: it ends sessions whose key is revoked, expires or loses power.
    """

    def __init__(
        self,
        backend: IMAPBackend,
        *,
        hostname: str,
        clock: IReactorTime,
        tls_options: Any = None,
        implicit_tls: Any = None,
        allow_plaintext_login: bool = False,
        max_append_bytes: int = MAX_APPEND_BYTES,
        autologout_s: float = 30 * 60,
        login_timeout_s: float = 120.0,
        max_connections_per_ip: int = 50,
        max_connections: int = 5000,
        protocol_class: type[IMAP4ServerProtocol] = IMAP4ServerProtocol,
        credentials: Any = None,
    ) -> None:
        self.backend = backend
        self.hostname = hostname
        self.clock = clock
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.allow_plaintext_login = allow_plaintext_login
        self.max_append_bytes = max_append_bytes
        self.autologout_s = autologout_s
        self.login_timeout_s = login_timeout_s
        self.protocol_class = protocol_class
        self.credentials = credentials
        self.init_caps(max_connections_per_ip, max_connections)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """A session, or a BYE refusal when a connection cap is reached."""

        def session(on_close: Callable[[], None]) -> Protocol:
            return self.protocol_class(
                self.backend,
                hostname=self.hostname,
                clock=self.clock,
                tls_options=None if self.implicit_tls is not None else self.tls_options,
                implicit_tls=self.implicit_tls is not None,
                allow_plaintext_login=self.allow_plaintext_login,
                max_append_bytes=self.max_append_bytes,
                autologout_s=self.autologout_s,
                login_timeout_s=self.login_timeout_s,
                on_close=on_close,
                credentials=self.credentials,
            )

        return self.admitted(addr, session)

    def refusal(self, text: str) -> Protocol:
        return _RefusingProtocol(text)


async def listen_imap(reactor: Any, factory: IMAPFactory, bind: str = "0.0.0.0",  # noqa: S104
                      port: int = 143) -> IListeningPort:
    """Listen on ``bind:port`` (IPv6 if ``bind`` contains a colon); implicit TLS when
    ``factory.implicit_tls`` is set."""
    return await listen_tcp(reactor, factory, bind, port, tls_options=factory.implicit_tls)
