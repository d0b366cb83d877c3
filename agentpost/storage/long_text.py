"""The wide values of a delivery's write, sent to PostgreSQL as cheaply as they can be.

Two of them, each a marker type with its own psycopg2 adapter: a body quoted with one
``str.replace`` (:class:`LongText`, below), and a message's raw bytes as a text literal
rather than hex (:class:`LongBytes`).

Message bodies quoted into SQL with one ``str.replace`` instead of psycopg2's escaping.

Why: psycopg2 quotes a ``str`` parameter with libpq's ``PQescapeStringConn``, which walks
the text a character at a time checking multibyte sequences, then copies the result
into a new literal: ~120 us of the MX's reactor thread for a 100 KiB body (measured with
``cursor.mogrify`` against PostgreSQL 15), the largest part of the 100 KiB delivery's
``Cursor.execute`` bar in py-spy (issue 12). On a connection with
``standard_conforming_strings`` on and UTF-8 as the client encoding -- what PostgreSQL
and AgentPost's sessions use -- the only character a single-quoted literal must escape
is the quote itself, by doubling it; a backslash is an ordinary character. Python's
``str.replace`` and ``encode`` do that at memory speed (~40 us per 100 KiB, most of it
the final concatenation).

Anything else -- another encoding (also one set by SQL mid-session), non-standard
strings, a NUL (which no text value may hold), a character UTF-8 cannot encode -- goes
through psycopg2's own quoting, which gives exactly its usual literal or its usual error.
Only values wrapped by :func:`long_text` take this path; short ones are not worth the
extra call.
"""

from __future__ import annotations

from typing import Any

from psycopg2.extensions import Binary, QuotedString, register_adapter

#: Shorter strings keep psycopg2's own quoting (the saving is per byte).
LONG_TEXT_MIN_CHARS = 4096


class LongText(str):
    """A body-sized text parameter (see the module's docstring)."""

    __slots__ = ()


def long_text(value: Any) -> Any:
    """``value`` marked for the fast quoting when it is a long ``str``; else unchanged."""
    if type(value) is str and len(value) >= LONG_TEXT_MIN_CHARS:
        return LongText(value)
    return value


class _Quoted:
    """psycopg2's adapter protocol (``prepare`` with the connection, then ``getquoted``)."""

    def __init__(self, value: LongText) -> None:
        self._value = value
        self._conn: Any = None

    def prepare(self, conn: Any) -> None:
        self._conn = conn

    def getquoted(self) -> bytes:
        text = self._value  # str's own methods: no copy of the body made here
        conn = self._conn
        # conn.encoding is psycopg2's (what it encodes with, kept from the connect);
        # the parameter is libpq's and the server's, current after a SQL ``SET``.
        if (conn is not None and conn.encoding == "UTF8"
                and conn.get_parameter_status("client_encoding") == "UTF8"
                and conn.get_parameter_status("standard_conforming_strings") == "on"
                and "\x00" not in text):
            try:
                return b"'" + text.replace("'", "''").encode("utf-8") + b"'"
            except UnicodeEncodeError:
                pass  # a lone surrogate: psycopg2 refuses it in its own words
        quoted = QuotedString(str(text))
        if conn is not None:
            quoted.prepare(conn)
        result: bytes = quoted.getquoted()
        return result


register_adapter(LongText, _Quoted)


class LongBytes(bytes):
    """A message's raw bytes kept in PostgreSQL (storage.blobs.inline), a ``bytea``
    parameter; see :class:`_QuotedBytes`."""

    __slots__ = ()


def long_bytes(value: Any) -> Any:
    """``value`` marked for :class:`_QuotedBytes` when it is long ``bytes``; else
    unchanged."""
    if type(value) is bytes and len(value) >= LONG_TEXT_MIN_CHARS:
        return LongBytes(value)
    return value


class _QuotedBytes:
    """Most mail is UTF-8 (nearly all of it ASCII) without NUL: its bytes travel as a
    text literal the size of the message, turned back into the same bytes by the
    server (``convert_to(..., 'UTF8')`` is the identity on a UTF-8 database), instead
    of psycopg2's hex literal twice the size, which the server's lexer then reads and
    decodes (issue 12: that was most of what keeping a 100 KiB message in PostgreSQL
    cost it). Anything else (another encoding on either side, non-standard strings, a
    NUL, bytes that are not UTF-8) keeps psycopg2's hex literal."""

    def __init__(self, value: LongBytes) -> None:
        self._value = value
        self._conn: Any = None

    def prepare(self, conn: Any) -> None:
        self._conn = conn

    def getquoted(self) -> bytes:
        data = self._value
        conn = self._conn
        if (conn is not None
                and conn.get_parameter_status("client_encoding") == "UTF8"
                and conn.get_parameter_status("server_encoding") == "UTF8"
                and conn.get_parameter_status("standard_conforming_strings") == "on"
                and data.find(b"\x00") < 0 and _utf8(data)):
            return b"convert_to('" + data.replace(b"'", b"''") + b"', 'UTF8')"
        binary = Binary(bytes(data))
        if conn is not None:
            binary.prepare(conn)
        result: bytes = binary.getquoted()
        return result


def _utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


register_adapter(LongBytes, _QuotedBytes)
