"""Server-side TLS settings shared by every listener (HTTPS now; SMTP and IMAP later)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer


def server_tls_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """TLS 1.2+ with the leaf and any intermediates from a PEM chain file."""
    chain_pem = Path(cert_path).read_bytes()
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, Path(key_path).read_bytes())
    certs = [
        crypto.load_certificate(crypto.FILETYPE_PEM, block + b"-----END CERTIFICATE-----\n")
        for block in chain_pem.split(b"-----END CERTIFICATE-----")
        if b"-----BEGIN CERTIFICATE-----" in block
    ]
    if not certs:
        raise ValueError(f"no certificate found in {cert_path}")
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


@implementer(IOpenSSLContextFactory)
class ReloadableServerTLS:
    """Server TLS settings that ``reload()`` re-reads from disk (SIGHUP).

    Listeners and STARTTLS take this object where they took CertificateOptions:
    Twisted asks it for a context on every new handshake, so after a reload new
    connections use the new files while open ones keep theirs.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._options = server_tls_options(cert_path, key_path)

    def reload(self) -> None:
        """Read the files again; if they are unusable, raise and keep the current ones."""
        self._options = server_tls_options(self.cert_path, self.key_path)

    def getContext(self) -> Any:
        """The current OpenSSL context (twisted.internet.ssl's context-factory protocol)."""
        return self._options.getContext()
