"""storage.long_text: bodies quoted by doubling quotes must reach PostgreSQL exactly as
psycopg2's own quoting would bring them, and fail exactly where it fails."""

from __future__ import annotations

import random

import psycopg2
import pytest

from agentpost.storage.long_text import LONG_TEXT_MIN_CHARS, long_bytes, long_text

_ODD = ["'", "''", "\\", "\\'", "\\x41", "E'", "$$", "\n", "\r\n", "\t", "é", "😀", "\u2028",
        "%s", "%(x)s", "--", "/*", "'; DROP TABLE messages; --"]


def _bodies() -> list[str]:
    rng = random.Random(12)
    out = [part * (LONG_TEXT_MIN_CHARS // len(part) + 1) for part in _ODD]
    for _ in range(30):
        out.append("".join(rng.choice([*_ODD, "abc", " "]) for _ in range(3000)))
    return out


@pytest.fixture
def conn(db_dsn):
    conn = psycopg2.connect(db_dsn)
    yield conn
    conn.close()


def test_every_odd_body_is_stored_exactly_and_quoted_as_psycopg2_would(conn):
    cur = conn.cursor()
    for body in _bodies():
        fast = long_text(body)
        assert type(fast) is not str  # long enough to take the fast path
        assert cur.mogrify("%s", [fast]) == cur.mogrify("%s", [body])
        cur.execute("SELECT %s::text, %s::text[]", [fast, [fast, None]])
        assert cur.fetchone() == (body, [body, None])


def test_what_psycopg2_refuses_is_refused_the_same_way(conn):
    cur = conn.cursor()
    nul = "x" * LONG_TEXT_MIN_CHARS + "\x00"
    with pytest.raises(ValueError, match="NUL") as ours:
        cur.mogrify("%s", [long_text(nul)])
    with pytest.raises(ValueError) as theirs:
        cur.mogrify("%s", [nul])
    assert str(ours.value) == str(theirs.value)
    surrogate = "x" * LONG_TEXT_MIN_CHARS + "\udc80"
    with pytest.raises(UnicodeEncodeError):
        cur.mogrify("%s", [long_text(surrogate)])
    with pytest.raises(UnicodeEncodeError):
        cur.mogrify("%s", [surrogate])


def test_a_session_without_standard_strings_gets_psycopg2s_quoting(conn):
    """Backslashes are escapes there: the fast literal would change the text."""
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SET standard_conforming_strings = off")
    try:
        body = "a\\'b\\\\c'" * LONG_TEXT_MIN_CHARS
        assert cur.mogrify("%s", [long_text(body)]) == cur.mogrify("%s", [body])
        cur.execute("SELECT %s::text", [long_text(body)])
        assert cur.fetchone() == (body,)
    finally:
        cur.execute("SET standard_conforming_strings = on")


def test_short_and_other_values_are_left_alone():
    assert type(long_text("short")) is str
    assert long_text(None) is None
    assert long_text(b"x" * LONG_TEXT_MIN_CHARS) == b"x" * LONG_TEXT_MIN_CHARS


def test_a_session_whose_encoding_changed_by_sql_gets_psycopg2s_quoting(conn):
    """``SET client_encoding`` leaves psycopg2's ``conn.encoding`` as it was, but libpq
    (and PostgreSQL) read the literal in the new encoding: in Shift-JIS a quote may
    follow a lead byte, which psycopg2's escaping treats as one character with it."""
    conn.autocommit = True
    cur = conn.cursor()
    body = "\u3042'" * LONG_TEXT_MIN_CHARS
    cur.execute("SET client_encoding TO 'SJIS'")
    try:
        assert cur.mogrify("%s", [long_text(body)]) == cur.mogrify("%s", [body])
    finally:
        cur.execute("SET client_encoding TO 'UTF8'")
    assert cur.mogrify("%s", [long_text(body)]) == cur.mogrify("%s", [body])


# -- raw message bytes (bytea) -----------------------------------------------------------

def _raw_messages() -> list[tuple[bytes, bool]]:
    """(bytes, whether they may travel as text): UTF-8 without NUL may."""
    out = [(body.encode("utf-8"), True) for body in _bodies()]
    rng = random.Random(13)
    every_byte = bytes(range(256)) * (LONG_TEXT_MIN_CHARS // 256 + 1)
    out += [
        (every_byte, False),  # NUL and bytes that are not UTF-8
        (b"x" * LONG_TEXT_MIN_CHARS + b"\xff", False),  # one 8-bit Latin-1 byte at the end
        (b"\xc3" + b"y" * LONG_TEXT_MIN_CHARS, False),  # a sequence cut short
        (b"a\x00b" * LONG_TEXT_MIN_CHARS, False),
        (b"\\x41424344" * LONG_TEXT_MIN_CHARS, True),  # looks like a hex bytea literal
        (bytes(rng.randrange(256) for _ in range(3 * LONG_TEXT_MIN_CHARS)), False),
    ]
    return out


def test_raw_bytes_are_stored_exactly_as_text_when_utf8_else_as_hex(conn):
    cur = conn.cursor()
    for data, as_text in _raw_messages():
        fast = long_bytes(data)
        assert type(fast) is not bytes
        literal = cur.mogrify("%s", [fast])
        assert literal.startswith(b"convert_to('") is as_text, data[:40]
        if not as_text:
            assert literal == cur.mogrify("%s", [psycopg2.Binary(data)])
        cur.execute("SELECT %s::bytea, %s::bytea[], octet_length(%s::bytea)",
                    [fast, [fast, None], fast])
        stored, array, length = cur.fetchone()
        assert bytes(stored) == data
        assert [None if v is None else bytes(v) for v in array] == [data, None]
        assert length == len(data)


def test_raw_bytes_in_another_session_encoding_or_without_standard_strings_go_as_hex(conn):
    conn.autocommit = True
    cur = conn.cursor()
    data = "\u3042'\\".encode() * LONG_TEXT_MIN_CHARS
    for setting, undo in (("SET client_encoding TO 'SJIS'", "SET client_encoding TO 'UTF8'"),
                          ("SET standard_conforming_strings = off",
                           "SET standard_conforming_strings = on")):
        cur.execute(setting)
        try:
            literal = cur.mogrify("%s", [long_bytes(data)])
            assert not literal.startswith(b"convert_to(")
            cur.execute("SELECT %s::bytea", [long_bytes(data)])
            assert bytes(cur.fetchone()[0]) == data
        finally:
            cur.execute(undo)
    assert cur.mogrify("%s", [long_bytes(data)]).startswith(b"convert_to('")


def test_short_and_other_raw_values_are_left_alone():
    assert type(long_bytes(b"short")) is bytes
    assert long_bytes(None) is None
    text = "x" * LONG_TEXT_MIN_CHARS
    assert long_bytes(text) is text


def test_inline_columns_decide_the_literal_and_the_flag_together(conn):
    from agentpost.storage.long_text import inline_columns

    n = LONG_TEXT_MIN_CHARS
    values = [None, b"short", b"a" * n, "é".encode() * n, b"\xe9" * n, b"a\x00" * n]
    data, flags = inline_columns(values)
    assert flags == [None, True, True, True, False, False]
    cur = conn.cursor()
    for value, item, flag in zip(values, data, flags, strict=True):
        literal = cur.mogrify("%s", [item])
        assert literal.startswith(b"convert_to(") is (flag is True and len(value) >= n)
        cur.execute("SELECT %s::bytea", [item])
        stored = cur.fetchone()[0]
        assert (None if stored is None else bytes(stored)) == value
