"""Prefixed ULIDs: sortable by creation time, unguessable, and self-describing."""

from __future__ import annotations

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


#: Every pair of Crockford characters, indexed by the 10 bits they spell.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
#: (milliseconds, their 10 characters): ids made in the same millisecond share them.
_last_ms: tuple[int, str] = (-1, "")


def new_id(prefix: str, now_ms: int | None = None) -> str:
    """A fresh ``prefix_ULID``: 48 bits of milliseconds then 80 random bits.

    The 130-bit ULID is 26 characters of 5 bits: 10 for the time (2 leading zero bits),
    16 for the random part. Each is spelled two characters (10 bits) at a time from a
    table; base64.b32encode, pure Python before 3.13, took 2-3 times as long, and every
    API request makes two ids (issue 12)."""
    global _last_ms
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    ms = (int(time.time() * 1000) if now_ms is None else now_ms) & 0xFFFFFFFFFFFF
    last = _last_ms
    if last[0] == ms:
        head = last[1]
    else:
        pairs = _PAIRS
        head = "".join([pairs[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0)])
        _last_ms = (ms, head)
    r = int.from_bytes(_random_bytes(10), "big")
    p = _PAIRS
    return "".join((prefix, "_", head, p[r >> 70], p[(r >> 60) & 1023], p[(r >> 50) & 1023],
                    p[(r >> 40) & 1023], p[(r >> 30) & 1023], p[(r >> 20) & 1023],
                    p[(r >> 10) & 1023], p[r & 1023]))


def is_id(value: object, prefix: str) -> bool:
    """True when ``value`` is syntactically an id of the given kind."""
    if not isinstance(value, str):
        return False
    match = _ID_RE.match(value)
    return match is not None and match.group(1) == prefix
