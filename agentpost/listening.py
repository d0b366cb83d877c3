"""Opening listening sockets, optionally shared between processes with SO_REUSEPORT.

With ``reuse_port`` every AgentPost process on the machine binds the same address and
the kernel spreads new connections across them: the way to use more than one core
without a home-made balancer (see agentpost.workers).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory


async def listen_tcp(reactor: Any, factory: Factory, bind: str, port: int, *,
                     tls_options: Any = None, reuse_port: bool = False,
                     backlog: int = 511, endpoint: str = "") -> IListeningPort:
    """Listen on ``bind:port`` (or a Twisted endpoint description such as systemd's
    ``systemd:domain=INET:name=…``); TLS from the first byte when ``tls_options`` is
    given."""
    serving: Factory = factory
    if tls_options is not None:
        serving = TLSMemoryBIOFactory(tls_options, False, factory)
    if endpoint:
        return await endpoints.serverFromString(reactor, endpoint).listen(serving)
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    if not reuse_port:
        endpoint_class = (endpoints.TCP6ServerEndpoint if family == socket.AF_INET6
                          else endpoints.TCP4ServerEndpoint)
        return await endpoint_class(reactor, port, backlog=backlog, interface=bind).listen(
            serving)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((bind, port))
        sock.listen(backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, serving)
    finally:
        sock.close()  # the reactor holds its own duplicate of the descriptor


def no_delay(transport: Any) -> None:
    """Send small replies at once (TCP_NODELAY), through any TLS wrapper.

    A pipelining mail client waits for replies the server computes after a database
    round trip; with Nagle's algorithm the kernel holds such a reply until the previous
    one is acknowledged, which with delayed ACKs costs ~40 ms per exchange.
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        setter = getattr(candidate, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass
            return


class ConnectionCaps:
    """Per-address and total session caps shared by the SMTP and IMAP factories.

    Subclasses set ``max_connections``, ``max_connections_per_ip``, ``connections``
    (0) and ``connections_by_ip`` (a Counter) and call ``admit``/``release``.
    """

    max_connections: int
    max_connections_per_ip: int
    connections: int
    connections_by_ip: Any

    def admit(self, host: str) -> str | None:
        """Count a new session, or return why it is refused."""
        if self.connections >= self.max_connections:
            return "Too many connections; try again later"
        if self.connections_by_ip[host] >= self.max_connections_per_ip:
            return "Too many connections from your address; try again later"
        self.connections += 1
        self.connections_by_ip[host] += 1
        return None

    def release(self, host: str) -> None:
        """A session ended."""
        self.connections -= 1
        self.connections_by_ip[host] -= 1
        if self.connections_by_ip[host] <= 0:
            del self.connections_by_ip[host]
