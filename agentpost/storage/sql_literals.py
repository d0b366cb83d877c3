"""Statement parameters rendered as SQL literals in Python, byte for byte as psycopg2
would render them, at a third of its cost.

Why: psycopg2 binds parameters client-side (``cursor.mogrify``), adapting every value
through its adapter protocol -- an adapter object, a ``prepare`` and a ``getquoted``
call each -- and every ``str`` through ``PQescapeStringConn``. An MX delivery's one
statement carries ~120 parameters (ids repeated per row, the transaction's timestamp
ten times, ``text[]`` columns as lists); mogrify took 115-160 us of the reactor per 4 KiB
message, a tenth of its CPU in a one-session run (issue 12, bench/README.md). The same
literals built here with ``str.replace`` and ``bytes`` formatting take ~45 us.

Only the types whose literal is fixed and simple are rendered here: ``str`` (on a
connection where doubling the quote is the whole escaping: UTF-8 client encoding and
``standard_conforming_strings`` on), ``int``, ``bool``, ``None``, flat lists of those, and
``datetime`` (psycopg2's own literal, computed once per object per statement: the
transaction's timestamp recurs). Anything else -- a ``str`` holding a NUL, a subclass
with its own adapter (storage.long_text), bytes, floats, JSON, nested or NULL-holding
lists -- goes through psycopg2's adapter exactly as ``mogrify`` would call it, so its
literal and its errors are psycopg2's. tests/test_sql_literals.py compares the two
renderings over every shape the stores send.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from psycopg2.extensions import adapt

_Render = Callable[[Any, Any, dict[int, bytes]], "bytes | None"]


def usable(conn: Any) -> bool:
    """Whether ``conn`` quotes a string by doubling its quotes and nothing else (what
    :func:`render` relies on), as psycopg2 sees it and as the server does now."""
    return bool(conn.encoding == "UTF8"
                and conn.get_parameter_status("client_encoding") == "UTF8"
                and conn.get_parameter_status("standard_conforming_strings") == "on")


def render(sql: str, params: Sequence[Any], conn: Any) -> bytes:
    """``sql`` with its ``%s`` placeholders replaced by ``params`` as literals (and
    ``%%`` by ``%``): what ``conn.cursor().mogrify(sql, params)`` returns. Only for a
    connection :func:`usable` accepts, and a list or tuple of parameters."""
    cache: dict[int, bytes] = {}
    parts = []
    fast = _FAST
    for value in params:
        how = fast.get(type(value))
        quoted = how(value, conn, cache) if how is not None else None
        parts.append(quoted if quoted is not None else _psycopg2(value, conn))
    return sql.encode("utf-8") % tuple(parts)


def _psycopg2(value: Any, conn: Any) -> bytes:
    """psycopg2's own literal for ``value`` (its adapter, prepared for ``conn``)."""
    adapted = adapt(value)
    prepare = getattr(adapted, "prepare", None)
    if prepare is not None:
        prepare(conn)
    quoted: bytes = adapted.getquoted()
    return quoted


def quoted_text(value: str) -> bytes:
    """``value`` as a string literal on a connection :func:`usable` accepts (a NUL is
    the caller's to refuse; a lone surrogate raises UnicodeEncodeError, as psycopg2)."""
    return ("'" + value.replace("'", "''") + "'").encode("utf-8")


def _str(value: str, conn: Any, cache: dict[int, bytes]) -> bytes | None:
    if "\x00" in value:
        return None  # psycopg2's ValueError, word for word
    return quoted_text(value)


def _int(value: int, conn: Any, cache: dict[int, bytes]) -> bytes:
    # psycopg2 puts a space before a negative number: "1-%s" must not become "1--1"
    return (b" %d" if value < 0 else b"%d") % value


def _bool(value: bool, conn: Any, cache: dict[int, bytes]) -> bytes:
    return b"true" if value else b"false"


def _none(value: None, conn: Any, cache: dict[int, bytes]) -> bytes:
    return b"NULL"


def _datetime(value: datetime, conn: Any, cache: dict[int, bytes]) -> bytes:
    key = id(value)  # the object is alive (in params) for the whole render
    quoted = cache.get(key)
    if quoted is None:
        quoted = cache[key] = _psycopg2(value, conn)
    return quoted


def _list(value: list[Any], conn: Any, cache: dict[int, bytes]) -> bytes | None:
    """``ARRAY[...]`` of scalars; ``'{}'`` when empty. A None or a list inside: psycopg2
    (it writes NULL-only and nested arrays its own way)."""
    if not value:
        return b"'{}'"
    out = []
    for item in value:
        how = _SCALARS.get(type(item))
        if how is None:
            return None
        quoted = how(item, conn, cache)
        if quoted is None:
            return None
        out.append(quoted)
    return b"ARRAY[" + b",".join(out) + b"]"


_SCALARS: dict[type, _Render] = {str: _str, int: _int, bool: _bool, datetime: _datetime}
_FAST: dict[type, _Render] = {**_SCALARS, type(None): _none, list: _list}
