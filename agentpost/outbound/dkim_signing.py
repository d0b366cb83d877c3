"""DKIM signing of mail that leaves through the smarthost (SES signs its own, Easy DKIM).

The message is signed right before hand-off, after every change the transport makes
to it (8-bit conversion), so the signature covers the bytes the smarthost receives.
The key is the organization's own for the domain of the ``From:`` address (DMARC
alignment); no key, no signature (a shared domain, or a domain not set up for it).

* Signed header fields: :data:`SIGNED_HEADERS` that the message has, with ``From``
  signed once more than it occurs (oversigning: a second From cannot be added).
* Canonicalization relaxed/relaxed, which survives the refolding relays do.
* Signing is CPU work (RSA-2048): it runs in the reactor's thread pool.
* Keys come through :class:`DkimKeys` (agentpost.core.domains opens the sealed key);
  the parsed key, or its absence, is cached per (organization, domain) for
  ``cache_ttl_s`` on the injected clock, so a burst of mail costs one look-up.
"""

from __future__ import annotations

import base64
import logging
from collections import OrderedDict
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, Protocol

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool

log = logging.getLogger(__name__)

#: Header fields signed when present (RFC 6376 §5.4.1's recommendations).
SIGNED_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version",
                  "Content-Type", "In-Reply-To", "References", "Reply-To")
DEFAULT_CACHE_TTL_S = 300.0
MAX_CACHED = 1024


class KeyMaterial(Protocol):
    """What a key source gives (agentpost.core.domains.DkimKey has these)."""

    @property
    def selector(self) -> str: ...

    @property
    def algorithm(self) -> str: ...  # "rsa" / "rsa-sha256" or "ed25519" / "ed25519-sha256"

    @property
    def private_key_pem(self) -> bytes: ...


class DkimKeys(Protocol):
    """The key for mail from ``domain`` sent by ``org_id``, or None."""

    async def __call__(self, org_id: str, domain: str) -> KeyMaterial | None: ...


class DkimKeyError(Exception):
    """A stored key that cannot sign (wrong type for its algorithm, unparseable)."""


@dataclass(frozen=True)
class SigningKey:
    """A key ready for dkimpy: the algorithm's name and the private key in the form
    dkimpy takes (PEM for RSA, base64 of the 32-byte seed for Ed25519)."""

    selector: bytes
    algorithm: bytes
    private: bytes = b""

    def __repr__(self) -> str:  # never print key material
        return f"SigningKey(selector={self.selector!r}, algorithm={self.algorithm!r})"


def prepare_key(material: KeyMaterial) -> SigningKey:
    """Parse and check a key once (cached by the signer)."""
    pem = material.private_key_pem
    pem = pem.encode("ascii") if isinstance(pem, str) else bytes(pem)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimKeyError(f"unreadable DKIM private key: {type(exc).__name__}") from None
    algorithm = material.algorithm.lower()
    selector = material.selector.encode("ascii")
    if algorithm.startswith("ed25519"):
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DkimKeyError("the DKIM key is not an Ed25519 key")
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        return SigningKey(selector, b"ed25519-sha256", base64.b64encode(raw))
    if algorithm.startswith("rsa"):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError("the DKIM key is not an RSA key")
        return SigningKey(selector, b"rsa-sha256", pem)
    raise DkimKeyError(f"unknown DKIM algorithm {material.algorithm!r}")


def header_of(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[:end + 2]


def from_domain(raw: bytes) -> str | None:
    """The domain of the (first) ``From:`` address, lowercased; None without one."""
    fields = BytesHeaderParser(policy=compat32).parsebytes(header_of(raw) + b"\r\n")
    value = fields.get("From")
    if value is None:
        return None
    for _, address in getaddresses([str(value)]):
        if "@" in address:
            return address.rpartition("@")[2].strip().rstrip(">").lower() or None
    return None


def sign_message(raw: bytes, domain: str, key: SigningKey) -> bytes:
    """The DKIM-Signature field (ending in CRLF) for ``raw``; pure CPU, no I/O."""
    fields = BytesHeaderParser(policy=compat32).parsebytes(header_of(raw) + b"\r\n")
    present = {name.lower() for name in fields.keys()}
    include = [h.lower().encode("ascii") for h in SIGNED_HEADERS if h.lower() in present]
    include.append(b"from")  # oversign From
    signature: bytes = dkim.sign(
        raw, key.selector, domain.encode("idna"), key.private,
        signature_algorithm=key.algorithm, canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include, linesep=b"\r\n")
    return signature


class DkimSigner:
    """Signs outgoing messages with their organization's key for the From domain."""

    def __init__(self, keys: DkimKeys, clock: IReactorTime, reactor: Any,
                 cache_ttl_s: float = DEFAULT_CACHE_TTL_S) -> None:
        self._keys = keys
        self._clock = clock
        self._reactor = reactor
        self._ttl = cache_ttl_s
        self._cache: OrderedDict[tuple[str, str], tuple[float, SigningKey | None]] = \
            OrderedDict()

    async def key(self, org_id: str, domain: str) -> SigningKey | None:
        """The prepared key, from the cache while it is fresh."""
        now = self._clock.seconds()
        cached = self._cache.get((org_id, domain))
        if cached is not None and cached[0] > now:
            return cached[1]
        material = await self._keys(org_id, domain)
        key = prepare_key(material) if material is not None else None
        self._cache[(org_id, domain)] = (now + self._ttl, key)
        self._cache.move_to_end((org_id, domain))
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return key

    async def sign(self, org_id: str, raw: bytes) -> bytes:
        """``raw`` with a DKIM-Signature prepended, or ``raw`` itself when the From
        domain has no key of this organization. Raises DkimKeyError for a broken key
        (the transport defers: unsigned mail from a DMARC domain would be refused)."""
        domain = from_domain(raw)
        if domain is None:
            return raw
        key = await self.key(org_id, domain)
        if key is None:
            return raw
        try:
            header: bytes = await deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), sign_message, raw, domain, key)
        except dkim.DKIMException as exc:
            raise DkimKeyError(f"DKIM signing failed: {exc}") from None
        return header + raw


def database_keys(db: Any, sealer: Any) -> DkimKeys:
    """Keys from agentpost.core.domains (the organization's own key for the domain,
    opened with the installation's master key)."""
    from agentpost.core.domains import dkim_key_for

    async def lookup(org_id: str, domain: str) -> KeyMaterial | None:
        key: KeyMaterial | None = await dkim_key_for(db, org_id, domain, sealer=sealer)
        return key

    return lookup
