"""Cursor pagination. Ids are ULIDs, so "older than this id" is a stable cursor."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from agentpost.model.errors import InvalidRequest

_CURSOR_ID = re.compile(r"[A-Za-z0-9_]+")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def parse_limit(raw: str | None) -> int:
    """Validate ``limit`` (1..100)."""
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    # ASCII digits only, and few of them: str.isdigit() also accepts '²' (int() refuses
    # it) and int() refuses strings of over 4,300 digits; both used to answer 500.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3) or not 1 <= int(raw) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.", field="limit")
    return int(raw)


def decode_token(token: str | None) -> str | None:
    """The id a page token continues after."""
    if not token:
        return None
    try:
        value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("page_token is not valid.", field="page_token") from None
    # The id goes back to PostgreSQL as a bound: an id's characters only (no NUL).
    if not value.startswith("c1:") or len(value) > 64 or not _CURSOR_ID.fullmatch(value[3:]):
        raise InvalidRequest("page_token is not valid.", field="page_token")
    return value[3:]


#: base64's standard alphabet to its URL-safe one (what base64.urlsafe_b64encode does).
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def encode_token(last_id: str) -> str:
    """An opaque token for the page after ``last_id`` (URL-safe base64 of ``c1:<id>``
    without padding; binascii directly, as base64.urlsafe_b64encode does in three more
    Python calls: every full page of a list writes one)."""
    raw = binascii.b2a_base64(b"c1:" + last_id.encode("ascii"), newline=False)
    return raw.translate(_URLSAFE).rstrip(b"=").decode("ascii")


def page(rows: list[Any], limit: int, key: str = "id") -> tuple[list[Any], str | None]:
    """Split a ``limit + 1`` fetch into the page and the next token."""
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_token(rows[-1][key])
    return rows, None
