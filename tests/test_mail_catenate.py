"""RFC 4469 CATENATE URLs (RFC 5092 syntax): what they name, and what is refused."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail.catenate import (
    MAX_URL_CHARS,
    BadUrl,
    PartReference,
    badurl_code,
    parse_catenate_url,
)
from agentpost.mail.imapformat import SectionSpec
from agentpost.model import errors


def parse(url, selected="INBOX"):
    return parse_catenate_url(url, selected_mailbox=selected)


def test_an_absolute_path_url_names_mailbox_uidvalidity_uid_and_section():
    ref = parse("/INBOX;UIDVALIDITY=123/;UID=20/;SECTION=1.2")
    assert ref == PartReference(mailbox="INBOX", uid=20, uidvalidity=123, section="1.2",
                                section_spec=SectionSpec(part=(1, 2)))


def test_a_uid_relative_url_names_a_message_of_the_selected_mailbox():
    assert parse(";UID=20", selected="Archive/2024") == \
        PartReference(mailbox="Archive/2024", uid=20)
    assert parse(";uid=7/;section=TEXT/;partial=10.20", selected="Sent") == PartReference(
        mailbox="Sent", uid=7, section="TEXT", section_spec=SectionSpec(text="TEXT"),
        partial=(10, 20))


def test_partial_length_is_optional_and_offset_may_be_zero():
    assert parse("/INBOX/;UID=1/;PARTIAL=0").partial == (0, None)
    assert parse("/INBOX/;UID=1/;PARTIAL=000.5").partial == (0, 5)


def test_mailbox_names_are_percent_decoded_utf8_and_inbox_is_canonical():
    assert parse("/inbox/;UID=1").mailbox == "INBOX"
    assert parse("/Inbox/Sub/;UID=1").mailbox == "INBOX/Sub"
    assert parse("/Entw%C3%BCrfe/;UID=1").mailbox == "Entwürfe"
    assert parse("/a%20b%3Bc%25/;UID=1").mailbox == "a b;c%"
    assert parse("/Tom&Jerry/;UID=1").mailbox == "Tom&Jerry"  # UTF-8, not modified UTF-7


def test_sections_are_percent_decoded_and_checked():
    ref = parse("/INBOX/;UID=3/;SECTION=1.HEADER.FIELDS%20(TO%20FROM)")
    assert ref.section == "1.HEADER.FIELDS (TO FROM)"
    assert ref.section_spec == SectionSpec(part=(1,), text="HEADER.FIELDS",
                                           fields=("TO", "FROM"))
    assert parse("/INBOX/;UID=3/;SECTION=2.MIME").section_spec == SectionSpec((2,), "MIME")


def test_relative_mailbox_paths_resolve_against_the_selected_mailbox():
    # RFC 3986 merge: the selected mailbox's last level is replaced.
    assert parse("Drafts/;UID=4", selected="INBOX").mailbox == "Drafts"
    assert parse("Drafts/;UID=4", selected="Work/Projects").mailbox == "Work/Drafts"
    assert parse("../Other/;UID=4", selected="Work/Projects/Q1").mailbox == "Work/Other"
    assert parse("Drafts/;UID=4", selected=None).mailbox == "Drafts"
    # RFC 5092 §9.1: "..;UIDVALIDITY=" is not a dot-segment.
    ref = parse("..;UIDVALIDITY=385759045/;UID=20", selected="INBOX")
    assert (ref.mailbox, ref.uidvalidity, ref.uid) == ("..", 385759045, 20)


def test_the_selected_mailbox_name_is_not_reinterpreted_as_url_syntax():
    odd = "50% off; ./.. & more"
    assert parse(";UID=9", selected=odd).mailbox == odd


@pytest.mark.parametrize("url, selected", [
    ("imap://joe@example.com/INBOX/;UID=20", "INBOX"),   # absolute: another server?
    ("IMAP://example.com/INBOX/;UID=20", "INBOX"),
    ("//example.com/INBOX/;UID=20", "INBOX"),            # network-path
    ("http://example.com/;UID=1", "INBOX"),
    ("/INBOX/;UID=20/;URLAUTH=anonymous:internal:" + "0" * 32, "INBOX"),
    ("/INBOX/;UID=20/;EXPIRE=2030-01-01T00:00:00Z;URLAUTH=authuser", "INBOX"),
    ("/INBOX", "INBOX"),                                   # a mailbox, not a message
    ("/INBOX?SUBJECT%20x", "INBOX"),                       # a search
    ("/INBOX/;UID=20#frag", "INBOX"),
    (";UID=20", None),                                     # nothing selected
    (";SECTION=1", "INBOX"),                               # needs a base message
    (";PARTIAL=0.10", "INBOX"),
    ("/INBOX/;UID=0", "INBOX"),
    ("/INBOX/;UID=01", "INBOX"),
    ("/INBOX/;UID=4294967296", "INBOX"),
    ("/INBOX/;UID=-1", "INBOX"),
    ("/INBOX/;UID=", "INBOX"),
    ("/INBOX/;UID=1/;PARTIAL=1.0", "INBOX"),
    ("/INBOX/;UID=1/;PARTIAL=x", "INBOX"),
    ("/INBOX;UIDVALIDITY=0/;UID=1", "INBOX"),
    ("/INBOX/;UID=1/;UID=2", "INBOX"),
    ("/INBOX/;SECTION=1/;UID=2", "INBOX"),                # wrong order
    ("/INBOX/;UID=1;SECTION=1", "INBOX"),                 # missing "/"
    ("/INBOX;UID=1", "INBOX"),
    ("/INBOX/;UID=1/;SECTION=", "INBOX"),
    ("/INBOX/;UID=1/;SECTION=1.BOGUS", "INBOX"),
    ("/INBOX/;UID=1/;SECTION=0", "INBOX"),
    ("/INBOX/;UID=1/;FOO=bar", "INBOX"),
    ("/;UID=1", "INBOX"),                                  # empty mailbox
    ("/a/../;UID=1", "INBOX"),
    ("/IN%ZZBOX/;UID=1", "INBOX"),                         # bad escape
    ("/IN%FFBOX/;UID=1", "INBOX"),                         # not UTF-8
    ("/IN%0ABOX/;UID=1", "INBOX"),                         # control character
    ("/IN BOX/;UID=1", "INBOX"),                           # unencoded space
    ("/INBOX/;UID=1\r\n", "INBOX"),
    ("/Entwürfe/;UID=1", "INBOX"),                         # unencoded non-ASCII
    ("mailbox:x/;UID=1", "INBOX"),                         # colon in the first segment
    ("", "INBOX"),
    ("/INBOX/;UID=1/;SECTION=" + "1." * MAX_URL_CHARS, "INBOX"),
])
def test_anything_else_is_a_bad_url(url, selected):
    with pytest.raises(BadUrl) as caught:
        parse(url, selected)
    assert caught.value.url == url
    assert caught.value.type == "bad_url"
    assert isinstance(caught.value, errors.InvalidRequest)


def test_the_badurl_response_code_cannot_break_out_of_its_brackets():
    assert badurl_code("/INBOX/;UID=20") == "BADURL /INBOX/;UID=20"
    assert badurl_code('/a]b\\c\r\n d\u00e9') == "BADURL /abcd"
    assert badurl_code("]]") == "BADURL ?"


_MAILBOX = st.text(st.characters(blacklist_categories=("Cs", "Cc")),
                   min_size=1, max_size=20).filter(lambda n: "/" not in n and n not in
                                                   (".", "..") and n.upper() != "INBOX")


@settings(max_examples=300, deadline=None)
@given(_MAILBOX, st.integers(1, 2**32 - 1), st.one_of(st.none(), st.integers(1, 2**32 - 1)),
       st.one_of(st.none(), st.lists(st.integers(1, 99), min_size=1, max_size=4)),
       st.one_of(st.none(), st.tuples(st.integers(0, 10**9), st.integers(1, 10**9))))
def test_generated_urls_parse_back_to_what_they_encode(mailbox, uid, uidvalidity, part,
                                                       partial):
    url = "/" + urllib.parse.quote(mailbox, safe="")
    url += f";UIDVALIDITY={uidvalidity}" if uidvalidity else ""
    url += f"/;UID={uid}"
    section = ".".join(map(str, part)) if part else None
    url += f"/;SECTION={section}" if section else ""
    url += f"/;PARTIAL={partial[0]}.{partial[1]}" if partial else ""
    ref = parse(url, selected=None)
    assert (ref.mailbox, ref.uid, ref.uidvalidity, ref.section, ref.partial) == \
        (mailbox, uid, uidvalidity, section, partial)
    assert ref.section_spec == (SectionSpec(part=tuple(part)) if part else None)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_input_either_parses_or_is_a_bad_url(text):
    try:
        parse(text)
    except BadUrl as exc:
        assert badurl_code(exc.url).startswith("BADURL ")
