"""Address fields are parsed once per process (issue 12): a cached result must be the
same as a fresh one, and no caller may change what the next message gets."""

from __future__ import annotations

from agentpost.mail import imapformat, parse, searchkeys
from agentpost.mail.parse import parse_message

RAW = (b"From: Ann Example <ann@example.com>\r\nTo: bob@example.org, Cy <cy@example.net>\r\n"
       b"Subject: hi\r\n\r\nbody\r\n")


def test_a_cached_parse_is_a_private_copy():
    first = parse_message(RAW)
    assert first.from_address == {"email": "ann@example.com", "name": "Ann Example"}
    first.from_address["email"] = "mallory@example.com"
    first.to_addresses.append({"email": "x@example.com", "name": ""})
    second = parse_message(RAW)
    assert second.from_address == {"email": "ann@example.com", "name": "Ann Example"}
    assert [a["email"] for a in second.to_addresses] == ["bob@example.org", "cy@example.net"]


def test_cached_and_uncached_renderings_agree():
    value = "Ann Example <ann@example.com>, \"Q, R\" <q@example.com>, group: a@b.c;"
    assert imapformat._cached_address_list(value) == imapformat._render_address_list(value)
    assert searchkeys._addresses([value]) == searchkeys._parse_addresses([value])
    assert parse._addresses([value]) == parse._parse_addresses([value])


def test_long_fields_bypass_the_cache():
    long_value = ", ".join(f"u{i}@example.com" for i in range(200))  # > 1024 characters
    before = parse._cached_addresses.cache_info().currsize
    assert len(parse._addresses([long_value])) == 200
    assert parse._cached_addresses.cache_info().currsize == before
