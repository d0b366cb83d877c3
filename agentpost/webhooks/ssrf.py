"""The SSRF guard: webhook requests reach only public addresses (unless allow-listed).

A webhook URL is chosen by a tenant, and the request comes from inside our network,
so an unchecked URL could read cloud metadata (169.254.169.254), the database port on
loopback, or anything on the private network. The guard:

* accepts https only in production (http also in development);
* resolves the name ONCE, refuses it when any address is internal (loopback, private,
  link-local, CGNAT, multicast, unspecified, reserved, the metadata addresses, the
  IPv6 equivalents and IPv4-mapped/-translated IPv6 forms), and then connects to that
  very address (:func:`pinned_agent`) with the URL's name as Host and TLS server name,
  so a DNS answer that changes between check and connect (rebinding) cannot redirect
  the request;
* ``[webhooks] allow_networks`` lets an operator allow-list networks (a local receiver
  in development, tests).

Redirects are never followed (a plain Agent does not), and callers read at most a small
part of the response body.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from agentpost.model.errors import WebhookURLNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Besides what ipaddress flags (private, loopback, link-local, multicast, reserved,
# unspecified): shared address space (CGNAT), and the cloud metadata addresses.
_EXTRA_BLOCKED = [ipaddress.ip_network(n) for n in (
    "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "fd00:ec2::254/128",
    "169.254.169.254/32", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16")]
MAX_URL_LENGTH = 2000


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``) and what to call it."""

    url: str
    scheme: str
    host: str
    port: int
    address: str


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in ipaddress.ip_network("::ffff:0:0:0/96"):  # IPv4-translated
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip in ipaddress.ip_network("::/96") and int(ip) > 1:  # IPv4-compatible
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_internal(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address a tenant's webhook must not reach."""
    inner = _embedded_v4(ip)
    if inner is not None and is_internal(inner):
        return True
    return bool(ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified
                or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
                or any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version))


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address of ``host`` from the system resolver (in a thread: getaddrinfo
    blocks)."""
    infos = await threads.deferToThread(socket.getaddrinfo, host, port,
                                        type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class SSRFGuard:
    """Checks webhook URLs and the addresses they resolve to."""

    def __init__(self, *, allow_http: bool, allow_networks: Iterable[str] = (),
                 resolver: Resolver | None = None) -> None:
        self._allow_http = allow_http
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in allow_networks]
        self._resolve = resolver or system_resolver

    def check_syntax(self, url: str) -> tuple[str, str, int]:
        """Scheme, host and port of an acceptable URL (no DNS); WebhookURLNotAllowed
        otherwise. An IP-literal host is checked here already."""
        if len(url) > MAX_URL_LENGTH or any(c.isspace() or ord(c) < 32 for c in url):
            raise WebhookURLNotAllowed("The webhook URL is malformed.", field="url")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise WebhookURLNotAllowed("The webhook URL is malformed.", field="url") from None
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http") or (scheme == "http" and not self._allow_http):
            raise WebhookURLNotAllowed("Webhook URLs must use https.", field="url")
        host = (parts.hostname or "").rstrip(".")
        if not host or parts.username is not None or parts.password is not None:
            raise WebhookURLNotAllowed("The webhook URL needs a host (and no credentials).",
                                       field="url")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            self.check_address(str(literal))
        return scheme, host, port or (443 if scheme == "https" else 80)

    def check_address(self, address: str) -> IPAddress:
        """The address, when a webhook may connect to it."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip.version == net.version and ip in net for net in self._allowed):
            return ip
        if is_internal(ip):
            raise WebhookURLNotAllowed(
                "The webhook URL resolves to an internal address, which webhooks may not "
                "reach.", field="url")
        return ip

    async def target(self, url: str) -> Target:
        """Resolve once and check every address: the Target to connect to."""
        scheme, host, port = self.check_syntax(url)
        try:
            literal = ipaddress.ip_address(host)
            addresses = [str(literal)]
        except ValueError:
            try:
                addresses = await self._resolve(host, port)
            except Exception as exc:
                raise WebhookURLNotAllowed(f"The webhook host {host} does not resolve.",
                                           field="url") from exc
        if not addresses:
            raise WebhookURLNotAllowed(f"The webhook host {host} does not resolve.",
                                       field="url")
        checked = [self.check_address(a) for a in addresses]  # any internal one: refuse
        return Target(url=url, scheme=scheme, host=host, port=port, address=str(checked[0]))


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """Connects every request to the already-checked address of its Target."""

    def __init__(self, reactor: Any, target: Target, timeout_s: float) -> None:
        self._reactor = reactor
        self._target = target
        self._timeout_s = timeout_s

    def endpointForURI(self, uri: Any) -> Any:
        t = self._target
        ip = ipaddress.ip_address(t.address)
        cls = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
        tcp = cls(self._reactor, t.address, t.port, timeout=self._timeout_s)
        if t.scheme == "https":
            return wrapClientTLS(optionsForClientTLS(t.host), tcp)
        return tcp


def pinned_agent(reactor: Any, target: Target, timeout_s: float) -> Agent:
    """An Agent that reaches only ``target.address`` (no pool: each request connects,
    so a connection to one tenant's host is never reused for another URL)."""
    return Agent.usingEndpointFactory(reactor, _PinnedEndpoints(reactor, target, timeout_s))
