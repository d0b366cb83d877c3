"""storage.sql_literals against psycopg2 itself, on a real PostgreSQL connection: every
rendering must be the very bytes ``cursor.mogrify`` produces (or its very error), and
PostgreSQL must read each literal back as the value that was sent. Then the product's
path: a stored message whose headers and body hold quotes, backslashes, percent signs,
non-ASCII and would-be SQL reads back exactly through the API."""

from __future__ import annotations

import random
import smtplib
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
import pytest_twisted
from psycopg2.extras import Json
from twisted.internet.threads import deferToThread

from agentpost.storage import sql_literals
from agentpost.storage.long_text import LongText
from tests.imap_client import new_inbox

#: Strings a hostile sender or tenant can put in a header, a name or a body.
NASTY = ["", "'", "''", "\\", "\\'", "'; DROP TABLE messages; --", "%s", "%%", "%(x)s",
         "é漢字🙂", "line\r\nbreak", "tab\tand\x7f", "$1", "$$", "E'\\x00'", "\u2028",
         "a" * 5000, "'" * 300, "\\" * 300, "ARRAY[1]", "NULL", "{}", "-1"]


def _values(rng: random.Random) -> list:
    """A statement's worth of parameters of every shape the stores send, and some they
    do not (those must go through psycopg2 untouched)."""
    now = datetime.now(UTC)
    scalars = [*NASTY, 0, 1, -1, -(2 ** 63), 2 ** 63 - 1, 10 ** 30, -(10 ** 30), True, False,
               None, now, datetime(2001, 2, 3, 4, 5, 6), datetime(1, 1, 1, tzinfo=UTC),
               now.astimezone(timezone(timedelta(hours=-3, minutes=-30)))]
    others = [1.5, float("nan"), float("-inf"), Decimal("1.10"), b"\x00\xffbytes'",
              memoryview(b"mv"), date(2026, 12, 6), Json({"k": "v'", "n": [1, None]}),
              LongText("x'" * 3000), (1, "a'"), [], [None], [None, None], ["a", None],
              [[1, 2], [3, 4]], [[]], [1.5], ["a'", "b\\", "é"], [1, -2, 3], [True, False],
              [now, now], NASTY]
    pool = scalars + others
    return [rng.choice(pool) for _ in range(rng.randint(1, 60))]


def test_renders_exactly_what_psycopg2_renders(pg_conn):
    """Random statements mixing every shape, each compared byte for byte with mogrify;
    every single value too. (The connection is one :func:`usable` accepts.)"""
    assert sql_literals.usable(pg_conn)
    cur = pg_conn.cursor()
    rng = random.Random(12)
    for _ in range(300):
        values = _values(rng)
        sql = "SELECT " + ", ".join("%s" for _ in values) + " -- 100%% %%s"
        assert sql_literals.render(sql, values, pg_conn) == cur.mogrify(sql, values)
    for value in _values(random.Random(3)) + NASTY:
        assert sql_literals.render("%s", [value], pg_conn) == cur.mogrify("%s", [value])


def test_postgresql_reads_each_literal_back_as_sent(pg_conn):
    """The rendering runs as SQL and returns the values themselves (strings with quotes,
    backslashes and percent signs, negative and huge numbers, arrays, timestamps)."""
    now = datetime.now(UTC)
    values = [*NASTY, -5, 2 ** 62, True, None, now, ["a'b", "c\\d", "%s"], [7, -8]]
    sql = "SELECT " + ", ".join("%s" for _ in values)
    cur = pg_conn.cursor()
    cur.execute(sql_literals.render(sql, values, pg_conn))
    row = cur.fetchone()
    assert list(row) == values
    assert "1-%s" % "" == "1-"  # noqa: UP031 - the shape below
    cur.execute(sql_literals.render("SELECT 1-%s", [-1], pg_conn))
    assert cur.fetchone()[0] == 2  # not "1--1", a comment


def test_errors_are_psycopg2s(pg_conn):
    """A NUL in a string (alone or in a list) and a lone surrogate fail as psycopg2
    fails: Txn._send turns those into the client's 400, so the type must not change."""
    cur = pg_conn.cursor()
    for bad in ("a\x00b", ["ok", "a\x00b"]):
        with pytest.raises(ValueError, match="NUL") as ours:
            sql_literals.render("SELECT %s", [bad], pg_conn)
        with pytest.raises(ValueError, match="NUL") as theirs:
            cur.mogrify("SELECT %s", [bad])
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(UnicodeEncodeError):
        sql_literals.render("SELECT %s", ["\ud800"], pg_conn)
    with pytest.raises(UnicodeEncodeError):
        cur.mogrify("SELECT %s", ["\ud800"])


def test_not_usable_where_doubling_quotes_is_not_enough(pg_conn):
    """With standard_conforming_strings off a backslash escapes: the fast path steps
    aside (Txn._send then leaves the statement to psycopg2)."""
    pg_conn.autocommit = True
    cur = pg_conn.cursor()
    cur.execute("SET standard_conforming_strings TO off")
    assert not sql_literals.usable(pg_conn)
    cur.execute("SET standard_conforming_strings TO on")
    assert sql_literals.usable(pg_conn)
    cur.execute("SET client_encoding TO 'LATIN1'")
    assert not sql_literals.usable(pg_conn)


@pytest.fixture
def rendered(monkeypatch):
    """How many statements sql_literals.render bound (the real one: this only counts)."""
    calls: list[int] = []
    original = sql_literals.render

    def counting(sql, params, conn):
        calls.append(len(params))
        return original(sql, params, conn)

    monkeypatch.setattr(sql_literals, "render", counting)
    return calls


def _send(port: int, rcpt: str, raw: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as smtp:
        return smtp.sendmail("ob@example.com", [rcpt], raw)


@pytest_twisted.ensureDeferred
async def test_a_message_full_of_sql_metacharacters_reads_back_exactly(server, rendered):
    """End to end through the MX and the API: the delivery's statement (rendered here)
    stores every header and the body exactly, and the raw message byte for byte."""
    inbox, key = await new_inbox(server, "literals")
    subject = "Re: 'quoted' \\back\\slash 100% %s %(x)s é漢字 '; DROP TABLE messages; --"
    body = "Body with 'quotes', \\backslashes\\, %s and %% and $1 and é漢字🙂\r\n" * 40
    name = "O'Brien 100%% %s $$"  # (a backslash here would be a quoted-pair)
    raw = (f"From: \"{name}\" <ob@example.com>\r\nTo: {inbox['email']}\r\n"
           f"Subject: {subject}\r\nMessage-ID: <x'y%s@example.com>\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
           f"\r\n{body}").encode()
    assert await deferToThread(_send, server.mx_port, inbox["email"], raw) == {}
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    [summary] = listed.json["data"]
    message = (await server.api.get(f"/api/v1/messages/{summary['id']}", key=key)).json
    assert message["subject"] == subject
    assert message["from_address"]["name"] == name
    assert message["text_body"].replace("\r\n", "\n") == body.replace("\r\n", "\n")
    stored = (await server.api.get(f"/api/v1/messages/{summary['id']}/raw", key=key)).body
    assert stored.endswith(raw)  # after the trace headers the MX prepends
    assert max(rendered) >= 50, "the delivery's statement was not bound by sql_literals"
