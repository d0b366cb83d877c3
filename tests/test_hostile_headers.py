"""Header values built to make the stdlib's structured parser quadratic.

A From of 5,000 '"' characters took 3.4 s to index and 100,000 never finished: one
message could hold an ingest thread (and, through the GIL, slow every tenant). Long
values are now decoded as unstructured text and only a prefix is indexed, while the raw
message keeps every byte.
"""

from __future__ import annotations

import email.headerregistry

import pytest

from agentpost.mail import parse


def _message(from_value: str, to_value: str) -> bytes:
    return (f"From: {from_value}\r\nTo: {to_value}\r\nSubject: hostile\r\n"
            "Content-Type: text/plain\r\n\r\nbody\r\n").encode()


@pytest.mark.parametrize("unit", ['"', "\\", '"a', "(", "=?utf-8?q?a?= "])
def test_long_hostile_address_fields_are_not_given_to_the_structured_parser(unit):
    """100 KB of a pathological pattern indexes (the old code never returned), the
    long values are unstructured headers, and the raw header pairs are kept whole."""
    value = unit * (100_000 // len(unit))
    parsed = parse.parse_message(_message(value + " <a@example.com>", value))
    assert parsed.subject == "hostile"
    raw_from = dict(parsed.headers)["From"]
    assert len(raw_from) >= 100_000
    header = parse._POLICY.header_fetch_parse("From", value)
    assert isinstance(header, email.headerregistry.UnstructuredHeader)
    assert not isinstance(header, email.headerregistry.AddressHeader)
    assert len(str(header)) <= parse.MAX_PARSED_HEADER


def test_ordinary_address_fields_still_parse_as_addresses():
    """Below the limit nothing changes: display names, several addresses, groups."""
    to = ", ".join(f"User {i} <user{i}@example.com>" for i in range(20))
    assert len(to) < parse.MAX_STRUCTURED_HEADER
    parsed = parse.parse_message(_message('"Ann Example" <ann@example.com>', to))
    assert parsed.from_address == {"email": "ann@example.com", "name": "Ann Example"}
    assert [a["email"] for a in parsed.to_addresses] == [
        f"user{i}@example.com" for i in range(20)]
    header = parse._POLICY.header_fetch_parse("To", to)
    assert isinstance(header, email.headerregistry.AddressHeader)


def test_a_long_but_honest_recipient_list_keeps_its_addresses():
    """A 200-recipient To (about 7 KB) is past the structured limit but within the
    indexed prefix: every address is still found by the linear compat parser."""
    to = ", ".join(f"user{i}@example.com" for i in range(200))
    assert parse.MAX_STRUCTURED_HEADER < len(to) < parse.MAX_PARSED_HEADER
    parsed = parse.parse_message(_message("ann@example.com", to))
    assert len(parsed.to_addresses) == 200
