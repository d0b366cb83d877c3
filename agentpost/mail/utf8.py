"""Whether bytes are UTF-8: asked of every outbound message (does it need 8BITMIME or
SMTPUTF8) and of every message kept in PostgreSQL (can its bytes travel and come back
as text). ASCII, nearly all mail, answers at memory speed."""

from __future__ import annotations


def is_utf8(data: bytes | bytearray) -> bool:
    """True for 7-bit ASCII and for valid UTF-8 (Python's strict decoder refuses
    surrogates and overlong forms, as PostgreSQL does)."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
