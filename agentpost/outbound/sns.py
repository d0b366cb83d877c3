"""Amazon SNS message verification, and the one guarded way we fetch from SNS.

SNS signs every HTTP(S) delivery; a forged "bounce" would otherwise let anyone on the
internet put a tenant's correspondents on its suppression list. What is checked, in
the order that keeps work for a forger smallest (nothing is fetched until the cheap
checks pass):

1. the shape: ``Type`` is Notification, SubscriptionConfirmation or
   UnsubscribeConfirmation, ``SignatureVersion`` is "1" (SHA1withRSA) or "2"
   (SHA256withRSA), the signed fields are strings;
2. ``TopicArn`` is one of the configured topics (exact match);
3. ``Timestamp`` is at most ``max_age`` old (and not from the future): replays;
4. ``SigningCertURL`` (and a ``SubscribeURL``) is ``https`` on a host matching the
   configured pattern (``sns.<region>.amazonaws.com`` by default), without user info,
   and the certificate's path is SNS's ``/SimpleNotificationService-….pem``;
5. the signature, over AWS's canonical string (:func:`string_to_sign`), with the
   certificate's RSA key; the certificate must be within its validity period.

Trust in the certificate comes from where it was fetched: over TLS verified against the
configured trust roots (the system's, or ``sns_ca_file`` in tests), from an allowed SNS
host -- AWS's own recommendation. Fetches (:class:`GuardedFetcher`) never block the
reactor (treq), never follow redirects, have an overall deadline and a size cap, and
refuse to connect to loopback, private, link-local or otherwise non-global addresses
(checked on the address actually connected to, so DNS cannot steer us inside) unless
``allow_private`` is set for tests. Certificates are cached per URL (bounded, least
recently used first out); concurrent requests for one URL share one fetch.

``UnsubscribeURL``, ``MessageAttributes`` and ``SigningCertURL`` are not covered by the
signature: nothing here trusts them beyond the checks above.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
import socket
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import treq
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

log = logging.getLogger(__name__)

NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"

#: The fields each message type signs, in AWS's (byte-sorted) order. Subject is signed
#: only when the message has one.
SIGNED_FIELDS: dict[str, tuple[str, ...]] = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION_CONFIRMATION: ("Message", "MessageId", "SubscribeURL", "Timestamp",
                                "Token", "TopicArn", "Type"),
    UNSUBSCRIBE_CONFIRMATION: ("Message", "MessageId", "SubscribeURL", "Timestamp",
                               "Token", "TopicArn", "Type"),
}
_OPTIONAL = frozenset({"Subject"})
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}

DEFAULT_HOST_PATTERN = r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$"
_CERT_PATH = re.compile(r"/SimpleNotificationService-[A-Za-z0-9_-]{1,128}\.pem")
MAX_CERT_BYTES = 64 * 1024
MAX_CONFIRM_BYTES = 64 * 1024
#: How far a Timestamp may lie in the future (clock skew between AWS and us).
FUTURE_SKEW_S = 300.0
CACHE_SIZE = 32
PARALLEL_FETCHES = 4
#: Fetches allowed to wait for a slot; beyond that a message is answered 503.
MAX_WAITING_FETCHES = 64


class SNSRejected(Exception):
    """A message we refuse: ``status`` (400 malformed, 403 untrusted, 503 try again) and
    a stable ``type`` for the JSON error body."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


class FetchRefused(Exception):
    """A URL or an address we will not fetch from (a policy decision, not an outage)."""


class FetchFailed(Exception):
    """The fetch was allowed but did not produce a usable answer."""


class FetchBusy(Exception):
    """Too many fetches are waiting already (a flood of unknown certificate URLs)."""


def _invalid(message: str) -> SNSRejected:
    return SNSRejected(400, "invalid_sns_message", message)


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """AWS's canonical string: for each signed field of the message's type, in order,
    ``name\\nvalue\\n`` (Subject only when present)."""
    fields = SIGNED_FIELDS.get(str(message.get("Type")))
    if fields is None:
        raise _invalid("Type must be Notification, SubscriptionConfirmation or "
                       "UnsubscribeConfirmation.")
    parts: list[str] = []
    for name in fields:
        value = message.get(name)
        if value is None and name in _OPTIONAL:
            continue
        if not isinstance(value, str):
            raise _invalid(f"{name} is missing or not a string.")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


def parse_timestamp(text: str) -> datetime:
    """SNS's ISO 8601 time (``2012-04-26T20:45:04.751Z``), as an aware datetime."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _invalid("Timestamp is not an ISO 8601 time.") from None
    if when.tzinfo is None:
        raise _invalid("Timestamp has no time zone.")
    return when


@dataclass(frozen=True)
class SNSPolicy:
    """What the configuration allows."""

    topic_arns: frozenset[str]
    host_pattern: re.Pattern[str]
    max_age_s: float = 3600.0

    def check_url(self, url: str, what: str, *, certificate: bool = False) -> None:
        """FetchRefused unless ``url`` is https on an allowed host (and, for a signing
        certificate, SNS's certificate path)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise FetchRefused(f"{what} is not a URL") from None
        host = parts.hostname or ""
        if parts.scheme != "https":
            raise FetchRefused(f"{what} must be https")
        if parts.username is not None or parts.password is not None or not host:
            raise FetchRefused(f"{what} has no usable host")
        if not self.host_pattern.fullmatch(host):
            raise FetchRefused(f"{what} host {host!r} is not an allowed SNS host")
        if port is not None and not 0 < port < 65536:
            raise FetchRefused(f"{what} has a bad port")
        if certificate and (not _CERT_PATH.fullmatch(parts.path) or parts.query):
            raise FetchRefused(f"{what} is not an SNS certificate path")


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """Resolves the host (in a thread), refuses non-public addresses, then connects TLS
    to the checked address with the host name for SNI and certificate verification."""

    def __init__(self, owner: _GuardedEndpoints, host: str, port: int) -> None:
        self._owner = owner
        self._host = host
        self._port = port

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: Any) -> Any:
        owner = self._owner
        reactor = owner.reactor
        try:
            infos = await deferToThreadPool(reactor, reactor.getThreadPool(),
                                            socket.getaddrinfo, self._host, self._port,
                                            0, socket.SOCK_STREAM)
        except OSError as exc:
            raise FetchFailed(f"cannot resolve {self._host}: {exc}") from None
        addresses = [str(info[4][0]) for info in infos]
        if not addresses:
            raise FetchFailed(f"{self._host} has no address")
        if not owner.allow_private and not all(_is_public(a) for a in addresses):
            raise FetchRefused(f"{self._host} resolves to a non-public address")
        address = addresses[0]
        tcp_endpoint = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        tcp = tcp_endpoint(reactor, address, self._port, timeout=owner.connect_timeout_s)
        tls = wrapClientTLS(optionsForClientTLS(self._host, trustRoot=owner.trust_root), tcp)
        return await tls.connect(factory)


@implementer(IAgentEndpointFactory)
class _GuardedEndpoints:
    def __init__(self, reactor: Any, trust_root: Any, allow_private: bool,
                 connect_timeout_s: float) -> None:
        self.reactor = reactor
        self.trust_root = trust_root
        self.allow_private = allow_private
        self.connect_timeout_s = connect_timeout_s

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise FetchRefused("only https is fetched")
        return _GuardedEndpoint(self, uri.host.decode("ascii"), uri.port)


def load_trust_root(ca_file: str) -> Any:
    """The trust roots for SNS fetches: the CAs in ``ca_file``, or the system's."""
    if not ca_file:
        return platformTrust()
    from twisted.internet.ssl import Certificate

    with open(ca_file, "rb") as f:
        pem = f.read()
    certs = [Certificate.loadPEM(block) for block in re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)]
    if not certs:
        raise ValueError(f"no certificate in {ca_file}")
    return trustRootFromCertificates(certs)


class GuardedFetcher:
    """HTTPS GETs to hosts the policy allows (see the module doc)."""

    def __init__(self, reactor: Any, *, trust_root: Any, allow_private: bool = False,
                 timeout_s: float = 10.0) -> None:
        self._reactor = reactor
        self._timeout_s = timeout_s
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(
            reactor, _GuardedEndpoints(reactor, trust_root, allow_private, timeout_s),
            pool=pool)
        self._client = treq.client.HTTPClient(agent)

    def get(self, url: str, max_bytes: int) -> defer.Deferred[bytes]:
        """The body of a 200 answer, within the deadline and ``max_bytes``."""
        d = defer.Deferred.fromCoroutine(self._get(url, max_bytes))
        d.addTimeout(self._timeout_s, self._reactor)
        return d

    async def _get(self, url: str, max_bytes: int) -> bytes:
        response = await self._client.get(url, allow_redirects=False,
                                          headers=Headers({b"User-Agent": [b"AgentPost-SNS"]}))
        if response.code != 200:
            await _discard(response)
            raise FetchFailed(f"HTTP {response.code}")
        length = response.length
        if isinstance(length, int) and length > max_bytes:
            await _discard(response)
            raise FetchFailed("answer too large")
        chunks: list[bytes] = []
        total = 0

        def collect(data: bytes) -> None:
            nonlocal total
            total += len(data)
            if total > max_bytes:
                raise FetchFailed("answer too large")
            chunks.append(data)

        await treq.collect(response, collect)
        return b"".join(chunks)


async def _discard(response: Any) -> None:
    try:
        await treq.collect(response, lambda data: None)
    except Exception:  # the answer is refused anyway
        return


def _tls_refused(exc: BaseException) -> bool:
    """Whether a fetch failed because the host's TLS certificate was not trusted (a
    refusal, not an outage); Agent wraps the TLS error in a list of failures."""
    from OpenSSL.SSL import Error as TLSError

    reasons = getattr(exc, "reasons", None) or []
    return isinstance(exc, TLSError) or any(
        getattr(r, "check", lambda *_: None)(TLSError) is not None for r in reasons)


class CertificateCache:
    """Signing certificates by URL: bounded, shared fetches, validity checked per use."""

    def __init__(self, fetcher: GuardedFetcher, size: int = CACHE_SIZE) -> None:
        self._fetcher = fetcher
        self._size = size
        self._certs: OrderedDict[str, x509.Certificate] = OrderedDict()
        self._pending: dict[str, list[defer.Deferred[x509.Certificate]]] = {}
        self._slots = defer.DeferredSemaphore(PARALLEL_FETCHES)
        self.fetches = 0

    async def certificate(self, url: str) -> x509.Certificate:
        """The certificate at ``url`` (fetched once, then from the cache)."""
        cert = self._certs.get(url)
        if cert is not None:
            self._certs.move_to_end(url)
            return cert
        waiters = self._pending.get(url)
        if waiters is not None:
            waiter: defer.Deferred[x509.Certificate] = defer.Deferred()
            waiters.append(waiter)
            return await waiter
        if len(self._slots.waiting) >= MAX_WAITING_FETCHES:
            raise FetchBusy("too many certificate fetches waiting")
        self._pending[url] = []
        try:
            cert = await self._slots.run(self._fetch, url)
        except Exception as exc:
            for waiter in self._pending.pop(url):
                waiter.errback(exc)
            raise
        self._certs[url] = cert
        while len(self._certs) > self._size:
            self._certs.popitem(last=False)
        for waiter in self._pending.pop(url):
            waiter.callback(cert)
        return cert

    async def _fetch(self, url: str) -> x509.Certificate:
        self.fetches += 1
        pem = await self._fetcher.get(url, MAX_CERT_BYTES)
        try:
            return x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise FetchFailed("not a PEM certificate") from None


class SNSVerifier:
    """Checks a parsed SNS message (see the module doc); raises SNSRejected."""

    def __init__(self, policy: SNSPolicy, certificates: CertificateCache,
                 clock: IReactorTime) -> None:
        self.policy = policy
        self._certificates = certificates
        self._clock = clock

    def _check_fresh(self, message: Mapping[str, Any]) -> None:
        when = parse_timestamp(str(message.get("Timestamp", "")))
        age = self._clock.seconds() - when.timestamp()
        if age > self.policy.max_age_s or age < -FUTURE_SKEW_S:
            raise SNSRejected(403, "sns_stale_message",
                              "The message's Timestamp is outside the accepted window.")

    def _check_urls(self, message: Mapping[str, Any]) -> None:
        try:
            self.policy.check_url(str(message.get("SigningCertURL", "")), "SigningCertURL",
                                  certificate=True)
            if message["Type"] != NOTIFICATION:
                self.policy.check_url(str(message.get("SubscribeURL", "")), "SubscribeURL")
        except FetchRefused as exc:
            raise SNSRejected(403, "sns_url_not_allowed", str(exc)) from None

    async def verify(self, message: Mapping[str, Any]) -> None:
        """Return when the message is authentic, fresh and for an allowed topic."""
        signed = string_to_sign(message)  # also checks Type and the signed fields
        version = message.get("SignatureVersion")
        algorithm = _HASHES.get(version) if isinstance(version, str) else None
        if algorithm is None:
            raise _invalid("SignatureVersion must be \"1\" or \"2\".")
        if message["TopicArn"] not in self.policy.topic_arns:
            raise SNSRejected(403, "sns_topic_not_allowed", "This topic is not accepted here.")
        self._check_fresh(message)
        self._check_urls(message)
        try:
            signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
        except (binascii.Error, ValueError):
            raise _invalid("Signature is not base64.") from None
        cert = await self._certificate(str(message["SigningCertURL"]))
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SNSRejected(403, "sns_bad_certificate", "The signing key is not RSA.")
        try:
            key.verify(signature, signed, padding.PKCS1v15(), algorithm())
        except InvalidSignature:
            raise SNSRejected(403, "sns_bad_signature",
                              "The message's signature does not verify.") from None

    async def _certificate(self, url: str) -> x509.Certificate:
        try:
            cert = await self._certificates.certificate(url)
        except FetchRefused as exc:
            raise SNSRejected(403, "sns_url_not_allowed", str(exc)) from None
        except FetchFailed as exc:
            raise SNSRejected(403, "sns_certificate_unavailable",
                              f"The signing certificate could not be used: {exc}") from None
        except Exception as exc:  # timeouts, TLS failures, refused connections
            log.warning("SNS signing certificate %s: %s", url, exc)
            if _tls_refused(exc):
                raise SNSRejected(403, "sns_certificate_unavailable",
                                  "The certificate host is not trusted.") from None
            raise SNSRejected(503, "sns_certificate_unavailable",
                              "The signing certificate could not be fetched; try later.") \
                from None
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SNSRejected(403, "sns_bad_certificate",
                              "The signing certificate is not valid now.")
        return cert
