"""The keys IMAP SEARCH and SORT compare: RFC 5256 base subjects, first-address sort
keys, whole-field search text and the Date field's own calendar date (unit tests), and
the 0012 backfill for rows stored before (real PostgreSQL)."""

import email.headerregistry
import re
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import pytest

from agentpost.mail.basesubject import base_subject
from agentpost.mail.parse import parse_message
from agentpost.mail.searchkeys import (
    MAX_ADDRESS_PARSE_CHARS,
    MAX_SEARCH_TEXT_CHARS,
    display_key,
    index_fields,
    mailbox_key,
    search_text,
)


@pytest.mark.parametrize(("subject", "base"), [
    # subj-refwd: re / fw / fwd, WSP and a blob before the colon, any case, repeated
    ("Re: foo", "foo"),
    ("RE: Re: re: foo", "foo"),
    ("Re[2]: foo", "foo"),
    ("Re [2]: foo", "foo"),
    ("Re : foo", "foo"),
    ("Fwd: foo", "foo"),
    ("Fw: foo", "foo"),
    ("FWD:foo", "foo"),
    ("Re: Fwd: Re[3]: foo", "foo"),
    # not a subj-refwd
    ("Fwd foo", "Fwd foo"),
    ("Reply: foo", "Reply: foo"),
    ("Ref: foo", "Ref: foo"),
    # subj-trailer: "(fwd)" and WSP, repeated
    ("foo (fwd)", "foo"),
    ("foo (fwd) (FWD) ", "foo"),
    ("foo(fwd)", "foo"),
    # subj-leader with blobs before the refwd; lone blobs only if a base is left
    ("[list] Re: foo", "foo"),
    ("[a] [b] Re: [c] x", "x"),
    ("[list] foo", "foo"),
    ("[a][b] foo", "foo"),
    ("[list]", "[list]"),
    ("[a] [b]", "[b]"),
    ("Re: [list]", "[list]"),
    # subj-fwd: "[fwd:" ... "]" unwrapped, then everything again
    ("[fwd: foo]", "foo"),
    ("[Fwd: Re: foo (fwd)]", "foo"),
    ("Re: [fwd: foo]", "foo"),
    ("Re: [fwd: Re: bar] (fwd)", "bar"),
    ("Re: [fwd: [x]]", "[x]"),
    ("[fwd: foo] bar", "bar"),
    # whitespace: tabs and line breaks are spaces, runs one space, ends dropped
    ("  foo \t  bar\r\n baz  ", "foo bar baz"),
    ("Re:\tfoo", "foo"),
    # nothing left
    ("", ""),
    ("Re:", ""),
    ("Re: Re: (fwd)", ""),
    ("[fwd:]", ""),
    # unbalanced brackets are text
    ("[", "["),
    ("[a [b] foo", "[a [b] foo"),
    ("Re: caf\u00e9", "caf\u00e9"),
])
def test_base_subject_follows_rfc5256_grammar(subject, base):
    assert base_subject(subject) == base


def _python_lines(fn, *args) -> int:
    """How many Python lines ``fn(*args)`` executes, stdlib included: a deterministic
    measure of work (tests never time anything)."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: local)
    try:
        fn(*args)
    finally:
        sys.settrace(previous)
    return count


#: Work for an input 4 times as long may be at most this many times as much: linear
#: (4) with some slack; a quadratic scan would be near 16.
_LINEAR_RATIO = 4.4


@pytest.mark.parametrize("hostile", [
    lambda k: "[a]" * k + "x", lambda k: "[" * (3 * k), lambda k: "Re: " * k,
    lambda k: "(fwd)" * k, lambda k: "[fwd:" * (k * 3 // 5) + "x" + "]" * (k * 3 // 5),
], ids=["blobs", "brackets", "prefixes", "trailers", "fwd-wrappers"])
def test_base_subject_is_linear_on_hostile_subjects(hostile):
    """Runs of blobs, brackets and prefixes cost work in proportion to their length:
    four times the input, (about) four times the lines executed, not sixteen."""
    small, large = hostile(25_000), hostile(100_000)
    assert len(large) >= 300_000
    ratio = _python_lines(base_subject, large) / _python_lines(base_subject, small)
    assert ratio <= _LINEAR_RATIO, (large[:20], ratio)


@pytest.mark.parametrize("hostile", [
    lambda k: '"' * k, lambda k: "(" * k, lambda k: "\\" * k, lambda k: "a@x.org, " * (k // 4),
], ids=["quotes", "parens", "backslashes", "addresses"])
def test_index_fields_stay_bounded_on_hostile_address_fields(hostile, monkeypatch):
    """The stdlib address parser is quadratic on some inputs (a run of quotes): it only
    ever sees the start of a field, once per field, so the work does not grow with it."""
    seen: list[int] = []
    parse = email.headerregistry.HeaderRegistry.__call__

    def spy(self, name, value):
        seen.append(len(value))
        return parse(self, name, value)

    monkeypatch.setattr(email.headerregistry.HeaderRegistry, "__call__", spy)

    def index(value: str) -> None:
        fields = index_fields([("From", value), ("To", value), ("Cc", value)], "", None)
        assert len(fields["from_text"]) <= MAX_SEARCH_TEXT_CHARS

    small, large = hostile(50_000), hostile(200_000)
    lines_small = _python_lines(index, small)
    assert len(seen) == 3 and max(seen) <= MAX_ADDRESS_PARSE_CHARS  # From, To, Cc
    seen.clear()
    lines_large = _python_lines(index, large)
    assert len(seen) == 3 and max(seen) <= MAX_ADDRESS_PARSE_CHARS
    assert lines_large / lines_small <= _LINEAR_RATIO, (large[:20], lines_large / lines_small)


def test_base_subject_of_a_decoded_encoded_word_subject():
    """RFC 2047 is decoded before the base subject is taken (parse stores it decoded)."""
    parsed = parse_message(b"Subject: =?utf-8?q?Re:_[list]_Caf=C3=A9?=\r\n\r\nx\r\n")
    assert base_subject(parsed.subject) == "Caf\u00e9"


def test_address_sort_keys_use_the_first_address_groups_included():
    assert mailbox_key(["Zed <zed@x.org>"]) == "zed"
    assert mailbox_key(["amy@y.org"]) == "amy"
    assert mailbox_key(["Team: Bob <bob@z.org>, c@y.org;, d@w.org"]) == "bob"
    assert mailbox_key(["undisclosed-recipients:;"]) == ""
    assert mailbox_key([]) == "" and mailbox_key([""]) == ""
    assert mailbox_key(["a@x.org", "b@y.org"]) == "a"  # two To fields: the first one
    assert display_key(["Zed <zed@x.org>"]) == "Zed"
    assert display_key(["amy@y.org"]) == "amy@y.org"
    assert display_key(['"Smith, J" <js@x.org>']) == "Smith, J"
    assert display_key(["=?utf-8?q?J=C3=B6rg?= <j@z.de>"]) == "J\u00f6rg"
    assert display_key(["Team: <bob@z.org>;"]) == "bob@z.org"
    assert display_key([]) == ""


def test_search_text_is_the_whole_decoded_field():
    text = search_text(["=?utf-8?q?J=C3=B6rg?= <joerg@z.de> (the boss),\r\n Team: a@x.org,"
                        " b@y.org;"])
    assert text == "J\u00f6rg <joerg@z.de> (the boss), Team: a@x.org, b@y.org;"
    assert search_text([]) is None
    assert search_text(["a@x.org", "b@y.org"]) == "a@x.org, b@y.org"


def test_sent_date_is_the_date_fields_own_calendar_date():
    def fields(date_value: str) -> dict:
        parsed = parse_message(f"Date: {date_value}\r\nSubject: x\r\n\r\nx\r\n".encode())
        return index_fields(parsed.headers, parsed.subject, parsed.sent_at)

    assert fields("Mon, 1 Jan 2024 23:30:00 -0500")["sent_date"] == date(2024, 1, 1)
    assert fields("Tue, 2 Jan 2024 00:30:00 +0200")["sent_date"] == date(2024, 1, 2)
    assert fields("Mon, 1 Jan 2024 23:30:00 -0000")["sent_date"] == date(2024, 1, 1)
    assert fields("not a date")["sent_date"] is None
    none = index_fields([], "", None)
    assert none["sent_date"] is None and none["from_text"] is None
    assert none["sort_subject"] == none["sort_from"] == none["sort_display_to"] == ""


# -- migration 0012: rows stored before get SQL's approximation ------------------------

def _backfill_sql() -> str:
    sql = (Path(__file__).parent.parent
           / "agentpost/storage/migrations/0012_search_sort_keys.sql").read_text()
    section = re.search(r"-- -- Backfill.*?-- \(end of the backfill section\)", sql, re.S)
    assert section is not None
    return section.group(0)


def test_migration_0012_backfills_rows_stored_before(db_dsn):
    """Old rows: the local date from the stored Date field's zone, the raw address fields
    (with the decoded names when encoded), base subjects and first-address keys."""
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    cols = ("sent_date date, from_text text, to_text text, cc_text text, bcc_text text, "
            "sort_subject text NOT NULL DEFAULT '', sort_from text NOT NULL DEFAULT '', "
            "sort_to text NOT NULL DEFAULT '', sort_cc text NOT NULL DEFAULT '', "
            "sort_display_from text NOT NULL DEFAULT '', "
            "sort_display_to text NOT NULL DEFAULT ''")
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (id int, subject text NOT NULL DEFAULT '', "
                    "from_address jsonb, to_addresses jsonb NOT NULL DEFAULT '[]', "
                    "cc_addresses jsonb NOT NULL DEFAULT '[]', "
                    "bcc_addresses jsonb NOT NULL DEFAULT '[]', sent_at timestamptz, "
                    f"headers jsonb NOT NULL DEFAULT '[]', {cols})")
        fix = _backfill_sql().replace("UPDATE messages", "UPDATE t")
        est = datetime(2024, 1, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
        rows = [
            (1, "Re: [list] Banana (fwd)", '{"email": "zed@x.org", "name": "J\u00f6rg"}',
             '[{"email": "a@x.org", "name": ""}, {"email": "b@y.org", "name": "B"}]', est,
             '[["From", "=?utf-8?q?J=C3=B6rg?= <zed@x.org> (boss)"], '
             '["To", "Team: a@x.org,\\r\\n B <b@y.org>;"], '
             '["Date", "Mon, 1 Jan 2024 23:30:00 -0500"]]'),
            (2, "apple", '{"email": "amy@y.org", "name": ""}', "[]",
             datetime(2024, 1, 1, 23, 30, tzinfo=timezone(timedelta(hours=-8))),
             '[["From", "amy@y.org"], ["Date", "Mon, 1 Jan 2024 23:30:00 PST (Pacific)"]]'),
            (3, "", None, "[]", datetime(2024, 1, 2, 0, 30, tzinfo=UTC),
             '[["Date", "Tue, 2 Jan 2024 00:30:00 +0000"]]'),
            (4, "x", None, "[]", None, "[]"),
        ]
        for row in rows:
            cur.execute("INSERT INTO t (id, subject, from_address, to_addresses, sent_at, "
                        "headers) VALUES (%s, %s, %s, %s, %s, %s)", row)
        cur.execute(fix)
        cur.execute(fix)  # rerunnable
        cur.execute("SELECT id, sent_date, from_text, to_text, cc_text, sort_subject, "
                    "sort_from, sort_to, sort_display_from, sort_display_to FROM t ORDER BY id")
        got = cur.fetchall()
    conn.close()
    assert got == [
        (1, date(2024, 1, 1), "=?utf-8?q?J=C3=B6rg?= <zed@x.org> (boss) J\u00f6rg",
         "Team: a@x.org, B <b@y.org>;", None, "Banana", "zed", "a", "J\u00f6rg", "a@x.org"),
        (2, date(2024, 1, 1), "amy@y.org", None, None, "apple", "amy", "", "amy@y.org", ""),
        (3, date(2024, 1, 2), None, None, None, "", "", "", "", ""),
        (4, None, None, None, None, "x", "", "", "", ""),
    ]
