"""What the smarthost transport puts on the wire: every line end CRLF (no bare CR or
LF: SMTP smuggling), a final CRLF, and a doubled dot at the start of every line
(RFC 5321 §4.5.2) -- checked against a line-by-line reference on many random inputs,
including the usual message the fast paths return without a copy."""

from __future__ import annotations

import random

from agentpost.outbound.smarthost import dot_stuff, normalise


def _lines(raw: bytes) -> list[bytes]:
    """Lines split at CRLF, a bare CR or a bare LF (each one line end)."""
    marked = raw.replace(b"\r\n", b"\0").replace(b"\r", b"\0").replace(b"\n", b"\0")
    return marked.split(b"\0")


def _reference_normalise(raw: bytes) -> bytes:
    *ended, last = _lines(raw)
    return b"".join(line + b"\r\n" for line in ended) + (last + b"\r\n" if last else b"")


def _reference_dot_stuff(crlf_text: bytes) -> bytes:
    return b"\r\n".join(b"." + line if line.startswith(b".") else line
                        for line in crlf_text.split(b"\r\n"))


def test_wire_form_matches_the_line_by_line_reference():
    rng = random.Random(5321)
    pieces = [b"a", b"\r", b"\n", b".", b"\r\n", b"\r\n.", b"Subject: x"]
    for _ in range(5000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        if not raw:
            continue
        wire = normalise(raw)
        assert wire == _reference_normalise(raw), raw
        assert dot_stuff(wire) == _reference_dot_stuff(wire), wire


def test_the_usual_message_is_returned_as_it_is():
    raw = b"From: a@example.com\r\nSubject: hi\r\n\r\nline. one\r\n"
    assert normalise(raw) is raw
    assert dot_stuff(raw) is raw
    assert dot_stuff(b".x\r\n") == b"..x\r\n"
    assert normalise(b"a\nb\r.c") == b"a\r\nb\r\n.c\r\n"
