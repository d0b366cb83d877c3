"""The wide values of a delivery's write, sent to PostgreSQL as cheaply as they can be.

Three of them, each a marker type with its own psycopg2 adapter: a body quoted with one
``str.replace`` (:class:`LongText`, below); a message's raw bytes as a text literal
rather than hex (:class:`LongBytes`); and a body PostgreSQL reads from those bytes
itself instead of receiving it again (:class:`BlobText`).

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

import re
from typing import Any

from psycopg2.extensions import Binary, QuotedString, register_adapter

from agentpost.mail.utf8 import is_utf8
from agentpost.storage import sql_literals

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


class _Adapter:
    """psycopg2's adapter protocol (``prepare`` with the connection, then ``getquoted``):
    the adapters below choose their literal by the connection's settings."""

    def __init__(self, value: Any) -> None:
        self._value = value
        self._conn: Any = None

    def prepare(self, conn: Any) -> None:
        self._conn = conn


class _Quoted(_Adapter):
    """A :class:`LongText`: its quotes doubled, or psycopg2's own literal."""

    _value: LongText

    def getquoted(self) -> bytes:
        text = self._value
        conn = self._conn
        if conn is not None and "\x00" not in text and sql_literals.usable(conn):
            try:
                return sql_literals.quoted_text(text)
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
    parameter; see :class:`_QuotedBytes`. ``text_ok``: :func:`utf8_text` of them, when
    already known (:func:`long_bytes`)."""

    text_ok: bool


def long_bytes(value: Any) -> Any:
    """``value`` marked for :class:`_QuotedBytes` when it is long ``bytes``; else
    unchanged."""
    if type(value) is bytes and len(value) >= LONG_TEXT_MIN_CHARS:
        out = LongBytes(value)
        out.text_ok = bool(utf8_text(value))
        return out
    return value


def inline_columns(values: list[bytes | None]) -> tuple[list[Any], list[bool | None]]:
    """The ``data`` and ``utf8`` parameters of blob rows (migrations 0035, 0038) for
    ``values`` (None: a blob in the store), the UTF-8 test made once per value: the
    literal's form and the row's flag both follow from it."""
    data = [long_bytes(value) for value in values]
    return data, [item.text_ok if isinstance(item, LongBytes) else utf8_text(item)
                  for item in data]


class _QuotedBytes(_Adapter):
    """Most mail is UTF-8 (nearly all of it ASCII) without NUL: its bytes travel as a
    text literal the size of the message, turned back into the same bytes by the
    server (``convert_to(..., 'UTF8')`` is the identity on a UTF-8 database), instead
    of psycopg2's hex literal twice the size, which the server's lexer then reads and
    decodes (issue 12: that was most of what keeping a 100 KiB message in PostgreSQL
    cost it). Anything else (another encoding on either side, non-standard strings, a
    NUL, bytes that are not UTF-8) keeps psycopg2's hex literal. A delivery's large
    messages skip the literal altogether (storage.blob_lead writes them first, as a
    binary parameter, when they add up to enough to be worth a round trip)."""

    _value: LongBytes

    def getquoted(self) -> bytes:
        data = self._value
        conn = self._conn
        if (conn is not None
                and conn.get_parameter_status("client_encoding") == "UTF8"
                and conn.get_parameter_status("server_encoding") == "UTF8"
                and conn.get_parameter_status("standard_conforming_strings") == "on"
                and (data.text_ok if hasattr(data, "text_ok") else utf8_text(data))):
            return b"convert_to('" + data.replace(b"'", b"''") + b"', 'UTF8')"
        binary = Binary(bytes(data))
        if conn is not None:
            binary.prepare(conn)
        result: bytes = binary.getquoted()
        return result


def utf8_text(data: bytes | None) -> bool | None:
    """Whether ``data`` can be a PostgreSQL text value of a UTF-8 database byte for
    byte (valid UTF-8, no NUL): blobs.utf8 (migration 0038). None for None."""
    if data is None:
        return None
    return data.find(b"\x00") < 0 and is_utf8(data)


register_adapter(LongBytes, _QuotedBytes)


#: Bodies shorter than this (characters) are always sent as literals: reading them
#: back from the blob row saves PostgreSQL less than the function call costs.
BLOB_TEXT_MIN_CHARS = 16 * 1024
_BLOB_KEY = re.compile(r"db/[0-9a-z/]+")


class BlobText(str):
    """A body that is exactly the UTF-8 text of its message's bytes from ``start`` on,
    bytes kept in PostgreSQL (blob ``key``, storage.blobs.inline): it is still the
    text everywhere, and a statement gets it as ``ap_blob_text(key, start, octets)``
    (migration 0037) instead of a second copy of the message as a literal. Only
    :func:`blob_text` makes one, after checking that equality."""

    key: str
    start: int
    octets: int


def blob_text(text: Any, raw: bytes, key: str) -> Any:
    """``text`` as a :class:`BlobText` when it is a long body equal to the UTF-8
    decoding of ``raw`` after its header, ``raw`` being the bytes of inline blob
    ``key``; else ``text`` unchanged. Costs one decode and one comparison (C speed)."""
    if type(text) is not str or len(text) < BLOB_TEXT_MIN_CHARS \
            or not _BLOB_KEY.fullmatch(key):
        return text
    crlf = raw.find(b"\r\n\r\n")
    # An LF-only header end only counts before the CRLF one: not a scan of the body.
    lf = raw.find(b"\n\n", 0, crlf + 1 if crlf >= 0 else len(raw))
    if lf >= 0:
        start = lf + 2
    elif crlf >= 0:
        start = crlf + 4
    else:
        return text
    octets = len(raw) - start
    head = text[:64].encode("utf-8", "replace")
    if octets < len(text) or raw[start:start + len(head)] != head:
        return text  # cheap refusals first: multipart, transfer encodings, charsets
    try:
        same = str(memoryview(raw)[start:], "utf-8") == text
    except UnicodeDecodeError:
        return text
    if not same or "\x00" in text:
        return text
    out = BlobText(text)
    out.key, out.start, out.octets = key, start, octets
    return out


class _QuotedBlobText(_Adapter):
    """``ap_blob_text(...)`` on a UTF-8 database (convert_from's UTF8 is then exactly
    the bytes' text), else the body as a literal (:class:`_Quoted`)."""

    _value: BlobText

    def getquoted(self) -> bytes:
        value = self._value
        if utf8_server(self._conn):
            return b"ap_blob_text('%s', %d, %d)" % (value.key.encode("ascii"), value.start,
                                                   value.octets)
        return body_literal(value, self._conn)


def utf8_server(conn: Any) -> bool:
    """Whether ``conn``'s database is UTF-8: only there is ``convert_from(..., 'UTF8')``
    of a message's bytes exactly the text the ingest compared them with."""
    return conn is not None and conn.get_parameter_status("server_encoding") == "UTF8"


def body_literal(text: str, conn: Any) -> bytes:
    """``text`` as a quoted literal (:class:`_Quoted`): where a body read from its
    message's bytes cannot be (:func:`utf8_server` false)."""
    literal = _Quoted(LongText(text))
    literal.prepare(conn)
    return literal.getquoted()


register_adapter(BlobText, _QuotedBlobText)
