"""storage.long_text: bodies quoted by doubling quotes must reach PostgreSQL exactly as
psycopg2's own quoting would bring them, and fail exactly where it fails."""

from __future__ import annotations

import random

import psycopg2
import pytest

from agentpost.storage.long_text import LONG_TEXT_MIN_CHARS, long_text

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
