"""Client input that costs more than it looks: nesting, counts, numbers, repetitions.

Each of these once answered ``NO [UNAVAILABLE] Internal error`` (a RecursionError, an
int() refusing 5,000 digits) or held the reactor for seconds to minutes (a command's
literals re-parsed at each literal, ``1:*`` repeated 20,000 times, a quadratic regex).
Now each is a ``BAD`` with a clear text, or a bounded amount of work, and the session
goes on. Transcripts over StringTransport (see test_imap_protocol.py).
"""

from __future__ import annotations

import bisect
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.imap import parser, reader, selected
from agentpost.imap.parser import (
    MAX_NESTING_DEPTH,
    MAX_TOKENS,
    Atom,
    Literal,
    ParseError,
    QuotedString,
    merge_ranges,
    tokenize,
)
from agentpost.imap.search_grammar import MAX_SEARCH_DEPTH, MAX_SEARCH_KEYS
from agentpost.mail.imapformat import parse_section
from tests.test_imap_protocol import FakeBackend, Session, _plain, store  # noqa: F401 - fixture

DEEP = "(" * 100_000 + "ALL" + ")" * 100_000


def _selected(store_) -> Session:
    return Session(FakeBackend(store_)).selected()


# --------------------------------------------------------------------------- nesting, counts


def test_search_with_100000_nested_parentheses_is_bad(store):  # noqa: F811
    s = _selected(store)
    assert s.cmd(f"a SEARCH {DEEP}") == [
        f"a BAD Parentheses nested too deeply (at most {MAX_NESTING_DEPTH} levels)"]
    assert s.cmd("b SEARCH ALL") == ["* SEARCH 1 2 3", "b OK SEARCH completed"]


def test_search_with_5000_ors_or_nots_is_bad(store):  # noqa: F811
    s = _selected(store)
    # 5,000 ORs with their operands are over 10,000 arguments: refused as they are read.
    assert s.cmd("a SEARCH " + "OR ALL " * 5000 + "ALL") == [
        f"a BAD Too many arguments (at most {MAX_TOKENS})"]
    deep = f"a BAD Search keys nested too deeply (at most {MAX_SEARCH_DEPTH} levels)"
    assert s.cmd("a SEARCH " + "OR ALL " * 3000 + "ALL") == [deep]  # right-leaning
    assert s.cmd("a SEARCH " + "OR " * 3000 + "ALL " * 3001) == [deep]  # left-leaning
    assert s.cmd("a SEARCH " + "NOT " * 5000 + "ALL") == [deep]
    assert s.cmd("a UID SORT (ARRIVAL) UTF-8 " + "NOT " * 5000 + "ALL") == [deep]
    too_many = f"a BAD Too many search keys (at most {MAX_SEARCH_KEYS})"
    assert s.cmd("a SEARCH " + "ALL " * (MAX_SEARCH_KEYS + 1)) == [too_many]
    assert s.cmd("a SEARCH " + "(ALL ALL) " * 600) == [too_many]  # lists count as keys


def test_search_within_the_limits_still_works(store):  # noqa: F811
    s = _selected(store)
    ors = "OR " * (MAX_SEARCH_DEPTH - 1) + "FLAGGED " * MAX_SEARCH_DEPTH
    assert s.cmd(f"a SEARCH {ors}") == ["* SEARCH 3", "a OK SEARCH completed"]
    nested = "(" * (MAX_SEARCH_DEPTH - 1) + "SEEN" + ")" * (MAX_SEARCH_DEPTH - 1)
    assert s.cmd(f"a SEARCH {nested}") == ["* SEARCH 1", "a OK SEARCH completed"]
    assert s.cmd("a SEARCH " + "ALL " * MAX_SEARCH_KEYS)[-1] == "a OK SEARCH completed"


@pytest.mark.parametrize("command", [
    "a FETCH 1 {deep}",
    "a STORE 1 +FLAGS {deep}",
    "a APPEND INBOX {deep} {{1+}}\r\nx",
    "a LIST {deep} \"\" *",
    "a LIST \"\" * RETURN {deep}",
    "a SELECT INBOX {deep}",
    "a STATUS INBOX {deep}",
    "a ENABLE {deep}",
    "a ID {deep}",
])
def test_deep_parentheses_are_bad_in_every_command(store, command):  # noqa: F811
    s = _selected(store)
    assert s.cmd(command.format(deep=DEEP)) == [
        f"a BAD Parentheses nested too deeply (at most {MAX_NESTING_DEPTH} levels)"]
    assert s.cmd("b NOOP")[-1] == "b OK NOOP completed"


def test_too_many_tokens_are_bad(store):  # noqa: F811
    s = _selected(store)
    assert s.cmd("a STORE 1 +FLAGS (" + "x " * MAX_TOKENS + ")") == [
        f"a BAD Too many arguments (at most {MAX_TOKENS})"]
    assert s.cmd("b NOOP")[-1] == "b OK NOOP completed"


def test_too_many_fetch_attributes_are_bad(store):  # noqa: F811
    """Each body section is a pass over the message on the reactor: 10,000 copies of
    BODY.PEEK[1] on a 200 KB message held it for 20 s."""
    s = _selected(store)
    items = " ".join(["BODY.PEEK[1]"] * (parser.MAX_FETCH_ITEMS + 1))
    assert s.cmd(f"a FETCH 1 ({items})") == [
        f"a BAD Too many FETCH attributes (at most {parser.MAX_FETCH_ITEMS})"]
    items = " ".join(["BODY.PEEK[1]"] * parser.MAX_FETCH_ITEMS)
    assert s.cmd(f"a FETCH 1 ({items})")[-1] == "a OK FETCH completed"


# --------------------------------------------------------------------------- numbers


def test_huge_numbers_are_bad_not_internal_errors(store):  # noqa: F811
    s = _selected(store)
    digits = "9" * 5000
    for command in (f"a FETCH 1:{digits} FLAGS", f"a UID FETCH {digits} FLAGS",
                    f"a FETCH 1 BODY.PEEK[]<0.{digits}>", f"a FETCH 1 BODY[{digits}]",
                    f"a SEARCH UID {digits}", f"a SEARCH {digits}"):
        reply = s.cmd(command)
        assert reply[-1].startswith("a BAD"), (command[:40], reply)


# --------------------------------------------------------------------------- repetitions


def test_repeated_ranges_cost_one_pass(store, monkeypatch):  # noqa: F811
    """``UID FETCH 1:*,1:*,...`` (20,000 times) looks the view up once, not 20,000 times;
    the answer names each message once."""
    s = _selected(store)
    calls = []

    class CountingBisect:
        def __getattr__(self, name):
            def counted(*args):
                calls.append(name)
                return getattr(bisect, name)(*args)
            return counted

    monkeypatch.setattr(selected, "bisect", CountingBisect())
    reply = s.cmd("a UID FETCH " + ",".join(["1:*"] * 20_000) + " (FLAGS)")
    assert [line.split(" FETCH")[0] for line in reply[:-1]] == ["* 1", "* 2", "* 3"]
    assert reply[-1] == "a OK FETCH completed"
    assert len(calls) < 20
    calls.clear()
    reply = s.cmd("a SEARCH " + ",".join(["1:*"] * 20_000))
    assert reply == ["* SEARCH 1 2 3", "a OK SEARCH completed"]
    assert len(calls) < 20


def test_merge_ranges():
    assert merge_ranges([]) == []
    assert merge_ranges([(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]) == [(1, 9), (20, 30)]
    assert merge_ranges([(1, 1)] * 10_000) == [(1, 1)]


def test_many_literals_are_parsed_a_bounded_number_of_times(store, monkeypatch):  # noqa: F811
    """The command read so far was parsed again at every literal: 2,000 one-byte literals
    cost a minute (900 here: the search key cap). Now it is parsed at its first literal
    and once whole (APPEND: at most twice more, for the mailbox check)."""
    s = _selected(store)
    parses = []
    original = reader.parse_command

    def counting(data):
        parses.append(len(data))
        return original(data)

    monkeypatch.setattr(reader, "parse_command", counting)
    reply = s.cmd(b"a SEARCH" + b" SUBJECT {1+}\r\nx" * 900)
    assert reply[-1] == "a OK SEARCH completed"
    assert len(parses) == 2
    parses.clear()
    reply = s.cmd(b"b APPEND {5+}\r\nINBOX (\\Seen) {12+}\r\nSubject: x\r\n")
    assert reply[-1].startswith("b OK [APPENDUID")
    assert len(parses) <= 4


def test_long_body_section_numbers_are_linear():
    """A quadratic regex took half a second per 256 KiB FETCH item; at 4 MB it would
    take minutes. Now the part numbers are matched possessively."""
    with pytest.raises(ValueError):
        parse_section("1." * 2_000_000 + "x")
    with pytest.raises(ValueError):
        parse_section("1" * 4_000_000 + "x")
    assert parse_section("1.2.HEADER.FIELDS (A B)").fields == ("A", "B")


# --------------------------------------------------------------------------- tokenizer


def _reference_tokenize(data: bytes) -> list:
    """The tokenizer as it was (byte by byte), minus the limits: the new one, built from
    regex runs, must agree with it on everything within the limits."""
    stack: list[list] = [[]]
    pos, n = 0, len(data)
    while pos < n:
        ch = data[pos:pos + 1]
        if ch == b" ":
            pos += 1
        elif ch in (b"\r", b"\n"):
            raise ParseError("Unexpected line break")
        elif ch == b"(":
            stack.append([])
            pos += 1
        elif ch == b")":
            if len(stack) == 1:
                raise ParseError("Unbalanced parenthesis")
            inner = stack.pop()
            stack[-1].append(inner)
            pos += 1
        elif ch == b'"':
            pos += 1
            out = bytearray()
            while True:
                if pos >= n:
                    raise ParseError("Unterminated quoted string")
                c = data[pos]
                if c == 0x5C:
                    if pos + 1 >= n or data[pos + 1] not in (0x5C, 0x22):
                        raise ParseError("Bad escape in quoted string")
                    out.append(data[pos + 1])
                    pos += 2
                elif c == 0x22:
                    pos += 1
                    break
                elif c in (0x0D, 0x0A):
                    raise ParseError("Line break in quoted string")
                else:
                    out.append(c)
                    pos += 1
            stack[-1].append(QuotedString(out.decode("utf-8", "replace")))
        elif ch == b"{":
            m = re.compile(rb"\{(\d{1,19})\+?\}\r\n").match(data, pos)
            if m is None:
                raise ParseError("Bad literal")
            size, start = int(m.group(1)), m.end()
            if start + size > n:
                raise ParseError("Truncated literal")
            stack[-1].append(Literal(data[start:start + size]))
            pos = start + size
        else:
            start, depth = pos, 0
            while pos < n:
                c = data[pos:pos + 1]
                if c == b"[" and (depth or data[start:pos].upper() in parser._SECTION_ATOMS):
                    depth += 1  # only a fetch attribute opens a section (issue 10 item 8)
                elif c == b"]":
                    depth = max(0, depth - 1)
                elif depth == 0 and c in b" ()\r\n\"{":
                    break
                elif c in (b"\r", b"\n"):
                    break
                pos += 1
            if depth:
                raise ParseError("Unterminated [")
            stack[-1].append(Atom(data[start:pos].decode("utf-8", "replace")))
    if len(stack) != 1:
        raise ParseError("Unbalanced parenthesis")
    return stack[0]


def _outcome(tokenizer, data: bytes):
    def typed(token):
        return [typed(t) for t in token] if isinstance(token, list) else \
            (type(token).__name__, token)

    try:
        return typed(tokenizer(data))
    except ParseError as exc:
        return str(exc)


_pieces = st.sampled_from([b" ", b"(", b")", b"[", b"]", b'"', b"\\", b"{", b"}", b"1",
                           b"BODY", b"body.peek", b"BINARY.SIZE",
                           b"+", b"\r\n", b"\r", b"a", b"B", b"\xc3\xa9", b"<", b".", b"*"])


@settings(max_examples=4000, deadline=None)
@given(st.lists(_pieces, max_size=40).map(b"".join))
def test_tokenizer_agrees_with_the_byte_by_byte_original(data):
    assert _outcome(tokenize, data) == _outcome(_reference_tokenize, data)


def test_tokenizer_examples():
    assert tokenize(b'A BODY[HEADER.FIELDS (X Y)]<0.5> "q\\"s" {2}\r\nab (c (d))') == [
        "A", "BODY[HEADER.FIELDS (X Y)]<0.5>", 'q"s', b"ab", ["c", ["d"]]]
    assert tokenize(b"(" * MAX_NESTING_DEPTH + b")" * MAX_NESTING_DEPTH)
    with pytest.raises(ParseError, match="nested too deeply"):
        tokenize(b"(" * (MAX_NESTING_DEPTH + 1) + b")" * (MAX_NESTING_DEPTH + 1))
    assert parser.MAX_TOKENS == MAX_TOKENS


# --------------------------------------------------------- issue 10 item 8: astrings, ranges

ATOM_CHARS = "!#$&'+,-.0123456789:;<=>?@^_`|[}"


def test_mailbox_astring_with_every_atom_special_is_no_not_bad(store):  # noqa: F811
    """ASTRING-CHAR is ATOM-CHAR or "]"; "[" is an ATOM-CHAR too: outside a fetch
    attribute's section it opens nothing, so the name parses and simply does not exist
    (its "&'+,-" is not valid modified UTF-7 either: NO, as Dovecot answers)."""
    assert tokenize(f"SELECT {ATOM_CHARS}".encode()) == [Atom("SELECT"), Atom(ATOM_CHARS)]
    assert tokenize(b"a[b c]d") == [Atom("a[b"), Atom("c]d")]
    assert tokenize(b"x BODY[HEADER.FIELDS (A B)]<0.10> y") == [
        Atom("x"), Atom("BODY[HEADER.FIELDS (A B)]<0.10>"), Atom("y")]
    with pytest.raises(ParseError, match="Unterminated"):
        tokenize(b"FETCH 1 BODY.PEEK[HEADER")
    s = Session(FakeBackend(store)).login()
    assert s.cmd(f"s SELECT {ATOM_CHARS}")[-1].startswith("s NO ")
    assert s.cmd("s SELECT a[b]c]")[-1].startswith("s NO [NONEXISTENT]")
    assert s.cmd("s SELECT a[b")[-1].startswith("s NO [NONEXISTENT]")
    assert s.cmd("s SELECT INBOX")[-1].startswith("s OK")


def test_plain_brackets_in_atoms_stay_linear():
    """A "[" no longer scans to the end of the line (which, once per atom, was
    quadratic): 10,000 atoms of "[[[[" tokenize at once."""
    atoms = tokenize(b" ".join([b"a[[[["] * 10_000))
    assert len(atoms) == 10_000 and atoms[0] == "a[[[["
    assert tokenize(b"[" * 1_000_000)[0] == "[" * 1_000_000


def test_search_sequence_number_beyond_the_mailbox_matches_nothing(store):  # noqa: F811
    """SEARCH 1000 on a 3-message mailbox is OK and empty (RFC 9051: a search key, not a
    message reference); FETCH 1000 stays BAD, as Dovecot answers."""
    s = _selected(store)
    assert s.cmd("x SEARCH RETURN () 1000") == ['* ESEARCH (TAG "x")', "x OK SEARCH completed"]
    assert s.cmd("x SEARCH 1000") == ["* SEARCH", "x OK SEARCH completed"]
    assert s.cmd("x SEARCH 2:1000") == ["* SEARCH 2 3", "x OK SEARCH completed"]
    assert s.cmd("x SEARCH 1000:2") == ["* SEARCH 2 3", "x OK SEARCH completed"]
    assert s.cmd("x SEARCH OR 1000 1 NOT 1000") == ["* SEARCH 1", "x OK SEARCH completed"]
    assert s.cmd("x SEARCH RETURN (COUNT) 999,1000") == [
        '* ESEARCH (TAG "x") COUNT 0', "x OK SEARCH completed"]
    assert s.cmd("f FETCH 1000 FLAGS")[-1].startswith("f BAD")
    assert s.cmd("f FETCH 2:1000 FLAGS")[-1].startswith("f BAD")
    assert s.cmd("t STORE 1000 +FLAGS (x)")[-1].startswith("t BAD")
