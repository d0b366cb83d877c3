"""IMAP mailbox patterns (LIST/LSUB) match in linear time, exactly as RFC 3501 says.

The server once turned ``*``/``%`` into a backtracking regex: ``LIST "" "*%*%...*%b"``
froze the process for every tenant. The matcher here is checked against an obviously
correct reference matcher on patterns of any shape, and the bad pattern is sent over
a session transcript, where the old code never answered.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.imap import patterns
from agentpost.imap.patterns import MAX_PATTERN_CHARS, MAX_PATTERNS, PatternSet, PatternTooLong
from tests.test_imap_protocol import FakeBackend, Session, store  # noqa: F401 - a fixture

EVIL = "*%" * 54 + "b"


def reference_match(pattern: str, name: str) -> bool:
    """RFC 3501 §6.3.8 read literally: ``*`` matches anything, ``%`` anything but
    ``/``; memoised recursion over (pattern position, name position)."""

    @functools.cache
    def at(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(name)
        ch = pattern[i]
        if ch == "*":
            return at(i + 1, j) or (j < len(name) and at(i, j + 1))
        if ch == "%":
            return at(i + 1, j) or (j < len(name) and name[j] != "/" and at(i, j + 1))
        return j < len(name) and name[j] == ch and at(i + 1, j + 1)

    return at(0, 0)


_pattern = st.text(alphabet="*%/ab", max_size=14)
_name = st.text(alphabet="/ab", max_size=12)


@settings(max_examples=3000, deadline=None)
@given(pattern=_pattern, name=_name)
def test_one_pattern_agrees_with_the_reference_matcher(pattern, name):
    assert PatternSet([pattern]).matches(name) == reference_match(pattern, name)


@settings(max_examples=1500, deadline=None)
@given(pats=st.lists(_pattern, min_size=1, max_size=4), name=_name)
def test_several_patterns_match_when_any_of_them_does(pats, name):
    assert PatternSet(pats).matches(name) == any(reference_match(p, name) for p in pats)


@settings(max_examples=500, deadline=None)
@given(pattern=_pattern)
def test_collapsing_wildcard_runs_changes_nothing(pattern):
    collapsed = patterns.collapse(pattern)
    assert "**" not in collapsed and "%%" not in collapsed and "*%" not in collapsed
    for name in ("", "a", "a/b", "ab/ba/", "/", "bbb"):
        assert reference_match(collapsed, name) == reference_match(pattern, name)


def test_case_folding_is_only_on_request():
    """INBOX is case-insensitive (RFC 3501 §5.1); other names are not."""
    inbox = PatternSet(["inbox", "In%"])
    assert inbox.matches("INBOX", fold_case=True)
    assert not inbox.matches("INBOX")
    assert PatternSet(["%/Sub"]).matches("inbox/Sub")


def test_the_freezing_pattern_costs_one_step_per_character():
    """Work is bounded by the name's length, whatever the pattern: the 54-pair pattern
    that froze the old regex reads each character once."""
    matcher = PatternSet([EVIL])
    name = "a" * 500 + "/" + "c" * 500
    assert not matcher.matches(name)
    assert matcher.steps <= len(name)
    assert matcher.matches("x/y/zb")


def test_pattern_size_and_count_are_capped():
    PatternSet(["a" * MAX_PATTERN_CHARS])
    with pytest.raises(PatternTooLong, match="at most 1024"):
        PatternSet(["a" * (MAX_PATTERN_CHARS + 1)])
    with pytest.raises(PatternTooLong, match="at most 1024"):
        PatternSet(["a" * 600, "b" * 600])
    with pytest.raises(PatternTooLong, match=f"at most {MAX_PATTERNS}"):
        PatternSet(["a"] * (MAX_PATTERNS + 1))


def test_list_with_the_freezing_pattern_answers(store):  # noqa: F811
    """Over a session: the command completes (the old code never did) and the matcher did
    at most one step per character of each folder name."""
    store.add_folder("Projects/2026/x" + "a" * 150)
    s = Session(FakeBackend(store)).login()
    counted: list[PatternSet] = []
    original = PatternSet.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        counted.append(self)

    PatternSet.__init__ = spy  # type: ignore[method-assign]
    try:
        assert s.cmd(f'l LIST "" "{EVIL}"') == ["l OK LIST completed"]
        assert s.cmd(f'l LSUB "" "{EVIL}"') == ["l OK LSUB completed"]
        assert s.cmd(f'l LIST "" ("{EVIL}" "{EVIL[:-1]}%h")')[-2:] == [
            '* LIST (\\HasNoChildren \\Trash) "/" "Trash"', "l OK LIST completed"]
    finally:
        PatternSet.__init__ = original  # type: ignore[method-assign]
    total = sum(len(name) for name in store.folders)
    assert counted and all(m.steps <= total for m in counted)


def test_list_refuses_oversized_patterns_with_bad(store):  # noqa: F811
    s = Session(FakeBackend(store)).login()
    long = "%" * (MAX_PATTERN_CHARS + 1)
    assert s.cmd(f'l LIST "" "{long}"') == [
        f"l BAD Mailbox pattern too long (at most {MAX_PATTERN_CHARS} characters)"]
    assert s.cmd(f'l LIST "{"a" * 1000}" "{"b" * 100}"')[-1].startswith("l BAD Mailbox pattern")
    many = " ".join(["INBOX"] * (MAX_PATTERNS + 1))
    assert s.cmd(f'l LIST "" ({many})') == [
        f"l BAD Too many mailbox patterns (at most {MAX_PATTERNS})"]
    assert s.cmd('l LIST "" *')[-1] == "l OK LIST completed"  # the session goes on


def test_recursivematch_lists_parents_of_subscribed_children(store):  # noqa: F811
    """RECURSIVEMATCH looks parents up in a set. CHILDINFO marks a parent whose
    subscribed descendant the pattern does not match (as Dovecot and imaptest's
    listext): with "A*" A/B/C is listed itself, so A and A/B are not."""
    for name in ("A", "A/B", "A/B/C", "AB"):
        store.add_folder(name).subscribed = name == "A/B/C"
    s = Session(FakeBackend(store)).login()
    got = s.cmd('l LIST (SUBSCRIBED RECURSIVEMATCH) "" A%')
    assert got == ['* LIST (\\HasChildren) "/" "A" ("CHILDINFO" ("SUBSCRIBED"))',
                   "l OK LIST completed"]
    got = s.cmd('l LIST (SUBSCRIBED RECURSIVEMATCH) "" A/%')
    assert '* LIST (\\HasChildren) "/" "A/B" ("CHILDINFO" ("SUBSCRIBED"))' in got
    got = s.cmd('l LIST (SUBSCRIBED RECURSIVEMATCH) "" A*')
    assert got == ['* LIST (\\HasNoChildren \\Subscribed) "/" "A/B/C"', "l OK LIST completed"]


# Issue 10 item 7: LIST-EXTENDED (RFC 5258) and LSUB (RFC 3501 §6.3.9) conformance.


def test_recursivematch_with_only_remote_is_bad(store):  # noqa: F811
    """RFC 5258 §3: RECURSIVEMATCH alone, or with only REMOTE, is BAD."""
    s = Session(FakeBackend(store)).login()
    assert s.cmd('l LIST (RECURSIVEMATCH) "" "*"')[-1].startswith("l BAD")
    assert s.cmd('l LIST (RECURSIVEMATCH REMOTE) "" "*"')[-1].startswith("l BAD")
    assert s.cmd('l LIST (REMOTE SUBSCRIBED RECURSIVEMATCH) "" "*"')[-1] == \
        "l OK LIST completed"


def test_recursivematch_childinfo_on_subscribed_parent_too(store):  # noqa: F811
    """CHILDINFO says "a descendant matches the selection": a subscribed parent with a
    subscribed child carries it as well as an unsubscribed one (RFC 5258 §3.5)."""
    for name, subscribed in (("Sub", True), ("Sub/Child", True), ("Plain", False),
                             ("Plain/Child", True), ("Alone", True), ("Other", False)):
        store.add_folder(name).subscribed = subscribed
    s = Session(FakeBackend(store)).login()
    got = s.cmd('l LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
    assert '* LIST (\\HasChildren \\Subscribed) "/" "Sub" ("CHILDINFO" ("SUBSCRIBED"))' in got
    assert '* LIST (\\HasChildren) "/" "Plain" ("CHILDINFO" ("SUBSCRIBED"))' in got
    assert '* LIST (\\HasNoChildren \\Subscribed) "/" "Alone"' in got
    assert not any('"Other"' in line or '/Child"' in line for line in got)
    # Without RECURSIVEMATCH: no CHILDINFO and no unsubscribed parent.
    plain = s.cmd('l LIST (SUBSCRIBED) "" "%"')
    assert '* LIST (\\HasChildren \\Subscribed) "/" "Sub"' in plain
    assert not any("CHILDINFO" in line or '"Plain"' in line for line in plain)


def test_lsub_percent_lists_unsubscribed_parent_noselect(store):  # noqa: F811
    """RFC 3501 §6.3.9: "foo/bar" subscribed, "foo" not: LSUB "%" returns foo \\Noselect;
    "*" reaches foo/bar itself, so foo is not listed."""
    store.add_folder("Projects").subscribed = False
    store.add_folder("Projects/2026")
    store.add_folder("Archive")
    s = Session(FakeBackend(store)).login()
    assert s.cmd('l LSUB "" "%"')[:3] == [
        '* LSUB (\\HasNoChildren) "/" "Archive"',
        '* LSUB (\\HasNoChildren) "/" "INBOX"',
        '* LSUB (\\HasChildren \\Noselect) "/" "Projects"']
    star = s.cmd('l LSUB "" "*"')
    assert '* LSUB (\\HasNoChildren) "/" "Projects/2026"' in star
    assert not any('"Projects"' in line for line in star)
    assert s.cmd('l LSUB "" "Projects/%"') == [
        '* LSUB (\\HasNoChildren) "/" "Projects/2026"', "l OK LSUB completed"]


def test_deleted_parent_of_subscribed_child_is_nonexistent(store):  # noqa: F811
    """DELETE of a parent leaves its subscribed child: LIST (SUBSCRIBED RECURSIVEMATCH)
    gives the parent \\NonExistent with CHILDINFO, LSUB "%" gives it \\Noselect.
    (Subscriptions are a property of existing folders, so a subscribed name itself
    can never be \\NonExistent.)"""
    s = Session(FakeBackend(store)).login()
    assert s.cmd("c CREATE Gone/Kept")[-1] == "c OK CREATE completed"
    assert s.cmd("d DELETE Gone")[-1] == "d OK DELETE completed"
    got = s.cmd('l LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (STATUS (MESSAGES))')
    assert '* LIST (\\HasChildren \\NonExistent) "/" "Gone" ("CHILDINFO" ("SUBSCRIBED"))' \
        in got
    assert not any(line.startswith('* STATUS "Gone"') for line in got)
    assert '* LSUB (\\HasChildren \\Noselect) "/" "Gone"' in s.cmd('l LSUB "" "%"')
    assert s.cmd('l LIST (SUBSCRIBED) "" "G*"') == [
        '* LIST (\\HasNoChildren \\Subscribed) "/" "Gone/Kept"', "l OK LIST completed"]
    assert s.cmd('l LIST "" "G*"') == [
        '* LIST (\\HasNoChildren) "/" "Gone/Kept"', "l OK LIST completed"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "/", "%", "*"]), max_size=6).map("".join),
       st.lists(st.sampled_from(["a", "b", "/"]), max_size=8).map("".join))
def test_match_prefixes_agrees_with_matches(pattern, name):
    """One pass gives the name's answer and each parent's, as matching them apart does."""
    m = PatternSet([pattern])
    hit, parents = m.match_prefixes(name)
    assert hit == m.matches(name)
    assert parents == [name[:i] for i, ch in enumerate(name)
                       if ch == "/" and m.matches(name[:i])]
