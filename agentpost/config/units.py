"""Durations and sizes always carry their unit, so `timeout = 30` can never be misread."""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*$")


def parse_duration(text: str) -> float:
    """Return seconds for strings such as ``"90d"``, ``"15m"``, ``"250ms"``."""
    if not isinstance(text, str):
        raise ValueError("a duration is a string with a unit, such as \"30s\" or \"90d\"")
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration; use a number and one of ms, s, m, h, d, w")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    """Return bytes for strings such as ``"10MiB"`` or ``"512KB"``."""
    if not isinstance(text, str):
        raise ValueError("a size is a string with a unit, such as \"10MiB\"")
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size; use a number and one of B, KB, MB, GB, KiB, MiB, GiB"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_duration(seconds: float) -> str:
    """Render seconds back with the largest unit that divides them exactly."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"


def format_size(size: int) -> str:
    """Render bytes with the largest binary unit that divides them exactly."""
    for unit in ("GiB", "MiB", "KiB"):
        if size >= _SIZE_UNITS[unit] and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"
