"""Sealing small secrets for storage: AES-256-GCM under a master key kept outside the
database (``[secrets] key_file``).

Why: a database dump, a replica or a backup must not be enough to sign mail as a
customer's domain (DKIM private keys) or to log in to an identity provider (OIDC client
secrets, later). The master key lives in a file only the service reads.

A sealed value is ``b"\\x01" | key id (4 bytes) | nonce (12 bytes) | ciphertext+tag``:

* the **key id** (the first 4 bytes of SHA-256 of the key) names the master key that
  sealed it, so a key file can hold the current key first and older ones after it:
  rotation is "add a new first line, re-seal at leisure, drop the old line";
* the **nonce** is 96 random bits per seal (AES-GCM's limit of about 2**32 seals per
  key with random nonces is far beyond the number of secrets we keep);
* the **associated data** binds the value to where it belongs (for a DKIM key: the
  organization id and the domain id, see :func:`context`). A row copied into another
  tenant's row, or onto another domain, does not open. The header (version and key id)
  is authenticated too.

Anything wrong -- unknown key id, altered byte, wrong context, truncated value --
raises :class:`SealingError` and never returns partial plaintext.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = b"\x01"
KEY_BYTES = 32
KEY_ID_BYTES = 4
NONCE_BYTES = 12
_HEADER = len(VERSION) + KEY_ID_BYTES


class SealingError(Exception):
    """A sealed value cannot be opened (tampered, wrong context or unknown key), or the
    master key material is unusable."""


def key_id(key: bytes) -> bytes:
    """The 4-byte id of a master key (stored in every value it seals)."""
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def context(*parts: str) -> bytes:
    """Associated data from several fields, length-prefixed so that no two different
    tuples encode alike (``("ab", "c")`` is not ``("a", "bc")``)."""
    out = bytearray()
    for part in parts:
        raw = part.encode("utf-8")
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


class Sealer:
    """Seals with the first (current) master key; opens with any key it holds."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise SealingError("no master key")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise SealingError(f"a master key must be {KEY_BYTES} bytes")
        self._current = keys[0]
        self._current_id = key_id(keys[0])
        self._by_id = {key_id(k): AESGCM(k) for k in reversed(keys)}
        self._by_id[self._current_id] = AESGCM(self._current)

    @property
    def current_key_id(self) -> str:
        """Hex id of the key new values are sealed with (for logs and checks)."""
        return self._current_id.hex()

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` for the place ``associated_data`` names."""
        header = VERSION + self._current_id
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._by_id[self._current_id].encrypt(nonce, plaintext,
                                                       header + associated_data)
        return header + nonce + sealed

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        """The plaintext, or SealingError."""
        sealed = bytes(sealed)
        if len(sealed) < _HEADER + NONCE_BYTES + 16 or sealed[:1] != VERSION:
            raise SealingError("not a sealed value")
        header = sealed[:_HEADER]
        aead = self._by_id.get(header[1:])
        if aead is None:
            raise SealingError(f"sealed with an unknown master key {header[1:].hex()}")
        nonce = sealed[_HEADER:_HEADER + NONCE_BYTES]
        try:
            return aead.decrypt(nonce, sealed[_HEADER + NONCE_BYTES:], header + associated_data)
        except InvalidTag:
            raise SealingError("the sealed value was altered or belongs elsewhere") from None


def parse_key_file(text: str) -> list[bytes]:
    """Master keys from a key file: one base64 key per line, the current key first;
    blank lines and ``#`` comments are ignored."""
    keys: list[bytes] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except ValueError:
            raise SealingError(f"line {number} is not base64") from None
        if len(key) != KEY_BYTES:
            raise SealingError(f"line {number} is not a {KEY_BYTES}-byte key")
        keys.append(key)
    if not keys:
        raise SealingError("the key file holds no key")
    return keys


def load_sealer(path: str | os.PathLike[str]) -> Sealer:
    """The Sealer for a key file (SealingError if it is missing or malformed)."""
    try:
        text = Path(path).read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SealingError(f"cannot read the key file {path}: {exc}") from None
    return Sealer(parse_key_file(text))


def generate_key_file(path: str | os.PathLike[str]) -> bool:
    """Create a key file with one fresh key (mode 0600) unless it exists; True if made.

    For development set-ups (``make run``): production keys are made by the operator
    (``head -c 32 /dev/urandom | base64``) and backed up apart from the database --
    without the key, sealed secrets are gone."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write("# AgentPost master key (AES-256-GCM); first line seals. Keep secret.\n")
        handle.write(line + "\n")
    return True


def secrets_problem(key_file: str, *, production: bool, needed: bool) -> str | None:
    """Why the ``[secrets]`` configuration cannot work, or None. ``needed``: this
    installation seals secrets (our own DKIM keys sign what a smarthost relays; SES
    signs for itself, and the log transport sends nothing)."""
    if not key_file:
        if production and needed:
            return ("secrets.key_file: not set, but DKIM private keys must be sealed "
                    "for the configured outbound transport")
        return None
    try:
        load_sealer(key_file)
    except SealingError as exc:
        return f"secrets.key_file: {exc}"
    return None
