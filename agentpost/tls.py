"""Server-side TLS settings shared by every listener (SMTP MX, IMAP, IMAPS, HTTPS).

Every listener gets its context from here, so the protocol floor and the cipher list
are decided once. The default is Mozilla's "intermediate" configuration: TLS 1.2 with
ECDHE key exchange and AEAD ciphers only (no CBC-mode suites, whose MAC-then-encrypt
construction gave Lucky13 and friends; no static-RSA key exchange, which has no forward
secrecy), plus TLS 1.3, whose suites are all AEAD and are OpenSSL's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

#: Mozilla's "intermediate" TLS 1.2 suites (server-side guidelines 5.7, without the
#: DHE suites, which would need Diffie-Hellman parameters and no current client needs).
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
#: The protocol floors one may configure; nothing older than TLS 1.2 is offered.
MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class TLSPolicy:
    """Which protocol versions and TLS 1.2 cipher suites every listener accepts."""

    ciphers: str = INTERMEDIATE_CIPHERS
    min_version: str = "TLSv1.2"

    def check(self) -> None:
        """Raise ValueError naming the problem if OpenSSL cannot use this policy.

        Called when the configuration is validated, so a typo in the cipher string is
        a start-up error rather than a listener that fails every handshake."""
        if self.min_version not in MIN_VERSIONS:
            raise ValueError(f"must be one of {', '.join(MIN_VERSIONS)}")
        self.acceptable_ciphers()

    def acceptable_ciphers(self) -> ssl.AcceptableCiphers:
        """The TLS 1.2 suites as Twisted's cipher selection; ValueError if none is known."""
        context = SSL.Context(SSL.TLS_METHOD)
        try:
            context.set_cipher_list(self.ciphers.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError) as exc:
            raise ValueError(f"names no TLS 1.2 cipher suite this OpenSSL supports ({exc})"
                             ) from None
        names = SSL.Connection(context, None).get_cipher_list()
        if not any(not name.startswith("TLS_") for name in names):
            raise ValueError("names no TLS 1.2 cipher suite this OpenSSL supports")
        return ssl.AcceptableCiphers.fromOpenSSLCipherString(self.ciphers)


def server_tls_options(cert_path: str, key_path: str,
                       policy: TLSPolicy | None = None) -> ssl.CertificateOptions:
    """The leaf and any intermediates from a PEM chain file, under ``policy``
    (Mozilla intermediate by default)."""
    policy = policy or TLSPolicy()
    chain_pem = Path(cert_path).read_bytes()
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, Path(key_path).read_bytes())
    certs = [
        crypto.load_certificate(crypto.FILETYPE_PEM, block + b"-----END CERTIFICATE-----\n")
        for block in chain_pem.split(b"-----END CERTIFICATE-----")
        if b"-----BEGIN CERTIFICATE-----" in block
    ]
    if not certs:
        raise ValueError(f"no certificate found in {cert_path}")
    if policy.min_version not in MIN_VERSIONS:
        raise ValueError(f"unknown TLS version {policy.min_version!r}")
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=MIN_VERSIONS[policy.min_version],
        acceptableCiphers=policy.acceptable_ciphers(),
    )


@implementer(IOpenSSLContextFactory)
class ReloadableServerTLS:
    """Server TLS settings that ``reload()`` re-reads from disk (SIGHUP).

    Listeners and STARTTLS take this object where they took CertificateOptions:
    Twisted asks it for a context on every new handshake, so after a reload new
    connections use the new files while open ones keep theirs. The policy (versions,
    ciphers) is fixed for the life of the process.
    """

    def __init__(self, cert_path: str, key_path: str, policy: TLSPolicy | None = None) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.policy = policy or TLSPolicy()
        self._options = server_tls_options(cert_path, key_path, self.policy)

    def reload(self) -> None:
        """Read the files again; if they are unusable, raise and keep the current ones."""
        self._options = server_tls_options(self.cert_path, self.key_path, self.policy)

    def getContext(self) -> Any:
        """The current OpenSSL context (twisted.internet.ssl's context-factory protocol)."""
        return self._options.getContext()
