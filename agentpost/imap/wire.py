"""Small renderers for IMAP response text: quoting, flag lists, INTERNALDATE, literals.

Pure functions, shared by every command module, so that one response element is
spelled one way whatever command sends it.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any

from agentpost.mail import imapformat

#: The system flags every mailbox offers (FLAGS and PERMANENTFLAGS at SELECT).
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
#: STATUS data items (RFC 3501, RFC 7162 HIGHESTMODSEQ, RFC 8438 SIZE, RFC 9051 DELETED),
#: also LIST-STATUS's.
STATUS_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "RECENT", "HIGHESTMODSEQ",
                "SIZE", "DELETED")


def quote(text: str) -> str:
    """A quoted string (or a literal when the text needs one)."""
    return imapformat.quote(text)


@functools.lru_cache(maxsize=4096)
def flag_list(flags: frozenset[str], recent: bool) -> str:
    """``(\\Seen \\Recent label)``: flag sets are shared objects (storage.imap.flags_of),
    so a 10,000-message FETCH renders each distinct one once."""
    shown = sorted(flags - {"\\Recent"})
    if recent:
        shown.append("\\Recent")
    return "(" + " ".join(shown) + ")"


def internaldate(value: datetime | None) -> str:
    """INTERNALDATE quoted (RFC 3501 date-time), in the value's own zone: the backend
    hands it over in the zone the APPEND gave (UTC when none, or when naive)."""
    value = value or datetime(1970, 1, 1, tzinfo=UTC)
    offset = value.utcoffset()
    if offset is None:
        value, offset = value.replace(tzinfo=UTC), timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign, minutes = ("-", -minutes) if minutes < 0 else ("+", minutes)
    return (f'"{value.day:02d}-{_MONTHS[value.month - 1]}-{value.year:04d} '
            f'{value.hour:02d}:{value.minute:02d}:{value.second:02d} '
            f'{sign}{minutes // 60:02d}{minutes % 60:02d}"')


def literal(data: bytes) -> bytes:
    """A synchronizing literal: ``{n}`` CRLF and the bytes, with :func:`no_nul`."""
    return b"{%d}\r\n" % len(data) + no_nul(data)


def no_nul(data: bytes) -> bytes:
    """Octets for a ``{n}`` literal: a NUL is sent as 0x80, as Dovecot does.

    Why: a literal is CHAR8, every octet but NUL (RFC 3501 §9, RFC 9051 §9), and a client
    written in C may end a string at one; a stored message may hold NULs all the same.
    The length is kept (RFC822.SIZE, partial ranges); a client that needs the exact
    octets has BINARY, whose literal8 may carry NUL (RFC 3516)."""
    return data.replace(b"\x00", b"\x80")


def no_nul_text(data: bytes) -> bytes:
    """ENVELOPE, BODY and BODYSTRUCTURE text with any NUL from a header sent as ``?``:
    one octet for one, so the literals already framed inside it keep their lengths."""
    return data.replace(b"\x00", b"?")


def status_text(st: Any, items: list[str]) -> str:
    """The parenthesized STATUS data for ``items`` (already checked against STATUS_ITEMS)."""
    values = {"MESSAGES": st.messages, "UIDNEXT": st.uidnext, "UIDVALIDITY": st.uidvalidity,
              "UNSEEN": st.unseen, "RECENT": st.recent,
              "HIGHESTMODSEQ": st.highestmodseq, "SIZE": st.size, "DELETED": st.deleted}
    return " ".join(f"{key} {values[key]}" for key in items)
