"""Large MIME parts bypass the stdlib parser; the parsed fields must not change."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings

from agentpost.mail import largeparts
from agentpost.mail.parse import parse_message
from tests.mailfactory import make_message
from tests.test_ingest_robustness import mime_messages


def _corpus() -> list[bytes]:
    rng = random.Random(7)
    blob = bytes(rng.getrandbits(8) for _ in range(300_000))
    return [
        make_message(body="plain " * 50_000),
        make_message(body="Gr\u00fc\u00dfe " * 40_000, html="<p>" + "x" * 300_000 + "</p>"),
        make_message(attachments=[("a.bin", "application/octet-stream", blob),
                                  ("b.txt", "text/plain", b"small"),
                                  ("c.pdf", "application/pdf", blob[::-1])]),
        make_message(body="=\u00e9 " * 90_000),  # quoted-printable body
        make_message(attachments=[("n.txt", "text/plain", ("line \u00e9\n" * 60_000)
                                   .encode())]),
    ]


def _fields(parsed) -> dict:
    atts = []
    for att in parsed.attachments:
        content = att.content
        if content is None:
            with open(att.path, "rb") as f:
                content = f.read()
        atts.append((att.filename, att.mime_type, content, att.sha256, att.size,
                     att.content_id, att.disposition, att.part_index))
    return {"headers": parsed.headers, "subject": parsed.subject, "text": parsed.text_body,
            "html": parsed.html_body, "from": parsed.from_address, "atts": atts}


@pytest.mark.parametrize("raw", _corpus())
def test_large_parts_parse_like_the_stdlib(raw, tmp_path):
    plain = parse_message(raw, large_part_bytes=10**12)
    cut = parse_message(raw, large_part_bytes=1000, spool_dir=str(tmp_path))
    assert cut.claimed > 0
    assert _fields(cut) == _fields(plain)
    spooled = [a.path for a in cut.attachments if a.path]
    cut.discard()
    assert not any(os.path.exists(p) for p in spooled) and not os.listdir(tmp_path)


def test_skeleton_marks_and_removes_only_large_leaves():
    raw = _corpus()[2]
    source, parts = largeparts.skeleton(raw, 1000)
    assert len(parts) == 2 and len(source) < 10_000
    assert source.count(largeparts.MARKER.encode()) == 2
    assert largeparts.skeleton(raw, 10**9) == (raw, [])


def test_base64_decoder_tolerates_junk_and_missing_padding():
    part = largeparts.LargePart(0, 0)
    for encoded, expected in ((b"aGVs\r\nbG8=", b"hello"), (b"aGVsbG8", b"hello"),
                              (b"aGV!!sbG8=\r\n", b"hello"), (b"", b"")):
        part = largeparts.LargePart(0, len(encoded))
        assert largeparts.decode_to_bytes(encoded, part, "base64") == expected


@settings(max_examples=200, deadline=None)
@given(mime_messages())
def test_malformed_messages_never_raise_with_cuts(raw):
    parsed = parse_message(raw, large_part_bytes=0)
    try:
        assert isinstance(parsed.subject, str)
        assert parsed.claimed in (0, len(largeparts.skeleton(raw, 0)[1]))
    finally:
        parsed.discard()


@settings(max_examples=150, deadline=None)
@given(mime_messages())
def test_caching_header_policy_parses_like_the_default(raw):
    """The header cache is invisible: same fields as email.policy.default."""
    import email.policy

    from agentpost.mail import parse

    cached = parse.parse_message(raw)
    original = parse._POLICY
    parse._POLICY = email.policy.default
    try:
        plain = parse.parse_message(raw)
    finally:
        parse._POLICY = original
    assert _fields(cached) == _fields(plain)
    assert cached.to_addresses == plain.to_addresses and cached.sent_at == plain.sent_at
    assert cached.references == plain.references


@pytest.mark.parametrize("raw", _corpus()[:3])
def test_caching_header_policy_on_the_corpus(raw, tmp_path):
    import email.policy

    from agentpost.mail import parse

    first = parse.parse_message(raw, spool_dir=str(tmp_path))
    cached = _fields(first)
    first.discard()
    original = parse._POLICY
    parse._POLICY = email.policy.default
    try:
        again = parse.parse_message(raw, spool_dir=str(tmp_path))
        assert _fields(again) == cached
        again.discard()
    finally:
        parse._POLICY = original
    assert not os.listdir(tmp_path)  # every spooled part was removed
