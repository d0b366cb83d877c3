"""The DATA body decoder against a simple line-by-line reference, over any chunking.

The decoder works on whole buffers (a few scans per call, issue 12); the reference is
the first, one-step-per-line version: simple enough to trust, too slow to keep.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.smtp.parser import DataDecoder


class _Reference:
    """Per-line decoder: same contract as DataDecoder.feed."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.line_too_long = False
        self.done = False
        self._pending = b""
        self._at_line_start = True
        self._line_bytes = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        buf = self._pending + data
        self._pending = b""
        out: list[bytes] = []
        i, n = 0, len(buf)
        while i < n:
            if self._at_line_start:
                if buf[i] == 0x2E:
                    if n - i < 3 and b".\r\n".startswith(buf[i:]):
                        self._pending = buf[i:]
                        break
                    if buf[i + 1:i + 3] == b"\r\n":
                        self.done = True
                        return b"".join(out), buf[i + 3:]
                    i += 1
                    self._line_bytes = 1
                self._at_line_start = False
            end = buf.find(b"\r\n", i)
            if end < 0:
                stop = n - 1 if buf[n - 1] == 0x0D else n
                out.append(buf[i:stop])
                self._line_bytes += stop - i
                if self._line_bytes + 2 > self.max_line_bytes:
                    self.line_too_long = True
                self._pending = buf[stop:]
                break
            out.append(buf[i:end + 2])
            self._line_bytes += end + 2 - i
            if self._line_bytes > self.max_line_bytes:
                self.line_too_long = True
            self._line_bytes = 0
            self._at_line_start = True
            i = end + 2
        return b"".join(out), None


def _run(decoder: DataDecoder | _Reference, chunks: list[bytes]) -> tuple[Any, ...]:
    body, rest, held = [], None, 0
    for chunk in chunks:
        if decoder.done:
            break
        part, rest = decoder.feed(chunk)
        body.append(part)
        held = max(held, len(decoder._pending))
    return b"".join(body), rest, decoder.line_too_long, decoder.done, held


_PIECES = st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"x", b"..", b"\r\n.", b"\r\n.\r\n",
                           b"yyyyy", b"z" * 13, b"\r\n..\r\n", b"\n.\n"])


@settings(max_examples=1500, deadline=None)
@given(st.lists(_PIECES, max_size=24), st.lists(st.integers(0, 200), max_size=6),
       st.sampled_from([3, 5, 10, 20, 1000]))
def test_decoder_matches_the_line_by_line_reference(pieces, cuts, max_line):
    data = b"".join(pieces)
    bounds = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    new = _run(DataDecoder(max_line_bytes=max_line), chunks)
    assert new[:4] == _run(_Reference(max_line), chunks)[:4]
    assert new[4] <= 2  # never holds back more than two bytes


def test_a_whole_message_in_one_buffer():
    decoder = DataDecoder()
    body, rest = decoder.feed(b"Subject: x\r\n\r\n..a\r\n.b\r\nc.\r\n.\r\nQUIT\r\n")
    assert (body, rest) == (b"Subject: x\r\n\r\n.a\r\nb\r\nc.\r\n", b"QUIT\r\n")
    assert not decoder.line_too_long


def test_a_long_line_in_the_middle_of_a_buffer_is_noted():
    decoder = DataDecoder(max_line_bytes=10)
    body, rest = decoder.feed(b"a\r\n" + b"b" * 9 + b"\r\nc\r\n" + b"d\r\n" * 5)
    assert rest is None and decoder.line_too_long
    assert body.startswith(b"a\r\nbbbbbbbbb\r\n")
