"""The keyword <-> label rules (agentpost.mail.keywords): reversible, case-insensitive,
every RFC 3501 flag-keyword atom storable, client bookkeeping kept out of the labels."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail import keywords

#: ATOM-CHAR (RFC 3501 9): 7-bit printable characters but the atom-specials.
ATOM_CHARS = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in '(){%*"\\]')
atoms = st.text(alphabet=ATOM_CHARS, min_size=1, max_size=keywords.MAX_KEYWORD_CHARS)
labels = st.from_regex(keywords.LABEL_RE, fullmatch=True).filter(
    lambda s: s not in keywords.CLIENT_KEYWORDS)


def _recase(text: str, pattern: list[bool]) -> str:
    return "".join(c.upper() if pattern[i % len(pattern)] else c.lower()
                   for i, c in enumerate(text))


@settings(max_examples=300)
@given(labels)
def test_a_label_is_its_own_keyword_and_comes_back_unchanged(label):
    """label -> keyword -> label is the identity."""
    keyword = keywords.label_to_keyword(label)
    assert keywords.is_keyword(keyword)
    assert keywords.keyword_to_label(keyword) == label
    assert keywords.label_problem(label) is None


@settings(max_examples=300)
@given(atoms, st.lists(st.booleans(), min_size=1, max_size=8))
def test_mapping_ignores_case(atom, pattern):
    """Two spellings of one keyword are the same label (or both IMAP-only)."""
    other = _recase(atom, pattern)
    assert keywords.fold(atom) == keywords.fold(other)
    assert keywords.keyword_to_label(atom) == keywords.keyword_to_label(other)


@settings(max_examples=300)
@given(atoms)
def test_keyword_to_label_and_back_is_the_same_keyword(atom):
    """keyword -> label -> keyword gives the keyword back up to case (IMAP ignores case),
    and a keyword that is no label stays IMAP-only."""
    assert keywords.is_keyword(atom)
    label = keywords.keyword_to_label(atom)
    if label is None:
        assert not keywords.is_label(keywords.fold(atom))
        assert keywords.split([keywords.fold(atom)]) == ([], [keywords.fold(atom)])
    else:
        assert keywords.fold(keywords.label_to_keyword(label)) == keywords.fold(atom)
        assert keywords.split([label]) == ([label], [])


@settings(max_examples=200)
@given(st.lists(atoms, max_size=20))
def test_parse_keeps_the_first_spelling_per_folded_keyword(flags):
    """parse() folds, keeps one spelling each, and skips system flags."""
    parsed = keywords.parse([*flags, "\\Seen", "\\Flagged"])
    assert set(parsed) == {keywords.fold(f) for f in flags}
    assert all(keywords.fold(spelled) == folded for folded, spelled in parsed.items())
    assert keywords.spell(sorted(parsed), parsed) == [parsed[k] for k in sorted(parsed)]


def test_the_keywords_the_conformance_suite_and_real_clients_use():
    """$hello, $Label1..5, $Forwarded, $Junk, $MDNSent and mutt's Old are keywords, none a
    label; plain words keep being labels, whatever their case."""
    for flag in ("$hello", "$Label1", "$Label5", "$Forwarded", "$Junk", "$NotJunk",
                 "$MDNSent", "$Submitted", "Old", "NonJunk", "Junk", "NotJunk", "Forwarded"):
        assert keywords.is_keyword(flag), flag
        assert keywords.keyword_to_label(flag) is None, flag
    assert keywords.keyword_to_label("Urgent") == "urgent"
    assert keywords.keyword_to_label("project-X") == "project-x"
    assert keywords.keyword_to_label("a" * 65) is None  # longer than a label: IMAP-only


@pytest.mark.parametrize("atom", ["", "caf\u00e9", "a b", "a(b", "a]", "a%", "a*", 'a"',
                                  "\\Custom", "x" * (keywords.MAX_KEYWORD_CHARS + 1)])
def test_what_cannot_be_a_keyword(atom):
    """Atom-specials, 8-bit characters and overlong atoms are refused by name."""
    assert not keywords.is_keyword(atom)
    if not atom.startswith("\\"):
        with pytest.raises(ValueError) as raised:
            keywords.parse(["$ok", atom])
        assert raised.value.args == (atom,)


def test_fold_is_ascii_only():
    """i;ascii-casemap: only A-Z fold (IMAP never folds other scripts)."""
    assert keywords.fold("$MDNSent") == "$mdnsent"
    assert keywords.fold("\u00c4") == "\u00c4"
    assert keywords.fold(string.ascii_uppercase) == string.ascii_lowercase


def test_api_label_rules_and_reserved_client_keywords():
    """The API's label rules stand; client bookkeeping names are refused with a reason."""
    assert keywords.label_problem("urgent") is None
    assert "lowercase" in (keywords.label_problem("Not Lowercase") or "")
    assert "lowercase" in (keywords.label_problem("$label1") or "")
    assert "IMAP clients" in (keywords.label_problem("old") or "")
    with pytest.raises(ValueError):
        keywords.label_to_keyword("old")


def test_caps_count_labels_and_imap_only_keywords_apart():
    """50 labels and 50 IMAP-only keywords fit; one more of either does not."""
    fifty_labels = [f"k{i}" for i in range(keywords.MAX_LABELS)]
    fifty_others = [f"$k{i}" for i in range(keywords.MAX_IMAP_KEYWORDS)]
    assert keywords.cap_problem(fifty_labels + fifty_others) is None
    assert "labels" in (keywords.cap_problem([*fifty_labels, "one-more"]) or "")
    assert "IMAP-only" in (keywords.cap_problem([*fifty_others, "$more"]) or "")


def test_spell_ignores_a_spelling_of_another_keyword():
    """A spelling is used only for the keyword it folds to."""
    assert keywords.spell(["$label1", "urgent"], {"$label1": "$Label1", "urgent": "x"}) == [
        "$Label1", "urgent"]
