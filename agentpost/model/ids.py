"""Prefixed ULIDs: sortable by creation time, unguessable, and self-describing."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
PREFIXES = frozenset(
    {"org", "env", "usr", "inb", "msg", "thr", "drf", "att", "evt", "inv", "key", "adk",
     "dom", "whk", "rul", "aud", "req", "obq",
     "sup", "dlv", "whd"}
)
_ID_RE = re.compile(r"^([a-z]{3})_([0-9A-HJKMNP-TV-Z]{26})\Z")


def new_id(prefix: str, now_ms: int | None = None) -> str:
    """A fresh ``prefix_ULID``: 48 bits of milliseconds then 80 random bits."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return prefix + "_" + "".join(reversed(chars))


def is_id(value: object, prefix: str) -> bool:
    """True when ``value`` is syntactically an id of the given kind."""
    if not isinstance(value, str):
        return False
    match = _ID_RE.match(value)
    return match is not None and match.group(1) == prefix
