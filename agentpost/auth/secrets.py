"""Key material: generation, digests and display prefixes.

Keys carry 32 random bytes; only their SHA-256 is stored. A fast digest is right
here (unlike passwords) because the secret is high-entropy: there is nothing to
brute-force, and the lookup must be cheap on every request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

API_KEY_PREFIX = "ap_sk_"
ADMIN_KEY_PREFIX = "ap_admin_"
_RANDOM_BYTES = 32
_DISPLAY_CHARS = 6


@dataclass(frozen=True)
class NewSecret:
    """A freshly minted secret: shown once, then only its digest survives."""

    plaintext: str
    digest: bytes
    display_prefix: str


def _mint(prefix: str) -> NewSecret:
    body = secrets.token_urlsafe(_RANDOM_BYTES)
    plaintext = prefix + body
    return NewSecret(plaintext, digest(plaintext), prefix + body[:_DISPLAY_CHARS])


def new_api_key() -> NewSecret:
    """An organization API key (``ap_sk_…``)."""
    return _mint(API_KEY_PREFIX)


def new_admin_key() -> NewSecret:
    """An installation admin key (``ap_admin_…``), never valid on /api/v1."""
    return _mint(ADMIN_KEY_PREFIX)


def digest(plaintext: str) -> bytes:
    """SHA-256 of a presented secret."""
    return hashlib.sha256(plaintext.encode("utf-8")).digest()


def looks_like_api_key(value: str) -> bool:
    """Cheap syntax check before touching the database."""
    return value.startswith(API_KEY_PREFIX) and 30 < len(value) < 200


def looks_like_admin_key(value: str) -> bool:
    """Cheap syntax check before touching the database."""
    return value.startswith(ADMIN_KEY_PREFIX) and 30 < len(value) < 200
