"""Make decoded header text safe to index, to return as JSON and to put in a header.

Why: RFC 2047 encoded words and RFC 2231 parameters can decode to *anything*: a
``Subject: =?UTF-8?B?...?=`` may carry CR LF (a header injection for whoever copies it
into a reply or a log), a NUL (which PostgreSQL text refuses), or an attachment name of
``../../../../tmp/pwned.txt`` (a path traversal for whoever saves it under its name).
The raw message is kept byte-exact in the blob store; only the derived, indexed values
pass through here.

Everything is linear in the input: no regex can backtrack on a long run of spaces.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

# C0 controls (NUL is dropped separately), DEL, C1 controls and the Unicode line and
# paragraph separators: whatever some consumer would treat as a line break or a control.
_CONTROLS_RE = re.compile("[\x01-\x1f\x7f-\x9f\u2028\u2029]+")
# Bidirectional overrides and isolates: "invoice\u202efdp.exe" displays as "invoiceexe.pdf".
_BIDI_RE = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SEPARATORS_RE = re.compile(r"[/\\]")
MAX_FILENAME_CHARS = 255


def header_text(value: str) -> str:
    """A decoded header value on one line: NULs dropped, every run of control
    characters (CR, LF, TAB, ...) with the blanks around it turned into one space, lone
    surrogates replaced, ends stripped."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    value = value.encode("utf-8", "replace").decode("utf-8")
    pieces = _CONTROLS_RE.split(value)
    if len(pieces) == 1:
        return value.strip(" ")
    # Each piece's ends touch a control run or an end of the value: trim them there only,
    # so spacing inside a piece is kept as the sender wrote it.
    return " ".join(word for word in (piece.strip(" ") for piece in pieces) if word)


def safe_filename(name: str) -> str:
    """The last path component of ``name``, safe to save under: no ``/`` or ``\\``, no
    ``.``/``..`` component, no controls or bidi overrides, no leading dots (hidden
    files), at most 255 characters. Unicode letters are kept. "" when nothing is left."""
    text = _BIDI_RE.sub("", header_text(name))
    components = [c.strip(" ") for c in _SEPARATORS_RE.split(text)]
    components = [c for c in components if c and c not in (".", "..")]
    if not components:
        return ""
    base = components[-1].lstrip(". ")
    return base[:MAX_FILENAME_CHARS].rstrip(" ")


def ascii_fallback(name: str) -> str:
    """An ASCII stand-in for ``name`` inside a quoted-string (RFC 6266 ``filename=``):
    printable ASCII except ``"`` and ``\\``, everything else ``_``."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)


_MIME_TYPE_RE = re.compile(r"^[a-z0-9!#$&^_.+-]{1,127}/[a-z0-9!#$&^_.+-]{1,127}\Z")


def safe_mime_type(value: str) -> str:
    """``type/subtype`` as RFC 6838 restricts them, else ``application/octet-stream``:
    the value is served back as a download's Content-Type."""
    value = value.strip().lower()
    return value if _MIME_TYPE_RE.match(value) else "application/octet-stream"


#: PostgreSQL refuses a time-zone displacement beyond 15:59 (the whole insert fails).
_MAX_OFFSET = timedelta(hours=15, minutes=59)


def storable_date(when: datetime) -> datetime:
    """``when`` as PostgreSQL stores and psycopg2 reads it back: an offset beyond 15:59
    becomes UTC (same instant), and an instant outside years 1-9999 in UTC raises
    (``31 Dec 9999 23:59 -1500`` was stored as year 10000, which no read could load)."""
    in_utc = when.astimezone(UTC)  # OverflowError outside datetime's range
    offset = when.utcoffset()
    if offset is not None and abs(offset) > _MAX_OFFSET:
        return in_utc
    return when
