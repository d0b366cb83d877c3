"""Server-side TLS settings shared by every listener (HTTPS now; SMTP and IMAP later)."""

from __future__ import annotations

from pathlib import Path

from OpenSSL import crypto
from twisted.internet import ssl


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
