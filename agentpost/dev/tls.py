"""Local TLS material for ``make run`` and the tests.

AgentPost speaks STARTTLS (SMTP, IMAP), implicit TLS (IMAPS, submission on 465) and
HTTPS/WSS, so a developer needs a certificate that real clients accept without
turning verification off.  We make a small private CA plus a server certificate
signed by it: point a client at ``ca.crt`` (or import it once into a mail client or
browser) and every later server certificate is trusted, because renewing the server
certificate keeps the same CA.

Only :mod:`cryptography` is used, so no ``openssl`` binary is required.  The keys are
unencrypted: this is development material and must never be used in production.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA_COMMON_NAME", "DevTLS", "ensure_dev_tls"]

CA_COMMON_NAME = "AgentPost development CA"

#: 825 days is the longest server-certificate lifetime Apple platforms accept.
SERVER_CERT_VALIDITY = dt.timedelta(days=825)
CA_VALIDITY = dt.timedelta(days=3650)
#: Renew this long before expiry so a long-running dev server does not hit it.
RENEW_BEFORE = dt.timedelta(days=7)
#: Backdate ``notBefore`` to tolerate clocks of VMs/containers that lag the host.
BACKDATE = dt.timedelta(hours=1)

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class DevTLS:
    """Paths of the development TLS files.

    ``cert`` holds only the server certificate (no chain): clients are expected to
    trust ``ca_cert`` directly.  ``key`` is an unencrypted PKCS#8 PEM, mode 0600.
    """

    ca_cert: Path
    cert: Path
    key: Path


def ensure_dev_tls(
    tls_dir: Path,
    hostnames: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
) -> DevTLS:
    """Return usable dev TLS files in *tls_dir*, creating or renewing them as needed.

    Idempotent: existing files are reused while they parse, match each other, are
    valid for more than :data:`RENEW_BEFORE` and cover every requested name and
    address.  A server certificate that fails those checks is reissued from the
    existing CA (so clients that already trust the CA keep working); the CA itself
    is only replaced when it is unusable.  Safe against concurrent callers.
    """
    dns_names, ips = _normalise_names(hostnames, ip_addresses)
    tls_dir = Path(tls_dir).absolute()
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(tls_dir, 0o700)  # private keys live here
    paths = DevTLS(
        ca_cert=tls_dir / "ca.crt",
        cert=tls_dir / "server.crt",
        key=tls_dir / "server.key",
    )
    ca_key_path = tls_dir / "ca.key"
    with _exclusive_lock(tls_dir / ".lock"):
        now = dt.datetime.now(dt.UTC)
        ca = _load_usable_ca(paths.ca_cert, ca_key_path, now)
        if ca is None:
            ca = _make_ca(now)
            _write_key(ca_key_path, ca[1])
            _write_cert(paths.ca_cert, ca[0])
        ca_cert, ca_key = ca
        if not _server_cert_is_usable(paths, ca_cert, dns_names, ips, now):
            cert, key = _make_server_cert(ca_cert, ca_key, dns_names, ips, now)
            _write_key(paths.key, key)
            _write_cert(paths.cert, cert)
    return paths


# --------------------------------------------------------------------------- names


def _normalise_names(
    hostnames: Sequence[str], ip_addresses: Sequence[str]
) -> tuple[list[str], list[_IPAddress]]:
    """Lower-case, IDNA-encode and de-duplicate; an IP given as a hostname counts as an IP."""
    if isinstance(hostnames, str) or isinstance(ip_addresses, str):
        raise TypeError("hostnames and ip_addresses must be sequences of strings, not a string")
    dns_names: list[str] = []
    ips: list[_IPAddress] = []
    for raw in ip_addresses:
        ip = ipaddress.ip_address(raw.strip())
        if ip not in ips:
            ips.append(ip)
    for raw in hostnames:
        name = raw.strip().rstrip(".").lower()
        if not name:
            raise ValueError("empty hostname")
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            if ip not in ips:
                ips.append(ip)
            continue
        if not name.isascii():
            name = name.encode("idna").decode("ascii")
        if name not in dns_names:
            dns_names.append(name)
    if not dns_names and not ips:
        raise ValueError("at least one hostname or IP address is required")
    return dns_names, ips


# --------------------------------------------------------------------------- checks


def _load_usable_ca(
    cert_path: Path, key_path: Path, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The existing CA, or ``None`` if it is missing, broken, mismatched or expiring."""
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if len(certs) != 1 or not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    cert = certs[0]
    if not _key_matches(cert, key) or not _valid_long_enough(cert, now):
        return None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.verify_directly_issued_by(cert)  # self-signed and intact
    except (x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError):
        return None
    if not constraints.ca:
        return None
    return cert, key


def _server_cert_is_usable(
    paths: DevTLS,
    ca_cert: x509.Certificate,
    dns_names: Sequence[str],
    ips: Sequence[_IPAddress],
    now: dt.datetime,
) -> bool:
    """Does the existing server certificate chain to *ca_cert* and cover every name?"""
    try:
        certs = x509.load_pem_x509_certificates(paths.cert.read_bytes())
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if len(certs) != 1:
        return False
    cert = certs[0]
    if not _key_matches(cert, key) or not _valid_long_enough(cert, now):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, InvalidSignature, ValueError, TypeError):
        return False  # any failure just means "reissue"
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        return False
    have_dns = {name.lower() for name in sans.get_values_for_type(x509.DNSName)}
    have_ips = set(sans.get_values_for_type(x509.IPAddress))
    return set(dns_names) <= have_dns and set(ips) <= have_ips


def _key_matches(cert: x509.Certificate, key: object) -> bool:
    public_key = getattr(key, "public_key", None)
    if public_key is None:
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(cert.public_key().public_bytes(der, spki) == public_key().public_bytes(der, spki))


def _valid_long_enough(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_BEFORE


# --------------------------------------------------------------------------- issuing


def _new_key() -> ec.EllipticCurvePrivateKey:
    """P-256: generated in milliseconds and accepted by every current TLS client."""
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AgentPost"),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        # path_length=0: this CA may sign server certificates, never other CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns_names: Sequence[str],
    ips: Sequence[_IPAddress],
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    first = dns_names[0] if dns_names else str(ips[0])
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AgentPost development")]
    if len(first) <= 64:  # the CN length limit; clients use the SANs anyway
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, first))
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ip) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # Never outlive the CA: a chain with an expired root fails anyway.
    not_after = min(now + SERVER_CERT_VALIDITY, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Keep two processes (say, parallel test workers) from issuing at the same time."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file created with *mode* and rename, so no reader sees half a key."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
