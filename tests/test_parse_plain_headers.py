"""The plain-header shortcut of mail.parse (issue 12) gives exactly what the stdlib header
classes give: the subject text, and the message ids the store keeps."""

from __future__ import annotations

import email

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail import parse
from agentpost.mail.sanitize import header_text

_PIECES = ["<a@b>", "<x.y@z.example>", " ", "\t", "(", ")", '"', "\\", "=?", "?=",
           "=?utf-8?q?caf=C3=A9?=", "<", ">", "@", "\r\n ", "Re:", ";", ",", ":", "é",
           "a", "\x7f", "\x01"]
_values = st.lists(st.one_of(st.sampled_from(_PIECES), st.characters(max_codepoint=0x17f)),
                   max_size=30).map("".join)


def _through_the_stdlib(msg, name: str) -> str | None:
    """What parse._header_text returned before the shortcut."""
    try:
        value = msg.get(name)
    except Exception:
        value = parse._raw_header(msg, name)
    if value is None:
        return None
    try:
        return header_text(str(value))
    except Exception:
        return header_text(parse._raw_header(msg, name) or "")


@settings(max_examples=400, deadline=None)
@given(value=_values, name=st.sampled_from(["Subject", "Message-ID", "In-Reply-To",
                                            "References"]))
def test_the_shortcut_agrees_with_the_stdlib(value, name):
    raw = f"{name}: {value}\r\nX-Other: 1\r\n\r\nbody\r\n".encode("utf-8", "surrogateescape")
    msg = email.message_from_bytes(raw, policy=parse._POLICY)
    slow = _through_the_stdlib(msg, name.lower())
    fast = parse._header_text(msg, name.lower())
    if name == "Subject":
        assert fast == slow
    elif name == "Message-ID":
        assert parse._msgids(fast)[:1] == parse._msgids(slow)[:1]
    else:
        assert parse._msgids(fast) == parse._msgids(slow)


def test_plain_values_take_the_shortcut_and_others_do_not():
    msg = email.message_from_bytes(
        b"Subject: Re: the plan (v2)\r\nMessage-ID: <1@x.example>\r\n"
        b"References: <0@x.example>\r\n <1@x.example>\r\n"
        b"In-Reply-To: =?utf-8?q?x?= <1@x.example>\r\n\r\n", policy=parse._POLICY)
    assert parse._plain_header(msg, "subject") == "Re: the plan (v2)"
    assert parse._plain_header(msg, "message-id") == "<1@x.example>"
    assert parse._plain_header(msg, "references") == "<0@x.example> <1@x.example>"
    assert parse._plain_header(msg, "in-reply-to") is None  # an encoded word: the stdlib
    assert parse._plain_header(msg, "message-id") == parse._header_text(msg, "message-id")


@settings(max_examples=300, deadline=None)
@given(value=st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"\n", b"\r", b"\r\n ",
                                       b"\n\t", b":", b"\xc3\xa9", b"=?"]), max_size=20)
       .map(b"".join))
def test_imap_field_values_unfold_as_before(value):
    """imapformat._field_value skips its unfolding regex on unfolded fields (issue 12):
    the text it returns is the same as with the regex applied every time."""
    import re

    from agentpost.mail import imapformat

    raw = b"X-Field:" + value + b"\r\n\r\n"
    fields, _ = imapformat._split_header(raw, 0, len(raw))
    ent = imapformat._Entity(0, 0, len(raw), fields)
    got = imapformat._field_value(raw, ent, "x-field")
    for fname, fstart, fend in fields:
        if fname == "x-field":
            text = raw[fstart:fend]
            old = text[text.find(b":") + 1:]
            old = re.sub(rb"\r?\n(?=[ \t])", b"", old).rstrip(b"\r\n")
            assert got == imapformat._decode(old).strip()
            break
    else:
        assert got is None
