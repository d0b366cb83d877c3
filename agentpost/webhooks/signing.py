"""Webhook secrets and signatures.

Two signature schemes ride on every request, so receivers can use either:

* ours (docs/events.md): ``x-agentpost-timestamp`` (unix seconds) and
  ``x-agentpost-signature``, the hex HMAC-SHA256 of ``"{timestamp}.{raw body}"`` keyed
  with the whole ``whsec_...`` secret string;
* Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id``,
  ``webhook-timestamp`` and ``webhook-signature: v1,<base64>``, the HMAC-SHA256 of
  ``"{id}.{timestamp}.{raw body}"`` keyed with the base64-decoded part after ``whsec_``.

While a rotated-out secret is still valid, both headers carry one signature per secret,
separated by spaces (Standard Webhooks defines that; our header follows it), so a
receiver that still has the old secret keeps verifying.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix, not a secret
SECRET_BYTES = 24


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode("ascii")


def _key(secret: str) -> bytes:
    return base64.b64decode(secret[len(SECRET_PREFIX):])


def agentpost_signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"{timestamp}.{body}"`` keyed with the secret string."""
    return hmac.new(secret.encode("ascii"), f"{timestamp}.".encode() + body,
                    hashlib.sha256).hexdigest()


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` per Standard Webhooks."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signed_headers(secrets: list[str], msg_id: str, timestamp: int,
                   body: bytes) -> dict[str, str]:
    """Every signature header for ``body``, one signature per valid secret (current
    first)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(standard_signature(s, msg_id, timestamp, body)
                                      for s in secrets),
        "x-agentpost-timestamp": str(timestamp),
        "x-agentpost-signature": " ".join(agentpost_signature(s, timestamp, body)
                                          for s in secrets),
    }
