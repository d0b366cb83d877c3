"""Opening listening sockets, optionally shared between processes with SO_REUSEPORT.

With ``reuse_port`` every AgentPost process on the machine binds the same address and
the kernel spreads new connections across them: the way to use more than one core
without a home-made balancer (see agentpost.workers).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import endpoints, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

log = logging.getLogger(__name__)


async def listen_tcp(reactor: Any, factory: IProtocolFactory, bind: str, port: int, *,
                     tls_options: Any = None, reuse_port: bool = False,
                     backlog: int = 511, endpoint: str = "") -> IListeningPort:
    """Listen on ``bind:port`` (or a Twisted endpoint description such as systemd's
    ``systemd:domain=INET:name=…``); TLS from the first byte when ``tls_options`` is
    given."""
    serving: IProtocolFactory = factory
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


def port_number(port: IListeningPort) -> int:
    """The TCP port a listener is bound to (0 for a socket that has none)."""
    host = port.getHost()
    if isinstance(host, IPv4Address | IPv6Address):
        return host.port
    return 0


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


def send_direct(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, except that on a plain TCP connection with nothing
    buffered the bytes go to the socket at once.

    ``transport.write`` registers the socket for writability with epoll and the bytes
    leave on a later pass (or in ``dispatch.send_now``), after which the socket is
    unregistered again: two ``epoll_ctl`` calls and a pass of the reactor for every
    answer (issue 12): an HTTP answer's head, an SMTP reply. What the kernel does not
    take, or any error, goes through ``transport.write`` as before, so the reactor sends
    the rest, or meets the error and closes the connection as it always does."""
    if (not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", True)
            or not transport.connected or transport.disconnecting
            or getattr(transport, "_writeDisconnecting", True)
            or getattr(transport, "_tempDataLen", 1)
            or len(getattr(transport, "dataBuffer", b"x"))
            > getattr(transport, "offset", -1)):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:  # EAGAIN, or an error the reactor will meet and handle
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


def cap_key(host: str) -> str:
    """What the per-address cap counts: an IPv4 address, or the /64 around an IPv6 one.

    Why: one client holds a whole IPv6 /64 (the login throttle counts it so too,
    core.login_guard); counted per address, a single host could take every session of
    the total cap.  IPv4-mapped IPv6 counts as the IPv4 address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionCaps:
    """Per-address and total session caps shared by the SMTP and IMAP factories.

    A factory calls :meth:`init_caps` from its constructor, builds every protocol
    through :meth:`admitted`, and implements ``refusal(text)`` (the protocol that
    tells a refused client why, in its own protocol's words).
    """

    max_connections: int
    max_connections_per_ip: int
    connections: int
    connections_by_ip: Counter[str]

    def init_caps(self, max_connections_per_ip: int, max_connections: int) -> None:
        self.max_connections_per_ip = max_connections_per_ip
        self.max_connections = max_connections
        self.connections_by_ip = Counter()
        self.connections = 0

    def refusal(self, text: str) -> Protocol:
        raise NotImplementedError

    def admitted(self, addr: Any, make_session: Callable[[Callable[[], None]], Protocol]
                 ) -> Protocol:
        """``make_session(on_close)`` if a cap allows one more session from ``addr``,
        else the refusal; the count drops again when the session calls ``on_close``."""
        host = str(getattr(addr, "host", "") or "")
        key = cap_key(host)
        refused = self.admit(key)
        if refused is not None:
            log.warning("%s: refusing %s: %s", self.__class__.__name__, host, refused)
            protocol = self.refusal(refused)
        else:
            protocol = make_session(lambda: self.release(key))
        protocol.factory = self
        return protocol

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
