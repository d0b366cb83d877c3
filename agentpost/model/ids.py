"""Prefixed ULIDs: sortable by creation time, unguessable, and self-describing."""

from __future__ import annotations

import base64
import os
import re
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
PREFIXES = frozenset(
    {"org", "env", "usr", "inb", "msg", "thr", "drf", "att", "evt", "inv", "key", "adk",
     "dom", "whk", "rul", "aud", "req", "obq",
     "sup", "dlv", "whd"}
)
_ID_RE = re.compile(r"^([a-z]{3})_([0-9A-HJKMNP-TV-Z]{26})\Z")


#: base64's base32 alphabet -> Crockford's: the stdlib encoder (C) spells the ULID.
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())
_RANDOM_CHUNK = 4096
_random = bytearray()
_random_lock = threading.Lock()


def _forget_random() -> None:
    """A forked child must never hand out its parent's unused random bytes (nor wait
    on a lock a parent's thread held at the fork)."""
    global _random_lock
    _random_lock = threading.Lock()
    _random.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_random)


def _random_bytes(n: int) -> bytes:
    """``n`` bytes of os.urandom, taken from a buffer filled a few KiB at a time: one
    getrandom() per ~400 ids instead of one each (a delivery makes five). The lock
    keeps two threads from ever taking the same bytes."""
    with _random_lock:
        if len(_random) < n:
            _random.extend(os.urandom(_RANDOM_CHUNK))
        out = bytes(_random[:n])
        del _random[:n]
    return out


def new_id(prefix: str, now_ms: int | None = None) -> str:
    """A fresh ``prefix_ULID``: 48 bits of milliseconds then 80 random bits.

    The 130-bit ULID is the last 26 characters of the base32 spelling of those 128
    bits in 20 bytes (each character is 5 bits, aligned from the right end)."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    raw = (b"\0\0\0\0" + (ms & 0xFFFFFFFFFFFF).to_bytes(6, "big") + _random_bytes(10))
    return prefix + "_" + base64.b32encode(raw)[6:].translate(_TO_CROCKFORD).decode()


def is_id(value: object, prefix: str) -> bool:
    """True when ``value`` is syntactically an id of the given kind."""
    if not isinstance(value, str):
        return False
    match = _ID_RE.match(value)
    return match is not None and match.group(1) == prefix
