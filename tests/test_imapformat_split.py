"""imapformat._split_multipart looks only at line starts (issue 12): the same parts as the
loop that found every "--boundary" and skipped those inside a line."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail import imapformat


def _split_before(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """The implementation before the change, kept as the reference."""
    delim = b"--" + boundary
    parts: list[tuple[int, int]] = []
    part_start: int | None = None
    pos = start
    while True:
        hit = raw.find(delim, pos, end)
        if hit < 0:
            break
        pos = hit + len(delim)
        if hit != start and raw[hit - 1:hit] != b"\n":
            continue
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        rest = raw[pos:line_end].rstrip(b" \t\r\n")
        if rest not in (b"", b"--"):
            continue
        if part_start is not None:
            content_end = hit
            if raw[hit - 2:hit] == b"\r\n" and hit - 2 >= part_start:
                content_end = hit - 2
            elif raw[hit - 1:hit] == b"\n" and hit - 1 >= part_start:
                content_end = hit - 1
            parts.append((part_start, content_end))
            if len(parts) >= imapformat.MAX_PARTS:
                return parts
        if rest == b"--":
            return parts
        part_start = line_end
        pos = line_end
    if part_start is not None:
        parts.append((part_start, end))
    return parts


_PIECES = st.sampled_from([b"--b", b"--b--", b"--bb", b"\r\n", b"\n", b"\r", b"x", b" ",
                           b"\t", b"-", b"b", b"--", b"--b \r\n", b"--b--\r\n"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, max_size=30).map(b"".join), st.data())
def test_the_parts_are_the_same(raw, data):
    start = data.draw(st.integers(0, len(raw)))
    end = data.draw(st.integers(start, len(raw)))
    boundary = data.draw(st.sampled_from([b"b", b"bb", b"-", b"b-"]))
    assert (imapformat._split_multipart(raw, start, end, boundary)
            == _split_before(raw, start, end, boundary))
