"""Seeded fuzzing of the analysis every ingest runs on untrusted mail, and one focused
regression test per defect it found.

Why: a stranger's message reaches :func:`agentpost.core.ingest._analyse_indexed` (API
parse, IMAP ENVELOPE/BODYSTRUCTURE/BODY, section map, SEARCH/SORT keys) before anyone
has looked at it. :mod:`tests.mail_fuzz` generates and mutates realistic messages and
checks that nothing escapes, the renderings are well-formed IMAP, sections are inside
the message and equal a re-parse, and no stored text holds NUL. Bounds are structural
(line counts, nesting, output sizes), never wall-clock.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest

from agentpost.core.ingest import _analyse_indexed
from agentpost.mail import basesubject, imapformat, mime_tree, parse
from tests import mail_fuzz


@pytest.mark.parametrize("seed", [11, 2024])
def test_seeded_sample_keeps_every_property(seed: int) -> None:
    outcome = mail_fuzz.run(seed, 250)
    assert outcome.cases == 250
    assert outcome.failures == []


def test_every_truncation_of_a_small_message() -> None:
    raw = (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\nSubject: hi\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain; name*=utf-8''%E2%9C%93\r\n\r\nbody\r\n--b\r\n"
           b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nx\r\n--b--\r\n")
    for end in range(len(raw) + 1):
        mail_fuzz.check(raw[:end])


def test_checker_rejects_malformed_imap() -> None:
    """The property checker itself must catch what it claims to."""
    for bad in ['("a" ', '"a\r\n"', "{3}\r\nab", "{1}\r\n\x00", ")(", '"a\x00"']:
        with pytest.raises(mail_fuzz.ImapSyntaxError):
            mail_fuzz.imap_balanced(bad)
    assert mail_fuzz.imap_balanced('(("a" {2}\r\n()) NIL)') == 2


# --------------------------------------------------------------------- regressions


def test_nul_in_a_header_never_reaches_an_imap_literal() -> None:
    """RFC 3501 literals are CHAR8 (no NUL): a Subject or filename holding NUL rendered a
    literal with a raw NUL in ENVELOPE/BODYSTRUCTURE (and the row was stored without its
    renderings). Like Dovecot, we send U+FFFD in its place."""
    raw = (b"Subject: a\x00b\r\nFrom: x\x00y <a@b.example>\r\n"
           b"Content-Type: text/plain; name=\"f\x00.txt\"\r\n\r\nbody\r\n")
    parsed, imap, _ = _analyse_indexed(raw)
    envelope, structure, body, _sections = imap
    assert envelope is not None and structure is not None and body is not None
    for text in (envelope, structure, body):
        mail_fuzz.imap_balanced(text)
        assert "\x00" not in text
    assert "{5}\r\na\ufffdb" in envelope
    assert "\x00" not in imapformat.quote("\x00")
    parsed.discard()


@contextmanager
def _count_lines(module: Any) -> Iterator[list[int]]:
    """Count the Python lines executed in ``module``'s code (a step counter, not a clock)."""
    counter = [0]
    filename = module.__file__

    def tracer(frame: FrameType, event: str, _arg: Any) -> Any:
        if frame.f_code.co_filename != filename:
            return None
        if event == "line":
            counter[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        yield counter
    finally:
        sys.settrace(None)


def test_distinct_rfc2231_parameters_cost_linear_steps() -> None:
    """Each RFC 2231 parameter name used to be grouped by scanning all the pieces after
    it: 20,000 distinct ``p<i>*=x`` parameters (200 KB of header) took 6 s of CPU."""
    n = 1500
    value = "text/plain" + "".join(f"; p{i}*=x" for i in range(n))
    with _count_lines(mime_tree) as steps:
        main, params = mime_tree._content_params(value)
    assert main == "text/plain"
    assert len(params) == n
    assert steps[0] < 200 * n  # the quadratic grouping took over n * n / 2 steps


def test_nested_fwd_subject_base_subject_is_linear() -> None:
    """``[fwd:`` peeled one at a time searched for the far ``]`` each time (1 MB of
    ``[fwd:...]`` took 2 s of CPU); the scan now stops at the nearest bracket.

    That scan runs in C (``str.find``), which a line counter cannot see: this test pins
    the answer on the hostile shape and bounds the Python-level steps only."""
    n = 20000
    subject = "[fwd:" * n + "x" + "]" * n
    with _count_lines(basesubject) as steps:
        assert basesubject.base_subject(subject) == "x"
    assert steps[0] < 200 * n
    assert basesubject.base_subject("[fwd: [a] Re: hello]") == "hello"
    assert basesubject.base_subject("[a[b] c") == "[a[b] c"


def test_entities_in_one_message_are_bounded() -> None:
    """Nested multiparts of empty parts: 4 bytes of ``--c`` made one entity each (a
    digest part two, with an ENVELOPE), so 1 MB of input rendered 93 MB of BODYSTRUCTURE,
    BODY and section map. All levels together now hold at most MAX_ENTITIES."""
    inner = b"Content-Type: multipart/digest; boundary=c\n\n" + b"--c\n" * 1000
    raw = b"Content-Type: multipart/mixed; boundary=b\n\n" + b"".join(
        b"--b\n" + inner for _ in range(30))
    tree = imapformat.parse_tree(raw)
    smap = json.loads(imapformat.section_map(raw, tree))

    def count(node: list[Any]) -> int:
        return 1 + sum(count(c) for c in node[4]) if len(node) > 3 else 1

    assert count(smap) <= 2 * mime_tree.MAX_ENTITIES
    structure = imapformat.bodystructure(raw, True, tree)
    mail_fuzz.imap_balanced(structure)
    assert len(structure) < 25 * len(raw)  # was 44 times the message
    parsed, imap, _ = _analyse_indexed(raw)
    assert imap[3] == imapformat.section_map(raw, tree)
    parsed.discard()


def test_attachments_extracted_per_message_are_bounded() -> None:
    """1.5 MB of tiny ``image/png`` parts became 50,000 attachments: a blob and a row
    each, per recipient copy. Later parts stay in the raw message, which IMAP serves."""
    n = parse.MAX_ATTACHMENTS + 500
    raw = (b"Subject: many\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           + b"".join(b"--b\r\nContent-Type: image/png\r\n\r\n%d\r\n" % i for i in range(n))
           + b"--b--\r\n")
    parsed, imap, _ = _analyse_indexed(raw)
    assert len(parsed.attachments) == parse.MAX_ATTACHMENTS
    assert parsed.attachments[-1].content == str(parse.MAX_ATTACHMENTS - 1).encode()
    assert imap[1] is not None  # IMAP lists the parts as they are:
    assert imap[1].count('"image" "png"') == min(n, imapformat.MAX_PARTS)
    parsed.discard()
