"""The SEARCH/SORT keys' fast address path (agentpost.mail.searchkeys._simple_addresses)
must give exactly what the modern parser gives, or decline: generated simple fields (the
fast path's own form) and tricky ones (quotes, comments, groups, encoded words, odd
spacing and dots), compared address by address and as whole derived rows."""

from __future__ import annotations

import email.policy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpost.mail import searchkeys

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
TRICKY = ATEXT + ' .@<>,;:()"\\[]=?\t\x7féü'

atom = st.text(alphabet=ATEXT, min_size=1, max_size=8)
dot_atom = st.lists(atom, min_size=1, max_size=3).map(".".join)
addr_spec = st.builds(lambda local, domain: f"{local}@{domain}", dot_atom, dot_atom)
name_word = st.text(alphabet=ATEXT + ".", min_size=1, max_size=8)
display = st.lists(name_word, min_size=1, max_size=4).map(" ".join)
simple_item = st.one_of(
    addr_spec, addr_spec.map(lambda a: f"<{a}>"),
    st.builds(lambda n, a: f"{n} <{a}>", display, addr_spec))
simple_field = st.lists(simple_item, min_size=1, max_size=5).map(", ".join)
tricky_piece = st.one_of(
    st.sampled_from(['"Doe, John"', "(comment)", "group:", ";", "=?utf-8?q?J=C3=B6?=",
                     "  ", ",", ", ,", "<", ">", "@", ".", "..", "\\", "[1.2.3.4]",
                     "\t", "é", "undisclosed-recipients:;", "a@", "@b"]),
    simple_item, st.text(alphabet=TRICKY, max_size=12))
tricky_field = st.lists(tricky_piece, min_size=1, max_size=6).map(" ".join)


def slow(text: str) -> list[Any]:
    """The modern parser, as searchkeys uses it (a field it cannot parse: none)."""
    try:
        return list(email.policy.default.header_factory("to", text).addresses)
    except Exception:
        return []


def shape(addresses: list[Any]) -> list[tuple[str, str, str, str]]:
    return [(a.display_name, a.username, a.domain, str(a)) for a in addresses]


def check_same(text: str) -> bool:
    """True if the fast path answered (and then agreed with the modern parser)."""
    fast = searchkeys._simple_addresses(text)
    if fast is None:
        return False
    assert fast == slow(text), text
    assert shape(fast) == shape(slow(text)), text
    assert [searchkeys._addr_spec(a) for a in fast] == \
        [searchkeys._addr_spec(a) for a in slow(text)]
    return True


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(simple_field)
def test_simple_fields_take_the_fast_path_and_match_the_modern_parser(text):
    fast = searchkeys._simple_addresses(text)
    if fast is not None:
        check_same(text)
    else:  # declined: only where the modern parser reads it differently from legacy
        assert searchkeys._addresses([text]) == slow(text)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(tricky_field)
def test_tricky_fields_match_or_decline(text):
    check_same(text)
    assert searchkeys._addresses([text]) == slow(text)


@pytest.mark.parametrize("text", [
    "a@b.org", "John Smith <john@example.com>", "<a@b>", "x-y <a@b.c>",
    "John Smith <jqp@example.org>, bob@example.net, <c@d>",
])
def test_common_forms_take_the_fast_path(text):
    assert check_same(text)


@pytest.mark.parametrize("text", [
    '"Doe, John" <j@x>', "j@x (John)", "team: a@b, c@d;", "=?utf-8?q?J=C3=B6?= <j@x>",
    "J  Smith <a@b>", "John<a@b>", "a@b, , c@d", "foo", "a@[1.2.3.4]", "Jö <j@x>",
    "a..b@c", "a@b.", ". <a@b>", "x.y <a@b.c>", "John Q. Public <jqp@example.org>",
])
def test_other_forms_decline(text):
    assert searchkeys._simple_addresses(text) is None
    assert searchkeys._addresses([text]) == slow(text)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["From", "To", "Cc", "Bcc", "Subject"]),
                          st.one_of(simple_field, tricky_field)), max_size=6))
def test_index_fields_are_the_same_with_and_without_the_fast_path(headers):
    fast = searchkeys.index_fields(headers, "s", None)
    original = searchkeys._simple_addresses
    searchkeys._simple_addresses = lambda text: None  # type: ignore[assignment]
    try:
        slow_fields = searchkeys.index_fields(headers, "s", None)
    finally:
        searchkeys._simple_addresses = original  # type: ignore[assignment]
    assert fast == slow_fields
