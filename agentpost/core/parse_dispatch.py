"""Where a message is parsed: on the reactor thread when small and plain, else in the pool.

Why: parsing is pure Python and holds the GIL, so a pool thread gave small messages no
parallelism, only two thread handoffs per message (the pool's queue, then the reactor's
waker) and GIL hand-overs between the reactor and up to ten pool threads, much of it kernel
time (futex) on the MX (issue 12). A plain 4 KiB message parses in about half a
millisecond, less than one GIL switch interval.

Size alone is not enough: the stdlib parser has shapes that cost far more than their size
suggests (a 6 KiB message of nested multiparts took 34 ms, 8 KiB of Content-Type
parameters 125 ms). On the reactor such a message would stall every session; in a pool
thread the reactor still gets the GIL every switch interval. So a message is parsed
inline only when a few byte counts (C speed, microseconds) show none of those shapes;
anything else, and anything large, goes to the pool as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads

from agentpost.mail.parse_fast import has_bare_cr

T = TypeVar("T")

#: Messages up to this many bytes may be parsed on the reactor thread.
INLINE_PARSE_MAX_BYTES = 16 * 1024
#: A message with one text part, up to this many bytes: its body has nothing for the
#: parsers to walk, so only its header is checked (its byte counts over the body cost
#: ~0.3-0.5 ms at 100 KiB, as much as the parse), and the parse is linear and fast (a
#: 100 KiB text message: ~0.5 ms, about what the pool's two hand-offs and the GIL
#: hand-overs cost the reactor; measured on the MX, issue 12). Not when the body has a
#: bare CR: the stdlib parser takes those messages, a line per CR (120 KB of "x\r":
#: 24 ms, which belongs in the pool).
SINGLE_PART_INLINE_MAX_BYTES = 128 * 1024
#: A Content-Type field of a header and the first five bytes of its value.
_CONTENT_TYPE = re.compile(rb"(?im)^content-type[ \t]*:\s*(\S{0,5})")
#: ... and only with at most this many of each costly shape (see looks_plain).
MAX_HEADER_BYTES = 8 * 1024
MAX_HEADER_LINES = 150
MAX_HEADER_SPACES = 600  # tokens of structured and encoded-word parsing
#: What separates tokens of a structured header: the header parser's cost grows with
#: their count, whichever one a sender uses (8 KiB of tabs or commas in To: cost 80-110
#: ms where spaces were counted and they were not).
_TOKEN_SEPARATORS = (b" ", b"\t", b",", b"<", b"(", b'"', b":")
MAX_BOUNDARY_LINES = 8
MAX_SEMICOLONS = 24  # MIME parameters
MAX_ENCODED_WORDS = 32
MAX_AT_SIGNS = 64  # addresses and message ids


def looks_plain(raw: bytes, limit: int = INLINE_PARSE_MAX_BYTES,
                single_part_limit: int = SINGLE_PART_INLINE_MAX_BYTES) -> bool:
    """Whether ``raw`` is small and has none of the shapes that make parsing slow: up to
    ``limit`` bytes, or ``single_part_limit`` when it has one text part."""
    if len(raw) > max(limit, single_part_limit):
        return False
    end = raw.find(b"\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    if end < 0:
        end = len(raw)
    if not (end <= MAX_HEADER_BYTES
            and raw.count(b"\n", 0, end) <= MAX_HEADER_LINES
            and sum(raw.count(sep, 0, end) for sep in _TOKEN_SEPARATORS)
            <= MAX_HEADER_SPACES):
        return False
    if _one_text_part(raw, end):  # its body holds no structure: the header decides
        return (len(raw) <= single_part_limit
                and (len(raw) <= limit or not has_bare_cr(raw))
                and raw.count(b";", 0, end) <= MAX_SEMICOLONS
                and raw.count(b"=?", 0, end) <= MAX_ENCODED_WORDS
                and raw.count(b"@", 0, end) <= MAX_AT_SIGNS)
    return (len(raw) <= limit
            and raw.count(b"\n--") <= MAX_BOUNDARY_LINES
            and raw.count(b";") <= MAX_SEMICOLONS
            and raw.count(b"=?") <= MAX_ENCODED_WORDS
            and raw.count(b"@") <= MAX_AT_SIGNS)


def _one_text_part(raw: bytes, end: int) -> bool:
    """Every Content-Type field of the header (``raw[:end]``) names a text/ type, or there
    is none (text/plain): the parsers see one part, whatever its body holds. A value they
    might still read as multipart (a comment first, say) does not count."""
    return all(m.group(1).lower() == b"text/" for m in _CONTENT_TYPE.finditer(raw, 0, end))


async def analyse(reactor: Any, analyse_fn: Callable[[bytes], T], raw: bytes,
                  inline_max: int | None = None) -> T:
    """``analyse_fn(raw)``: inline when ``raw`` looks plain, else in the reactor's pool
    (``inline_max``: one limit for every shape instead of the module's two)."""
    if inline_max is None:
        plain = looks_plain(raw, INLINE_PARSE_MAX_BYTES, SINGLE_PART_INLINE_MAX_BYTES)
    else:
        plain = looks_plain(raw, inline_max, inline_max)
    if plain:
        return analyse_fn(raw)
    return await threads.deferToThreadPool(reactor, reactor.getThreadPool(), analyse_fn, raw)
